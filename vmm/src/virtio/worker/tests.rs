//! Unit tests of the device worker's state machine against a mock backend link: no KVM, no
//! backend process. The guest side is played through the real register file.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserInflight, VhostUserProtocolFeatures};
use vhost::VhostUserMemoryRegionInfo;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::memory::create_guest_memory;
use crate::virtio::mmio::{reg, status, DeviceModel, TransportEvent};

/// Features of a hype-block backend: VERSION_1, EVENT_IDX, INDIRECT, bit 30, SEG_MAX,
/// BLK_SIZE, FLUSH, CONFIG_WCE.
const BLK: u64 = 1 << 32 | 1 << 29 | 1 << 28 | 1 << 30 | 1 << 2 | 1 << 6 | 1 << 9 | 1 << 11;
/// What the guest acks: VERSION_1, FLUSH, CONFIG_WCE.
const GUEST: u64 = 1 << 32 | 1 << 9 | 1 << 11;
/// Where the guest puts queue 0 (descriptors; avail and used follow at 4 KiB steps).
const RING: u64 = 0x10_0000;
const USED: u64 = RING + 0x2000;

/// What a mock link was asked to do (link number, call).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Call {
    GetInflight,
    /// Acked features, (queue, base) per ring, whether an inflight area was passed.
    Start(u64, Vec<(u16, u16)>, bool),
    Stop(Vec<u16>),
    SetConfig(u32, Vec<u8>),
}

type Calls = Arc<Mutex<Vec<(usize, Call)>>>;

/// How a mock request fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fail {
    /// The backend went away (a disconnect).
    Gone,
    /// The backend refused the request.
    Refused,
}

impl Fail {
    fn error(self, op: &'static str) -> FrontendError {
        use vhost::vhost_user::Error as E;
        let e = match self {
            Fail::Gone => E::Disconnected,
            Fail::Refused => E::InvalidParam,
        };
        FrontendError::Request {
            path: "mock.sock".into(),
            op,
            source: vhost::Error::VhostUserProtocol(e),
        }
    }
}

struct MockLink {
    id: usize,
    info: BackendInfo,
    /// What GET_CONFIG answers when set (a backend whose disk grew).
    config_now: Arc<Mutex<Option<Vec<u8>>>>,
    calls: Calls,
    inflight: bool,
    fail_start: Option<Fail>,
    fail_stop: Option<Fail>,
}

impl MockLink {
    fn log(&self, c: Call) {
        self.calls.lock().unwrap().push((self.id, c));
    }
}

impl BackendLink for MockLink {
    fn info(&self) -> &BackendInfo {
        &self.info
    }
    fn watch_fd(&self) -> Option<RawFd> {
        None
    }
    fn backend_request_fd(&self) -> Option<RawFd> {
        None
    }
    fn cutter(&self) -> Option<UnixStream> {
        None
    }
    fn handle_backend_request(&mut self) -> bool {
        false
    }
    fn read_config(&mut self, _offset: u32, _size: u32) -> Result<Vec<u8>, FrontendError> {
        let now = self.config_now.lock().unwrap().clone();
        Ok(now.unwrap_or_else(|| self.info.config.clone()))
    }
    fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<(), FrontendError> {
        self.log(Call::SetConfig(offset, data.to_vec()));
        Ok(())
    }
    fn get_inflight(
        &mut self,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Option<InflightArea>, FrontendError> {
        self.log(Call::GetInflight);
        if !self.inflight {
            return Ok(None);
        }
        Ok(Some(InflightArea {
            info: VhostUserInflight::new(4096, 0, num_queues, queue_size),
            file: File::open("/dev/null").unwrap(),
        }))
    }
    fn start(
        &mut self,
        regions: &[VhostUserMemoryRegionInfo],
        acked_features: u64,
        inflight: Option<&InflightArea>,
        rings: &[Ring<'_>],
    ) -> Result<(), FrontendError> {
        assert!(!regions.is_empty(), "guest RAM is described");
        let bases = rings.iter().map(|r| (r.index, r.base)).collect();
        self.log(Call::Start(acked_features, bases, inflight.is_some()));
        match self.fail_start.take() {
            Some(f) => Err(f.error("SET_FEATURES")),
            None => Ok(()),
        }
    }
    fn stop(&mut self, queues: &[u16]) -> Result<Vec<u32>, FrontendError> {
        self.log(Call::Stop(queues.to_vec()));
        match self.fail_stop.take() {
            Some(f) => Err(f.error("GET_VRING_BASE")),
            None => Ok(vec![0; queues.len()]),
        }
    }
    fn load_state(&mut self, _state: &[u8]) -> Result<(), FrontendError> {
        Err(Fail::Refused.error("SET_DEVICE_STATE_FD"))
    }
}

/// What the next reconnect attempt finds.
enum Outcome {
    /// Nothing listens.
    Absent,
    /// The socket path is unusable.
    BadPath,
    /// Something listens but fails the handshake.
    NotVhostUser,
    /// A backend.
    Link(MockLink),
}

struct MockConnector {
    next: Arc<Mutex<VecDeque<Outcome>>>,
    path: PathBuf,
}

impl Connector for MockConnector {
    type Link = MockLink;
    fn retarget(&mut self, path: &std::path::Path) -> Option<PathBuf> {
        Some(std::mem::replace(&mut self.path, path.to_owned()))
    }
    fn connect(&mut self, _kind: DeviceType) -> Result<Option<MockLink>, FrontendError> {
        match self.next.lock().unwrap().pop_front() {
            None | Some(Outcome::Absent) => Ok(None),
            Some(Outcome::BadPath) => Err(FrontendError::Connect {
                path: "mock.sock".into(),
                source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
            }),
            Some(Outcome::NotVhostUser) => Err(FrontendError::NotVhostUser {
                path: "mock.sock".into(),
                op: "SET_OWNER",
                source: vhost::Error::VhostUserProtocol(vhost::vhost_user::Error::Disconnected),
            }),
            Some(Outcome::Link(l)) => Ok(Some(l)),
        }
    }
}

struct Harness {
    worker: Worker<MockConnector>,
    shared: Arc<Shared>,
    calls: Calls,
    next: Arc<Mutex<VecDeque<Outcome>>>,
    links: usize,
    config_now: Arc<Mutex<Option<Vec<u8>>>>,
    _commands: mpsc::Sender<Command>,
}

fn blk_config(capacity: u64) -> Vec<u8> {
    let mut c = vec![0u8; 60];
    c[0..8].copy_from_slice(&capacity.to_le_bytes());
    c[20..24].copy_from_slice(&512u32.to_le_bytes());
    c
}

fn info(features: u64, capacity: u64) -> BackendInfo {
    BackendInfo {
        features,
        offered_protocol_features: VhostUserProtocolFeatures::CONFIG,
        protocol_features: VhostUserProtocolFeatures::CONFIG,
        queue_num: None,
        config: blk_config(capacity),
    }
}

impl Harness {
    fn new(reconnect: WaitLimit) -> Harness {
        let calls = Calls::default();
        let next = Arc::new(Mutex::new(VecDeque::new()));
        let model = DeviceModel {
            device_id: DeviceType::Block.virtio_id(),
            features: BLK & mmio::TRANSPORT_FEATURES,
            num_queues: 1,
            queue_max: 256,
            config: blk_config(2048),
            writable_config: DeviceType::Block.writable_config(),
            vring_interrupt_always: true,
        };
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let shared = Arc::new(Shared::new(
            "test-blk",
            MmioTransport::new(model),
            irq,
            None,
        ));
        let (tx, rx) = mpsc::channel();
        let fixed = WorkerSetup {
            socket: "mock.sock".into(),
            kind: DeviceType::Block,
            reconnect,
            mem: create_guest_memory(64 << 20).unwrap(),
            events: DeviceEvents::new(1).unwrap(),
            commands: rx,
            wake: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        };
        let config_now = Arc::new(Mutex::new(None));
        let h = Harness {
            worker: Worker::new(
                shared.clone(),
                MockConnector {
                    next: next.clone(),
                    path: "mock.sock".into(),
                },
                fixed,
                MockLink {
                    id: 0,
                    info: info(BLK, 2048),
                    config_now: config_now.clone(),
                    calls: calls.clone(),
                    inflight: true,
                    fail_start: None,
                    fail_stop: None,
                },
            ),
            shared,
            calls,
            next,
            links: 1,
            config_now,
            _commands: tx,
        };
        h.calls.lock().unwrap().clear();
        h
    }

    /// A fresh mock backend with hype-block's features.
    fn backend(&mut self) -> MockLink {
        self.backend_with(BLK, 2048)
    }

    fn backend_with(&mut self, features: u64, capacity: u64) -> MockLink {
        self.links += 1;
        MockLink {
            id: self.links - 1,
            info: info(features, capacity),
            config_now: Arc::new(Mutex::new(None)),
            calls: self.calls.clone(),
            inflight: true,
            fail_start: None,
            fail_stop: None,
        }
    }

    fn will_find(&self, o: Outcome) {
        self.next.lock().unwrap().push_back(o);
    }

    fn take_calls(&self) -> Vec<(usize, Call)> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }

    fn state(&self) -> BackendState {
        self.shared.backend_status().state
    }

    fn w(&self, off: u64, v: u32) -> Option<TransportEvent> {
        self.shared.transport().write(off, &v.to_le_bytes())
    }

    /// Plays the guest driver up to DRIVER_OK and hands the worker what the vCPU would.
    fn guest_sets_up(&mut self) {
        let s = status::ACKNOWLEDGE | status::DRIVER;
        self.guest_resets();
        self.w(reg::STATUS, status::ACKNOWLEDGE);
        self.w(reg::STATUS, s);
        self.w(reg::DRIVER_FEATURES_SEL, 0);
        self.w(reg::DRIVER_FEATURES, GUEST as u32);
        self.w(reg::DRIVER_FEATURES_SEL, 1);
        self.w(reg::DRIVER_FEATURES, (GUEST >> 32) as u32);
        self.w(reg::STATUS, s | status::FEATURES_OK);
        self.w(reg::QUEUE_SEL, 0);
        self.w(reg::QUEUE_NUM, 16);
        self.w(reg::QUEUE_DESC_LOW, RING as u32);
        self.w(reg::QUEUE_DESC_HIGH, 0);
        self.w(reg::QUEUE_DRIVER_LOW, (RING + 0x1000) as u32);
        self.w(reg::QUEUE_DRIVER_HIGH, 0);
        self.w(reg::QUEUE_DEVICE_LOW, USED as u32);
        self.w(reg::QUEUE_DEVICE_HIGH, 0);
        self.w(reg::QUEUE_READY, 1);
        let ev = self.w(reg::STATUS, s | status::FEATURES_OK | status::DRIVER_OK);
        let Some(TransportEvent::Activate(a)) = ev else {
            panic!("no activation: {ev:?}");
        };
        self.worker.handle(Command::Activate(a));
    }

    /// The guest writes 0 to Status; the worker gets a reset if the transport asks for one.
    fn guest_resets(&mut self) {
        if let Some(ev) = self.w(reg::STATUS, 0) {
            assert_eq!(ev, TransportEvent::Reset);
            self.worker.handle(Command::Reset);
        }
    }

    /// The guest's writeback byte, a sticky config write.
    fn guest_writes_wce(&mut self, v: u8) {
        let ev = self.shared.transport().write(reg::CONFIG + 32, &[v]);
        let Some(TransportEvent::ConfigWrite { offset, data }) = ev else {
            panic!("no config write: {ev:?}");
        };
        self.worker.handle(Command::ConfigWrite { offset, data });
    }

    fn needs_reset(&self) -> bool {
        self.shared.transport().status() & status::DEVICE_NEEDS_RESET != 0
    }

    fn reconnects(&self) -> u64 {
        self.shared.backend_status().reconnects
    }
}

fn running() -> BackendState {
    BackendState::Connected { running: true }
}

fn idle() -> BackendState {
    BackendState::Connected { running: false }
}

fn attempts(h: &Harness) -> Option<u64> {
    match h.state() {
        BackendState::Reconnecting { attempts, .. } => Some(attempts),
        _ => None,
    }
}

#[test]
fn activation_starts_the_rings_at_zero_with_an_inflight_area() {
    let mut h = Harness::new(WaitLimit::Forever);
    assert_eq!(h.state(), idle());
    assert!(h.shared.stats.connected.load(Ordering::Acquire));
    h.guest_sets_up();
    assert_eq!(
        h.take_calls(),
        vec![
            (0, Call::GetInflight),
            (0, Call::Start(GUEST, vec![(0, 0)], true)),
        ]
    );
    assert_eq!(h.state(), running());
    let st = h.shared.backend_status();
    assert_eq!((st.reconnects, st.ring_starts), (0, 1));
}

#[test]
fn lost_then_reconnect_replays_from_the_used_index_then_gives_up() {
    let mut h = Harness::new(WaitLimit::For(Duration::from_millis(200)));
    h.guest_sets_up();
    h.guest_writes_wce(1);
    h.take_calls();
    // The guest's driver completed 7 requests on the old backend.
    h.worker
        .fixed
        .mem
        .write_obj(7u16, GuestAddress(USED + 2))
        .unwrap();

    h.worker.lost("test: hang-up");
    assert_eq!(attempts(&h), Some(0));
    assert!(!h.shared.stats.connected.load(Ordering::Acquire));
    // A second loss report for the same loss changes nothing.
    h.worker.lost("test: again");
    assert_eq!(attempts(&h), Some(0));

    // Nothing there, then a bad path, then something that is not vhost-user: still lost.
    h.will_find(Outcome::Absent);
    h.will_find(Outcome::BadPath);
    h.will_find(Outcome::NotVhostUser);
    for n in 1..=3 {
        h.worker.try_reconnect();
        assert_eq!(attempts(&h), Some(n));
    }
    assert_eq!(h.take_calls(), vec![]);

    // The backend is back: the sticky config write is replayed, then the rings resume at
    // used.idx with the inflight area kept from the first backend, and every ring is kicked.
    let kick = h.worker.fixed.events.kicks[0].try_clone().unwrap();
    let _ = kick.read();
    let b = h.backend();
    h.will_find(Outcome::Link(b));
    h.worker.try_reconnect();
    assert_eq!(
        h.take_calls(),
        vec![
            (1, Call::SetConfig(32, vec![1])),
            (1, Call::Start(GUEST, vec![(0, 7)], true)),
        ]
    );
    assert_eq!(kick.read().unwrap(), 1, "replayed ring kicked");
    assert_eq!(h.state(), running());
    assert_eq!(h.reconnects(), 1);
    assert!(h.shared.stats.connected.load(Ordering::Acquire));

    // Lost again, and not back within the limit: give up, DEVICE_NEEDS_RESET.
    h.worker.lost("test: hang-up");
    h.worker.try_reconnect();
    assert!(attempts(&h).is_some());
    assert!(!h.needs_reset());
    std::thread::sleep(Duration::from_millis(250));
    h.worker.try_reconnect();
    assert!(
        matches!(h.state(), BackendState::GaveUp { after, .. } if after == Duration::from_millis(200)),
        "{:?}",
        h.state()
    );
    assert!(h.needs_reset());
    // Given up: no more attempts, even if a backend is there now.
    let b = h.backend();
    h.will_find(Outcome::Link(b));
    h.worker.try_reconnect();
    assert!(matches!(h.state(), BackendState::GaveUp { .. }));
    assert_eq!(h.reconnects(), 1);

    // The guest resets and sets the device up again: hype tries again and finds the backend.
    h.guest_sets_up();
    assert_eq!(attempts(&h), Some(0));
    h.worker.try_reconnect();
    assert_eq!(h.state(), running());
    assert_eq!(h.reconnects(), 2);
    // A fresh setup: no config write to replay, a new inflight area, used.idx 7 replayed.
    assert_eq!(
        h.take_calls(),
        vec![
            (2, Call::GetInflight),
            (2, Call::Start(GUEST, vec![(0, 7)], true)),
        ]
    );
}

#[test]
fn a_backend_that_comes_back_as_something_else_is_refused() {
    let mut h = Harness::new(WaitLimit::Forever);
    h.guest_sets_up();
    h.worker.lost("test");
    h.take_calls();
    // A net device on the same socket.
    let net = h.backend_with(1 << 32 | 1 << 30 | 1 << 5 | 1 << 16, 2048);
    h.will_find(Outcome::Link(net));
    h.worker.try_reconnect();
    assert!(attempts(&h).is_some(), "{:?}", h.state());
    // A blk device without CONFIG_WCE, which the guest acked.
    let lesser = h.backend_with(BLK & !(1 << 11), 2048);
    h.will_find(Outcome::Link(lesser));
    h.worker.try_reconnect();
    assert!(attempts(&h).is_some(), "{:?}", h.state());
    assert_eq!(h.take_calls(), vec![]);
    assert_eq!(h.reconnects(), 0);
    // A bigger disk is accepted, and the guest is told (config generation and interrupt).
    let gen = |h: &Harness| {
        let mut b = [0u8; 4];
        h.shared.transport().read(reg::CONFIG_GENERATION, &mut b);
        u32::from_le_bytes(b)
    };
    let before = gen(&h);
    let bigger = h.backend_with(BLK, 4096);
    h.will_find(Outcome::Link(bigger));
    h.worker.try_reconnect();
    assert_eq!(h.state(), running());
    assert_ne!(gen(&h), before);
    assert_eq!(&h.shared.transport().config()[0..8], &4096u64.to_le_bytes());
}

#[test]
fn a_start_that_loses_the_backend_reconnects_and_a_refused_start_needs_reset() {
    let mut h = Harness::new(WaitLimit::Forever);
    h.guest_sets_up();
    h.worker.lost("test");
    let mut gone = h.backend();
    gone.fail_start = Some(Fail::Gone);
    h.will_find(Outcome::Link(gone));
    h.worker.try_reconnect();
    // Connected, then lost again while starting the rings.
    assert_eq!(attempts(&h), Some(0));
    assert_eq!(h.reconnects(), 1);
    let mut refusing = h.backend();
    refusing.fail_start = Some(Fail::Refused);
    h.will_find(Outcome::Link(refusing));
    h.worker.try_reconnect();
    // A backend that refuses the setup: connected, rings not running, the guest must reset.
    assert_eq!(h.state(), idle());
    assert!(h.needs_reset());
    // The setup is forgotten: a reset sends nothing.
    h.take_calls();
    h.guest_resets();
    assert_eq!(h.take_calls(), vec![]);
}

#[test]
fn reset_while_running_stops_the_rings() {
    let mut h = Harness::new(WaitLimit::Forever);
    h.guest_sets_up();
    h.guest_writes_wce(1);
    h.take_calls();
    h.guest_resets();
    assert_eq!(h.take_calls(), vec![(0, Call::Stop(vec![0]))]);
    assert_eq!(h.state(), idle());
    // A reset with nothing set up sends nothing; a new setup gets a new inflight area.
    h.worker.handle(Command::Reset);
    assert_eq!(h.take_calls(), vec![]);
    h.guest_sets_up();
    assert_eq!(
        h.take_calls(),
        vec![
            (0, Call::GetInflight),
            (0, Call::Start(GUEST, vec![(0, 0)], true)),
        ]
    );
}

#[test]
fn reset_when_stopping_loses_the_backend_goes_reconnecting() {
    let mut h = Harness::new(WaitLimit::Forever);
    h.guest_sets_up();
    h.take_calls();
    if let LinkState::Connected { link, .. } = &mut h.worker.link {
        link.fail_stop = Some(Fail::Gone);
    }
    h.guest_resets();
    assert_eq!(h.take_calls(), vec![(0, Call::Stop(vec![0]))]);
    assert_eq!(attempts(&h), Some(0));
    // The backend comes back: nothing to replay after the reset.
    let b = h.backend();
    h.will_find(Outcome::Link(b));
    h.worker.try_reconnect();
    assert_eq!(h.state(), idle());
    assert_eq!(h.take_calls(), vec![]);
}

#[test]
fn reset_while_lost_forgets_the_setup_and_the_config_writes() {
    let mut h = Harness::new(WaitLimit::Forever);
    h.guest_sets_up();
    h.guest_writes_wce(1);
    h.worker.lost("test");
    h.take_calls();
    h.guest_resets();
    // Nothing is sent to a lost backend; it stays lost.
    assert_eq!(h.take_calls(), vec![]);
    assert_eq!(attempts(&h), Some(0));
    // A config write while lost is counted as failed (and is state, so it would be replayed,
    // but the guest resets again before the backend is back).
    h.guest_sets_up();
    let failed = h.shared.stats.config_writes_failed.load(Ordering::Relaxed);
    h.guest_writes_wce(0);
    assert_eq!(
        h.shared.stats.config_writes_failed.load(Ordering::Relaxed),
        failed + 1
    );
    h.guest_resets();
    let b = h.backend();
    h.will_find(Outcome::Link(b));
    h.worker.try_reconnect();
    // Back with no setup and nothing to replay: connected, idle.
    assert_eq!(h.state(), idle());
    assert_eq!(h.take_calls(), vec![]);
    assert_eq!(h.reconnects(), 1);
}

#[test]
fn reset_after_giving_up_keeps_given_up_until_a_new_setup() {
    let mut h = Harness::new(WaitLimit::For(Duration::ZERO));
    h.guest_sets_up();
    h.worker.lost("test");
    h.worker.try_reconnect();
    assert!(matches!(h.state(), BackendState::GaveUp { .. }));
    h.take_calls();
    h.guest_resets();
    assert!(matches!(h.state(), BackendState::GaveUp { .. }));
    assert_eq!(h.take_calls(), vec![]);
    // The new setup retries at once; with a zero limit the next attempt gives up again.
    h.guest_sets_up();
    assert_eq!(attempts(&h), Some(0));
    h.worker.try_reconnect();
    assert!(matches!(h.state(), BackendState::GaveUp { .. }));
}

#[test]
fn a_lost_backend_during_shutdown_is_not_reconnected() {
    let mut h = Harness::new(WaitLimit::Forever);
    h.guest_sets_up();
    h.shared.stopping.store(true, Ordering::Release);
    h.worker.lost("the VMM cut it");
    assert_eq!(h.state(), running());
}

/// A logger that keeps every line, for tests of what the worker logs (installed once per test
/// binary; lines of tests running alongside are kept too, so tests filter by their own text).
mod capture {
    use std::sync::Mutex;

    static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

    struct Capture;

    impl log::Log for Capture {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }
        fn log(&self, r: &log::Record<'_>) {
            LINES
                .lock()
                .unwrap()
                .push(format!("{} {}", r.level(), r.args()));
        }
        fn flush(&self) {}
    }

    static LOGGER: Capture = Capture;

    /// Installs the logger (if no other was) at debug level.
    pub(super) fn install() -> bool {
        let ok = log::set_logger(&LOGGER).is_ok();
        log::set_max_level(log::LevelFilter::Debug);
        ok
    }

    /// Lines logged so far that contain `needle`.
    pub(super) fn count(needle: &str) -> usize {
        LINES
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }
}

#[test]
fn a_flapping_backend_or_endless_attempts_cannot_flood_the_log() {
    if !capture::install() {
        eprintln!("another logger is installed; skipped");
        return;
    }
    let mut h = Harness::new(WaitLimit::Forever);
    h.guest_sets_up();
    // A backend that dies right after every reconnect, 1,000 times.
    for _ in 0..1000 {
        h.worker.lost("flap-test");
        let b = h.backend();
        h.will_find(Outcome::Link(b));
        h.worker.try_reconnect();
    }
    assert_eq!(h.reconnects(), 1000);
    // Then 1,000 attempts (one per RECONNECT_INTERVAL) that find no vhost-user backend.
    h.worker.lost("flap-test");
    for _ in 0..1000 {
        h.will_find(Outcome::NotVhostUser);
        h.worker.try_reconnect();
    }
    // 20 lines, then powers of two: at most 20 + 7 for 1,001 events (fewer when tests alongside
    // counted some first; the counters are per call site).
    let lost = capture::count("lost (flap-test)");
    assert!((1..=27).contains(&lost), "{lost} 'lost' lines");
    assert!(capture::count("(#1024)") >= 1 || capture::count("(#512)") >= 1);
    let back = capture::count("is back after");
    assert!((1..=40).contains(&back), "{back} 'is back' lines");
    let attempts = capture::count("reconnect attempt");
    assert!((1..=40).contains(&attempts), "{attempts} attempt lines");
}

#[test]
fn refresh_config_shows_a_grown_disk_to_the_guest() {
    let mut h = Harness::new(WaitLimit::Forever);
    h.guest_sets_up();
    let generation = |h: &Harness| {
        let mut b = [0u8; 4];
        h.shared.transport().read(reg::CONFIG_GENERATION, &mut b);
        u32::from_le_bytes(b)
    };
    let interrupt = |h: &Harness| {
        let mut b = [0u8; 4];
        h.shared.transport().read(reg::INTERRUPT_STATUS, &mut b);
        u32::from_le_bytes(b) & 2 != 0
    };
    let g0 = generation(&h);
    let r = h.worker.refresh_config().unwrap();
    assert!(!r.changed, "{r:?}");
    assert_eq!(generation(&h), g0);
    assert!(!interrupt(&h));
    *h.config_now.lock().unwrap() = Some(blk_config(4096));
    let r = h.worker.refresh_config().unwrap();
    assert!(r.changed, "{r:?}");
    assert_eq!(&h.shared.transport().config()[..8], &4096u64.to_le_bytes());
    assert_eq!(generation(&h), g0.wrapping_add(1));
    assert!(interrupt(&h), "config-change interrupt pending");
    assert_eq!(h.state(), running(), "the rings keep running");
    h.worker.lost("test: hang-up");
    assert!(matches!(
        h.worker.refresh_config(),
        Err(DeviceCommandError::NotConnected)
    ));
}

#[test]
fn switch_backend_stops_the_old_rings_and_replays_on_the_new_one() {
    let mut h = Harness::new(WaitLimit::Forever);
    h.guest_sets_up();
    h.guest_writes_wce(1);
    h.worker
        .fixed
        .mem
        .write_obj(5u16, GuestAddress(USED + 2))
        .unwrap();
    h.take_calls();

    // Nobody on the new socket: refused, nothing touched, the old socket kept.
    h.will_find(Outcome::Absent);
    let e = h.worker.switch_backend("new.sock".into()).unwrap_err();
    assert!(matches!(e, DeviceCommandError::NoBackend(_)), "{e}");
    assert_eq!(h.worker.connector.path, PathBuf::from("mock.sock"));
    // A backend without a feature the guest uses: refused, stays.
    let poor = h.backend_with(BLK & !(1 << 9), 2048);
    h.will_find(Outcome::Link(poor));
    let e = h.worker.switch_backend("new.sock".into()).unwrap_err();
    assert!(matches!(e, DeviceCommandError::Incompatible { .. }), "{e}");
    assert_eq!(h.take_calls(), vec![], "the old backend was left alone");
    assert_eq!(h.state(), running());

    // A good one: the old rings stop first, then the guest's config write and the rings
    // (from used.idx) go to the new backend.
    let kick = h.worker.fixed.events.kicks[0].try_clone().unwrap();
    let _ = kick.read();
    let b = h.backend();
    let id = b.id;
    h.will_find(Outcome::Link(b));
    h.worker.switch_backend("new.sock".into()).unwrap();
    assert_eq!(
        h.take_calls(),
        vec![
            (0, Call::Stop(vec![0])),
            (id, Call::SetConfig(32, vec![1])),
            (id, Call::Start(GUEST, vec![(0, 5)], true)),
        ]
    );
    assert_eq!(kick.read().unwrap(), 1, "the new backend looks at its ring");
    assert_eq!(h.state(), running());
    assert_eq!(h.worker.fixed.socket, PathBuf::from("new.sock"));
    assert_eq!(h.worker.connector.path, PathBuf::from("new.sock"));

    // While lost, a switch points the reconnects at the new socket.
    h.worker.lost("test: hang-up");
    h.worker.switch_backend("third.sock".into()).unwrap();
    assert_eq!(h.worker.connector.path, PathBuf::from("third.sock"));
    let b = h.backend();
    h.will_find(Outcome::Link(b));
    h.worker.try_reconnect();
    assert_eq!(h.state(), running());
}
