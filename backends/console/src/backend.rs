//! The `VhostUserBackend`: virtio-console with one port (receiveq 0, transmitq 1), one worker
//! thread per queue.

use std::fs::File;
use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use hype_daemon::backend_defaults;
use hype_daemon::guest_error;
use hype_daemon::vring::{Drain, Handled};
use log::warn;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use crate::shared::{GuestMemory, RxRing, Shared, Vring};

/// `VIRTIO_CONSOLE_F_SIZE`: cols/rows in config space are valid.
pub const VIRTIO_CONSOLE_F_SIZE: u32 = 0;
/// `VIRTIO_CONSOLE_F_MULTIPORT`: never offered (needs control queues).
pub const VIRTIO_CONSOLE_F_MULTIPORT: u32 = 1;
/// `VIRTIO_CONSOLE_F_EMERG_WRITE`: the driver may write single bytes to `emerg_wr`.
pub const VIRTIO_CONSOLE_F_EMERG_WRITE: u32 = 2;

/// Queue index of the receive queue (host to guest).
pub const RX_QUEUE: usize = 0;
/// Queue index of the transmit queue (guest to host).
pub const TX_QUEUE: usize = 1;
const NUM_QUEUES: usize = 2;
const MAX_QUEUE_SIZE: usize = 1024;

/// Size of the device config: cols u16, rows u16, max_nr_ports u32, emerg_wr u32.
pub const CONFIG_SIZE: usize = 12;
const EMERG_WR_OFFSET: u32 = 8;

/// Guest output is copied out of a chain in pieces of this size.
const TX_PIECE: usize = 64 << 10;
/// Used entries returned before the guest is interrupted mid-batch.
const TX_SIGNAL_BATCH: usize = 64;

/// The backend of one frontend connection.
pub(crate) struct ConsoleBackend {
    shared: Arc<Shared>,
    mem: GuestMemory,
    event_idx: Arc<AtomicBool>,
    acked: AtomicU64,
    generation: u64,
    /// The DEVICE_STATE transfer under way (CHECK_DEVICE_STATE waits for it).
    transfer: Mutex<Option<JoinHandle<io::Result<()>>>>,
}

impl ConsoleBackend {
    pub fn new(shared: Arc<Shared>, mem: GuestMemory) -> Self {
        let generation = shared.generation.fetch_add(1, Ordering::AcqRel) + 1;
        // A new connection: the previous one's ring is gone.
        shared.lock().rx = None;
        ConsoleBackend {
            shared,
            mem,
            event_idx: Arc::new(AtomicBool::new(false)),
            acked: AtomicU64::new(0),
            generation,
            transfer: Mutex::new(None),
        }
    }

    /// The config space as the guest sees it now.
    fn config(&self) -> [u8; CONFIG_SIZE] {
        let (cols, rows) = self.shared.size();
        let mut c = [0u8; CONFIG_SIZE];
        c[0..2].copy_from_slice(&cols.to_le_bytes());
        c[2..4].copy_from_slice(&rows.to_le_bytes());
        c[4..8].copy_from_slice(&1u32.to_le_bytes());
        c
    }

    pub(crate) fn process_rx(&self, vring: &Vring) {
        let mut st = self.shared.lock();
        let stale = st
            .rx
            .as_ref()
            .is_none_or(|r| r.generation != self.generation);
        if stale {
            st.rx = Some(RxRing {
                vring: vring.clone(),
                mem: self.mem.clone(),
                event_idx: self.event_idx.clone(),
                generation: self.generation,
            });
        }
        if self.shared.deliver_input(&mut st) > 0 {
            drop(st);
            // Room in the input buffer again: the I/O thread may read more.
            self.shared.wake_io();
        }
    }

    pub(crate) fn process_tx(&self, vring: &Vring) {
        let mem = self.mem.memory();
        let event_idx = self.event_idx.load(Ordering::Acquire);
        let mut st = vring.get_mut();
        let mut piece = vec![0u8; TX_PIECE];
        let drain = Drain::new("tx", event_idx).signal_every(TX_SIGNAL_BATCH);
        drain.run(&mut st, &mem, |chain| {
            let head = chain.head_index();
            match chain.reader(&mem) {
                Ok(mut r) => loop {
                    match r.read(&mut piece) {
                        Ok(0) => break,
                        Ok(n) => self.shared.push_output(&piece[..n]),
                        Err(e) => {
                            guest_error(format_args!("tx chain {head}: {e}"));
                            break;
                        }
                    }
                },
                Err(e) => guest_error(format_args!("tx chain {head}: {e}")),
            }
            Handled::Used(0)
        });
    }
}

impl Drop for ConsoleBackend {
    fn drop(&mut self) {
        // Release the guest memory mapping held through the receive ring.
        let mut st = self.shared.lock();
        if st
            .rx
            .as_ref()
            .is_some_and(|r| r.generation == self.generation)
        {
            st.rx = None;
        }
    }
}

impl VhostUserBackend for ConsoleBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        let mut f = 1u64 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_CONSOLE_F_EMERG_WRITE
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.shared.has_size {
            f |= 1 << VIRTIO_CONSOLE_F_SIZE;
        }
        f
    }

    fn acked_features(&self, features: u64) {
        self.acked.store(features, Ordering::Release);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // DEVICE_STATE: output the reader has not taken and input the guest has not.
        backend_defaults::PROTOCOL_FEATURES | VhostUserProtocolFeatures::DEVICE_STATE
    }

    fn set_device_state_fd(
        &self,
        direction: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
        file: File,
    ) -> io::Result<Option<File>> {
        if phase != VhostTransferStatePhase::STOPPED {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "state is transferred only with the rings stopped",
            ));
        }
        let mut slot = self.transfer.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::ResourceBusy,
                "a state transfer is already under way",
            ));
        }
        let shared = Arc::clone(&self.shared);
        let save = direction == VhostTransferStateDirection::SAVE;
        // The frontend reads or writes the pipe only after this answer: the transfer runs on
        // a thread of its own.
        let handle = std::thread::Builder::new()
            .name("console-state".into())
            .spawn(move || {
                let mut file = file;
                if save {
                    io::Write::write_all(&mut file, &shared.save_state())
                } else {
                    let limit = shared.max_state() as u64 + 1;
                    let mut state = Vec::new();
                    (&mut file).take(limit).read_to_end(&mut state)?;
                    shared.load_state(&state)
                }
            })?;
        *slot = Some(handle);
        Ok(None)
    }

    fn check_device_state(&self) -> io::Result<()> {
        let handle = self
            .transfer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let Some(handle) = handle else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "no state transfer to check",
            ));
        };
        match handle.join() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                warn!("device state transfer failed: {e}");
                Err(e)
            }
            Err(_) => Err(io::Error::other("the state transfer thread panicked")),
        }
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let config = self.config();
        // Exactly `size` bytes; anything past the config space reads as zero.
        (0..size)
            .map(|i| {
                offset
                    .checked_add(i)
                    .and_then(|o| config.get(o as usize).copied())
                    .unwrap_or(0)
            })
            .collect()
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        let emerg = self.acked.load(Ordering::Acquire) & (1 << VIRTIO_CONSOLE_F_EMERG_WRITE) != 0;
        if emerg && offset == EMERG_WR_OFFSET && (1..=4).contains(&buf.len()) {
            // The low byte of emerg_wr is one character of output.
            self.shared.push_output(&buf[..1]);
            return Ok(());
        }
        // Refusing would end the whole vhost-user connection: ignore the write instead.
        guest_error(format_args!(
            "config write of {} bytes at {offset} ignored (only emerg_wr is writable)",
            buf.len()
        ));
        Ok(())
    }

    fn update_memory(&self, mem: GuestMemory) -> io::Result<()> {
        // The daemon has installed it in the GuestMemoryAtomic we were built with: check it
        // before any ring touches it.
        hype_daemon::accept_guest_memory(&mem)
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // Receive and transmit on their own threads: a slow reader holding back guest output
        // never delays input.
        vec![1 << RX_QUEUE, 1 << TX_QUEUE]
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        backend_defaults::exit_event()
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        // One queue per thread (see `queues_per_thread`): the thread id is the queue index,
        // and the event, numbered within the thread, is always 0.
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            warn!("unexpected event {device_event} on thread {thread_id}");
            return Ok(());
        };
        match thread_id {
            RX_QUEUE => self.process_rx(vring),
            TX_QUEUE => self.process_tx(vring),
            other => warn!("unexpected worker thread {other}"),
        }
        Ok(())
    }
}
