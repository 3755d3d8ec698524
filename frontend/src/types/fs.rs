//! virtio-fs (device ID 26) as hype sees it: config layout (`tag`, `num_request_queues`) and
//! the config hype builds for a backend that leaves the tag to the frontend (virtiofsd does).

use super::{le32, QueueCountField, TypeSpec};

/// virtio-fs's device ID (`VIRTIO_ID_FS`).
pub const VIRTIO_ID_FS: u32 = 26;
/// Bytes of `tag` (UTF-8, NUL-padded; not NUL-terminated when all 36 are used).
pub const TAG_LEN: usize = 36;
/// Offset of `num_request_queues` (le32).
pub const NUM_REQUEST_QUEUES_OFFSET: usize = TAG_LEN;
/// Config bytes: `tag`, `num_request_queues` (`notify_buf_size` needs a feature no backend
/// here offers).
pub const CONFIG_SIZE: u32 = 40;

/// virtio-fs.
pub const SPEC: TypeSpec = TypeSpec {
    name: "fs",
    virtio_id: VIRTIO_ID_FS,
    config_size: CONFIG_SIZE,
    // Never learned from features: given as `fs:PATH`.
    signature: 0,
    // Bit 0: VIRTIO_FS_F_NOTIFICATION.
    device_bits: 1,
    writable_config: &[],
    queue_count: Some(QueueCountField {
        offset: NUM_REQUEST_QUEUES_OFFSET,
        width: 4,
        feature: 0,
        excluded: 1,
    }),
    default_queues: 2,
    config_optional: true,
    check_config,
    describe_config,
};

/// The config of a share named `tag` with `request_queues` request queues.
pub fn config_with_tag(tag: &str, request_queues: u32) -> Result<Vec<u8>, String> {
    if tag.is_empty() || tag.len() > TAG_LEN || tag.contains('\0') {
        return Err(format!(
            "tag '{tag}': 1 to {TAG_LEN} bytes without NUL (the guest mounts it by this name)"
        ));
    }
    let mut c = vec![0u8; CONFIG_SIZE as usize];
    c[..tag.len()].copy_from_slice(tag.as_bytes());
    c[NUM_REQUEST_QUEUES_OFFSET..].copy_from_slice(&request_queues.to_le_bytes());
    Ok(c)
}

fn tag_of(config: &[u8]) -> Option<&[u8]> {
    let raw = config.get(..TAG_LEN)?;
    Some(raw.split(|b| *b == 0).next().unwrap_or(raw))
}

fn check_config(_features: u64, config: &[u8], queue_num: Option<u64>) -> Result<(), String> {
    let tag = tag_of(config).ok_or("config too short for a tag")?;
    if tag.is_empty() {
        return Err("empty tag".into());
    }
    let n = le32(config, NUM_REQUEST_QUEUES_OFFSET).ok_or("config too short")?;
    if n == 0 || queue_num.is_some_and(|q| u64::from(n) >= q.max(1)) {
        return Err(format!(
            "num_request_queues {n} (backend has {queue_num:?} queues)"
        ));
    }
    Ok(())
}

fn describe_config(config: &[u8]) -> String {
    match tag_of(config) {
        Some(t) => format!("tag '{}'", String::from_utf8_lossy(t)),
        None => "no tag".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::DeviceType;
    use super::*;

    #[test]
    fn tags_and_checks() {
        let c = config_with_tag("myfs", 1).unwrap();
        assert_eq!(DeviceType::Fs.check_config(0, &c, Some(2)), Ok(()));
        assert_eq!(DeviceType::Fs.describe_config(&c), "tag 'myfs'");
        assert!(DeviceType::Fs.check_config(0, &c, Some(1)).is_err());
        assert!(DeviceType::Fs.check_config(0, &[0u8; 40], None).is_err());
        assert!(DeviceType::Fs.check_config(0, &c[..20], None).is_err());
        assert!(config_with_tag("", 1).is_err());
        assert!(config_with_tag("a\0b", 1).is_err());
        assert!(config_with_tag(&"x".repeat(37), 1).is_err());
        let full = config_with_tag(&"x".repeat(36), 1).unwrap();
        assert_eq!(
            DeviceType::Fs.describe_config(&full),
            format!("tag '{}'", "x".repeat(36))
        );
    }
}
