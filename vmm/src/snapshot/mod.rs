//! Snapshots of a paused VM to a directory and restoring them in a new process
//! (`docs/snapshot.md` describes the format).
//!
//! Saving: each vCPU thread records its own state when it parks for a pause ([`VcpuSlots`],
//! filled through [`crate::vcpu::PauseGate`]); [`Snapshotter::save`] then adds the VM-wide KVM
//! state and guest memory and writes `manifest.json` last, so a directory without a complete
//! manifest is never taken for a snapshot. Restoring: [`Restore::open`] checks everything
//! (manifest checksum, format and hype version, host CPU, file sizes, every checksum) before the
//! VM exists or any device is attached; [`crate::vm`] then builds the VM from it.

pub mod crc;
pub mod memory;
pub mod state;

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestMemoryMmap;
use crate::virtio::worker::MAX_DEVICE_STATE;
use state::{DecodeError, KvmCallError, VcpuState, VmState};

/// The `magic` of every manifest.
pub const MAGIC: &str = "hype-snapshot";
/// The format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The manifest's file name.
pub const MANIFEST: &str = "manifest.json";
/// The file holding the manifest's checksum.
pub const MANIFEST_SUM: &str = "manifest.crc32";
/// The KVM state file.
pub const STATE: &str = "state.bin";
/// The guest memory file.
pub const MEMORY: &str = "memory.bin";
/// The largest manifest or state file read (both are a few KiB per vCPU).
const MAX_SMALL_FILE: u64 = 16 << 20;

/// The CPU the snapshot was taken on, as KVM presents it to guests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuIdentity {
    /// CPUID leaf 0 vendor string.
    pub vendor: String,
    /// CPUID leaf 1 EAX: family, model, stepping.
    pub signature: u32,
    /// Feature words the guest sees: leaf 1 ECX, EDX, leaf 7.0 EBX, ECX, EDX.
    pub features: [u32; 5],
}

impl CpuIdentity {
    /// The identity in KVM's supported CPUID table.
    pub fn from_cpuid(cpuid: &kvm_bindings::CpuId) -> CpuIdentity {
        let leaf = |f: u32| {
            cpuid
                .as_slice()
                .iter()
                .find(|e| e.function == f && e.index == 0)
                .copied()
                .unwrap_or_default()
        };
        let l0 = leaf(0);
        let mut vendor = Vec::with_capacity(12);
        for r in [l0.ebx, l0.edx, l0.ecx] {
            vendor.extend_from_slice(&r.to_le_bytes());
        }
        let (l1, l7) = (leaf(1), leaf(7));
        CpuIdentity {
            vendor: String::from_utf8_lossy(&vendor)
                .trim_end_matches('\0')
                .to_owned(),
            signature: l1.eax,
            // Leaf 1 EBX/ECX bits that vary per vCPU (APIC id, OSXSAVE) are not in the words.
            features: [l1.ecx & !(1 << 27), l1.edx, l7.ebx, l7.ecx, l7.edx],
        }
    }
}

/// A file of the snapshot and its checksum.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// Name inside the directory.
    pub name: String,
    /// Length in bytes (for `memory.bin`, the logical length of the sparse file).
    pub bytes: u64,
    /// CRC-32 of the contents (for `memory.bin`: see [`memory`]).
    pub crc32: u32,
    /// For `memory.bin`: pages written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pages: Option<u64>,
}

/// A virtio device of the snapshot's VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// Slot (virtioN).
    pub index: usize,
    /// Device type name (blk, net, console).
    pub kind: String,
    /// The backend socket it was attached through.
    pub socket: String,
    /// The virtio-mmio register file.
    pub transport: crate::virtio::mmio::TransportState,
    /// Where each ring stood when the snapshot stopped it.
    pub rings: Vec<crate::virtio::worker::RingPosition>,
    /// The backend's own state (vhost-user DEVICE_STATE), when it offers the feature: the
    /// file [`device_state_file`] names, and its checksum.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<FileRecord>,
}

/// The file holding device `index`'s backend state.
pub fn device_state_file(index: usize) -> String {
    format!("device{index}.state")
}

/// A device of the running VM, as the snapshot needs it.
pub struct LiveDevice<'a> {
    /// Slot.
    pub index: usize,
    /// Backend socket.
    pub socket: String,
    /// The device.
    pub device: &'a crate::virtio::VhostUserDevice,
}

/// `manifest.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`MAGIC`].
    pub magic: String,
    /// [`FORMAT_VERSION`] of the writer.
    pub format_version: u32,
    /// The hype version that wrote it.
    pub hype_version: String,
    /// The host CPU as guests saw it.
    pub host_cpu: CpuIdentity,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
    /// vCPUs.
    pub cpus: u8,
    /// "acpi" or "mptable".
    pub platform: String,
    /// Devices of the VM.
    pub devices: Vec<DeviceRecord>,
    /// The COM1 UART.
    pub serial: crate::devices::serial::SerialState,
    /// The GED's events not yet read by the guest (bit 0: the power button, bit 1: a hot-plug
    /// slot changed), ACPI only.
    #[serde(default)]
    pub ged_events: u8,
    /// The hot-plug INSERTED register: slots whose insertion the guest has not read yet.
    #[serde(default)]
    pub hotplug_inserted: u32,
    /// Every other file, with its checksum.
    pub files: Vec<FileRecord>,
    /// When it was taken (ms since the Unix epoch).
    pub created_unix_ms: u64,
}

/// Snapshot failures, saving or restoring; each names its reason.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Snapshots are taken of paused VMs only.
    #[error("the VM is not paused")]
    NotPaused,
    /// The target directory exists and is not empty.
    #[error("{0} exists and is not empty")]
    DirNotEmpty(PathBuf),
    /// A device's rings could not be stopped.
    #[error("{name}: cannot stop its rings: {text}")]
    DeviceStop {
        /// Device.
        name: String,
        /// Why.
        text: String,
    },
    /// A `--device` given for a restore does not match the snapshot's device.
    #[error("device {index} (virtio{index}): {text}")]
    DeviceRestore {
        /// Slot.
        index: usize,
        /// Why.
        text: String,
    },
    /// A vCPU has not recorded its state (it did not park since the pause began).
    #[error("vCPU {0} has no recorded state")]
    VcpuNotCaptured(usize),
    /// A vCPU could not record its state.
    #[error("vCPU {index}: {text}")]
    VcpuCapture {
        /// vCPU.
        index: usize,
        /// The capture's error, as text (it was recorded on the vCPU's thread).
        text: String,
    },
    /// A KVM call failed.
    #[error(transparent)]
    Kvm(#[from] KvmCallError),
    /// A vCPU's restore failed.
    #[error("restoring vCPU {index}")]
    VcpuRestore {
        /// vCPU.
        index: usize,
        /// Why.
        #[source]
        source: KvmCallError,
    },
    /// Reading or writing a file of the snapshot failed.
    #[error("{path}")]
    Io {
        /// File.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Not a snapshot directory: no manifest.
    #[error("{0} is not a snapshot (no {MANIFEST})")]
    NoManifest(PathBuf),
    /// The manifest is not valid JSON of the expected shape.
    #[error("the manifest is malformed")]
    Malformed(#[source] serde_json::Error),
    /// The magic is wrong.
    #[error("the manifest's magic is {0:?}, not {MAGIC:?}")]
    BadMagic(String),
    /// Another format version.
    #[error("format version {found}; this hype reads version {FORMAT_VERSION}")]
    OtherFormat {
        /// Version found.
        found: u32,
    },
    /// Written by another hype version.
    #[error("taken by hype {found}; this is hype {ours}")]
    OtherVersion {
        /// Version found.
        found: String,
        /// This build.
        ours: &'static str,
    },
    /// Taken on a different CPU.
    #[error("taken on another CPU ({what}: snapshot {snapshot}, this host {host})")]
    OtherCpu {
        /// What differs.
        what: &'static str,
        /// The snapshot's value.
        snapshot: String,
        /// This host's.
        host: String,
    },
    /// A file is shorter (or longer) than the manifest says.
    #[error("{name} has {found} bytes, the manifest says {expected}: truncated or replaced")]
    Truncated {
        /// File.
        name: String,
        /// Manifest's length.
        expected: u64,
        /// Actual length.
        found: u64,
    },
    /// A checksum does not match.
    #[error("{name} is corrupted (CRC-32 {found:08x}, the manifest says {expected:08x})")]
    Corrupt {
        /// File.
        name: String,
        /// Recorded.
        expected: u32,
        /// Computed.
        found: u32,
    },
    /// A file the manifest needs is not listed.
    #[error("the manifest lists no {0}")]
    MissingFile(&'static str),
    /// The state file cannot be decoded.
    #[error("{STATE} is malformed")]
    State(#[source] DecodeError),
    /// The manifest's values are out of range.
    #[error("the manifest is inconsistent: {0}")]
    Inconsistent(String),
    /// The `--device`s given do not match the snapshot's devices.
    #[error("the snapshot has {snapshot} device(s), {given} given with --device")]
    DeviceMismatch {
        /// In the snapshot.
        snapshot: usize,
        /// Given.
        given: usize,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What a vCPU recorded when it last parked.
type Slot = Option<Result<VcpuState, String>>;

/// Where each vCPU thread records its state when it parks for a pause.
#[derive(Debug)]
pub struct VcpuSlots {
    msr_indices: Vec<u32>,
    slots: Vec<Mutex<Slot>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl VcpuSlots {
    /// Slots for `cpus` vCPUs, saving the MSRs in `msr_indices` (KVM_GET_MSR_INDEX_LIST).
    pub fn new(cpus: usize, msr_indices: Vec<u32>) -> Self {
        VcpuSlots {
            msr_indices,
            slots: (0..cpus).map(|_| Mutex::new(None)).collect(),
        }
    }

    /// Called on vCPU `index`'s thread as it parks.
    pub fn capture(&self, index: usize, vcpu: &mut VcpuFd) {
        let Some(slot) = self.slots.get(index) else {
            return;
        };
        let r = state::capture_vcpu(vcpu, &self.msr_indices)
            .map_err(|e| hype_base::error_chain(&e).to_string());
        if let Err(e) = &r {
            log::warn!("vCPU {index}: cannot record its state for a snapshot: {e}");
        }
        *lock(slot) = Some(r);
    }

    fn take_all(&self) -> Result<Vec<VcpuState>, SnapshotError> {
        self.slots
            .iter()
            .enumerate()
            .map(|(index, s)| match &*lock(s) {
                None => Err(SnapshotError::VcpuNotCaptured(index)),
                Some(Err(text)) => Err(SnapshotError::VcpuCapture {
                    index,
                    text: text.clone(),
                }),
                Some(Ok(v)) => Ok(v.clone()),
            })
            .collect()
    }
}

/// How long a snapshot took and how big it is.
#[derive(Clone, Copy, Debug)]
pub struct SaveSummary {
    /// Pages of guest memory written.
    pub memory_pages: u64,
    /// Bytes of guest memory written (pages × 4 KiB).
    pub memory_bytes_written: u64,
    /// Wall time.
    pub took: Duration,
}

/// What a running VM needs to snapshot itself (held by the control side).
pub struct Snapshotter {
    /// The VM.
    pub vm: Arc<VmFd>,
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// Guest memory size.
    pub memory_bytes: u64,
    /// vCPU count.
    pub cpus: u8,
    /// "acpi" or "mptable".
    pub platform: String,
    /// This host's CPU.
    pub cpu: CpuIdentity,
    /// The COM1 UART.
    pub serial: Arc<Mutex<crate::devices::serial::Serial>>,
    /// The ACPI power button (its GED events), with the `acpi` platform.
    pub power: Option<crate::devices::power::PowerButton>,
    /// The hot-plug slot registers.
    pub slots: Arc<crate::devices::hotplug::HotplugSlots>,
}

fn fsync_dir(dir: &Path) -> Result<(), SnapshotError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

fn write_file(dir: &Path, name: &str, data: &[u8]) -> Result<FileRecord, SnapshotError> {
    let path = dir.join(name);
    let mut f = File::create(&path).map_err(io_err(&path))?;
    f.write_all(data).map_err(io_err(&path))?;
    f.sync_all().map_err(io_err(&path))?;
    Ok(FileRecord {
        name: name.to_owned(),
        bytes: data.len() as u64,
        crc32: crc::crc32(data),
        pages: None,
    })
}

fn memfd_of(mem: &GuestMemoryMmap) -> Option<Arc<File>> {
    mem.iter()
        .next()
        .and_then(|r| r.file_offset())
        .map(|f| f.arc().clone())
}

impl Snapshotter {
    /// Writes a snapshot of the paused VM into `dir` (created; it must not exist, or be empty).
    /// `vcpus` holds what every vCPU recorded when it parked. Every device's rings are stopped
    /// first (the backends then leave guest memory alone) and stay stopped until the VM resumes.
    pub fn save(
        &self,
        dir: &Path,
        vcpus: &VcpuSlots,
        devices: &[LiveDevice<'_>],
    ) -> Result<SaveSummary, SnapshotError> {
        let started = Instant::now();
        let vcpu_states = vcpus.take_all()?;
        let mut records = Vec::with_capacity(devices.len());
        let mut states = Vec::new();
        for d in devices {
            let (transport, stopped) =
                d.device
                    .snapshot_stop()
                    .map_err(|text| SnapshotError::DeviceStop {
                        name: d.device.name().to_owned(),
                        text,
                    })?;
            if let Some(state) = stopped.state {
                states.push((records.len(), state));
            }
            records.push(DeviceRecord {
                index: d.index,
                kind: d.device.kind().name().to_owned(),
                socket: d.socket.clone(),
                transport,
                rings: stopped.rings,
                state: None,
            });
        }
        match std::fs::read_dir(dir) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    return Err(SnapshotError::DirNotEmpty(dir.to_owned()));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::create_dir(dir).map_err(io_err(dir))?;
            }
            Err(e) => return Err(io_err(dir)(e)),
        }
        for (at, state) in states {
            if let Some(rec) = records.get_mut(at) {
                let name = device_state_file(rec.index);
                rec.state = Some(write_file(dir, &name, &state)?);
            }
        }
        let vm_state = state::capture_vm(&self.vm)?;
        let state_rec = write_file(dir, STATE, &state::encode(&vcpu_states, &vm_state))?;

        let mem_path = dir.join(MEMORY);
        let memfd = memfd_of(&self.mem).ok_or_else(|| {
            io_err(&mem_path)(io::Error::other("guest memory is not file-backed"))
        })?;
        let out = File::create(&mem_path).map_err(io_err(&mem_path))?;
        out.set_len(self.memory_bytes).map_err(io_err(&mem_path))?;
        let pages =
            memory::copy_sparse(&memfd, &out, self.memory_bytes).map_err(io_err(&mem_path))?;
        out.sync_all().map_err(io_err(&mem_path))?;
        let mem_rec = FileRecord {
            name: MEMORY.to_owned(),
            bytes: self.memory_bytes,
            crc32: pages.crc32,
            pages: Some(pages.pages),
        };

        let manifest = Manifest {
            magic: MAGIC.to_owned(),
            format_version: FORMAT_VERSION,
            hype_version: env!("CARGO_PKG_VERSION").to_owned(),
            host_cpu: self.cpu.clone(),
            memory_bytes: self.memory_bytes,
            cpus: self.cpus,
            platform: self.platform.clone(),
            devices: records,
            serial: lock(&self.serial).save_state(),
            ged_events: self.power.as_ref().map_or(0, |p| p.pending_events()),
            hotplug_inserted: self.slots.pending_inserted(),
            files: vec![state_rec, mem_rec],
            created_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        };
        let text = serde_json::to_vec_pretty(&manifest).map_err(SnapshotError::Malformed)?;
        write_file(
            dir,
            MANIFEST_SUM,
            format!("{:08x}\n", crc::crc32(&text)).as_bytes(),
        )?;
        // The manifest goes last, under a temporary name renamed into place: a snapshot cut
        // short has no manifest and is refused as such.
        let tmp = format!("{MANIFEST}.tmp");
        write_file(dir, &tmp, &text)?;
        let final_path = dir.join(MANIFEST);
        std::fs::rename(dir.join(&tmp), &final_path).map_err(io_err(&final_path))?;
        fsync_dir(dir)?;
        for (i, v) in vcpu_states.iter().enumerate() {
            if !v.skipped_msrs.is_empty() {
                log::info!(
                    "snapshot: vCPU {i}: KVM refused to read MSRs {:x?}; they are not saved",
                    v.skipped_msrs
                );
            }
        }
        Ok(SaveSummary {
            memory_pages: pages.pages,
            memory_bytes_written: pages.pages * memory::PAGE as u64,
            took: started.elapsed(),
        })
    }
}

/// A checked snapshot, ready to be restored.
#[derive(Debug)]
pub struct Restore {
    /// Its directory.
    pub dir: PathBuf,
    /// The manifest.
    pub manifest: Manifest,
    /// Each vCPU's state.
    pub vcpus: Vec<VcpuState>,
    /// The VM-wide state.
    pub vm: VmState,
    memory: FileRecord,
}

fn read_small(path: &Path) -> Result<Vec<u8>, SnapshotError> {
    let f = File::open(path).map_err(io_err(path))?;
    let len = f.metadata().map_err(io_err(path))?.len();
    if len > MAX_SMALL_FILE {
        return Err(SnapshotError::Inconsistent(format!(
            "{} has {len} bytes",
            path.display()
        )));
    }
    std::fs::read(path).map_err(io_err(path))
}

fn check_cpu(snap: &CpuIdentity, host: &CpuIdentity) -> Result<(), SnapshotError> {
    let differ = |what, s: String, h: String| SnapshotError::OtherCpu {
        what,
        snapshot: s,
        host: h,
    };
    if snap.vendor != host.vendor {
        return Err(differ("vendor", snap.vendor.clone(), host.vendor.clone()));
    }
    if snap.signature != host.signature {
        return Err(differ(
            "family/model/stepping",
            format!("{:#x}", snap.signature),
            format!("{:#x}", host.signature),
        ));
    }
    if snap.features != host.features {
        return Err(differ(
            "CPUID features",
            format!("{:x?}", snap.features),
            format!("{:x?}", host.features),
        ));
    }
    Ok(())
}

impl Manifest {
    /// The record of `name` among [`files`](Self::files).
    pub fn file(&self, name: &'static str) -> Result<&FileRecord, SnapshotError> {
        self.files
            .iter()
            .find(|f| f.name == name)
            .ok_or(SnapshotError::MissingFile(name))
    }
}

/// Checks a manifest's text against the text of its checksum file, this hype and this host
/// (`cpu`), and its values against each other: everything [`Restore::open`] checks before it
/// looks at the other files (whose sizes it then compares with the records returned here).
pub fn check_manifest(
    text: &[u8],
    sum_text: &[u8],
    cpu: &CpuIdentity,
) -> Result<Manifest, SnapshotError> {
    let expected = std::str::from_utf8(sum_text)
        .ok()
        .and_then(|s| u32::from_str_radix(s.trim(), 16).ok())
        .ok_or_else(|| SnapshotError::Inconsistent(format!("{MANIFEST_SUM} is not a CRC-32")))?;
    let found = crc::crc32(text);
    if found != expected {
        return Err(SnapshotError::Corrupt {
            name: MANIFEST.into(),
            expected,
            found,
        });
    }
    let manifest: Manifest = serde_json::from_slice(text).map_err(SnapshotError::Malformed)?;
    if manifest.magic != MAGIC {
        return Err(SnapshotError::BadMagic(manifest.magic));
    }
    if manifest.format_version != FORMAT_VERSION {
        return Err(SnapshotError::OtherFormat {
            found: manifest.format_version,
        });
    }
    let ours = env!("CARGO_PKG_VERSION");
    if manifest.hype_version != ours {
        return Err(SnapshotError::OtherVersion {
            found: manifest.hype_version,
            ours,
        });
    }
    check_cpu(&manifest.host_cpu, cpu)?;
    if manifest.cpus == 0 || manifest.cpus > crate::vm::MAX_VCPUS {
        return Err(SnapshotError::Inconsistent(format!(
            "{} vCPUs",
            manifest.cpus
        )));
    }
    if manifest.memory_bytes < crate::memory::MIN_MEMORY
        || manifest.memory_bytes % memory::PAGE as u64 != 0
    {
        return Err(SnapshotError::Inconsistent(format!(
            "{} bytes of memory",
            manifest.memory_bytes
        )));
    }
    for (i, d) in manifest.devices.iter().enumerate() {
        if d.index != i {
            return Err(SnapshotError::Inconsistent(format!(
                "device {i} has slot {}",
                d.index
            )));
        }
        if let Some(rec) = &d.state {
            if rec.name != device_state_file(i) || rec.bytes > MAX_DEVICE_STATE {
                return Err(SnapshotError::Inconsistent(format!(
                    "device {i}'s state is {} of {} bytes",
                    rec.name, rec.bytes
                )));
            }
        }
    }
    manifest.file(STATE)?;
    let memory = manifest.file(MEMORY)?;
    if memory.bytes != manifest.memory_bytes {
        return Err(SnapshotError::Inconsistent(format!(
            "{MEMORY} of {} bytes for {} bytes of memory",
            memory.bytes, manifest.memory_bytes
        )));
    }
    Ok(manifest)
}

/// Checks `state.bin`'s bytes against the checked `manifest` (its CRC, then its records for
/// the manifest's vCPUs) and decodes them.
pub fn check_state(
    manifest: &Manifest,
    bytes: &[u8],
) -> Result<(Vec<VcpuState>, VmState), SnapshotError> {
    let rec = manifest.file(STATE)?;
    let found = crc::crc32(bytes);
    if found != rec.crc32 {
        return Err(SnapshotError::Corrupt {
            name: STATE.into(),
            expected: rec.crc32,
            found,
        });
    }
    state::decode(bytes, usize::from(manifest.cpus)).map_err(SnapshotError::State)
}

impl Restore {
    /// Reads and checks the snapshot in `dir` against this hype and this host (`cpu`): nothing
    /// of the VM exists yet, and nothing is touched if this fails.
    pub fn open(dir: &Path, cpu: &CpuIdentity) -> Result<Restore, SnapshotError> {
        let mpath = dir.join(MANIFEST);
        if !mpath.exists() {
            return Err(SnapshotError::NoManifest(dir.to_owned()));
        }
        let text = read_small(&mpath)?;
        let sum_path = dir.join(MANIFEST_SUM);
        let sum_text = read_small(&sum_path)?;
        let manifest = check_manifest(&text, &sum_text, cpu)?;
        let sizes = manifest
            .devices
            .iter()
            .filter_map(|d| d.state.as_ref())
            .chain([manifest.file(STATE)?, manifest.file(MEMORY)?]);
        for rec in sizes {
            let path = dir.join(&rec.name);
            let found = std::fs::metadata(&path).map_err(io_err(&path))?.len();
            if found != rec.bytes {
                return Err(SnapshotError::Truncated {
                    name: rec.name.clone(),
                    expected: rec.bytes,
                    found,
                });
            }
        }
        let memory = manifest.file(MEMORY)?.clone();
        let state_bytes = read_small(&dir.join(STATE))?;
        let (vcpus, vm) = check_state(&manifest, &state_bytes)?;
        Ok(Restore {
            dir: dir.to_owned(),
            manifest,
            vcpus,
            vm,
            memory,
        })
    }

    /// `cfg` with what the snapshot fixes (memory, vCPUs, platform); refuses `--device`s
    /// that do not match the snapshot's devices.
    pub fn config_for(
        &self,
        cfg: &crate::vm::VmConfig,
    ) -> Result<crate::vm::VmConfig, SnapshotError> {
        if cfg.devices.len() != self.manifest.devices.len() {
            return Err(SnapshotError::DeviceMismatch {
                snapshot: self.manifest.devices.len(),
                given: cfg.devices.len(),
            });
        }
        let mut out = cfg.clone();
        out.memory = self.manifest.memory_bytes;
        out.cpus = self.manifest.cpus;
        out.platform = self
            .manifest
            .platform
            .parse()
            .map_err(SnapshotError::Inconsistent)?;
        Ok(out)
    }

    /// The guest memory of the snapshot in a fresh memfd, its checksum verified.
    pub fn memory(&self) -> Result<GuestMemoryMmap, crate::vm::VmmError> {
        let mem = crate::memory::create_guest_memory(self.manifest.memory_bytes)?;
        let path = self.dir.join(MEMORY);
        let memfd = memfd_of(&mem)
            .ok_or_else(|| io_err(&path)(io::Error::other("guest memory is not file-backed")))?;
        let src = File::open(&path).map_err(io_err(&path))?;
        let got =
            memory::copy_sparse(&src, &memfd, self.manifest.memory_bytes).map_err(io_err(&path))?;
        if got.crc32 != self.memory.crc32 || Some(got.pages) != self.memory.pages {
            return Err(SnapshotError::Corrupt {
                name: MEMORY.into(),
                expected: self.memory.crc32,
                found: got.crc32,
            }
            .into());
        }
        Ok(mem)
    }

    /// Puts device `index`'s saved state into `dev` (just attached to the backend given for it)
    /// and starts its rings where the guest's used rings stand; refuses a backend of another
    /// kind or one that cannot carry the guest's setup.
    pub fn restore_device(
        &self,
        index: usize,
        dev: &crate::virtio::VhostUserDevice,
    ) -> Result<(), SnapshotError> {
        let bad = |text: String| SnapshotError::DeviceRestore { index, text };
        let rec = self
            .manifest
            .devices
            .get(index)
            .ok_or_else(|| bad("not in the snapshot".into()))?;
        if rec.kind != dev.kind().name() {
            return Err(bad(format!(
                "the snapshot has a {} device here, the backend given is {}",
                rec.kind,
                dev.kind().name()
            )));
        }
        dev.restore(&rec.transport).map_err(bad)?;
        if let Some(file) = &rec.state {
            let path = self.dir.join(&file.name);
            let data = std::fs::read(&path).map_err(io_err(&path))?;
            let found = crc::crc32(&data);
            if found != file.crc32 || data.len() as u64 != file.bytes {
                return Err(SnapshotError::Corrupt {
                    name: file.name.clone(),
                    expected: file.crc32,
                    found,
                });
            }
            let bytes = data.len();
            dev.load_state(data)
                .map_err(|text| bad(format!("the backend refused its saved state: {text}")))?;
            log::info!(
                "restore: {}: backend state loaded ({bytes} bytes)",
                dev.name()
            );
        }
        log::info!(
            "restore: {} (was {}): rings resume at used {:?}",
            dev.name(),
            rec.socket,
            rec.rings
                .iter()
                .map(|r| (r.queue, r.used))
                .collect::<Vec<_>>()
        );
        Ok(())
    }

    /// Restores vCPU `index` into `vcpu` (created with its CPUID set).
    pub fn restore_vcpu(
        &self,
        vcpu: &VcpuFd,
        index: usize,
        xsave_fits: bool,
    ) -> Result<(), SnapshotError> {
        let s = self
            .vcpus
            .get(index)
            .ok_or(SnapshotError::VcpuNotCaptured(index))?;
        let notes = state::restore_vcpu(vcpu, s, xsave_fits)
            .map_err(|source| SnapshotError::VcpuRestore { index, source })?;
        if !notes.refused_msrs.is_empty() {
            log::info!(
                "restore: vCPU {index}: KVM refused MSRs {:x?}; they keep their reset values",
                notes.refused_msrs
            );
        }
        for what in notes.refused {
            log::warn!("restore: vCPU {index}: KVM refused {what}; that state is lost");
        }
        Ok(())
    }
}
