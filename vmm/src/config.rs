//! VM configuration as given on the command line, with parsing of sizes and specs.

use crate::virtio::{DeviceOptions, DeviceType, WaitLimit};
use hype_base::options::{OptionError, Spec};
use std::fmt;
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

impl fmt::Display for SerialSpec {
    /// The spelling [`SerialSpec::from_str`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SerialSpec::Stdio => f.write_str("stdio"),
            SerialSpec::None => f.write_str("none"),
            SerialSpec::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

/// A `--device` argument: a vhost-user backend socket, optionally with a type and options.
///
/// Forms: `PATH`, `TYPE:PATH`, and comma-separated `key=value` options, with the socket either
/// first or as `socket=PATH`: `/run/d.sock,queues=2`, `socket=/run/d.sock,type=blk,wait=10s`.
/// Keys: `socket`, `type` (blk, net, console, fs, vsock, rng, or a virtio device ID such as
/// 26), `queues`, `queue-size`, `tag` (virtio-fs: the share's name when the backend does not
/// give its config), `wait` (how long to wait
/// for the socket at start), `reconnect-timeout` (how long to retry a lost backend), `allow-uid`
/// (a user besides hype's own and root whose backend may get guest memory). Durations
/// are `forever` or a number with `ms`, `s` or `m` (a bare number is seconds).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSpec {
    /// Socket path.
    pub socket: PathBuf,
    /// Explicit device type.
    pub kind: Option<DeviceType>,
    /// Queues to expose.
    pub num_queues: Option<u16>,
    /// Largest queue size offered to the guest.
    pub queue_size: Option<u16>,
    /// How long to wait for the socket at start (`None`: the `--device-wait` default).
    pub wait: Option<WaitLimit>,
    /// How long to keep reconnecting a lost backend (`None`: forever).
    pub reconnect: Option<WaitLimit>,
    /// virtio-fs tag (`tag=`).
    pub tag: Option<String>,
    /// Another uid than hype's own and root that may serve this device's socket.
    pub allow_uid: Option<u32>,
}

impl DeviceSpec {
    /// A spec for `socket` with every default.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        DeviceSpec {
            socket: socket.into(),
            kind: None,
            num_queues: None,
            queue_size: None,
            wait: None,
            reconnect: None,
            tag: None,
            allow_uid: None,
        }
    }

    /// The device options (defaults filled in: wait and reconnect forever).
    pub fn options(&self) -> DeviceOptions {
        DeviceOptions {
            socket: self.socket.clone(),
            kind: self.kind,
            num_queues: self.num_queues,
            queue_size: self.queue_size,
            wait: self.wait.unwrap_or(WaitLimit::Forever),
            reconnect: self.reconnect.unwrap_or(WaitLimit::Forever),
            tag: self.tag.clone(),
            allow_uid: self.allow_uid,
        }
    }
}

impl fmt::Display for DeviceSpec {
    /// The spelling [`DeviceSpec::from_str`] reads back: the bare socket path when it cannot
    /// be mistaken for `TYPE:PATH` or `key=value`, else `socket=PATH`; then the options that
    /// are set. (A path with a comma has no spelling; the parser splits it.)
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.socket.to_string_lossy();
        let typed_prefix = path
            .split_once(':')
            .is_some_and(|(k, _)| k.parse::<DeviceType>().is_ok());
        if path.contains('=') || typed_prefix {
            write!(f, "socket={path}")?;
        } else {
            f.write_str(&path)?;
        }
        if let Some(k) = self.kind {
            write!(f, ",type={k}")?;
        }
        if let Some(n) = self.num_queues {
            write!(f, ",queues={n}")?;
        }
        if let Some(n) = self.queue_size {
            write!(f, ",queue-size={n}")?;
        }
        if let Some(w) = self.wait {
            write!(f, ",wait={}", format_wait(w))?;
        }
        if let Some(w) = self.reconnect {
            write!(f, ",reconnect-timeout={}", format_wait(w))?;
        }
        if let Some(t) = &self.tag {
            write!(f, ",tag={t}")?;
        }
        if let Some(u) = self.allow_uid {
            write!(f, ",allow-uid={u}")?;
        }
        Ok(())
    }
}

/// Parses a wait limit: `forever`, or a duration ([`hype_base::parse_duration`]: a number
/// with `ms`, `s` or `m`, bare: seconds).
pub fn parse_wait(s: &str) -> Result<WaitLimit, String> {
    if s.trim() == "forever" {
        return Ok(WaitLimit::Forever);
    }
    hype_base::parse_duration(s).map(WaitLimit::For)
}

/// Spells `w` so that [`parse_wait`] gives it back (to the millisecond).
pub fn format_wait(w: WaitLimit) -> String {
    match w {
        WaitLimit::Forever => "forever".to_string(),
        WaitLimit::For(d) => hype_base::format_duration(d),
    }
}

fn parse_u16(key: &str, v: &str) -> Result<u16, String> {
    v.parse()
        .map_err(|_| format!("{key}={v}: expected a number from 0 to 65535"))
}

impl FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("empty device socket path".into());
        }
        const KEYS: &[&str] = &[
            "socket",
            "path",
            "type",
            "queues",
            "num-queues",
            "queue-size",
            "wait",
            "reconnect-timeout",
            "tag",
            "allow-uid",
        ];
        let unknown = |key: &str| {
            format!(
                "unknown device option '{key}' (socket, type, queues, queue-size, tag, wait, reconnect-timeout, allow-uid)"
            )
        };
        let parsed = Spec::parse(s, KEYS, |_| false).map_err(|e| match e {
            OptionError::Unknown(_) => unknown(e.key()),
            OptionError::Duplicate(k) => format!("device option '{k}' given twice in '{s}'"),
        })?;
        let mut spec = DeviceSpec::new("");
        let mut socket: Option<String> = None;
        let mut options = parsed.options.clone();
        match parsed.head_option(KEYS) {
            // `socket=PATH,...`: the first part is an option too.
            Some((k, v)) => options.insert(0, (k, Some(v))),
            None => match parsed.head.split_once(':') {
                _ if parsed.head.contains('=') => {
                    let key = parsed.head.split_once('=').map_or("", |(k, _)| k);
                    return Err(unknown(key));
                }
                // TYPE:PATH.
                Some((kind, path)) if kind.parse::<DeviceType>().is_ok() => {
                    if path.is_empty() {
                        return Err(format!("'{s}' has no socket path"));
                    }
                    spec.kind = kind.parse().ok();
                    socket = Some(path.to_owned());
                }
                _ => socket = Some(parsed.head.to_owned()),
            },
        }
        for (key, value) in options {
            let Some(value) = value else {
                return Err(format!("'{key}' in '{s}' is not key=value"));
            };
            match key {
                "socket" | "path" => socket = Some(value.to_owned()),
                "type" => spec.kind = Some(value.parse()?),
                "queues" | "num-queues" => spec.num_queues = Some(parse_u16(key, value)?),
                "queue-size" => spec.queue_size = Some(parse_u16(key, value)?),
                "wait" => spec.wait = Some(parse_wait(value)?),
                "tag" => spec.tag = Some(value.to_owned()),
                "allow-uid" => {
                    spec.allow_uid =
                        Some(value.parse().map_err(|_| {
                            format!("allow-uid={value}: expected a numeric user id")
                        })?)
                }
                _ => spec.reconnect = Some(parse_wait(value)?),
            }
        }
        match socket {
            Some(p) if p.len() > SOCKET_PATH_MAX => {
                return Err(format!(
                    "device socket path is {} bytes, a Unix socket path has at most {SOCKET_PATH_MAX}: {p}",
                    p.len()
                ))
            }
            Some(p) if !p.is_empty() => spec.socket = PathBuf::from(p),
            _ => return Err(format!("'{s}' has no socket path")),
        }
        Ok(spec)
    }
}

/// Longest socket path connect() takes: `sun_path` is 108 bytes with the final NUL.
pub const SOCKET_PATH_MAX: usize = 107;

/// Checks that no two devices name the same socket (as given, or as the same file once
/// resolved): two devices on one backend would fight over its one connection.
pub fn check_devices(devices: &[DeviceSpec]) -> Result<(), String> {
    let key =
        |d: &DeviceSpec| std::fs::canonicalize(&d.socket).unwrap_or_else(|_| d.socket.clone());
    for (i, a) in devices.iter().enumerate() {
        for (j, b) in devices.iter().enumerate().skip(i + 1) {
            if a.socket == b.socket || key(a) == key(b) {
                return Err(format!(
                    "devices {i} and {j} both use the socket {}: give each backend its own",
                    b.socket.display()
                ));
            }
        }
    }
    Ok(())
}

pub use hype_base::parse_size;

/// Granularity of guest memory: 2 MiB, so RAM is whole pages and can be backed by huge pages.
pub const MEMORY_ALIGN: u64 = 2 << 20;

/// Memory size in bytes: a bare number means MiB, as in other VMMs. It must be a multiple of
/// [`MEMORY_ALIGN`].
pub fn parse_memory(s: &str) -> Result<u64, String> {
    let size = parse_size(s, 1 << 20)?;
    if size % MEMORY_ALIGN != 0 {
        return Err(format!(
            "{s} is not a multiple of 2 MiB (guest memory comes in 2 MiB steps)"
        ));
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
        for unaligned in ["1000K", "513M", "536870913", "3M", "4097K"] {
            let e = parse_memory(unaligned).unwrap_err();
            assert!(e.contains("not a multiple of 2 MiB"), "{unaligned}: {e}");
        }
        assert_eq!(parse_memory("2048K").unwrap(), 2 << 20);
    }

    #[test]
    fn duplicate_devices() {
        let d = |s: &str| s.parse::<DeviceSpec>().unwrap();
        check_devices(&[d("/run/a.sock"), d("/run/b.sock")]).unwrap();
        let e = check_devices(&[
            d("/run/a.sock"),
            d("blk:/run/b.sock"),
            d("/run/b.sock,queues=2"),
        ])
        .unwrap_err();
        assert!(
            e.contains("devices 1 and 2 both use the socket /run/b.sock"),
            "{e}"
        );
        // The same file under two spellings.
        let dir = std::env::temp_dir().join(format!("hype-dup-dev-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("s.sock"), b"").unwrap();
        let a = dir.join("s.sock");
        let b = dir.join(".").join("s.sock");
        let e = check_devices(&[d(a.to_str().unwrap()), d(b.to_str().unwrap())]).unwrap_err();
        assert!(e.contains("devices 0 and 1"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
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
        assert_eq!(d, DeviceSpec::new("/run/a.sock"));
        let d: DeviceSpec = "blk:/run/b.sock".parse().unwrap();
        assert_eq!(d.kind, Some(DeviceType::Block));
        assert_eq!(d.socket, PathBuf::from("/run/b.sock"));
        let d: DeviceSpec =
            "socket=/run/c.sock,type=net,queues=2,queue-size=128,wait=10s,reconnect-timeout=500ms"
                .parse()
                .unwrap();
        assert_eq!(
            d,
            DeviceSpec {
                socket: "/run/c.sock".into(),
                kind: Some(DeviceType::Net),
                num_queues: Some(2),
                queue_size: Some(128),
                wait: Some(WaitLimit::For(Duration::from_secs(10))),
                reconnect: Some(WaitLimit::For(Duration::from_millis(500))),
                tag: None,
                allow_uid: None,
            }
        );
        // Generic devices: by name with a virtio-fs tag, or by virtio device ID.
        let d: DeviceSpec = "fs:/run/v.sock,tag=share".parse().unwrap();
        assert_eq!(
            (d.kind, d.tag.as_deref()),
            (Some(DeviceType::Fs), Some("share"))
        );
        assert_eq!(d.to_string().parse::<DeviceSpec>(), Ok(d));
        let d: DeviceSpec = "26:/run/v.sock".parse().unwrap();
        assert_eq!(d.kind, Some(DeviceType::Fs));
        let d: DeviceSpec = "/run/g.sock,type=16".parse().unwrap();
        assert_eq!(d.kind, Some(DeviceType::Other(16)));
        assert_eq!(d.to_string(), "/run/g.sock,type=16");
        let d: DeviceSpec = "socket=4:odd.sock".parse().unwrap();
        assert_eq!(d.to_string().parse::<DeviceSpec>(), Ok(d));
        let d: DeviceSpec = "/run/e.sock,allow-uid=1000".parse().unwrap();
        assert_eq!(d.allow_uid, Some(1000));
        assert_eq!(d.options().allow_uid, Some(1000));
        assert_eq!(d.to_string().parse::<DeviceSpec>().unwrap(), d);
        let d: DeviceSpec = "/run/d.sock,wait=forever".parse().unwrap();
        assert_eq!(d.wait, Some(WaitLimit::Forever));
        // A colon in a path that is not a type prefix stays in the path.
        let d: DeviceSpec = "/run/x:y.sock".parse().unwrap();
        assert_eq!(d.socket, PathBuf::from("/run/x:y.sock"));
        for bad in [
            "blk:",
            "",
            "type=blk",
            "/a,queues=x",
            "/a,colour=red",
            "/a,type=gpu",
            "/a,b",
            "/a,wait=3h",
            "/a,queues=70000",
            "/a,queues",
            "/a,wait=1s,wait=2s",
            "colour=red",
            "/a,allow-uid=bob",
            "/a,allow-uid=-1",
            "/a,allow-uid=1,allow-uid=2",
        ] {
            assert!(bad.parse::<DeviceSpec>().is_err(), "{bad}");
        }
        let long = format!("/{}", "s".repeat(SOCKET_PATH_MAX));
        let e = long.parse::<DeviceSpec>().unwrap_err();
        assert!(e.contains("at most 107"), "{e}");
        let fits = format!("/{}", "s".repeat(SOCKET_PATH_MAX - 1));
        assert!(fits.parse::<DeviceSpec>().is_ok());
        assert_eq!(
            parse_wait("2m"),
            Ok(WaitLimit::For(Duration::from_secs(120)))
        );
        assert_eq!(parse_wait("7"), Ok(WaitLimit::For(Duration::from_secs(7))));
    }
}
