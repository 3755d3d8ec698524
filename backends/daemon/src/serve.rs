//! The accept loop: one frontend at a time, a fresh backend and daemon per connection.

use std::io;
use std::os::fd::AsRawFd;
use std::thread;

use log::{info, warn};
use vhost::vhost_user::Error as VhostUserError;
use vhost_user_backend::bitmap::BitmapReplace;
use vhost_user_backend::{Error as DaemonError, VhostUserBackend, VhostUserDaemon};
use vm_memory::mmap::NewBitmap;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend_defaults::ExitConsumers;
use crate::relay::Relay;
use crate::shutdown::poll_readable;
use crate::{Error, Shutdown, SocketListener};

/// How long serving waits before trying the relay's private socket again when a stranger
/// keeps its one slot busy.
const RELAY_BUSY_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// A backend [`serve`] can run: what `VhostUserDaemon` needs of it, in one name. Every
/// cloneable [`VhostUserBackend`] with the usual bitmap and vring types (`()` or an atomic
/// bitmap, `VringRwLock`/`VringMutex`) is one.
pub trait ServedBackend:
    VhostUserBackend<
        Bitmap: BitmapReplace + NewBitmap + Clone + Send + Sync,
        Vring: Clone + Send + Sync,
    > + Clone
    + 'static
{
}

impl<T> ServedBackend for T
where
    T: VhostUserBackend + Clone + 'static,
    T::Bitmap: BitmapReplace + NewBitmap + Clone + Send + Sync,
    T::Vring: Clone + Send + Sync,
{
}

/// What a backend may do at fixed points of each connection, besides building its backend.
///
/// Give it to [`serve_with`]. A closure `FnMut(&T, &VhostUserDaemon<T>) -> io::Result<()>`
/// is a hook with only [`daemon_created`](Self::daemon_created).
pub trait ConnectionHooks<T: VhostUserBackend> {
    /// Called for every connection once its daemon exists (and with it the worker threads'
    /// epoll handlers, [`VhostUserDaemon::get_epoll_handlers`]) and before the daemon accepts
    /// the frontend: the place to register a backend's extra fds (a TAP queue, a console's
    /// input) with the handlers. `backend` is the backend the daemon serves. An error stops
    /// [`serve_with`] with [`Error::ConnectionSetup`].
    fn daemon_created(&mut self, backend: &T, daemon: &VhostUserDaemon<T>) -> io::Result<()>;

    /// Called after a frontend disconnected (or was cut off by shutdown), once the daemon's
    /// worker threads are joined.
    fn disconnected(&mut self) {}
}

impl<T, F> ConnectionHooks<T> for F
where
    T: VhostUserBackend,
    F: FnMut(&T, &VhostUserDaemon<T>) -> io::Result<()>,
{
    fn daemon_created(&mut self, backend: &T, daemon: &VhostUserDaemon<T>) -> io::Result<()> {
        self(backend, daemon)
    }
}

/// Serves frontends on `listener` until `shutdown` triggers.
///
/// For every connection, `make_backend` is called with the guest memory object that the new
/// `VhostUserDaemon` will fill in on `SET_MEM_TABLE`; it returns the backend for that connection
/// (state that must survive reconnects, such as the storage, lives outside it). When the frontend
/// disconnects, the daemon and its vring worker threads are torn down and the loop waits for the
/// next frontend on the same, still-bound socket.
///
/// The backend **must** implement `exit_event()`: dropping the daemon signals it to stop the
/// worker threads and then joins them.
///
/// A connection that ends with a protocol error is logged and does not stop the loop; errors of
/// the listener itself, or of `make_backend`, do.
///
/// [`serve_with`] does the same with hooks into each connection.
pub fn serve<T, F, E>(
    listener: &mut SocketListener,
    name: &str,
    shutdown: &Shutdown,
    make_backend: F,
) -> Result<(), Error>
where
    T: ServedBackend,
    F: FnMut(&GuestMemoryAtomic<GuestMemoryMmap<T::Bitmap>>) -> Result<T, E>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let no_hooks = |_: &T, _: &VhostUserDaemon<T>| Ok(());
    serve_with(listener, name, shutdown, make_backend, no_hooks)
}

/// Like [`serve`], calling `hooks` at fixed points of each connection: after its daemon is
/// created and before it accepts the frontend ([`ConnectionHooks::daemon_created`], e.g. to
/// register extra fds with the worker threads' epoll handlers), and after the frontend left
/// ([`ConnectionHooks::disconnected`]).
///
/// ```no_run
/// # use std::sync::Arc;
/// # fn demo<B>(listener: &mut hype_daemon::SocketListener, shutdown: &hype_daemon::Shutdown,
/// #            make: impl FnMut(&vm_memory::GuestMemoryAtomic<vm_memory::GuestMemoryMmap>)
/// #                -> std::io::Result<Arc<B>>) -> Result<(), hype_daemon::Error>
/// # where B: vhost_user_backend::VhostUserBackend<Bitmap = ()> + 'static,
/// #       B::Vring: Clone + Send + Sync {
/// use vhost_user_backend::VhostUserDaemon;
/// hype_daemon::serve_with(listener, "my-backend", shutdown, make,
///     |_backend: &Arc<B>, daemon: &VhostUserDaemon<Arc<B>>| {
///         let handlers = daemon.get_epoll_handlers();
///         // handlers[i].register_listener(fd, EventSet::IN, data) for thread i ...
///         # let _ = handlers;
///         Ok(())
///     })
/// # }
/// ```
pub fn serve_with<T, F, E, H>(
    listener: &mut SocketListener,
    name: &str,
    shutdown: &Shutdown,
    mut make_backend: F,
    mut hooks: H,
) -> Result<(), Error>
where
    T: ServedBackend,
    F: FnMut(&GuestMemoryAtomic<GuestMemoryMmap<T::Bitmap>>) -> Result<T, E>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
    H: ConnectionHooks<T>,
{
    loop {
        let ready = poll_readable(&[listener.as_raw_fd(), shutdown.as_raw_fd()], -1)
            .map_err(Error::Poll)?;
        if ready[1] || shutdown.is_triggered() {
            info!("shutting down");
            return Ok(());
        }
        if !ready[0] {
            continue; // EINTR: re-check the latch
        }
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::<T::Bitmap>::new());
        let backend = make_backend(&mem).map_err(|e| Error::CreateBackend(e.into()))?;
        ExitConsumers::reset();
        let created = VhostUserDaemon::new(name.to_string(), backend.clone(), mem);
        // Declared before the daemon: dropped (closing the worker threads' exit events, which
        // vhost-user-backend 0.24 leaks) only after the daemon and its threads are gone.
        let _exit_consumers = ExitConsumers::collect();
        let mut daemon = created.map_err(|e| Error::CreateDaemon(e.to_string()))?;
        hooks
            .daemon_created(&backend, &daemon)
            .map_err(Error::ConnectionSetup)?;
        // The daemon holds the backend from here on.
        drop(backend);
        // The frontend talks to the daemon through the relay (see `relay`): it lets the
        // daemon take message orders the spec allows and the `vhost` crate refuses.
        let relay_end = match listener.inner().map(|inner| inner.connect()) {
            Some(Ok(end)) => Some(end),
            Some(Err(e)) if e.kind() == io::ErrorKind::PermissionDenied => {
                // block-http's sandbox refuses Unix sockets (glibc's nscd lookups).
                info!("the sandbox refuses Unix sockets: serving without the message relay");
                listener.drop_relay();
                None
            }
            Some(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                static BUSY: hype_base::log_limit::LogCounter =
                    hype_base::log_limit::LogCounter::new(5);
                if let Some(n) = BUSY.hit() {
                    warn!("relay (#{n}): {e}; trying again");
                }
                std::thread::sleep(RELAY_BUSY_PAUSE);
                continue;
            }
            Some(Err(e)) => return Err(Error::Relay(e)),
            None => None,
        };
        let relay = match (relay_end, listener.inner()) {
            (Some(end), Some(_)) => {
                let frontend = match listener.vhost_listener().accept() {
                    Ok(Some(f)) => f,
                    Ok(None) => continue, // the connection went away before it was accepted
                    Err(e) => return Err(Error::Accept(e.to_string())),
                };
                if let Some(inner) = listener.inner() {
                    daemon
                        .start(inner.listener())
                        .map_err(|e| Error::Accept(e.to_string()))?;
                }
                Some(Relay::spawn(frontend, end).map_err(Error::Relay)?)
            }
            _ => {
                daemon
                    .start(listener.vhost_listener())
                    .map_err(|e| Error::Accept(e.to_string()))?;
                None
            }
        };
        info!("frontend connected");
        let result = serve_connection(&mut daemon, shutdown);
        if let Some(r) = relay {
            r.finish();
        }
        let result = result?;
        // Dropping the daemon stops and joins its vring worker threads.
        drop(daemon);
        match result {
            Ok(()) => info!("frontend disconnected"),
            Err(e) => warn!("frontend connection ended: {e}"),
        }
        hooks.disconnected();
        drop(_exit_consumers);
    }
}

/// Waits until the frontend disconnects or `shutdown` triggers (then cuts the connection).
fn serve_connection<T>(
    daemon: &mut VhostUserDaemon<T>,
    shutdown: &Shutdown,
) -> Result<Result<(), DaemonError>, Error>
where
    T: ServedBackend,
{
    let done = EventFd::new(EFD_NONBLOCK).map_err(Error::ShutdownEvent)?;
    let done_watch = done.try_clone().map_err(Error::ShutdownEvent)?;
    let cut = daemon.shutdown_handle();
    let latch = shutdown.clone();
    let watcher = thread::Builder::new()
        .name("shutdown-watch".into())
        .spawn(move || loop {
            match poll_readable(&[latch.as_raw_fd(), done_watch.as_raw_fd()], -1) {
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
        .map_err(Error::SpawnThread)?;
    let result = daemon.wait();
    let _ = done.write(1);
    let _ = watcher.join();
    Ok(match result {
        Err(DaemonError::HandleRequest(VhostUserError::Disconnected))
        | Err(DaemonError::HandleRequest(VhostUserError::PartialMessage)) => Ok(()),
        other => other,
    })
}
