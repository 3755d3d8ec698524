//! The sandbox of `hype block-mem`: the disk is process memory, so serving needs nothing
//! beyond the runtime and vhost-user serving, and no path at all (the image, if any, is read
//! before the process is confined).

use hype_daemon::sandbox::{Policy, CLONE3_REFUSED, OPEN_REFUSED, RUNTIME, VHOST_USER};

/// Everything `hype block-mem` may call once serving.
pub static POLICY: Policy = Policy {
    name: "block-mem",
    groups: &[&RUNTIME, &VHOST_USER],
    refusals: &[CLONE3_REFUSED, OPEN_REFUSED],
};
