//! Crash soak of the block backends behind the VMM's vhost-user device: cycles of a verifying
//! write load at queue depth 8, a SIGKILL of the backend while requests are in flight, a
//! restart on the same socket and the device's reconnect. After every kill it checks that each
//! request the guest made available completes exactly once with OK status, and that every
//! completed write is on the disk: in the image file (block-file), in the overlay (block-http),
//! and read back through the device. block-mem loses its data with the process by design: for
//! it the disk is expected empty after each restart, except for what the new process wrote.
//! Every backend runs with `--io-threads 4`; block-file also without the pool, with 128 KiB
//! writes that run on its large-request threads.
//!
//! No KVM: the test plays the guest (registers through `VhostUserDevice`, rings in testkit
//! RAM). `HYPE_SOAK_CYCLES` sets the cycles per backend (default 10), `HYPE_SOAK_SEED` the
//! seed (printed, so that a failure can be replayed). `scripts/soak-crash` runs 100 cycles.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

mod common;

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::vdriver::{r, Guest, IO_TIMEOUT, RUNNING};
use common::{work_dir, Backend};
use hype_block_http::{Overlay, DEFAULT_GRANULE};
use hype_daemon::error_chain;
use hype_testkit::blk::{add_request, BlkRequest, BlkResponse, BlkStatus};
use hype_testkit::http_server::{Behaviour, HttpServer};
use hype_testkit::virtqueue::{Completion, Virtqueue};
use hype_vmm::virtio::device::DeviceOptions;
use hype_vmm::virtio::mmio::{reg, F_VERSION_1};
use hype_vmm::virtio::VhostUserDevice;

/// Bytes of one write (a slot of the disk).
const BLOCK: usize = 4096;
/// Bytes of one write of the large-request variant: handed to the large-request threads.
const LARGE_BLOCK: usize = 128 << 10;
/// Slots the writes go to; at most one write per slot is in flight.
const SLOTS: u64 = 128;
/// Requests kept in flight.
const QD: usize = 8;
/// Disk size of every backend but the large-request variant's (`SLOTS * LARGE_BLOCK`).
const DISK: u64 = 1 << 20;
/// Longest wait for the device to come back and finish what is pending.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);
/// virtio-blk FLUSH and the ring's EVENT_IDX, acked besides VERSION_1.
const FEATURES: u64 = F_VERSION_1 | 1 << 9 | 1 << 29;
/// `--io-threads` of every backend: several requests of the ring run at once and finish out
/// of order.
const IO_THREADS: &str = "4";
/// The ETag of the test HTTP server, as the overlay records it.
const HTTP_IDENTITY: &str = "etag:\"v1\"";

/// splitmix64: small, seedable, good enough to pick moments and slots.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
}

fn seed() -> u64 {
    env_u64("HYPE_SOAK_SEED").unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        t.as_nanos() as u64 ^ u64::from(std::process::id()) << 32
    })
}

/// Extra backend arguments from `HYPE_SOAK_EXTRA_ARGS` (e.g. `--out-of-order`, to see the
/// soak catch what that mode does to a crash).
fn extra_args() -> Vec<String> {
    std::env::var("HYPE_SOAK_EXTRA_ARGS")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

fn cycles() -> u64 {
    env_u64("HYPE_SOAK_CYCLES").unwrap_or(10)
}

/// The content of slot `slot` of `len` bytes written by generation `gen`: 16-byte records of
/// (first sector, generation, record index), so a wrong block says whose it is.
fn block_pattern(slot: u64, gen: u32, len: usize) -> Vec<u8> {
    let sector = slot * (len as u64 / 512);
    let mut v = Vec::with_capacity(len);
    for i in 0..(len / 16) as u32 {
        v.extend_from_slice(&sector.to_le_bytes());
        v.extend_from_slice(&gen.to_le_bytes());
        v.extend_from_slice(&i.to_le_bytes());
    }
    v
}

/// The base image of the HTTP backend (not zero, so a lost overlay granule shows).
fn http_base() -> Vec<u8> {
    (0..DISK)
        .map(|i| (i as u8).wrapping_mul(7) ^ 0x5a)
        .collect()
}

/// What a block holds, for a failure message.
fn describe(b: &[u8], base: &[u8]) -> String {
    if b == base {
        return "the base content (never written)".into();
    }
    if b.iter().all(|&x| x == 0) {
        return "zeroes".into();
    }
    let sector = u64::from_le_bytes(b[0..8].try_into().unwrap());
    let gen = u32::from_le_bytes(b[8..12].try_into().unwrap());
    let whole = (0..SLOTS).any(|s| b == block_pattern(s, gen, b.len()).as_slice());
    format!(
        "sector {sector} generation {gen}{}",
        if whole { "" } else { " (torn or mixed)" }
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Mem,
    File,
    /// block-file without the I/O pool, writes of `LARGE_BLOCK`: they run on the
    /// large-request threads, FLUSHes inline on the queue's thread.
    FileLarge,
    Http,
}

impl Kind {
    /// Bytes of a slot (of each write and each read).
    fn slot_bytes(self) -> usize {
        match self {
            Kind::FileLarge => LARGE_BLOCK,
            _ => BLOCK,
        }
    }

    fn disk_size(self) -> u64 {
        DISK.max(SLOTS * self.slot_bytes() as u64)
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Mem => "block-mem",
            Kind::File => "block-file",
            Kind::FileLarge => "block-file-large",
            Kind::Http => "block-http",
        }
    }
}

/// What the test expects in a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Content {
    /// Never written (zeroes, or the HTTP image).
    Base,
    /// The last completed write's generation.
    Gen(u32),
}

/// A request the guest made available and has not seen completed.
#[derive(Clone, Copy, Debug)]
enum Op {
    Write { slot: u64, gen: u32 },
    Read { slot: u64 },
    Flush,
}

/// Counters of one backend's soak.
#[derive(Debug, Default)]
struct Summary {
    cycles: u64,
    requests: u64,
    writes: u64,
    kills: u64,
    kills_in_flight: u64,
    /// Requests not completed by the killed process, summed over the kills.
    pending_at_kills: u64,
    /// Requests made available while no backend was there.
    submitted_while_down: u64,
}

/// The disk's other end: the backend process and what the test can read behind it.
struct Disk {
    kind: Kind,
    backend: Backend,
    image: Option<PathBuf>,
    overlay: Option<PathBuf>,
    _server: Option<HttpServer>,
    base: Vec<u8>,
    /// Bytes of a slot.
    slot: usize,
}

impl Disk {
    fn start(kind: Kind, dir: &Path) -> Disk {
        let sock = dir.join("soak.sock");
        let mut image = None;
        let mut overlay = None;
        let mut server = None;
        let size = kind.disk_size();
        let mut base = vec![0u8; size as usize];
        let mut args: Vec<String> = match kind {
            Kind::Mem => vec!["block-mem".into(), "--size".into(), DISK.to_string()],
            Kind::File | Kind::FileLarge => {
                let img = dir.join("disk.img");
                let _ = std::fs::remove_file(&img);
                std::fs::File::create(&img).unwrap().set_len(size).unwrap();
                let a = vec!["block-file".into(), "--path".into(), path_arg(&img)];
                image = Some(img);
                a
            }
            Kind::Http => {
                base = http_base();
                let s = HttpServer::start(Behaviour::new(base.clone())).unwrap();
                let ovl = dir.join("overlay.img");
                let _ = std::fs::remove_file(&ovl);
                let a = vec![
                    "block-http".into(),
                    "--url".into(),
                    s.url(),
                    "--overlay".into(),
                    path_arg(&ovl),
                ];
                overlay = Some(ovl);
                server = Some(s);
                a
            }
        };
        let io_threads = if kind == Kind::FileLarge {
            "0"
        } else {
            IO_THREADS
        };
        args.extend(["--io-threads".into(), io_threads.into()]);
        if kind == Kind::FileLarge {
            // Asked for: by default a one- or two-CPU process runs large requests inline.
            args.extend(["--large-io-threads".into(), "2".into()]);
        }
        args.extend(extra_args());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        eprintln!("{}: hype {}", kind.name(), args.join(" "));
        let backend = Backend::start(&args, &sock);
        Disk {
            kind,
            backend,
            image,
            overlay,
            _server: server,
            base,
            slot: kind.slot_bytes(),
        }
    }

    fn base(&self, slot: u64) -> &[u8] {
        let at = (slot as usize) * self.slot;
        &self.base[at..at + self.slot]
    }

    fn expected(&self, slot: u64, c: Content) -> Vec<u8> {
        match c {
            Content::Base => self.base(slot).to_vec(),
            Content::Gen(g) => block_pattern(slot, g, self.slot),
        }
    }

    /// With the backend dead: every slot without a write in flight holds what the test
    /// expects, in the image file or the overlay (nothing to look at for block-mem).
    fn check_at_rest(&self, expected: &[Content], busy: &[bool]) -> Result<(), String> {
        match self.kind {
            Kind::Mem => Ok(()),
            Kind::File | Kind::FileLarge => {
                let path = self.image.as_ref().unwrap();
                let f = std::fs::File::open(path).unwrap();
                let mut b = vec![0u8; self.slot];
                for slot in 0..SLOTS {
                    if busy[slot as usize] {
                        continue;
                    }
                    f.read_exact_at(&mut b, slot * self.slot as u64).unwrap();
                    let want = self.expected(slot, expected[slot as usize]);
                    if b != want {
                        return Err(format!(
                            "image file, slot {slot}: holds {}, expected {}",
                            describe(&b, self.base(slot)),
                            describe(&want, self.base(slot))
                        ));
                    }
                }
                Ok(())
            }
            Kind::Http => {
                let path = self.overlay.as_ref().unwrap();
                let ovl = Overlay::open(path, DISK, HTTP_IDENTITY, DEFAULT_GRANULE)
                    .map_err(|e| format!("overlay after the kill: {}", error_chain(&e)))?;
                let per_slot = self.slot as u64 / ovl.granule();
                let mut b = vec![0u8; self.slot];
                for slot in 0..SLOTS {
                    if busy[slot as usize] {
                        continue;
                    }
                    let first = slot * per_slot;
                    let local: Vec<bool> =
                        (first..first + per_slot).map(|g| ovl.is_local(g)).collect();
                    match expected[slot as usize] {
                        Content::Base => {
                            if local.iter().any(|&l| l) {
                                return Err(format!(
                                    "overlay, slot {slot}: never written but marked local"
                                ));
                            }
                        }
                        Content::Gen(g) => {
                            if !local.iter().all(|&l| l) {
                                return Err(format!(
                                    "overlay, slot {slot}: generation {g} completed but not \
                                     (all) local: {local:?}"
                                ));
                            }
                            ovl.read_local(slot * self.slot as u64, &mut b).unwrap();
                            let want = block_pattern(slot, g, self.slot);
                            if b != want {
                                return Err(format!(
                                    "overlay, slot {slot}: holds {}, expected generation {g}",
                                    describe(&b, self.base(slot))
                                ));
                            }
                        }
                    }
                }
                Ok(())
            }
        }
    }
}

fn path_arg(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

fn spin(d: Duration) {
    let t = Instant::now();
    while t.elapsed() < d {
        std::hint::spin_loop();
    }
}

/// The guest's side of the soak: the queue, what is in flight, what the disk must hold.
struct Load {
    rng: Rng,
    /// Bytes of a slot.
    slot_bytes: usize,
    /// One request in this many is a FLUSH.
    flush_one_in: u64,
    inflight: HashMap<u16, Op>,
    busy: Vec<bool>,
    expected: Vec<Content>,
    next_gen: u32,
    stats: Summary,
}

impl Load {
    fn new(seed: u64, kind: Kind) -> Load {
        Load {
            rng: Rng(seed),
            slot_bytes: kind.slot_bytes(),
            // Without the pool, a FLUSH finishes inline while large writes run elsewhere.
            flush_one_in: if kind == Kind::FileLarge { 4 } else { 16 },
            inflight: HashMap::new(),
            busy: vec![false; SLOTS as usize],
            expected: vec![Content::Base; SLOTS as usize],
            next_gen: 1,
            stats: Summary::default(),
        }
    }

    /// Makes writes to free slots (1 in 16 a FLUSH) available until `QD` requests are in
    /// flight; one kick.
    fn refill(&mut self, vq: &mut Virtqueue) -> Result<usize, String> {
        let mut added = 0;
        while self.inflight.len() < QD {
            if self.rng.below(self.flush_one_in) == 0 {
                let head = add_request(vq, &BlkRequest::flush())
                    .map_err(|e| format!("add: {}", error_chain(&e)))?;
                if let Some(old) = self.inflight.insert(head, Op::Flush) {
                    return Err(format!("head {head} handed out while {old:?} is in flight"));
                }
                self.stats.requests += 1;
                added += 1;
                continue;
            }
            let mut slot = self.rng.below(SLOTS);
            while self.busy[slot as usize] {
                slot = (slot + 1) % SLOTS;
            }
            let gen = self.next_gen;
            self.next_gen += 1;
            let req = BlkRequest::write(
                slot * (self.slot_bytes as u64 / 512),
                block_pattern(slot, gen, self.slot_bytes),
            );
            let head = add_request(vq, &req).map_err(|e| format!("add: {}", error_chain(&e)))?;
            if let Some(old) = self.inflight.insert(head, Op::Write { slot, gen }) {
                return Err(format!("head {head} handed out while {old:?} is in flight"));
            }
            self.busy[slot as usize] = true;
            self.stats.requests += 1;
            self.stats.writes += 1;
            added += 1;
        }
        vq.notify()
            .map_err(|e| format!("notify: {}", error_chain(&e)))?;
        Ok(added)
    }

    /// Accounts for completions: each must be of a request in flight, with OK status, and a
    /// read must return what the slot holds.
    fn complete(&mut self, disk: &Disk, done: Vec<Completion>) -> Result<usize, String> {
        let n = done.len();
        for c in done {
            let resp = BlkResponse::from_completion(c);
            let Some(op) = self.inflight.remove(&resp.head) else {
                return Err(format!(
                    "completion of head {} that is not in flight (a duplicate)",
                    resp.head
                ));
            };
            if resp.status != BlkStatus::Ok {
                return Err(format!("{op:?} completed with status {:?}", resp.status));
            }
            match op {
                Op::Write { slot, gen } => {
                    self.busy[slot as usize] = false;
                    self.expected[slot as usize] = Content::Gen(gen);
                }
                Op::Flush => {}
                Op::Read { slot } => {
                    let want = disk.expected(slot, self.expected[slot as usize]);
                    if resp.data != want {
                        return Err(format!(
                            "read of slot {slot} through the device: {}, expected {}",
                            describe(&resp.data, disk.base(slot)),
                            describe(&want, disk.base(slot))
                        ));
                    }
                }
            }
        }
        Ok(n)
    }

    fn wait(
        &mut self,
        vq: &mut Virtqueue,
        disk: &Disk,
        timeout: Duration,
    ) -> Result<usize, String> {
        let done = vq.wait(1, timeout).map_err(|e| {
            format!(
                "waiting for completions ({} in flight: {:?}): {}",
                self.inflight.len(),
                self.inflight.values().collect::<Vec<_>>(),
                error_chain(&e)
            )
        })?;
        self.complete(disk, done)
    }

    fn poll(&mut self, vq: &mut Virtqueue, disk: &Disk) -> Result<usize, String> {
        let done = vq
            .poll()
            .map_err(|e| format!("polling the used ring: {}", error_chain(&e)))?;
        self.complete(disk, done)
    }

    /// Waits until nothing is in flight (none lost).
    fn drain(&mut self, vq: &mut Virtqueue, disk: &Disk) -> Result<(), String> {
        let t = Instant::now();
        while !self.inflight.is_empty() {
            let left = DRAIN_TIMEOUT.saturating_sub(t.elapsed());
            if left.is_zero() {
                return Err(format!(
                    "lost: {} requests never completed: {:?}",
                    self.inflight.len(),
                    self.inflight.values().collect::<Vec<_>>()
                ));
            }
            self.wait(vq, disk, left)?;
        }
        Ok(())
    }

    /// Reads every slot through the device, QD reads at a time, and compares.
    fn verify_through_device(&mut self, vq: &mut Virtqueue, disk: &Disk) -> Result<(), String> {
        let mut slot = 0;
        while slot < SLOTS || !self.inflight.is_empty() {
            while slot < SLOTS && self.inflight.len() < QD {
                let req = BlkRequest::read(
                    slot * (self.slot_bytes as u64 / 512),
                    self.slot_bytes as u32,
                );
                let head =
                    add_request(vq, &req).map_err(|e| format!("add: {}", error_chain(&e)))?;
                self.inflight.insert(head, Op::Read { slot });
                self.stats.requests += 1;
                slot += 1;
            }
            vq.notify()
                .map_err(|e| format!("notify: {}", error_chain(&e)))?;
            self.wait(vq, disk, IO_TIMEOUT)?;
        }
        Ok(())
    }

    /// One cycle: load, kill with requests in flight, checks, restart, drain, verify.
    fn cycle(&mut self, vq: &mut Virtqueue, disk: &mut Disk) -> Result<(), String> {
        // Load on the (re)connected backend for a random number of completions.
        let target = 1 + self.rng.below(48);
        let mut done = 0;
        while done < target {
            self.refill(vq)?;
            done += self.wait(vq, disk, IO_TIMEOUT)? as u64;
        }
        // The kill: just after a kick, a little later, or with the backend stopped while the
        // last requests are made available and woken a random moment before the kill or just
        // after its first completion (so that it has taken some and finished fewer).
        match self.rng.below(5) {
            0 => self.refill(vq).map(drop)?,
            1 => {
                self.refill(vq)?;
                std::thread::sleep(Duration::from_micros(self.rng.below(300)));
            }
            2 => {
                self.refill(vq)?;
                spin(Duration::from_micros(self.rng.below(100)));
            }
            3 => {
                disk.backend.signal(libc::SIGSTOP);
                self.refill(vq)?;
                disk.backend.signal(libc::SIGCONT);
                spin(Duration::from_micros(self.rng.below(200)));
            }
            _ => {
                // Mid-batch: the first of a fresh batch completed, the rest are running.
                disk.backend.signal(libc::SIGSTOP);
                self.refill(vq)?;
                disk.backend.signal(libc::SIGCONT);
                self.wait(vq, disk, IO_TIMEOUT)?;
            }
        }
        disk.backend.kill(); // SIGKILL, reaped: nothing more reaches the rings from it
        self.stats.kills += 1;
        // What the dead process completed is in the used ring.
        self.poll(vq, disk)?;
        let pending = self.inflight.len() as u64;
        self.stats.pending_at_kills += pending;
        if pending > 0 {
            self.stats.kills_in_flight += 1;
        }
        if disk.kind == Kind::Mem {
            // The RAM disk went with the process.
            self.expected.fill(Content::Base);
        } else {
            disk.check_at_rest(&self.expected, &self.busy)?;
        }
        // Sometimes the guest goes on submitting while the backend is away.
        if self.rng.below(2) == 0 {
            let n = self.refill(vq)?;
            self.stats.submitted_while_down += n as u64;
        }
        disk.backend.restart();
        self.drain(vq, disk)?;
        self.verify_through_device(vq, disk)?;
        self.stats.cycles += 1;
        Ok(())
    }
}

fn soak(kind: Kind) {
    let seed = seed();
    let cycles = cycles();
    eprintln!(
        "{}: crash soak, {cycles} cycles, HYPE_SOAK_SEED={seed:#x}",
        kind.name()
    );
    let dir = work_dir(&format!("crash_soak_{}", kind.name()));
    let mut disk = Disk::start(kind, &dir);
    let mut g = Guest::new(1, 64);
    let d = g.attach(&DeviceOptions::new(&disk.backend.socket));
    g.init(&d, FEATURES);
    g.queues[0].set_ring_features(true, false);
    let mut load = Load::new(seed, kind);
    let started = Instant::now();
    let mut failure = None;
    for c in 0..cycles {
        if let Err(e) = load.cycle(&mut g.queues[0], &mut disk) {
            failure = Some(format!("cycle {c}: {e}"));
            break;
        }
    }
    if failure.is_none() {
        failure = final_checks(&mut load, &mut g.queues[0], &mut disk, &d, cycles).err();
    }
    let s = &load.stats;
    println!(
        "SOAK {} cycles={} requests={} writes={} kills={} kills_with_requests_in_flight={} \
         pending_at_kills={} submitted_while_down={} failures={} seconds={:.1} seed={seed:#x}",
        kind.name(),
        s.cycles,
        s.requests,
        s.writes,
        s.kills,
        s.kills_in_flight,
        s.pending_at_kills,
        s.submitted_while_down,
        u8::from(failure.is_some()),
        started.elapsed().as_secs_f64(),
    );
    if let Some(f) = failure {
        panic!(
            "{} crash soak failed (HYPE_SOAK_SEED={seed:#x}): {f}",
            kind.name()
        );
    }
}

/// After the last cycle: no stray completion arrives, the device counted every reconnect, and
/// (block-http) a fresh backend on the overlay reads back everything.
fn final_checks(
    load: &mut Load,
    vq: &mut Virtqueue,
    disk: &mut Disk,
    d: &VhostUserDevice,
    cycles: u64,
) -> Result<(), String> {
    std::thread::sleep(Duration::from_millis(100));
    if load.poll(vq, disk)? != 0 {
        return Err("completions after everything had completed".into());
    }
    let st = vq.stats();
    if st.submitted != st.completed || st.submitted != load.stats.requests {
        return Err(format!(
            "the queue made {} chains available and collected {}; the test submitted {}",
            st.submitted, st.completed, load.stats.requests
        ));
    }
    let reconnects = d.stats().reconnects.load(Ordering::Relaxed);
    if reconnects != cycles {
        return Err(format!("{reconnects} reconnects for {cycles} kills"));
    }
    if r(d, reg::STATUS) != RUNNING {
        return Err(format!("device status {:#x}", r(d, reg::STATUS)));
    }
    if disk.kind == Kind::Http {
        // After a last kill, a fresh backend reads the overlay: everything is there.
        disk.backend.kill();
        disk.check_at_rest(&load.expected, &load.busy)?;
        disk.backend.restart();
        load.verify_through_device(vq, disk)?;
    }
    Ok(())
}

#[test]
fn block_file_with_io_threads_survives_repeated_kills() {
    soak(Kind::File);
}

#[test]
fn block_file_with_large_request_threads_survives_repeated_kills() {
    soak(Kind::FileLarge);
}

#[test]
fn block_http_with_overlay_and_io_threads_survives_repeated_kills() {
    soak(Kind::Http);
}

#[test]
fn block_mem_with_io_threads_completes_every_request_once_across_kills() {
    soak(Kind::Mem);
}
