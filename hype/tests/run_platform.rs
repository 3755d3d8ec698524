//! `hype run --platform` (and `platform = ...` in the VM description) reaches `hype vmm`, and a
//! bad value is refused before anything starts.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

mod run_support;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use run_support::{fresh_dir, hype_bin};

fn run(dir: &Path, args: &[&str]) -> Output {
    Command::new(hype_bin())
        .arg("run")
        .args(args)
        .env("XDG_RUNTIME_DIR", dir)
        .stdin(Stdio::null())
        .output()
        .expect("run hype")
}

/// Whether a line of `out` has `flag` followed by `value` as separate words (the last words of
/// the line included).
fn has_option(out: &str, flag: &str, value: &str) -> bool {
    out.lines().any(|l| {
        let words: Vec<&str> = l.split_whitespace().collect();
        words.windows(2).any(|w| w == [flag, value])
    })
}

#[test]
fn platform_from_file_and_flag_reaches_the_vmm() {
    let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("run_platform");
    let dir = fresh_dir(&base, "p");
    let kernel = dir.join("vmlinux");
    std::fs::write(&kernel, b"\x7fELF and nothing else").unwrap();
    let toml = dir.join("vm.toml");
    std::fs::write(&toml, "kernel = \"vmlinux\"\nplatform = \"mptable\"\n").unwrap();
    let t = toml.to_str().unwrap();

    let o = run(&dir, &["--config", t, "--print-commands"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(has_option(&out, "--platform", "mptable"), "{out}");

    let o = run(
        &dir,
        &["--config", t, "--platform", "acpi", "--print-commands"],
    );
    let out = String::from_utf8_lossy(&o.stdout);
    // The flag wins over the file; acpi is the VMM's default, so nothing is rendered.
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(!out.contains("--platform"), "{out}");

    let k = kernel.to_str().unwrap();
    let o = run(&dir, &["--kernel", k, "--print-commands"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        !out.contains("--platform"),
        "the VMM's default applies: {out}"
    );

    let o = run(&dir, &["--kernel", k, "--platform", "pci"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(
        err,
        "hype run: --platform: 'pci' is not a platform (acpi, mptable)\n"
    );
}
