//! What the control API asks of a device's worker: fetching the config from the backend again
//! (a disk that grew: the guest gets a config interrupt) and moving the device to another
//! backend while the guest runs (storage migration, a backend upgrade).
//!
//! A switch connects to the new backend first and checks it the way a reconnect does (same
//! kind of device, every feature the guest uses); only then are the old backend's rings
//! stopped (GET_VRING_BASE: a backend finishes the requests it started before it answers) and
//! the rings replayed on the new one from the used index in guest memory, so a request the old
//! backend had not completed is done by the new one and none is lost. A refused switch leaves
//! the device on the old backend.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::super::detect;
use super::super::frontend::{BackendLink, FrontendError};
use super::{Connector, LinkState, Worker};
use hype_base::error_chain;

/// What a config refresh found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigRefresh {
    /// Whether the config the guest sees changed (it then got a config interrupt and a new
    /// config generation).
    pub changed: bool,
    /// The config now, described (for a disk: its capacity).
    pub config: String,
}

/// Why the worker could not do what the control API asked.
#[derive(Debug, thiserror::Error)]
pub enum DeviceCommandError {
    /// The backend is lost (hype reconnects) or hype gave up on it.
    #[error("the backend is not connected")]
    NotConnected,
    /// GET_CONFIG failed.
    #[error("reading the config from the backend failed")]
    GetConfig(#[source] FrontendError),
    /// The device's connector cannot point elsewhere.
    #[error("this device's backend cannot be switched")]
    CannotSwitch,
    /// Nobody listens on the new socket.
    #[error("no backend listens on {}", .0.display())]
    NoBackend(PathBuf),
    /// The new socket is unusable or its backend failed the handshake.
    #[error("cannot use the backend at {}", .path.display())]
    Connect {
        /// The new socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: FrontendError,
    },
    /// The new backend is not a stand-in for the old one.
    #[error("the backend at {} {why}; the device stays on {}", .path.display(), .old.display())]
    Incompatible {
        /// The new socket.
        path: PathBuf,
        /// The socket the device stays on.
        old: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// The device thread is busy (a hung backend) and did not answer in time.
    #[error("the device thread did not answer within {0:?}")]
    NoAnswer(Duration),
    /// The device thread has ended.
    #[error("the device thread has ended")]
    Gone,
}

impl<C: Connector> Worker<C> {
    /// GET_CONFIG from the backend; what changed is shown to the guest (generation bump and
    /// config interrupt), the guest's own config writes kept.
    pub(super) fn refresh_config(&mut self) -> Result<ConfigRefresh, DeviceCommandError> {
        let kind = self.fixed.kind;
        let LinkState::Connected { link, .. } = &mut self.link else {
            return Err(DeviceCommandError::NotConnected);
        };
        let config = match link.read_config(0, kind.config_size()) {
            Ok(c) => c,
            Err(e) => {
                if e.is_disconnect() {
                    self.lost("GET_CONFIG failed");
                }
                return Err(DeviceCommandError::GetConfig(e));
            }
        };
        let before = self.shared.transport().config().to_vec();
        self.info.config = config.clone();
        self.apply_backend_config(&config);
        let changed = self.shared.transport().config() != before.as_slice();
        let described = kind.describe_config(&config);
        if changed {
            log::info!(
                "{}: config re-read: {described}; the guest was told",
                self.shared.name
            );
        } else {
            log::info!(
                "{}: config re-read: {described} (unchanged)",
                self.shared.name
            );
        }
        Ok(ConfigRefresh {
            changed,
            config: described,
        })
    }

    /// Moves the device to the backend at `socket`.
    pub(super) fn switch_backend(&mut self, socket: PathBuf) -> Result<(), DeviceCommandError> {
        let old = self
            .connector
            .retarget(&socket)
            .ok_or(DeviceCommandError::CannotSwitch)?;
        let res = self.switch_to(&socket, &old);
        if res.is_err() {
            self.connector.retarget(&old);
        }
        res
    }

    fn switch_to(&mut self, socket: &Path, old: &Path) -> Result<(), DeviceCommandError> {
        let name = self.shared.name.clone();
        if !matches!(self.link, LinkState::Connected { .. }) {
            // Lost or given up: the reconnect machinery goes on with the new socket.
            self.fixed.socket = socket.to_owned();
            if matches!(self.link, LinkState::GaveUp { .. }) {
                self.link = LinkState::lost_now();
                self.publish();
            }
            log::info!(
                "{name}: backend switched to {} (reconnecting there)",
                socket.display()
            );
            return Ok(());
        }
        let kind = self.fixed.kind;
        let link = match self.connector.connect(kind) {
            Ok(Some(l)) => l,
            Ok(None) => return Err(DeviceCommandError::NoBackend(socket.to_owned())),
            Err(source) => {
                return Err(DeviceCommandError::Connect {
                    path: socket.to_owned(),
                    source,
                })
            }
        };
        let new = link.info().clone();
        let incompatible = |why: String| DeviceCommandError::Incompatible {
            path: socket.to_owned(),
            old: old.to_owned(),
            why,
        };
        let was = detect::type_from_features(self.info.features).ok();
        let now = detect::type_from_features(new.features).ok();
        if now != was {
            let what = now.map_or("an unrecognisable".to_string(), |k| format!("a {k}"));
            return Err(incompatible(format!(
                "is {what} device, but this is a {kind} device"
            )));
        }
        if let Some(s) = &self.setup {
            let missing = s.acked_features & !new.features;
            if missing != 0 {
                return Err(incompatible(format!(
                    "lacks features {missing:#x} the guest uses"
                )));
            }
        }
        // The old backend finishes what it started and stops.
        if let (
            LinkState::Connected {
                link: old_link,
                running: true,
            },
            Some(setup),
        ) = (&mut self.link, &self.setup)
        {
            let queues: Vec<u16> = setup.rings.iter().map(|r| r.index).collect();
            match old_link.stop(&queues) {
                Ok(bases) => log::debug!("{name}: old backend stopped at {bases:?}"),
                Err(e) => log::warn!(
                    "{name}: stopping the old backend's rings: {}; the new one replays from \
                     the used index",
                    error_chain(&e)
                ),
            }
        }
        let config_differs = new.config != self.info.config;
        self.info = new;
        self.shared.set_cutter(link.cutter());
        let mut link = link;
        for (offset, data) in &self.guest_config {
            let stats = &self.shared.stats;
            match link.set_config(*offset, data) {
                Ok(()) => stats.config_writes.fetch_add(1, Ordering::Relaxed),
                Err(e) => {
                    log::warn!("{name}: replaying a config write: {}", error_chain(&e));
                    stats.config_writes_failed.fetch_add(1, Ordering::Relaxed)
                }
            };
        }
        // The old link is dropped here: its backend sees the connection close.
        self.link = LinkState::Connected {
            link,
            running: false,
        };
        self.fixed.socket = socket.to_owned();
        if config_differs {
            let config = self.info.config.clone();
            self.apply_backend_config(&config);
        }
        self.publish();
        log::info!(
            "{name}: backend switched from {} to {}",
            old.display(),
            socket.display()
        );
        if self.setup.is_some() {
            self.start_rings(true);
        }
        Ok(())
    }
}
