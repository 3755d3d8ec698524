//! The VM side of the control API ([`hype_api::VmApi`]): the VM's state, pause and resume
//! through the vCPUs' [`PauseGate`](crate::vcpu::PauseGate), shutdown (power button, then a
//! forced stop after a timeout), the forced stop, and the VM described for `GET /vm`.
//!
//! Every state change an orchestrator may wait for (pause, resume, shutdown, hot-plug, backend
//! switch, config change, a backend lost or back, the guest's power-off or reset) is recorded in
//! the VM's [`EventLog`] for `GET /vm/events`; the device workers record theirs through
//! [`record`], since they have no handle on this struct.
//!
//! The API threads never touch a vCPU: they set flags and kick the vCPU threads with the
//! VMM's kick signal; the VM's main thread notices a due stop in its wait loop
//! ([`VmControl::stop_due`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hype_api::events::{EventKind, EventLog, EventsReply};
use hype_api::model::{
    ActionReply, AddDeviceRequest, BackendState, ConfigRefreshReply, ControlError, Counters,
    DeviceInfo, DeviceKind, ExitCounts, MemoryInfo, MemoryRegion, SnapshotReply,
    SwitchBackendRequest, VcpuInfo, VmConfigInfo, VmInfo, VmState,
};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use crate::config::SerialSpec;
use crate::hotplug::{self, Hotplug, HotplugError};
use crate::layout::{VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE};
use crate::vcpu::{ExitStats, VcpuShared};
use crate::virtio::DeviceType;
use crate::vm::{BootImage, VmConfig};
use hype_fixups::Fixup;

/// How long a pause waits for every vCPU to stop.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Presses the guest's power button; `false` when the event could not be raised.
pub type PowerButton = Box<dyn Fn() -> bool + Send + Sync>;

/// The event log of this process's VM (one VM per VMM process); set by [`VmControl::new`].
static EVENTS: std::sync::OnceLock<Arc<EventLog>> = std::sync::OnceLock::new();

/// Records an event in the VM's log (nothing before a [`VmControl`] exists).
pub fn record(kind: EventKind, device: Option<&str>, detail: Option<String>) {
    if let Some(log) = EVENTS.get() {
        log.push(kind, device, detail);
    }
}

/// Why the VM's main thread must stop the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// `POST /vm/stop`.
    Requested,
    /// A shutdown whose timeout passed with the guest still running.
    ShutdownTimeout(Duration),
}

struct Phase {
    state: VmState,
    /// When a shutdown turns into a forced stop.
    deadline: Option<(Instant, Duration)>,
}

/// The control state of one running VM.
pub struct VmControl {
    cfg: VmConfig,
    started: Instant,
    shared: Arc<VcpuShared>,
    /// The vCPU threads to kick; emptied before they are joined.
    threads: Mutex<Vec<libc::pthread_t>>,
    phase: Mutex<Phase>,
    /// Serialises pause, resume and shutdown (a stop never waits for them).
    ops: Mutex<()>,
    stop: AtomicBool,
    power_button: Option<PowerButton>,
    serial_irqs: Arc<AtomicU64>,
    hotplug: Hotplug,
    snapshotter: std::sync::OnceLock<crate::snapshot::Snapshotter>,
    /// A snapshot stopped the devices' rings; the next resume starts them.
    rings_stopped: AtomicBool,
    events: Arc<EventLog>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn path_text(p: &std::path::Path) -> String {
    p.to_string_lossy().into_owned()
}

fn exit_counts(s: &ExitStats) -> ExitCounts {
    let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
    ExitCounts {
        io_in: l(&s.io_in),
        io_out: l(&s.io_out),
        mmio_read: l(&s.mmio_read),
        mmio_write: l(&s.mmio_write),
        interrupted: l(&s.interrupted),
        emulation: l(&s.emulation),
        other: l(&s.other),
    }
}

impl VmControl {
    /// Control for the VM of `cfg`, started at `started`, whose vCPUs share `shared`.
    /// `power_button` is `None` until the VM has an ACPI power button; `serial_irqs` counts
    /// the UART's interrupts.
    pub fn new(
        cfg: &VmConfig,
        started: Instant,
        shared: Arc<VcpuShared>,
        power_button: Option<PowerButton>,
        serial_irqs: Arc<AtomicU64>,
        hotplug: Hotplug,
    ) -> Self {
        VmControl {
            cfg: cfg.clone(),
            started,
            shared,
            threads: Mutex::new(Vec::new()),
            phase: Mutex::new(Phase {
                state: VmState::Running,
                deadline: None,
            }),
            ops: Mutex::new(()),
            stop: AtomicBool::new(false),
            power_button,
            serial_irqs,
            hotplug,
            snapshotter: std::sync::OnceLock::new(),
            rings_stopped: AtomicBool::new(false),
            events: EVENTS.get_or_init(|| Arc::new(EventLog::default())).clone(),
        }
    }

    /// Gives the control side what `PUT /vm/snapshot` needs (set once, before the API starts).
    pub fn set_snapshotter(&self, s: crate::snapshot::Snapshotter) {
        let _ = self.snapshotter.set(s);
    }

    /// The vCPU threads (kicked out of KVM_RUN for a pause).
    pub fn set_vcpu_threads(&self, threads: Vec<libc::pthread_t>) {
        *lock(&self.threads) = threads;
    }

    /// Forgets the vCPU threads; call before joining them.
    pub fn forget_vcpu_threads(&self) {
        lock(&self.threads).clear();
        let mut p = lock(&self.phase);
        p.state = VmState::Stopping;
    }

    fn kick(&self) {
        let threads = lock(&self.threads);
        for t in threads.iter() {
            // SAFETY: the threads are alive: they are only joined after
            // forget_vcpu_threads, which takes this lock and empties the list.
            unsafe { libc::pthread_kill(*t, vmm_sys_util::signal::SIGRTMIN()) };
        }
    }

    /// Records what the VM's main thread saw (a stop signal's power button, the guest's
    /// power-off or reset, a shutdown's forced stop), so a client waiting on `GET /vm/events`
    /// learns it before the API server closes.
    pub fn record_event(&self, kind: EventKind, detail: Option<String>) {
        self.events.push(kind, None, detail);
    }

    /// Whether the VM must stop now, and why.
    pub fn stop_due(&self) -> Option<StopReason> {
        if self.stop.load(Ordering::Acquire) {
            return Some(StopReason::Requested);
        }
        let p = lock(&self.phase);
        match p.deadline {
            Some((at, timeout)) if Instant::now() >= at => {
                Some(StopReason::ShutdownTimeout(timeout))
            }
            _ => None,
        }
    }

    fn refuse_unless_running(state: VmState) -> Result<(), ControlError> {
        match state {
            VmState::Running => Ok(()),
            VmState::Paused => Err(ControlError::AlreadyPaused),
            VmState::ShuttingDown => Err(ControlError::ShuttingDown),
            VmState::Stopping => Err(ControlError::Stopping),
        }
    }

    fn state(&self) -> VmState {
        lock(&self.phase).state
    }

    fn set_state_from(&self, from: VmState, to: VmState) {
        let mut p = lock(&self.phase);
        if p.state == from {
            p.state = to;
        }
    }

    fn do_resume(&self) {
        if self.rings_stopped.swap(false, Ordering::AcqRel) {
            for (_, d) in self.shared.mmio.devices().iter() {
                d.resume_rings();
            }
        }
        self.shared.pause.resume();
        self.set_state_from(VmState::Paused, VmState::Running);
        self.events.push(EventKind::Resumed, None, None);
        log::info!("VM resumed through the API");
    }

    fn config_info(&self) -> VmConfigInfo {
        let (kernel, initrd, cmdline) = match &self.cfg.image {
            BootImage::Kernel {
                kernel,
                initrd,
                cmdline,
            } => (
                Some(path_text(kernel)),
                initrd.as_deref().map(path_text),
                Some(cmdline.clone()),
            ),
            BootImage::Raw { .. } => (None, None, None),
        };
        VmConfigInfo {
            kernel,
            initrd,
            cmdline,
            memory_bytes: self.cfg.memory,
            cpus: u32::from(self.cfg.cpus),
            serial: match &self.cfg.serial {
                SerialSpec::Stdio => "stdio".into(),
                SerialSpec::None => "none".into(),
                SerialSpec::File(p) => format!("file:{}", path_text(p)),
            },
            emulation_fixups: self.shared.fixups.is_active(),
        }
    }

    fn devices(&self) -> Vec<DeviceInfo> {
        self.shared
            .mmio
            .devices()
            .iter()
            .map(|(base, d)| self.device_info(*base, d))
            .collect()
    }

    fn device_info(&self, base: u64, d: &crate::virtio::VhostUserDevice) -> DeviceInfo {
        let i = (base.saturating_sub(VIRTIO_MMIO_BASE) / VIRTIO_MMIO_SIZE) as usize;
        let s = d.stats();
        let st = d.backend_status();
        let lost_for = |since: std::time::SystemTime| {
            since.elapsed().map(|e| e.as_millis() as u64).unwrap_or(0)
        };
        let (backend, lost_for_ms) = match st.state {
            crate::virtio::BackendState::Connected { .. } => (BackendState::Connected, None),
            crate::virtio::BackendState::Reconnecting { since, .. } => {
                (BackendState::Reconnecting, Some(lost_for(since)))
            }
            crate::virtio::BackendState::GaveUp { since, .. } => {
                (BackendState::GaveUp, Some(lost_for(since)))
            }
        };
        DeviceInfo {
            id: d.name().to_owned(),
            kind: d.kind().name().to_owned(),
            socket: self
                .hotplug
                .slot(i)
                .map(|slot| path_text(&slot.socket))
                .unwrap_or_default(),
            mmio_base: base,
            gsi: crate::virtio::DEVICE_GSIS.get(i).copied().unwrap_or(0),
            backend,
            lost_for_ms,
            queues: u32::from(d.num_queues()),
            reconnects: st.reconnects,
            ring_starts: st.ring_starts,
            notify_exits: s.notify_exits.load(Ordering::Relaxed),
            guest_errors: d.guest_errors(),
            status: d.status(),
        }
    }
}

impl hype_api::VmApi for VmControl {
    fn info(&self) -> VmInfo {
        let regions: Vec<MemoryRegion> = self
            .shared
            .mem
            .iter()
            .map(|r| MemoryRegion {
                guest_address: r.start_addr().raw_value(),
                bytes: r.len(),
            })
            .collect();
        let vcpus = self
            .shared
            .exits
            .iter()
            .enumerate()
            .map(|(i, e)| VcpuInfo {
                index: i as u32,
                paused: self.shared.pause.is_parked(i),
                exits: exit_counts(e),
            })
            .collect();
        let fixups: BTreeMap<String, u64> = Fixup::ALL
            .iter()
            .map(|f| (f.name().to_owned(), self.shared.fixups.hits(*f)))
            .collect();
        let mut interrupts = BTreeMap::new();
        interrupts.insert(
            "serial".to_owned(),
            self.serial_irqs.load(Ordering::Relaxed),
        );
        VmInfo {
            state: self.state(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            config: self.config_info(),
            vcpus,
            memory: MemoryInfo {
                bytes: regions.iter().map(|r| r.bytes).sum(),
                regions,
            },
            devices: self.devices(),
            counters: Counters {
                mmio_unclaimed: self.shared.mmio.counts().unclaimed,
                fixups,
                fixups_unhandled: self.shared.fixups.unhandled(),
                interrupts,
            },
        }
    }

    fn pause(&self) -> Result<ActionReply, ControlError> {
        let _op = lock(&self.ops);
        Self::refuse_unless_running(self.state())?;
        self.shared
            .pause
            .pause(|| self.kick(), PAUSE_TIMEOUT)
            .map_err(|e| {
                log::warn!("pause: {e}");
                ControlError::PauseTimeout(e.waited)
            })?;
        self.set_state_from(VmState::Running, VmState::Paused);
        self.events.push(EventKind::Paused, None, None);
        log::info!("VM paused through the API");
        Ok(ActionReply::state(self.state()))
    }

    fn resume(&self) -> Result<ActionReply, ControlError> {
        let _op = lock(&self.ops);
        match self.state() {
            VmState::Paused => {}
            VmState::Running => return Err(ControlError::NotPaused),
            VmState::ShuttingDown => return Err(ControlError::ShuttingDown),
            VmState::Stopping => return Err(ControlError::Stopping),
        }
        self.do_resume();
        Ok(ActionReply::state(self.state()))
    }

    fn shutdown(&self, timeout: Duration) -> Result<ActionReply, ControlError> {
        let _op = lock(&self.ops);
        match self.state() {
            VmState::Running => {}
            // The guest can only react to the button when it runs.
            VmState::Paused => self.do_resume(),
            VmState::ShuttingDown => return Err(ControlError::ShuttingDown),
            VmState::Stopping => return Err(ControlError::Stopping),
        }
        {
            let mut p = lock(&self.phase);
            p.state = VmState::ShuttingDown;
            p.deadline = Some((Instant::now() + timeout, timeout));
        }
        let pressed = match &self.power_button {
            Some(press) => press(),
            None => false,
        };
        self.events.push(
            EventKind::ShutdownRequested,
            None,
            Some(format!(
                "power button {}; forced stop in {} ms",
                if pressed { "pressed" } else { "unavailable" },
                timeout.as_millis()
            )),
        );
        if pressed {
            log::info!("shutdown: power button pressed; forced stop in {timeout:?}");
        } else {
            log::warn!(
                "shutdown: this VM has no power button the guest would see; forced stop in \
                 {timeout:?}"
            );
        }
        Ok(ActionReply {
            state: VmState::ShuttingDown,
            power_button: Some(pressed),
            timeout_ms: Some(timeout.as_millis() as u64),
        })
    }

    fn stop(&self) -> Result<ActionReply, ControlError> {
        let mut p = lock(&self.phase);
        if p.state == VmState::Stopping {
            return Err(ControlError::Stopping);
        }
        p.state = VmState::Stopping;
        drop(p);
        self.stop.store(true, Ordering::Release);
        self.events.push(EventKind::StopRequested, None, None);
        log::info!("forced stop requested through the API");
        Ok(ActionReply::state(VmState::Stopping))
    }

    fn add_device(&self, req: &AddDeviceRequest) -> Result<DeviceInfo, ControlError> {
        if self.state() == VmState::Stopping {
            return Err(ControlError::Stopping);
        }
        let kind = req.kind.map(|k| match k {
            DeviceKind::Blk => DeviceType::Block,
            DeviceKind::Net => DeviceType::Net,
            DeviceKind::Console => DeviceType::Console,
        });
        let slot = self
            .hotplug
            .add(&self.shared.mmio, std::path::Path::new(&req.socket), kind)
            .map_err(control_error)?;
        let base = crate::virtio::device_base(slot);
        self.events.push(
            EventKind::DeviceAdded,
            Some(&hotplug::device_name(slot)),
            Some(req.socket.clone()),
        );
        self.shared
            .mmio
            .devices()
            .iter()
            .find(|(b, _)| *b == base)
            .map(|(b, d)| self.device_info(*b, d))
            .ok_or_else(|| ControlError::NoSuchDevice(hotplug::device_name(slot)))
    }

    fn snapshot(&self, dir: &str) -> Result<SnapshotReply, ControlError> {
        let _op = lock(&self.ops);
        match self.state() {
            VmState::Paused => {}
            VmState::Running => return Err(ControlError::NotPaused),
            VmState::ShuttingDown => return Err(ControlError::ShuttingDown),
            VmState::Stopping => return Err(ControlError::Stopping),
        }
        let Some(snap) = self.snapshotter.get() else {
            return Err(ControlError::Unavailable("snapshots are not set up".into()));
        };
        let path = std::path::Path::new(dir);
        let all = self.shared.mmio.devices();
        let devices: Vec<crate::snapshot::LiveDevice<'_>> = all
            .iter()
            .map(|(base, d)| {
                let index = (base.saturating_sub(VIRTIO_MMIO_BASE) / VIRTIO_MMIO_SIZE) as usize;
                crate::snapshot::LiveDevice {
                    index,
                    socket: self
                        .hotplug
                        .slot(index)
                        .map(|slot| path_text(&slot.socket))
                        .unwrap_or_default(),
                    device: d,
                }
            })
            .collect();
        // The rings are stopped from here on: a resume starts them again.
        self.rings_stopped.store(true, Ordering::Release);
        match snap.save(path, &self.shared.snapshot, &devices) {
            Ok(s) => {
                log::info!(
                    "snapshot written to {dir}: {} pages of memory in {:.1} ms",
                    s.memory_pages,
                    s.took.as_secs_f64() * 1000.0
                );
                Ok(SnapshotReply {
                    dir: dir.to_owned(),
                    memory_pages: s.memory_pages,
                    memory_bytes_written: s.memory_bytes_written,
                    took_ms: s.took.as_millis() as u64,
                })
            }
            Err(e) => {
                let text = hype_base::error_chain(&e).to_string();
                log::warn!("snapshot to {dir} failed: {text}");
                Err(match e {
                    crate::snapshot::SnapshotError::DirNotEmpty(_) => ControlError::Conflict(text),
                    _ => ControlError::Failed(text),
                })
            }
        }
    }

    fn refresh_device_config(&self, id: &str) -> Result<ConfigRefreshReply, ControlError> {
        self.refresh_config(id)
    }

    fn switch_backend(
        &self,
        id: &str,
        req: &SwitchBackendRequest,
    ) -> Result<DeviceInfo, ControlError> {
        self.switch_device_backend(id, req)
    }

    fn remove_device(&self, id: &str) -> Result<(), ControlError> {
        if self.state() == VmState::Stopping {
            return Err(ControlError::Stopping);
        }
        self.hotplug
            .remove(&self.shared.mmio, id, hotplug::EJECT_TIMEOUT)
            .map_err(control_error)?;
        self.events.push(EventKind::DeviceRemoved, Some(id), None);
        Ok(())
    }

    fn events(&self, since: u64, timeout: Duration) -> Result<EventsReply, ControlError> {
        Ok(self.events.since(since, timeout))
    }
}

/// How long `POST /vm/devices/{id}/resize` waits for the device thread.
pub const REFRESH_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `PUT /vm/devices/{id}/backend` waits for the device thread (the old backend may
/// take a while to finish its requests).
pub const SWITCH_TIMEOUT: Duration = Duration::from_secs(60);

impl VmControl {
    /// The device called `id` and its window base.
    fn device(&self, id: &str) -> Result<(u64, Arc<crate::virtio::VhostUserDevice>), ControlError> {
        self.shared
            .mmio
            .devices()
            .into_iter()
            .find(|(_, d)| d.name() == id)
            .ok_or_else(|| ControlError::NoSuchDevice(id.to_owned()))
    }

    /// `POST /vm/devices/{id}/resize`.
    pub fn refresh_config(&self, id: &str) -> Result<ConfigRefreshReply, ControlError> {
        if self.state() == VmState::Stopping {
            return Err(ControlError::Stopping);
        }
        let (_, dev) = self.device(id)?;
        let r = dev
            .refresh_config(REFRESH_TIMEOUT)
            .map_err(device_command_error)?;
        if r.changed {
            self.events.push(EventKind::ConfigChanged, Some(id), None);
        }
        Ok(ConfigRefreshReply {
            id: id.to_owned(),
            changed: r.changed,
            config: r.config,
        })
    }

    /// `PUT /vm/devices/{id}/backend`.
    pub fn switch_device_backend(
        &self,
        id: &str,
        req: &SwitchBackendRequest,
    ) -> Result<DeviceInfo, ControlError> {
        if self.state() == VmState::Stopping {
            return Err(ControlError::Stopping);
        }
        if req.socket.is_empty() {
            return Err(ControlError::BadValue("socket must not be empty".into()));
        }
        let (base, dev) = self.device(id)?;
        let socket = std::path::Path::new(&req.socket);
        dev.switch_backend(socket, SWITCH_TIMEOUT)
            .map_err(device_command_error)?;
        let slot = (base.saturating_sub(VIRTIO_MMIO_BASE) / VIRTIO_MMIO_SIZE) as usize;
        self.hotplug.set_socket(slot, socket);
        self.events.push(
            EventKind::BackendSwitched,
            Some(id),
            Some(req.socket.clone()),
        );
        Ok(self.device_info(base, &dev))
    }
}

fn device_command_error(e: crate::virtio::DeviceCommandError) -> ControlError {
    use crate::virtio::DeviceCommandError as E;
    let text = hype_base::error_chain(&e);
    match e {
        // The request is fine; the backend it names (or the device's state) is not.
        E::NotConnected
        | E::CannotSwitch
        | E::NoBackend(_)
        | E::Connect { .. }
        | E::Incompatible { .. } => ControlError::Conflict(text),
        E::GetConfig(_) | E::NoAnswer(_) | E::Gone => ControlError::Failed(text),
    }
}

fn control_error(e: HotplugError) -> ControlError {
    let text = hype_base::error_chain(&e);
    match e {
        HotplugError::NoSuchDevice(id) => ControlError::NoSuchDevice(id),
        // The request is well-formed: the backend it names is what is not right.
        HotplugError::Attach { .. }
        | HotplugError::NoFreeSlot(_)
        | HotplugError::BootDevice(_)
        | HotplugError::NotReleased { .. } => ControlError::Conflict(text),
        HotplugError::Kvm { .. } => ControlError::Failed(text),
    }
}
