//! Serving frontends: hype-daemon's accept loop, with the hooks net-tap needs on each
//! connection (the backend watches the tap queues on its daemon's worker threads).

use std::convert::Infallible;
use std::io;
use std::sync::Arc;

use hype_daemon::{ConnectionHooks, Shutdown, SocketListener};
use vhost_user_backend::VhostUserDaemon;

use crate::backend::{GuestMemory, NetBackend};
use crate::stats::Stats;

/// Hands each connection's epoll handlers to its backend; logs the counters after each
/// frontend leaves.
struct TapHooks {
    stats: Arc<Stats>,
}

impl ConnectionHooks<Arc<NetBackend>> for TapHooks {
    fn daemon_created(
        &mut self,
        backend: &Arc<NetBackend>,
        daemon: &VhostUserDaemon<Arc<NetBackend>>,
    ) -> io::Result<()> {
        backend.set_epoll_handlers(&daemon.get_epoll_handlers());
        Ok(())
    }

    fn disconnected(&mut self) {
        log::info!("stats: {}", self.stats.snapshot());
    }
}

/// Serves frontends on `listener`, one at a time, until `shutdown` triggers. `make_backend`
/// builds the backend of each connection; `stats` are the counters its backends share.
pub(crate) fn serve(
    listener: &mut SocketListener,
    name: &str,
    shutdown: &Shutdown,
    stats: Arc<Stats>,
    mut make_backend: impl FnMut(&GuestMemory) -> NetBackend,
) -> Result<(), hype_daemon::Error> {
    hype_daemon::serve_with(
        listener,
        name,
        shutdown,
        |mem: &GuestMemory| Ok::<_, Infallible>(Arc::new(make_backend(mem))),
        TapHooks { stats },
    )
}
