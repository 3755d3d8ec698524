//! The command lines of `hype run`'s children, built from the children's own argument types.
//!
//! Each child (`hype vmm`, `block-file`, `block-mem`, `block-http`, `net-tap`, `console`)
//! defines its arguments once, as a clap `Args` struct in its crate; `hype run` makes typed
//! values of those structs with the child's own parser ([`parse`]), so every default, limit
//! and value check is the child's, and renders them back to argv with [`ChildArgs::to_argv`].
//! The tests prove the round trip: parsing the rendered argv with the child's parser gives
//! back the same value, for every field.
//!
//! Rendering leaves out what equals the child's default (found by parsing only the
//! required arguments), so the printed commands stay short.

use std::ffi::{OsStr, OsString};
use std::fmt::Debug;

use clap::{CommandFactory, FromArgMatches, Parser};
use hype_block::DeviceArgs;
use hype_daemon::{ListenArgs, DEFAULT_SOCKET_MODE};
use hype_sandbox::{SandboxArgs, SandboxMode};
use hype_vmm::cli::VmmArgs;
use hype_vmm::config::format_wait;

/// A child's argument struct that `hype run` can render to argv.
pub trait ChildArgs: clap::Args + Clone + PartialEq + Debug {
    /// The `hype` subcommand that takes these arguments.
    const SUBCOMMAND: &'static str;

    /// The arguments (after the subcommand) that parse back to `self`.
    fn to_argv(&self) -> Vec<OsString>;
}

/// Only `A`, as a whole command line without a program name.
#[derive(Parser, Debug)]
#[command(no_binary_name = true)]
struct Only<A: clap::Args> {
    #[command(flatten)]
    args: A,
}

/// Parses `argv` (no program name, no subcommand) with `A`'s own parser.
pub fn parse<A, I, T>(argv: I) -> Result<A, clap::Error>
where
    A: clap::Args,
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let m = Only::<A>::command().try_get_matches_from(argv)?;
    <Only<A> as FromArgMatches>::from_arg_matches(&m).map(|o| o.args)
}

/// The reason a child's parser gave for rejecting a value: the value parser's own message
/// when there is one, else clap's first line.
pub fn reason(e: &clap::Error) -> String {
    if let Some(src) = std::error::Error::source(e) {
        return src.to_string();
    }
    let text = e.to_string();
    let line = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    line.trim().trim_start_matches("error: ").to_string()
}

/// Argv under construction.
#[derive(Default)]
struct Argv(Vec<OsString>);

impl Argv {
    /// `--name value`, or `--name=value` when the value starts with `-` (so clap cannot take
    /// it for an option).
    fn opt(&mut self, name: &str, value: impl AsRef<OsStr>) {
        let value = value.as_ref();
        if value.as_encoded_bytes().starts_with(b"-") {
            let mut w = OsString::from(format!("--{name}="));
            w.push(value);
            self.0.push(w);
        } else {
            self.0.push(format!("--{name}").into());
            self.0.push(value.to_owned());
        }
    }

    fn flag(&mut self, name: &str, on: bool) {
        if on {
            self.0.push(format!("--{name}").into());
        }
    }
}

/// Whether a field must be rendered: always when the defaults are unknown, else when it
/// differs from them.
/// Whether `url` holds something [`hype_base::redact_url`] hides (user information, query
/// values), which must not appear in a child's argv.
pub fn url_has_secrets(url: &str) -> bool {
    hype_base::redact_url(url) != url
}

fn differs<A, T: PartialEq>(d: &Option<A>, get: impl Fn(&A) -> &T, v: &T) -> bool {
    d.as_ref().is_none_or(|d| get(d) != v)
}

fn listen(a: &mut Argv, l: &ListenArgs) {
    let ListenArgs {
        socket,
        socket_mode,
    } = l;
    if let Some(s) = socket {
        a.opt("socket", s);
    }
    if *socket_mode != DEFAULT_SOCKET_MODE {
        a.opt("socket-mode", format!("{socket_mode:04o}"));
    }
}

/// `--sandbox` and `--print-sandbox`: said only when they differ from the default (on).
fn sandbox(a: &mut Argv, v: &SandboxArgs) {
    let SandboxArgs {
        sandbox,
        print_sandbox,
        privileges,
    } = v;
    if *sandbox == SandboxMode::Off {
        a.opt("sandbox", "off");
    }
    a.flag("print-sandbox", *print_sandbox);
    if let Some(c) = privileges.credentials() {
        a.opt("user", c.uid.to_string());
        a.opt("group", c.gid.to_string());
    }
}

/// The shared block options; `d` is the backend's defaults for them.
fn device(a: &mut Argv, v: &DeviceArgs, d: &Option<DeviceArgs>) {
    let DeviceArgs {
        listen: l,
        num_queues,
        queue_size,
        io_threads,
        serial,
        poll_us,
        large_io_threads,
        out_of_order,
        queue_threads,
        sandbox: sb,
    } = v;
    if differs(d, |d| &d.num_queues, num_queues) {
        a.opt("num-queues", num_queues.to_string());
    }
    if differs(d, |d| &d.queue_size, queue_size) {
        a.opt("queue-size", queue_size.to_string());
    }
    if let Some(n) = io_threads {
        a.opt("io-threads", n.to_string());
    }
    if let Some(s) = serial {
        a.opt("serial", s);
    }
    if differs(d, |d| &d.poll_us, poll_us) {
        a.opt("poll-us", poll_us.to_string());
    }
    if let Some(n) = large_io_threads {
        a.opt("large-io-threads", n.to_string());
    }
    if differs(d, |d| &d.queue_threads, queue_threads) {
        a.opt("queue-threads", queue_threads.to_string());
    }
    a.flag("out-of-order", *out_of_order);
    sandbox(a, sb);
    listen(a, l);
}

impl ChildArgs for VmmArgs {
    const SUBCOMMAND: &'static str = "vmm";

    fn to_argv(&self) -> Vec<OsString> {
        let VmmArgs {
            kernel,
            initrd,
            cmdline,
            memory,
            cpus,
            serial,
            devices,
            device_wait,
            emulation_fixups,
            api_socket,
            platform,
            graceful_stop,
            dump_acpi,
            sandbox: sb,
            restore,
        } = self;
        let d = parse::<VmmArgs, _, _>([OsStr::new("--kernel"), OsStr::new("k")]).ok();
        let mut a = Argv::default();
        if let Some(k) = kernel {
            a.opt("kernel", k);
        }
        if let Some(i) = initrd {
            a.opt("initrd", i);
        }
        if differs(&d, |d| &d.cmdline, cmdline) {
            a.opt("cmdline", cmdline);
        }
        if differs(&d, |d| &d.memory, memory) {
            a.opt("memory", hype_base::format_size(*memory));
        }
        if differs(&d, |d| &d.cpus, cpus) {
            a.opt("cpus", cpus.to_string());
        }
        // Always said: whether the VMM owns the terminal matters when reading the commands.
        a.opt("serial", serial.to_string());
        for dev in devices {
            a.opt("device", dev.to_string());
        }
        if differs(&d, |d| &d.device_wait, device_wait) {
            a.opt("device-wait", format_wait(*device_wait));
        }
        if differs(&d, |d| &d.emulation_fixups, emulation_fixups) {
            a.opt("emulation-fixups", emulation_fixups.as_str());
        }
        if let Some(p) = api_socket {
            a.opt("api-socket", p);
        }
        if differs(&d, |d| &d.platform, platform) {
            a.opt("platform", platform.name());
        }
        if let Some(t) = graceful_stop {
            a.opt("graceful-stop", hype_base::format_duration(*t));
        }
        if let Some(dir) = dump_acpi {
            a.opt("dump-acpi", dir);
        }
        sandbox(&mut a, &sb.common);
        for dir in &sb.allow {
            a.opt("sandbox-allow", dir);
        }
        if let Some(dir) = restore {
            a.opt("restore", dir);
        }
        a.0
    }
}

impl ChildArgs for hype_block_file::Args {
    const SUBCOMMAND: &'static str = "block-file";

    fn to_argv(&self) -> Vec<OsString> {
        let hype_block_file::Args {
            path,
            readonly,
            direct,
            block_size,
            device: dev,
        } = self;
        let d = parse::<Self, _, _>([OsStr::new("--path"), path.as_os_str()]).ok();
        let mut a = Argv::default();
        a.opt("path", path);
        a.flag("readonly", *readonly);
        a.flag("direct", *direct);
        if let Some(b) = block_size {
            a.opt("block-size", b.to_string());
        }
        device(&mut a, dev, &d.map(|d| d.device));
        a.0
    }
}

impl ChildArgs for hype_block_mem::Args {
    const SUBCOMMAND: &'static str = "block-mem";

    fn to_argv(&self) -> Vec<OsString> {
        let hype_block_mem::Args {
            size,
            image,
            readonly,
            device: dev,
        } = self;
        let d = parse::<Self, [&str; 0], &str>([]).ok();
        let mut a = Argv::default();
        if let Some(s) = size {
            a.opt("size", s.to_string());
        }
        if let Some(i) = image {
            a.opt("image", i);
        }
        a.flag("readonly", *readonly);
        device(&mut a, dev, &d.map(|d| d.device));
        a.0
    }
}

impl ChildArgs for hype_block_http::Args {
    const SUBCOMMAND: &'static str = "block-http";

    fn to_argv(&self) -> Vec<OsString> {
        let hype_block_http::Args {
            url,
            overlay,
            readonly,
            cache_size,
            cache_block,
            readahead,
            connections,
            retries,
            retry_delay_ms,
            credentials_file,
            ca_cert,
            timeout,
            block_size,
            device: dev,
        } = self;
        let d = parse::<Self, _, _>(["--url", url.as_str()]).ok();
        let mut a = Argv::default();
        a.opt("url", url);
        if let Some(o) = overlay {
            a.opt("overlay", o);
        }
        a.flag("readonly", *readonly);
        if differs(&d, |d| &d.cache_size, cache_size) {
            a.opt("cache-size", cache_size.to_string());
        }
        if differs(&d, |d| &d.cache_block, cache_block) {
            a.opt("cache-block", cache_block.to_string());
        }
        if differs(&d, |d| &d.readahead, readahead) {
            a.opt("readahead", readahead.to_string());
        }
        if differs(&d, |d| &d.connections, connections) {
            a.opt("connections", connections.to_string());
        }
        if differs(&d, |d| &d.retries, retries) {
            a.opt("retries", retries.to_string());
        }
        if differs(&d, |d| &d.retry_delay_ms, retry_delay_ms) {
            a.opt("retry-delay-ms", retry_delay_ms.to_string());
        }
        if let Some(c) = credentials_file {
            a.opt("credentials-file", c);
        }
        if let Some(c) = ca_cert {
            a.opt("ca-cert", c);
        }
        if differs(&d, |d| &d.timeout, timeout) {
            a.opt("timeout", timeout.to_string());
        }
        if differs(&d, |d| &d.block_size, block_size) {
            a.opt("block-size", block_size.to_string());
        }
        device(&mut a, dev, &d.map(|d| d.device));
        a.0
    }
}

impl ChildArgs for hype_net_tap::Args {
    const SUBCOMMAND: &'static str = "net-tap";

    fn to_argv(&self) -> Vec<OsString> {
        let hype_net_tap::Args {
            listen: l,
            tap,
            mac,
            mtu,
            queue_pairs,
            queue_size,
            sandbox: sb,
        } = self;
        let d = parse::<Self, _, _>(["--tap", tap.as_str()]).ok();
        let mut a = Argv::default();
        a.opt("tap", tap);
        if let Some(m) = mac {
            a.opt("mac", m.to_string());
        }
        if let Some(m) = mtu {
            a.opt("mtu", m.to_string());
        }
        if differs(&d, |d| &d.queue_pairs, queue_pairs) {
            a.opt("queue-pairs", queue_pairs.to_string());
        }
        if differs(&d, |d| &d.queue_size, queue_size) {
            a.opt("queue-size", queue_size.to_string());
        }
        sandbox(&mut a, sb);
        listen(&mut a, l);
        a.0
    }
}

impl ChildArgs for hype_console::Args {
    const SUBCOMMAND: &'static str = "console";

    fn to_argv(&self) -> Vec<OsString> {
        let hype_console::Args {
            listen: l,
            output,
            log,
            size,
            buffer,
            stall_timeout_ms,
            client_socket_mode,
            sandbox: sb,
        } = self;
        let d = parse::<Self, [&str; 0], &str>([]).ok();
        let mut a = Argv::default();
        // Always said: where the console goes is the point of this process.
        a.opt("output", output.to_string());
        if let Some(f) = log {
            a.opt("log", f);
        }
        if let Some((c, r)) = size {
            a.opt("size", format!("{c}x{r}"));
        }
        if differs(&d, |d| &d.buffer, buffer) {
            a.opt("buffer", buffer.to_string());
        }
        if differs(&d, |d| &d.stall_timeout_ms, stall_timeout_ms) {
            a.opt("stall-timeout-ms", stall_timeout_ms.to_string());
        }
        if differs(&d, |d| &d.client_socket_mode, client_socket_mode) {
            a.opt("client-socket-mode", format!("{client_socket_mode:04o}"));
        }
        sandbox(&mut a, sb);
        listen(&mut a, l);
        a.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::time::Duration;

    use hype_fixups::FixupMode;
    use hype_vmm::config::{DeviceSpec, SerialSpec};
    use hype_vmm::virtio::{DeviceType, WaitLimit};

    /// Renders `v`, parses the result with the child's parser, and checks it is `v` again.
    fn round_trip<A: ChildArgs>(v: &A) -> Vec<OsString> {
        let argv = v.to_argv();
        let back = parse::<A, _, _>(argv.clone())
            .unwrap_or_else(|e| panic!("{} {argv:?} does not parse: {e}", A::SUBCOMMAND));
        assert_eq!(&back, v, "{} {argv:?}", A::SUBCOMMAND);
        argv
    }

    fn words(argv: &[OsString]) -> Vec<&str> {
        argv.iter().map(|w| w.to_str().unwrap()).collect()
    }

    fn listen_all() -> ListenArgs {
        ListenArgs {
            socket: Some("/run/x,y=z.sock".into()),
            socket_mode: 0o660,
        }
    }

    fn sandbox_all() -> SandboxArgs {
        SandboxArgs {
            sandbox: SandboxMode::Off,
            print_sandbox: true,
            privileges: Default::default(),
        }
    }

    fn device_all() -> DeviceArgs {
        DeviceArgs {
            sandbox: sandbox_all(),
            listen: listen_all(),
            num_queues: 3,
            queue_size: 64,
            io_threads: Some(0),
            serial: Some("-serial-".into()),
            poll_us: 7,
            large_io_threads: Some(5),
            out_of_order: true,
            queue_threads: 2,
        }
    }

    #[test]
    fn vmm_args_round_trip() {
        let minimal = parse::<VmmArgs, _, _>(["--kernel", "/k"]).unwrap();
        assert_eq!(
            words(&round_trip(&minimal)),
            ["--kernel", "/k", "--serial", "stdio"]
        );
        let mut dev = DeviceSpec::new("blk:odd=path");
        dev.kind = Some(DeviceType::Net);
        dev.num_queues = Some(4);
        dev.queue_size = Some(128);
        dev.wait = Some(WaitLimit::For(Duration::from_millis(1500)));
        dev.reconnect = Some(WaitLimit::Forever);
        let all = VmmArgs {
            kernel: Some("/boot/vm linux".into()),
            initrd: Some("/boot/initrd".into()),
            cmdline: "-x console=ttyS0 'quoted'".into(),
            memory: 1536 << 20,
            cpus: 3,
            serial: SerialSpec::File("/tmp/serial,log".into()),
            devices: vec![DeviceSpec::new("/run/a.sock"), dev],
            device_wait: WaitLimit::For(Duration::from_secs(120)),
            emulation_fixups: FixupMode::Off,
            api_socket: Some("/run/vm,api".into()),
            platform: hype_vmm::platform::Platform::Mptable,
            graceful_stop: Some(Duration::from_millis(2500)),
            dump_acpi: Some("/tmp/acpi,dir".into()),
            sandbox: hype_vmm::sandbox::VmmSandboxArgs {
                common: SandboxArgs {
                    sandbox: SandboxMode::Off,
                    print_sandbox: false,
                    privileges: Default::default(),
                },
                allow: vec!["/var/snap,shots".into()],
            },
            restore: None,
        };
        round_trip(&all);
        let restore = VmmArgs {
            kernel: None,
            initrd: None,
            dump_acpi: None,
            restore: Some("/var/snap,1".into()),
            ..all.clone()
        };
        round_trip(&restore);
        // Sizes that are not whole GiB keep every byte (memory comes in 2 MiB steps).
        let odd = VmmArgs {
            memory: (1 << 30) + (2 << 20),
            ..all.clone()
        };
        round_trip(&odd);
        let none = VmmArgs {
            serial: SerialSpec::None,
            device_wait: WaitLimit::Forever,
            ..all
        };
        round_trip(&none);
    }

    #[test]
    fn block_args_round_trip() {
        let f = parse::<hype_block_file::Args, _, _>(["--path", "/d.img"]).unwrap();
        assert_eq!(words(&round_trip(&f)), ["--path", "/d.img"]);
        round_trip(&hype_block_file::Args {
            path: "-dash.img".into(),
            readonly: true,
            direct: true,
            block_size: Some(4096),
            device: device_all(),
        });

        let m = parse::<hype_block_mem::Args, _, _>(["--size", "64M"]).unwrap();
        assert_eq!(words(&round_trip(&m)), ["--size", "67108864"]);
        round_trip(&hype_block_mem::Args {
            size: None,
            image: Some("/img".into()),
            readonly: true,
            device: DeviceArgs {
                io_threads: None,
                serial: None,
                ..device_all()
            },
        });

        let h = parse::<hype_block_http::Args, _, _>(["--url", "http://h/i"]).unwrap();
        assert_eq!(words(&round_trip(&h)), ["--url", "http://h/i"]);
        round_trip(&hype_block_http::Args {
            url: "https://h:8443/a,b?c=d".into(),
            overlay: Some("/var/o.img".into()),
            readonly: true,
            cache_size: 3 << 20,
            cache_block: 1 << 16,
            readahead: 0,
            connections: 2,
            retries: 0,
            retry_delay_ms: 7,
            credentials_file: Some("/run/creds".into()),
            ca_cert: Some("/ca.pem".into()),
            timeout: 9,
            block_size: 4096,
            device: device_all(),
        });
    }

    #[test]
    fn net_and_console_args_round_trip() {
        let n = parse::<hype_net_tap::Args, _, _>(["--tap", "tap0"]).unwrap();
        assert_eq!(words(&round_trip(&n)), ["--tap", "tap0"]);
        round_trip(&hype_net_tap::Args {
            listen: listen_all(),
            tap: "t1".into(),
            mac: Some("52:54:00:12:34:56".parse().unwrap()),
            mtu: Some(9000),
            queue_pairs: 4,
            queue_size: 1024,
            sandbox: sandbox_all(),
        });

        let c = parse::<hype_console::Args, [&str; 0], &str>([]).unwrap();
        assert_eq!(words(&round_trip(&c)), ["--output", "stdio"]);
        for output in [
            hype_console::Output::Pty,
            hype_console::Output::Socket("/run/c:1.sock".into()),
            hype_console::Output::File(PathBuf::from("/log")),
        ] {
            round_trip(&hype_console::Args {
                listen: listen_all(),
                output,
                log: Some("/also.log".into()),
                size: Some((132, 43)),
                buffer: 4096,
                stall_timeout_ms: 0,
                client_socket_mode: 0o666,
                sandbox: sandbox_all(),
            });
        }
    }

    #[test]
    fn reasons_are_the_childs_own() {
        let e = parse::<VmmArgs, _, _>(["--kernel", "k", "--memory", "lots"]).unwrap_err();
        assert_eq!(reason(&e), "'lots' is not a size (examples: 512M, 2G)");
        let e = parse::<hype_net_tap::Args, _, _>(["--tap", "t", "--mac", "01:00:00:00:00:00"])
            .unwrap_err();
        assert_eq!(reason(&e), "MAC address 01:00:00:00:00:00 is multicast");
    }
}
