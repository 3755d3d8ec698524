//! Dropping root after the privileged setup: `--user USER [--group GROUP]`.
//!
//! A hype process started as root with `--user` opens what needs root (`/dev/kvm`, a TAP with
//! CAP_NET_ADMIN, root-owned images, its bound socket), then calls [`drop_to`] once, while it
//! still has a single thread and before any seccomp filter or Landlock rule is applied:
//!
//! 1. no_new_privs, the ambient capabilities cleared and the bounding set emptied;
//! 2. `setgroups(0)` (no supplementary group), `setresgid(g, g, g)`, `setresuid(u, u, u)`,
//!    as raw system calls: glibc's wrappers would signal every thread to change its
//!    credentials too (SIGSETXID), which the seccomp filters of confined threads forbid. With
//!    one thread the raw calls change the whole process, so no policy allows any credential
//!    call (a process that has more than one thread refuses to drop: [`Error::Threads`]);
//! 3. a check that it worked: real, effective and saved ids are the target's, no supplementary
//!    groups, no effective, permitted or ambient capability, and `setresuid(0, 0, 0)` fails.
//!
//! Any failure is an error: a process asked to drop root never goes on as root.

use std::ffi::CString;

/// The user a process runs as after [`drop_to`]: `--user` resolved, with `--group` or the
/// user's primary group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credentials {
    /// User id (never 0).
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

/// A user given as `--user`: its id and primary group, from the user database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct User {
    /// User id.
    pub uid: u32,
    /// The primary group of its passwd entry.
    pub gid: u32,
}

/// `--user` and `--group`. Flattened into every hype process's options (through
/// [`SandboxArgs`](crate::SandboxArgs)).
#[derive(clap::Args, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PrivilegeArgs {
    /// Run as this user (name or uid, not root) once the privileged setup is done (devices,
    /// TAPs, files opened, socket bound): supplementary groups cleared, no capabilities left.
    /// The process must start as root.
    #[arg(long, value_name = "USER", value_parser = parse_user)]
    pub user: Option<User>,
    /// With --user: run with this group (name or gid) instead of the user's primary group.
    #[arg(long, value_name = "GROUP", value_parser = parse_group, requires = "user")]
    pub group: Option<u32>,
}

impl PrivilegeArgs {
    /// The credentials to drop to, if `--user` was given.
    pub fn credentials(&self) -> Option<Credentials> {
        self.user.map(|u| Credentials {
            uid: u.uid,
            gid: self.group.unwrap_or(u.gid),
        })
    }
}

/// Why dropping root failed.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    /// More than one thread exists: the raw calls would change only this one.
    #[error("cannot drop privileges: the process already has {0} threads (a hype bug)")]
    Threads(usize),
    /// `/proc/self/task` or `/proc/self/status` cannot be read.
    #[error("cannot read {0}")]
    Proc(&'static str, #[source] std::io::Error),
    /// A prctl that removes privileges failed.
    #[error("cannot drop privileges: prctl {0} failed")]
    Prctl(&'static str, #[source] std::io::Error),
    /// setgroups, setresgid or setresuid failed (the process must start as root).
    #[error("cannot drop privileges: {0} failed (--user needs a process started as root)")]
    Set(&'static str, #[source] std::io::Error),
    /// After the drop, the process still has something it should not.
    #[error("privileges not dropped: {0}")]
    Check(String),
}

/// Looks up a user by name, or by number when `s` is all digits. Root is refused.
pub fn parse_user(s: &str) -> Result<User, String> {
    let user = lookup_user(s).ok_or_else(|| format!("unknown user '{s}'"))?;
    if user.uid == 0 {
        return Err(format!(
            "'{s}' is root: --user must name an unprivileged user"
        ));
    }
    Ok(user)
}

/// Looks up a group by name, or by number when `s` is all digits.
pub fn parse_group(s: &str) -> Result<u32, String> {
    lookup_group(s).ok_or_else(|| format!("unknown group '{s}'"))
}

/// Size of the buffer getpwnam_r/getgrnam_r fill: plenty for any sane entry; bigger entries
/// are retried with a larger buffer up to 1 MiB.
const FIRST_BUF: usize = 4096;
const MAX_BUF: usize = 1 << 20;

fn numeric(s: &str) -> Option<u32> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        s.parse().ok()
    } else {
        None
    }
}

fn lookup_user(s: &str) -> Option<User> {
    let name = CString::new(s).ok()?;
    let id = numeric(s);
    let mut len = FIRST_BUF;
    while len <= MAX_BUF {
        let mut buf = vec![0u8; len];
        // SAFETY: an all-zero passwd is a valid value (null pointers, zero ids).
        let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
        let mut out: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is to memory we own, valid for the call; `buf.len()` bounds
        // what is written to the buffer; `name` is NUL-terminated.
        let rc = unsafe {
            match id {
                Some(uid) => {
                    libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr().cast(), buf.len(), &mut out)
                }
                None => libc::getpwnam_r(
                    name.as_ptr(),
                    &mut pw,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    &mut out,
                ),
            }
        };
        if rc == libc::ERANGE {
            len *= 4;
            continue;
        }
        if rc != 0 || out.is_null() {
            return None;
        }
        return Some(User {
            uid: pw.pw_uid,
            gid: pw.pw_gid,
        });
    }
    None
}

fn lookup_group(s: &str) -> Option<u32> {
    let name = CString::new(s).ok()?;
    let id = numeric(s);
    let mut len = FIRST_BUF;
    while len <= MAX_BUF {
        let mut buf = vec![0u8; len];
        // SAFETY: an all-zero group is a valid value (null pointers, zero id).
        let mut gr: libc::group = unsafe { std::mem::zeroed() };
        let mut out: *mut libc::group = std::ptr::null_mut();
        // SAFETY: as in lookup_user.
        let rc = unsafe {
            match id {
                Some(gid) => {
                    libc::getgrgid_r(gid, &mut gr, buf.as_mut_ptr().cast(), buf.len(), &mut out)
                }
                None => libc::getgrnam_r(
                    name.as_ptr(),
                    &mut gr,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    &mut out,
                ),
            }
        };
        if rc == libc::ERANGE {
            len *= 4;
            continue;
        }
        if rc != 0 || out.is_null() {
            return None;
        }
        return Some(gr.gr_gid);
    }
    None
}

/// How many threads this process has.
fn thread_count() -> Result<usize, PrivilegeError> {
    let dir = std::fs::read_dir("/proc/self/task")
        .map_err(|e| PrivilegeError::Proc("/proc/self/task", e))?;
    Ok(dir.count())
}

fn prctl(what: &'static str, op: libc::c_int, arg: libc::c_ulong) -> Result<(), PrivilegeError> {
    // SAFETY: the prctl operations used here take integer arguments only.
    let rc = unsafe { libc::prctl(op, arg, 0 as libc::c_ulong, 0 as libc::c_ulong, 0) };
    if rc < 0 {
        return Err(PrivilegeError::Prctl(what, std::io::Error::last_os_error()));
    }
    Ok(())
}

/// One raw credential system call with three integer arguments.
fn raw3(nr: libc::c_long, a: u64, b: u64, c: u64) -> std::io::Result<()> {
    // SAFETY: setresuid/setresgid/setgroups(0, NULL)/getres[ug]id with pointers the caller
    // owns; the kernel reads or writes nothing else.
    let rc = unsafe { libc::syscall(nr, a, b, c) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Drops to `to` for good (see the [module documentation](self)). Call while the process has
/// one thread, before confining it.
pub fn drop_to(to: Credentials) -> Result<(), PrivilegeError> {
    let threads = thread_count()?;
    if threads != 1 {
        return Err(PrivilegeError::Threads(threads));
    }
    prctl("PR_SET_NO_NEW_PRIVS", libc::PR_SET_NO_NEW_PRIVS, 1)?;
    // SAFETY: integer arguments only.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if rc < 0 {
        return Err(PrivilegeError::Prctl(
            "PR_CAP_AMBIENT_CLEAR_ALL",
            std::io::Error::last_os_error(),
        ));
    }
    // Empty the bounding set (needs CAP_SETPCAP, still held): EINVAL past the last capability.
    for cap in 0..64 {
        // SAFETY: integer arguments only.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINVAL) {
                break;
            }
            return Err(PrivilegeError::Prctl("PR_CAPBSET_DROP", e));
        }
    }
    let (u, g) = (u64::from(to.uid), u64::from(to.gid));
    raw3(libc::SYS_setgroups, 0, 0, 0).map_err(|e| PrivilegeError::Set("setgroups(0)", e))?;
    raw3(libc::SYS_setresgid, g, g, g).map_err(|e| PrivilegeError::Set("setresgid", e))?;
    raw3(libc::SYS_setresuid, u, u, u).map_err(|e| PrivilegeError::Set("setresuid", e))?;
    check(to)?;
    log::info!(
        "privileges dropped: uid {} gid {}, no supplementary groups, no capabilities",
        to.uid,
        to.gid
    );
    Ok(())
}

/// Verifies the drop from `/proc/self/status` and by trying to regain root.
fn check(to: Credentials) -> Result<(), PrivilegeError> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| PrivilegeError::Proc("/proc/self/status", e))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or("?")
            .to_string()
    };
    let ids = |v: u32| format!("{v}\t{v}\t{v}\t{v}");
    let words = |s: String| s.split_whitespace().collect::<Vec<_>>().join("\t");
    if words(field("Uid:")) != ids(to.uid) {
        return Err(PrivilegeError::Check(format!("Uid: {}", field("Uid:"))));
    }
    if words(field("Gid:")) != ids(to.gid) {
        return Err(PrivilegeError::Check(format!("Gid: {}", field("Gid:"))));
    }
    if !field("Groups:").is_empty() {
        return Err(PrivilegeError::Check(format!(
            "supplementary groups {}",
            field("Groups:")
        )));
    }
    for cap in ["CapEff:", "CapPrm:", "CapAmb:", "CapBnd:"] {
        let v = field(cap);
        if !v.trim_start_matches('0').is_empty() {
            return Err(PrivilegeError::Check(format!("{cap} {v}")));
        }
    }
    if field("NoNewPrivs:") != "1" {
        return Err(PrivilegeError::Check("no_new_privs not set".into()));
    }
    if raw3(libc::SYS_setresuid, 0, 0, 0).is_ok() {
        return Err(PrivilegeError::Check("setresuid(0, 0, 0) succeeded".into()));
    }
    Ok(())
}

/// Gives `path` (a socket this process bound as root) to `to`, so that the dropped process
/// and its peers running as `to` can still connect to it.
pub fn give_to(path: &std::path::Path, to: Credentials) -> std::io::Result<()> {
    std::os::unix::fs::lchown(path, Some(to.uid), Some(to.gid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_and_groups_resolve() {
        let nobody = parse_user("nobody").unwrap();
        assert_eq!(parse_user(&nobody.uid.to_string()).unwrap(), nobody);
        assert!(parse_user("root").unwrap_err().contains("root"));
        assert!(parse_user("0").is_err());
        assert_eq!(
            parse_user("no-such-user-hype").unwrap_err(),
            "unknown user 'no-such-user-hype'"
        );
        assert_eq!(parse_group("0").unwrap(), 0);
        assert_eq!(parse_group("root").unwrap(), 0);
        assert!(parse_group("no-such-group-hype").is_err());
        assert!(parse_user("a\0b").is_err());
    }

    #[test]
    fn credentials_from_user_and_group() {
        let a = PrivilegeArgs {
            user: Some(User { uid: 7, gid: 8 }),
            group: None,
        };
        assert_eq!(a.credentials(), Some(Credentials { uid: 7, gid: 8 }));
        let b = PrivilegeArgs {
            group: Some(9),
            ..a
        };
        assert_eq!(b.credentials(), Some(Credentials { uid: 7, gid: 9 }));
        assert_eq!(PrivilegeArgs::default().credentials(), None);
    }

    #[test]
    fn refuses_with_threads() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || rx.recv());
        let err = drop_to(Credentials {
            uid: 65534,
            gid: 65534,
        })
        .unwrap_err();
        assert!(matches!(err, PrivilegeError::Threads(n) if n >= 2), "{err}");
        tx.send(()).unwrap();
        t.join().unwrap().unwrap();
    }
}
