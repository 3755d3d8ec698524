//! Reads of the remote image through the block cache: a pool of fetcher threads keeps several
//! range requests in flight, guest reads before read-ahead, and sequential streams are
//! detected and read ahead.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crate::cache::{BlockCache, Lookup, Pending};
use crate::remote::Remote;

/// Cache and fetcher tunables.
#[derive(Clone, Debug)]
pub struct ReaderOptions {
    /// Bytes per cached block (a power of two); also the size of each range request.
    pub block_size: u64,
    /// Most blocks kept in the cache.
    pub cache_blocks: usize,
    /// Blocks read ahead of a sequential stream (0 = no read-ahead).
    pub readahead: u64,
    /// Fetcher threads: the most range requests in flight at once.
    pub fetchers: usize,
}

struct Job {
    block: u64,
    pending: Arc<Pending>,
    demand: bool,
}

#[derive(Default)]
struct Queue {
    demand: VecDeque<Job>,
    prefetch: VecDeque<Job>,
    closed: bool,
}

struct Shared {
    remote: Arc<Remote>,
    cache: BlockCache,
    block_size: u64,
    queue: Mutex<Queue>,
    wake: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// The remote image seen through the cache.
pub struct RemoteReader {
    shared: Arc<Shared>,
    readahead: u64,
    blocks: u64,
    threads: Vec<JoinHandle<()>>,
}

impl RemoteReader {
    /// Starts the fetcher threads.
    pub fn new(remote: Arc<Remote>, opts: &ReaderOptions) -> io::Result<Self> {
        let block_size = opts.block_size.max(512);
        let blocks = remote.size().div_ceil(block_size);
        let shared = Arc::new(Shared {
            remote,
            cache: BlockCache::new(opts.cache_blocks),
            block_size,
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
        });
        let mut reader = RemoteReader {
            shared: shared.clone(),
            // Never read ahead more than half the cache, or read-ahead evicts itself.
            readahead: opts.readahead.min(opts.cache_blocks as u64 / 2),
            blocks,
            threads: Vec::new(),
        };
        for i in 0..opts.fetchers.max(1) {
            let shared = shared.clone();
            let t = std::thread::Builder::new()
                .name(format!("http-fetch{i}"))
                .spawn(move || fetcher(&shared))?;
            reader.threads.push(t);
        }
        Ok(reader)
    }

    /// The remote image.
    pub fn remote(&self) -> &Remote {
        &self.shared.remote
    }

    /// (hits, misses) of the cache for guest reads.
    pub fn cache_stats(&self) -> (u64, u64) {
        self.shared.cache.hit_stats()
    }

    /// Fills `buf` with the image bytes at `offset`; bytes past the end of the image read as
    /// zeroes. Every block the range touches is requested at once, so a large read has
    /// several requests in flight.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let size = self.shared.remote.size();
        let end = offset.saturating_add(buf.len() as u64);
        if offset >= size {
            buf.fill(0);
            return Ok(());
        }
        let bs = self.shared.block_size;
        let first = offset / bs;
        let last = (end.min(size) - 1) / bs;

        // Sequential stream: the block before this read was read by the guest.
        if self.readahead > 0 && first > 0 && self.shared.cache.was_used(first - 1) {
            self.prefetch(last + 1, self.readahead);
        }

        let mut waits = Vec::with_capacity((last - first + 1) as usize);
        for block in first..=last {
            let got = match self.shared.cache.lookup(block) {
                Lookup::Hit(d) => Ok(d),
                Lookup::InFlight(p) => {
                    self.promote(block);
                    Err(p)
                }
                Lookup::Miss(p) => {
                    self.submit(Job {
                        block,
                        pending: p.clone(),
                        demand: true,
                    });
                    Err(p)
                }
            };
            waits.push((block, got));
        }
        let mut result = Ok(());
        for (block, got) in waits {
            let data = match got {
                Ok(d) => d,
                Err(p) => match p.wait() {
                    Ok(d) => d,
                    Err(e) => {
                        if result.is_ok() {
                            result = Err(io::Error::other(e.to_string()));
                        }
                        continue;
                    }
                },
            };
            let block_start = block * bs;
            let lo = offset.max(block_start);
            let hi = end.min(block_start + data.len() as u64);
            if hi > lo {
                let src = &data[(lo - block_start) as usize..(hi - block_start) as usize];
                buf[(lo - offset) as usize..(hi - offset) as usize].copy_from_slice(src);
            }
        }
        if end > size {
            buf[(size - offset) as usize..].fill(0);
        }
        result
    }

    fn prefetch(&self, from: u64, count: u64) {
        for block in from..from.saturating_add(count).min(self.blocks) {
            if let Some(p) = self.shared.cache.start_prefetch(block) {
                self.submit(Job {
                    block,
                    pending: p,
                    demand: false,
                });
            }
        }
    }

    fn submit(&self, job: Job) {
        let mut q = lock(&self.shared.queue);
        if job.demand {
            q.demand.push_back(job);
        } else {
            q.prefetch.push_back(job);
        }
        drop(q);
        self.shared.wake.notify_one();
    }

    /// A guest waits for a block that is queued for read-ahead: move it to the front.
    fn promote(&self, block: u64) {
        let mut q = lock(&self.shared.queue);
        if let Some(i) = q.prefetch.iter().position(|j| j.block == block) {
            if let Some(mut job) = q.prefetch.remove(i) {
                job.demand = true;
                q.demand.push_front(job);
            }
        }
    }
}

impl Drop for RemoteReader {
    fn drop(&mut self) {
        lock(&self.shared.queue).closed = true;
        self.shared.wake.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn fetcher(shared: &Shared) {
    loop {
        let job = {
            let mut q = lock(&shared.queue);
            loop {
                if q.closed {
                    // Fail whatever is still queued so no reader waits forever.
                    let q = &mut *q;
                    let left: Vec<Job> = q.demand.drain(..).chain(q.prefetch.drain(..)).collect();
                    for j in left {
                        let e = Arc::new(crate::remote::FetchError::Closed);
                        shared.cache.complete(j.block, &j.pending, Err(e), false);
                    }
                    return;
                }
                if let Some(j) = q.demand.pop_front().or_else(|| q.prefetch.pop_front()) {
                    break j;
                }
                q = match shared.wake.wait(q) {
                    Ok(q) => q,
                    Err(p) => p.into_inner(),
                };
            }
        };
        let size = shared.remote.size();
        let start = job.block * shared.block_size;
        let len = shared.block_size.min(size.saturating_sub(start));
        let mut data = vec![0u8; len as usize];
        let result = shared
            .remote
            .read_range(start, &mut data)
            .map(|()| Arc::new(data))
            .map_err(Arc::new);
        if let Err(e) = &result {
            if !job.demand {
                log::debug!("read-ahead of block {} failed: {e}", job.block);
            }
        }
        shared
            .cache
            .complete(job.block, &job.pending, result, job.demand);
    }
}
