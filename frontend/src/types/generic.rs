//! Any other virtio device ID (`--device 16:PATH`): passed through with the backend's
//! features and queues. hype does not know the type's config size, so it shows no config
//! (a driver that needs one sees zeros).

use super::TypeSpec;

/// A device hype has no facts about; [`super::DeviceType::Other`] carries the ID.
pub const SPEC: TypeSpec = TypeSpec {
    name: "virtio",
    virtio_id: 0,
    config_size: 0,
    signature: 0,
    device_bits: crate::features::DEVICE_BITS,
    writable_config: &[],
    queue_count: None,
    default_queues: 1,
    config_optional: true,
    check_config: |_, _, _| Ok(()),
    describe_config: |_| "config not shown".into(),
};
