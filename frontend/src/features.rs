//! The feature bits the frontend speaks of, as masks built from their `virtio-bindings`
//! names, and the vhost-user protocol features hype uses.

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::virtio_config::{
    VIRTIO_F_ANY_LAYOUT, VIRTIO_F_IN_ORDER, VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_F_ORDER_PLATFORM,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// The mask of feature bit `bit`.
pub const fn bit(bit: u32) -> u64 {
    1 << bit
}

/// `VHOST_USER_F_PROTOCOL_FEATURES` (bit 30): a vhost-user bit, never a guest feature.
pub const PROTOCOL_FEATURES: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
/// `VIRTIO_F_VERSION_1`.
pub const VERSION_1: u64 = bit(VIRTIO_F_VERSION_1);
/// `VIRTIO_RING_F_INDIRECT_DESC`.
pub const RING_INDIRECT_DESC: u64 = bit(VIRTIO_RING_F_INDIRECT_DESC);
/// `VIRTIO_RING_F_EVENT_IDX`.
pub const RING_EVENT_IDX: u64 = bit(VIRTIO_RING_F_EVENT_IDX);
/// `VIRTIO_F_ANY_LAYOUT`.
pub const ANY_LAYOUT: u64 = bit(VIRTIO_F_ANY_LAYOUT);
/// `VIRTIO_F_IN_ORDER`.
pub const IN_ORDER: u64 = bit(VIRTIO_F_IN_ORDER);
/// `VIRTIO_F_ORDER_PLATFORM`.
pub const ORDER_PLATFORM: u64 = bit(VIRTIO_F_ORDER_PLATFORM);
/// The device-specific feature bits 0..=23 (bit 24, `VIRTIO_F_NOTIFY_ON_EMPTY`, is the first
/// of the range the spec reserves for the transport).
pub const DEVICE_BITS: u64 = bit(VIRTIO_F_NOTIFY_ON_EMPTY) - 1;

/// The protocol features hype's frontend uses when a backend offers them.
pub fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
        | VhostUserProtocolFeatures::BACKEND_REQ
        | VhostUserProtocolFeatures::DEVICE_STATE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_are_the_spec_bits() {
        assert_eq!(PROTOCOL_FEATURES, 1 << 30);
        assert_eq!(VERSION_1, 1 << 32);
        assert_eq!(RING_INDIRECT_DESC | RING_EVENT_IDX, 1 << 28 | 1 << 29);
        assert_eq!(
            ANY_LAYOUT | IN_ORDER | ORDER_PLATFORM,
            1 << 27 | 1 << 35 | 1 << 36
        );
        assert_eq!(DEVICE_BITS, (1 << 24) - 1);
    }
}
