//! A tiny vhost-user backend for testing the driver: echo, reverse-order echo, black hole,
//! and a small RAM disk speaking virtio-blk. One new daemon per connection.

#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackendMut, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::virtio_blk as vb;
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// What the backend does with each chain.
#[derive(Clone, Debug)]
pub enum Mode {
    /// Copy all readable bytes into the writable buffers; used len = bytes written.
    Echo,
    /// Echo, but complete each batch of popped chains in reverse order.
    Reverse,
    /// Pop chains and never complete them.
    Blackhole,
    /// virtio-blk over a shared RAM disk (survives reconnects).
    Blk(Arc<Mutex<Vec<u8>>>),
}

/// What the backend saw (shared across connections of one server).
#[derive(Default, Debug)]
pub struct Seen {
    /// Chains popped.
    pub chains: AtomicUsize,
    /// Features acked with SET_FEATURES (last connection).
    pub acked_features: AtomicU64,
    /// Connections served.
    pub connections: AtomicUsize,
}

pub const NUM_QUEUES: usize = 4;
pub const EVENT_IDX: u64 = 1 << 29;
pub const INDIRECT: u64 = 1 << 28;
pub const VERSION_1: u64 = 1 << 32;
pub const BLK_FEATURES: u64 =
    (1 << vb::VIRTIO_BLK_F_FLUSH) | (1 << vb::VIRTIO_BLK_F_MQ) | (1 << vb::VIRTIO_BLK_F_SEG_MAX);
/// A feature no driver may ack: packed rings.
pub const RING_PACKED: u64 = 1 << 34;

struct TestBackend {
    mode: Mode,
    mem: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
    event_idx: bool,
    seen: Arc<Seen>,
}

impl TestBackend {
    fn process(&self, vring: &VringRwLock) -> io::Result<()> {
        let Some(atomic) = self.mem.as_ref() else {
            return Ok(());
        };
        let mem = atomic.memory();
        let mut st = vring.get_mut();
        let mut any = false;
        loop {
            if self.event_idx {
                st.disable_notification().map_err(io::Error::other)?;
            }
            let mut batch = Vec::new();
            while let Some(chain) = st.get_queue_mut().pop_descriptor_chain(mem.clone()) {
                self.seen.chains.fetch_add(1, Ordering::SeqCst);
                let head = chain.head_index();
                let len = match &self.mode {
                    Mode::Blackhole => continue,
                    Mode::Echo | Mode::Reverse => echo(chain, &mem).unwrap_or(0),
                    Mode::Blk(disk) => blk(chain, &mem, disk).unwrap_or(0),
                };
                batch.push((head, len));
            }
            if matches!(self.mode, Mode::Reverse) {
                batch.reverse();
            }
            for (head, len) in batch {
                st.add_used(head, len).map_err(io::Error::other)?;
                any = true;
            }
            if !self.event_idx || !st.enable_notification().map_err(io::Error::other)? {
                break;
            }
        }
        if any && (!self.event_idx || st.needs_notification().map_err(io::Error::other)?) {
            st.signal_used_queue()?;
        }
        Ok(())
    }
}

type Chain = virtio_queue::DescriptorChain<vm_memory::GuestMemoryLoadGuard<GuestMemoryMmap>>;

fn echo(chain: Chain, mem: &GuestMemoryMmap) -> Option<u32> {
    let mut input = Vec::new();
    chain
        .clone()
        .reader(mem)
        .ok()?
        .read_to_end(&mut input)
        .ok()?;
    let mut w = chain.writer(mem).ok()?;
    let n = input.len().min(w.available_bytes());
    w.write_all(&input[..n]).ok()?;
    Some(n as u32)
}

fn blk(chain: Chain, mem: &GuestMemoryMmap, disk: &Mutex<Vec<u8>>) -> Option<u32> {
    let mut r = chain.clone().reader(mem).ok()?;
    let mut w = chain.writer(mem).ok()?;
    let mut hdr = [0u8; 16];
    r.read_exact(&mut hdr).ok()?;
    let kind = u32::from_le_bytes(hdr[0..4].try_into().ok()?);
    let sector = u64::from_le_bytes(hdr[8..16].try_into().ok()?);
    let data_len = w.available_bytes().checked_sub(1)?;
    let mut disk = disk.lock().ok()?;
    let off = usize::try_from(sector).ok()?.checked_mul(512)?;
    let status = match kind {
        vb::VIRTIO_BLK_T_IN => match disk.get(off..off.checked_add(data_len)?) {
            Some(src) => {
                w.write_all(src).ok()?;
                vb::VIRTIO_BLK_S_OK
            }
            None => {
                w.write_all(&vec![0; data_len]).ok()?;
                vb::VIRTIO_BLK_S_IOERR
            }
        },
        vb::VIRTIO_BLK_T_OUT => {
            let mut data = Vec::new();
            r.read_to_end(&mut data).ok()?;
            match disk.get_mut(off..off.checked_add(data.len())?) {
                Some(dst) => {
                    dst.copy_from_slice(&data);
                    vb::VIRTIO_BLK_S_OK
                }
                None => vb::VIRTIO_BLK_S_IOERR,
            }
        }
        vb::VIRTIO_BLK_T_FLUSH => vb::VIRTIO_BLK_S_OK,
        vb::VIRTIO_BLK_T_GET_ID => {
            let mut id = [0u8; 20];
            id[..13].copy_from_slice(b"hype-test-blk");
            w.write_all(&id[..data_len.min(20)]).ok()?;
            vb::VIRTIO_BLK_S_OK
        }
        _ => {
            w.write_all(&vec![0; data_len]).ok()?;
            vb::VIRTIO_BLK_S_UNSUPP
        }
    };
    w.write_all(&[status as u8]).ok()?;
    Some(w.bytes_written() as u32)
}

impl VhostUserBackendMut for TestBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        1024
    }

    fn features(&self) -> u64 {
        let dev = if matches!(self.mode, Mode::Blk(_)) {
            BLK_FEATURES
        } else {
            0
        };
        VERSION_1
            | EVENT_IDX
            | INDIRECT
            | RING_PACKED
            | dev
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&mut self, features: u64) {
        self.seen.acked_features.store(features, Ordering::SeqCst);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
    }

    fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut cfg = vec![0u8; 256];
        match &self.mode {
            Mode::Blk(disk) => {
                let sectors = disk.lock().map(|d| d.len() as u64 / 512).unwrap_or(0);
                cfg[0..8].copy_from_slice(&sectors.to_le_bytes());
                cfg[12..16].copy_from_slice(&64u32.to_le_bytes());
                cfg[34..36].copy_from_slice(&(NUM_QUEUES as u16).to_le_bytes());
            }
            _ => {
                for (i, b) in cfg.iter_mut().enumerate() {
                    *b = i as u8;
                }
            }
        }
        let start = (offset as usize).min(cfg.len());
        let end = (start + size as usize).min(cfg.len());
        let mut out = cfg[start..end].to_vec();
        out.resize(size as usize, 0);
        out
    }

    fn update_memory(&mut self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        self.mem = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        match vrings.get(usize::from(device_event)) {
            Some(v) => self.process(v),
            // The "ring enabled" pseudo event: look at every ring.
            None => vrings.iter().try_for_each(|v| self.process(v)),
        }
    }
}

/// A backend server thread: serves one connection per entry of `modes`, in order.
pub struct Server {
    pub path: PathBuf,
    pub seen: Arc<Seen>,
    pub thread: JoinHandle<()>,
}

/// A fresh socket path in a per-test temp directory.
pub fn socket_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hype-testkit-{}-{name}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let p = dir.join("sock");
    let _ = std::fs::remove_file(&p);
    p
}

pub fn serve(path: &Path, modes: Vec<Mode>) -> Server {
    serve_after(path, modes, Duration::ZERO)
}

/// Like [`serve`] but only starts listening after `delay`.
pub fn serve_after(path: &Path, modes: Vec<Mode>, delay: Duration) -> Server {
    let seen = Arc::new(Seen::default());
    let seen2 = seen.clone();
    let p = path.to_path_buf();
    let thread = std::thread::spawn(move || {
        std::thread::sleep(delay);
        for mode in modes {
            let backend = Arc::new(RwLock::new(TestBackend {
                mode,
                mem: None,
                event_idx: false,
                seen: seen2.clone(),
            }));
            let mut daemon = VhostUserDaemon::new(
                "testkit-test-backend".to_string(),
                backend,
                GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            )
            .expect("daemon");
            seen2.connections.fetch_add(1, Ordering::SeqCst);
            if let Err(e) = daemon.serve(&p) {
                eprintln!("test backend: serve ended with {e}");
            }
        }
    });
    Server {
        path: path.to_path_buf(),
        seen,
        thread,
    }
}

/// Polls `cond` every millisecond until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    cond()
}
