//! What the guest sees of the device: feature bits and the virtio-blk config space.

use vhost::vhost_user::message::VhostUserVirtioFeatures;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_ID_BYTES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use crate::storage::SECTOR_SIZE;

/// Length of the config space we expose: `struct virtio_blk_config` up to and including
/// `write_zeroes_may_unmap` and its padding (secure-erase and zoned fields are not offered).
pub const CONFIG_SPACE_LEN: usize = 60;

/// Most segments (ranges) accepted in one DISCARD or WRITE_ZEROES request.
pub(crate) const MAX_DISCARD_SEGMENTS: u32 = 32;

/// Most sectors in one DISCARD or WRITE_ZEROES range: 1 GiB.
pub(crate) const MAX_DISCARD_SECTORS: u32 = 1 << 21;

/// Everything fixed about one device, derived from the storage info and builder options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct DeviceSpec {
    /// Capacity in 512-byte sectors (whole logical blocks only).
    pub capacity_sectors: u64,
    /// Logical block size in bytes.
    pub block_size: u32,
    /// Physical block size in bytes.
    pub physical_block_size: u32,
    /// Optimal I/O size in bytes.
    pub optimal_io_size: u32,
    pub read_only: bool,
    pub discard: bool,
    pub write_zeroes: bool,
    /// GET_ID answer: NUL-padded.
    pub serial: [u8; VIRTIO_BLK_ID_BYTES as usize],
    pub num_queues: u16,
    pub queue_size: u16,
    /// Most data segments per request advertised to the guest.
    pub seg_max: u32,
}

impl DeviceSpec {
    /// Logical block size in sectors.
    pub fn block_sectors(&self) -> u64 {
        u64::from(self.block_size) / SECTOR_SIZE
    }

    /// The virtio feature bits the device offers (plus the vhost-user PROTOCOL_FEATURES bit).
    pub fn features(&self) -> u64 {
        let mut f = 1u64 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_TOPOLOGY
            | 1 << VIRTIO_BLK_F_MQ
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            // Both change data, so they are pointless (and always fail) on a read-only disk.
            if self.discard {
                f |= 1 << VIRTIO_BLK_F_DISCARD;
            }
            if self.write_zeroes {
                f |= 1 << VIRTIO_BLK_F_WRITE_ZEROES;
            }
        }
        f
    }

    /// The full config space, little-endian, laid out as `struct virtio_blk_config`.
    pub fn config_space(&self) -> [u8; CONFIG_SPACE_LEN] {
        let mut c = [0u8; CONFIG_SPACE_LEN];
        let put = |c: &mut [u8; CONFIG_SPACE_LEN], off: usize, bytes: &[u8]| {
            c[off..off + bytes.len()].copy_from_slice(bytes);
        };
        put(&mut c, 0, &self.capacity_sectors.to_le_bytes()); // capacity
                                                              // 8: size_max (not offered)
        put(&mut c, 12, &self.seg_max.to_le_bytes()); // seg_max
                                                      // 16: geometry (not offered)
        put(&mut c, 20, &self.block_size.to_le_bytes()); // blk_size
        let ratio = (self.physical_block_size / self.block_size).max(1);
        c[24] = ratio.trailing_zeros() as u8; // physical_block_exp
        c[25] = 0; // alignment_offset
        put(
            &mut c,
            26,
            &(ratio.min(u32::from(u16::MAX)) as u16).to_le_bytes(),
        ); // min_io_size
        put(
            &mut c,
            28,
            &(self.optimal_io_size / self.block_size).to_le_bytes(),
        ); // opt_io_size
        c[32] = 1; // writeback: we have a volatile cache that FLUSH drains
        put(&mut c, 34, &self.num_queues.to_le_bytes()); // num_queues
        let align = (self.block_sectors() as u32).max(1);
        put(&mut c, 36, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_discard_sectors
        put(&mut c, 40, &MAX_DISCARD_SEGMENTS.to_le_bytes()); // max_discard_seg
        put(&mut c, 44, &align.to_le_bytes()); // discard_sector_alignment
        put(&mut c, 48, &MAX_DISCARD_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        put(&mut c, 52, &MAX_DISCARD_SEGMENTS.to_le_bytes()); // max_write_zeroes_seg
        c[56] = 1; // write_zeroes_may_unmap
        c
    }

    /// `size` bytes of config space from `offset`, as GET_CONFIG must answer: exactly `size`
    /// bytes, zero past the end of the structure.
    pub fn read_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let space = self.config_space();
        let size = size.min(256) as usize; // vhost-user caps config reads at 256 bytes
        let mut out = vec![0u8; size];
        let start = offset as usize;
        if start < space.len() {
            let n = (space.len() - start).min(size);
            out[..n].copy_from_slice(&space[start..start + n]);
        }
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn spec() -> DeviceSpec {
        let mut serial = [0u8; 20];
        serial[..4].copy_from_slice(b"test");
        DeviceSpec {
            capacity_sectors: 2048,
            block_size: 512,
            physical_block_size: 4096,
            optimal_io_size: 65536,
            read_only: false,
            discard: true,
            write_zeroes: true,
            serial,
            num_queues: 4,
            queue_size: 256,
            seg_max: 254,
        }
    }

    fn le32(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    #[test]
    fn config_layout_matches_virtio_blk_config() {
        let s = spec();
        let c = s.config_space();
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 2048);
        assert_eq!(le32(&c, 12), 254);
        assert_eq!(le32(&c, 20), 512);
        assert_eq!(c[24], 3, "4096/512 = 2^3");
        assert_eq!(u16::from_le_bytes([c[26], c[27]]), 8);
        assert_eq!(le32(&c, 28), 128);
        assert_eq!(u16::from_le_bytes([c[34], c[35]]), 4);
        assert_eq!(le32(&c, 36), MAX_DISCARD_SECTORS);
        assert_eq!(le32(&c, 40), MAX_DISCARD_SEGMENTS);
        assert_eq!(le32(&c, 44), 1);
        assert_eq!(c[56], 1);
        // The struct offsets agree with the C definition in virtio-bindings.
        use virtio_bindings::virtio_blk::virtio_blk_config as C;
        assert_eq!(std::mem::offset_of!(C, blk_size), 20);
        assert_eq!(std::mem::offset_of!(C, num_queues), 34);
        assert_eq!(std::mem::offset_of!(C, max_discard_sectors), 36);
        assert_eq!(std::mem::offset_of!(C, write_zeroes_may_unmap), 56);
    }

    #[test]
    fn read_config_returns_exact_size() {
        let s = spec();
        assert_eq!(s.read_config(0, 8), 2048u64.to_le_bytes().to_vec());
        assert_eq!(s.read_config(20, 4), 512u32.to_le_bytes().to_vec());
        let tail = s.read_config(56, 16);
        assert_eq!(tail.len(), 16);
        assert_eq!(tail[0], 1);
        assert!(tail[4..].iter().all(|&b| b == 0));
        assert_eq!(s.read_config(1000, 4), vec![0; 4]);
        assert_eq!(s.read_config(0, u32::MAX).len(), 256);
    }

    #[test]
    fn features_follow_capabilities() {
        let mut s = spec();
        let f = s.features();
        assert_ne!(f & 1 << VIRTIO_BLK_F_DISCARD, 0);
        assert_ne!(f & 1 << VIRTIO_BLK_F_WRITE_ZEROES, 0);
        assert_eq!(f & 1 << VIRTIO_BLK_F_RO, 0);
        assert_ne!(f & 1 << VIRTIO_F_VERSION_1, 0);
        s.read_only = true;
        let f = s.features();
        assert_ne!(f & 1 << VIRTIO_BLK_F_RO, 0);
        assert_eq!(f & 1 << VIRTIO_BLK_F_DISCARD, 0);
        assert_eq!(f & 1 << VIRTIO_BLK_F_WRITE_ZEROES, 0);
    }
}
