//! Learning a backend's device type from what it offers, without the user typing it.
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

use std::fmt;
use std::str::FromStr;

/// The virtio device types hype can attach.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeviceType {
    /// virtio-blk.
    Block,
    /// virtio-net.
    Net,
    /// virtio-console.
    Console,
}

/// All types, in detection order.
pub const ALL_TYPES: [DeviceType; 3] = [DeviceType::Block, DeviceType::Net, DeviceType::Console];

impl DeviceType {
    /// The virtio device ID.
    pub fn virtio_id(self) -> u32 {
        match self {
            DeviceType::Net => 1,
            DeviceType::Block => 2,
            DeviceType::Console => 3,
        }
    }

    /// Short name, as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            DeviceType::Block => "blk",
            DeviceType::Net => "net",
            DeviceType::Console => "console",
        }
    }

    /// Bytes of configuration space hype reads from the backend and shows the guest.
    pub fn config_size(self) -> u32 {
        match self {
            // struct virtio_blk_config up to write_zeroes_may_unmap and its padding.
            DeviceType::Block => 60,
            // mac, status, max_virtqueue_pairs, mtu.
            DeviceType::Net => 12,
            // cols, rows, max_nr_ports, emerg_wr.
            DeviceType::Console => 12,
        }
    }

    /// Config fields the driver may write, and the feature that allows it.
    pub fn writable_config(self) -> Vec<super::mmio::ConfigField> {
        use super::mmio::ConfigField;
        match self {
            // writeback, with VIRTIO_BLK_F_CONFIG_WCE.
            DeviceType::Block => vec![ConfigField {
                offset: 32,
                len: 1,
                feature: 1 << 11,
                sticky: true,
            }],
            DeviceType::Net => vec![],
            // emerg_wr, with VIRTIO_CONSOLE_F_EMERG_WRITE.
            DeviceType::Console => vec![ConfigField {
                offset: 8,
                len: 4,
                feature: 1 << 2,
                sticky: false,
            }],
        }
    }

    /// Device feature bits that identify the type.
    pub fn signature(self) -> u64 {
        match self {
            DeviceType::Block => 1 << 2 | 1 << 6 | 1 << 9,
            DeviceType::Net => 1 << 5 | 1 << 16,
            DeviceType::Console => 1 << 2,
        }
    }

    /// Whether `features` carry this type's signature.
    pub fn matches(self, features: u64) -> bool {
        let sig = self.signature();
        if features & sig != sig {
            return false;
        }
        match self {
            // Console devices define only bits 0..=2.
            DeviceType::Console => features & DEVICE_BITS & !0b111 == 0,
            _ => true,
        }
    }

    /// Checks a configuration space this type would have; `queue_num` is GET_QUEUE_NUM's
    /// answer when known.
    pub fn check_config(
        self,
        features: u64,
        config: &[u8],
        queue_num: Option<u64>,
    ) -> Result<(), String> {
        let le16 = |o: usize| {
            config
                .get(o..o + 2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
        };
        let le32 = |o: usize| {
            config
                .get(o..o + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        match self {
            DeviceType::Block => {
                if features & 1 << 6 != 0 {
                    let bs = le32(20).ok_or("config too short for blk_size")?;
                    if !bs.is_power_of_two() || !(512..=65536).contains(&bs) {
                        return Err(format!("blk_size {bs} is not a block size"));
                    }
                }
                if features & 1 << 12 != 0 {
                    let n = le16(34).ok_or("config too short for num_queues")?;
                    if n == 0 || queue_num.is_some_and(|q| u64::from(n) > q) {
                        return Err(format!("num_queues {n} (backend has {queue_num:?})"));
                    }
                }
                Ok(())
            }
            DeviceType::Net => {
                let mac = config.get(0..6).ok_or("config too short for a MAC")?;
                if mac.iter().all(|b| *b == 0) || mac[0] & 1 != 0 {
                    return Err(format!("MAC {mac:02x?} is not a unicast address"));
                }
                Ok(())
            }
            DeviceType::Console => {
                if features & 1 << 1 != 0 {
                    let ports = le32(4).ok_or("config too short for max_nr_ports")?;
                    if ports == 0 {
                        return Err("max_nr_ports is 0".into());
                    }
                }
                Ok(())
            }
        }
    }

    /// A one-line description of what the config says (capacity, MAC), for logs.
    pub fn describe_config(self, config: &[u8]) -> String {
        match self {
            DeviceType::Block => match config.get(0..8) {
                Some(b) => {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    let sectors = u64::from_le_bytes(a);
                    format!("{sectors} sectors ({} MiB)", sectors >> 11)
                }
                None => "no capacity".into(),
            },
            DeviceType::Net => match config.get(0..6) {
                Some(m) => format!(
                    "MAC {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                    m[0], m[1], m[2], m[3], m[4], m[5]
                ),
                None => "no MAC".into(),
            },
            DeviceType::Console => "console".into(),
        }
    }
}

/// Device-specific feature bits (0..=23).
pub const DEVICE_BITS: u64 = (1 << 24) - 1;

impl fmt::Display for DeviceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DeviceType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "blk" | "block" => Ok(DeviceType::Block),
            "net" => Ok(DeviceType::Net),
            "console" => Ok(DeviceType::Console),
            _ => Err(format!(
                "unknown device type '{s}' (hype attaches blk, net, console)"
            )),
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

    #[test]
    fn net_and_console_signatures() {
        let net = 1 << 32 | 1 << 5 | 1 << 16 | 1 << 0 | 1 << 1 | 1 << 22;
        assert_eq!(type_from_features(net), Ok(DeviceType::Net));
        let mut c = vec![0u8; 12];
        assert!(DeviceType::Net.check_config(net, &c, None).is_err());
        c[0..6].copy_from_slice(&[0x52, 0x54, 0, 1, 2, 3]);
        assert_eq!(DeviceType::Net.check_config(net, &c, None), Ok(()));
        c[0] = 0x01;
        assert!(DeviceType::Net.check_config(net, &c, None).is_err());
        let console = 1 << 32 | 1 << 2 | 1 << 0;
        assert_eq!(type_from_features(console), Ok(DeviceType::Console));
        assert_eq!(
            DeviceType::Console.check_config(console, &[0; 12], None),
            Ok(())
        );
        assert!(DeviceType::Console
            .check_config(console | 1 << 1, &[0; 12], None)
            .is_err());
    }

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
    }
}
