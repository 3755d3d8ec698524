//! PVM emulation fix-ups (being written).
