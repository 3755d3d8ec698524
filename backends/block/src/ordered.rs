//! Completions published in the order the chains were taken, although they finish out of
//! order: requests run on the I/O pool's threads (or large ones on the large-request threads
//! while small ones finish inline), yet the guest sees them used in ring order. That keeps the
//! crash-recovery rule of `docs/devices.md` (a new backend process re-executes exactly what is
//! after the used index) true with several requests of a ring running at once.

use std::collections::VecDeque;

/// Chains taken from one ring and not yet put in its used ring, oldest first.
#[derive(Debug, Default)]
pub(crate) struct Ordered {
    /// Sequence number of the oldest entry.
    front_seq: u64,
    /// (head, used length once finished).
    entries: VecDeque<(u16, Option<u32>)>,
}

impl Ordered {
    /// Whether nothing waits: a chain finished now can be used at once.
    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Records a chain that will finish later; returns its sequence number for
    /// [`finish`](Self::finish).
    pub(crate) fn push_pending(&mut self, head: u16) -> u64 {
        self.entries.push_back((head, None));
        self.front_seq + self.entries.len() as u64 - 1
    }

    /// Records a chain that finished already but must wait for older ones.
    pub(crate) fn push_finished(&mut self, head: u16, len: u32) {
        self.entries.push_back((head, Some(len)));
    }

    /// Marks chain `seq` finished with `len` bytes used. Unknown sequence numbers (from before a
    /// [`clear`](Self::clear)) are ignored and reported as false.
    pub(crate) fn finish(&mut self, seq: u64, len: u32) -> bool {
        let Some(i) = seq.checked_sub(self.front_seq) else {
            return false;
        };
        match usize::try_from(i)
            .ok()
            .and_then(|i| self.entries.get_mut(i))
        {
            Some(entry) if entry.1.is_none() => {
                entry.1 = Some(len);
                true
            }
            _ => false,
        }
    }

    /// Takes the finished chains at the front, in order, up to the first unfinished one.
    pub(crate) fn take_ready(&mut self) -> Vec<(u16, u32)> {
        let mut out = Vec::new();
        while let Some(&(head, Some(len))) = self.entries.front() {
            out.push((head, len));
            self.entries.pop_front();
            self.front_seq += 1;
        }
        out
    }

    /// Forgets every entry (the ring was reset); returns how many there were.
    pub(crate) fn clear(&mut self) -> usize {
        let n = self.entries.len();
        self.front_seq += n as u64;
        self.entries.clear();
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finished_chains_wait_for_older_ones() {
        let mut o = Ordered::default();
        assert!(o.is_empty());
        let a = o.push_pending(3);
        o.push_finished(4, 1);
        let b = o.push_pending(5);
        o.push_finished(6, 1);
        assert!(o.take_ready().is_empty(), "chain 3 is still running");
        assert!(o.finish(b, 4097));
        assert!(o.take_ready().is_empty());
        assert!(o.finish(a, 1));
        assert_eq!(o.take_ready(), [(3, 1), (4, 1), (5, 4097), (6, 1)]);
        assert!(o.is_empty());
    }

    #[test]
    fn stale_and_repeated_sequence_numbers_are_ignored() {
        let mut o = Ordered::default();
        let a = o.push_pending(1);
        assert!(o.finish(a, 1));
        assert!(!o.finish(a, 1), "finished twice");
        assert_eq!(o.take_ready(), [(1, 1)]);
        assert!(!o.finish(a, 1), "already taken");
        let b = o.push_pending(2);
        assert_eq!(o.clear(), 1);
        assert!(!o.finish(b, 1), "from before the reset");
        let c = o.push_pending(7);
        assert!(c > b);
        assert!(!o.finish(u64::MAX, 1));
        assert!(o.finish(c, 1));
        assert_eq!(o.take_ready(), [(7, 1)]);
    }
}
