//! Detecting hosts whose KVM needs the fix-ups.
//!
//! The rule: `/dev/kvm` is provided by PVM when the `kvm_pvm` module is loaded, which shows as
//! the directory `/sys/module/kvm_pvm`. Only one KVM vendor module can be loaded at a time
//! (`kvm_intel`, `kvm_amd` and `kvm_pvm` all register the same vendor hooks), so its presence
//! means every VM on this host runs under PVM. Hosts with VT-x or SVM load `kvm_intel` or
//! `kvm_amd` instead and get no fix-ups in `auto` mode.

use std::path::Path;

/// Where sysfs lists loaded modules.
pub const SYS_MODULE_DIR: &str = "/sys/module";
/// The PVM KVM vendor module.
pub const PVM_MODULE: &str = "kvm_pvm";

/// Whether this host's KVM is PVM, whose instruction emulator needs the fix-ups.
pub fn host_needs_fixups() -> bool {
    pvm_module_loaded(Path::new(SYS_MODULE_DIR))
}

/// Whether `kvm_pvm` is listed under `sys_module_dir` (normally `/sys/module`).
pub fn pvm_module_loaded(sys_module_dir: &Path) -> bool {
    sys_module_dir.join(PVM_MODULE).is_dir()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_the_pvm_module_directory() {
        let dir = std::env::temp_dir().join(format!("hype-fixups-host-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("kvm")).unwrap();
        assert!(!pvm_module_loaded(&dir));
        // A file of that name is not a loaded module.
        std::fs::write(dir.join(PVM_MODULE), b"").unwrap();
        assert!(!pvm_module_loaded(&dir));
        std::fs::remove_file(dir.join(PVM_MODULE)).unwrap();
        std::fs::create_dir_all(dir.join(PVM_MODULE).join("parameters")).unwrap();
        assert!(pvm_module_loaded(&dir));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(!pvm_module_loaded(&dir));
    }

    #[test]
    fn agrees_with_this_host() {
        assert_eq!(
            host_needs_fixups(),
            Path::new("/sys/module/kvm_pvm").is_dir()
        );
    }
}
