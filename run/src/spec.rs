//! The device specs of `hype run`: `--disk`, `--net` and `--console` strings, parsed into what
//! backend each one needs. Values are checked with the backends' own rules (sizes, TAP names,
//! MAC addresses, console outputs); [`super::plan`] checks the host.

use std::fmt;
use std::path::PathBuf;

use hype_base::options::{is_url, OptionError, Spec};
use hype_console::Output;
use hype_net_tap::MacAddr;

/// Why a spec string was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    /// The spec is empty.
    #[error("empty spec")]
    Empty,
    /// A disk spec with a scheme hype does not know.
    #[error(
        "unknown disk scheme in {0:?} (expected file:PATH, mem:SIZE, http://URL or https://URL)"
    )]
    UnknownDiskScheme(String),
    /// A net spec with a scheme hype does not know.
    #[error("unknown net scheme in {0:?} (expected tap:NAME)")]
    UnknownNetScheme(String),
    /// A console spec hype does not know.
    #[error("unknown console {0:?} (expected serial, stdio, pty, socket:PATH or file:PATH)")]
    UnknownConsole(String),
    /// A scheme without its path, size, URL or name.
    #[error("{0:?}: missing value after the scheme")]
    MissingValue(String),
    /// An option this kind of spec does not take.
    #[error("{spec:?}: unknown option {option:?}")]
    UnknownOption {
        /// The whole spec.
        spec: String,
        /// The option.
        option: String,
    },
    /// An option given twice.
    #[error("{spec:?}: option {option:?} given twice")]
    DuplicateOption {
        /// The whole spec.
        spec: String,
        /// The option.
        option: String,
    },
    /// A RAM disk size that is not a size, zero, or not a multiple of 512.
    #[error("{spec:?}: bad size: {reason}")]
    BadSize {
        /// The whole spec.
        spec: String,
        /// What is wrong.
        reason: String,
    },
    /// An http(s) URL without a host.
    #[error("{0:?}: URL has no host")]
    BadUrl(String),
    /// A TAP name the kernel would refuse (`hype net-tap`'s rule).
    #[error("{spec:?}: {reason}")]
    BadTapName {
        /// The whole spec.
        spec: String,
        /// What is wrong, as `hype net-tap` says it.
        reason: String,
    },
    /// A MAC address `hype net-tap` would refuse.
    #[error("{spec:?}: {reason}")]
    BadMac {
        /// The whole spec.
        spec: String,
        /// What is wrong, as `hype net-tap` says it.
        reason: String,
    },
}

/// Where a disk's data lives, i.e. which block backend serves it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskSource {
    /// `file:PATH[,ro]`: `hype block-file`.
    File {
        /// Image file or block device.
        path: PathBuf,
        /// Present it read-only.
        readonly: bool,
    },
    /// `mem:SIZE`: `hype block-mem`.
    Mem {
        /// Size in bytes.
        size: u64,
    },
    /// `http(s)://URL[,overlay=PATH][,ro]`: `hype block-http`.
    Http {
        /// Image URL.
        url: String,
        /// Local file keeping the guest's writes.
        overlay: Option<PathBuf>,
        /// Present it read-only even with an overlay.
        readonly: bool,
    },
}

/// A `--disk` spec. Every form also takes `,socket=PATH` to put the backend's socket at a
/// chosen path instead of the private runtime directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskSpec {
    /// The backing store.
    pub source: DiskSource,
    /// Explicit socket path.
    pub socket: Option<PathBuf>,
}

/// A `--net` spec: `tap:NAME[,mac=MAC][,socket=PATH]`, served by `hype net-tap`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetSpec {
    /// TAP interface name.
    pub tap: String,
    /// Guest MAC address.
    pub mac: Option<MacAddr>,
    /// Explicit socket path.
    pub socket: Option<PathBuf>,
}

/// A `--console` spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsoleSpec {
    /// `serial`: no virtio console; the VMM's UART (`--serial`) is the console.
    Serial,
    /// A virtio-console backend (`hype console --output OUTPUT`): `stdio`, `pty`,
    /// `socket:PATH` or `file:PATH`, each optionally followed by `,socket=PATH`.
    Virtio {
        /// The backend's `--output`, parsed by `hype console`'s parser.
        output: Output,
        /// Explicit vhost-user socket path.
        socket: Option<PathBuf>,
    },
}

impl ConsoleSpec {
    /// Whether this console takes over this process's terminal.
    pub fn uses_stdio(&self) -> bool {
        matches!(
            self,
            ConsoleSpec::Virtio {
                output: Output::Stdio,
                ..
            }
        )
    }
}

/// `key` / `value` pairs of a spec's trailing options (`""` for a bare flag).
type Options<'a> = Vec<(&'a str, &'a str)>;

/// Splits trailing `,key[=value]` options off `s` with hype's one option grammar
/// ([`hype_base::options`]): only keys in `known`, each once; an http URL keeps its own
/// commas.
fn split_options<'a>(s: &'a str, known: &[&str]) -> Result<(&'a str, Options<'a>), SpecError> {
    let parsed = Spec::parse(s, known, is_url).map_err(|e| match e {
        OptionError::Unknown(option) => SpecError::UnknownOption {
            spec: s.to_string(),
            option,
        },
        OptionError::Duplicate(option) => SpecError::DuplicateOption {
            spec: s.to_string(),
            option,
        },
    })?;
    let opts = parsed
        .options
        .into_iter()
        .map(|(k, v)| (k, v.unwrap_or("")))
        .collect();
    Ok((parsed.head, opts))
}

/// A path-valued option: must not be empty.
fn path_opt(spec: &str, value: &str) -> Result<PathBuf, SpecError> {
    if value.is_empty() {
        return Err(SpecError::MissingValue(spec.to_string()));
    }
    Ok(PathBuf::from(value))
}

impl std::str::FromStr for DiskSpec {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, SpecError> {
        if s.is_empty() {
            return Err(SpecError::Empty);
        }
        let (head, opts) = split_options(s, &["ro", "readonly", "overlay", "socket"])?;
        let mut socket = None;
        let mut readonly = false;
        let mut overlay = None;
        for (k, v) in &opts {
            match *k {
                "socket" => socket = Some(path_opt(s, v)?),
                "overlay" => overlay = Some(path_opt(s, v)?),
                _ => readonly = true,
            }
        }
        let unknown = |o: &str| SpecError::UnknownOption {
            spec: s.to_string(),
            option: o.to_string(),
        };
        let source = if let Some(p) = head.strip_prefix("file:") {
            if overlay.is_some() {
                return Err(unknown("overlay"));
            }
            DiskSource::File {
                path: path_opt(s, p)?,
                readonly,
            }
        } else if let Some(sz) = head.strip_prefix("mem:") {
            if overlay.is_some() {
                return Err(unknown("overlay"));
            }
            if readonly {
                return Err(unknown("ro"));
            }
            if sz.is_empty() {
                return Err(SpecError::MissingValue(s.to_string()));
            }
            let bad = |reason: String| SpecError::BadSize {
                spec: s.to_string(),
                reason,
            };
            // A bare number is MiB, as for --memory; the rest is `hype block-mem`'s rule.
            let size = hype_base::parse_size(sz, 1 << 20).map_err(bad)?;
            hype_block_mem::check_size(size).map_err(|e| bad(e.to_string()))?;
            DiskSource::Mem { size }
        } else if head.starts_with("http://") || head.starts_with("https://") {
            let rest = head.split_once("://").map(|x| x.1).unwrap_or("");
            let host = rest.split(['/', '?', '#']).next().unwrap_or("");
            if host.is_empty() {
                return Err(SpecError::BadUrl(s.to_string()));
            }
            DiskSource::Http {
                url: head.to_string(),
                overlay,
                readonly,
            }
        } else {
            return Err(SpecError::UnknownDiskScheme(s.to_string()));
        };
        Ok(DiskSpec { source, socket })
    }
}

impl std::str::FromStr for NetSpec {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, SpecError> {
        if s.is_empty() {
            return Err(SpecError::Empty);
        }
        let Some(rest) = s.strip_prefix("tap:") else {
            return Err(SpecError::UnknownNetScheme(s.to_string()));
        };
        let (name, opts) = split_options(rest, &["mac", "socket"]).map_err(|e| match e {
            SpecError::UnknownOption { option, .. } => SpecError::UnknownOption {
                spec: s.to_string(),
                option,
            },
            SpecError::DuplicateOption { option, .. } => SpecError::DuplicateOption {
                spec: s.to_string(),
                option,
            },
            other => other,
        })?;
        hype_net_tap::check_tap_name(name).map_err(|e| SpecError::BadTapName {
            spec: s.to_string(),
            reason: e.to_string(),
        })?;
        let mut spec = NetSpec {
            tap: name.to_string(),
            mac: None,
            socket: None,
        };
        for (k, v) in opts {
            if k == "mac" {
                if v.is_empty() {
                    return Err(SpecError::MissingValue(s.to_string()));
                }
                spec.mac = Some(v.parse().map_err(|reason| SpecError::BadMac {
                    spec: s.to_string(),
                    reason,
                })?);
            } else {
                spec.socket = Some(path_opt(s, v)?);
            }
        }
        Ok(spec)
    }
}

impl std::str::FromStr for ConsoleSpec {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, SpecError> {
        if s.is_empty() {
            return Err(SpecError::Empty);
        }
        if s == "serial" {
            return Ok(ConsoleSpec::Serial);
        }
        let (output, opts) = split_options(s, &["socket"])?;
        let socket = match opts.first() {
            Some((_, v)) => Some(path_opt(s, v)?),
            None => None,
        };
        // `hype console`'s own parser decides what an output is.
        let output = output
            .parse::<Output>()
            .map_err(|_| SpecError::UnknownConsole(s.to_string()))?;
        Ok(ConsoleSpec::Virtio { output, socket })
    }
}

impl fmt::Display for DiskSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            DiskSource::File { path, readonly } => {
                write!(f, "file:{}", path.display())?;
                if *readonly {
                    f.write_str(",ro")?;
                }
            }
            DiskSource::Mem { size } => write!(f, "mem:{size}")?,
            DiskSource::Http {
                url,
                overlay,
                readonly,
            } => {
                f.write_str(url)?;
                if let Some(o) = overlay {
                    write!(f, ",overlay={}", o.display())?;
                }
                if *readonly {
                    f.write_str(",ro")?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks() {
        let d: DiskSpec = "file:/a/b.img,ro".parse().unwrap();
        assert_eq!(
            d.source,
            DiskSource::File {
                path: "/a/b.img".into(),
                readonly: true
            }
        );
        let d: DiskSpec = "mem:256M,socket=/tmp/x.sock".parse().unwrap();
        assert_eq!(d.source, DiskSource::Mem { size: 256 << 20 });
        assert_eq!(d.socket, Some(PathBuf::from("/tmp/x.sock")));
        let d: DiskSpec = "http://h:8080/i.raw?a=1,2,overlay=/tmp/o".parse().unwrap();
        assert_eq!(
            d.source,
            DiskSource::Http {
                url: "http://h:8080/i.raw?a=1,2".into(),
                overlay: Some("/tmp/o".into()),
                readonly: false
            }
        );
        assert_eq!(d.to_string(), "http://h:8080/i.raw?a=1,2,overlay=/tmp/o");
    }

    #[test]
    fn bad_disks() {
        assert!(matches!(
            "ftp://x/y".parse::<DiskSpec>(),
            Err(SpecError::UnknownDiskScheme(_))
        ));
        assert!(matches!(
            "disk.img".parse::<DiskSpec>(),
            Err(SpecError::UnknownDiskScheme(_))
        ));
        assert!(matches!(
            "file:".parse::<DiskSpec>(),
            Err(SpecError::MissingValue(_))
        ));
        assert!(matches!(
            "mem:0".parse::<DiskSpec>(),
            Err(SpecError::BadSize { .. })
        ));
        assert!(matches!(
            "mem:1000".parse::<DiskSpec>().map(|d| d.source),
            Ok(DiskSource::Mem { size }) if size == 1000 << 20
        ));
        assert!(matches!(
            "mem:12X".parse::<DiskSpec>(),
            Err(SpecError::BadSize { .. })
        ));
        assert!(matches!(
            "file:a,bogus".parse::<DiskSpec>(),
            Err(SpecError::UnknownOption { .. })
        ));
        assert!(matches!(
            "file:a,ro,ro".parse::<DiskSpec>(),
            Err(SpecError::DuplicateOption { .. })
        ));
        assert!(matches!(
            "file:a,overlay=/x".parse::<DiskSpec>(),
            Err(SpecError::UnknownOption { .. })
        ));
        assert!(matches!(
            "http:///x".parse::<DiskSpec>(),
            Err(SpecError::BadUrl(_))
        ));
        assert!(matches!(
            "file:a,socket=".parse::<DiskSpec>(),
            Err(SpecError::MissingValue(_))
        ));
    }

    #[test]
    fn nets_and_consoles() {
        let n: NetSpec = "tap:tap0,mac=52:54:00:12:34:56".parse().unwrap();
        assert_eq!(n.tap, "tap0");
        assert_eq!(
            n.mac.map(|m| m.to_string()).as_deref(),
            Some("52:54:00:12:34:56")
        );
        assert!(matches!(
            "tap:t0,mac=01:02:03:04:05:06".parse::<NetSpec>(),
            Err(SpecError::BadMac { .. })
        ));
        assert!(matches!(
            "tap:".parse::<NetSpec>(),
            Err(SpecError::BadTapName { .. })
        ));
        assert!(matches!(
            "tap:averyveryverylongname".parse::<NetSpec>(),
            Err(SpecError::BadTapName { .. })
        ));
        assert!(matches!(
            "bridge:br0".parse::<NetSpec>(),
            Err(SpecError::UnknownNetScheme(_))
        ));
        assert_eq!(
            "serial".parse::<ConsoleSpec>().unwrap(),
            ConsoleSpec::Serial
        );
        let c: ConsoleSpec = "file:/tmp/c.log,socket=/tmp/c.sock".parse().unwrap();
        assert_eq!(
            c,
            ConsoleSpec::Virtio {
                output: Output::File("/tmp/c.log".into()),
                socket: Some("/tmp/c.sock".into())
            }
        );
        assert!("stdio".parse::<ConsoleSpec>().unwrap().uses_stdio());
        assert!(matches!(
            "tty".parse::<ConsoleSpec>(),
            Err(SpecError::UnknownConsole(_))
        ));
        assert!(matches!(
            "file:".parse::<ConsoleSpec>(),
            Err(SpecError::UnknownConsole(_))
        ));
    }
}
