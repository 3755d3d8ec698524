//! One error convention, checked from the outside: every binary, given paths that are not
//! there (files, directories, sockets), prints one error line that names each path once:
//! a message never repeats what its source already says.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::{assemble, work_dir};

/// Runs `hype ARGS` and returns its exit code and last non-empty stderr line.
fn last_line(args: &[&str]) -> (Option<i32>, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_hype"))
        .args(args)
        .stdin(Stdio::null())
        .env("HYPE_LOG", "off")
        .output()
        .expect("run hype");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    let line = err
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default()
        .to_string();
    (o.status.code(), line)
}

/// The words of `line` that are absolute paths, without surrounding punctuation.
fn paths(line: &str) -> Vec<&str> {
    line.split(|c: char| c.is_whitespace() || "()'\",".contains(c))
        .map(|w| w.trim_end_matches([':', ';', '.']))
        .filter(|w| w.starts_with('/') && w.len() > 1)
        .collect()
}

/// Asserts that the run failed and that no path, least of all `path`, is named twice.
fn once(args: &[&str], path: &Path) {
    once_after(args, path, "")
}

/// [`once`] for the line after `label`: `hype run` quotes the option it is talking about
/// (`--disk file:PATH: ...`) before the message, and that echo of the user's own words is
/// not counted (its tests pin that form).
fn once_after(args: &[&str], path: &Path, label: &str) {
    let (code, line) = last_line(args);
    let line = match line.split_once(label) {
        Some((_, rest)) if !label.is_empty() => rest.to_string(),
        _ => line,
    };
    assert!(
        matches!(code, Some(1) | Some(2)),
        "{args:?}: {code:?} {line}"
    );
    let p = path.to_str().unwrap();
    assert_eq!(
        line.matches(p).count(),
        1,
        "{args:?}: {p} not named once in: {line}"
    );
    let mut seen = Vec::new();
    for w in paths(&line) {
        assert!(!seen.contains(&w), "{args:?}: {w} twice in: {line}");
        seen.push(w);
    }
}

#[test]
fn error_lines_name_each_path_once() {
    let dir = work_dir("error_lines");
    let none = dir.join("nonexistent");
    let gone = none.join("x");
    let gone_s = gone.to_str().unwrap();
    let sock = none.join("s.sock");
    let sock_s = sock.to_str().unwrap();
    let k = assemble("long_hello", 0x20_0000);
    let k = k.to_str().unwrap();
    let serial = format!("file:{gone_s}");
    let run_disk = format!("file:{gone_s}");
    let cases: Vec<(Vec<&str>, &Path)> = vec![
        (vec!["vmm", "--kernel", gone_s], &gone),
        (vec!["vmm", "--kernel", k, "--initrd", gone_s], &gone),
        (vec!["vmm", "--kernel", k, "--serial", &serial], &gone),
        (
            vec!["block-file", "--path", gone_s, "--socket", "/tmp/x.sock"],
            &gone,
        ),
        (
            vec!["block-mem", "--image", gone_s, "--socket", "/tmp/x.sock"],
            &gone,
        ),
        (vec!["block-mem", "--size", "1M", "--socket", sock_s], &sock),
        (
            vec![
                "console",
                "--output",
                "file:/dev/null",
                "--log",
                gone_s,
                "--socket",
                sock_s,
            ],
            &gone,
        ),
        (vec!["console", "attach", sock_s], &sock),
        (vec!["run", "--config", gone_s], &gone),
        (vec!["run", "--kernel", gone_s], &gone),
    ];
    for (args, path) in &cases {
        once(args, path);
    }
    let label = format!("--disk {run_disk}: ");
    once_after(&["run", "--kernel", k, "--disk", &run_disk], &gone, &label);
}

#[test]
fn a_missing_device_socket_is_named_once() {
    // Attaching happens after KVM is opened: without a usable KVM the error is about KVM.
    if std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        eprintln!("skipped: /dev/kvm not usable");
        return;
    }
    let dir = work_dir("error_lines_dev");
    let sock = dir.join("missing.sock");
    let _ = std::fs::remove_file(&sock);
    let k = assemble("long_hello", 0x20_0000);
    let dev = format!("{},wait=100ms", sock.display());
    once(
        &[
            "vmm",
            "--kernel",
            k.to_str().unwrap(),
            "--memory",
            "64M",
            "--device",
            &dev,
        ],
        &sock,
    );
    let plain = dir.join("plain-file.sock");
    std::fs::write(&plain, b"x").unwrap();
    let dev = format!("{},wait=100ms", plain.display());
    once(
        &[
            "vmm",
            "--kernel",
            k.to_str().unwrap(),
            "--memory",
            "64M",
            "--device",
            &dev,
        ],
        &plain,
    );
}
