//! What the device offers: virtio feature bits, the config space, and the mapping from the
//! guest's acked offloads to the tap's.

use std::fmt;
use std::str::FromStr;

use vhost::vhost_user::message::VhostUserVirtioFeatures;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use crate::tap::offload;

/// `VIRTIO_NET_F_*` bit as a mask.
const fn bit(b: u32) -> u64 {
    1u64 << b
}

/// Size of the config space we expose: mac, status, max_virtqueue_pairs, mtu.
pub const CONFIG_SIZE: usize = 12;

/// Most queue pairs a device may have (virtio limit is 0x8000; we keep it small enough that
/// every queue gets a thread).
pub const MAX_QUEUE_PAIRS: u16 = 64;

/// An Ethernet MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A random locally administered unicast address.
    pub fn random() -> MacAddr {
        let mut b = [0u8; 6];
        // SAFETY: getrandom writes at most `b.len()` bytes into the valid buffer.
        let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
        if n != b.len() as isize {
            // Entropy is not critical here: fall back to time and pid.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0) as u64
                ^ u64::from(std::process::id());
            b.copy_from_slice(&t.to_le_bytes()[..6]);
        }
        b[0] = (b[0] & 0xfe) | 0x02;
        MacAddr(b)
    }
}

impl FromStr for MacAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid MAC address {s:?} (expected e.g. 52:54:00:12:34:56)");
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in out.iter_mut() {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        // The same rule as the VMM's check of a net device's config (hype-frontend's
        // `types::net`): a zero or multicast address is refused there, so it is here.
        if out[0] & 1 != 0 {
            return Err(format!("MAC address {s} is multicast"));
        }
        if out == [0; 6] {
            return Err(format!("MAC address {s} is all zeroes"));
        }
        Ok(MacAddr(out))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// The fixed description of one net device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetSpec {
    /// The guest's MAC address.
    pub mac: MacAddr,
    /// MTU offered to the guest (`VIRTIO_NET_F_MTU`), if any.
    pub mtu: Option<u16>,
    /// Queue pairs (RX queue 2i, TX queue 2i+1); the control queue is queue 2 * pairs.
    pub queue_pairs: u16,
    /// Largest queue size the frontend may choose.
    pub queue_size: u16,
    /// `TUN_F_*` offloads the tap supports.
    pub tap_offloads: u32,
}

impl NetSpec {
    /// Number of virtqueues: the pairs and the control queue.
    pub fn num_queues(&self) -> usize {
        usize::from(self.queue_pairs) * 2 + 1
    }

    /// Index of the control queue.
    pub fn ctrl_queue(&self) -> usize {
        usize::from(self.queue_pairs) * 2
    }

    /// The virtio features offered (with vhost-user's PROTOCOL_FEATURES bit).
    pub fn features(&self) -> u64 {
        let mut f = bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | bit(VIRTIO_RING_F_INDIRECT_DESC)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | bit(VIRTIO_NET_F_MAC)
            | bit(VIRTIO_NET_F_STATUS)
            | bit(VIRTIO_NET_F_MRG_RXBUF)
            | bit(VIRTIO_NET_F_CTRL_VQ)
            // The tap accepts partial checksums and GSO frames from us whatever its
            // TUNSETOFFLOAD state (that only governs what it hands us).
            | bit(VIRTIO_NET_F_CSUM)
            | bit(VIRTIO_NET_F_HOST_TSO4)
            | bit(VIRTIO_NET_F_HOST_TSO6)
            | bit(VIRTIO_NET_F_HOST_ECN)
            | bit(VIRTIO_NET_F_HOST_UFO);
        if self.queue_pairs > 1 {
            f |= bit(VIRTIO_NET_F_MQ);
        }
        if self.mtu.is_some() {
            f |= bit(VIRTIO_NET_F_MTU);
        }
        let t = self.tap_offloads;
        if t & offload::CSUM != 0 {
            f |= bit(VIRTIO_NET_F_GUEST_CSUM);
            if t & (offload::TSO4 | offload::TSO6 | offload::TSO_ECN) != 0 {
                f |= bit(VIRTIO_NET_F_GUEST_TSO4)
                    | bit(VIRTIO_NET_F_GUEST_TSO6)
                    | bit(VIRTIO_NET_F_GUEST_ECN);
            }
            if t & offload::UFO != 0 {
                f |= bit(VIRTIO_NET_F_GUEST_UFO);
            }
            if t & (offload::USO4 | offload::USO6) != 0 {
                f |= bit(VIRTIO_NET_F_GUEST_USO4)
                    | bit(VIRTIO_NET_F_GUEST_USO6)
                    | bit(VIRTIO_NET_F_HOST_USO);
            }
        }
        f
    }

    /// The config space: mac, status (link up), max_virtqueue_pairs, mtu; little-endian.
    pub fn config_bytes(&self) -> [u8; CONFIG_SIZE] {
        let mut c = [0u8; CONFIG_SIZE];
        c[0..6].copy_from_slice(&self.mac.0);
        c[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        c[8..10].copy_from_slice(&self.queue_pairs.to_le_bytes());
        c[10..12].copy_from_slice(&self.mtu.unwrap_or(0).to_le_bytes());
        c
    }

    /// `size` bytes of config space from `offset`; bytes past its end read as zero.
    pub fn read_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let cfg = self.config_bytes();
        let size = size.min(4096) as usize;
        (0..size)
            .map(|i| {
                (offset as usize)
                    .checked_add(i)
                    .and_then(|o| cfg.get(o).copied())
                    .unwrap_or(0)
            })
            .collect()
    }
}

/// The `TUN_F_*` offloads matching the guest's acked features: what the tap may hand the guest.
pub fn tap_offloads_for(acked: u64, supported: u32) -> u32 {
    let has = |b: u32| acked & bit(b) != 0;
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut t = offload::CSUM;
    if has(VIRTIO_NET_F_GUEST_TSO4) {
        t |= offload::TSO4;
    }
    if has(VIRTIO_NET_F_GUEST_TSO6) {
        t |= offload::TSO6;
    }
    if has(VIRTIO_NET_F_GUEST_ECN) && t & (offload::TSO4 | offload::TSO6) != 0 {
        t |= offload::TSO_ECN;
    }
    if has(VIRTIO_NET_F_GUEST_UFO) {
        t |= offload::UFO;
    }
    if has(VIRTIO_NET_F_GUEST_USO4) {
        t |= offload::USO4;
    }
    if has(VIRTIO_NET_F_GUEST_USO6) {
        t |= offload::USO6;
    }
    t & supported
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> NetSpec {
        NetSpec {
            mac: MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
            mtu: Some(1500),
            queue_pairs: 2,
            queue_size: 256,
            tap_offloads: offload::CSUM | offload::TSO4 | offload::TSO6 | offload::TSO_ECN,
        }
    }

    #[test]
    fn mac_parse_and_print() {
        let m: MacAddr = "52:54:00:ab:CD:ef".parse().unwrap();
        assert_eq!(m.0, [0x52, 0x54, 0, 0xab, 0xcd, 0xef]);
        assert_eq!(m.to_string(), "52:54:00:ab:cd:ef");
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:ef:01",
            "5:54:00:ab:cd:ef",
            "zz:54:00:ab:cd:ef",
            "01:00:5e:00:00:01",
            "00:00:00:00:00:00",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        let r = MacAddr::random();
        assert_eq!(r.0[0] & 3, 2, "locally administered unicast");
    }

    #[test]
    fn config_layout() {
        let s = spec();
        let c = s.config_bytes();
        assert_eq!(&c[0..6], &[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        assert_eq!(u16::from_le_bytes([c[6], c[7]]), 1);
        assert_eq!(u16::from_le_bytes([c[8], c[9]]), 2);
        assert_eq!(u16::from_le_bytes([c[10], c[11]]), 1500);
        assert_eq!(s.read_config(6, 4), vec![1, 0, 2, 0]);
        assert_eq!(s.read_config(10, 6), vec![0xdc, 0x05, 0, 0, 0, 0]);
        assert_eq!(s.read_config(u32::MAX, 2), vec![0, 0]);
        assert_eq!(s.num_queues(), 5);
        assert_eq!(s.ctrl_queue(), 4);
    }

    #[test]
    fn features_follow_tap_support() {
        let s = spec();
        let f = s.features();
        for b in [
            VIRTIO_NET_F_MQ,
            VIRTIO_NET_F_CTRL_VQ,
            VIRTIO_NET_F_MTU,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_MRG_RXBUF,
        ] {
            assert_ne!(f & bit(b), 0, "bit {b}");
        }
        assert_eq!(f & bit(VIRTIO_NET_F_GUEST_UFO), 0);
        let single = NetSpec {
            queue_pairs: 1,
            mtu: None,
            tap_offloads: 0,
            ..s
        };
        let f = single.features();
        assert_eq!(f & bit(VIRTIO_NET_F_MQ), 0);
        assert_eq!(f & bit(VIRTIO_NET_F_MTU), 0);
        assert_eq!(f & bit(VIRTIO_NET_F_GUEST_CSUM), 0);
    }

    #[test]
    fn offloads_from_acked_features() {
        let all = 0x7f;
        assert_eq!(
            tap_offloads_for(bit(VIRTIO_NET_F_GUEST_TSO4), all),
            0,
            "TSO needs CSUM"
        );
        let acked = bit(VIRTIO_NET_F_GUEST_CSUM)
            | bit(VIRTIO_NET_F_GUEST_TSO4)
            | bit(VIRTIO_NET_F_GUEST_ECN)
            | bit(VIRTIO_NET_F_GUEST_UFO);
        assert_eq!(
            tap_offloads_for(acked, all),
            offload::CSUM | offload::TSO4 | offload::TSO_ECN | offload::UFO
        );
        assert_eq!(
            tap_offloads_for(acked, offload::CSUM | offload::TSO4),
            offload::CSUM | offload::TSO4
        );
    }
}
