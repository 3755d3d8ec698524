//! virtio-rng (device ID 4), the entropy device: one request queue, no config, no features.

use super::TypeSpec;

/// virtio-rng's device ID (`VIRTIO_ID_RNG`).
pub const VIRTIO_ID_RNG: u32 = 4;

/// virtio-rng.
pub const SPEC: TypeSpec = TypeSpec {
    name: "rng",
    virtio_id: VIRTIO_ID_RNG,
    config_size: 0,
    // Never learned from features: given as `rng:PATH`.
    signature: 0,
    device_bits: 0,
    writable_config: &[],
    queue_count: None,
    default_queues: 1,
    config_optional: true,
    check_config: |_, _, _| Ok(()),
    describe_config: |_| "entropy source".into(),
};
