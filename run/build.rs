//! Assembles the `hype demo` guest (`src/demo/guest.S`) into `$OUT_DIR/demo_guest.elf` with
//! binutils (`as`, `ld`; the `HYPE_AS` / `HYPE_LD` environment variables name others). The
//! VMM embeds the result with `include_bytes!`, so `hype demo` needs no download.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{exit, Command};

/// Where the demo guest is linked (and loaded): above the 1 MiB mark, like a vmlinux.
const DEMO_GUEST_TEXT: &str = "0x200000";
const DEMO_GUEST_SOURCE: &str = "src/demo/guest.S";

fn main() {
    println!("cargo:rerun-if-changed={DEMO_GUEST_SOURCE}");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=HYPE_AS");
    println!("cargo:rerun-if-env-changed=HYPE_LD");
    let Some(out_dir) = env::var_os("OUT_DIR").map(PathBuf::from) else {
        fail("OUT_DIR is not set (build.rs must run under cargo)");
    };
    let manifest = env::var_os("CARGO_MANIFEST_DIR").map_or_else(PathBuf::new, PathBuf::from);
    let source = manifest.join(DEMO_GUEST_SOURCE);
    let object = out_dir.join("demo_guest.o");
    let elf = out_dir.join("demo_guest.elf");

    let assembler = env::var("HYPE_AS").unwrap_or_else(|_| "as".into());
    let linker = env::var("HYPE_LD").unwrap_or_else(|_| "ld".into());
    run(
        &assembler,
        Command::new(&assembler)
            .args(["--64", "-o"])
            .arg(&object)
            .arg(&source),
    );
    run(
        &linker,
        Command::new(&linker)
            .args(["-static", "-nostdlib", "-z", "max-page-size=4096"])
            .arg(format!("-Ttext={DEMO_GUEST_TEXT}"))
            .arg("-o")
            .arg(&elf)
            .arg(&object),
    );
    check_elf(&elf);
}

/// Runs a binutils tool; a missing tool or a failure stops the build with a clear message.
fn run(tool: &str, cmd: &mut Command) {
    match cmd.status() {
        Ok(s) if s.success() => {}
        Ok(s) => fail(&format!(
            "`{tool}` failed ({s}) building the demo guest from {DEMO_GUEST_SOURCE}"
        )),
        Err(e) => fail(&format!(
            "cannot run `{tool}` ({e}): the `hype demo` guest is assembled with GNU binutils \
             (as, ld); install binutils (e.g. `apt-get install binutils`) or point HYPE_AS/HYPE_LD \
             environment variables at them"
        )),
    }
}

/// The linked guest must be a 64-bit x86 ELF.
fn check_elf(elf: &Path) {
    let bytes = match std::fs::read(elf) {
        Ok(b) => b,
        Err(e) => fail(&format!(
            "cannot read the demo guest {}: {e}",
            elf.display()
        )),
    };
    let x86_64 = 62u16.to_le_bytes();
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 || bytes[18..20] != x86_64 {
        fail(&format!(
            "{} is not a 64-bit x86 ELF; is `as` a GNU assembler for x86_64?",
            elf.display()
        ));
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("error: hype-vmm build: {msg}");
    exit(1);
}
