//! The demo guest built into the binary (`guest.S`, assembled by `build.rs`), and what it
//! prints.

/// The demo guest: a 64-bit x86 ELF linked at 2 MiB, booted like a vmlinux (long mode entry).
pub static GUEST_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/demo_guest.elf"));

/// The last UART line of a guest that found both devices, verified its sectors and had its
/// report taken by the console.
pub const UART_PASS: &str = "hype demo guest: PASS";
/// The last UART line of a guest that failed (the line before says why).
pub const UART_FAIL: &str = "hype demo guest: FAIL";
/// Sectors the guest writes and reads back.
pub const SECTORS: u64 = 8;

/// The line the guest sends through the virtio console when everything worked, for a disk
/// of `capacity` 512-byte sectors (with the `\r\n` a raw terminal needs).
pub fn console_report(capacity: u64) -> String {
    format!(
        "hype demo: found virtio-blk ({capacity} sectors) and virtio-console; \
         wrote and read back {SECTORS} sectors: OK\r\n"
    )
}

/// What the guest's UART log says about the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The guest finished and passed.
    Pass,
    /// The guest reported a failure; the reason is its `FAILED:` line when it printed one.
    Fail(Option<String>),
    /// The log ends before the guest finished (it crashed, hung or never started).
    Unfinished,
}

/// Reads the verdict from the guest's UART log: its last line decides.
pub fn verdict(uart_log: &str) -> Verdict {
    let last = uart_log.lines().rev().find(|l| !l.trim().is_empty());
    match last.map(str::trim_end) {
        Some(UART_PASS) => Verdict::Pass,
        Some(UART_FAIL) => Verdict::Fail(
            uart_log
                .lines()
                .rev()
                .find_map(|l| l.strip_prefix("hype demo: FAILED: "))
                .map(|r| r.trim_end().to_string()),
        ),
        _ => Verdict::Unfinished,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_guest_is_a_64_bit_x86_elf_entered_at_2_mib() {
        assert_eq!(&GUEST_ELF[..4], b"\x7fELF");
        assert_eq!(GUEST_ELF[4], 2, "ELFCLASS64");
        assert_eq!(u16::from_le_bytes([GUEST_ELF[18], GUEST_ELF[19]]), 62);
        let entry = u64::from_le_bytes(GUEST_ELF[24..32].try_into().unwrap());
        assert_eq!(entry, 0x20_0000);
        // No PVH note: hype boots it through the 64-bit entry.
        assert!(!GUEST_ELF.windows(4).any(|w| w == b"Xen\0"));
    }

    #[test]
    fn verdict_from_the_last_line() {
        assert_eq!(verdict("probing\nhype demo guest: PASS\n"), Verdict::Pass);
        assert_eq!(
            verdict("x\nhype demo: FAILED: disk too small, sectors: 4\nhype demo guest: FAIL\n"),
            Verdict::Fail(Some("disk too small, sectors: 4".into()))
        );
        assert_eq!(verdict("hype demo guest: FAIL\n"), Verdict::Fail(None));
        assert_eq!(verdict(""), Verdict::Unfinished);
        // A PASS that is not last does not count.
        assert_eq!(
            verdict("hype demo guest: PASS\ngarbage"),
            Verdict::Unfinished
        );
    }

    #[test]
    fn report_text() {
        assert_eq!(
            console_report(32768),
            "hype demo: found virtio-blk (32768 sectors) and virtio-console; \
             wrote and read back 8 sectors: OK\r\n"
        );
    }
}
