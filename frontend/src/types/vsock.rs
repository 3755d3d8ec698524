//! virtio-vsock (device ID 19) as hype sees it: the config (`guest_cid`) comes from the
//! backend, which owns the guest's address.

use super::TypeSpec;

/// virtio-vsock's device ID (`VIRTIO_ID_VSOCK`).
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// Config bytes: `guest_cid` (le64).
pub const CONFIG_SIZE: u32 = 8;

/// virtio-vsock.
pub const SPEC: TypeSpec = TypeSpec {
    name: "vsock",
    virtio_id: VIRTIO_ID_VSOCK,
    config_size: CONFIG_SIZE,
    // Never learned from features: given as `vsock:PATH`.
    signature: 0,
    // Bit 0: VIRTIO_VSOCK_F_STREAM, bit 1: VIRTIO_VSOCK_F_SEQPACKET.
    device_bits: 0b11,
    writable_config: &[],
    queue_count: None,
    default_queues: 3,
    config_optional: false,
    check_config,
    describe_config,
};

fn cid(config: &[u8]) -> Option<u64> {
    let b: [u8; 8] = config.get(..8)?.try_into().ok()?;
    Some(u64::from_le_bytes(b))
}

fn check_config(_features: u64, config: &[u8], _queue_num: Option<u64>) -> Result<(), String> {
    // CIDs 0..=2 are the hypervisor, local and host addresses; u32::MAX is VMADDR_CID_ANY.
    match cid(config) {
        Some(c) if c > 2 && c < u64::from(u32::MAX) => Ok(()),
        Some(c) => Err(format!("guest_cid {c} is not a guest address")),
        None => Err("config too short for guest_cid".into()),
    }
}

fn describe_config(config: &[u8]) -> String {
    match cid(config) {
        Some(c) => format!("guest CID {c}"),
        None => "no CID".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::DeviceType;

    #[test]
    fn cid_check() {
        let t = DeviceType::Vsock;
        assert_eq!(t.check_config(0, &3u64.to_le_bytes(), None), Ok(()));
        assert!(t.check_config(0, &2u64.to_le_bytes(), None).is_err());
        assert!(t.check_config(0, &[0u8; 4], None).is_err());
        assert_eq!(t.describe_config(&7u64.to_le_bytes()), "guest CID 7");
    }
}
