//! Sizes and durations as hype's command lines spell them: one parser for each, used by the
//! VMM, `hype run` and every backend, and the matching formatters for building argv.

use std::time::Duration;

/// Parses a byte size: a number with an optional K, M, G or T suffix (powers of 1024; `KB`,
/// `KiB` and `B` are accepted too, case-insensitive). A bare number is `default_unit` bytes
/// each (1 for backends' sizes, 1 MiB for guest memory).
pub fn parse_size(s: &str, default_unit: u64) -> Result<u64, String> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if digits_end == 0 {
        return Err(format!("'{s}' is not a size (examples: 512M, 2G)"));
    }
    let n: u64 = t[..digits_end]
        .parse()
        .map_err(|_| format!("'{s}' is too large"))?;
    let unit = match t[digits_end..].to_ascii_uppercase().as_str() {
        "" => default_unit,
        "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        "T" | "TB" | "TIB" => 1 << 40,
        other => return Err(format!("unknown size suffix '{other}' in '{s}'")),
    };
    n.checked_mul(unit)
        .ok_or_else(|| format!("'{s}' is too large"))
}

/// A byte size with no default unit: a bare number is bytes.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    parse_size(s, 1)
}

/// Formats `bytes` with the largest suffix that divides it exactly (`2G`, `1536M`, `4097B`),
/// so [`parse_size`] gives it back whatever the default unit.
pub fn format_size(bytes: u64) -> String {
    for (shift, suffix) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if bytes != 0 && bytes % (1u64 << shift) == 0 {
            return format!("{}{suffix}", bytes >> shift);
        }
    }
    format!("{bytes}B")
}

/// Parses a duration: a number with `ms`, `s` or `m` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let n: u64 = t[..split]
        .parse()
        .map_err(|_| format!("'{s}' is not a duration (examples: 500ms, 10s, 2m, forever)"))?;
    match &t[split..] {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n.saturating_mul(60))),
        other => Err(format!("unknown duration unit '{other}' in '{s}'")),
    }
}

/// Formats `d` so that [`parse_duration`] gives it back, to the millisecond (`2m`, `10s`,
/// `1500ms`; sub-millisecond parts are dropped).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms % 60_000 == 0 && ms != 0 {
        format!("{}m", ms / 60_000)
    } else if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M", 1 << 20), Ok(512 << 20));
        assert_eq!(parse_size("512", 1 << 20), Ok(512 << 20));
        assert_eq!(parse_size("1GiB", 1), Ok(1 << 30));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert_eq!(parse_bytes("256mib"), Ok(256 << 20));
        assert_eq!(parse_bytes("7B"), Ok(7));
        assert_eq!(parse_bytes("2T"), Ok(2 << 40));
        for bad in [
            "",
            "M",
            "12X",
            "-1G",
            "99999999999999999999G",
            "9999999999T",
        ] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
        assert!(parse_bytes("lots").unwrap_err().contains("not a size"));
    }

    #[test]
    fn sizes_round_trip() {
        for n in [
            0,
            1,
            511,
            512,
            1 << 10,
            1536 << 20,
            2 << 30,
            3 << 40,
            4097,
            u64::MAX,
        ] {
            let s = format_size(n);
            assert_eq!(parse_size(&s, 1 << 20), Ok(n), "{s}");
        }
        assert_eq!(format_size(2 << 30), "2G");
        assert_eq!(format_size(1536 << 20), "1536M");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("3h").is_err());
        assert!(parse_duration("x").is_err());
        for d in [0, 1, 999, 1000, 1500, 60_000, 61_000, 3_600_000] {
            let d = Duration::from_millis(d);
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
    }
}
