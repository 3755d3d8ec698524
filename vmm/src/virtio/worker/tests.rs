//! Unit tests of the device worker against a mock backend link.
