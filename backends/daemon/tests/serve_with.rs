//! `serve_with` hooks against a real frontend (hype-testkit's driver): an fd registered in
//! `daemon_created` reaches the backend's `handle_event` on the worker thread, `disconnected`
//! runs once per frontend, and a failing hook stops serving with a runtime error.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hype_daemon::{serve_with, CommandError, ConnectionHooks, Error, Shutdown, SocketListener};
use hype_testkit::driver::{Driver, DriverOptions};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// epoll data of the extra fd: above the queue (0) and the exit event (1).
const EXTRA_EVENT: u16 = 2;

/// A one-queue device that counts events on an extra fd the test registers.
struct Counter {
    extra: Arc<EventFd>,
    seen: Arc<AtomicUsize>,
}

impl VhostUserBackend for Counter {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        1
    }
    fn max_queue_size(&self) -> usize {
        256
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | (1 << 30) // VHOST_USER_F_PROTOCOL_FEATURES
    }
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK
    }
    fn set_event_idx(&self, _enabled: bool) {}
    fn update_memory(&self, _mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        Ok(())
    }
    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }
    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        _vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if device_event == EXTRA_EVENT {
            let _ = self.extra.read();
            self.seen.fetch_add(1, Ordering::SeqCst);
        }
        Ok(())
    }
}

/// Registers the extra fd on the only worker thread; counts connections and disconnections.
struct Hooks {
    created: Arc<AtomicUsize>,
    disconnected: Arc<AtomicUsize>,
}

impl ConnectionHooks<Arc<Counter>> for Hooks {
    fn daemon_created(
        &mut self,
        backend: &Arc<Counter>,
        daemon: &VhostUserDaemon<Arc<Counter>>,
    ) -> io::Result<()> {
        let handlers = daemon.get_epoll_handlers();
        assert_eq!(handlers.len(), 1);
        handlers[0].register_listener(
            backend.extra.as_raw_fd(),
            EventSet::IN,
            u64::from(EXTRA_EVENT),
        )?;
        self.created.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn disconnected(&mut self) {
        self.disconnected.fetch_add(1, Ordering::SeqCst);
    }
}

fn socket_path(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("hype-daemon-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d.join("s.sock")
}

fn wait_until(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// What the test sees of a running `serve_with`.
struct Server {
    path: std::path::PathBuf,
    shutdown: Shutdown,
    /// Events the backends saw on their extra fd.
    seen: Arc<AtomicUsize>,
    /// The extra fd of the latest connection.
    current: Arc<Mutex<Option<Arc<EventFd>>>>,
    thread: std::thread::JoinHandle<Result<(), Error>>,
}

/// Runs `serve_with` with `hooks` on a thread, each connection's backend a fresh [`Counter`].
fn start<H: ConnectionHooks<Arc<Counter>> + Send + 'static>(name: &str, hooks: H) -> Server {
    let path = socket_path(name);
    let mut listener = SocketListener::bind(&path, 0o600).unwrap();
    let shutdown = Shutdown::new().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let current: Arc<Mutex<Option<Arc<EventFd>>>> = Arc::default();
    let thread = {
        let (shutdown, seen, current) = (shutdown.clone(), seen.clone(), current.clone());
        std::thread::spawn(move || {
            serve_with(
                &mut listener,
                "hooks-test",
                &shutdown,
                |_mem: &GuestMemoryAtomic<GuestMemoryMmap>| {
                    let extra = Arc::new(EventFd::new(EFD_NONBLOCK)?);
                    *current.lock().unwrap() = Some(extra.clone());
                    Ok::<_, io::Error>(Arc::new(Counter {
                        extra,
                        seen: seen.clone(),
                    }))
                },
                hooks,
            )
        })
    };
    Server {
        path,
        shutdown,
        seen,
        current,
        thread,
    }
}

#[test]
fn hook_registers_an_extra_fd_and_sees_each_disconnect() {
    let created = Arc::new(AtomicUsize::new(0));
    let disconnected = Arc::new(AtomicUsize::new(0));
    let hooks = Hooks {
        created: created.clone(),
        disconnected: disconnected.clone(),
    };
    let server = start("hooks", hooks);
    for round in 1..=2 {
        let drv = Driver::connect(&server.path, DriverOptions::default()).unwrap();
        assert_eq!(created.load(Ordering::SeqCst), round);
        let extra = server.current.lock().unwrap().clone().unwrap();
        let before = server.seen.load(Ordering::SeqCst);
        extra.write(1).unwrap();
        wait_until("the extra fd's event", || {
            server.seen.load(Ordering::SeqCst) == before + 1
        });
        drop(drv);
        wait_until("the disconnect hook", || {
            disconnected.load(Ordering::SeqCst) == round
        });
    }
    server.shutdown.trigger();
    server.thread.join().unwrap().unwrap();
    assert!(!server.path.exists());
}

#[test]
fn failing_hook_stops_serving_with_a_runtime_error() {
    // Data 1 is the exit event's: the handler refuses it.
    let hook = |b: &Arc<Counter>, d: &VhostUserDaemon<Arc<Counter>>| {
        d.get_epoll_handlers()[0].register_listener(b.extra.as_raw_fd(), EventSet::IN, 1)
    };
    let server = start("hookfail", hook);
    let _conn = std::os::unix::net::UnixStream::connect(&server.path).unwrap();
    let err = server.thread.join().unwrap().unwrap_err();
    assert!(matches!(err, Error::ConnectionSetup(_)), "{err:?}");
    assert!(!err.is_usage());
    assert_eq!(
        hype_daemon::error_chain(&err),
        format!(
            "cannot set up the connection: {}",
            io::Error::from_raw_os_error(libc::EINVAL)
        )
    );
    assert!(!server.path.exists());
}
