//! Errors of the fix-ups: an emulation failure that stays a failure.

use std::fmt;

use super::decode::MAX_INSN_LEN;
use super::vcpu::VcpuError;
use super::Fixup;

/// Instruction bytes at the failing RIP, kept for error messages.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct InsnBytes {
    bytes: [u8; MAX_INSN_LEN],
    len: u8,
}

impl InsnBytes {
    /// Copies up to 15 bytes.
    pub fn new(bytes: &[u8]) -> Self {
        let len = bytes.len().min(MAX_INSN_LEN);
        let mut out = InsnBytes {
            bytes: [0; MAX_INSN_LEN],
            len: len as u8,
        };
        out.bytes[..len].copy_from_slice(&bytes[..len]);
        out
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl fmt::Display for InsnBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.len == 0 {
            return f.write_str("no bytes");
        }
        for (i, b) in self.as_slice().iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for InsnBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{self}]")
    }
}

fn recognised_hint(recognised: &Option<Fixup>) -> String {
    match recognised {
        Some(fixup) => format!(" ({fixup} is fixable with --emulation-fixups=on)"),
        None => String::new(),
    }
}

/// An emulation failure the fix-ups did not resolve. The vCPU state is unchanged unless the
/// variant says otherwise.
#[derive(Debug, thiserror::Error)]
pub enum FixupError {
    /// Fix-ups are off.
    #[error("emulation failure at rip {rip:#x}, bytes {bytes}: fix-ups are off{}", recognised_hint(.recognised))]
    Disabled {
        /// Guest RIP.
        rip: u64,
        /// Instruction bytes.
        bytes: InsnBytes,
        /// The fix-up that would have applied, if any.
        recognised: Option<Fixup>,
    },
    /// Not an instruction the fix-ups know.
    #[error("unhandled emulation failure at rip {rip:#x}, bytes {bytes}")]
    Unrecognised {
        /// Guest RIP.
        rip: u64,
        /// Instruction bytes.
        bytes: InsnBytes,
    },
    /// KVM reported no bytes and they could not be read at RIP.
    #[error("emulation failure at rip {rip:#x}: instruction bytes not readable")]
    Fetch {
        /// Guest RIP.
        rip: u64,
        /// Why the fetch failed.
        #[source]
        source: VcpuError,
    },
    /// The vCPU state could not be read before anything was changed.
    #[error("emulation failure: reading vcpu state")]
    State(#[source] VcpuError),
    /// Reading or writing vCPU state failed while applying a fix-up; the state may be partly
    /// changed.
    #[error("{fixup} fix-up at rip {rip:#x} failed")]
    Apply {
        /// The fix-up.
        fixup: Fixup,
        /// Guest RIP.
        rip: u64,
        /// Underlying failure.
        #[source]
        source: VcpuError,
    },
}

impl FixupError {
    /// Guest RIP of the failure, where known.
    pub fn rip(&self) -> Option<u64> {
        match self {
            FixupError::Disabled { rip, .. }
            | FixupError::Unrecognised { rip, .. }
            | FixupError::Fetch { rip, .. }
            | FixupError::Apply { rip, .. } => Some(*rip),
            FixupError::State(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_carry_rip_and_bytes() {
        let e = FixupError::Unrecognised {
            rip: 0xffff_ffff_8100_0000,
            bytes: InsnBytes::new(&[0x0f, 0xc7, 0x0e]),
        };
        assert_eq!(
            e.to_string(),
            "unhandled emulation failure at rip 0xffffffff81000000, bytes 0f c7 0e"
        );
        let e = FixupError::Disabled {
            rip: 0x1000,
            bytes: InsnBytes::new(&[0x0f, 0x01, 0xca]),
            recognised: Some(Fixup::Clac),
        };
        assert_eq!(
            e.to_string(),
            "emulation failure at rip 0x1000, bytes 0f 01 ca: fix-ups are off \
             (clac is fixable with --emulation-fixups=on)"
        );
        assert_eq!(InsnBytes::new(&[]).to_string(), "no bytes");
        assert_eq!(InsnBytes::new(&[1; 20]).as_slice().len(), 15);
    }
}
