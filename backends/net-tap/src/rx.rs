//! The RX path: frames read from the tap (header included) and copied into the guest's
//! receive buffers, spread over several chains with MRG_RXBUF.
//!
//! A frame is read only when it can be kept: if the guest has too few buffers for it, it stays
//! pending here until the next RX kick, and the caller stops watching the tap meanwhile.

use std::io;
use std::os::fd::RawFd;

use hype_daemon::guest_error;
use hype_daemon::vring::signal_used;
use virtio_queue::{QueueOwnedT, QueueT};

use crate::backend::{Mem, VringState};
use crate::chain::{collect, copy_to_segments, HostSeg};
use crate::stats::Stats;
use crate::VNET_HDR_LEN;

/// Room for the largest frame the tap can hand us (a 64 KiB GSO frame with headers).
const BOUNCE_SIZE: usize = 128 << 10;

/// Frames handled per call before giving the thread's other queue a turn.
const FRAMES_PER_CALL: usize = 256;

/// Chains returned between two used-ring signals.
const SIGNAL_BATCH: usize = 32;

/// RX state of one queue pair.
pub(crate) struct RxState {
    bounce: Vec<u8>,
    /// Length of the frame in `bounce` that is waiting for guest buffers.
    pending: Option<usize>,
    segs: Vec<HostSeg>,
    /// Per used chain: (head, first segment, bytes of room).
    chains: Vec<(u16, usize, usize)>,
    all_segs: Vec<HostSeg>,
    bad: Vec<u16>,
}

impl Default for RxState {
    fn default() -> Self {
        RxState {
            bounce: vec![0; BOUNCE_SIZE],
            pending: None,
            segs: Vec::new(),
            chains: Vec::new(),
            all_segs: Vec::new(),
            bad: Vec::new(),
        }
    }
}

/// What the guest negotiated that the RX path needs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Negotiated {
    /// MRG_RXBUF: a frame may span several chains.
    pub mrg_rxbuf: bool,
    /// EVENT_IDX.
    pub event_idx: bool,
    /// virtio-net header length (12, or 10 for legacy drivers).
    pub hdr_len: usize,
}

/// How a call to [`RxState::process`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RxOutcome {
    /// The tap has nothing more to read for now.
    TapEmpty,
    /// The frame budget was used up; the tap may still be readable.
    Yield,
    /// The guest has no (or too few) buffers: stop reading until it kicks.
    NeedBuffers,
    /// The ring is not running.
    NoRing,
}

enum Delivery {
    /// Delivered in this many chains.
    Done(usize),
    /// Did not fit the guest's buffers and cannot ever fit: dropped.
    Dropped,
    /// Not enough buffers right now; nothing was consumed.
    NoBuffers,
}

impl RxState {
    /// Moves frames from the tap queue `fd` into the RX ring.
    pub(crate) fn process(
        &mut self,
        st: &mut VringState,
        mem: &Mem,
        fd: RawFd,
        neg: Negotiated,
        stats: &Stats,
    ) -> RxOutcome {
        let Negotiated {
            mrg_rxbuf,
            event_idx,
            hdr_len,
        } = neg;
        if !st.get_queue().ready() || !st.is_enabled() {
            return RxOutcome::NoRing;
        }
        // We are about to look at the ring ourselves: no kicks needed while we have buffers.
        if let Err(e) = st.disable_notification() {
            guest_error(format_args!("rx: disable_notification: {e}"));
        }
        let mut completed = 0usize;
        let mut frames = 0usize;
        let mut retried = false;
        let outcome = loop {
            if frames >= FRAMES_PER_CALL {
                break RxOutcome::Yield;
            }
            let len = match self.pending {
                Some(len) => len,
                None => match read_frame(fd, &mut self.bounce) {
                    Ok(Some(len)) if len >= hdr_len => len,
                    Ok(Some(_)) => {
                        Stats::add(&stats.rx_dropped, 1);
                        continue;
                    }
                    Ok(None) => break RxOutcome::TapEmpty,
                    Err(e) => {
                        log::warn!("rx: reading the tap failed: {e}");
                        break RxOutcome::TapEmpty;
                    }
                },
            };
            self.pending = Some(len);
            match self.deliver(st, mem, len, mrg_rxbuf, hdr_len, stats) {
                Delivery::Done(chains) => {
                    self.pending = None;
                    frames += 1;
                    retried = false;
                    completed += chains;
                    Stats::add(&stats.rx_packets, 1);
                    Stats::add(&stats.rx_bytes, (len - hdr_len) as u64);
                }
                Delivery::Dropped => {
                    self.pending = None;
                    frames += 1;
                    Stats::add(&stats.rx_dropped, 1);
                    completed += 1;
                }
                Delivery::NoBuffers => {
                    // Ask for a kick, then look again: buffers may have arrived meanwhile.
                    match st.enable_notification() {
                        Ok(true) if !retried => {
                            retried = true;
                            continue;
                        }
                        Ok(_) => break RxOutcome::NeedBuffers,
                        Err(e) => {
                            guest_error(format_args!("rx: enable_notification: {e}"));
                            break RxOutcome::NeedBuffers;
                        }
                    }
                }
            }
            if completed >= SIGNAL_BATCH {
                signal_used(st, event_idx);
                completed = 0;
            }
        };
        if completed > 0 {
            signal_used(st, event_idx);
        }
        outcome
    }

    /// Puts the pending frame (`len` bytes of `bounce`) into guest buffers.
    fn deliver(
        &mut self,
        st: &mut VringState,
        mem: &Mem,
        len: usize,
        mrg_rxbuf: bool,
        hdr_len: usize,
        stats: &Stats,
    ) -> Delivery {
        let queue_size = usize::from(st.get_queue().size());
        self.chains.clear();
        self.all_segs.clear();
        self.bad.clear();
        let mut room = 0usize;
        let mut popped = 0usize;
        while room < len {
            if popped >= queue_size {
                break; // the whole ring cannot hold it
            }
            let Some(chain) = st.get_queue_mut().pop_descriptor_chain(mem.clone()) else {
                // Put back what we took; the frame stays pending.
                for _ in 0..popped {
                    st.get_queue_mut().go_to_previous_position();
                }
                return Delivery::NoBuffers;
            };
            popped += 1;
            let head = chain.head_index();
            match collect(chain, mem, true, usize::MAX, &mut self.segs) {
                Ok(cap) if cap >= hdr_len => {
                    self.chains.push((head, self.all_segs.len(), cap));
                    self.all_segs.extend_from_slice(&self.segs);
                    room = room.saturating_add(cap);
                }
                Ok(cap) => {
                    guest_error(format_args!(
                        "rx: chain {head} has {cap} bytes, less than the header"
                    ));
                    self.bad.push(head);
                }
                Err(e) => {
                    guest_error(format_args!("rx: chain {head}: {e}"));
                    self.bad.push(head);
                }
            }
            if !mrg_rxbuf && !self.chains.is_empty() {
                break;
            }
        }
        let mut delivered = 0;
        if room >= len {
            let num_buffers = self.chains.len() as u16;
            // num_buffers: the tap leaves bytes 10..12 of the header alone.
            if hdr_len == VNET_HDR_LEN {
                self.bounce[10..12].copy_from_slice(&num_buffers.to_le_bytes());
            }
            let mut off = 0;
            for i in 0..self.chains.len() {
                let (head, first, cap) = self.chains[i];
                let last = self.chains.get(i + 1).map_or(self.all_segs.len(), |c| c.1);
                let n = cap.min(len - off);
                let wrote =
                    copy_to_segments(&self.all_segs[first..last], &self.bounce[off..off + n]);
                off += wrote;
                if let Err(e) = st.add_used(head, wrote as u32) {
                    guest_error(format_args!("rx: cannot return chain {head}: {e}"));
                }
            }
            delivered = self.chains.len();
        } else {
            // It never fits: the guest's buffers are smaller than it promised.
            guest_error(format_args!(
                "rx: dropping a {len}-byte frame: {room} bytes of buffers"
            ));
            for &(head, _, _) in &self.chains {
                if let Err(e) = st.add_used(head, 0) {
                    guest_error(format_args!("rx: cannot return chain {head}: {e}"));
                }
            }
        }
        for &head in &self.bad {
            Stats::add(&stats.rx_malformed, 1);
            if let Err(e) = st.add_used(head, 0) {
                guest_error(format_args!("rx: cannot return chain {head}: {e}"));
            }
        }
        if delivered > 0 {
            Delivery::Done(delivered + self.bad.len())
        } else {
            Delivery::Dropped
        }
    }
}

/// Reads one frame (header included); `None` when the tap has nothing.
fn read_frame(fd: RawFd, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        // SAFETY: `buf` is a valid, exclusively borrowed buffer of `buf.len()` bytes.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => return Ok(None),
            _ => return Err(err),
        }
    }
}
