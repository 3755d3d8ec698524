//! VM configuration as given on the command line, with parsing of sizes and specs.

use std::path::PathBuf;
use std::str::FromStr;

/// Where the UART's output goes (input comes from stdin only with `stdio`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialSpec {
    /// The VMM's stdout (and stdin for input).
    Stdio,
    /// Discarded.
    None,
    /// Appended to a file.
    File(PathBuf),
}

impl FromStr for SerialSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stdio" => Ok(SerialSpec::Stdio),
            "none" => Ok(SerialSpec::None),
            _ => match s.strip_prefix("file:") {
                Some(p) if !p.is_empty() => Ok(SerialSpec::File(PathBuf::from(p))),
                _ => Err(format!("'{s}' is not one of stdio, none, file:PATH")),
            },
        }
    }
}

/// A `--device` argument: a vhost-user backend socket, optionally with an explicit type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSpec {
    /// Socket path.
    pub socket: PathBuf,
    /// Explicit device type (`blk`, `net`, `console`), if given as `TYPE:PATH`.
    pub kind: Option<String>,
}

impl FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("empty device socket path".into());
        }
        for kind in ["blk", "net", "console"] {
            if let Some(p) = s.strip_prefix(kind).and_then(|r| r.strip_prefix(':')) {
                if p.is_empty() {
                    return Err(format!("'{s}' has no socket path"));
                }
                return Ok(DeviceSpec {
                    socket: PathBuf::from(p),
                    kind: Some(kind.into()),
                });
            }
        }
        Ok(DeviceSpec {
            socket: PathBuf::from(s),
            kind: None,
        })
    }
}

/// Parses a byte size: a number with an optional K, M, G or T suffix (powers of 1024, optional
/// trailing `iB`/`B`); a bare number is bytes... unless `default_unit` says otherwise.
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

/// Memory size in bytes: a bare number means MiB, as in other VMMs.
pub fn parse_memory(s: &str) -> Result<u64, String> {
    parse_size(s, 1 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_memory("512M").unwrap(), 512 << 20);
        assert_eq!(parse_memory("512").unwrap(), 512 << 20);
        assert_eq!(parse_memory("2G").unwrap(), 2 << 30);
        assert_eq!(parse_memory("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("4096", 1).unwrap(), 4096);
        assert!(parse_memory("").is_err());
        assert!(parse_memory("M").is_err());
        assert!(parse_memory("12X").is_err());
        assert!(parse_memory("-1G").is_err());
        assert!(parse_memory("99999999999999999999G").is_err());
        assert!(parse_memory("9999999999T").is_err());
    }

    #[test]
    fn serial_specs() {
        assert_eq!("stdio".parse::<SerialSpec>().unwrap(), SerialSpec::Stdio);
        assert_eq!("none".parse::<SerialSpec>().unwrap(), SerialSpec::None);
        assert_eq!(
            "file:/tmp/x".parse::<SerialSpec>().unwrap(),
            SerialSpec::File("/tmp/x".into())
        );
        assert!("file:".parse::<SerialSpec>().is_err());
        assert!("tcp:1".parse::<SerialSpec>().is_err());
    }

    #[test]
    fn device_specs() {
        let d: DeviceSpec = "/run/a.sock".parse().unwrap();
        assert_eq!((d.socket, d.kind), (PathBuf::from("/run/a.sock"), None));
        let d: DeviceSpec = "blk:/run/b.sock".parse().unwrap();
        assert_eq!(d.kind.as_deref(), Some("blk"));
        assert!("blk:".parse::<DeviceSpec>().is_err());
        assert!("".parse::<DeviceSpec>().is_err());
    }
}
