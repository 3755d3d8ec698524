//! State shared by the vring worker threads and the console I/O thread: the bounded buffers,
//! the receive ring of the current connection, the log file and the console size.

use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hype_daemon::guest_error;
use hype_daemon::vring::{Drain, Handled};
use log::{info, warn};
use vhost_user_backend::{VringRwLock, VringT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::buffer::{InputBuffer, OutputBuffer};

/// Guest memory as the vhost-user daemon shares it with the backend.
pub(crate) type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap>;
/// A vring as the vhost-user daemon hands it to the backend.
pub(crate) type Vring = VringRwLock<GuestMemory>;

/// The first bytes of a console state (see [`Shared::save_state`]).
pub const STATE_MAGIC: &[u8; 16] = b"hype-console-s1\n";

/// One length-prefixed part of a state and what follows it.
fn take_part(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, rest) = b.split_first_chunk::<8>()?;
    let len = usize::try_from(u64::from_le_bytes(*len)).ok()?;
    (rest.len() >= len).then(|| rest.split_at(len))
}

/// The receive queue (host to guest) of the connected frontend.
pub(crate) struct RxRing {
    pub vring: Vring,
    pub mem: GuestMemory,
    pub event_idx: Arc<AtomicBool>,
    /// Which connection this ring belongs to.
    pub generation: u64,
}

/// Mutable console state, under one lock.
pub(crate) struct State {
    /// Guest output not yet accepted by the reader.
    pub out: OutputBuffer,
    /// Input not yet placed in guest receive buffers.
    pub input: InputBuffer,
    /// Receive ring of the current connection, once the backend has seen it.
    pub rx: Option<RxRing>,
    /// A reader is attached that drains `out` (terminal, pty, socket client).
    pub reader_live: bool,
    /// The reader made no progress for the stall timeout: stop waiting for it until it does.
    pub stalled: bool,
}

/// Counters, for logs and tests.
#[derive(Default)]
pub(crate) struct Stats {
    pub tx_bytes: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub log_errors: AtomicU64,
}

/// Everything the console's threads share.
pub(crate) struct Shared {
    pub state: Mutex<State>,
    /// Signalled when the reader drains output or goes away.
    pub room: Condvar,
    /// Wakes the I/O thread (output queued, input room freed).
    pub wake: EventFd,
    /// Append-only files that get a copy of all guest output.
    logs: Mutex<Vec<File>>,
    /// Whether output is buffered for a reader at all (false when the only sink is a file).
    pub buffered: bool,
    /// Console size: columns in the high 16 bits, rows in the low ones.
    size: AtomicU32,
    /// Whether VIRTIO_CONSOLE_F_SIZE is offered.
    pub has_size: bool,
    /// How long guest output waits for a live but slow reader before data is dropped.
    pub stall_timeout: Duration,
    /// Connection counter, see [`RxRing::generation`].
    pub generation: AtomicU64,
    pub stats: Stats,
}

impl Shared {
    /// Builds the shared state.
    pub fn new(
        out_cap: usize,
        in_cap: usize,
        logs: Vec<File>,
        buffered: bool,
        size: Option<(u16, u16)>,
        stall_timeout: Duration,
    ) -> std::io::Result<Self> {
        Ok(Shared {
            state: Mutex::new(State {
                out: OutputBuffer::new(out_cap),
                input: InputBuffer::new(in_cap),
                rx: None,
                reader_live: false,
                stalled: false,
            }),
            room: Condvar::new(),
            wake: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            logs: Mutex::new(logs),
            buffered,
            size: AtomicU32::new(size.map_or(0, pack_size)),
            has_size: size.is_some(),
            stall_timeout,
            generation: AtomicU64::new(0),
            stats: Stats::default(),
        })
    }

    /// Locks the state (a poisoned lock is still usable: the buffers stay consistent).
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The console's state for a snapshot (vhost-user DEVICE_STATE): [`STATE_MAGIC`], then
    /// the guest output not yet written to the reader and the input not yet placed in guest
    /// receive buffers, each as a length (u64, little endian) and the bytes.
    pub fn save_state(&self) -> Vec<u8> {
        let st = self.lock();
        let (out, input) = (st.out.contents(), st.input.contents());
        drop(st);
        let mut v = Vec::with_capacity(32 + out.len() + input.len());
        v.extend_from_slice(STATE_MAGIC);
        for part in [&out, &input] {
            v.extend_from_slice(&(part.len() as u64).to_le_bytes());
            v.extend_from_slice(part);
        }
        v
    }

    /// Takes a state [`save_state`](Self::save_state) wrote: its output is queued for the
    /// reader (the log files had it when the guest wrote it; a console without a reader
    /// drops it), its input for the guest. A state that is not one, or holds more than this
    /// console's buffers, is refused and nothing changes.
    pub fn load_state(&self, state: &[u8]) -> std::io::Result<()> {
        let bad = |why: &str| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("console state: {why}"),
            )
        };
        let rest = state
            .strip_prefix(STATE_MAGIC.as_slice())
            .ok_or_else(|| bad("not a console state"))?;
        let (out, rest) = take_part(rest).ok_or_else(|| bad("cut short"))?;
        let (input, rest) = take_part(rest).ok_or_else(|| bad("cut short"))?;
        if !rest.is_empty() {
            return Err(bad("bytes after the end"));
        }
        let mut st = self.lock();
        if out.len() > st.out.room() || input.len() > st.input.room() {
            return Err(bad("more than this console's buffers hold"));
        }
        if self.buffered {
            st.out.push(out);
        }
        st.input.push(input);
        drop(st);
        self.wake_io();
        Ok(())
    }

    /// The largest state [`load_state`](Self::load_state) can take.
    pub fn max_state(&self) -> usize {
        let st = self.lock();
        STATE_MAGIC.len() + 16 + st.out.capacity() + st.input.capacity()
    }

    /// Wakes the I/O thread.
    pub fn wake_io(&self) {
        let _ = self.wake.write(1);
    }

    /// The console size (columns, rows).
    pub fn size(&self) -> (u16, u16) {
        let v = self.size.load(Ordering::Acquire);
        ((v >> 16) as u16, v as u16)
    }

    /// Records a new console size; returns whether it changed.
    pub fn set_size(&self, cols: u16, rows: u16) -> bool {
        self.size.swap(pack_size((cols, rows)), Ordering::AcqRel) != pack_size((cols, rows))
    }

    /// Hands guest output to every sink: the log file at once, the reader through the bounded
    /// buffer. A live reader that is slow holds the caller back (flow control) for at most the
    /// stall timeout; after that, or without a reader, the oldest buffered bytes are dropped
    /// and counted, and the reader is told where.
    pub fn push_output(&self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.stats
            .tx_bytes
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        let mut logs = self.logs.lock().unwrap_or_else(|p| p.into_inner());
        for file in logs.iter_mut() {
            if let Err(e) = file.write_all(bytes) {
                let n = self.stats.log_errors.fetch_add(1, Ordering::Relaxed);
                if n < 10 || n % 1000 == 0 {
                    warn!("cannot write guest output to the log file: {e}");
                }
            }
        }
        drop(logs);
        if !self.buffered {
            return;
        }
        let mut st = self.lock();
        let need = bytes.len().min(st.out.capacity());
        if st.out.room() < need && st.reader_live && !st.stalled {
            let deadline = Instant::now() + self.stall_timeout;
            while st.out.room() < need && st.reader_live && !st.stalled {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    st.stalled = true;
                    warn!(
                        "console reader stalled for {:?}; dropping the oldest guest output until it reads again",
                        self.stall_timeout
                    );
                    break;
                }
                st = self
                    .room
                    .wait_timeout(st, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        let was_empty = st.out.is_empty();
        let dropped = st.out.push(bytes);
        if dropped > 0 {
            let total = st.out.dropped_total();
            // One line per MiB dropped at most, plus the first.
            if total == dropped as u64 || total >> 20 != (total - dropped as u64) >> 20 {
                warn!("console output buffer full: {total} bytes of guest output dropped so far");
            }
        }
        drop(st);
        if was_empty {
            self.wake_io();
        }
    }

    /// Places buffered input into the guest's receive buffers (as many bytes per buffer as
    /// fit, one used entry per buffer, one interrupt per batch). Returns the bytes delivered.
    pub fn deliver_input(&self, st: &mut State) -> usize {
        let State { rx, input, .. } = st;
        let Some(rx) = rx.as_ref() else {
            return 0;
        };
        if input.is_empty() {
            return 0;
        }
        let mem = rx.mem.memory();
        let event_idx = rx.event_idx.load(Ordering::Acquire);
        let mut vs = rx.vring.get_mut();
        let mut delivered = 0usize;
        Drain::new("rx", event_idx).run(&mut vs, &mem, |chain| {
            if input.is_empty() {
                // Nothing left to deliver: the buffer stays the guest's for later input.
                return Handled::Keep;
            }
            let head = chain.head_index();
            let mut written = 0usize;
            match chain.writer(&mem) {
                Ok(mut w) => {
                    while !input.is_empty() && w.available_bytes() > 0 {
                        let front = input.front();
                        let n = front.len().min(w.available_bytes());
                        match std::io::Write::write(&mut w, &front[..n]) {
                            Ok(0) => break,
                            Ok(k) => {
                                input.consume(k);
                                written += k;
                            }
                            Err(e) => {
                                guest_error(format_args!("rx chain {head}: {e}"));
                                break;
                            }
                        }
                    }
                }
                Err(e) => guest_error(format_args!("rx chain {head}: {e}")),
            }
            delivered += written;
            Handled::Used(written as u32)
        });
        self.stats
            .rx_bytes
            .fetch_add(delivered as u64, Ordering::Relaxed);
        delivered
    }

    /// Marks the reader attached or gone and wakes anyone waiting for room.
    pub fn set_reader_live(&self, live: bool) {
        let mut st = self.lock();
        st.reader_live = live;
        st.stalled = false;
        drop(st);
        self.room.notify_all();
    }

    /// Logs totals (at exit).
    pub fn log_totals(&self) {
        let st = self.lock();
        info!(
            "console totals: {} bytes from the guest, {} bytes to the guest, {} bytes dropped, {} left unread",
            self.stats.tx_bytes.load(Ordering::Relaxed),
            self.stats.rx_bytes.load(Ordering::Relaxed),
            st.out.dropped_total(),
            st.out.len()
        );
    }
}

fn pack_size((cols, rows): (u16, u16)) -> u32 {
    u32::from(cols) << 16 | u32::from(rows)
}
