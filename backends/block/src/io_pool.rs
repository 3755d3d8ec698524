//! A fixed-size pool of I/O threads that run requests and complete them out of order.
//!
//! Queue workers hand parsed requests to the pool and go back to their ring at once, so a
//! slow store (a network store with long latencies) can have as many requests in flight as
//! there are pool threads, on all queues together, without one queue waiting for another.

use std::io;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::iobuf::IoBuf;

/// A unit of work: runs on a pool thread with that thread's bounce buffer.
pub(crate) type Job = Box<dyn FnOnce(&mut IoBuf) + Send>;

/// The pool. Dropping it lets the threads finish every queued job, then joins them.
pub(crate) struct IoPool {
    tx: Option<Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

impl IoPool {
    /// Starts `n` threads (n >= 1).
    pub(crate) fn new(n: usize, name: &str) -> io::Result<Self> {
        let (tx, rx) = channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let mut threads = Vec::with_capacity(n);
        for i in 0..n {
            let rx = rx.clone();
            let t = thread::Builder::new()
                .name(format!("{name}-io{i}"))
                .spawn(move || worker(&rx));
            match t {
                Ok(t) => threads.push(t),
                Err(e) => {
                    drop(tx);
                    for t in threads {
                        let _ = t.join();
                    }
                    return Err(e);
                }
            }
        }
        Ok(IoPool {
            tx: Some(tx),
            threads,
        })
    }

    /// Queues a job. Jobs are bounded by the rings: each ring entry is in flight at most once.
    pub(crate) fn submit(&self, job: Job) {
        if let Some(tx) = &self.tx {
            // Sending only fails when every thread is gone, which only happens on drop.
            let _ = tx.send(job);
        }
    }
}

fn worker(rx: &Mutex<Receiver<Job>>) {
    let mut buf = IoBuf::new();
    loop {
        let job = match rx.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        match job {
            Ok(job) => job(&mut buf),
            Err(_) => return, // channel closed: pool dropped
        }
    }
}

impl Drop for IoPool {
    fn drop(&mut self) {
        self.tx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Counts the requests of one queue that are between "popped from the ring" and "returned to
/// the used ring", so that stopping a ring can wait for them.
#[derive(Default)]
pub(crate) struct InFlight {
    count: Mutex<usize>,
    idle: Condvar,
}

impl InFlight {
    pub(crate) fn start(&self) {
        if let Ok(mut c) = self.count.lock() {
            *c += 1;
        }
    }

    /// Requests in flight now.
    pub(crate) fn count(&self) -> usize {
        self.count.lock().map_or(0, |c| *c)
    }

    pub(crate) fn finish(&self) {
        if let Ok(mut c) = self.count.lock() {
            *c = c.saturating_sub(1);
            if *c == 0 {
                self.idle.notify_all();
            }
        }
    }

    /// Waits until nothing is in flight or `timeout` passes; returns how many are left.
    pub(crate) fn wait_idle(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let Ok(mut c) = self.count.lock() else {
            return 0;
        };
        while *c > 0 {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            c = match self.idle.wait_timeout(c, deadline - now) {
                Ok((c, _)) => c,
                Err(_) => return 0,
            };
        }
        *c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn runs_all_jobs_concurrently_and_drains_on_drop() {
        let pool = IoPool::new(4, "t").unwrap();
        let done = Arc::new(AtomicUsize::new(0));
        let started = Arc::new(std::sync::Barrier::new(4));
        for _ in 0..4 {
            let done = done.clone();
            let started = started.clone();
            // All four must run at the same time to pass the barrier.
            pool.submit(Box::new(move |_| {
                started.wait();
                done.fetch_add(1, Ordering::SeqCst);
            }));
        }
        for _ in 0..100 {
            let done = done.clone();
            pool.submit(Box::new(move |_| {
                done.fetch_add(1, Ordering::SeqCst);
            }));
        }
        drop(pool);
        assert_eq!(done.load(Ordering::SeqCst), 104);
    }

    #[test]
    fn inflight_waits_for_finish() {
        let f = Arc::new(InFlight::default());
        f.start();
        f.start();
        assert_eq!(f.wait_idle(Duration::from_millis(10)), 2);
        let f2 = f.clone();
        let t = thread::spawn(move || {
            thread::sleep(Duration::from_millis(20));
            f2.finish();
            f2.finish();
        });
        assert_eq!(f.wait_idle(Duration::from_secs(10)), 0);
        t.join().unwrap();
    }
}
