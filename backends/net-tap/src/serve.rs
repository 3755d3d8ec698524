//! The accept loop. Like `hype_daemon::serve`, plus one step between creating a connection's
//! daemon and serving it: the backend gets the daemon's epoll handlers to watch the tap.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::thread;

use hype_daemon::{Shutdown, SocketListener};
use log::{info, warn};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{Error as DaemonError, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::NetBackend;
use crate::Error;

/// Serves frontends on `listener`, one at a time, until `shutdown` triggers. `make_backend`
/// builds the backend of each connection.
pub fn serve(
    listener: &mut SocketListener,
    name: &str,
    shutdown: &Shutdown,
    mut make_backend: impl FnMut(GuestMemoryAtomic<GuestMemoryMmap>) -> NetBackend,
    mut on_disconnect: impl FnMut(),
) -> Result<(), Error> {
    // `SocketListener` keeps its vhost `Listener` to itself; accept through a duplicate of its
    // socket (no path attached, so dropping it removes nothing).
    let dup = dup_fd(listener).map_err(Error::Poll)?;
    let mut vhost_listener = Listener::from(UnixListener::from(dup));
    loop {
        let ready =
            poll_readable(&[listener.as_raw_fd(), shutdown.as_raw_fd()]).map_err(Error::Poll)?;
        if ready[1] || shutdown.is_triggered() {
            info!("shutting down");
            return Ok(());
        }
        if !ready[0] {
            continue; // EINTR: re-check the latch
        }
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = Arc::new(make_backend(mem.clone()));
        let mut daemon = VhostUserDaemon::new(name.to_string(), backend.clone(), mem)
            .map_err(|e| Error::Daemon(e.to_string()))?;
        backend.set_epoll_handlers(&daemon.get_epoll_handlers());
        drop(backend);
        daemon
            .start(&mut vhost_listener)
            .map_err(|e| Error::Daemon(e.to_string()))?;
        info!("frontend connected");
        let result = serve_connection(&mut daemon, shutdown)?;
        drop(daemon);
        match result {
            Ok(()) => info!("frontend disconnected"),
            Err(e) => warn!("frontend connection ended: {e}"),
        }
        on_disconnect();
    }
}

/// Waits until the frontend disconnects or `shutdown` triggers (then cuts the connection).
fn serve_connection(
    daemon: &mut VhostUserDaemon<Arc<NetBackend>>,
    shutdown: &Shutdown,
) -> Result<Result<(), DaemonError>, Error> {
    let done = EventFd::new(EFD_NONBLOCK).map_err(Error::Poll)?;
    let done_watch = done.try_clone().map_err(Error::Poll)?;
    let cut = daemon.shutdown_handle();
    let latch = shutdown.clone();
    let watcher = thread::Builder::new()
        .name("shutdown-watch".into())
        .spawn(move || loop {
            match poll_readable(&[latch.as_raw_fd(), done_watch.as_raw_fd()]) {
                Ok(r) if r[1] => return,
                Ok(r) if r[0] => {
                    if let Some(cut) = &cut {
                        cut.shutdown();
                    }
                    return;
                }
                Ok(_) => continue,
                Err(e) => {
                    warn!("shutdown watcher: poll failed: {e}");
                    return;
                }
            }
        })
        .map_err(Error::Poll)?;
    let result = daemon.wait();
    let _ = done.write(1);
    let _ = watcher.join();
    Ok(match result {
        Err(DaemonError::HandleRequest(VhostUserError::Disconnected))
        | Err(DaemonError::HandleRequest(VhostUserError::PartialMessage)) => Ok(()),
        other => other,
    })
}

/// Waits until one of `fds` is readable; EINTR reports nothing readable.
fn poll_readable(fds: &[RawFd]) -> std::io::Result<Vec<bool>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `pfds` is a valid, exclusively borrowed array of `pfds.len()` pollfd structs.
    let rc = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, -1) };
    if rc < 0 {
        let err = std::io::Error::last_os_error();
        if err.kind() == std::io::ErrorKind::Interrupted {
            return Ok(vec![false; fds.len()]);
        }
        return Err(err);
    }
    Ok(pfds
        .iter()
        .map(|p| p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0)
        .collect())
}

/// Duplicates the listening socket's descriptor.
fn dup_fd(listener: &SocketListener) -> std::io::Result<OwnedFd> {
    // SAFETY: the descriptor belongs to `listener`, borrowed for the duration of this call.
    let fd = unsafe { BorrowedFd::borrow_raw(listener.as_raw_fd()) };
    fd.try_clone_to_owned()
}
