//! Walking a guest descriptor chain (direct or through one indirect table) into checked
//! segments, without trusting anything in it.
//!
//! We walk the table ourselves rather than through `virtio_queue::DescriptorChain` so that a
//! chain whose lengths add up to more than 4 GiB still reaches its status byte (and gets
//! IOERR), and so that every way a chain can be broken is told apart from its normal end.

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use virtio_queue::desc::split::Descriptor;

use crate::request::RequestError;

/// Most descriptors we follow in one chain, direct and indirect together. Linux uses at most
/// seg_max + 2.
pub(crate) const MAX_CHAIN_DESCRIPTORS: usize = 1024;

/// Size of one descriptor in a table.
const DESC_SIZE: u64 = 16;

/// Why a chain cannot be answered at all: no writable status byte can be found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DropReason {
    /// The chain has no device-writable byte.
    #[error("no writable status byte")]
    NoStatus,
    /// The chain loops or is longer than the limit.
    #[error("descriptor chain loops or is longer than {MAX_CHAIN_DESCRIPTORS}")]
    TooLong,
    /// A descriptor index is outside its table.
    #[error("descriptor index {index} outside a table of {size}")]
    BadIndex {
        /// The index.
        index: u16,
        /// The table size.
        size: u16,
    },
    /// A descriptor could not be read from guest memory.
    #[error("descriptor table at {0:#x} is outside guest memory")]
    UnreadableDescriptor(u64),
    /// An indirect descriptor is malformed (nested, chained, or with a bad table length).
    #[error("bad indirect descriptor (table length {0})")]
    BadIndirect(u32),
    /// The status byte lies outside guest memory.
    #[error("status byte at {0:#x} is outside guest memory")]
    StatusOutOfMemory(u64),
}

/// A guest buffer: `len` bytes at `addr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// Where a queue's descriptor table is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DescTable {
    pub addr: GuestAddress,
    pub size: u16,
}

/// The buffers of a chain, split by direction.
#[derive(Debug, Default)]
pub(crate) struct RawChain {
    pub readable: Vec<Segment>,
    pub writable: Vec<Segment>,
    /// First problem seen that still allows answering with a status byte.
    pub error: Option<RequestError>,
}

/// Walks the chain starting at `head` in `table`.
pub(crate) fn walk(
    mem: &GuestMemoryMmap,
    table: DescTable,
    head: u16,
) -> Result<RawChain, DropReason> {
    let mut raw = RawChain::default();
    let mut table = table;
    let mut index = head;
    let mut indirect = false;
    let mut in_table = 0usize; // descriptors visited in the current table
    let mut total = 0usize;
    loop {
        if index >= table.size {
            return Err(DropReason::BadIndex {
                index,
                size: table.size,
            });
        }
        total += 1;
        in_table += 1;
        // More descriptors than the table holds means we are going round in circles.
        if total > MAX_CHAIN_DESCRIPTORS || in_table > usize::from(table.size) {
            return Err(DropReason::TooLong);
        }
        let at = table
            .addr
            .checked_add(u64::from(index) * DESC_SIZE)
            .ok_or(DropReason::UnreadableDescriptor(table.addr.0))?;
        let desc: Descriptor = mem
            .read_obj(at)
            .map_err(|_| DropReason::UnreadableDescriptor(at.0))?;

        if desc.refers_to_indirect_table() {
            let len = desc.len();
            let entries = u64::from(len) / DESC_SIZE;
            if indirect
                || desc.has_next()
                || len == 0
                || u64::from(len) % DESC_SIZE != 0
                || entries > u64::from(u16::MAX)
            {
                return Err(DropReason::BadIndirect(len));
            }
            table = DescTable {
                addr: desc.addr(),
                size: entries as u16,
            };
            index = 0;
            indirect = true;
            in_table = 0;
            continue;
        }

        if desc.len() > 0 {
            let seg = Segment {
                addr: desc.addr(),
                len: desc.len(),
            };
            if !mem.check_range(seg.addr, seg.len as usize) && raw.error.is_none() {
                raw.error = Some(RequestError::BadAddress {
                    addr: seg.addr.0,
                    len: seg.len,
                });
            }
            if desc.is_write_only() {
                raw.writable.push(seg);
            } else {
                if !raw.writable.is_empty() && raw.error.is_none() {
                    raw.error = Some(RequestError::ReadableAfterWritable);
                }
                raw.readable.push(seg);
            }
        }
        if !desc.has_next() {
            return Ok(raw);
        }
        index = desc.next();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };

    const N: u16 = VRING_DESC_F_NEXT as u16;
    const W: u16 = VRING_DESC_F_WRITE as u16;
    const I: u16 = VRING_DESC_F_INDIRECT as u16;
    const TABLE: GuestAddress = GuestAddress(0x1000);

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn put(
        mem: &GuestMemoryMmap,
        table: GuestAddress,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let d = Descriptor::new(addr, len, flags, next);
        mem.write_obj(d, table.unchecked_add(u64::from(i) * 16))
            .unwrap();
    }

    fn t(size: u16) -> DescTable {
        DescTable { addr: TABLE, size }
    }

    #[test]
    fn normal_chain_splits_directions() {
        let m = mem();
        put(&m, TABLE, 0, 0x8000, 16, N, 5);
        put(&m, TABLE, 5, 0x9000, 512, N | W, 2);
        put(&m, TABLE, 2, 0xa000, 1, W, 0);
        let c = walk(&m, t(8), 0).unwrap();
        assert_eq!(
            c.readable,
            vec![Segment {
                addr: GuestAddress(0x8000),
                len: 16
            }]
        );
        assert_eq!(c.writable.len(), 2);
        assert!(c.error.is_none());
    }

    #[test]
    fn loops_and_bad_indices_are_dropped() {
        let m = mem();
        put(&m, TABLE, 0, 0x8000, 16, N, 1);
        put(&m, TABLE, 1, 0x9000, 1, N | W, 0);
        assert_eq!(walk(&m, t(8), 0).unwrap_err(), DropReason::TooLong);
        put(&m, TABLE, 1, 0x9000, 1, N | W, 9);
        assert!(matches!(
            walk(&m, t(8), 0),
            Err(DropReason::BadIndex { index: 9, .. })
        ));
        assert!(matches!(
            walk(&m, t(8), 8),
            Err(DropReason::BadIndex { index: 8, .. })
        ));
        // A table outside memory.
        let far = DescTable {
            addr: GuestAddress(u64::MAX - 8),
            size: 4,
        };
        assert!(matches!(
            walk(&m, far, 1),
            Err(DropReason::UnreadableDescriptor(_))
        ));
    }

    #[test]
    fn huge_lengths_and_bad_addresses_keep_the_status() {
        let m = mem();
        put(&m, TABLE, 0, 0x8000, 16, N, 1);
        put(&m, TABLE, 1, 0x9000, u32::MAX, N | W, 2);
        put(&m, TABLE, 2, u64::MAX - 3, u32::MAX, N | W, 3);
        put(&m, TABLE, 3, 0xa000, 1, W, 0);
        let c = walk(&m, t(8), 0).unwrap();
        assert_eq!(c.writable.len(), 3);
        assert!(matches!(
            c.error,
            Some(RequestError::BadAddress { addr: 0x9000, .. })
        ));
    }

    #[test]
    fn indirect_tables() {
        let m = mem();
        let ind = GuestAddress(0x4000);
        put(&m, TABLE, 3, ind.0, 3 * 16, I, 0);
        put(&m, ind, 0, 0x8000, 16, N, 1);
        put(&m, ind, 1, 0x9000, 4096, N | W, 2);
        put(&m, ind, 2, 0xa000, 1, W, 0);
        let c = walk(&m, t(8), 3).unwrap();
        assert_eq!((c.readable.len(), c.writable.len()), (1, 2));
        // Bad table lengths, nesting and INDIRECT|NEXT are dropped.
        put(&m, TABLE, 3, ind.0, 17, I, 0);
        assert_eq!(walk(&m, t(8), 3).unwrap_err(), DropReason::BadIndirect(17));
        put(&m, TABLE, 3, ind.0, 0, I, 0);
        assert_eq!(walk(&m, t(8), 3).unwrap_err(), DropReason::BadIndirect(0));
        put(&m, TABLE, 3, ind.0, 48, I | N, 0);
        assert_eq!(walk(&m, t(8), 3).unwrap_err(), DropReason::BadIndirect(48));
        put(&m, TABLE, 3, ind.0, 48, I, 0);
        put(&m, ind, 1, ind.0, 48, I, 0);
        assert_eq!(walk(&m, t(8), 3).unwrap_err(), DropReason::BadIndirect(48));
        // An indirect loop.
        put(&m, ind, 1, 0x9000, 4096, N | W, 0);
        assert_eq!(walk(&m, t(8), 3).unwrap_err(), DropReason::TooLong);
    }
}
