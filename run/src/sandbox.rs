//! The supervisor's sandbox: once the backends and the VMM run, `hype run` forbids itself (and
//! so every process it starts later, which inherits the filter: restarted backends) what no
//! hype process ever needs. It must go on forking and executing hype for restarts, and its
//! children need everything their own policies allow during their setup (KVM, TAP, network
//! sockets, files), so this is a deny-list, not an allow-list; each child then confines
//! itself with its own allow-list. no_new_privs is set, so executing a set-uid program gains
//! nothing. No Landlock: the children's files (images, kernel, TAP device, sockets) are theirs
//! to restrict, and a rule set here would be inherited by each of them.

use hype_sandbox::{Group, Policy, Rule};

/// What no hype process calls: debugging other processes and reading their memory or fds,
/// kernel modules and kexec, mounts and namespaces, BPF and perf, keyrings, the clock and the
/// host's identity, raw I/O ports, swap, reboot, executing by fd.
pub static NEVER_NEEDED: Group = Group {
    name: "never-needed",
    why: "other processes, the kernel, mounts, namespaces, BPF, keyrings, clocks, I/O ports",
    rules: &[
        Rule::always("ptrace", libc::SYS_ptrace),
        Rule::always("process_vm_readv", libc::SYS_process_vm_readv),
        Rule::always("process_vm_writev", libc::SYS_process_vm_writev),
        Rule::always("pidfd_getfd", libc::SYS_pidfd_getfd),
        Rule::always("kcmp", libc::SYS_kcmp),
        Rule::always("init_module", libc::SYS_init_module),
        Rule::always("finit_module", libc::SYS_finit_module),
        Rule::always("delete_module", libc::SYS_delete_module),
        Rule::always("kexec_load", libc::SYS_kexec_load),
        Rule::always("kexec_file_load", libc::SYS_kexec_file_load),
        Rule::always("mount", libc::SYS_mount),
        Rule::always("umount2", libc::SYS_umount2),
        Rule::always("pivot_root", libc::SYS_pivot_root),
        Rule::always("chroot", libc::SYS_chroot),
        Rule::always("fsopen", libc::SYS_fsopen),
        Rule::always("fsconfig", libc::SYS_fsconfig),
        Rule::always("fsmount", libc::SYS_fsmount),
        Rule::always("fspick", libc::SYS_fspick),
        Rule::always("open_tree", libc::SYS_open_tree),
        Rule::always("move_mount", libc::SYS_move_mount),
        Rule::always("mount_setattr", libc::SYS_mount_setattr),
        Rule::always("unshare", libc::SYS_unshare),
        Rule::always("setns", libc::SYS_setns),
        Rule::always("bpf", libc::SYS_bpf),
        Rule::always("perf_event_open", libc::SYS_perf_event_open),
        Rule::always("userfaultfd", libc::SYS_userfaultfd),
        Rule::always("keyctl", libc::SYS_keyctl),
        Rule::always("add_key", libc::SYS_add_key),
        Rule::always("request_key", libc::SYS_request_key),
        Rule::always("settimeofday", libc::SYS_settimeofday),
        Rule::always("clock_settime", libc::SYS_clock_settime),
        Rule::always("clock_adjtime", libc::SYS_clock_adjtime),
        Rule::always("adjtimex", libc::SYS_adjtimex),
        Rule::always("sethostname", libc::SYS_sethostname),
        Rule::always("setdomainname", libc::SYS_setdomainname),
        Rule::always("iopl", libc::SYS_iopl),
        Rule::always("ioperm", libc::SYS_ioperm),
        Rule::always("swapon", libc::SYS_swapon),
        Rule::always("swapoff", libc::SYS_swapoff),
        Rule::always("reboot", libc::SYS_reboot),
        Rule::always("acct", libc::SYS_acct),
        Rule::always("quotactl", libc::SYS_quotactl),
        Rule::always("syslog", libc::SYS_syslog),
        Rule::always("vhangup", libc::SYS_vhangup),
        Rule::always("personality", libc::SYS_personality),
        Rule::always("open_by_handle_at", libc::SYS_open_by_handle_at),
        Rule::always("fanotify_init", libc::SYS_fanotify_init),
        Rule::always("execveat", libc::SYS_execveat),
        Rule::always("uselib", libc::SYS_uselib),
    ],
};

/// The calls `hype run` (and everything it starts from now on) may not make.
pub static DENIED: Policy = Policy {
    name: "hype-run",
    groups: &[&NEVER_NEEDED],
    refusals: &[],
};

/// Confines the supervisor, unless `HYPE_SANDBOX=off` (which its children honour too).
pub fn confine() -> Result<(), hype_sandbox::Error> {
    let on = std::env::var("HYPE_SANDBOX").map_or(true, |v| v != "off");
    hype_sandbox::confine_denylist(&DENIED, on)?;
    if on {
        hype_sandbox::run_test_hook_as(DENIED.name);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denied_calls_are_not_in_any_backend_or_vmm_policy() {
        for p in hype_vmm::sandbox::policy::ALL {
            for r in DENIED.rules() {
                assert!(!p.mentions(r.nr), "{} allows {}", p.name, r.name);
            }
        }
    }
}
