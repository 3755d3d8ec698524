//! The driver side of a split virtqueue, written in guest memory by this process.
//!
//! Layout (each part in its own page-aligned allocation):
//! - descriptor table: `size` x 16 bytes (`addr: le64, len: le32, flags: le16, next: le16`);
//! - avail ring: `flags: le16, idx: le16, ring: [le16; size], used_event: le16`;
//! - used ring: `flags: le16, idx: le16, ring: [{id: le32, len: le32}; size], avail_event: le16`.
//!
//! Normal use: [`Virtqueue::submit`] (or [`Virtqueue::add`] several chains then
//! [`Virtqueue::notify`] once), then [`Virtqueue::wait`] for [`Completion`]s. Hostile tests use
//! the raw API: [`Virtqueue::reserve_descriptors`], [`Virtqueue::write_descriptor`],
//! [`Virtqueue::add_raw`]/[`Virtqueue::submit_raw`], [`Virtqueue::set_avail_idx`],
//! [`Virtqueue::collect_raw`].

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::error::{Error, Result};
use crate::memory::{GuestBuffer, GuestRam, PAGE_SIZE};

/// Descriptor flag: the chain continues in `next`.
pub const VRING_DESC_F_NEXT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
/// Descriptor flag: the buffer is device-writable.
pub const VRING_DESC_F_WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
/// Descriptor flag: the buffer holds an indirect descriptor table.
pub const VRING_DESC_F_INDIRECT: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;
/// Used ring flag: the device asks not to be kicked (ignored with EVENT_IDX).
const VRING_USED_F_NO_NOTIFY: u16 = virtio_bindings::virtio_ring::VRING_USED_F_NO_NOTIFY as u16;

/// Size of one descriptor.
const DESC_SIZE: u64 = 16;
/// Size of one used element.
const USED_ELEM_SIZE: u64 = 8;

/// Largest queue size the split ring format allows.
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// One buffer of a descriptor chain, as the driver sees it.
#[derive(Debug, Clone, Copy)]
pub enum Segment<'a> {
    /// Device-readable buffer holding these bytes.
    Readable(&'a [u8]),
    /// Device-writable buffer of this many bytes (zero-filled before submission).
    Writable(u32),
    /// Device-writable buffer of `.0` bytes pre-filled with byte `.1` (so bytes the device
    /// did not write can be told apart, e.g. a virtio-blk status byte pre-set to 0xff).
    WritableFilled(u32, u8),
}

impl Segment<'_> {
    fn len(&self) -> Result<u32> {
        match self {
            Segment::Readable(b) => {
                u32::try_from(b.len()).map_err(|_| Error::SegmentTooLarge(b.len()))
            }
            Segment::Writable(n) | Segment::WritableFilled(n, _) => Ok(*n),
        }
    }

    fn is_writable(&self) -> bool {
        !matches!(self, Segment::Readable(_))
    }
}

/// A raw descriptor table entry, written verbatim by [`Virtqueue::write_descriptor`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RawDescriptor {
    /// Guest physical address of the buffer.
    pub addr: u64,
    /// Buffer length.
    pub len: u32,
    /// `VRING_DESC_F_*` flags.
    pub flags: u16,
    /// Next descriptor index (meaningful with `VRING_DESC_F_NEXT`).
    pub next: u16,
}

impl RawDescriptor {
    fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..16].copy_from_slice(&self.next.to_le_bytes());
        b
    }
}

/// A used element collected from the used ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// Head descriptor index of the completed chain (as returned by `add`/`submit`).
    pub head: u16,
    /// Bytes the device says it wrote (`used.len`).
    pub len: u32,
    /// Contents of each device-writable segment, in chain order, read back after completion
    /// (full segment length, whatever `len` says). Empty for raw chains or when read-back is off.
    pub data: Vec<Vec<u8>>,
}

/// Counters of one queue (for benchmarks and notification tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Chains made available.
    pub submitted: u64,
    /// Used elements collected.
    pub completed: u64,
    /// Kick eventfd writes.
    pub kicks: u64,
    /// Notifications skipped because the device did not ask for them (EVENT_IDX / NO_NOTIFY).
    pub kicks_suppressed: u64,
    /// Times a wait had to sleep on the call eventfd.
    pub sleeps: u64,
}

/// Driver bookkeeping for one chain made available to the device.
#[derive(Debug)]
struct InFlight {
    /// Ring descriptor indices to free on completion (empty for raw chains).
    descs: Vec<u16>,
    /// Guest buffers to free on completion (segments and indirect table).
    buffers: Vec<GuestBuffer>,
    /// Device-writable segments, for read-back.
    writable: Vec<GuestBuffer>,
    /// Submission order, used to replay after a reconnect.
    seq: u64,
}

/// Guest-physical addresses of a queue's three ring parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingAddresses {
    /// Descriptor table.
    pub desc: u64,
    /// Avail (driver) ring.
    pub avail: u64,
    /// Used (device) ring.
    pub used: u64,
}

/// A split virtqueue driven from this process.
#[derive(Debug)]
pub struct Virtqueue {
    index: u16,
    size: u16,
    ram: Arc<GuestRam>,
    rings: RingAddresses,
    ring_buffers: [GuestBuffer; 3],
    free_descs: Vec<u16>,
    reserved: Vec<bool>,
    in_flight: Vec<Option<InFlight>>,
    in_flight_count: usize,
    /// Shadow of avail.idx.
    avail_idx: u16,
    /// avail.idx at the last notification decision.
    last_notified: u16,
    /// Next used ring slot to read.
    last_used: u16,
    seq: u64,
    event_idx: bool,
    indirect: bool,
    always_kick: bool,
    read_back: bool,
    kick: EventFd,
    call: EventFd,
    pending: VecDeque<Completion>,
    stats: QueueStats,
}

/// `vring_need_event` of the virtio spec: notify iff `event` lies in `[old, new)`.
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

impl Virtqueue {
    /// Creates queue `index` of `size` entries with rings allocated (zeroed) in `ram`.
    pub fn new(ram: Arc<GuestRam>, index: u16, size: u16) -> Result<Self> {
        if size == 0 || size > MAX_QUEUE_SIZE || !size.is_power_of_two() {
            return Err(Error::BadQueueSize(size));
        }
        let n = u64::from(size);
        let desc = ram.alloc(DESC_SIZE * n, PAGE_SIZE)?;
        let avail = ram.alloc(6 + 2 * n, PAGE_SIZE).inspect_err(|_| {
            let _ = ram.free(desc);
        })?;
        let used = ram
            .alloc(6 + USED_ELEM_SIZE * n, PAGE_SIZE)
            .inspect_err(|_| {
                let _ = ram.free(desc);
                let _ = ram.free(avail);
            })?;
        let kick = EventFd::new(EFD_NONBLOCK).map_err(|source| Error::EventFd {
            op: "create",
            source,
        })?;
        let call = EventFd::new(EFD_NONBLOCK).map_err(|source| Error::EventFd {
            op: "create",
            source,
        })?;
        let mut q = Self {
            index,
            size,
            ram,
            rings: RingAddresses {
                desc: desc.addr,
                avail: avail.addr,
                used: used.addr,
            },
            ring_buffers: [desc, avail, used],
            // Pop from the end: hand out 0, 1, 2, ... first.
            free_descs: (0..size).rev().collect(),
            reserved: vec![false; usize::from(size)],
            in_flight: (0..size).map(|_| None).collect(),
            in_flight_count: 0,
            avail_idx: 0,
            last_notified: 0,
            last_used: 0,
            seq: 0,
            event_idx: false,
            indirect: false,
            always_kick: false,
            read_back: true,
            kick,
            call,
            pending: VecDeque::new(),
            stats: QueueStats::default(),
        };
        q.zero_rings()?;
        Ok(q)
    }

    fn zero_rings(&mut self) -> Result<()> {
        for b in self.ring_buffers {
            let len = usize::try_from(b.len).map_err(|_| Error::SegmentTooLarge(usize::MAX))?;
            self.ram.fill(b.addr, len, 0)?;
        }
        Ok(())
    }

    /// Queue index.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Queue size (number of descriptors).
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Guest-physical ring addresses.
    pub fn rings(&self) -> RingAddresses {
        self.rings
    }

    /// The guest RAM this queue lives in.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// The kick eventfd (driver writes, backend reads).
    pub fn kick_fd(&self) -> &EventFd {
        &self.kick
    }

    /// The call eventfd (backend writes, driver waits).
    pub fn call_fd(&self) -> &EventFd {
        &self.call
    }

    /// Replaces the kick and call fds handed to the backend at the next activation: for
    /// hostile-frontend tests, which wrap other files (a pipe, a regular file) as if they
    /// were eventfds. Kicking and waiting through such fds fail; the test drives the ring
    /// with [`Virtqueue::add`] and its own writes.
    pub fn replace_event_fds(&mut self, kick: EventFd, call: EventFd) {
        self.kick = kick;
        self.call = call;
    }

    /// Whether VIRTIO_RING_F_EVENT_IDX is in use on this queue.
    pub fn event_idx(&self) -> bool {
        self.event_idx
    }

    /// Whether VIRTIO_RING_F_INDIRECT_DESC may be used on this queue.
    pub fn indirect(&self) -> bool {
        self.indirect
    }

    /// Sets the negotiated ring features (done by the driver at activation).
    pub fn set_ring_features(&mut self, event_idx: bool, indirect: bool) {
        self.event_idx = event_idx;
        self.indirect = indirect;
    }

    /// Always kick after publishing, ignoring EVENT_IDX / NO_NOTIFY suppression.
    pub fn set_always_kick(&mut self, always: bool) {
        self.always_kick = always;
    }

    /// Read back device-writable buffers into [`Completion::data`] (default on).
    pub fn set_read_back(&mut self, on: bool) {
        self.read_back = on;
    }

    /// Counters since creation.
    pub fn stats(&self) -> QueueStats {
        self.stats
    }

    /// Chains made available and not yet collected.
    pub fn in_flight(&self) -> usize {
        self.in_flight_count
    }

    /// Descriptors free for new chains.
    pub fn free_descriptors(&self) -> usize {
        self.free_descs.len()
    }

    /// The driver's avail.idx (number of chains ever made available, wrapping).
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// The next used ring slot the driver will read (wrapping).
    pub fn last_used_idx(&self) -> u16 {
        self.last_used
    }

    /// used.idx as currently written by the device.
    pub fn device_used_idx(&self) -> Result<u16> {
        self.ram.load::<u16>(self.rings.used + 2, Ordering::Acquire)
    }

    /// avail_event as currently written by the device (meaningful with EVENT_IDX).
    pub fn device_avail_event(&self) -> Result<u16> {
        self.ram
            .load::<u16>(self.avail_event_addr(), Ordering::Acquire)
    }

    fn avail_event_addr(&self) -> u64 {
        self.rings.used + 4 + USED_ELEM_SIZE * u64::from(self.size)
    }

    fn used_event_addr(&self) -> u64 {
        self.rings.avail + 4 + 2 * u64::from(self.size)
    }

    fn desc_addr(&self, index: u16) -> u64 {
        self.rings.desc + DESC_SIZE * u64::from(index)
    }

    /// Makes a chain available without notifying the device. Returns its head index.
    ///
    /// Buffers are allocated in guest memory; readable ones are filled with the given bytes,
    /// writable ones are zeroed. With `indirect` the chain is written into an indirect table
    /// (needs VIRTIO_RING_F_INDIRECT_DESC) and takes a single ring descriptor.
    pub fn add(&mut self, segments: &[Segment<'_>], indirect: bool) -> Result<u16> {
        if segments.is_empty() {
            return Err(Error::EmptyChain);
        }
        if indirect && !self.indirect {
            return Err(Error::IndirectNotNegotiated);
        }
        let needed = if indirect { 1 } else { segments.len() };
        if self.free_descs.len() < needed {
            return Err(Error::NoFreeDescriptors {
                queue: self.index,
                needed,
                free: self.free_descs.len(),
            });
        }
        let mut buffers = Vec::with_capacity(segments.len() + 1);
        let mut writable = Vec::new();
        let mut descs = Vec::with_capacity(segments.len());
        let result = self.fill_segments(segments, &mut buffers, &mut writable, &mut descs);
        if let Err(e) = result {
            for b in buffers {
                let _ = self.ram.free(b);
            }
            return Err(e);
        }
        let head = if indirect {
            let table_len = DESC_SIZE * descs.len() as u64;
            let table = match self.ram.alloc(table_len, 16) {
                Ok(t) => t,
                Err(e) => {
                    for b in buffers {
                        let _ = self.ram.free(b);
                    }
                    return Err(e);
                }
            };
            buffers.push(table);
            let mut bytes = Vec::with_capacity(table_len as usize);
            for (i, d) in descs.iter().enumerate() {
                let mut d = *d;
                if i + 1 < descs.len() {
                    d.flags |= VRING_DESC_F_NEXT;
                    d.next = (i + 1) as u16;
                }
                bytes.extend_from_slice(&d.to_bytes());
            }
            if let Err(e) = self.ram.write(table.addr, &bytes) {
                for b in buffers {
                    let _ = self.ram.free(b);
                }
                return Err(e);
            }
            // Checked above: at least one descriptor is free.
            let Some(head) = self.free_descs.pop() else {
                return Err(Error::NoFreeDescriptors {
                    queue: self.index,
                    needed: 1,
                    free: 0,
                });
            };
            let d = RawDescriptor {
                addr: table.addr,
                len: table_len as u32,
                flags: VRING_DESC_F_INDIRECT,
                next: 0,
            };
            if let Err(e) = self.ram.write(self.desc_addr(head), &d.to_bytes()) {
                self.free_descs.push(head);
                for b in buffers {
                    let _ = self.ram.free(b);
                }
                return Err(e);
            }
            self.track(head, vec![head], buffers, writable);
            head
        } else {
            let start = self.free_descs.len() - descs.len();
            let ids: Vec<u16> = self.free_descs.drain(start..).rev().collect();
            let mut written = Ok(());
            for (i, d) in descs.iter().enumerate() {
                let mut d = *d;
                if i + 1 < ids.len() {
                    d.flags |= VRING_DESC_F_NEXT;
                    d.next = ids[i + 1];
                }
                written = self.ram.write(self.desc_addr(ids[i]), &d.to_bytes());
                if written.is_err() {
                    break;
                }
            }
            if let Err(e) = written {
                self.free_descs.extend(ids.iter().rev());
                for b in buffers {
                    let _ = self.ram.free(b);
                }
                return Err(e);
            }
            let head = ids[0];
            self.track(head, ids, buffers, writable);
            head
        };
        self.publish(head)?;
        Ok(head)
    }

    fn fill_segments(
        &self,
        segments: &[Segment<'_>],
        buffers: &mut Vec<GuestBuffer>,
        writable: &mut Vec<GuestBuffer>,
        descs: &mut Vec<RawDescriptor>,
    ) -> Result<()> {
        for seg in segments {
            let len = seg.len()?;
            // Data-sized buffers are page aligned like a real guest's (O_DIRECT backends care).
            let align = if len >= 512 { PAGE_SIZE } else { 16 };
            let buf = self.ram.alloc(u64::from(len), align)?;
            buffers.push(buf);
            match seg {
                Segment::Readable(bytes) => self.ram.write(buf.addr, bytes)?,
                Segment::Writable(n) => {
                    self.ram.fill(buf.addr, *n as usize, 0)?;
                    writable.push(buf);
                }
                Segment::WritableFilled(n, byte) => {
                    self.ram.fill(buf.addr, *n as usize, *byte)?;
                    writable.push(buf);
                }
            }
            descs.push(RawDescriptor {
                addr: buf.addr,
                len,
                flags: if seg.is_writable() {
                    VRING_DESC_F_WRITE
                } else {
                    0
                },
                next: 0,
            });
        }
        Ok(())
    }

    fn track(
        &mut self,
        head: u16,
        descs: Vec<u16>,
        buffers: Vec<GuestBuffer>,
        writable: Vec<GuestBuffer>,
    ) {
        self.seq += 1;
        self.in_flight[usize::from(head)] = Some(InFlight {
            descs,
            buffers,
            writable,
            seq: self.seq,
        });
        self.in_flight_count += 1;
    }

    /// Writes `head` into the next avail ring slot and publishes the new avail.idx.
    fn publish(&mut self, head: u16) -> Result<()> {
        let slot = self.avail_idx % self.size;
        self.ram.store::<u16>(
            self.rings.avail + 4 + 2 * u64::from(slot),
            head,
            Ordering::Relaxed,
        )?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // Release: descriptors and the ring slot are visible before the new index.
        self.ram
            .store::<u16>(self.rings.avail + 2, self.avail_idx, Ordering::Release)?;
        self.stats.submitted += 1;
        Ok(())
    }

    /// Notifies the device of newly available chains if it asked for it (or always, with
    /// [`Virtqueue::set_always_kick`]). Returns whether the kick eventfd was written.
    pub fn notify(&mut self) -> Result<bool> {
        let new = self.avail_idx;
        let old = self.last_notified;
        self.last_notified = new;
        if !self.always_kick && new == old {
            return Ok(false);
        }
        // Full barrier: avail.idx store before reading the device's suppression state.
        fence(Ordering::SeqCst);
        let wanted = if self.always_kick {
            true
        } else if self.event_idx {
            let event = self
                .ram
                .load::<u16>(self.avail_event_addr(), Ordering::Acquire)?;
            need_event(event, new, old)
        } else {
            let flags = self.ram.load::<u16>(self.rings.used, Ordering::Acquire)?;
            flags & VRING_USED_F_NO_NOTIFY == 0
        };
        if wanted {
            self.kick()?;
        } else {
            self.stats.kicks_suppressed += 1;
        }
        Ok(wanted)
    }

    /// Writes the kick eventfd unconditionally.
    pub fn kick(&mut self) -> Result<()> {
        self.kick.write(1).map_err(|source| Error::EventFd {
            op: "write kick",
            source,
        })?;
        self.stats.kicks += 1;
        Ok(())
    }

    /// [`Virtqueue::add`] then [`Virtqueue::notify`]. Returns the head index.
    pub fn submit(&mut self, segments: &[Segment<'_>]) -> Result<u16> {
        let head = self.add(segments, false)?;
        self.notify()?;
        Ok(head)
    }

    /// Like [`Virtqueue::submit`] with an indirect descriptor table.
    pub fn submit_indirect(&mut self, segments: &[Segment<'_>]) -> Result<u16> {
        let head = self.add(segments, true)?;
        self.notify()?;
        Ok(head)
    }

    /// Collects available used elements without blocking (including ones collected earlier
    /// and kept, e.g. across a reconnect or a timed-out wait).
    pub fn poll(&mut self) -> Result<Vec<Completion>> {
        let mut out: Vec<Completion> = self.pending.drain(..).collect();
        if let Err(e) = self.collect(&mut out) {
            self.pending.extend(out);
            return Err(e);
        }
        Ok(out)
    }

    /// Waits until at least `min` completions are collected, sleeping on the call eventfd.
    ///
    /// Never hangs: after `timeout` it returns [`Error::Timeout`] and keeps what it collected
    /// for the next call.
    pub fn wait(&mut self, min: usize, timeout: Duration) -> Result<Vec<Completion>> {
        let deadline = Instant::now() + timeout;
        let mut out: Vec<Completion> = self.pending.drain(..).collect();
        loop {
            if let Err(e) = self.collect(&mut out) {
                self.pending.extend(out);
                return Err(e);
            }
            if out.len() >= min {
                return Ok(out);
            }
            if self.event_idx {
                // Ask for an interrupt at the next used entry, then re-check to close the race
                // with a device that completed in between.
                if let Err(e) =
                    self.ram
                        .store::<u16>(self.used_event_addr(), self.last_used, Ordering::Release)
                {
                    self.pending.extend(out);
                    return Err(e);
                }
                fence(Ordering::SeqCst);
                match self.device_used_idx() {
                    Ok(idx) if idx != self.last_used => continue,
                    Ok(_) => {}
                    Err(e) => {
                        self.pending.extend(out);
                        return Err(e);
                    }
                }
            }
            let now = Instant::now();
            if now >= deadline {
                let got = out.len();
                self.pending.extend(out);
                return Err(Error::Timeout {
                    queue: self.index,
                    timeout,
                    got,
                    wanted: min,
                });
            }
            self.stats.sleeps += 1;
            if let Err(e) = self.sleep_on_call(deadline - now) {
                self.pending.extend(out);
                return Err(e);
            }
        }
    }

    /// Waits for the completion of chain `head`; other completions are kept for later calls.
    pub fn wait_for(&mut self, head: u16, timeout: Duration) -> Result<Completion> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(pos) = self.pending.iter().position(|c| c.head == head) {
                if let Some(c) = self.pending.remove(pos) {
                    return Ok(c);
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let got = match self.wait(self.pending.len() + 1, left) {
                Ok(v) => v,
                Err(Error::Timeout { .. }) => {
                    return Err(Error::Timeout {
                        queue: self.index,
                        timeout,
                        got: 0,
                        wanted: 1,
                    })
                }
                Err(e) => return Err(e),
            };
            self.pending.extend(got);
        }
    }

    fn sleep_on_call(&mut self, left: Duration) -> Result<()> {
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        let mut pfd = libc::pollfd {
            fd: self.call.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is a valid pollfd for the duration of the call and nfds is 1.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                return Ok(());
            }
            return Err(Error::Poll {
                queue: self.index,
                source: err,
            });
        }
        if rc > 0 {
            // Clear the counter; EAGAIN means someone else consumed it, which is harmless.
            let _ = self.call.read();
        }
        Ok(())
    }

    /// Reads new used elements and retires their chains.
    fn collect(&mut self, out: &mut Vec<Completion>) -> Result<()> {
        let used_idx = self.device_used_idx()?;
        let delta = used_idx.wrapping_sub(self.last_used);
        if delta == 0 {
            return Ok(());
        }
        if usize::from(delta) > self.in_flight_count {
            return Err(Error::UsedIdxOverrun {
                queue: self.index,
                delta,
                in_flight: self.in_flight_count,
            });
        }
        for _ in 0..delta {
            let (id, len) = self.read_used_elem(self.last_used)?;
            self.last_used = self.last_used.wrapping_add(1);
            let entry = usize::try_from(id)
                .ok()
                .and_then(|i| self.in_flight.get_mut(i))
                .and_then(Option::take);
            let Some(entry) = entry else {
                return Err(Error::UnknownUsedId {
                    queue: self.index,
                    id,
                });
            };
            self.in_flight_count -= 1;
            let mut data = Vec::new();
            if self.read_back {
                data.reserve(entry.writable.len());
                for b in &entry.writable {
                    data.push(self.ram.read_vec(b.addr, b.len as usize)?);
                }
            }
            self.retire(entry);
            self.stats.completed += 1;
            // `id` indexed `in_flight`, so it is < size <= u16::MAX.
            out.push(Completion {
                head: id as u16,
                len,
                data,
            });
        }
        Ok(())
    }

    fn read_used_elem(&self, slot: u16) -> Result<(u32, u32)> {
        let at = self.rings.used + 4 + USED_ELEM_SIZE * u64::from(slot % self.size);
        let id = self.ram.load::<u32>(at, Ordering::Relaxed)?;
        let len = self.ram.load::<u32>(at + 4, Ordering::Relaxed)?;
        Ok((id, len))
    }

    fn retire(&mut self, entry: InFlight) {
        for b in entry.buffers {
            // Only buffers this queue allocated are tracked, so free cannot fail.
            let _ = self.ram.free(b);
        }
        self.free_descs.extend(entry.descs.into_iter().rev());
    }

    // ---------------------------------------------------------------- raw / hostile mode

    /// Takes `count` descriptors out of the free list for raw use.
    pub fn reserve_descriptors(&mut self, count: usize) -> Result<Vec<u16>> {
        if self.free_descs.len() < count {
            return Err(Error::NoFreeDescriptors {
                queue: self.index,
                needed: count,
                free: self.free_descs.len(),
            });
        }
        let start = self.free_descs.len() - count;
        let ids: Vec<u16> = self.free_descs.drain(start..).rev().collect();
        for &i in &ids {
            self.reserved[usize::from(i)] = true;
        }
        Ok(ids)
    }

    /// Returns raw descriptors to the free list (they must not be in flight any more).
    pub fn release_descriptors(&mut self, ids: &[u16]) -> Result<()> {
        for &i in ids {
            let ok = self.reserved.get(usize::from(i)).copied().unwrap_or(false)
                && self.in_flight[usize::from(i)].is_none();
            if !ok {
                return Err(Error::DescriptorBusy {
                    queue: self.index,
                    index: i,
                });
            }
        }
        for &i in ids {
            self.reserved[usize::from(i)] = false;
            self.free_descs.push(i);
        }
        Ok(())
    }

    /// Writes a descriptor table entry verbatim. `index` must be reserved with
    /// [`Virtqueue::reserve_descriptors`]; the contents may be anything (loops, bad addresses,
    /// huge lengths, wrong directions).
    pub fn write_descriptor(&mut self, index: u16, desc: RawDescriptor) -> Result<()> {
        if index >= self.size {
            return Err(Error::BadDescriptorIndex {
                queue: self.index,
                index,
                size: self.size,
            });
        }
        if !self.reserved[usize::from(index)] {
            return Err(Error::DescriptorBusy {
                queue: self.index,
                index,
            });
        }
        self.ram.write(self.desc_addr(index), &desc.to_bytes())
    }

    /// Publishes any `head` value in the avail ring without notifying. A head inside the table
    /// that is not already in flight is tracked so its completion is reported by `wait`/`poll`
    /// (with empty `data`); other heads are published untracked (use [`Virtqueue::collect_raw`]).
    pub fn add_raw(&mut self, head: u16) -> Result<()> {
        if let Some(slot) = self.in_flight.get(usize::from(head)) {
            if slot.is_none() && self.reserved[usize::from(head)] {
                self.track(head, Vec::new(), Vec::new(), Vec::new());
            }
        }
        self.publish(head)
    }

    /// [`Virtqueue::add_raw`] then [`Virtqueue::notify`].
    pub fn submit_raw(&mut self, head: u16) -> Result<()> {
        self.add_raw(head)?;
        self.notify()?;
        Ok(())
    }

    /// Stops waiting for a raw chain the device is expected to drop.
    pub fn forget_raw(&mut self, head: u16) {
        if let Some(slot) = self.in_flight.get_mut(usize::from(head)) {
            if slot
                .as_ref()
                .is_some_and(|e| e.descs.is_empty() && e.buffers.is_empty())
            {
                *slot = None;
                self.in_flight_count -= 1;
            }
        }
    }

    /// Writes avail.idx verbatim (e.g. far ahead of the ring contents).
    pub fn set_avail_idx(&mut self, idx: u16) -> Result<()> {
        self.avail_idx = idx;
        self.ram
            .store::<u16>(self.rings.avail + 2, idx, Ordering::Release)
    }

    /// Writes the avail ring flags verbatim (e.g. `VRING_AVAIL_F_NO_INTERRUPT`).
    pub fn set_avail_flags(&mut self, flags: u16) -> Result<()> {
        self.ram
            .store::<u16>(self.rings.avail, flags, Ordering::Release)
    }

    /// Reads new used elements as raw `(id, len)` pairs without any bookkeeping (chains are
    /// neither retired nor freed). For tests where the device may return garbage.
    pub fn collect_raw(&mut self) -> Result<Vec<(u32, u32)>> {
        let used_idx = self.device_used_idx()?;
        let mut out = Vec::new();
        while self.last_used != used_idx {
            out.push(self.read_used_elem(self.last_used)?);
            self.last_used = self.last_used.wrapping_add(1);
        }
        Ok(out)
    }

    /// Waits (bounded by `timeout`) until the device's used.idx moves past the driver's
    /// position, then returns the raw elements like [`Virtqueue::collect_raw`].
    pub fn wait_raw(&mut self, timeout: Duration) -> Result<Vec<(u32, u32)>> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.collect_raw()?;
            if !got.is_empty() {
                return Ok(got);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    queue: self.index,
                    timeout,
                    got: 0,
                    wanted: 1,
                });
            }
            self.sleep_on_call(deadline - now)?;
        }
    }

    // ---------------------------------------------------------------- reconnect support

    /// Prepares replay after a lost connection: collects what the device completed, marks the
    /// rest as not yet made available (used.idx := avail.idx) and returns the base to send with
    /// SET_VRING_BASE plus the heads to make available again, in submission order.
    pub(crate) fn prepare_resubmit(&mut self) -> Result<(u16, Vec<u16>)> {
        let mut done = Vec::new();
        // Best effort: a device that died mid-write may leave garbage; keep what is sane.
        if let Err(e) = self.collect(&mut done) {
            log::warn!(
                "queue {}: collecting before reconnect: {}",
                self.index,
                hype_base::error_chain(&e)
            );
        }
        self.pending.extend(done);
        let mut lost: Vec<(u64, u16)> = self
            .in_flight
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.as_ref().map(|e| (e.seq, i as u16)))
            .collect();
        lost.sort_unstable();
        self.ram
            .store::<u16>(self.rings.used + 2, self.avail_idx, Ordering::Release)?;
        self.last_used = self.avail_idx;
        self.last_notified = self.avail_idx;
        Ok((self.avail_idx, lost.into_iter().map(|(_, h)| h).collect()))
    }

    /// Prepares replay where the device re-reads the avail ring from the used index: returns
    /// used.idx as found in memory (after collecting what is there).
    pub(crate) fn prepare_from_used(&mut self) -> Result<u16> {
        let mut done = Vec::new();
        if let Err(e) = self.collect(&mut done) {
            log::warn!(
                "queue {}: collecting before reconnect: {}",
                self.index,
                hype_base::error_chain(&e)
            );
        }
        self.pending.extend(done);
        let idx = self.device_used_idx()?;
        self.last_notified = self.avail_idx;
        Ok(idx)
    }

    /// Makes previously submitted chains available again (after a reconnect).
    pub(crate) fn republish(&mut self, heads: &[u16]) -> Result<()> {
        for &h in heads {
            self.publish(h)?;
        }
        Ok(())
    }
}

impl Drop for Virtqueue {
    fn drop(&mut self) {
        for e in self.in_flight.iter_mut().filter_map(Option::take) {
            for b in e.buffers {
                let _ = self.ram.free(b);
            }
        }
        for b in self.ring_buffers {
            let _ = self.ram.free(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn need_event_matches_spec() {
        // Device wants a kick when avail idx passes 5.
        assert!(need_event(5, 6, 5));
        assert!(need_event(5, 10, 3));
        assert!(!need_event(5, 5, 3));
        assert!(!need_event(9, 8, 3));
        // Wrap-around.
        assert!(need_event(0xffff, 2, 0xfffe));
        assert!(!need_event(1, 0xffff, 0xfff0));
    }

    #[test]
    fn add_writes_linked_descriptors_and_avail_ring() {
        let ram = Arc::new(GuestRam::new(1 << 20).unwrap());
        let mut q = Virtqueue::new(ram.clone(), 0, 8).unwrap();
        let head = q
            .add(&[Segment::Readable(b"abc"), Segment::Writable(600)], false)
            .unwrap();
        assert_eq!(head, 0);
        let r = q.rings();
        let d0 = ram.read_vec(r.desc, 16).unwrap();
        let addr0 = u64::from_le_bytes(d0[0..8].try_into().unwrap());
        assert_eq!(u32::from_le_bytes(d0[8..12].try_into().unwrap()), 3);
        assert_eq!(
            u16::from_le_bytes(d0[12..14].try_into().unwrap()),
            VRING_DESC_F_NEXT
        );
        let next = u16::from_le_bytes(d0[14..16].try_into().unwrap());
        assert_eq!(ram.read_vec(addr0, 3).unwrap(), b"abc");
        let d1 = ram.read_vec(r.desc + 16 * u64::from(next), 16).unwrap();
        let addr1 = u64::from_le_bytes(d1[0..8].try_into().unwrap());
        assert_eq!(addr1 % PAGE_SIZE, 0);
        assert_eq!(u32::from_le_bytes(d1[8..12].try_into().unwrap()), 600);
        assert_eq!(
            u16::from_le_bytes(d1[12..14].try_into().unwrap()),
            VRING_DESC_F_WRITE
        );
        assert_eq!(ram.load::<u16>(r.avail + 2, Ordering::Acquire).unwrap(), 1);
        assert_eq!(
            ram.load::<u16>(r.avail + 4, Ordering::Acquire).unwrap(),
            head
        );
        assert_eq!(q.free_descriptors(), 6);
        assert_eq!(q.in_flight(), 1);
    }

    /// Plays the device by hand: writes a used element and checks retirement and read-back.
    #[test]
    fn collect_retires_chain_and_reads_back() {
        let ram = Arc::new(GuestRam::new(1 << 20).unwrap());
        let mut q = Virtqueue::new(ram.clone(), 0, 4).unwrap();
        let live_before = ram.live_allocations();
        let head = q
            .add(&[Segment::Readable(b"x"), Segment::Writable(4)], false)
            .unwrap();
        let r = q.rings();
        // Device: write into the writable buffer (second descriptor) and complete.
        let d0 = ram.read_vec(r.desc + 16 * u64::from(head), 16).unwrap();
        let next = u16::from_le_bytes(d0[14..16].try_into().unwrap());
        let d1 = ram.read_vec(r.desc + 16 * u64::from(next), 16).unwrap();
        ram.write(u64::from_le_bytes(d1[0..8].try_into().unwrap()), b"done")
            .unwrap();
        ram.store::<u32>(r.used + 4, u32::from(head), Ordering::Relaxed)
            .unwrap();
        ram.store::<u32>(r.used + 8, 4, Ordering::Relaxed).unwrap();
        ram.store::<u16>(r.used + 2, 1, Ordering::Release).unwrap();
        let c = q.wait(1, Duration::from_millis(10)).unwrap();
        assert_eq!(
            c,
            vec![Completion {
                head,
                len: 4,
                data: vec![b"done".to_vec()]
            }]
        );
        assert_eq!(q.free_descriptors(), 4);
        assert_eq!(ram.live_allocations(), live_before);
        // Nothing more: a bounded wait must time out, not hang.
        assert!(matches!(
            q.wait(1, Duration::from_millis(20)),
            Err(Error::Timeout {
                got: 0,
                wanted: 1,
                ..
            })
        ));
    }

    #[test]
    fn bogus_used_elements_are_errors_not_panics() {
        let ram = Arc::new(GuestRam::new(1 << 20).unwrap());
        let mut q = Virtqueue::new(ram.clone(), 0, 4).unwrap();
        let r = q.rings();
        // used.idx moved without anything in flight.
        ram.store::<u16>(r.used + 2, 3, Ordering::Release).unwrap();
        assert!(matches!(
            q.poll(),
            Err(Error::UsedIdxOverrun { delta: 3, .. })
        ));
        let mut q = Virtqueue::new(ram.clone(), 1, 4).unwrap();
        let r = q.rings();
        q.add(&[Segment::Writable(1)], false).unwrap();
        ram.store::<u32>(r.used + 4, 9999, Ordering::Relaxed)
            .unwrap();
        ram.store::<u16>(r.used + 2, 1, Ordering::Release).unwrap();
        assert!(matches!(
            q.poll(),
            Err(Error::UnknownUsedId { id: 9999, .. })
        ));
    }

    #[test]
    fn descriptor_exhaustion_and_raw_reservation() {
        let ram = Arc::new(GuestRam::new(1 << 20).unwrap());
        let mut q = Virtqueue::new(ram, 0, 4).unwrap();
        let raw = q.reserve_descriptors(2).unwrap();
        assert!(matches!(
            q.add(&[Segment::Writable(1); 3], false),
            Err(Error::NoFreeDescriptors {
                needed: 3,
                free: 2,
                ..
            })
        ));
        q.write_descriptor(
            raw[0],
            RawDescriptor {
                addr: u64::MAX,
                len: u32::MAX,
                flags: VRING_DESC_F_NEXT,
                next: raw[0],
            },
        )
        .unwrap();
        assert!(matches!(
            q.write_descriptor(7, RawDescriptor::default()),
            Err(Error::BadDescriptorIndex { .. })
        ));
        q.add_raw(raw[0]).unwrap();
        assert_eq!(q.in_flight(), 1);
        assert!(
            q.release_descriptors(&raw).is_err(),
            "raw head is in flight"
        );
        q.forget_raw(raw[0]);
        q.release_descriptors(&raw).unwrap();
        assert_eq!(q.free_descriptors(), 4);
        assert!(matches!(
            Virtqueue::new(q.ram().clone(), 1, 6),
            Err(Error::BadQueueSize(6))
        ));
    }
}
