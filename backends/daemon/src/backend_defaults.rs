//! Answers that every hype vhost-user backend gives the same way, for its
//! [`VhostUserBackend`](vhost_user_backend::VhostUserBackend) implementation.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

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

thread_local! {
    /// The consumer fds [`exit_event`] handed out on this thread since the last
    /// [`ExitConsumers::collect`].
    static HANDED_OUT: RefCell<Vec<(RawFd, FileId)>> = const { RefCell::new(Vec::new()) };
}

/// A fresh exit event for one worker thread (non-blocking, close-on-exec), for
/// `VhostUserBackend::exit_event`. On failure it logs why and returns `None`: the thread then
/// simply has no exit event.
///
/// vhost-user-backend 0.24 turns the consumer into a raw fd for its epoll set and never
/// closes it (one eventfd per worker thread per connection); the fd is recorded here so that
/// [`crate::serve_with`] closes it once the connection's worker threads are gone
/// ([`ExitConsumers`]).
pub fn exit_event() -> Option<(EventConsumer, EventNotifier)> {
    match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
        Ok(pair) => {
            let fd = pair.0.as_raw_fd();
            if let Some(id) = file_id(fd) {
                HANDED_OUT.with(|v| v.borrow_mut().push((fd, id)));
            }
            Some(pair)
        }
        Err(e) => {
            warn!("cannot create exit event: {e}");
            None
        }
    }
}

/// The exit-event consumers handed out while one daemon was created, closed when this is
/// dropped: after the daemon (and with it its worker threads, which poll them) is gone.
#[derive(Debug)]
pub(crate) struct ExitConsumers(Vec<(RawFd, FileId)>);

impl ExitConsumers {
    /// Forgets what this thread handed out so far (call right before creating a daemon).
    pub(crate) fn reset() {
        HANDED_OUT.with(|v| v.borrow_mut().clear());
    }

    /// Takes what this thread handed out since [`ExitConsumers::reset`] (call right after
    /// creating the daemon: its worker threads' handlers ask for their exit events then).
    pub(crate) fn collect() -> Self {
        ExitConsumers(HANDED_OUT.with(|v| std::mem::take(&mut *v.borrow_mut())))
    }
}

/// Device and inode of an open file (an eventfd's: the kernel's anonymous inode).
type FileId = (u64, u64);

/// The [`FileId`] of `fd`, `None` if it is not open. (fstat, not /proc: the backends'
/// sandbox allows the one and not readlink.)
fn file_id(fd: RawFd) -> Option<FileId> {
    // SAFETY: all zeroes is a valid `stat`; fstat writes into it and reads nothing else.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is valid for writes; a closed `fd` only makes fstat fail.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return None;
    }
    Some((st.st_dev, st.st_ino))
}

impl Drop for ExitConsumers {
    fn drop(&mut self) {
        for (fd, id) in self.0.drain(..) {
            // Only what is still the same kind of file (an anonymous inode): a library that
            // closes its consumers itself would leave numbers that may be reused by now.
            if file_id(fd) == Some(id) {
                // SAFETY: `fd` is the consumer the library took as a raw fd and never
                // closes; the worker thread that polled it has been joined.
                unsafe { libc::close(fd) };
            }
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
    fn handed_out_consumers_are_closed_once_collected_and_dropped() {
        ExitConsumers::reset();
        let (consumer, notifier) = exit_event().unwrap();
        // What the library does with it: keeps only the raw number.
        let fd = std::os::fd::IntoRawFd::into_raw_fd(consumer);
        assert!(file_id(fd).is_some());
        let collected = ExitConsumers::collect();
        assert_eq!(collected.0.len(), 1);
        assert_eq!(collected.0[0].0, fd);
        assert!(ExitConsumers::collect().0.is_empty());
        drop(collected);
        assert!(file_id(fd).is_none(), "fd {fd} still open");
        drop(notifier);
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
