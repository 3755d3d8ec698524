//! A bounded LRU cache of fixed-size image blocks, with fetches in progress shared between
//! the readers that want the same block.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::remote::FetchError;

/// The bytes of one block (shorter than the block size only for the image's last block).
pub(crate) type BlockData = Arc<Vec<u8>>;

/// The outcome of a fetch, shared by every reader waiting for it.
pub(crate) type FetchResult = Result<BlockData, Arc<FetchError>>;

/// A fetch in progress: readers wait on it, the fetcher completes it once.
#[derive(Default)]
pub(crate) struct Pending {
    result: Mutex<Option<FetchResult>>,
    done: Condvar,
}

impl Pending {
    /// Blocks until the fetch completes.
    pub(crate) fn wait(&self) -> FetchResult {
        let mut r = lock(&self.result);
        loop {
            if let Some(r) = r.as_ref() {
                return r.clone();
            }
            r = match self.done.wait(r) {
                Ok(r) => r,
                Err(p) => p.into_inner(),
            };
        }
    }

    fn set(&self, result: FetchResult) {
        *lock(&self.result) = Some(result);
        self.done.notify_all();
    }
}

/// What a lookup found.
pub(crate) enum Lookup {
    /// The block is cached.
    Hit(BlockData),
    /// Someone is fetching it: wait on this.
    InFlight(Arc<Pending>),
    /// Nobody has it: the caller must fetch it and call [`BlockCache::complete`].
    Miss(Arc<Pending>),
}

enum Entry {
    Ready {
        data: BlockData,
        tick: u64,
        /// A guest read has used it (as opposed to only read-ahead).
        used: bool,
    },
    Fetching {
        pending: Arc<Pending>,
        /// A guest read is waiting for it.
        used: bool,
    },
}

struct State {
    entries: HashMap<u64, Entry>,
    /// Ready blocks by last use, oldest first.
    lru: BTreeMap<u64, u64>,
    ready: usize,
    tick: u64,
    hits: u64,
    misses: u64,
}

/// The cache: at most `capacity` ready blocks; fetches in progress are not counted (they are
/// bounded by the fetcher's threads and the read-ahead window).
pub(crate) struct BlockCache {
    capacity: usize,
    state: Mutex<State>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks leaves consistent data (every update is a single
    // insert/remove), so a poisoned lock is still usable.
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl BlockCache {
    /// A cache keeping at most `capacity` blocks (0 keeps none: fetches are still shared).
    pub(crate) fn new(capacity: usize) -> Self {
        BlockCache {
            capacity,
            state: Mutex::new(State {
                entries: HashMap::new(),
                lru: BTreeMap::new(),
                ready: 0,
                tick: 0,
                hits: 0,
                misses: 0,
            }),
        }
    }

    /// Looks `block` up for a guest read, registering a fetch if nobody has it.
    pub(crate) fn lookup(&self, block: u64) -> Lookup {
        let mut s = lock(&self.state);
        s.tick += 1;
        let now = s.tick;
        let State {
            entries,
            lru,
            hits,
            misses,
            ..
        } = &mut *s;
        match entries.get_mut(&block) {
            Some(Entry::Ready { data, tick, used }) => {
                lru.remove(tick);
                lru.insert(now, block);
                *tick = now;
                *used = true;
                *hits += 1;
                Lookup::Hit(data.clone())
            }
            Some(Entry::Fetching { pending, used }) => {
                *used = true;
                *hits += 1;
                Lookup::InFlight(pending.clone())
            }
            None => {
                *misses += 1;
                let p = Arc::new(Pending::default());
                entries.insert(
                    block,
                    Entry::Fetching {
                        pending: p.clone(),
                        used: true,
                    },
                );
                Lookup::Miss(p)
            }
        }
    }

    /// Registers a read-ahead fetch of `block` unless it is cached or being fetched.
    pub(crate) fn start_prefetch(&self, block: u64) -> Option<Arc<Pending>> {
        let mut s = lock(&self.state);
        if s.entries.contains_key(&block) {
            return None;
        }
        let p = Arc::new(Pending::default());
        s.entries.insert(
            block,
            Entry::Fetching {
                pending: p.clone(),
                used: false,
            },
        );
        Some(p)
    }

    /// Whether a guest read has used `block` and it is still cached (sequential detection).
    pub(crate) fn was_used(&self, block: u64) -> bool {
        matches!(
            lock(&self.state).entries.get(&block),
            Some(Entry::Ready { used: true, .. })
        )
    }

    /// Ends the fetch of `block`: wakes its waiters and caches the data on success,
    /// evicting the least recently used blocks beyond the capacity. `used` says whether a
    /// guest read asked for it (read-ahead that a guest read waited for counts as used too).
    pub(crate) fn complete(
        &self,
        block: u64,
        pending: &Arc<Pending>,
        result: FetchResult,
        used: bool,
    ) {
        {
            let mut s = lock(&self.state);
            let ours = match s.entries.get(&block) {
                Some(Entry::Fetching {
                    pending: p,
                    used: u,
                }) if Arc::ptr_eq(p, pending) => Some(used || *u),
                _ => None,
            };
            if let Some(used) = ours {
                s.entries.remove(&block);
                if let (Ok(data), true) = (&result, self.capacity > 0) {
                    s.tick += 1;
                    let tick = s.tick;
                    s.entries.insert(
                        block,
                        Entry::Ready {
                            data: data.clone(),
                            tick,
                            used,
                        },
                    );
                    s.lru.insert(tick, block);
                    s.ready += 1;
                    while s.ready > self.capacity {
                        let Some((_, victim)) = s.lru.pop_first() else {
                            break;
                        };
                        s.entries.remove(&victim);
                        s.ready -= 1;
                    }
                }
            }
        }
        pending.set(result);
    }

    /// Cached blocks now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        lock(&self.state).ready
    }

    /// (hits, misses) of guest lookups so far.
    pub(crate) fn hit_stats(&self) -> (u64, u64) {
        let s = lock(&self.state);
        (s.hits, s.misses)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(c: &BlockCache, block: u64) {
        match c.lookup(block) {
            Lookup::Miss(p) => c.complete(block, &p, Ok(Arc::new(vec![block as u8; 4])), true),
            _ => panic!("block {block} should miss"),
        }
    }

    #[test]
    fn bounded_lru() {
        let c = BlockCache::new(3);
        for b in 0..3 {
            fill(&c, b);
        }
        assert_eq!(c.len(), 3);
        // Touch 0 so 1 is the oldest.
        assert!(matches!(c.lookup(0), Lookup::Hit(d) if d[0] == 0));
        fill(&c, 3);
        assert_eq!(c.len(), 3);
        assert!(matches!(c.lookup(1), Lookup::Miss(_)), "1 was evicted");
        assert!(matches!(c.lookup(0), Lookup::Hit(_)));
        assert!(matches!(c.lookup(3), Lookup::Hit(d) if d[0] == 3));
    }

    #[test]
    fn waiters_share_one_fetch_and_errors_are_not_cached() {
        let c = Arc::new(BlockCache::new(4));
        let Lookup::Miss(p) = c.lookup(7) else {
            panic!()
        };
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let Lookup::InFlight(w) = c.lookup(7) else {
                    panic!()
                };
                std::thread::spawn(move || w.wait())
            })
            .collect();
        c.complete(7, &p, Err(Arc::new(FetchError::Stale)), true);
        for w in waiters {
            assert!(w.join().unwrap().is_err());
        }
        assert_eq!(c.len(), 0);
        assert!(
            matches!(c.lookup(7), Lookup::Miss(_)),
            "a failed fetch is retried"
        );
    }

    #[test]
    fn prefetch_marks_unused_until_read() {
        let c = BlockCache::new(4);
        let p = c.start_prefetch(2).unwrap();
        assert!(c.start_prefetch(2).is_none(), "already in flight");
        c.complete(2, &p, Ok(Arc::new(vec![2])), false);
        assert!(!c.was_used(2));
        assert!(c.start_prefetch(2).is_none(), "already cached");
        assert!(matches!(c.lookup(2), Lookup::Hit(_)));
        assert!(c.was_used(2));
    }

    #[test]
    fn zero_capacity_caches_nothing() {
        let c = BlockCache::new(0);
        let Lookup::Miss(p) = c.lookup(1) else {
            panic!()
        };
        c.complete(1, &p, Ok(Arc::new(vec![1])), true);
        assert_eq!(p.wait().unwrap()[0], 1);
        assert_eq!(c.len(), 0);
        assert!(matches!(c.lookup(1), Lookup::Miss(_)));
    }
}
