//! virtio-console (device ID 3) as hype sees it: signature, config layout, writable fields.
//! (`virtio-bindings` has no virtio-console module; the names are those of Linux's
//! `virtio_console.h`.)

use virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;

use super::{le32, ConfigField, TypeSpec};
use crate::features::bit;

/// `VIRTIO_CONSOLE_F_SIZE`: `cols`/`rows` are valid.
pub const VIRTIO_CONSOLE_F_SIZE: u32 = 0;
/// `VIRTIO_CONSOLE_F_MULTIPORT`: `max_nr_ports` is valid, control queues exist.
pub const VIRTIO_CONSOLE_F_MULTIPORT: u32 = 1;
/// `VIRTIO_CONSOLE_F_EMERG_WRITE`: the driver may write `emerg_wr`.
pub const VIRTIO_CONSOLE_F_EMERG_WRITE: u32 = 2;

/// Offset of `max_nr_ports`.
pub const MAX_NR_PORTS_OFFSET: usize = 4;
/// Offset of `emerg_wr`.
pub const EMERG_WR_OFFSET: u32 = 8;
/// Config bytes: `cols`, `rows`, `max_nr_ports`, `emerg_wr`.
pub const CONFIG_SIZE: u32 = 12;

/// virtio-console.
pub const SPEC: TypeSpec = TypeSpec {
    name: "console",
    virtio_id: VIRTIO_ID_CONSOLE,
    config_size: CONFIG_SIZE,
    signature: bit(VIRTIO_CONSOLE_F_EMERG_WRITE),
    // Console devices define only bits 0..=2.
    device_bits: bit(VIRTIO_CONSOLE_F_SIZE)
        | bit(VIRTIO_CONSOLE_F_MULTIPORT)
        | bit(VIRTIO_CONSOLE_F_EMERG_WRITE),
    writable_config: &[ConfigField {
        offset: EMERG_WR_OFFSET,
        len: 4,
        feature: bit(VIRTIO_CONSOLE_F_EMERG_WRITE),
        sticky: false,
    }],
    queue_count: None,
    default_queues: 2,
    config_optional: false,
    check_config,
    describe_config,
};

fn check_config(features: u64, config: &[u8], _queue_num: Option<u64>) -> Result<(), String> {
    if features & bit(VIRTIO_CONSOLE_F_MULTIPORT) != 0 {
        let ports = le32(config, MAX_NR_PORTS_OFFSET).ok_or("config too short for max_nr_ports")?;
        if ports == 0 {
            return Err("max_nr_ports is 0".into());
        }
    }
    Ok(())
}

fn describe_config(_config: &[u8]) -> String {
    "console".into()
}

#[cfg(test)]
mod tests {
    use super::super::{type_from_features, DeviceType};

    #[test]
    fn signature_and_ports_check() {
        let console = 1 << 32 | 1 << 2 | 1 << 0;
        assert_eq!(type_from_features(console), Ok(DeviceType::Console));
        assert_eq!(
            DeviceType::Console.check_config(console, &[0; 12], None),
            Ok(())
        );
        assert!(DeviceType::Console
            .check_config(console | 1 << 1, &[0; 12], None)
            .is_err());
        // A device bit consoles do not define: not a console.
        assert!(type_from_features(console | 1 << 3).is_err());
    }
}
