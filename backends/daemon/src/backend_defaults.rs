//! Answers that every hype vhost-user backend gives the same way, for its
//! [`VhostUserBackend`](vhost_user_backend::VhostUserBackend) implementation.

use std::io;

use log::warn;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// The vhost-user protocol features hype's backends offer: device config space (`CONFIG`),
/// several queues (`MQ`), acknowledged requests (`REPLY_ACK`) and memory hot-plug
/// (`CONFIGURE_MEM_SLOTS`).
pub const PROTOCOL_FEATURES: VhostUserProtocolFeatures = VhostUserProtocolFeatures::CONFIG
    .union(VhostUserProtocolFeatures::MQ)
    .union(VhostUserProtocolFeatures::REPLY_ACK)
    .union(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS);

/// A fresh exit event for one worker thread (non-blocking, close-on-exec), for
/// `VhostUserBackend::exit_event`. On failure it logs why and returns `None`: the thread then
/// simply has no exit event.
pub fn exit_event() -> Option<(EventConsumer, EventNotifier)> {
    match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
        Ok(pair) => Some(pair),
        Err(e) => {
            warn!("cannot create exit event: {e}");
            None
        }
    }
}

/// The error a device with a read-only config space answers a driver's write of `len` bytes
/// at `offset` with, from `VhostUserBackend::set_config`.
pub fn config_write_refused(offset: u32, len: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!("config space is read-only (write of {len} bytes at {offset})"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_features_are_the_four_offered() {
        let f = PROTOCOL_FEATURES;
        assert!(f.contains(VhostUserProtocolFeatures::CONFIG));
        assert!(f.contains(VhostUserProtocolFeatures::MQ));
        assert!(f.contains(VhostUserProtocolFeatures::REPLY_ACK));
        assert!(f.contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS));
        assert_eq!(f.bits().count_ones(), 4);
    }

    #[test]
    fn exit_event_notifies_its_consumer() {
        let (consumer, notifier) = exit_event().unwrap();
        notifier.notify().unwrap();
        consumer.consume().unwrap();
        // Non-blocking: a second read finds nothing instead of hanging.
        assert_eq!(
            consumer.consume().unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
    }

    #[test]
    fn refused_config_write_says_where() {
        let e = config_write_refused(8, 4);
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        assert_eq!(
            e.to_string(),
            "config space is read-only (write of 4 bytes at 8)"
        );
    }
}
