//! Tests of [`Drain`] against a split virtqueue laid out by hand in guest memory, playing the
//! driver's part (descriptors, avail ring, `used_event`) and reading what the device wrote.

use std::cell::Cell;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use vhost_user_backend::{VringRwLock, VringT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;
/// A chain as the drain hands it over.
type Chain = DescriptorChain<vm_memory::GuestMemoryLoadGuard<GuestMemoryMmap>>;

const SIZE: u16 = 16;
const DESC_TABLE: u64 = 0x0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;
const BUFFERS: u64 = 0x1_0000;
const MEM_SIZE: usize = 0x2_0000;
const VRING_USED_F_NO_NOTIFY: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;

/// The driver side of one queue, plus the device's vring over the same memory.
struct Ring {
    mem: Mem,
    vring: VringRwLock<Mem>,
    call: EventFd,
    avail_ring: u64,
    avail_idx: u16,
}

impl Ring {
    fn new(event_idx: bool) -> Self {
        Self::with_avail_ring(event_idx, AVAIL_RING)
    }

    fn with_avail_ring(event_idx: bool, avail_ring: u64) -> Self {
        let mmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let mem = GuestMemoryAtomic::new(mmap);
        let vring = VringRwLock::new(mem.clone(), SIZE).unwrap();
        vring.set_queue_size(SIZE);
        vring
            .set_queue_info(DESC_TABLE, avail_ring, USED_RING)
            .unwrap();
        vring.set_queue_event_idx(event_idx);
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        let call = EventFd::new(EFD_NONBLOCK).unwrap();
        // SAFETY: dup() returns a new descriptor that nothing else owns (checked below).
        let dup = unsafe { libc::dup(call.as_raw_fd()) };
        assert!(dup >= 0);
        // SAFETY: `dup` is a fresh, valid descriptor owned only by this OwnedFd.
        let owned = unsafe { OwnedFd::from_raw_fd(dup) };
        vring.set_call(Some(File::from(owned)));
        Ring {
            mem,
            vring,
            call,
            avail_ring,
            avail_idx: 0,
        }
    }

    /// Offers a one-descriptor chain with head `head` (a device-writable 512-byte buffer).
    fn offer(&mut self, head: u16) {
        offer(&self.mem, self.avail_ring, &mut self.avail_idx, head);
    }

    /// Offers a chain for each head in `heads`, in order.
    fn offer_all(&mut self, heads: impl IntoIterator<Item = u16>) {
        for head in heads {
            self.offer(head);
        }
    }

    fn set_avail_idx(&mut self, idx: u16) {
        self.avail_idx = idx;
        self.write_u16(self.avail_ring + 2, idx);
    }

    /// The driver's `used_event` (the used index it wants an interrupt after).
    fn set_used_event(&self, v: u16) {
        self.write_u16(self.avail_ring + 4 + 2 * u64::from(SIZE), v);
    }

    fn used_flags(&self) -> u16 {
        read_u16(&self.mem, USED_RING)
    }

    fn used_idx(&self) -> u16 {
        read_u16(&self.mem, USED_RING + 2)
    }

    /// The device's `avail_event` (the avail index it wants a kick at).
    fn avail_event(&self) -> u16 {
        read_u16(&self.mem, USED_RING + 4 + 8 * u64::from(SIZE))
    }

    /// Used ring entries 0..used_idx as (head, length).
    fn used(&self) -> Vec<(u32, u32)> {
        let m = self.mem.memory();
        (0..u64::from(self.used_idx()))
            .map(|i| {
                let at = GuestAddress(USED_RING + 4 + 8 * i);
                let id: u32 = m.read_obj(at).unwrap();
                let len: u32 = m.read_obj(at.unchecked_add(4)).unwrap();
                (id, len)
            })
            .collect()
    }

    /// Interrupts sent since the last call.
    fn signals(&self) -> u64 {
        self.call.read().unwrap_or(0)
    }

    fn next_avail(&self) -> u16 {
        self.vring.get_ref().get_queue().next_avail()
    }

    fn write_u16(&self, addr: u64, v: u16) {
        self.mem.memory().write_obj(v, GuestAddress(addr)).unwrap();
    }

    /// Runs `drain` over the ring with `handle`.
    fn drain<F>(&self, drain: Drain, handle: F) -> Drained
    where
        F: FnMut(Chain) -> Handled,
    {
        let mem = self.mem.memory();
        let mut st = self.vring.get_mut();
        drain.run(&mut st, &mem, handle)
    }
}

fn read_u16(mem: &Mem, addr: u64) -> u16 {
    mem.memory().read_obj(GuestAddress(addr)).unwrap()
}

/// Writes descriptor `head` and publishes it in the avail ring at `avail_ring`.
fn offer(mem: &Mem, avail_ring: u64, avail_idx: &mut u16, head: u16) {
    let m = mem.memory();
    let desc = GuestAddress(DESC_TABLE + 16 * u64::from(head));
    m.write_obj(BUFFERS + 512 * u64::from(head), desc).unwrap();
    m.write_obj(512u32, desc.unchecked_add(8)).unwrap();
    m.write_obj(VRING_DESC_F_WRITE, desc.unchecked_add(12))
        .unwrap();
    m.write_obj(0u16, desc.unchecked_add(14)).unwrap();
    let slot = u64::from(*avail_idx % SIZE);
    m.write_obj(head, GuestAddress(avail_ring + 4 + 2 * slot))
        .unwrap();
    *avail_idx = avail_idx.wrapping_add(1);
    m.write_obj(*avail_idx, GuestAddress(avail_ring + 2))
        .unwrap();
}

#[test]
fn returns_every_chain_with_its_length_and_signals_once_per_round() {
    let mut ring = Ring::new(false);
    ring.offer_all([3, 0, 7]);
    let mut seen = Vec::new();
    let end = ring.drain(Drain::new("test", false), |chain| {
        seen.push(chain.head_index());
        Handled::Used(u32::from(chain.head_index()) * 10)
    });
    assert_eq!(end, Drained::Empty);
    assert_eq!(seen, [3, 0, 7]);
    assert_eq!(ring.used(), [(3, 30), (0, 0), (7, 70)]);
    assert_eq!(ring.signals(), 1);
    assert_eq!(ring.next_avail(), 3);
}

#[test]
fn an_empty_ring_is_not_signalled() {
    let ring = Ring::new(true);
    let end = ring.drain(Drain::new("test", true), |_| Handled::Used(0));
    assert_eq!(end, Drained::Empty);
    assert_eq!(ring.signals(), 0);
    assert_eq!(ring.used_idx(), 0);
}

#[test]
fn signal_every_also_signals_within_a_round() {
    let mut ring = Ring::new(false);
    ring.offer_all(0..5);
    let end = ring.drain(Drain::new("test", false).signal_every(2), |_| {
        Handled::Used(1)
    });
    assert_eq!(end, Drained::Empty);
    // After chains 2 and 4, then the last one at the end of the round.
    assert_eq!(ring.signals(), 3);
    assert_eq!(ring.used_idx(), 5);
}

#[test]
fn without_event_idx_kicks_stay_on_unless_asked() {
    let mut ring = Ring::new(false);
    ring.offer(0);
    // Records the used ring's flags as the handler sees them.
    let flags_seen = Cell::new(None);
    let mem = ring.mem.clone();
    let watch_flags = |_: Chain| {
        flags_seen.set(Some(read_u16(&mem, USED_RING)));
        Handled::Used(0)
    };
    ring.drain(Drain::new("test", false), &watch_flags);
    assert_eq!(flags_seen.get(), Some(0));
    assert_eq!(ring.used_flags(), 0);

    ring.offer(1);
    let drain = Drain::new("test", false).suppress_without_event_idx();
    let end = ring.drain(drain, &watch_flags);
    assert_eq!(end, Drained::Empty);
    // NO_NOTIFY while draining, cleared again at the end.
    assert_eq!(flags_seen.get(), Some(VRING_USED_F_NO_NOTIFY));
    assert_eq!(ring.used_flags(), 0);
    assert_eq!(ring.used_idx(), 2);
}

#[test]
fn event_idx_rearms_kicks_at_the_next_chain() {
    let mut ring = Ring::new(true);
    ring.offer_all(0..3);
    let avail_event_seen = Cell::new(None);
    let end = ring.drain(Drain::new("test", true), |_| {
        avail_event_seen.set(Some(ring.avail_event()));
        Handled::Used(0)
    });
    assert_eq!(end, Drained::Empty);
    // No kicks wanted while draining; the next one wanted for chain 3.
    assert_eq!(avail_event_seen.get(), Some(0));
    assert_eq!(ring.avail_event(), 3);
    assert_eq!(ring.used_flags(), 0);
}

#[test]
fn event_idx_signals_only_when_the_used_index_passes_used_event() {
    let mut ring = Ring::new(true);
    ring.set_used_event(10);
    ring.offer_all(0..3);
    ring.drain(Drain::new("test", true), |_| Handled::Used(0));
    assert_eq!(ring.used_idx(), 3);
    assert_eq!(
        ring.signals(),
        0,
        "the driver asked for an interrupt after entry 10"
    );

    // The driver now wants an interrupt once entry 3 is used.
    ring.set_used_event(3);
    ring.offer_all(3..5);
    ring.drain(Drain::new("test", true), |_| Handled::Used(0));
    assert_eq!(ring.used_idx(), 5);
    assert_eq!(ring.signals(), 1);
}

#[test]
fn chains_offered_while_draining_are_taken_in_the_same_call() {
    let mut ring = Ring::new(true);
    ring.offer(0);
    let mut avail_idx = ring.avail_idx;
    let mut calls = 0;
    let end = ring.drain(Drain::new("test", true), |_| {
        calls += 1;
        if calls <= 2 {
            // The guest adds a buffer while the device works: it sends no kick for it.
            offer(&ring.mem, AVAIL_RING, &mut avail_idx, calls);
        }
        Handled::Used(0)
    });
    assert_eq!(end, Drained::Empty);
    assert_eq!(calls, 3);
    assert_eq!(ring.used_idx(), 3);
    assert_eq!(ring.avail_event(), 3);
}

#[test]
fn keep_leaves_the_chain_in_the_ring_and_stops() {
    let mut ring = Ring::new(true);
    ring.offer_all(0..4);
    let end = ring.drain(Drain::new("test", true), |chain| {
        if chain.head_index() == 2 {
            Handled::Keep
        } else {
            Handled::Used(0)
        }
    });
    assert_eq!(end, Drained::Kept);
    assert_eq!(ring.used(), [(0, 0), (1, 0)]);
    assert_eq!(ring.next_avail(), 2);
    assert_eq!(ring.avail_event(), 2, "kicks re-armed at the kept chain");
    assert_eq!(ring.signals(), 1, "what was used is signalled");

    // The next call starts with the kept chain.
    let mut seen = Vec::new();
    let end = ring.drain(Drain::new("test", true), |chain| {
        seen.push(chain.head_index());
        Handled::Used(5)
    });
    assert_eq!(end, Drained::Empty);
    assert_eq!(seen, [2, 3]);
    assert_eq!(ring.used(), [(0, 0), (1, 0), (2, 5), (3, 5)]);
}

#[test]
fn keep_without_event_idx_stops_too() {
    let mut ring = Ring::new(false);
    ring.offer_all(0..3);
    let mut calls = 0;
    let end = ring.drain(Drain::new("test", false), |_| {
        calls += 1;
        Handled::Keep
    });
    assert_eq!(end, Drained::Kept);
    assert_eq!(calls, 1);
    assert_eq!(ring.next_avail(), 0);
    assert_eq!(ring.used_idx(), 0);
    assert_eq!(ring.signals(), 0);
}

#[test]
fn chains_completed_elsewhere_are_neither_returned_nor_signalled() {
    let mut ring = Ring::new(true);
    ring.offer_all(0..3);
    let mut taken = Vec::new();
    let end = ring.drain(Drain::new("test", true), |chain| {
        taken.push(chain.head_index());
        Handled::Elsewhere
    });
    assert_eq!(end, Drained::Empty);
    assert_eq!(taken, [0, 1, 2]);
    assert_eq!(ring.used_idx(), 0);
    assert_eq!(ring.signals(), 0);
    assert_eq!(ring.next_avail(), 3);
    assert_eq!(ring.avail_event(), 3);

    // Whoever completes them returns and signals them through the same state.
    let mut st = ring.vring.get_mut();
    for head in taken {
        st.add_used(head, 1).unwrap();
    }
    signal_used(&mut st, true);
    drop(st);
    assert_eq!(ring.used_idx(), 3);
    assert_eq!(ring.signals(), 1);
}

#[test]
fn a_ring_that_is_not_ready_is_left_alone() {
    let mut ring = Ring::new(true);
    ring.offer(0);
    ring.vring.set_queue_ready(false);
    let end = ring.drain(Drain::new("test", true), |_| {
        panic!("no chain may be popped from a stopped ring")
    });
    assert_eq!(end, Drained::NotRunning);
    assert_eq!(ring.next_avail(), 0);
}

#[test]
fn an_avail_index_more_than_a_ring_ahead_stops_draining() {
    let mut ring = Ring::new(true);
    ring.offer(0);
    ring.set_avail_idx(SIZE + 5);
    let end = ring.drain(Drain::new("test", true), |_| {
        panic!("no chain may be popped past a garbage avail index")
    });
    assert_eq!(end, Drained::Stuck);
    assert_eq!(ring.next_avail(), 0);
    assert_eq!(ring.used_idx(), 0);

    // Once the guest repairs it, the ring works again.
    ring.set_avail_idx(1);
    let end = ring.drain(Drain::new("test", true), |_| Handled::Used(0));
    assert_eq!(end, Drained::Empty);
    assert_eq!(ring.used_idx(), 1);
}

#[test]
fn a_stuck_ring_leaves_kicks_on() {
    let mut ring = Ring::new(false);
    ring.offer(0);
    ring.set_avail_idx(SIZE + 1);
    let drain = Drain::new("test", false).suppress_without_event_idx();
    assert_eq!(ring.drain(drain, |_| Handled::Used(0)), Drained::Stuck);
    assert_eq!(
        ring.used_flags(),
        0,
        "NO_NOTIFY must not stay set on a stuck ring"
    );
}

#[test]
fn unreadable_avail_entries_give_up_instead_of_spinning() {
    // The avail ring's index is the last thing in guest memory: its entries are not.
    let avail_ring = MEM_SIZE as u64 - 4;
    let mut ring = Ring::with_avail_ring(true, avail_ring);
    ring.set_avail_idx(1);
    let end = ring.drain(Drain::new("test", true), |_| panic!("no chain can be read"));
    assert_eq!(end, Drained::Stuck);
    assert_eq!(ring.next_avail(), 0);
}

#[test]
fn polling_takes_chains_the_guest_adds_soon_after_without_rearming_kicks() {
    let mut ring = Ring::new(true);
    ring.offer(0);
    let poll = AdaptivePoll::new(std::time::Duration::from_secs(1));
    let mem = ring.mem.clone();
    let mut avail_idx = ring.avail_idx;
    let avail_events = std::sync::Mutex::new(Vec::new());
    let (first_done, wait_first) = std::sync::mpsc::channel();
    let end = std::thread::scope(|s| {
        let guest = s.spawn(move || {
            // The guest adds its next request a little after the device took the first.
            wait_first.recv().unwrap();
            std::thread::sleep(std::time::Duration::from_millis(5));
            offer(&mem, AVAIL_RING, &mut avail_idx, 1);
        });
        let end = ring.drain(Drain::new("test", true).poll(&poll), |_| {
            avail_events.lock().unwrap().push(ring.avail_event());
            let _ = first_done.send(());
            Handled::Used(0)
        });
        guest.join().unwrap();
        end
    });
    assert_eq!(end, Drained::Empty);
    assert_eq!(ring.used(), [(0, 0), (1, 0)], "both chains in one call");
    // Kicks stayed off while polling (avail_event untouched), then re-armed after chain 1.
    assert_eq!(*avail_events.lock().unwrap(), [0, 0]);
    assert_eq!(ring.avail_event(), 2);
    // The hit kept the window at its maximum; the miss after chain 1 halved it.
    assert_eq!(poll.window(), std::time::Duration::from_millis(500));
}

#[test]
fn polling_gives_up_after_its_window_and_shrinks_it() {
    let mut ring = Ring::new(true);
    ring.offer(0);
    let poll = AdaptivePoll::new(std::time::Duration::from_millis(8));
    let t = std::time::Instant::now();
    let end = ring.drain(Drain::new("test", true).poll(&poll), |_| Handled::Used(0));
    assert_eq!(end, Drained::Empty);
    assert!(
        t.elapsed() >= std::time::Duration::from_millis(8),
        "polled its window"
    );
    assert_eq!(poll.window(), std::time::Duration::from_millis(4));
    // Misses halve the window down to an eighth of the maximum, never below.
    for _ in 0..5 {
        assert!(!poll.wait_for(|| false));
    }
    assert_eq!(poll.window(), std::time::Duration::from_millis(1));
    // A hit doubles it again, up to the maximum.
    assert!(poll.wait_for(|| true));
    assert_eq!(poll.window(), std::time::Duration::from_millis(2));
    assert_eq!(ring.avail_event(), 1, "kicks re-armed after polling");
}

#[test]
fn no_polling_after_an_idle_round_or_when_told_to_stop_or_turned_off() {
    // An empty ring: nothing popped, so no polling at all (an idle guest costs nothing).
    let ring = Ring::new(true);
    let poll = AdaptivePoll::new(std::time::Duration::from_secs(5));
    let t = std::time::Instant::now();
    assert_eq!(
        ring.drain(Drain::new("test", true).poll(&poll), |_| Handled::Used(0)),
        Drained::Empty
    );
    assert!(t.elapsed() < std::time::Duration::from_secs(2));

    // A stop condition ends polling at once, so other threads can take the ring's lock.
    let mut ring = Ring::new(true);
    ring.offer(0);
    let stop = || true;
    let t = std::time::Instant::now();
    ring.drain(Drain::new("test", true).poll_until(&poll, &stop), |_| {
        Handled::Used(0)
    });
    assert!(t.elapsed() < std::time::Duration::from_secs(2));
    assert_eq!(ring.used(), [(0, 0)]);

    // Zero turns it off.
    let off = AdaptivePoll::new(std::time::Duration::ZERO);
    assert!(!off.enabled());
    assert!(!off.wait_for(|| true));
}

#[test]
fn polling_yields_to_another_ring_with_kicks_left_off_and_resumes_on_the_next_drain() {
    let mut ring = Ring::new(true);
    ring.offer(0);
    let poll = AdaptivePoll::new(std::time::Duration::from_secs(5));
    let other_busy = Cell::new(false);
    let other = || other_busy.get();
    let t = std::time::Instant::now();
    // Another ring of the thread gets work while this one is polled: the drain returns at
    // once, chain 0 done, kicks still suppressed (avail_event not moved past chain 0).
    let end = ring.drain(
        Drain::new("test", true).poll(&poll).yield_to(&other),
        |_| {
            other_busy.set(true);
            Handled::Used(0)
        },
    );
    assert_eq!(end, Drained::Yielded);
    assert!(
        t.elapsed() < std::time::Duration::from_secs(2),
        "did not poll on"
    );
    assert_eq!(ring.used(), [(0, 0)]);
    assert_eq!(ring.avail_event(), 0, "kicks stay off after a yield");
    // The guest adds a chain meanwhile (no kick); the owed drain takes it and, with nothing
    // to yield to and no polling, re-arms kicks.
    ring.offer(1);
    let end = ring.drain(Drain::new("test", true), |_| Handled::Used(0));
    assert_eq!(end, Drained::Empty);
    assert_eq!(ring.used(), [(0, 0), (1, 0)]);
    assert_eq!(ring.avail_event(), 2, "kicks re-armed");
    // Without polling, yield_to has no effect.
    ring.offer(2);
    let end = ring.drain(Drain::new("test", true).yield_to(&|| true), |_| {
        Handled::Used(0)
    });
    assert_eq!(end, Drained::Empty);
    assert_eq!(ring.avail_event(), 3);
}

#[test]
fn used_now_signals_before_the_rest_of_the_round() {
    for (now, signalled_during_second) in [(false, 0), (true, 1)] {
        let mut ring = Ring::new(false);
        ring.offer_all([0, 1]);
        let seen = Cell::new(None);
        let end = ring.drain(Drain::new("test", false), |c| {
            if c.head_index() == 0 {
                return if now {
                    Handled::UsedNow(7)
                } else {
                    Handled::Used(7)
                };
            }
            seen.set(Some(ring.signals()));
            Handled::Used(0)
        });
        assert_eq!(end, Drained::Empty);
        assert_eq!(ring.used(), [(0, 7), (1, 0)]);
        assert_eq!(seen.get(), Some(signalled_during_second), "UsedNow: {now}");
        assert_eq!(ring.signals(), 1, "and once at the end of the round");
    }
}

#[test]
fn has_requests_sees_unpopped_chains_of_a_running_ring_only() {
    let mut ring = Ring::new(true);
    let mem = ring.mem.memory();
    assert!(!has_requests(&ring.vring.get_ref(), &*mem));
    ring.offer(0);
    assert!(has_requests(&ring.vring.get_ref(), &*mem));
    ring.drain(Drain::new("test", true), |_| Handled::Used(0));
    assert!(!has_requests(&ring.vring.get_ref(), &*mem));
    ring.offer(1);
    ring.vring.set_enabled(false);
    assert!(!has_requests(&ring.vring.get_ref(), &*mem), "disabled");
    ring.vring.set_enabled(true);
    assert!(has_requests(&ring.vring.get_ref(), &*mem));
    ring.vring.set_queue_ready(false);
    assert!(!has_requests(&ring.vring.get_ref(), &*mem), "not running");
    // An avail ring outside guest memory reads as no work (its own drain reports it).
    let ring = Ring::with_avail_ring(true, MEM_SIZE as u64 + 0x1000);
    assert!(!has_requests(&ring.vring.get_ref(), &*ring.mem.memory()));
}

#[test]
fn a_full_blocking_pipe_as_call_fd_does_not_block_the_signal() {
    let mut ring = Ring::new(false);
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe() writes.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both are fresh descriptors owned only by these OwnedFds.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // Fill the pipe while it is non-blocking, then make it blocking again, as a hostile
    // frontend would hand it over.
    // SAFETY: fcntl on our own descriptor.
    let fl = unsafe { libc::fcntl(wr.as_raw_fd(), libc::F_GETFL) };
    // SAFETY: as above.
    unsafe { libc::fcntl(wr.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) };
    let chunk = [0u8; 4096];
    // SAFETY: writing from a valid buffer until the pipe is full (EAGAIN).
    while unsafe { libc::write(wr.as_raw_fd(), chunk.as_ptr().cast(), chunk.len()) } > 0 {}
    // SAFETY: as above.
    unsafe { libc::fcntl(wr.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK) };
    ring.vring.set_call(Some(File::from(wr)));
    ring.offer_all([1]);
    let (tx, rx) = std::sync::mpsc::channel();
    let vring = ring.vring.clone();
    let mem = ring.mem.clone();
    std::thread::spawn(move || {
        let m = mem.memory();
        let mut st = vring.get_mut();
        let end = Drain::new("test", false).run(&mut st, &m, |_| Handled::Used(0));
        let _ = tx.send(end);
    });
    let end = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("signalling a full blocking pipe blocked the drain");
    assert_eq!(end, Drained::Empty);
    assert_eq!(ring.used_idx(), 1);
    drop(rd);
}
