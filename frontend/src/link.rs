//! [`BackendLink`]: what a device model needs from its connection to a backend, as a trait,
//! so device logic (reconnects, replays, resets) can be unit-tested against a mock without a
//! backend process. [`Connection`] is the real one.

use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;

use vhost::VhostUserMemoryRegionInfo;

use crate::connection::{BackendInfo, Connection, InflightArea, Ring};
use crate::error::FrontendError;

/// A live link to a backend (see [`Connection`] for what each call sends).
pub trait BackendLink: Send {
    /// What the backend said in the handshake.
    fn info(&self) -> &BackendInfo;
    /// A descriptor that becomes readable or hangs up when the backend goes away (nothing
    /// arrives unsolicited on a vhost-user socket), if there is one to watch.
    fn watch_fd(&self) -> Option<RawFd>;
    /// The BACKEND_REQ channel's descriptor, readable when the backend sent a request.
    fn backend_request_fd(&self) -> Option<RawFd>;
    /// A handle that cuts the link from another thread when shut down.
    fn cutter(&self) -> Option<UnixStream>;
    /// Serves one backend request; returns whether it reported a config change.
    fn handle_backend_request(&mut self) -> bool;
    /// GET_CONFIG.
    fn read_config(&mut self, offset: u32, size: u32) -> Result<Vec<u8>, FrontendError>;
    /// SET_CONFIG.
    fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<(), FrontendError>;
    /// GET_INFLIGHT_FD, if the backend tracks inflight requests.
    fn get_inflight(
        &mut self,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Option<InflightArea>, FrontendError>;
    /// Starts the rings.
    fn start(
        &mut self,
        regions: &[VhostUserMemoryRegionInfo],
        acked_features: u64,
        inflight: Option<&InflightArea>,
        rings: &[Ring<'_>],
    ) -> Result<(), FrontendError>;
    /// Stops the rings; returns their next avail indexes.
    fn stop(&mut self, queues: &[u16]) -> Result<Vec<u32>, FrontendError>;
    /// The backend's state (DEVICE_STATE SAVE, rings stopped), `None` when it offers none;
    /// at most `limit` bytes. The default: no state.
    fn save_state(&mut self, limit: u64) -> Result<Option<Vec<u8>>, FrontendError> {
        let _ = limit;
        Ok(None)
    }
    /// Loads a saved state into the backend (DEVICE_STATE LOAD) before its rings start.
    fn load_state(&mut self, state: &[u8]) -> Result<(), FrontendError>;
}

impl BackendLink for Connection {
    fn info(&self) -> &BackendInfo {
        Connection::info(self)
    }

    fn watch_fd(&self) -> Option<RawFd> {
        Some(self.raw_fd())
    }

    fn backend_request_fd(&self) -> Option<RawFd> {
        Connection::backend_request_fd(self)
    }

    fn cutter(&self) -> Option<UnixStream> {
        Connection::cutter(self).ok()
    }

    fn handle_backend_request(&mut self) -> bool {
        Connection::handle_backend_request(self)
    }

    fn read_config(&mut self, offset: u32, size: u32) -> Result<Vec<u8>, FrontendError> {
        Connection::read_config(self, offset, size)
    }

    fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<(), FrontendError> {
        Connection::set_config(self, offset, data)
    }

    fn get_inflight(
        &mut self,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Option<InflightArea>, FrontendError> {
        Connection::get_inflight(self, num_queues, queue_size)
    }

    fn start(
        &mut self,
        regions: &[VhostUserMemoryRegionInfo],
        acked_features: u64,
        inflight: Option<&InflightArea>,
        rings: &[Ring<'_>],
    ) -> Result<(), FrontendError> {
        Connection::start(self, regions, acked_features, inflight, rings)
    }
    fn save_state(&mut self, limit: u64) -> Result<Option<Vec<u8>>, FrontendError> {
        Connection::save_state(self, limit)
    }
    fn load_state(&mut self, state: &[u8]) -> Result<(), FrontendError> {
        Connection::load_state(self, state)
    }

    fn stop(&mut self, queues: &[u16]) -> Result<Vec<u32>, FrontendError> {
        Connection::stop(self, queues)
    }
}
