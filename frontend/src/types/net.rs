//! virtio-net (device ID 1) as hype sees it: signature and config layout.

use std::mem::offset_of;

use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{virtio_net_config, VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS};

use super::TypeSpec;
use crate::features::{bit, DEVICE_BITS};

/// Config bytes hype reads: `mac`, `status`, `max_virtqueue_pairs`, `mtu`.
pub const CONFIG_SIZE: u32 = offset_of!(virtio_net_config, speed) as u32;

/// virtio-net.
pub const SPEC: TypeSpec = TypeSpec {
    name: "net",
    virtio_id: VIRTIO_ID_NET,
    config_size: CONFIG_SIZE,
    signature: bit(VIRTIO_NET_F_MAC) | bit(VIRTIO_NET_F_STATUS),
    device_bits: DEVICE_BITS,
    writable_config: &[],
    queue_count: None,
    default_queues: 2,
    config_optional: false,
    check_config,
    describe_config,
};

fn check_config(_features: u64, config: &[u8], _queue_num: Option<u64>) -> Result<(), String> {
    let mac = config.get(0..6).ok_or("config too short for a MAC")?;
    if mac.iter().all(|b| *b == 0) || mac[0] & 1 != 0 {
        return Err(format!("MAC {mac:02x?} is not a unicast address"));
    }
    Ok(())
}

fn describe_config(config: &[u8]) -> String {
    match config.get(0..6) {
        Some(m) => format!(
            "MAC {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        ),
        None => "no MAC".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::{type_from_features, DeviceType};
    use super::*;

    #[test]
    fn signature_and_mac_check() {
        assert_eq!(CONFIG_SIZE, 12);
        let net = 1 << 32 | 1 << 5 | 1 << 16 | 1 << 0 | 1 << 1 | 1 << 22;
        assert_eq!(type_from_features(net), Ok(DeviceType::Net));
        let mut c = vec![0u8; 12];
        assert!(DeviceType::Net.check_config(net, &c, None).is_err());
        c[0..6].copy_from_slice(&[0x52, 0x54, 0, 1, 2, 3]);
        assert_eq!(DeviceType::Net.check_config(net, &c, None), Ok(()));
        assert_eq!(DeviceType::Net.describe_config(&c), "MAC 52:54:00:01:02:03");
        c[0] = 0x01;
        assert!(DeviceType::Net.check_config(net, &c, None).is_err());
    }
}
