//! The sandbox of `hype net-tap`: frames between the guest and the already open tap queues,
//! the tap ioctls the guest's feature and queue choices need, and no path at all.

use hype_daemon::sandbox::{
    Cond, Group, Policy, Rule, CLONE3_REFUSED, OPEN_REFUSED, RUNTIME, VHOST_USER,
};

const TUNSETOFFLOAD: u64 = libc::TUNSETOFFLOAD;
const TUNSETVNETHDRSZ: u64 = libc::TUNSETVNETHDRSZ;
const TUNSETQUEUE: u64 = libc::TUNSETQUEUE;

/// Frames and tap settings once serving (RX `read` and TX `writev` on the tap queues are in
/// the runtime group), the
/// offloads the guest acked (`TUNSETOFFLOAD`), the header length its features imply
/// (`TUNSETVNETHDRSZ`), and attaching/detaching queues for multi-queue (`TUNSETQUEUE`, from
/// `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`).
pub static TAP: Group = Group {
    name: "net-tap",
    why: "frames on the open tap queues; TUNSETOFFLOAD, TUNSETVNETHDRSZ, TUNSETQUEUE",
    rules: &[Rule::when(
        "ioctl",
        libc::SYS_ioctl,
        &[
            &[Cond::eq(1, TUNSETOFFLOAD)],
            &[Cond::eq(1, TUNSETVNETHDRSZ)],
            &[Cond::eq(1, TUNSETQUEUE)],
        ],
    )],
};

/// Everything `hype net-tap` may call once serving.
pub static POLICY: Policy = Policy {
    name: "net-tap",
    groups: &[&RUNTIME, &VHOST_USER, &TAP],
    refusals: &[CLONE3_REFUSED, OPEN_REFUSED],
};
