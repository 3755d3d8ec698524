//! What hype knows about each virtio device type it attaches, one module per type
//! ([`blk`], [`net`], [`console`], [`fs`], [`vsock`], [`rng`], and [`generic`] for any other
//! virtio device ID), and learning a backend's type from what it offers.
//!
//! vhost-user has no "device type" message, so hype recognises a backend from its virtio
//! feature bits and then checks the device configuration it returns (GET_CONFIG at offset 0):
//!
//! | type | signature: device feature bits that must all be offered | config check |
//! |---|---|---|
//! | `blk` (ID 2) | SEG_MAX (2), BLK_SIZE (6), FLUSH (9) | `blk_size` a power of two, 512..=64 KiB; with MQ, `num_queues` >= 1 |
//! | `net` (ID 1) | MAC (5), STATUS (16) | `mac` a non-zero unicast address |
//! | `console` (ID 3) | EMERG_WRITE (2), and no device bit above 2 | with MULTIPORT, `max_nr_ports` >= 1 |
//!
//! The backend must offer VERSION_1 and the CONFIG protocol feature. Exactly one signature must
//! match and its config check must pass; otherwise the device needs an explicit type
//! (`--device blk:/path.sock`). hype's own backends always offer their type's signature (this
//! is the hype convention; it is plain standard vhost-user), and so do most third-party ones
//! (qemu-storage-daemon's vhost-user-blk export does).
//!
//! The other types have no feature signature (virtio-fs, vsock and rng define almost no
//! feature bits), so they are only ever given explicitly: `fs:PATH`, `vsock:PATH`, `rng:PATH`,
//! or a numeric virtio device ID (`26:PATH`; an ID hype knows maps to its type). Their facts:
//!
//! | type | ID | default queues | config | CONFIG protocol feature |
//! |---|---|---|---|---|
//! | `fs` | 26 | 2 (hiprio + 1 request queue) | `tag[36]`, `num_request_queues` (40 bytes) | optional: without it hype builds the config from `tag=` (virtiofsd leaves the tag to the frontend) |
//! | `vsock` | 19 | 3 (rx, tx, event) | `guest_cid` (8 bytes) | required (the backend owns the CID) |
//! | `rng` | 4 | 1 | none | not needed |
//! | other ID | N | 1 | none shown (the size is not known) | not needed |
//!
//! A backend that offers MQ tells its queue count (GET_QUEUE_NUM); without MQ the count is
//! the type's default.

pub mod blk;
pub mod console;
pub mod fs;
pub mod generic;
pub mod net;
pub mod rng;
pub mod vsock;

use std::fmt;
use std::str::FromStr;

use crate::features::DEVICE_BITS;

/// The virtio device types hype can attach.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeviceType {
    /// virtio-blk.
    Block,
    /// virtio-net.
    Net,
    /// virtio-console.
    Console,
    /// virtio-fs (never learned: give it as `fs:PATH`).
    Fs,
    /// virtio-vsock (never learned).
    Vsock,
    /// virtio-rng, the entropy device (never learned).
    Rng,
    /// Any other virtio device ID, passed through as it is (never learned).
    Other(u32),
}

/// The types learned from a backend's features, in detection order.
pub const ALL_TYPES: [DeviceType; 3] = [DeviceType::Block, DeviceType::Net, DeviceType::Console];

/// Every named type, learned or not (for names and IDs).
pub const NAMED_TYPES: [DeviceType; 6] = [
    DeviceType::Block,
    DeviceType::Net,
    DeviceType::Console,
    DeviceType::Fs,
    DeviceType::Vsock,
    DeviceType::Rng,
];

/// A config field the driver may write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConfigField {
    /// Offset in the config space.
    pub offset: u32,
    /// Length in bytes.
    pub len: u32,
    /// Feature bit(s) that make it writable.
    pub feature: u64,
    /// Whether a write sets device state (replayed to a backend that comes back), rather than
    /// being an event (virtio-console `emerg_wr` writes a character: never replayed).
    pub sticky: bool,
}

/// A little-endian config field that holds the device's queue count (less `excluded`
/// queues it does not count), present when `feature` is offered (always when it is 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueCountField {
    /// Offset in the config space.
    pub offset: usize,
    /// Width in bytes: 2 or 4.
    pub width: usize,
    /// Feature bit that makes the field valid; 0: always valid.
    pub feature: u64,
    /// Queues the field does not count (virtio-fs counts request queues, not hiprio).
    pub excluded: u16,
}

/// Checks a configuration space: `(features, config, queue_num)`, the reason when it is wrong.
pub type ConfigCheck = fn(u64, &[u8], Option<u64>) -> Result<(), String>;

/// Everything hype knows about one device type. Each type's module defines its `SPEC`.
#[derive(Clone, Copy, Debug)]
pub struct TypeSpec {
    /// Short name, as on the command line.
    pub name: &'static str,
    /// The virtio device ID.
    pub virtio_id: u32,
    /// Bytes of configuration space hype reads from the backend and shows the guest.
    pub config_size: u32,
    /// Device feature bits that identify the type (all must be offered).
    pub signature: u64,
    /// The device-specific feature bits the type defines: a backend offering any other
    /// device bit is not of this type.
    pub device_bits: u64,
    /// Config fields the driver may write.
    pub writable_config: &'static [ConfigField],
    /// The config field with the queue count, if the type has one: the VMM shows the guest
    /// the count it exposes there, not what the backend could do.
    pub queue_count: Option<QueueCountField>,
    /// Queues when the backend does not say (no MQ): the spec's minimum for the type.
    pub default_queues: u16,
    /// Whether the backend may lack the CONFIG protocol feature: the frontend then shows the
    /// guest a config it builds itself ([`DeviceType::frontend_config`]).
    pub config_optional: bool,
    /// Checks a configuration space of this type (`queue_num`: GET_QUEUE_NUM's answer).
    pub check_config: ConfigCheck,
    /// A one-line description of what the config says, for logs.
    pub describe_config: fn(config: &[u8]) -> String,
}

impl DeviceType {
    /// Everything hype knows about this type.
    pub fn spec(self) -> &'static TypeSpec {
        match self {
            DeviceType::Block => &blk::SPEC,
            DeviceType::Net => &net::SPEC,
            DeviceType::Console => &console::SPEC,
            DeviceType::Fs => &fs::SPEC,
            DeviceType::Vsock => &vsock::SPEC,
            DeviceType::Rng => &rng::SPEC,
            DeviceType::Other(_) => &generic::SPEC,
        }
    }

    /// The type of virtio device ID `id`: a named type where hype knows the ID, else
    /// [`DeviceType::Other`].
    pub fn from_virtio_id(id: u32) -> DeviceType {
        NAMED_TYPES
            .into_iter()
            .find(|t| t.virtio_id() == id)
            .unwrap_or(DeviceType::Other(id))
    }

    /// The virtio device ID.
    pub fn virtio_id(self) -> u32 {
        match self {
            DeviceType::Other(id) => id,
            _ => self.spec().virtio_id,
        }
    }

    /// Queues when the backend does not say (no MQ).
    pub fn default_queues(self) -> u16 {
        self.spec().default_queues
    }

    /// Whether the backend may lack the CONFIG protocol feature (see
    /// [`TypeSpec::config_optional`]).
    pub fn config_optional(self) -> bool {
        self.spec().config_optional
    }

    /// The config the frontend shows the guest when the backend does not offer CONFIG, for
    /// the types that allow that: virtio-fs needs `tag` (1 to 36 bytes, no NUL); the queue
    /// count field is written later ([`DeviceType::set_queue_count`]). `Ok(None)`: this type
    /// needs the backend's config.
    pub fn frontend_config(self, tag: Option<&str>) -> Result<Option<Vec<u8>>, String> {
        match self {
            DeviceType::Fs => match tag {
                Some(t) => fs::config_with_tag(t, 1).map(Some),
                None => Err(
                    "the backend does not offer its config (no CONFIG protocol feature): give the \
                     share's tag=NAME"
                        .into(),
                ),
            },
            _ if self.config_optional() && self.config_size() == 0 => Ok(Some(Vec::new())),
            _ => Ok(None),
        }
    }

    /// Short name, as on the command line.
    pub fn name(self) -> &'static str {
        self.spec().name
    }

    /// Bytes of configuration space hype reads from the backend and shows the guest.
    pub fn config_size(self) -> u32 {
        self.spec().config_size
    }

    /// Config fields the driver may write, and the feature that allows each.
    pub fn writable_config(self) -> Vec<ConfigField> {
        self.spec().writable_config.to_vec()
    }

    /// Whether a config write of `len` bytes at `offset` sets device state that a backend
    /// coming back must be told again.
    pub fn is_sticky_write(self, offset: u32, len: usize) -> bool {
        let end = u64::from(offset).saturating_add(len as u64);
        self.spec().writable_config.iter().any(|f| {
            f.sticky && offset >= f.offset && end <= u64::from(f.offset) + u64::from(f.len)
        })
    }

    /// Device feature bits that identify the type.
    pub fn signature(self) -> u64 {
        self.spec().signature
    }

    /// Whether `features` carry this type's signature (and no device bit it does not define).
    pub fn matches(self, features: u64) -> bool {
        let spec = self.spec();
        features & spec.signature == spec.signature
            && features & DEVICE_BITS & !spec.device_bits == 0
    }

    /// Checks a configuration space this type would have; `queue_num` is GET_QUEUE_NUM's
    /// answer when known.
    pub fn check_config(
        self,
        features: u64,
        config: &[u8],
        queue_num: Option<u64>,
    ) -> Result<(), String> {
        (self.spec().check_config)(features, config, queue_num)
    }

    /// A one-line description of what the config says (capacity, MAC), for logs.
    pub fn describe_config(self, config: &[u8]) -> String {
        (self.spec().describe_config)(config)
    }

    /// Writes the queue count the guest is shown into `config`, for types that have the
    /// field and when its feature is offered; otherwise leaves `config` as it is.
    pub fn set_queue_count(self, features: u64, config: &mut [u8], count: u16) {
        if let Some(f) = self.spec().queue_count {
            if f.feature == 0 || features & f.feature != 0 {
                let shown = u32::from(count.saturating_sub(f.excluded)).to_le_bytes();
                let src = shown.get(..f.width).unwrap_or(&shown);
                if let Some(dst) = config.get_mut(f.offset..f.offset + src.len()) {
                    dst.copy_from_slice(src);
                }
            }
        }
    }

    /// Copies the queue-count field (if the type has one) from `shown` into `config`: a new
    /// config from the backend must not change the count the guest was shown.
    pub fn keep_queue_count(self, shown: &[u8], config: &mut [u8]) {
        if let Some(f) = self.spec().queue_count {
            let range = f.offset..f.offset + f.width;
            if let (Some(src), Some(dst)) = (shown.get(range.clone()), config.get_mut(range)) {
                dst.copy_from_slice(src);
            }
        }
    }
}

/// A little-endian u16 at `offset` of a config space, if it is long enough.
pub(crate) fn le16(config: &[u8], offset: usize) -> Option<u16> {
    let b = config.get(offset..offset.checked_add(2)?)?;
    Some(u16::from_le_bytes([b[0], b[1]]))
}

/// A little-endian u32 at `offset` of a config space, if it is long enough.
pub(crate) fn le32(config: &[u8], offset: usize) -> Option<u32> {
    let b = config.get(offset..offset.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

impl fmt::Display for DeviceType {
    /// The name, or the virtio device ID of an [`DeviceType::Other`] (what
    /// [`DeviceType::from_str`] reads back).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceType::Other(id) => write!(f, "{id}"),
            _ => f.write_str(self.name()),
        }
    }
}

impl FromStr for DeviceType {
    type Err = String;
    /// A name (`blk`, `net`, `console`, `fs`, `vsock`, `rng`) or a virtio device ID (1 to
    /// 65535; an ID hype knows gives its named type).
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "blk" | "block" => Ok(DeviceType::Block),
            "net" => Ok(DeviceType::Net),
            "console" => Ok(DeviceType::Console),
            "fs" | "virtiofs" => Ok(DeviceType::Fs),
            "vsock" => Ok(DeviceType::Vsock),
            "rng" => Ok(DeviceType::Rng),
            _ => match s.parse::<u16>() {
                Ok(id) if id > 0 => Ok(DeviceType::from_virtio_id(u32::from(id))),
                _ => Err(format!(
                    "unknown device type '{s}' (hype attaches blk, net, console, fs, vsock, rng, or a virtio device ID from 1 to 65535)"
                )),
            },
        }
    }
}

/// Why a backend's type could not be learned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DetectError {
    /// No signature matched.
    #[error("features {features:#x} match no known device type; give the type explicitly (blk:PATH, net:PATH, console:PATH)")]
    Unrecognised {
        /// Features offered.
        features: u64,
    },
    /// More than one signature matched.
    #[error(
        "features {features:#x} match several device types ({names}); give the type explicitly"
    )]
    Ambiguous {
        /// Features offered.
        features: u64,
        /// The matching types.
        names: String,
    },
    /// The signature matched but the config did not look like that type's.
    #[error("looks like {kind} by its features, but its config does not: {reason}; give the type explicitly")]
    ConfigMismatch {
        /// The type the features suggested.
        kind: DeviceType,
        /// What was wrong.
        reason: String,
    },
}

/// The one type whose signature `features` carry.
pub fn type_from_features(features: u64) -> Result<DeviceType, DetectError> {
    let found: Vec<DeviceType> = ALL_TYPES
        .into_iter()
        .filter(|t| t.matches(features))
        .collect();
    match found.as_slice() {
        [one] => Ok(*one),
        [] => Err(DetectError::Unrecognised { features }),
        many => Err(DetectError::Ambiguous {
            features,
            names: many.iter().map(|t| t.name()).collect::<Vec<_>>().join(", "),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::bit;

    #[test]
    fn unknown_and_ambiguous() {
        assert!(matches!(
            type_from_features(1 << 32 | 1 << 0),
            Err(DetectError::Unrecognised { .. })
        ));
        assert!(matches!(
            type_from_features(1 << 32),
            Err(DetectError::Unrecognised { .. })
        ));
        // blk signature plus net signature.
        let e = type_from_features(1 << 2 | 1 << 6 | 1 << 9 | 1 << 5 | 1 << 16).unwrap_err();
        assert!(matches!(e, DetectError::Ambiguous { .. }), "{e}");
        assert!(e.to_string().contains("blk, net"), "{e}");
        assert_eq!("block".parse::<DeviceType>(), Ok(DeviceType::Block));
        assert!("gpu".parse::<DeviceType>().is_err());
        assert!("0".parse::<DeviceType>().is_err());
        assert!("65536".parse::<DeviceType>().is_err());
    }

    #[test]
    fn numeric_ids_name_known_types_and_pass_others_through() {
        assert_eq!("26".parse::<DeviceType>(), Ok(DeviceType::Fs));
        assert_eq!("19".parse::<DeviceType>(), Ok(DeviceType::Vsock));
        assert_eq!("4".parse::<DeviceType>(), Ok(DeviceType::Rng));
        assert_eq!("2".parse::<DeviceType>(), Ok(DeviceType::Block));
        let gpu = "16".parse::<DeviceType>().unwrap();
        assert_eq!(gpu, DeviceType::Other(16));
        assert_eq!(gpu.virtio_id(), 16);
        assert_eq!(gpu.to_string(), "16");
        assert_eq!(gpu.to_string().parse::<DeviceType>(), Ok(gpu));
        assert_eq!(gpu.config_size(), 0);
        assert_eq!(gpu.frontend_config(None), Ok(Some(Vec::new())));
        for t in NAMED_TYPES {
            assert_eq!(t.to_string().parse::<DeviceType>(), Ok(t));
            assert_eq!(DeviceType::from_virtio_id(t.virtio_id()), t);
            assert!(t.default_queues() >= 1, "{t}");
        }
        // The unlearned types never match a feature signature.
        for t in [DeviceType::Fs, DeviceType::Vsock, DeviceType::Rng] {
            assert!(!ALL_TYPES.contains(&t));
        }
    }

    #[test]
    fn frontend_configs() {
        assert_eq!(DeviceType::Rng.frontend_config(None), Ok(Some(Vec::new())));
        assert_eq!(DeviceType::Vsock.frontend_config(Some("x")), Ok(None));
        assert_eq!(DeviceType::Block.frontend_config(None), Ok(None));
        assert!(DeviceType::Fs.frontend_config(None).is_err());
        let c = DeviceType::Fs
            .frontend_config(Some("share"))
            .unwrap()
            .unwrap();
        assert_eq!(c.len(), 40);
        assert_eq!(&c[..6], b"share\0");
        let mut c = c;
        DeviceType::Fs.set_queue_count(0, &mut c, 3);
        assert_eq!(&c[36..40], &[2, 0, 0, 0], "hiprio is not a request queue");
    }

    #[test]
    fn ids_and_names_come_from_the_specs() {
        for t in ALL_TYPES {
            assert_eq!(t.to_string().parse::<DeviceType>(), Ok(t));
            assert_eq!(t.spec().signature & !t.spec().device_bits, 0, "{t}");
            assert!(
                !t.config_optional(),
                "{t}: learned types need the backend's config"
            );
        }
        assert_eq!(
            ALL_TYPES.map(DeviceType::virtio_id),
            [2, 1, 3],
            "blk, net, console"
        );
    }

    #[test]
    fn sticky_writes_are_inside_a_sticky_field() {
        // blk writeback (1 byte at 32) is state; console emerg_wr (4 at 8) is an event.
        assert!(DeviceType::Block.is_sticky_write(32, 1));
        assert!(!DeviceType::Block.is_sticky_write(32, 2));
        assert!(!DeviceType::Block.is_sticky_write(u32::MAX, usize::MAX));
        assert!(!DeviceType::Console.is_sticky_write(8, 4));
        assert!(!DeviceType::Net.is_sticky_write(0, 1));
    }

    #[test]
    fn queue_count_is_shown_only_where_the_type_has_it() {
        let mq = bit(virtio_bindings::virtio_blk::VIRTIO_BLK_F_MQ);
        let mut c = vec![0u8; 60];
        DeviceType::Block.set_queue_count(mq, &mut c, 3);
        assert_eq!(&c[34..36], &[3, 0]);
        let mut without = vec![0u8; 60];
        DeviceType::Block.set_queue_count(0, &mut without, 3);
        assert_eq!(without, vec![0u8; 60]);
        let mut short = vec![0u8; 35];
        DeviceType::Block.set_queue_count(mq, &mut short, 3);
        assert_eq!(short, vec![0u8; 35]);
        let mut net = vec![0u8; 12];
        DeviceType::Net.set_queue_count(u64::MAX, &mut net, 3);
        assert_eq!(net, vec![0u8; 12]);
        let mut fresh = vec![9u8; 60];
        DeviceType::Block.keep_queue_count(&c, &mut fresh);
        assert_eq!(&fresh[34..36], &[3, 0]);
        assert_eq!(fresh[33], 9);
    }
}
