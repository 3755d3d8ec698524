//! The sandbox of a backend process: the system calls the accept loop and vhost-user serving
//! make ([`VHOST_USER`]), and the one step each backend takes once its socket is bound and its
//! files are open ([`confine`]).

use std::path::{Path, PathBuf};

pub use hype_sandbox::{
    close_inherited_fds, Cond, FsAccess, Group, Policy, Refusal, Rule, Sandbox, SandboxArgs,
    SandboxMode, CLONE3_REFUSED, OPEN_REFUSED, RUNTIME,
};

use crate::{Error, ListenArgs, SocketListener};

const F_GETFD: u64 = libc::F_GETFD as u64;
const F_SETFD: u64 = libc::F_SETFD as u64;
const F_GETFL: u64 = libc::F_GETFL as u64;
const F_SETFL: u64 = libc::F_SETFL as u64;
const F_DUPFD_CLOEXEC: u64 = libc::F_DUPFD_CLOEXEC as u64;
const F_GET_SEALS: u64 = libc::F_GET_SEALS as u64;

/// What hype-daemon's accept loop, its shutdown latch and vhost-user-backend's daemon and
/// worker threads call while serving: accepting a (re)connecting frontend, vhost-user messages
/// with fds, mapping guest memory, epoll over kicks, eventfds, removing the socket on exit.
pub static VHOST_USER: Group = Group {
    name: "vhost-user",
    why: "accept loop, vhost-user messages with fds, guest memory maps (seals checked), \
          epoll, eventfds",
    rules: &[
        Rule::always("accept4", libc::SYS_accept4),
        // The message relay connects to its private abstract socket once per frontend.
        Rule::when(
            "socket",
            libc::SYS_socket,
            &[&[Cond::eq(0, libc::AF_UNIX as u64)]],
        ),
        Rule::always("connect", libc::SYS_connect),
        Rule::always("recvmsg", libc::SYS_recvmsg),
        Rule::always("sendmsg", libc::SYS_sendmsg),
        Rule::always("shutdown", libc::SYS_shutdown),
        Rule::always("epoll_create1", libc::SYS_epoll_create1),
        Rule::always("epoll_ctl", libc::SYS_epoll_ctl),
        Rule::always("epoll_wait", libc::SYS_epoll_wait),
        Rule::always("epoll_pwait", libc::SYS_epoll_pwait),
        Rule::always("eventfd2", libc::SYS_eventfd2),
        Rule::always("poll", libc::SYS_poll),
        Rule::always("ppoll", libc::SYS_ppoll),
        Rule::always("dup", libc::SYS_dup),
        Rule::when(
            "fcntl",
            libc::SYS_fcntl,
            &[
                &[Cond::eq(1, F_GETFD)],
                &[Cond::eq(1, F_SETFD)],
                &[Cond::eq(1, F_GETFL)],
                &[Cond::eq(1, F_SETFL)],
                &[Cond::eq(1, F_DUPFD_CLOEXEC)],
                // SET_MEM_TABLE: a region's memfd must be sealed against shrinking.
                &[Cond::eq(1, F_GET_SEALS)],
            ],
        ),
        Rule::always("fstat", libc::SYS_fstat),
        Rule::always("newfstatat", libc::SYS_newfstatat),
        Rule::always("statx", libc::SYS_statx),
        // The socket file is removed on exit (Landlock limits this to its directory).
        Rule::always("unlink", libc::SYS_unlink),
        Rule::always("unlinkat", libc::SYS_unlinkat),
    ],
};

/// The directory of a socket path (`.` for a bare file name).
fn socket_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Adds the Landlock rule a listener needs for the rest of its life: removing its own socket
/// file on exit (its directory's entries). Nothing for a socket systemd passed.
pub fn allow_listener(sandbox: &mut Sandbox, listener: &SocketListener) {
    if let Some(path) = listener.path() {
        allow_socket_removal(sandbox, path);
    }
}

/// Adds the Landlock rule for removing the socket file `path` on exit (its directory's
/// entries), for sockets other than the vhost-user one.
pub fn allow_socket_removal(sandbox: &mut Sandbox, path: &Path) {
    sandbox
        .files()
        .allow(socket_dir(path), FsAccess::RemoveEntries);
}

/// For a process restricted before it binds (see [`Sandbox::restrict_files`]): creating and
/// removing sockets in the directory of `--socket`.
pub fn allow_socket_bind(sandbox: &mut Sandbox, args: &ListenArgs) {
    if let Some(path) = &args.socket {
        sandbox.files().allow(socket_dir(path), FsAccess::Sockets);
    }
}

/// With `--print-sandbox`, prints the sandbox the process will apply, with the rule its
/// listening socket (`listen`) will add, and returns true: the caller exits without serving.
pub fn print_if_asked(sandbox: &Sandbox, listen: &ListenArgs) -> bool {
    let mut planned = sandbox.clone();
    if let Some(path) = &listen.socket {
        let rules = planned.files();
        if !rules.mentions(&socket_dir(path)) {
            rules.allow(socket_dir(path), FsAccess::RemoveEntries);
        }
    }
    planned.print_if_asked()
}

/// Applies the Landlock rules now (see [`Sandbox::restrict_files`]), for processes that start
/// threads before they are fully set up.
pub fn restrict_files(sandbox: &mut Sandbox) -> Result<(), Error> {
    sandbox.restrict_files().map_err(Error::Sandbox)
}

/// With `--user`: gives a socket other than the vhost-user one (bound as root) to that user;
/// see [`Sandbox::give_socket`].
pub fn give_socket(sandbox: &Sandbox, path: &Path) -> Result<(), Error> {
    sandbox.give_socket(path).map_err(Error::Sandbox)
}

/// Confines the process once `listener` is bound and every file is open: adds the listener's
/// rule, with `--user` gives the socket to that user and drops root, and calls
/// [`Sandbox::confine`].
pub fn confine(sandbox: &mut Sandbox, listener: &SocketListener) -> Result<(), Error> {
    allow_listener(sandbox, listener);
    if let Some(path) = listener.path() {
        sandbox.give_socket(path).map_err(Error::Sandbox)?;
    }
    sandbox.confine().map_err(Error::Sandbox)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_dir_of_bare_and_full_paths() {
        assert_eq!(socket_dir(Path::new("s.sock")), PathBuf::from("."));
        assert_eq!(
            socket_dir(Path::new("/run/x/s.sock")),
            PathBuf::from("/run/x")
        );
        assert_eq!(socket_dir(Path::new("d/s.sock")), PathBuf::from("d"));
    }
}
