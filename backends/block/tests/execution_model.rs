//! The execution model, in process: a slow store with an I/O pool keeps many requests in
//! flight, completes them out of order, and never makes one queue wait for another.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use hype_block::{BlockDevice, Shutdown, SocketListener, Storage, StorageInfo};
use hype_testkit::blk::{add_request, BlkDriver, BlkRequest, BlkResponse, BlkStatus};
use hype_testkit::driver::DriverOptions;

const SIZE: u64 = 4 << 20;
/// Reads at or beyond this offset wait until the test opens the gate.
const SLOW_FROM: u64 = 2 << 20;
const LONG: Duration = Duration::from_secs(10);

/// A RAM store whose upper half answers reads only when the test says so, like a far-away
/// network store (but deterministic).
struct SlowStore {
    data: Mutex<Vec<u8>>,
    open: Mutex<bool>,
    opened: Condvar,
    concurrent: AtomicUsize,
    max_concurrent: AtomicUsize,
}

impl SlowStore {
    fn release(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }

    /// Waits until `n` reads are inside the store at once.
    fn wait_concurrent(&self, n: usize) {
        let deadline = Instant::now() + LONG;
        while self.concurrent.load(Ordering::SeqCst) < n {
            assert!(
                Instant::now() < deadline,
                "never reached {n} concurrent reads"
            );
            thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Storage for SlowStore {
    fn info(&self) -> StorageInfo {
        StorageInfo::new(SIZE)
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let now = self.concurrent.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_concurrent.fetch_max(now, Ordering::SeqCst);
        if offset >= SLOW_FROM {
            let mut open = self.open.lock().unwrap();
            while !*open {
                open = self.opened.wait(open).unwrap();
            }
        }
        let d = self.data.lock().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        self.concurrent.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let mut d = self.data.lock().unwrap();
        d[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

struct Server {
    shutdown: Shutdown,
    thread: Option<thread::JoinHandle<()>>,
    socket: std::path::PathBuf,
    store: Arc<SlowStore>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.store.release();
        self.shutdown.trigger();
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

fn serve(name: &str, queues: u16, io_threads: usize) -> Server {
    serve_with(name, queues, io_threads, false)
}

fn serve_with(name: &str, queues: u16, io_threads: usize, out_of_order: bool) -> Server {
    serve_device(name, |d| {
        d.num_queues(queues)
            .io_threads(io_threads)
            .out_of_order(out_of_order)
    })
}

/// Serves the slow store with the device `configure` makes of it.
fn serve_device(
    name: &str,
    configure: impl FnOnce(BlockDevice<SlowStore>) -> BlockDevice<SlowStore>,
) -> Server {
    let dir = std::env::temp_dir().join(format!("hype-blk-exec-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("blk.sock");
    let store = Arc::new(SlowStore {
        data: Mutex::new(vec![0; SIZE as usize]),
        open: Mutex::new(false),
        opened: Condvar::new(),
        concurrent: AtomicUsize::new(0),
        max_concurrent: AtomicUsize::new(0),
    });
    let mut listener = SocketListener::bind(&socket, 0o600).unwrap();
    let shutdown = Shutdown::new().unwrap();
    let device = configure(BlockDevice::from_arc(store.clone()));
    let sd = shutdown.clone();
    let thread = thread::spawn(move || device.serve_on(&mut listener, &sd).unwrap());
    Server {
        shutdown,
        thread: Some(thread),
        socket,
        store,
    }
}

fn connect(s: &Server, queues: usize) -> BlkDriver {
    let opts = DriverOptions {
        num_queues: queues,
        io_timeout: LONG,
        ..DriverOptions::default()
    };
    BlkDriver::connect(&s.socket, opts).unwrap()
}

#[test]
fn slow_queue_does_not_block_other_queue() {
    // One thread per queue (the default only where the process may use a CPU per queue).
    let s = serve_device("queues", |d| d.num_queues(2).queue_threads(2));
    let mut disk = connect(&s, 2);
    // Queue 0: a read stuck in the store, on queue 0's own thread.
    let q0 = disk.driver().queue(0).unwrap();
    let slow = add_request(q0, &BlkRequest::read(SLOW_FROM / 512, 4096)).unwrap();
    q0.notify().unwrap();
    s.store.wait_concurrent(1);
    // Queue 1 keeps working meanwhile.
    let q1 = disk.driver().queue(1).unwrap();
    for i in 0..20 {
        let h = add_request(q1, &BlkRequest::read(i * 8, 4096)).unwrap();
        q1.notify().unwrap();
        let c = q1.wait_for(h, LONG).unwrap();
        assert_eq!(BlkResponse::from_completion(c).status, BlkStatus::Ok);
    }
    let q0 = disk.driver().queue(0).unwrap();
    assert!(
        q0.poll().unwrap().is_empty(),
        "the stuck read completed early"
    );
    s.store.release();
    let c = q0.wait_for(slow, LONG).unwrap();
    assert_eq!(BlkResponse::from_completion(c).status, BlkStatus::Ok);
}

#[test]
fn queues_sharing_one_thread_are_all_served_with_polling() {
    // Four queues, one worker thread, polling on: the thread polls one ring until another
    // has requests, then moves on with the first ring's kicks still off; a kick lost there
    // leaves a request unanswered and this test times out.
    let s = serve_device("shared", |d| {
        d.num_queues(4)
            .queue_threads(1)
            .poll(Duration::from_millis(50))
    });
    let mut disk = connect(&s, 4);
    for q in 0..4 {
        let data = vec![q as u8 + 1; 4096];
        disk.execute(q, &BlkRequest::write(q as u64 * 8, data))
            .unwrap();
    }
    for round in 0..50u64 {
        let mut heads = Vec::new();
        for q in 0..4 {
            let vq = disk.driver().queue(q).unwrap();
            let mut hs = Vec::new();
            for _ in 0..=(round % 8) {
                hs.push(add_request(vq, &BlkRequest::read(q as u64 * 8, 4096)).unwrap());
            }
            vq.notify().unwrap();
            heads.push(hs);
        }
        for (q, hs) in heads.into_iter().enumerate() {
            let vq = disk.driver().queue(q).unwrap();
            for h in hs {
                let r = BlkResponse::from_completion(vq.wait_for(h, LONG).unwrap());
                assert_eq!(r.status, BlkStatus::Ok);
                assert_eq!(r.data, vec![q as u8 + 1; 4096], "queue {q}, round {round}");
            }
        }
    }
}

#[test]
fn io_pool_keeps_many_in_flight_and_completes_in_ring_order() {
    let s = serve("pool-ordered", 1, 16);
    let mut disk = connect(&s, 1);
    let q = disk.driver().queue(0).unwrap();
    // 12 slow reads then one fast read, all on one queue (the pool has 16 threads).
    let mut heads = Vec::new();
    for i in 0..12 {
        heads.push(add_request(q, &BlkRequest::read(SLOW_FROM / 512 + i * 8, 4096)).unwrap());
    }
    heads.push(add_request(q, &BlkRequest::read(0, 4096)).unwrap());
    q.notify().unwrap();
    // All 12 slow reads are inside the store at once; the fast one has finished too (nothing
    // holds it), yet it is not used before them: a backend that dies now leaves the used
    // index below every unfinished request, so its successor neither loses nor repeats one.
    s.store.wait_concurrent(12);
    thread::sleep(Duration::from_millis(100));
    assert!(
        q.poll().unwrap().is_empty(),
        "a request completed before older ones"
    );
    s.store.release();
    let mut order = Vec::new();
    while order.len() < heads.len() {
        for c in q.wait(1, LONG).unwrap() {
            order.push(c.head);
            assert_eq!(BlkResponse::from_completion(c).status, BlkStatus::Ok);
        }
    }
    assert_eq!(order, heads, "used in the order made available");
    assert!(s.store.max_concurrent.load(Ordering::SeqCst) >= 12);
}

#[test]
fn io_pool_told_so_completes_out_of_order() {
    let s = serve_with("pool", 1, 16, true);
    let mut disk = connect(&s, 1);
    let q = disk.driver().queue(0).unwrap();
    // 12 slow reads then one fast read, all on one queue (the pool has 16 threads).
    for i in 0..12 {
        add_request(q, &BlkRequest::read(SLOW_FROM / 512 + i * 8, 4096)).unwrap();
    }
    let fast = add_request(q, &BlkRequest::read(0, 4096)).unwrap();
    q.notify().unwrap();
    // All 12 slow reads are inside the store at once, and the fast one overtakes them.
    s.store.wait_concurrent(12);
    let first = q.wait(1, LONG).unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].head, fast, "fast request did not complete first");
    s.store.release();
    let mut done = first.len();
    while done < 13 {
        for c in q.wait(1, LONG).unwrap() {
            assert_eq!(BlkResponse::from_completion(c).status, BlkStatus::Ok);
            done += 1;
        }
    }
    assert!(s.store.max_concurrent.load(Ordering::SeqCst) >= 12);
}

#[test]
fn stopping_a_ring_waits_for_requests_in_the_pool() {
    let s = serve("stop", 1, 4);
    let mut disk = connect(&s, 1);
    disk.write(SLOW_FROM / 512, &[7; 4096]).unwrap();
    let q = disk.driver().queue(0).unwrap();
    let h = add_request(q, &BlkRequest::read(SLOW_FROM / 512, 4096)).unwrap();
    q.notify().unwrap();
    s.store.wait_concurrent(1);
    // GET_VRING_BASE while the read sits in the store: it must not return before the read
    // completed, and the used ring must hold the completion when it does.
    let stopped = std::sync::atomic::AtomicBool::new(false);
    let bases = thread::scope(|sc| {
        let t = sc.spawn(|| {
            let b = disk.driver().stop_queues().unwrap();
            stopped.store(true, Ordering::SeqCst);
            b
        });
        thread::sleep(Duration::from_millis(100));
        assert!(
            !stopped.load(Ordering::SeqCst),
            "GET_VRING_BASE did not wait"
        );
        s.store.release();
        t.join().unwrap()
    });
    let q = disk.driver().queue(0).unwrap();
    assert_eq!(q.device_used_idx().unwrap(), bases[0] as u16);
    let c = q.wait_for(h, LONG).unwrap();
    let r = BlkResponse::from_completion(c);
    assert_eq!(r.status, BlkStatus::Ok);
    assert_eq!(r.data, vec![7; 4096]);
}

#[test]
fn shutdown_stops_the_server_with_a_client_connected() {
    let s = serve("shutdown", 1, 0);
    let mut disk = connect(&s, 1);
    disk.write(0, &[1; 512]).unwrap();
    let socket = s.socket.clone();
    drop(s); // triggers shutdown and joins the server thread: it must not hang
    assert!(!socket.exists(), "socket not removed on shutdown");
    drop(disk);
}
