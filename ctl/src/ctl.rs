//! `hype ctl`: the command line over [`crate::client`], with human output or `--json`.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::json;

use crate::client::{Client, ClientError};
use hype_api::events::{Event, EventKind, EventsReply};
use hype_api::model::{
    ActionReply, BackendState, ConfigRefreshReply, DeviceInfo, SnapshotReply, VmInfo,
};

/// `hype ctl` arguments.
#[derive(Args, Debug)]
#[command(after_help = "Examples:
  hype ctl --api-socket /run/vm.api info
  hype ctl --api-socket /run/vm.api --json info
  hype ctl --api-socket /run/vm.api pause
  hype ctl --api-socket /run/vm.api shutdown --timeout 30s
  hype ctl --api-socket /run/vm.api pause && hype ctl --api-socket /run/vm.api snapshot /var/snap/vm1
  hype ctl --api-socket /run/vm.api resize-device virtio0
  hype ctl --api-socket /run/vm.api switch-backend virtio0 /run/disk-v2.sock
  hype ctl --api-socket /run/vm.api events --follow

Exit codes: 0 done, 1 the VMM refused or could not be reached, 2 bad arguments.")]
pub struct CtlArgs {
    /// The VMM's API socket (`hype vmm --api-socket PATH`).
    #[arg(long, value_name = "PATH")]
    pub api_socket: PathBuf,
    /// Print the server's JSON answer instead of a summary.
    #[arg(long)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub verb: Verb,
}

/// `hype ctl` verbs.
#[derive(Subcommand, Debug)]
pub enum Verb {
    /// Show the VM: state, configuration, vCPUs, memory, devices, counters.
    Info,
    /// Stop the vCPUs (devices keep their rings).
    Pause,
    /// Start the paused vCPUs again.
    Resume,
    /// Press the power button; stop the VM if it still runs after the timeout.
    Shutdown {
        /// How long the guest gets, e.g. 500ms, 10s, 2m (at most 1h).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        timeout: Option<Duration>,
    },
    /// Stop the VM now.
    Stop,
    /// Hot-plug a vhost-user device: PATH or TYPE:PATH (blk, net, console).
    AddDevice {
        /// The backend socket, optionally with its type.
        #[arg(value_name = "SPEC")]
        spec: String,
    },
    /// Write a snapshot of the paused VM into DIR (created; made absolute here, since the VMM
    /// may run elsewhere). Restore it with `hype vmm --restore DIR`.
    Snapshot {
        /// Target directory (must not exist, or be empty).
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
    /// Hot-unplug a device by id (as `info` shows it, e.g. virtio1).
    RemoveDevice {
        /// Device id.
        #[arg(value_name = "ID")]
        id: String,
    },
    /// Re-read a device's config from its backend (a disk whose image grew) and tell the
    /// guest what changed.
    ResizeDevice {
        /// Device id.
        #[arg(value_name = "ID")]
        id: String,
    },
    /// Move a device to the backend at another socket while the guest runs.
    SwitchBackend {
        /// Device id.
        #[arg(value_name = "ID")]
        id: String,
        /// The new backend's socket.
        #[arg(value_name = "SOCKET")]
        socket: String,
    },
    /// Print the VM's events (pause, hot-plug, backend lost or back, power-off, ...) after
    /// SEQ. With --follow, wait for new ones and print them as they come, until the VM ends
    /// (one JSON object a line with --json).
    Events {
        /// Print the events after this sequence number (0: all the VMM still keeps).
        #[arg(long, value_name = "SEQ", default_value_t = 0)]
        since: u64,
        /// Keep waiting for events until the VM powers off, resets or is stopped.
        #[arg(long)]
        follow: bool,
    },
}

/// How long one `GET /vm/events` of `events --follow` waits (the server allows 30 s).
pub const FOLLOW_WAIT_SECS: u64 = 25;

/// Parses `500ms`, `10s`, `2m`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 500ms, 10s, 2m)"))?;
    let ms = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        _ => return Err(format!("{s:?}: unit must be ms, s or m")),
    };
    ms.map(Duration::from_millis)
        .ok_or_else(|| format!("{s:?} is too long"))
}

/// Errors of `hype ctl`.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The API call failed.
    #[error("{verb}")]
    Call {
        /// Which verb.
        verb: &'static str,
        /// Why.
        #[source]
        source: ClientError,
    },
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let _ = write!(s, ": {c}");
        cur = c.source();
    }
    s
}

/// Runs `hype ctl`; prints the error chain on one line and exits 1 on failure.
pub fn run(a: CtlArgs) -> ExitCode {
    if let Verb::Events {
        since,
        follow: true,
    } = a.verb
    {
        return match follow(&a, since, &mut std::io::stdout()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("hype ctl: {}", chain(&e));
                ExitCode::from(1)
            }
        };
    }
    match execute(&a) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("hype ctl: {}", chain(&e));
            ExitCode::from(1)
        }
    }
}

fn mib(b: u64) -> String {
    if b % (1 << 20) == 0 {
        format!("{} MiB", b >> 20)
    } else {
        format!("{b} bytes")
    }
}

/// Runs the verb; returns what to print.
pub fn execute(a: &CtlArgs) -> Result<String, CtlError> {
    let (verb, method, path, body): (&'static str, Method, String, Option<serde_json::Value>) =
        match &a.verb {
            Verb::Info => ("info", Method::GET, "/vm".into(), None),
            Verb::Pause => ("pause", Method::POST, "/vm/pause".into(), None),
            Verb::Resume => ("resume", Method::POST, "/vm/resume".into(), None),
            Verb::Stop => ("stop", Method::POST, "/vm/stop".into(), None),
            Verb::Shutdown { timeout } => (
                "shutdown",
                Method::POST,
                "/vm/shutdown".into(),
                Some(match timeout {
                    Some(t) => json!({ "timeout_ms": t.as_millis() as u64 }),
                    None => json!({}),
                }),
            ),
            Verb::AddDevice { spec } => {
                let (kind, socket) = match spec.split_once(':') {
                    Some((k, p)) if ["blk", "net", "console"].contains(&k) => (Some(k), p),
                    _ => (None, spec.as_str()),
                };
                let mut b = json!({ "socket": socket });
                if let Some(k) = kind {
                    b["type"] = json!(k);
                }
                ("add-device", Method::POST, "/vm/devices".into(), Some(b))
            }
            Verb::Snapshot { dir } => {
                let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.clone());
                (
                    "snapshot",
                    Method::PUT,
                    "/vm/snapshot".into(),
                    Some(json!({ "dir": dir.to_string_lossy() })),
                )
            }
            Verb::RemoveDevice { id } => (
                "remove-device",
                Method::DELETE,
                format!("/vm/devices/{id}"),
                None,
            ),
            Verb::ResizeDevice { id } => (
                "resize-device",
                Method::POST,
                format!("/vm/devices/{id}/resize"),
                None,
            ),
            Verb::Events { since, .. } => (
                "events",
                Method::GET,
                format!("/vm/events?since={since}"),
                None,
            ),
            Verb::SwitchBackend { id, socket } => (
                "switch-backend",
                Method::PUT,
                format!("/vm/devices/{id}/backend"),
                Some(json!({ "socket": socket })),
            ),
        };
    let call_err = |source| CtlError::Call { verb, source };
    // A shutdown answers at once; only a slow VMM makes any call take long. A backend
    // switch waits for the old backend's requests (the VMM gives it a minute).
    let limit = match a.verb {
        Verb::SwitchBackend { .. } => Duration::from_secs(75),
        _ => Duration::from_secs(30),
    };
    let client = Client::new(&a.api_socket, limit).map_err(call_err)?;
    let answer = client
        .call(method, &path, body.as_ref())
        .map_err(call_err)?;
    if a.json {
        let mut s = String::from_utf8_lossy(&answer.body).into_owned();
        s.push('\n');
        return Ok(s);
    }
    let decode = |e| call_err(ClientError::Decode(e));
    Ok(match &a.verb {
        Verb::Info => human_info(&serde_json::from_slice::<VmInfo>(&answer.body).map_err(decode)?),
        Verb::AddDevice { .. } => {
            let d: DeviceInfo = serde_json::from_slice(&answer.body).map_err(decode)?;
            format!("added {}\n", device_line(&d))
        }
        Verb::RemoveDevice { id } => format!("removed {id}\n"),
        Verb::Events { .. } => {
            let r: EventsReply = serde_json::from_slice(&answer.body).map_err(decode)?;
            let mut s = String::new();
            if r.dropped > 0 {
                let _ = writeln!(s, "({} older events dropped)", r.dropped);
            }
            for e in &r.events {
                let _ = writeln!(s, "{}", event_line(e));
            }
            s
        }
        Verb::Snapshot { .. } => {
            let r: SnapshotReply = serde_json::from_slice(&answer.body).map_err(decode)?;
            format!(
                "snapshot in {}: {} of memory written in {} ms\n",
                r.dir,
                mib(r.memory_bytes_written),
                r.took_ms
            )
        }
        Verb::ResizeDevice { .. } => {
            let r: ConfigRefreshReply = serde_json::from_slice(&answer.body).map_err(decode)?;
            let what = if r.changed {
                "changed; the guest was told"
            } else {
                "unchanged"
            };
            format!("{}: {} ({what})\n", r.id, r.config)
        }
        Verb::SwitchBackend { .. } => {
            let d: DeviceInfo = serde_json::from_slice(&answer.body).map_err(decode)?;
            format!("switched {}\n", device_line(&d))
        }
        Verb::Shutdown { .. } => {
            let r: ActionReply = serde_json::from_slice(&answer.body).map_err(decode)?;
            let how = if r.power_button == Some(true) {
                "power button pressed"
            } else {
                "no power button: the guest is not told"
            };
            format!(
                "{}: {how}; forced stop in {} ms if it still runs\n",
                r.state,
                r.timeout_ms.unwrap_or(0)
            )
        }
        _ => {
            let r: ActionReply = serde_json::from_slice(&answer.body).map_err(decode)?;
            format!("{}\n", r.state)
        }
    })
}

/// One event for people: `seq`, time (Unix seconds), kind, device, detail.
pub fn event_line(e: &Event) -> String {
    let kind = serde_json::to_value(e.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let mut s = format!(
        "{} {}.{:03} {kind}",
        e.seq,
        e.time_ms / 1000,
        e.time_ms % 1000
    );
    if let Some(d) = &e.device {
        let _ = write!(s, " {d}");
    }
    if let Some(d) = &e.detail {
        let _ = write!(s, " ({d})");
    }
    s
}

/// Whether the VM ends after this event (`events --follow` stops there).
fn ends_vm(kind: EventKind) -> bool {
    matches!(
        kind,
        EventKind::GuestPoweredOff | EventKind::GuestReset | EventKind::StopRequested
    )
}

/// `events --follow`: long-polls `GET /vm/events` and writes each event to `out` as it comes.
pub fn follow(a: &CtlArgs, mut since: u64, out: &mut dyn std::io::Write) -> Result<(), CtlError> {
    let call_err = |source| CtlError::Call {
        verb: "events",
        source,
    };
    let client =
        Client::new(&a.api_socket, Duration::from_secs(FOLLOW_WAIT_SECS + 10)).map_err(call_err)?;
    loop {
        let answer = client
            .call(
                Method::GET,
                &format!("/vm/events?since={since}&timeout={FOLLOW_WAIT_SECS}"),
                None,
            )
            .map_err(call_err)?;
        let r: EventsReply =
            serde_json::from_slice(&answer.body).map_err(|e| call_err(ClientError::Decode(e)))?;
        if r.dropped > 0 {
            eprintln!(
                "hype ctl: {} events were dropped before they were read",
                r.dropped
            );
        }
        let mut end = false;
        for e in &r.events {
            let line = if a.json {
                serde_json::to_string(e).map_err(|e| call_err(ClientError::Decode(e)))?
            } else {
                event_line(e)
            };
            let _ = writeln!(out, "{line}");
            end |= ends_vm(e.kind);
        }
        let _ = out.flush();
        since = since.max(r.last_seq);
        if end {
            return Ok(());
        }
    }
}

fn device_line(d: &DeviceInfo) -> String {
    let backend = match (d.backend, d.lost_for_ms) {
        (BackendState::Connected, _) => "connected".to_string(),
        (BackendState::Reconnecting, Some(ms)) => format!("lost {ms} ms ago, reconnecting"),
        (BackendState::Reconnecting, None) => "lost, reconnecting".to_string(),
        (BackendState::GaveUp, _) => "lost, gave up".to_string(),
    };
    format!(
        "{} {} {}: {backend}; {} queue(s), window {:#x} GSI {}, status {:#x}, reconnects {}, \
         ring starts {}, notify exits {}, guest errors {}",
        d.id,
        d.kind,
        d.socket,
        d.queues,
        d.mmio_base,
        d.gsi,
        d.status,
        d.reconnects,
        d.ring_starts,
        d.notify_exits,
        d.guest_errors
    )
}

/// The human summary of `GET /vm`.
pub fn human_info(v: &VmInfo) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "state: {}, up {:.1} s",
        v.state,
        v.uptime_ms as f64 / 1000.0
    );
    let c = &v.config;
    let _ = writeln!(
        s,
        "config: kernel {}, {}, {} vCPU(s), serial {}{}",
        c.kernel.as_deref().unwrap_or("(built-in program)"),
        mib(c.memory_bytes),
        c.cpus,
        c.serial,
        if c.emulation_fixups {
            ", PVM fix-ups on"
        } else {
            ""
        }
    );
    if let Some(cmd) = &c.cmdline {
        let _ = writeln!(s, "cmdline: {cmd}");
    }
    let regions: Vec<String> = v
        .memory
        .regions
        .iter()
        .map(|r| format!("{:#x}+{}", r.guest_address, mib(r.bytes)))
        .collect();
    let _ = writeln!(
        s,
        "memory: {} in {} region(s): {}",
        mib(v.memory.bytes),
        v.memory.regions.len(),
        regions.join(", ")
    );
    for p in &v.vcpus {
        let e = &p.exits;
        let _ = writeln!(
            s,
            "vcpu{}: {}; exits io_in={} io_out={} mmio_read={} mmio_write={} interrupted={} \
             emulation={} other={}",
            p.index,
            if p.paused { "paused" } else { "running" },
            e.io_in,
            e.io_out,
            e.mmio_read,
            e.mmio_write,
            e.interrupted,
            e.emulation,
            e.other
        );
    }
    if v.devices.is_empty() {
        let _ = writeln!(s, "devices: none");
    }
    for d in &v.devices {
        let _ = writeln!(s, "{}", device_line(d));
    }
    let kv = |m: &std::collections::BTreeMap<String, u64>| {
        m.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let _ = writeln!(
        s,
        "counters: mmio unclaimed={}; fix-ups {} unhandled={}; interrupts {}",
        v.counters.mmio_unclaimed,
        kv(&v.counters.fixups),
        v.counters.fixups_unhandled,
        kv(&v.counters.interrupts)
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("1h").is_err());
        assert!(parse_duration("ms").is_err());
        assert!(parse_duration("99999999999999999999m").is_err());
    }
}
