//! `hype run` refuses bad VM descriptions with clear errors before anything is started (no
//! runtime directory, no process), reads a TOML description that flags override, and prints
//! the equivalent separate commands.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

mod run_support;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use run_support::{entries, fresh_dir, hype_bin};

fn base() -> std::path::PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("run_specs");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs `prefix... hype run ARGS` with a private XDG_RUNTIME_DIR; returns the output and
/// asserts nothing was created there.
fn run_in(dir: &Path, prefix: &[&str], args: &[&str]) -> Output {
    let xdg = fresh_dir(dir, "xdg");
    let mut cmd = match prefix.split_first() {
        Some((p, rest)) => {
            let mut c = Command::new(p);
            c.args(rest).arg(hype_bin());
            c
        }
        None => Command::new(hype_bin()),
    };
    let o = cmd
        .arg("run")
        .args(args)
        .env("XDG_RUNTIME_DIR", &xdg)
        .stdin(Stdio::null())
        .output()
        .expect("run hype");
    assert_eq!(entries(&xdg), Vec::<String>::new(), "something was started");
    o
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A directory with a kernel file and an image.
fn files(name: &str) -> (std::path::PathBuf, String, String) {
    let dir = fresh_dir(&base(), name);
    let kernel = dir.join("vmlinux");
    // Only the ELF magic: enough for the checks, which do not parse the kernel.
    std::fs::write(&kernel, b"\x7fELF and nothing else").unwrap();
    let img = dir.join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let k = kernel.to_str().unwrap().to_string();
    let i = img.to_str().unwrap().to_string();
    (dir, k, i)
}

#[test]
fn unknown_disk_scheme() {
    let (dir, k, _) = files("scheme");
    let o = run_in(&dir, &[], &["--kernel", &k, "--disk", "nbd://host/x"]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        stderr(&o),
        "hype run: --disk nbd://host/x: unknown disk scheme in \"nbd://host/x\" (expected \
         file:PATH, mem:SIZE, http://URL or https://URL)\n"
    );
}

#[test]
fn missing_files() {
    let (dir, _, _) = files("missing");
    let nope = dir.join("nope.img");
    let disk = format!("file:{}", nope.display());
    let o = run_in(
        &dir,
        &[],
        &["--kernel", "/nonexistent/vmlinux", "--disk", &disk],
    );
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(
        e.starts_with("hype run: 2 problems, nothing started:\n"),
        "{e}"
    );
    assert!(
        e.contains("  --kernel: cannot open /nonexistent/vmlinux: No such file or directory"),
        "{e}"
    );
    assert!(
        e.contains(&format!(
            "  --disk {disk}: cannot open {}: No such file or directory",
            nope.display()
        )),
        "{e}"
    );
}

#[test]
fn kernel_that_is_no_kernel() {
    let (dir, _, img) = files("notkernel");
    let o = run_in(&dir, &[], &["--kernel", &img]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        stderr(&o),
        format!("hype run: --kernel: {img} is neither an ELF file nor a bzImage\n")
    );
}

#[test]
fn duplicate_socket_and_duplicate_image() {
    let (dir, k, img) = files("dup");
    let sock = dir.join("d.sock");
    let a = format!("mem:1M,socket={}", sock.display());
    let b = format!("mem:2M,socket={}", sock.display());
    let f1 = format!("file:{img}");
    let f2 = format!("file:{img},ro");
    let o = run_in(
        &dir,
        &[],
        &[
            "--kernel", &k, "--disk", &a, "--disk", &b, "--disk", &f1, "--disk", &f2,
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(
        e.contains(&format!(
            "--disk {b}: socket {} is already used by --disk {a}",
            sock.display()
        )),
        "{e}"
    );
    assert!(
        e.contains(&format!(
            "--disk {f2}: {img} is already a disk (--disk {f1}); two writers would corrupt it"
        )),
        "{e}"
    );
    assert!(!sock.exists());
    // The same image twice read-only is fine: only the kernel is wrong here.
    let o = run_in(
        &dir,
        &[],
        &["--kernel", &k, "--disk", &f2, "--disk", &f2, "--cpus", "0"],
    );
    assert_eq!(stderr(&o), "hype run: --cpus: 0 is not in 1..=254\n");
}

#[test]
fn tap_without_permission() {
    let (dir, k, _) = files("tap");
    let args = ["--kernel", k.as_str(), "--net", "tap:hypenoperm0"];
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let runs: Vec<(Vec<&str>, &str)> = if root {
        vec![
            // root without CAP_NET_ADMIN: TUNSETIFF is refused.
            (
                vec![
                    "setpriv",
                    "--inh-caps=-net_admin",
                    "--bounding-set=-net_admin",
                ],
                "--net tap:hypenoperm0: no permission to create or attach to TAP hypenoperm0 \
                 (needs CAP_NET_ADMIN",
            ),
            // an unprivileged user: /dev/net/tun itself may be closed (mode 0600 here), or
            // TUNSETIFF is refused.
            (
                vec![
                    "setpriv",
                    "--reuid=65534",
                    "--regid=65534",
                    "--clear-groups",
                    "--inh-caps=-all",
                    "--bounding-set=-all",
                ],
                "--net tap:hypenoperm0: ",
            ),
        ]
    } else {
        vec![(vec![], "--net tap:hypenoperm0: ")]
    };
    for (prefix, want) in runs {
        let o = run_in(&dir, &prefix, &args);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{prefix:?}: {e}");
        assert!(
            e.starts_with(&format!("hype run: {want}")),
            "{prefix:?}: {e}"
        );
        assert!(
            e.contains("no permission to create or attach to TAP hypenoperm0")
                || e.contains("cannot open /dev/net/tun: Permission denied"),
            "{prefix:?}: {e}"
        );
    }
    assert!(!Path::new("/sys/class/net/hypenoperm0").exists());
}

#[test]
fn config_file_with_flag_overrides_and_print_commands() {
    let (dir, _, img) = files("config");
    let toml = dir.join("vm.toml");
    std::fs::write(
        &toml,
        r#"
kernel = "vmlinux"
cmdline = "console=ttyS0 quiet"
memory = "1G"
cpus = 2
disks = ["file:disk.img,ro", "mem:64M", "http://example.com/i.raw,overlay=o.img"]
console = "pty"
"#,
    )
    .unwrap();
    let o = run_in(
        &dir,
        &[],
        &[
            "--config",
            toml.to_str().unwrap(),
            "--memory",
            "2G",
            "--print-commands",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let exe = hype_bin();
    let exe = exe.to_str().unwrap();
    let d = dir.display();
    let want = format!(
        "DIR=\"$(mktemp -d \"${{XDG_RUNTIME_DIR:-/tmp}}/hype-vm.XXXXXXXXXX\")\" || exit 1
{exe} block-file --path {img} --readonly --socket \"$DIR\"/disk0.sock &
{exe} block-mem --size 67108864 --socket \"$DIR\"/disk1.sock &
{exe} block-http --url http://example.com/i.raw --overlay {d}/o.img --socket \"$DIR\"/disk2.sock &
{exe} console --output pty --socket \"$DIR\"/console.sock &
{exe} vmm --kernel {d}/vmlinux --cmdline 'console=ttyS0 quiet' --memory 2G --cpus 2 --serial stdio \
--device \"$DIR\"/disk0.sock --device \"$DIR\"/disk1.sock --device \"$DIR\"/disk2.sock \
--device \"$DIR\"/console.sock
"
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout), want);

    // Flags replace the file's disk list.
    let o = run_in(
        &dir,
        &[],
        &[
            "--config",
            toml.to_str().unwrap(),
            "--disk",
            "mem:1M",
            "--print-commands",
        ],
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        !out.contains("block-file") && out.contains("block-mem --size 1048576"),
        "{out}"
    );

    // The control API socket: from the file (relative to it), or the flag.
    std::fs::write(&toml, "kernel = \"vmlinux\"\napi-socket = \"vm.api\"\n").unwrap();
    let o = run_in(
        &dir,
        &[],
        &["--config", toml.to_str().unwrap(), "--print-commands"],
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains(&format!(" --api-socket {d}/vm.api\n")),
        "{out} {}",
        stderr(&o)
    );
    let o = run_in(
        &dir,
        &[],
        &[
            "--config",
            toml.to_str().unwrap(),
            "--api-socket",
            "/run/x.api",
            "--print-commands",
        ],
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains(" --api-socket /run/x.api\n"), "{out}");

    std::fs::write(&toml, "kernel = \"vmlinux\"\nmemroy = \"1G\"\n").unwrap();
    let o = run_in(&dir, &[], &["--config", toml.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(
        e.starts_with(&format!(
            "hype run: {}: unknown field `memroy`",
            toml.display()
        )),
        "{e}"
    );
}

#[test]
fn terminal_wanted_twice_and_no_kernel() {
    let (dir, _, _) = files("terminal");
    let o = run_in(&dir, &[], &["--serial", "stdio", "--console", "stdio"]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(
        stderr(&o),
        "hype run: 2 problems, nothing started:\n  no kernel: pass --kernel PATH or set kernel \
         in the config file\n  --serial stdio and --console stdio both want the terminal; pick \
         one\n"
    );
}
