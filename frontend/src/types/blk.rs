//! virtio-blk (device ID 2) as hype sees it: signature, config layout, writable fields.

use std::mem::offset_of;

use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_SEG_MAX,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;

use super::{le16, le32, ConfigField, QueueCountField, TypeSpec};
use crate::features::{bit, DEVICE_BITS};

/// Offset of `blk_size`.
pub const BLK_SIZE_OFFSET: usize = offset_of!(virtio_blk_config, blk_size);
/// Offset of `wce` (writeback).
pub const WCE_OFFSET: usize = offset_of!(virtio_blk_config, wce);
/// Offset of `num_queues`.
pub const NUM_QUEUES_OFFSET: usize = offset_of!(virtio_blk_config, num_queues);
/// Config bytes hype reads: `struct virtio_blk_config` up to `write_zeroes_may_unmap` and
/// its padding.
pub const CONFIG_SIZE: u32 = offset_of!(virtio_blk_config, max_secure_erase_sectors) as u32;

/// virtio-blk.
pub const SPEC: TypeSpec = TypeSpec {
    name: "blk",
    virtio_id: VIRTIO_ID_BLOCK,
    config_size: CONFIG_SIZE,
    signature: bit(VIRTIO_BLK_F_SEG_MAX) | bit(VIRTIO_BLK_F_BLK_SIZE) | bit(VIRTIO_BLK_F_FLUSH),
    device_bits: DEVICE_BITS,
    writable_config: &[ConfigField {
        offset: WCE_OFFSET as u32,
        len: 1,
        feature: bit(VIRTIO_BLK_F_CONFIG_WCE),
        sticky: true,
    }],
    queue_count: Some(QueueCountField {
        offset: NUM_QUEUES_OFFSET,
        width: 2,
        feature: bit(VIRTIO_BLK_F_MQ),
        excluded: 0,
    }),
    default_queues: 1,
    config_optional: false,
    check_config,
    describe_config,
};

fn check_config(features: u64, config: &[u8], queue_num: Option<u64>) -> Result<(), String> {
    if features & bit(VIRTIO_BLK_F_BLK_SIZE) != 0 {
        let bs = le32(config, BLK_SIZE_OFFSET).ok_or("config too short for blk_size")?;
        if !bs.is_power_of_two() || !(512..=65536).contains(&bs) {
            return Err(format!("blk_size {bs} is not a block size"));
        }
    }
    if features & bit(VIRTIO_BLK_F_MQ) != 0 {
        let n = le16(config, NUM_QUEUES_OFFSET).ok_or("config too short for num_queues")?;
        if n == 0 || queue_num.is_some_and(|q| u64::from(n) > q) {
            return Err(format!("num_queues {n} (backend has {queue_num:?})"));
        }
    }
    Ok(())
}

fn describe_config(config: &[u8]) -> String {
    match config.get(0..8) {
        Some(b) => {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            let sectors = u64::from_le_bytes(a);
            format!("{sectors} sectors ({} MiB)", sectors >> 11)
        }
        None => "no capacity".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::{type_from_features, DeviceType};
    use super::*;

    /// Features hype-block offers (plus VERSION_1, EVENT_IDX, INDIRECT, bit 30).
    const HYPE_BLK: u64 =
        1 << 32 | 1 << 29 | 1 << 28 | 1 << 30 | 1 << 2 | 1 << 6 | 1 << 9 | 1 << 10 | 1 << 12;

    fn blk_config(bs: u32, nq: u16) -> Vec<u8> {
        let mut c = vec![0u8; 60];
        c[0..8].copy_from_slice(&(1u64 << 17).to_le_bytes());
        c[20..24].copy_from_slice(&bs.to_le_bytes());
        c[34..36].copy_from_slice(&nq.to_le_bytes());
        c
    }

    #[test]
    fn layout_is_the_spec_layout() {
        assert_eq!(
            (BLK_SIZE_OFFSET, WCE_OFFSET, NUM_QUEUES_OFFSET),
            (20, 32, 34)
        );
        assert_eq!(CONFIG_SIZE, 60);
    }

    #[test]
    fn hype_block_is_recognised_read_only_or_not() {
        assert_eq!(type_from_features(HYPE_BLK), Ok(DeviceType::Block));
        // Read-only (RO = bit 5), discard and write-zeroes variants.
        assert_eq!(type_from_features(HYPE_BLK | 1 << 5), Ok(DeviceType::Block));
        assert_eq!(
            type_from_features(HYPE_BLK | 1 << 13 | 1 << 14),
            Ok(DeviceType::Block)
        );
        let t = DeviceType::Block;
        assert_eq!(
            t.check_config(HYPE_BLK, &blk_config(512, 1), Some(1)),
            Ok(())
        );
        assert!(t
            .check_config(HYPE_BLK, &blk_config(0, 1), Some(1))
            .is_err());
        assert!(t
            .check_config(HYPE_BLK, &blk_config(4096, 4), Some(2))
            .is_err());
        assert!(t
            .check_config(HYPE_BLK, &blk_config(4096, 0), None)
            .is_err());
        assert!(t.check_config(HYPE_BLK, &[0u8; 10], None).is_err());
        assert_eq!(
            t.describe_config(&blk_config(512, 1)),
            "131072 sectors (64 MiB)"
        );
    }
}
