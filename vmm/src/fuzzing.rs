//! Entry points for the fuzz targets in `fuzz/` (hidden from the docs; no stability promise).
//!
//! [`acpi_registers`] drives the port-I/O devices the guest's ACPI code talks to (the power
//! device with the GED event port, the hot-plug slot registers) against a model of what they
//! must answer; [`snapshot_files`] feeds a snapshot's manifest, `state.bin` and `memory.bin`
//! to the checks a restore runs. A panic here is a bug found.

use std::ffi::CStr;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::devices::hotplug::{
    HotplugSlots, EJECT, HOTPLUG_PORTS, HOTPLUG_PORT_BASE, INSERTED, MAX_SLOTS, PRESENT, REMOVE,
};
use crate::devices::pio::{PioBus, PioOutcome};
use crate::devices::power::{
    PowerButton, PowerDevice, GED_EVENT_HOTPLUG, GED_EVENT_PORT, GED_EVENT_POWER_BUTTON,
    POWER_PORTS, POWER_PORT_BASE, RESET_PORT, RESET_VALUE, S5_SLP_TYP, SLEEP_CONTROL_PORT, SLP_EN,
};
use crate::devices::serial::{Serial, INPUT_CAPACITY};
use crate::devices::IrqLine;
use crate::snapshot::{self, crc::Crc32, memory, state, CpuIdentity, Manifest, STATE};
use crate::virtio::mmio::{DeviceModel, MmioTransport};

/// An interrupt line that counts.
struct Counted(Arc<AtomicU64>);

impl IrqLine for Counted {
    fn trigger(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// The registers of one VM as the guest reaches them, with the host's handles.
struct Acpi {
    pio: PioBus,
    slots: Arc<HotplugSlots>,
    button: PowerButton,
    ged_irqs: Arc<AtomicU64>,
}

impl Acpi {
    /// A VM's devices wired as `vm::run_with` wires them, with `boot` slots present.
    fn new(boot: u32) -> Acpi {
        let button = PowerButton::new();
        let slots = Arc::new(HotplugSlots::new());
        slots.set_notifier(Box::new(button.hotplug_line()));
        for s in (0..MAX_SLOTS).filter(|s| boot & (1 << s) != 0) {
            slots.set_boot_present(s);
        }
        let ged_irqs = Arc::new(AtomicU64::new(0));
        let serial = Serial::new(
            Box::new(std::io::sink()),
            Box::new(Counted(Arc::new(AtomicU64::new(0)))),
        );
        let pio = PioBus::new(Arc::new(Mutex::new(serial)), Instant::now())
            .with_hotplug(slots.clone())
            .with_power(PowerDevice::new(
                button.clone(),
                Box::new(Counted(ged_irqs.clone())),
            ));
        Acpi {
            pio,
            slots,
            button,
            ged_irqs,
        }
    }
}

/// What the registers must hold.
#[derive(Clone, Copy, Debug, Default)]
struct Model {
    present: u32,
    inserted: u32,
    remove: u32,
    ejected: u32,
    ged: u8,
    ged_irqs: u64,
}

fn bit(slot: usize) -> u32 {
    if slot < MAX_SLOTS {
        1 << slot
    } else {
        0
    }
}

/// `reg`'s value, clearing the byte at `shift` (a read of a read-to-clear register).
fn take_byte(reg: &mut u32, shift: usize) -> u32 {
    let v = *reg;
    *reg &= !(0xff << shift);
    v
}

impl Model {
    /// The bytes a guest read of `len` bytes at `port` returns (ports of no device here read
    /// as all ones).
    fn read(&mut self, port: u16, len: usize) -> Vec<u8> {
        let hotplug = HOTPLUG_PORT_BASE..HOTPLUG_PORT_BASE + HOTPLUG_PORTS;
        let power = POWER_PORT_BASE..POWER_PORT_BASE + POWER_PORTS;
        (0..len)
            .map(|i| {
                if hotplug.contains(&port) {
                    // The block serves the whole access; bytes past it read as zero.
                    let off = usize::from(port - HOTPLUG_PORT_BASE) + i;
                    let (reg, shift) = (off / 4 * 4, off % 4 * 8);
                    let value = match u16::try_from(reg) {
                        Ok(PRESENT) => self.present,
                        Ok(INSERTED) => take_byte(&mut self.inserted, shift),
                        Ok(REMOVE) => take_byte(&mut self.remove, shift),
                        _ => 0,
                    };
                    (value >> shift) as u8
                } else if power.contains(&port) {
                    match port.checked_add(i as u16) {
                        Some(GED_EVENT_PORT) => std::mem::take(&mut self.ged),
                        Some(p) if power.contains(&p) => 0,
                        _ => 0xff,
                    }
                } else {
                    0xff
                }
            })
            .collect()
    }

    /// What a guest write of `data` at `port` must end in.
    fn write(&mut self, port: u16, data: &[u8]) -> PioOutcome {
        if port == HOTPLUG_PORT_BASE + EJECT {
            if let Some(&slot) = data.first() {
                // Only a present slot can be ejected.
                if self.present & bit(usize::from(slot)) != 0 {
                    self.ejected |= bit(usize::from(slot));
                }
            }
            return PioOutcome::Continue;
        }
        if !(POWER_PORT_BASE..POWER_PORT_BASE + POWER_PORTS).contains(&port) {
            return PioOutcome::Continue;
        }
        for (i, &v) in data.iter().enumerate() {
            match port.checked_add(i as u16) {
                Some(SLEEP_CONTROL_PORT) if v & SLP_EN != 0 && (v >> 2) & 7 == S5_SLP_TYP => {
                    return PioOutcome::PowerOff
                }
                Some(RESET_PORT) if v == RESET_VALUE => return PioOutcome::Reset,
                _ => {}
            }
        }
        PioOutcome::Continue
    }

    /// The host hot-plugs a device into `slot`.
    fn insert(&mut self, slot: usize) {
        let b = bit(slot);
        self.present |= b;
        self.inserted |= b;
        self.remove &= !b;
        self.ejected &= !b;
        self.notify();
    }

    /// The host asks the guest to release `slot`.
    fn request_removal(&mut self, slot: usize) {
        self.remove |= bit(slot);
        self.ejected &= !bit(slot);
        self.notify();
    }

    fn notify(&mut self) {
        self.ged |= GED_EVENT_HOTPLUG;
        self.ged_irqs += 1;
    }

    /// The host's wait for an eject of `slot`, already past its timeout.
    fn wait_ejected(&mut self, slot: usize) -> bool {
        let b = bit(slot);
        if self.ejected & b != 0 {
            self.ejected &= !b;
            self.present &= !b;
            self.inserted &= !b;
            true
        } else {
            self.remove &= !b;
            false
        }
    }

    /// The host's wait for `slot` to be ejected or released (`released`), past its timeout.
    fn wait_released(&mut self, slot: usize, released: bool) -> bool {
        let b = bit(slot);
        let done = self.ejected & b != 0 || released;
        if self.ejected & b != 0 {
            self.ejected &= !b;
        }
        if done {
            self.present &= !b;
            self.inserted &= !b;
        }
        self.remove &= !b;
        done
    }
}

/// Guest port accesses, any port around the ACPI devices (0x5f0-0x62f, and the top of the
/// port space), any width (0-8 bytes) and value, interleaved with what the host does (hot-plug,
/// removal requests and their waits, the power button, a snapshot and restore). Each input
/// op is 7 bytes: kind and width, port or slot (2), value (4); the first 4 bytes are the boot
/// slots. Checks every byte read against a model of the registers (a read never shows a slot
/// that is not present, an insertion or removal not made, a GED event not raised, bits past a
/// register), every write's outcome (only S5 powers off, only the reset value resets), that
/// ejects only take slots that were present, that INSERTED stays within PRESENT, and that the
/// GED interrupt is raised exactly once per event and never by a restore.
pub fn acpi_registers(data: &[u8]) {
    let (boot, ops) = match data.split_first_chunk::<4>() {
        Some((b, rest)) => (u32::from_le_bytes(*b), rest),
        None => (0, &[][..]),
    };
    let mut acpi = Acpi::new(boot);
    let mut m = Model {
        present: boot,
        ..Model::default()
    };
    for op in ops.chunks_exact(7) {
        let arg = u16::from_le_bytes([op[1], op[2]]);
        let value = [op[3], op[4], op[5], op[6]];
        let len = [1usize, 2, 4, 1, 2, 4, 3, 8, 0, 1, 2, 4, 5, 6, 7, 4][usize::from(op[0] >> 4)];
        let port = if op[0] & 8 == 0 {
            0x5f0 + (arg & 0x3f)
        } else {
            0xfff8 | (arg & 7)
        };
        let slot = usize::from(op[1] % 40);
        match op[0] & 7 {
            0 | 1 => {
                let mut buf = [0u8; 8];
                acpi.pio.read(port, &mut buf[..len]);
                let want = m.read(port, len);
                assert_eq!(&buf[..len], &want[..], "read of {len} at {port:#x}");
            }
            2 | 3 => {
                let mut bytes = [0u8; 8];
                bytes[..4].copy_from_slice(&value);
                bytes[4..].copy_from_slice(&value);
                let out = acpi.pio.write(port, &bytes[..len]);
                assert_eq!(out, m.write(port, &bytes[..len]), "write at {port:#x}");
            }
            4 => {
                if op[3] & 1 == 0 {
                    acpi.slots.insert(slot);
                    m.insert(slot);
                } else {
                    acpi.slots.request_removal(slot);
                    m.request_removal(slot);
                }
            }
            5 => {
                let got = if op[3] & 1 == 0 {
                    let got = acpi.slots.wait_ejected(slot, Duration::ZERO);
                    assert_eq!(got, m.wait_ejected(slot), "wait_ejected({slot})");
                    got
                } else {
                    let released = op[3] & 2 != 0;
                    let got =
                        acpi.slots
                            .wait_released(slot, Duration::ZERO, Duration::ZERO, || released);
                    assert_eq!(got, m.wait_released(slot, released), "wait_released");
                    got
                };
                if got {
                    assert_eq!(acpi.slots.present() & bit(slot), 0, "released but present");
                }
            }
            6 => {
                assert!(acpi.button.press().is_ok(), "the button is attached");
                m.ged |= GED_EVENT_POWER_BUTTON;
                m.ged_irqs += 1;
            }
            _ => {
                // A snapshot and a restore into a fresh VM: what the snapshot keeps (PRESENT
                // as the devices attached, INSERTED, the GED events) reads the same, with no
                // new interrupt; a removal request in flight is not kept.
                let (present, inserted, events) = (
                    acpi.slots.present(),
                    acpi.slots.pending_inserted(),
                    acpi.button.pending_events(),
                );
                acpi = Acpi::new(present);
                acpi.slots.restore_inserted(inserted);
                acpi.button.restore_events(events);
                m.remove = 0;
                m.ejected = 0;
                m.ged_irqs = 0;
            }
        }
        assert_eq!(acpi.slots.present(), m.present, "PRESENT");
        let inserted = acpi.slots.pending_inserted();
        assert_eq!(inserted, m.inserted, "INSERTED");
        assert_eq!(inserted & !m.present, 0, "INSERTED outside PRESENT");
        assert_eq!(acpi.button.pending_events(), m.ged, "GED events");
        assert_eq!(acpi.ged_irqs.load(Ordering::SeqCst), m.ged_irqs, "GED IRQs");
    }
}

/// The host CPU of [`snapshot_files`]' manifests (and of the seeds in `fuzz/corpus`).
pub fn fuzz_cpu() -> CpuIdentity {
    CpuIdentity {
        vendor: "GenuineIntel".into(),
        signature: 0x806f8,
        features: [
            0x7ffa_fbff,
            0xbfeb_fbff,
            0xf1bf_07ab,
            0x1b40_5f4e,
            0xffdc_4432,
        ],
    }
}

/// Splits the next part off `data`: a u16 length, then that many bytes (or what is left).
fn part<'a>(data: &mut &'a [u8]) -> &'a [u8] {
    let Some((len, rest)) = data.split_first_chunk::<2>() else {
        return std::mem::take(data);
    };
    let len = usize::from(u16::from_le_bytes(*len)).min(rest.len());
    let (p, rest) = rest.split_at(len);
    *data = rest;
    p
}

/// A snapshot's files from the input: a flags byte, then `manifest.json`, `state.bin` and
/// `memory.bin`, each a u16 length and its bytes. Flag bit 0 writes `manifest.crc32` and the
/// state's CRC as the saver would, so that the checks behind them are reached; bits 1-3 are
/// the vCPU count `state.bin` alone is also decoded for; bit 4 pads `memory.bin` to whole
/// pages. Runs the manifest checks, the state decoder, the register files and UART a restore
/// loads from the manifest, and the sparse memory copy. Checks: nothing panics or allocates
/// by a length field; an accepted manifest survives a JSON round trip and its limits hold;
/// decoded state encodes to what decodes the same again and is no longer than its input; a
/// restored register file saves what was restored; the memory copy mirrors its source and
/// counts and checksums exactly its non-zero pages.
pub fn snapshot_files(data: &[u8]) {
    let Some((&flags, mut rest)) = data.split_first() else {
        return;
    };
    let text = part(&mut rest);
    let state_bytes = part(&mut rest);
    let memory_bytes = part(&mut rest);

    // state.bin on its own, for a vCPU count of the input's choosing.
    let cpus = usize::from(flags >> 1 & 7) + 1;
    if let Ok(decoded) = state::decode(state_bytes, cpus) {
        state_round_trip(state_bytes, &decoded, cpus);
    }

    let sum = if flags & 1 != 0 {
        format!("{:08x}\n", snapshot::crc::crc32(text))
    } else {
        String::from_utf8_lossy(rest).into_owned()
    };
    if let Ok(mut manifest) = snapshot::check_manifest(text, sum.as_bytes(), &fuzz_cpu()) {
        manifest_accepted(&manifest);
        if flags & 1 != 0 {
            if let Some(f) = manifest.files.iter_mut().find(|f| f.name == STATE) {
                f.crc32 = snapshot::crc::crc32(state_bytes);
            }
        }
        if let Ok(decoded) = snapshot::check_state(&manifest, state_bytes) {
            assert_eq!(decoded.0.len(), usize::from(manifest.cpus));
            state_round_trip(state_bytes, &decoded, usize::from(manifest.cpus));
        }
    }

    memory_copy(memory_bytes, flags & 0x10 != 0);
}

fn state_round_trip(input: &[u8], (vcpus, vm): &(Vec<state::VcpuState>, state::VmState), n: usize) {
    assert_eq!(vcpus.len(), n);
    assert_eq!(vm.irqchips.len(), 3);
    let bytes = state::encode(vcpus, vm);
    // One record per kind and vCPU, each as long as the input's last one of its kind.
    assert!(bytes.len() <= input.len(), "re-encoded state grew");
    let (v2, vm2) =
        state::decode(&bytes, n).unwrap_or_else(|e| panic!("re-encoded state decodes: {e}"));
    assert_eq!(
        state::encode(&v2, &vm2),
        bytes,
        "re-encoded state is not stable"
    );
}

fn manifest_accepted(manifest: &Manifest) {
    assert!(manifest.cpus >= 1 && manifest.cpus <= crate::vm::MAX_VCPUS);
    assert!(manifest.memory_bytes >= crate::memory::MIN_MEMORY);
    let text =
        serde_json::to_vec_pretty(manifest).unwrap_or_else(|e| panic!("a manifest encodes: {e}"));
    let back: Manifest = serde_json::from_slice(&text)
        .unwrap_or_else(|e| panic!("an encoded manifest decodes: {e}"));
    assert_eq!(&back, manifest, "manifest JSON round trip");

    // The UART a restore loads.
    let mut serial = Serial::new(
        Box::new(std::io::sink()),
        Box::new(Counted(Arc::new(AtomicU64::new(0)))),
    );
    serial.restore_state(&manifest.serial);
    let saved = serial.save_state();
    assert!(saved.rx.len() <= INPUT_CAPACITY);
    assert!(manifest.serial.rx.starts_with(&saved.rx));
    assert_eq!(saved.ier & !0x0f, 0);

    // Each device's register file, restored into a transport of the model it records.
    for d in &manifest.devices {
        let t = &d.transport;
        if t.num_queues > 1024 {
            continue;
        }
        let mut mmio = MmioTransport::new(DeviceModel {
            device_id: t.device_id,
            features: t.device_features,
            num_queues: t.num_queues,
            queue_max: t.queue_max,
            config: vec![0; t.config.len()],
            writable_config: Vec::new(),
            vring_interrupt_always: true,
        });
        let Ok(activation) = mmio.restore_state(t) else {
            continue;
        };
        // A device restored active starts only rings a guest could have started.
        for q in activation.iter().flat_map(|a| &a.queues) {
            let c = &q.config;
            assert!(
                c.ready && c.size.is_power_of_two() && c.size <= t.queue_max,
                "{c:?}"
            );
        }
        assert_eq!(
            &mmio.save_state(),
            t,
            "a restored register file saves the same"
        );
        let _ = mmio.restored_activation();
        // The guest reads every register of the restored file.
        for off in (0..0x100 + t.config.len() as u64 + 8).step_by(4) {
            let mut b = [0u8; 4];
            mmio.read(off, &mut b);
        }
    }
}

/// Copies `bytes` as a memory file (padded to whole pages when `pad`) the way a restore does
/// and checks the copy and its summary against the bytes themselves.
fn memory_copy(bytes: &[u8], pad: bool) {
    const NAME: &CStr = c"hype-fuzz-memory";
    let page = memory::PAGE;
    let size = if pad {
        bytes.len().div_ceil(page) * page
    } else {
        bytes.len()
    };
    let (Ok(src), Ok(dst)) = (
        hype_base::memfd::create_sealed(NAME, size as u64),
        hype_base::memfd::create_sealed(NAME, size as u64),
    ) else {
        return;
    };
    if src.write_all_at(bytes, 0).is_err() {
        return;
    }
    let got = memory::copy_sparse(&src, &dst, size as u64)
        .unwrap_or_else(|e| panic!("copying a memfd: {e}"));
    let mut image = bytes.to_vec();
    image.resize(size, 0);
    let mut crc = Crc32::new();
    let mut pages = 0;
    for (i, p) in image.chunks(page).enumerate() {
        if p.iter().any(|b| *b != 0) {
            crc.update(&((i * page) as u64).to_le_bytes());
            crc.update(p);
            pages += 1;
        }
    }
    assert_eq!(got.pages, pages, "non-zero pages");
    assert_eq!(got.crc32, crc.finish(), "memory checksum");
    let mut back = vec![0u8; size];
    dst.read_exact_at(&mut back, 0)
        .unwrap_or_else(|e| panic!("reading the copy: {e}"));
    assert_eq!(back, image, "the copy mirrors its source");
}

/// One [`acpi_registers`] op: `kind` (0-7), width index, port offset or slot, value.
fn acpi_op(kind: u8, width: u8, arg: u16, value: u32) -> [u8; 7] {
    let mut op = [0u8; 7];
    op[0] = kind | width << 4;
    op[1..3].copy_from_slice(&arg.to_le_bytes());
    op[3..].copy_from_slice(&value.to_le_bytes());
    op
}

/// Seed inputs for the `acpi_registers` target (`fuzz/corpus/acpi_registers/`).
pub fn acpi_seeds() -> Vec<(&'static str, Vec<u8>)> {
    // Width indices: 0 one byte, 1 two, 2 four, 7 eight. Port args are offsets from 0x5f0.
    let (read, write, host, wait, press, snap) = (0, 2, 4, 5, 6, 7);
    let hp = |reg: u16| HOTPLUG_PORT_BASE + reg - 0x5f0;
    let pw = |port: u16| port - 0x5f0;
    let seq = |boot: u32, ops: &[[u8; 7]]| {
        let mut v = boot.to_le_bytes().to_vec();
        for op in ops {
            v.extend_from_slice(op);
        }
        v
    };
    vec![
        (
            "hotplug-eject",
            seq(
                0b1,
                &[
                    acpi_op(host, 0, 3, 0),
                    acpi_op(read, 0, pw(GED_EVENT_PORT), 0),
                    acpi_op(read, 2, hp(PRESENT), 0),
                    acpi_op(read, 2, hp(INSERTED), 0),
                    acpi_op(host, 0, 3, 1),
                    acpi_op(read, 2, hp(REMOVE), 0),
                    acpi_op(write, 2, hp(EJECT), 3),
                    acpi_op(wait, 0, 3, 0),
                    acpi_op(read, 2, hp(PRESENT), 0),
                ],
            ),
        ),
        (
            "release-by-driver",
            seq(
                0b11,
                &[
                    acpi_op(host, 0, 5, 0),
                    acpi_op(host, 0, 5, 1),
                    acpi_op(wait, 0, 5, 3),
                    acpi_op(read, 1, hp(INSERTED) + 1, 0),
                    acpi_op(write, 0, hp(EJECT), 9),
                ],
            ),
        ),
        (
            "power-button-s5",
            seq(
                0,
                &[
                    acpi_op(press, 0, 0, 0),
                    acpi_op(read, 0, pw(GED_EVENT_PORT), 0),
                    acpi_op(write, 0, pw(SLEEP_CONTROL_PORT), u32::from(S5_SLP_TYP << 2)),
                    acpi_op(
                        write,
                        0,
                        pw(SLEEP_CONTROL_PORT),
                        u32::from(S5_SLP_TYP << 2 | SLP_EN),
                    ),
                ],
            ),
        ),
        (
            "reset-wide",
            seq(
                0,
                &[
                    acpi_op(write, 2, pw(POWER_PORT_BASE), u32::from(RESET_VALUE) << 16),
                    acpi_op(read, 7, pw(POWER_PORT_BASE), 0),
                    acpi_op(read, 7, hp(0xc), 0),
                ],
            ),
        ),
        (
            "snapshot-restore",
            seq(
                0b101,
                &[
                    acpi_op(host, 0, 1, 0),
                    acpi_op(press, 0, 0, 0),
                    acpi_op(snap, 0, 0, 0),
                    acpi_op(read, 0, pw(GED_EVENT_PORT), 0),
                    acpi_op(read, 2, hp(INSERTED), 0),
                ],
            ),
        ),
    ]
}

/// A `state.bin` of `cpus` vCPUs as the saver encodes it (`extras`: the optional records).
fn seed_state(cpus: usize, extras: bool) -> Vec<u8> {
    let vcpus: Vec<_> = (0..cpus)
        .map(|i| {
            let mut v = state::VcpuState::default();
            v.regs.rip = 0x100_0000 + i as u64;
            v.regs.rflags = 2;
            v.sregs.cr0 = 0x8000_0011;
            v.fpu.fcw = 0x37f;
            v.fpu.mxcsr = 0x1f80;
            v.msrs = [0x10, 0x1b, 0xc000_0080]
                .into_iter()
                .map(|index| kvm_bindings::kvm_msr_entry {
                    index,
                    data: u64::from(index) * 3,
                    ..Default::default()
                })
                .collect();
            v.mp_state.mp_state = u32::from(i != 0);
            if extras {
                v.xcrs = Some(kvm_bindings::kvm_xcrs::default());
                v.debugregs = Some(kvm_bindings::kvm_debugregs::default());
            }
            v
        })
        .collect();
    let vm = state::VmState {
        irqchips: (0..3)
            .map(|chip_id| kvm_bindings::kvm_irqchip {
                chip_id,
                ..Default::default()
            })
            .collect(),
        clock: kvm_bindings::kvm_clock_data {
            clock: 123_456_789,
            ..Default::default()
        },
        ..Default::default()
    };
    state::encode(&vcpus, &vm)
}

/// A manifest as the saver writes it, for `cpus` vCPUs and this `state.bin`.
fn seed_manifest(cpus: u8, state_bytes: &[u8], pretty: bool) -> Vec<u8> {
    let mut transport = MmioTransport::new(DeviceModel {
        device_id: 2,
        features: 1 << 32 | 1 << 9,
        num_queues: 1,
        queue_max: 256,
        config: vec![0x11; 8],
        writable_config: Vec::new(),
        vring_interrupt_always: true,
    });
    // The guest's setup: ACKNOWLEDGE | DRIVER, queue 0 of 128 entries.
    transport.write(crate::virtio::mmio::reg::STATUS, &3u32.to_le_bytes());
    transport.write(crate::virtio::mmio::reg::QUEUE_NUM, &128u32.to_le_bytes());
    let mut serial = Serial::new(
        Box::new(std::io::sink()),
        Box::new(Counted(Arc::new(AtomicU64::new(0)))),
    );
    serial.write(3, 0x03);
    let manifest = Manifest {
        magic: snapshot::MAGIC.into(),
        format_version: snapshot::FORMAT_VERSION,
        hype_version: env!("CARGO_PKG_VERSION").into(),
        host_cpu: fuzz_cpu(),
        memory_bytes: crate::memory::MIN_MEMORY,
        cpus,
        platform: "acpi".into(),
        devices: vec![snapshot::DeviceRecord {
            index: 0,
            kind: "blk".into(),
            socket: "/run/blk.sock".into(),
            transport: transport.save_state(),
            rings: vec![crate::virtio::worker::RingPosition {
                queue: 0,
                next_avail: 7,
                used: 7,
            }],
            state: None,
        }],
        serial: serial.save_state(),
        ged_events: GED_EVENT_POWER_BUTTON,
        hotplug_inserted: 0,
        files: vec![
            snapshot::FileRecord {
                name: STATE.into(),
                bytes: state_bytes.len() as u64,
                crc32: snapshot::crc::crc32(state_bytes),
                pages: None,
            },
            snapshot::FileRecord {
                name: snapshot::MEMORY.into(),
                bytes: crate::memory::MIN_MEMORY,
                crc32: 0x1234_5678,
                pages: Some(2),
            },
        ],
        created_unix_ms: 1_700_000_000_000,
    };
    let text = if pretty {
        serde_json::to_vec_pretty(&manifest)
    } else {
        serde_json::to_vec(&manifest)
    };
    text.unwrap_or_else(|e| panic!("a manifest encodes: {e}"))
}

/// A [`snapshot_files`] input: flags, then the three parts, then `rest`.
fn snapshot_input(
    flags: u8,
    manifest: &[u8],
    state_bytes: &[u8],
    mem: &[u8],
    rest: &[u8],
) -> Vec<u8> {
    let mut v = vec![flags];
    for p in [manifest, state_bytes, mem] {
        v.extend_from_slice(&(p.len() as u16).to_le_bytes());
        v.extend_from_slice(p);
    }
    v.extend_from_slice(rest);
    v
}

/// Seed inputs for the `snapshot_files` target (`fuzz/corpus/snapshot_files/`), each within
/// the 8 KiB `scripts/fuzz` gives an input.
pub fn snapshot_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut mem = vec![0u8; memory::PAGE + 100];
    mem[5] = 0xaa;
    mem[memory::PAGE + 99] = 0x55;
    let one = seed_state(1, false);
    let two = seed_state(2, false);
    let pretty = seed_manifest(1, &one, true);
    let sum = format!("{:08x}\n", snapshot::crc::crc32(&pretty));
    vec![
        // As the saver writes them, with manifest.crc32 as the rest of the input.
        (
            "saved-1cpu",
            snapshot_input(0, &pretty, &one, &mem[..200], sum.as_bytes()),
        ),
        (
            "saved-2cpu-compact",
            snapshot_input(1, &seed_manifest(2, &two, false), &two, &[], &[]),
        ),
        (
            "state-extras",
            snapshot_input(1 << 1, &[], &seed_state(2, true), &[], &[]),
        ),
        ("memory-pages", snapshot_input(1 << 4, &[], &[], &mem, &[])),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acpi_seeds_pass_the_model() {
        for (_, input) in acpi_seeds() {
            acpi_registers(&input);
        }
    }

    #[test]
    fn snapshot_seeds_are_accepted() {
        for (name, input) in snapshot_seeds() {
            assert!(input.len() <= 8192, "{name}: {} bytes", input.len());
            snapshot_files(&input);
        }
        let one = seed_state(1, false);
        let text = seed_manifest(1, &one, true);
        let sum = format!("{:08x}\n", snapshot::crc::crc32(&text));
        let m = snapshot::check_manifest(&text, sum.as_bytes(), &fuzz_cpu()).unwrap();
        let (vcpus, _) = snapshot::check_state(&m, &one).unwrap();
        assert_eq!(vcpus[0].regs.rip, 0x100_0000);
        // The state re-encodes to its own bytes.
        let (v, vm) = state::decode(&one, 1).unwrap();
        assert_eq!(state::encode(&v, &vm), one);
        let two = seed_state(2, true);
        let (v, vm) = state::decode(&two, 2).unwrap();
        assert_eq!(state::encode(&v, &vm), two);
        // Another checksum text, another CPU: refused.
        assert!(snapshot::check_manifest(&text, b"0\n", &fuzz_cpu()).is_err());
        let other = CpuIdentity {
            signature: 1,
            ..fuzz_cpu()
        };
        assert!(matches!(
            snapshot::check_manifest(&text, sum.as_bytes(), &other),
            Err(snapshot::SnapshotError::OtherCpu { .. })
        ));
    }

    /// Writes the seeds into `fuzz/corpus/` (run it by name with `--ignored` after changing
    /// them, or when the hype version changes: a manifest names its hype version).
    #[test]
    #[ignore = "writes the fuzz seed corpus"]
    fn write_fuzz_seeds() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
        for (target, seeds) in [
            ("acpi_registers", acpi_seeds()),
            ("snapshot_files", snapshot_seeds()),
        ] {
            let dir = root.join(target);
            std::fs::create_dir_all(&dir).unwrap();
            for (name, input) in seeds {
                std::fs::write(dir.join(name), input).unwrap();
            }
        }
    }
}
