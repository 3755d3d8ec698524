//! The API's JSON documents (requests, answers, the VM description) and the errors a VM
//! control operation can fail with. `docs/api.yaml` describes the same shapes.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Longest shutdown timeout a client may ask for.
pub const MAX_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(3600);
/// Shutdown timeout when the client gives none.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// What the VM is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// vCPUs run.
    Running,
    /// vCPUs are stopped; devices keep their rings.
    Paused,
    /// The power button was pressed (or would have been); a forced stop follows the timeout.
    ShuttingDown,
    /// A forced stop is under way: the VMM ends.
    Stopping,
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::ShuttingDown => "shutting down",
            VmState::Stopping => "stopping",
        })
    }
}

/// `GET /vm`: everything about the VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// Current state.
    pub state: VmState,
    /// Milliseconds since the VMM started.
    pub uptime_ms: u64,
    /// How the VM was configured.
    pub config: VmConfigInfo,
    /// One entry per vCPU.
    pub vcpus: Vec<VcpuInfo>,
    /// Guest RAM.
    pub memory: MemoryInfo,
    /// virtio devices.
    pub devices: Vec<DeviceInfo>,
    /// VM-wide counters.
    pub counters: Counters,
}

/// The configuration the VM was started with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfigInfo {
    /// Kernel path (absent for built-in programs).
    pub kernel: Option<String>,
    /// Initrd path.
    pub initrd: Option<String>,
    /// Command line as given (before hype's additions).
    pub cmdline: Option<String>,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// vCPU count.
    pub cpus: u32,
    /// Serial console sink (`stdio`, `none`, `file:PATH`).
    pub serial: String,
    /// Whether PVM emulation fix-ups are active.
    pub emulation_fixups: bool,
}

/// One vCPU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuInfo {
    /// Index (APIC ID).
    pub index: u32,
    /// Whether the vCPU thread is parked by a pause.
    pub paused: bool,
    /// Exits of this vCPU, by kind.
    pub exits: ExitCounts,
}

/// KVM exits handled in userspace, by kind.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitCounts {
    /// Port reads.
    pub io_in: u64,
    /// Port writes.
    pub io_out: u64,
    /// MMIO reads.
    pub mmio_read: u64,
    /// MMIO writes.
    pub mmio_write: u64,
    /// KVM_RUN interrupted by a signal (kicks, pauses).
    pub interrupted: u64,
    /// Emulation failures handed to the PVM fix-ups.
    pub emulation: u64,
    /// Anything else.
    pub other: u64,
}

/// Guest RAM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryInfo {
    /// Total bytes.
    pub bytes: u64,
    /// The regions in guest physical memory.
    pub regions: Vec<MemoryRegion>,
}

/// One guest RAM region.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegion {
    /// Guest physical start.
    pub guest_address: u64,
    /// Length in bytes.
    pub bytes: u64,
}

/// A backend's connection state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendState {
    /// Connected and serving.
    Connected,
    /// Lost; hype is reconnecting.
    Reconnecting,
    /// Lost and not retried any more.
    GaveUp,
}

/// One virtio device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// Name (`virtio0`, ...), used in device paths.
    pub id: String,
    /// Device type (`blk`, `net`, `console`).
    #[serde(rename = "type")]
    pub kind: String,
    /// Backend socket.
    pub socket: String,
    /// virtio-mmio window base.
    pub mmio_base: u64,
    /// Interrupt line.
    pub gsi: u32,
    /// Backend connection state.
    pub backend: BackendState,
    /// Milliseconds since the backend was lost (when not connected and known).
    pub lost_for_ms: Option<u64>,
    /// Queues exposed to the guest.
    pub queues: u32,
    /// Reconnections to a restarted backend.
    pub reconnects: u64,
    /// Times the rings were started on a backend.
    pub ring_starts: u64,
    /// QueueNotify writes that reached the VMM (not taken by an ioeventfd).
    pub notify_exits: u64,
    /// Nonsensical guest register accesses.
    pub guest_errors: u64,
    /// The virtio device status register.
    pub status: u32,
}

/// VM-wide counters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// MMIO exits no device claims.
    pub mmio_unclaimed: u64,
    /// PVM fix-ups applied, by instruction.
    pub fixups: BTreeMap<String, u64>,
    /// Emulation failures no fix-up handled.
    pub fixups_unhandled: u64,
    /// Interrupts the VMM itself raised, by source (backends raise their queue interrupts
    /// through KVM directly and are not counted here).
    pub interrupts: BTreeMap<String, u64>,
}

/// `POST /vm/shutdown` body (optional).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownRequest {
    /// How long the guest gets after the power button before the forced stop (default 10 s,
    /// at most 3600 s).
    #[serde(default, deserialize_with = "present")]
    pub timeout_ms: Option<u64>,
}

/// `PUT /vm/snapshot` body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// Directory to write the snapshot into (created; must not exist or be empty), as the
    /// VMM process sees it.
    pub dir: String,
}

/// The answer to `PUT /vm/snapshot`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotReply {
    /// Where the snapshot is.
    pub dir: String,
    /// Guest memory pages written (pages that are not all zero).
    pub memory_pages: u64,
    /// Their bytes.
    pub memory_bytes_written: u64,
    /// How long the snapshot took, in milliseconds.
    pub took_ms: u64,
}

/// An optional field that, when present, must hold a value (`null` is refused).
fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// A device type as the API names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    /// virtio-blk.
    Blk,
    /// virtio-net.
    Net,
    /// virtio-console.
    Console,
}

/// A body for the actions that take no parameters: absent, or an empty object.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmptyRequest {}

/// `POST /vm/devices` body: a vhost-user backend to hot-plug.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddDeviceRequest {
    /// Backend socket path.
    pub socket: String,
    /// Device type; learned from the backend when absent.
    #[serde(rename = "type", default, deserialize_with = "present")]
    pub kind: Option<DeviceKind>,
}

/// `PUT /vm/devices/{id}/backend` body: the socket of the backend the device moves to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchBackendRequest {
    /// The new backend's socket path.
    pub socket: String,
}

/// `POST /vm/devices/{id}/resize` answer: what re-reading the device's config found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigRefreshReply {
    /// The device.
    pub id: String,
    /// Whether the config changed (the guest then got a config-change interrupt).
    pub changed: bool,
    /// The config now, described (a disk: its capacity).
    pub config: String,
}

/// The answer to an action.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionReply {
    /// The VM's state after the action.
    pub state: VmState,
    /// Shutdown only: whether a power button event reached the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_button: Option<bool>,
    /// Shutdown only: milliseconds until the forced stop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

impl ActionReply {
    /// A reply carrying only the state.
    pub fn state(state: VmState) -> Self {
        ActionReply {
            state,
            power_button: None,
            timeout_ms: None,
        }
    }
}

/// Every error answer: one line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// Why.
    pub error: String,
}

/// Why a control operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Pause while paused.
    #[error("the VM is already paused")]
    AlreadyPaused,
    /// Resume while running.
    #[error("the VM is not paused")]
    NotPaused,
    /// Anything but a forced stop while a shutdown is under way.
    #[error("the VM is shutting down")]
    ShuttingDown,
    /// Anything while the VMM ends.
    #[error("the VM is stopping")]
    Stopping,
    /// The vCPUs did not all stop in time (the VM keeps running).
    #[error("vCPUs did not stop within {0:?}; the VM keeps running")]
    PauseTimeout(Duration),
    /// A device path that names no device.
    #[error("no device {0}")]
    NoSuchDevice(String),
    /// A request value out of range, or a device that cannot be attached.
    #[error("{0}")]
    BadValue(String),
    /// A request the VM's current state does not allow (no free slot, a device the guest
    /// still uses, a boot device).
    #[error("{0}")]
    Conflict(String),
    /// The VMM failed doing what was asked.
    #[error("{0}")]
    Failed(String),
    /// A feature this VM does not have.
    #[error("{0}")]
    Unavailable(String),
}

impl ControlError {
    /// The HTTP status this error is answered with.
    pub fn status(&self) -> u16 {
        match self {
            ControlError::AlreadyPaused
            | ControlError::NotPaused
            | ControlError::ShuttingDown
            | ControlError::Stopping
            | ControlError::Conflict(_) => 409,
            ControlError::PauseTimeout(_) | ControlError::Failed(_) => 500,
            ControlError::NoSuchDevice(_) => 404,
            ControlError::BadValue(_) => 400,
            ControlError::Unavailable(_) => 501,
        }
    }
}

/// What the VMM offers the API server.
pub trait VmApi: Send + Sync {
    /// The VM described.
    fn info(&self) -> VmInfo;
    /// Stops every vCPU; returns when all are parked.
    fn pause(&self) -> Result<ActionReply, ControlError>;
    /// Starts the parked vCPUs again.
    fn resume(&self) -> Result<ActionReply, ControlError>;
    /// Presses the power button; the VM is stopped if it still runs after `timeout`.
    fn shutdown(&self, timeout: Duration) -> Result<ActionReply, ControlError>;
    /// Stops the VM now.
    fn stop(&self) -> Result<ActionReply, ControlError>;
    /// Hot-plugs a device.
    fn add_device(&self, req: &AddDeviceRequest) -> Result<DeviceInfo, ControlError>;
    /// Hot-unplugs a device.
    fn remove_device(&self, id: &str) -> Result<(), ControlError>;
    /// Writes a snapshot of the paused VM into `dir` (`docs/snapshot.md`).
    fn snapshot(&self, dir: &str) -> Result<SnapshotReply, ControlError> {
        let _ = dir;
        Err(ControlError::Unavailable(
            "this VMM does not take snapshots".into(),
        ))
    }
    /// Re-reads a device's config from its backend and tells the guest what changed.
    fn refresh_device_config(&self, id: &str) -> Result<ConfigRefreshReply, ControlError> {
        let _ = id;
        Err(ControlError::Unavailable(
            "this VM cannot re-read device configs".into(),
        ))
    }
    /// The events after `since`, waiting up to `timeout` when there are none yet.
    fn events(
        &self,
        since: u64,
        timeout: Duration,
    ) -> Result<crate::events::EventsReply, ControlError> {
        let _ = (since, timeout);
        Err(ControlError::Unavailable(
            "this VM keeps no event log".into(),
        ))
    }
    /// Moves a device to another backend while the guest runs.
    fn switch_backend(
        &self,
        id: &str,
        req: &SwitchBackendRequest,
    ) -> Result<DeviceInfo, ControlError> {
        let _ = (id, req);
        Err(ControlError::Unavailable(
            "this VM cannot switch device backends".into(),
        ))
    }
}
