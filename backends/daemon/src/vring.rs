//! Draining a virtqueue: the loop every backend runs when a ring is kicked.
//!
//! The loop is easy to get subtly wrong, so it lives here once:
//!
//! 1. **Suppress kicks** while draining. With `VIRTIO_RING_F_EVENT_IDX` this is implicit (the
//!    device simply does not move `avail_event` forward); without it the device may set
//!    `VRING_USED_F_NO_NOTIFY` ([`Drain::suppress_without_event_idx`]).
//! 2. **Pop every available chain** and hand it to the caller's handler, which answers with a
//!    [`Handled`]: return it to the guest with a used length, leave it to someone else (a thread
//!    pool that completes it later), or keep it in the ring for later and stop.
//! 3. **Signal once per round** (and, if asked, every N used chains within a round), and only
//!    when `needs_notification` says the driver wants an interrupt ([`signal_used`]).
//! 4. **Re-arm and re-check**: `enable_notification` publishes `avail_event` (or clears
//!    `NO_NOTIFY`) and reports whether the guest added buffers meanwhile. If it did, those
//!    buffers will get no kick, so the loop goes round again. Without this step kicks are lost.
//! 5. **Give up on a broken ring** instead of spinning: an avail index more than a ring ahead,
//!    one that cannot be read, or one that promises chains two rounds in a row that never pop.
//! 6. **Optionally poll** ([`Drain::poll`], [`AdaptivePoll`]): after a round that did work, and
//!    with kicks still suppressed, watch the avail index for a short, adaptive time before
//!    re-arming. A busy guest then adds its next requests without kicking and the worker does
//!    not go to sleep between them; a quiet guest costs at most one polling window per burst.
//!    A thread that serves several rings polls one until another has chains
//!    ([`Drain::yield_to`]): the drain then returns [`Drained::Yielded`] with kicks still off,
//!    and the thread owes that ring another drain before it may sleep.
//!
//! Every problem the guest causes is logged through the rate-limited [`guest_error`].

use std::ops::Deref;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use vhost_user_backend::VringState;
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemory};

use crate::guest_error::guest_error;

/// Rounds in a row in which the guest's avail index promises chains that never pop, before
/// [`Drain::run`] gives up on the ring.
const MAX_IDLE_ROUNDS: u32 = 2;

/// What a [`Drain::run`] handler did with a descriptor chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// Done: put the chain in the used ring, saying this many bytes were written into it.
    Used(u32),
    /// Done, like [`Used`](Handled::Used), and signal the guest now (as far as it wants
    /// interrupts) rather than at the end of the round: for a chain that took long (a large
    /// transfer), so the guest can reuse it while the rest of the round runs.
    UsedNow(u32),
    /// The handler took the chain and it is not returned here: another thread completes it
    /// later (and calls `add_used` and [`signal_used`] itself), or it cannot be returned at
    /// all (a head index outside the ring).
    Elsewhere,
    /// The handler cannot take the chain now: it goes back to the available ring, untouched,
    /// and draining stops (notifications re-armed) until the next call.
    Keep,
}

/// How a [`Drain::run`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Every available chain was taken; kicks are re-armed (when they were suppressed).
    Empty,
    /// The handler answered [`Handled::Keep`]; that chain is still available in the ring.
    Kept,
    /// The ring is not set up or was stopped: nothing was popped.
    NotRunning,
    /// Polling found work on another ring ([`Drain::yield_to`]) and stopped: kicks are still
    /// suppressed, so the caller must drain this ring again (no kick will say so).
    Yielded,
    /// The guest broke the ring (garbage or unreadable avail index, unwritable used ring):
    /// draining stopped; it is tried again on the next kick.
    Stuck,
}

/// Adaptive polling of one virtqueue's avail ring, kept across [`Drain::run`] calls.
///
/// After a round that did work, the drain watches the avail index for up to the current
/// window before re-arming kicks (yielding the CPU between looks, so a client on the same core
/// still runs). A window that finds work grows (doubling, up to the maximum); one that finds
/// nothing shrinks (halving, down to an eighth of the maximum), so a guest that pauses between
/// bursts soon costs little, and an idle guest costs nothing: polling only follows work.
#[derive(Debug)]
pub struct AdaptivePoll {
    max_ns: u32,
    window_ns: AtomicU32,
}

impl AdaptivePoll {
    /// Polling for at most `max` after each busy round; `Duration::ZERO` turns polling off.
    /// Windows are capped at 1 s.
    pub fn new(max: Duration) -> Self {
        const CAP_NS: u32 = 1_000_000_000;
        let max_ns = u32::try_from(max.as_nanos()).map_or(CAP_NS, |n| n.min(CAP_NS));
        AdaptivePoll {
            max_ns,
            window_ns: AtomicU32::new(max_ns),
        }
    }

    /// Whether polling is on.
    pub fn enabled(&self) -> bool {
        self.max_ns > 0
    }

    /// The current window.
    pub fn window(&self) -> Duration {
        Duration::from_nanos(u64::from(self.window_ns.load(Ordering::Relaxed)))
    }

    /// Looks at `ready` until it says true (returns true) or the window passes (false),
    /// adapting the window to the outcome.
    pub fn wait_for(&self, mut ready: impl FnMut() -> bool) -> bool {
        if self.max_ns == 0 {
            return false;
        }
        let window = self.window_ns.load(Ordering::Relaxed);
        let start = Instant::now();
        let limit = Duration::from_nanos(u64::from(window));
        loop {
            if ready() {
                let grown = window.saturating_mul(2).min(self.max_ns);
                self.window_ns.store(grown, Ordering::Relaxed);
                return true;
            }
            if start.elapsed() >= limit {
                let shrunk = (window / 2).max(self.max_ns / 8).max(1);
                self.window_ns.store(shrunk, Ordering::Relaxed);
                return false;
            }
            std::thread::yield_now();
        }
    }
}

/// How to drain one virtqueue: built once per call from what the guest negotiated, then
/// [`run`](Drain::run).
///
/// ```
/// use hype_daemon::vring::{Drain, Drained, Handled};
/// use vhost_user_backend::VringState;
/// use vm_memory::{GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap};
///
/// /// Consumes every chain the guest offers on a transmit queue.
/// fn drain_tx(
///     st: &mut VringState<GuestMemoryAtomic<GuestMemoryMmap>>,
///     mem: &GuestMemoryLoadGuard<GuestMemoryMmap>,
///     event_idx: bool,
/// ) -> Drained {
///     Drain::new("tx", event_idx).signal_every(64).run(st, mem, |chain| {
///         // ... read the chain's buffers ...
///         Handled::Used(0)
///     })
/// }
/// ```
#[derive(Clone, Copy)]
pub struct Drain<'p> {
    label: &'static str,
    event_idx: bool,
    no_notify_flag: bool,
    signal_batch: usize,
    poll: Option<&'p AdaptivePoll>,
    poll_stop: Option<&'p dyn Fn() -> bool>,
    yield_to: Option<&'p dyn Fn() -> bool>,
}

impl std::fmt::Debug for Drain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Drain")
            .field("label", &self.label)
            .field("event_idx", &self.event_idx)
            .field("no_notify_flag", &self.no_notify_flag)
            .field("signal_batch", &self.signal_batch)
            .field("poll", &self.poll)
            .field("poll_stop", &self.poll_stop.is_some())
            .field("yield_to", &self.yield_to.is_some())
            .finish()
    }
}

impl<'p> Drain<'p> {
    /// A drain of the queue called `label` in log lines ("tx", "rx", "ctrl", ...), with
    /// `event_idx` telling whether the guest negotiated `VIRTIO_RING_F_EVENT_IDX`.
    ///
    /// By default the guest is signalled once per round, and without EVENT_IDX the ring is
    /// drained in a single pass with kicks left on.
    pub fn new(label: &'static str, event_idx: bool) -> Self {
        Drain {
            label,
            event_idx,
            no_notify_flag: false,
            signal_batch: usize::MAX,
            poll: None,
            poll_stop: None,
            yield_to: None,
        }
    }

    /// After each round that did work, polls the avail ring as `poll` says before re-arming
    /// kicks (only when kicks are suppressed: with EVENT_IDX, or with
    /// [`suppress_without_event_idx`](Self::suppress_without_event_idx)). The vring's lock is
    /// held while polling: do not use it where other threads complete chains of this ring.
    pub fn poll(mut self, poll: &'p AdaptivePoll) -> Self {
        self.poll = Some(poll).filter(|p| p.enabled());
        self
    }

    /// Like [`poll`](Self::poll), but polling also ends (and the drain returns, releasing the
    /// vring's lock) as soon as `stop` says true: e.g. while other threads have chains of this
    /// ring to complete.
    pub fn poll_until(mut self, poll: &'p AdaptivePoll, stop: &'p dyn Fn() -> bool) -> Self {
        self.poll = Some(poll).filter(|p| p.enabled());
        self.poll_stop = Some(stop);
        self
    }

    /// While polling, also watches `other` (work waiting on another ring the same thread
    /// serves): when it says true the drain returns [`Drained::Yielded`] at once, leaving
    /// kicks suppressed, and the caller must run this drain again before it sleeps (it will
    /// get no kick for what the guest adds meanwhile). Without polling it has no effect.
    pub fn yield_to(mut self, other: &'p dyn Fn() -> bool) -> Self {
        self.yield_to = Some(other);
        self
    }

    /// Also signals the guest within a round, after every `n` used chains, so a guest that
    /// keeps the ring full still sees completions promptly. `0` is taken as 1.
    pub fn signal_every(mut self, n: usize) -> Self {
        self.signal_batch = n.max(1);
        self
    }

    /// Without EVENT_IDX, suppresses kicks while draining by setting `VRING_USED_F_NO_NOTIFY`
    /// (clearing it and re-checking the ring at the end), as with EVENT_IDX. Saves the guest a
    /// kick per buffer it adds while the ring is being drained.
    pub fn suppress_without_event_idx(mut self) -> Self {
        self.no_notify_flag = true;
        self
    }

    /// Drains the ring held in `st`: pops each available chain (reading guest memory through
    /// `mem`), hands it to `handle`, returns it to the guest as `handle` says, and signals the
    /// guest as the negotiated features allow.
    ///
    /// Hold the vring's state lock (`vring.get_mut()`) for the whole call and never call the
    /// vring's own `add_used`/`signal_used_queue` from `handle`: they take that lock again.
    pub fn run<A, T, F>(&self, st: &mut VringState<A>, mem: &T, mut handle: F) -> Drained
    where
        A: GuestAddressSpace,
        T: Clone + Deref,
        T::Target: GuestMemory,
        F: FnMut(DescriptorChain<T>) -> Handled,
    {
        if !st.get_queue().ready() {
            return Drained::NotRunning;
        }
        let suppress = self.event_idx || self.no_notify_flag;
        let mut idle_rounds = 0;
        loop {
            // Checked before kicks are suppressed, so a stuck ring keeps them on: the guest
            // can repair its avail index and kick again.
            if !self.avail_index_sane(st, &**mem) {
                if suppress {
                    // After a polling round kicks are still off: turn them back on, so the
                    // guest's kick after it repairs the index reaches us.
                    let _ = st.enable_notification();
                }
                return Drained::Stuck;
            }
            if suppress {
                if let Err(e) = st.disable_notification() {
                    guest_error(format_args!("{}: disable_notification: {e}", self.label));
                }
            }
            let mut popped = 0usize;
            let mut used = 0usize;
            let mut kept = false;
            while let Some(chain) = st.get_queue_mut().pop_descriptor_chain(mem.clone()) {
                let head = chain.head_index();
                let handled = handle(chain);
                match handled {
                    Handled::Used(len) | Handled::UsedNow(len) => {
                        if let Err(e) = st.add_used(head, len) {
                            guest_error(format_args!(
                                "{}: cannot return chain {head}: {e}",
                                self.label
                            ));
                        }
                        used += 1;
                        let now = matches!(handled, Handled::UsedNow(_));
                        if now || used >= self.signal_batch {
                            signal_used(st, self.event_idx);
                            used = 0;
                        }
                    }
                    Handled::Elsewhere => {}
                    Handled::Keep => {
                        st.get_queue_mut().go_to_previous_position();
                        kept = true;
                        break;
                    }
                }
                popped += 1;
            }
            // Signal after every round, so a guest that keeps the ring busy gets its
            // completions while we keep going.
            if used > 0 {
                signal_used(st, self.event_idx);
            }
            let done = if kept { Drained::Kept } else { Drained::Empty };
            if !suppress {
                // Kicks were never off: anything the guest adds from now on is kicked.
                return done;
            }
            // A busy ring: watch for the guest's next chains, kicks still off.
            if let Some(poll) = self.poll.filter(|_| popped > 0 && !kept) {
                let stop = self.poll_stop.unwrap_or(&|| false);
                let other = self.yield_to.unwrap_or(&|| false);
                let (mut stopped, mut yielded) = (false, false);
                let found = poll.wait_for(|| {
                    if Self::has_avail(st, &**mem) {
                        return true;
                    }
                    yielded = other();
                    stopped = !yielded && stop();
                    yielded || stopped
                });
                if yielded {
                    return Drained::Yielded;
                }
                if found && !stopped {
                    idle_rounds = 0;
                    continue;
                }
            }
            // Re-arm kicks, then look again: buffers added before the re-arm get no kick.
            match st.enable_notification() {
                Ok(true) if !kept => {
                    idle_rounds = if popped == 0 { idle_rounds + 1 } else { 0 };
                    if idle_rounds >= MAX_IDLE_ROUNDS {
                        guest_error(format_args!(
                            "{}: avail index promises chains that cannot be read",
                            self.label
                        ));
                        return Drained::Stuck;
                    }
                }
                Ok(_) => return done,
                Err(e) => {
                    guest_error(format_args!("{}: enable_notification: {e}", self.label));
                    return Drained::Stuck;
                }
            }
        }
    }

    /// Whether the guest's avail index has moved past the chains popped so far (an unreadable
    /// index counts as moved, so the next round reports it).
    fn has_avail<A, M>(st: &VringState<A>, mem: &M) -> bool
    where
        A: GuestAddressSpace,
        M: GuestMemory + ?Sized,
    {
        let q = st.get_queue();
        q.avail_idx(mem, Ordering::Acquire)
            .map_or(true, |idx| idx.0 != q.next_avail())
    }

    /// Whether the guest's avail index can be read and is at most a ring's worth ahead of us.
    /// A guest that publishes garbage there gets one rate-limited log line per kick instead of
    /// a library error per pop, and the ring stalls until the guest repairs it.
    fn avail_index_sane<A, M>(&self, st: &VringState<A>, mem: &M) -> bool
    where
        A: GuestAddressSpace,
        M: GuestMemory + ?Sized,
    {
        let q = st.get_queue();
        let size = q.size();
        match q.avail_idx(mem, Ordering::Acquire) {
            Ok(idx) => {
                let pending = idx.0.wrapping_sub(q.next_avail());
                if pending > size {
                    guest_error(format_args!(
                        "{}: avail index {} is {pending} entries ahead of a {size}-entry ring",
                        self.label, idx.0
                    ));
                    return false;
                }
                true
            }
            Err(e) => {
                guest_error(format_args!("{}: cannot read avail index: {e}", self.label));
                false
            }
        }
    }
}

/// Whether the ring in `st` is enabled and running and the guest has made chains available
/// that were not popped yet (an unreadable avail index counts as none: the ring's own drain
/// reports it). For a thread serving several rings, to see whether another one needs it.
pub fn has_requests<A, M>(st: &VringState<A>, mem: &M) -> bool
where
    A: GuestAddressSpace,
    M: GuestMemory + ?Sized,
{
    let q = st.get_queue();
    st.is_enabled()
        && q.ready()
        && q.avail_idx(mem, Ordering::Acquire)
            .is_ok_and(|idx| idx.0 != q.next_avail())
}

/// Signals the guest that used buffers are ready, if it wants to know: always without
/// EVENT_IDX, otherwise when the used index has passed the driver's `used_event` since the
/// last signal. When that cannot be read the guest is signalled anyway (a spurious interrupt
/// is harmless, a missing one hangs the driver).
///
/// The call fd is the frontend's: one that is not a non-blocking eventfd (a pipe or socket
/// nobody reads) would block this thread in write() for good, and with it the teardown of the
/// connection and every later frontend. It is made non-blocking first, so such a signal fails
/// (logged, rate-limited) instead.
pub fn signal_used<A: GuestAddressSpace>(st: &mut VringState<A>, event_idx: bool) {
    let needed = !event_idx || st.needs_notification().unwrap_or(true);
    if needed {
        if let Some(call) = st.get_call() {
            ensure_nonblocking(call.as_raw_fd());
        }
        if let Err(e) = st.signal_used_queue() {
            guest_error(format_args!("cannot signal used queue: {e}"));
        }
    }
}

/// Sets O_NONBLOCK on `fd` unless it is set (one fcntl when it is, as for every eventfd a
/// well-behaved frontend passes).
fn ensure_nonblocking(fd: RawFd) {
    // SAFETY: F_GETFL reads the flags of `fd`; a bad fd only makes it fail.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags >= 0 && flags & libc::O_NONBLOCK == 0 {
        // SAFETY: F_SETFL with the flags just read plus O_NONBLOCK; no memory is involved.
        unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) };
    }
}
#[cfg(test)]
mod tests;
