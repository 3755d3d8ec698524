//! The KVM state of a VM that a snapshot keeps, gathered and put back through KVM's ioctls, and
//! its encoding in `state.bin`: a sequence of records `kind: u16, index: u16, len: u32` (little
//! endian) followed by `len` bytes, each the kernel's own structure for that ioctl (the KVM ABI,
//! stable across kernels), as `docs/snapshot.md` lists.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{VcpuFd, VmFd};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// Record kinds of `state.bin`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    /// `kvm_regs` (KVM_GET_REGS).
    Regs = 1,
    /// `kvm_sregs`.
    Sregs = 2,
    /// `kvm_fpu`.
    Fpu = 3,
    /// `kvm_xsave` (4 KiB legacy layout).
    Xsave = 4,
    /// `kvm_xcrs`.
    Xcrs = 5,
    /// `kvm_debugregs`.
    DebugRegs = 6,
    /// `kvm_lapic_state`.
    Lapic = 7,
    /// `kvm_msr_entry` array.
    Msrs = 8,
    /// `kvm_vcpu_events`.
    Events = 9,
    /// `kvm_mp_state`.
    MpState = 10,
    /// `kvm_irqchip` of the master PIC (index 0), the slave PIC (1), the IOAPIC (2).
    Irqchip = 16,
    /// `kvm_pit_state2`.
    Pit = 17,
    /// `kvm_clock_data`.
    Clock = 18,
}

impl Kind {
    fn from_u16(v: u16) -> Option<Kind> {
        Some(match v {
            1 => Kind::Regs,
            2 => Kind::Sregs,
            3 => Kind::Fpu,
            4 => Kind::Xsave,
            5 => Kind::Xcrs,
            6 => Kind::DebugRegs,
            7 => Kind::Lapic,
            8 => Kind::Msrs,
            9 => Kind::Events,
            10 => Kind::MpState,
            16 => Kind::Irqchip,
            17 => Kind::Pit,
            18 => Kind::Clock,
            _ => return None,
        })
    }
}

/// A KVM call that failed while gathering or restoring state.
#[derive(Debug, thiserror::Error)]
#[error("{what} failed")]
pub struct KvmCallError {
    /// Which ioctl.
    pub what: &'static str,
    /// Why.
    #[source]
    pub source: kvm_ioctls::Error,
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmCallError {
    move |source| KvmCallError { what, source }
}

/// Why `state.bin` could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// A record header or body runs past the end.
    #[error("record at byte {0} runs past the end of the file")]
    Truncated(usize),
    /// A record of a kind this version does not know.
    #[error("record at byte {at} has unknown kind {kind}")]
    UnknownKind {
        /// Offset.
        at: usize,
        /// Kind found.
        kind: u16,
    },
    /// A record whose length does not fit its kind.
    #[error("{kind:?} record at byte {at} has {len} bytes")]
    BadLength {
        /// Kind.
        kind: Kind,
        /// Offset.
        at: usize,
        /// Length found.
        len: usize,
    },
    /// A record for a vCPU past the snapshot's count.
    #[error("{kind:?} record for vCPU {index}, the snapshot has {cpus}")]
    BadIndex {
        /// Kind.
        kind: Kind,
        /// vCPU index found.
        index: u16,
        /// vCPUs in the manifest.
        cpus: usize,
    },
    /// A state the VM cannot run without is missing.
    #[error("no {kind:?} record for {whom}")]
    Missing {
        /// Kind.
        kind: Kind,
        /// "vCPU n" or "the VM".
        whom: String,
    },
}

/// A `kvm_xsave` (which is not `Clone` in kvm-bindings).
#[derive(Default)]
pub struct XsaveArea(pub kvm_xsave);

impl Clone for XsaveArea {
    fn clone(&self) -> Self {
        XsaveArea(kvm_xsave::read_from_bytes(self.0.as_bytes()).unwrap_or_default())
    }
}

/// `kvm_fpu` has no byte view in kvm-bindings: its fields in declaration order, little endian.
fn fpu_bytes(f: &kvm_fpu) -> Vec<u8> {
    let mut b = Vec::with_capacity(416);
    for r in &f.fpr {
        b.extend_from_slice(r);
    }
    b.extend_from_slice(&f.fcw.to_le_bytes());
    b.extend_from_slice(&f.fsw.to_le_bytes());
    b.push(f.ftwx);
    b.push(0);
    b.extend_from_slice(&f.last_opcode.to_le_bytes());
    b.extend_from_slice(&f.last_ip.to_le_bytes());
    b.extend_from_slice(&f.last_dp.to_le_bytes());
    for r in &f.xmm {
        b.extend_from_slice(r);
    }
    b.extend_from_slice(&f.mxcsr.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b
}

/// The inverse of [`fpu_bytes`]; `None` for a wrong length.
fn fpu_from(b: &[u8]) -> Option<kvm_fpu> {
    if b.len() != 416 {
        return None;
    }
    let mut f = kvm_fpu::default();
    let mut at = 0usize;
    let mut take = |n: usize| {
        let s = &b[at..at + n];
        at += n;
        s
    };
    for r in f.fpr.iter_mut() {
        r.copy_from_slice(take(16));
    }
    let t = take(2);
    f.fcw = u16::from_le_bytes([t[0], t[1]]);
    let t = take(2);
    f.fsw = u16::from_le_bytes([t[0], t[1]]);
    f.ftwx = take(2)[0];
    let t = take(2);
    f.last_opcode = u16::from_le_bytes([t[0], t[1]]);
    let u64_at = |t: &[u8]| {
        let mut a = [0u8; 8];
        a.copy_from_slice(t);
        u64::from_le_bytes(a)
    };
    f.last_ip = u64_at(take(8));
    f.last_dp = u64_at(take(8));
    for r in f.xmm.iter_mut() {
        r.copy_from_slice(take(16));
    }
    let t = take(4);
    f.mxcsr = u32::from_le_bytes([t[0], t[1], t[2], t[3]]);
    Some(f)
}

/// One vCPU's state.
#[derive(Clone, Default)]
pub struct VcpuState {
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// Legacy FPU/SSE state.
    pub fpu: kvm_fpu,
    /// XSAVE area, where KVM offers it.
    pub xsave: Option<XsaveArea>,
    /// Extended control registers, where KVM offers them.
    pub xcrs: Option<kvm_xcrs>,
    /// Debug registers.
    pub debugregs: Option<kvm_debugregs>,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// Every MSR KVM let hype read (the TSC among them).
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs, SIPIs.
    pub events: kvm_vcpu_events,
    /// Runnable, halted, waiting for SIPI.
    pub mp_state: kvm_mp_state,
    /// MSRs KVM listed but refused to read (by index), logged at restore.
    pub skipped_msrs: Vec<u32>,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &self.regs.rip)
            .field("msrs", &self.msrs.len())
            .finish_non_exhaustive()
    }
}

/// Reads as many of `indices` as KVM allows; MSRs it refuses are skipped (returned second).
fn read_msrs(
    vcpu: &VcpuFd,
    indices: &[u32],
) -> Result<(Vec<kvm_msr_entry>, Vec<u32>), KvmCallError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut skipped = Vec::new();
    let mut rest: &[u32] = indices;
    while !rest.is_empty() {
        let chunk: Vec<kvm_msr_entry> = rest
            .iter()
            .take(kvm_bindings::KVM_MAX_MSR_ENTRIES)
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&chunk)
            .map_err(|_| kvm("building the MSR list")(kvm_ioctls::Error::new(libc::E2BIG)))?;
        let n = vcpu.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        let n = n.min(chunk.len());
        out.extend_from_slice(&msrs.as_slice()[..n]);
        if n < chunk.len() {
            // KVM stops at the first MSR it cannot read: skip that one and go on.
            skipped.push(chunk[n].index);
            rest = &rest[n + 1..];
        } else {
            rest = &rest[n..];
        }
    }
    Ok((out, skipped))
}

/// Gathers the state of a vCPU that is out of KVM_RUN. KVM_RUN is entered once with
/// `immediate_exit` first, so that an I/O or MMIO exit the VMM has answered is completed inside
/// KVM (its result in the registers) and registers the fix-ups changed through `kvm_run` are
/// written back, before anything is read.
pub fn capture_vcpu(vcpu: &mut VcpuFd, msr_indices: &[u32]) -> Result<VcpuState, KvmCallError> {
    vcpu.set_kvm_immediate_exit(1);
    let completed = vcpu.run().map(|_| ());
    vcpu.set_kvm_immediate_exit(0);
    match completed {
        Err(e) if e.errno() != libc::EINTR && e.errno() != libc::EAGAIN => {
            return Err(kvm("KVM_RUN (immediate exit)")(e));
        }
        _ => {}
    }
    let (msrs, skipped_msrs) = read_msrs(vcpu, msr_indices)?;
    Ok(VcpuState {
        regs: vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?,
        sregs: vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
        fpu: vcpu.get_fpu().map_err(kvm("KVM_GET_FPU"))?,
        xsave: vcpu.get_xsave().ok().map(XsaveArea),
        xcrs: vcpu.get_xcrs().ok(),
        debugregs: vcpu.get_debug_regs().ok(),
        lapic: vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?,
        msrs,
        events: vcpu.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?,
        mp_state: vcpu.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?,
        skipped_msrs,
    })
}

/// What restoring a vCPU left out (KVM refused it), for the log and `docs/snapshot.md`.
#[derive(Debug, Default)]
pub struct RestoreNotes {
    /// MSRs KVM_SET_MSRS refused, by index.
    pub refused_msrs: Vec<u32>,
    /// Other state KVM refused: the ioctl's name.
    pub refused: Vec<&'static str>,
}

/// Puts `s` into a freshly created vCPU (CPUID already set). `xsave_fits`: whether the legacy
/// 4 KiB XSAVE area is all KVM reads on this host (no dynamically enabled XSAVE features).
pub fn restore_vcpu(
    vcpu: &VcpuFd,
    s: &VcpuState,
    xsave_fits: bool,
) -> Result<RestoreNotes, KvmCallError> {
    let mut notes = RestoreNotes::default();
    vcpu.set_mp_state(s.mp_state)
        .map_err(kvm("KVM_SET_MP_STATE"))?;
    vcpu.set_regs(&s.regs).map_err(kvm("KVM_SET_REGS"))?;
    vcpu.set_sregs(&s.sregs).map_err(kvm("KVM_SET_SREGS"))?;
    vcpu.set_fpu(&s.fpu).map_err(kvm("KVM_SET_FPU"))?;
    if let Some(x) = &s.xsave {
        if xsave_fits {
            // SAFETY: `x` is a whole kvm_xsave (4 KiB) and `xsave_fits` says KVM's XSAVE
            // buffer for this vCPU is no larger, so the kernel reads only inside it.
            if unsafe { vcpu.set_xsave(&x.0) }.is_err() {
                notes.refused.push("KVM_SET_XSAVE");
            }
        } else {
            notes.refused.push("KVM_SET_XSAVE");
        }
    }
    if let Some(x) = &s.xcrs {
        if vcpu.set_xcrs(x).is_err() {
            notes.refused.push("KVM_SET_XCRS");
        }
    }
    if let Some(d) = &s.debugregs {
        if vcpu.set_debug_regs(d).is_err() {
            notes.refused.push("KVM_SET_DEBUGREGS");
        }
    }
    vcpu.set_lapic(&s.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
    let mut rest: &[kvm_msr_entry] = &s.msrs;
    while !rest.is_empty() {
        let take = rest.len().min(kvm_bindings::KVM_MAX_MSR_ENTRIES);
        let msrs = Msrs::from_entries(&rest[..take])
            .map_err(|_| kvm("building the MSR list")(kvm_ioctls::Error::new(libc::E2BIG)))?;
        let n = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?.min(take);
        if n < take {
            notes.refused_msrs.push(rest[n].index);
            rest = &rest[n + 1..];
        } else {
            rest = &rest[take..];
        }
    }
    vcpu.set_vcpu_events(&s.events)
        .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
    Ok(notes)
}

/// The VM-wide state: interrupt controllers, PIT, KVM clock.
#[derive(Clone, Default)]
pub struct VmState {
    /// Master PIC, slave PIC, IOAPIC.
    pub irqchips: Vec<kvm_irqchip>,
    /// The PIT.
    pub pit: kvm_pit_state2,
    /// The KVM clock.
    pub clock: kvm_clock_data,
}

impl std::fmt::Debug for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmState")
            .field("clock", &self.clock.clock)
            .finish_non_exhaustive()
    }
}

const CHIPS: [u32; 3] = [
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC,
];

/// Gathers the VM-wide state (vCPUs paused).
pub fn capture_vm(vm: &VmFd) -> Result<VmState, KvmCallError> {
    let mut irqchips = Vec::with_capacity(CHIPS.len());
    for chip_id in CHIPS {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip).map_err(kvm("KVM_GET_IRQCHIP"))?;
        irqchips.push(chip);
    }
    Ok(VmState {
        irqchips,
        pit: vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?,
        clock: vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?,
    })
}

/// Puts the VM-wide state back (after the vCPUs exist). The clock is set to the value it had at
/// the snapshot with no flags: the guest's clock goes on from where it was paused (it does not
/// jump over the time the snapshot sat on disk).
pub fn restore_vm(vm: &VmFd, s: &VmState) -> Result<(), KvmCallError> {
    for chip in &s.irqchips {
        vm.set_irqchip(chip).map_err(kvm("KVM_SET_IRQCHIP"))?;
    }
    vm.set_pit2(&s.pit).map_err(kvm("KVM_SET_PIT2"))?;
    let clock = kvm_clock_data {
        clock: s.clock.clock,
        ..Default::default()
    };
    vm.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
    Ok(())
}

fn put<T: IntoBytes + Immutable + ?Sized>(out: &mut Vec<u8>, kind: Kind, index: u16, v: &T) {
    let bytes = v.as_bytes();
    out.extend_from_slice(&(kind as u16).to_le_bytes());
    out.extend_from_slice(&index.to_le_bytes());
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Encodes the whole machine state as `state.bin`.
pub fn encode(vcpus: &[VcpuState], vm: &VmState) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, s) in vcpus.iter().enumerate() {
        let i = i as u16;
        put(&mut out, Kind::Regs, i, &s.regs);
        put(&mut out, Kind::Sregs, i, &s.sregs);
        put(&mut out, Kind::Fpu, i, fpu_bytes(&s.fpu).as_slice());
        if let Some(x) = &s.xsave {
            put(&mut out, Kind::Xsave, i, &x.0);
        }
        if let Some(x) = &s.xcrs {
            put(&mut out, Kind::Xcrs, i, x);
        }
        if let Some(d) = &s.debugregs {
            put(&mut out, Kind::DebugRegs, i, d);
        }
        put(&mut out, Kind::Lapic, i, &s.lapic);
        put(&mut out, Kind::Msrs, i, s.msrs.as_slice());
        put(&mut out, Kind::Events, i, &s.events);
        put(&mut out, Kind::MpState, i, &s.mp_state);
    }
    for (i, chip) in vm.irqchips.iter().enumerate() {
        put(&mut out, Kind::Irqchip, i as u16, chip);
    }
    put(&mut out, Kind::Pit, 0, &vm.pit);
    put(&mut out, Kind::Clock, 0, &vm.clock);
    out
}

fn read<T: FromBytes>(kind: Kind, at: usize, body: &[u8]) -> Result<T, DecodeError> {
    T::read_from_bytes(body).map_err(|_| DecodeError::BadLength {
        kind,
        at,
        len: body.len(),
    })
}

/// Decodes `state.bin` of a snapshot with `cpus` vCPUs.
pub fn decode(data: &[u8], cpus: usize) -> Result<(Vec<VcpuState>, VmState), DecodeError> {
    let mut vcpus: Vec<VcpuState> = vec![VcpuState::default(); cpus];
    // Which of the mandatory records each vCPU got: regs, sregs, fpu, lapic, events, mp_state.
    let mut seen = vec![[false; 6]; cpus];
    let mut vm = VmState::default();
    let mut chips: [Option<kvm_irqchip>; 3] = [None, None, None];
    let (mut pit, mut clock) = (false, false);
    let mut at = 0usize;
    while at < data.len() {
        let head = data.get(at..at + 8).ok_or(DecodeError::Truncated(at))?;
        let kind_raw = u16::from_le_bytes([head[0], head[1]]);
        let index = u16::from_le_bytes([head[2], head[3]]);
        let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
        let body = data
            .get(at + 8..(at + 8).saturating_add(len))
            .ok_or(DecodeError::Truncated(at))?;
        let kind =
            Kind::from_u16(kind_raw).ok_or(DecodeError::UnknownKind { at, kind: kind_raw })?;
        let vcpu_kind = (kind as u16) < 16;
        if vcpu_kind && usize::from(index) >= cpus {
            return Err(DecodeError::BadIndex { kind, index, cpus });
        }
        let i = usize::from(index);
        match kind {
            Kind::Regs => {
                vcpus[i].regs = read(kind, at, body)?;
                seen[i][0] = true;
            }
            Kind::Sregs => {
                vcpus[i].sregs = read(kind, at, body)?;
                seen[i][1] = true;
            }
            Kind::Fpu => {
                vcpus[i].fpu = fpu_from(body).ok_or(DecodeError::BadLength {
                    kind,
                    at,
                    len: body.len(),
                })?;
                seen[i][2] = true;
            }
            Kind::Xsave => vcpus[i].xsave = Some(XsaveArea(read(kind, at, body)?)),
            Kind::Xcrs => vcpus[i].xcrs = Some(read(kind, at, body)?),
            Kind::DebugRegs => vcpus[i].debugregs = Some(read(kind, at, body)?),
            Kind::Lapic => {
                vcpus[i].lapic = read(kind, at, body)?;
                seen[i][3] = true;
            }
            Kind::Msrs => {
                let entry = std::mem::size_of::<kvm_msr_entry>();
                if body.len() % entry != 0 {
                    return Err(DecodeError::BadLength {
                        kind,
                        at,
                        len: body.len(),
                    });
                }
                vcpus[i].msrs = body
                    .chunks_exact(entry)
                    .map(|c| read(kind, at, c))
                    .collect::<Result<_, _>>()?;
            }
            Kind::Events => {
                vcpus[i].events = read(kind, at, body)?;
                seen[i][4] = true;
            }
            Kind::MpState => {
                vcpus[i].mp_state = read(kind, at, body)?;
                seen[i][5] = true;
            }
            Kind::Irqchip => {
                let slot = chips.get_mut(i).ok_or(DecodeError::BadIndex {
                    kind,
                    index,
                    cpus: 3,
                })?;
                *slot = Some(read(kind, at, body)?);
            }
            Kind::Pit => {
                vm.pit = read(kind, at, body)?;
                pit = true;
            }
            Kind::Clock => {
                vm.clock = read(kind, at, body)?;
                clock = true;
            }
        }
        at += 8 + len;
    }
    const NEEDED: [Kind; 6] = [
        Kind::Regs,
        Kind::Sregs,
        Kind::Fpu,
        Kind::Lapic,
        Kind::Events,
        Kind::MpState,
    ];
    for (i, s) in seen.iter().enumerate() {
        if let Some(k) = s.iter().position(|x| !x) {
            return Err(DecodeError::Missing {
                kind: NEEDED[k],
                whom: format!("vCPU {i}"),
            });
        }
    }
    for c in chips {
        vm.irqchips.push(c.ok_or(DecodeError::Missing {
            kind: Kind::Irqchip,
            whom: "the VM".into(),
        })?);
    }
    if !pit {
        return Err(DecodeError::Missing {
            kind: Kind::Pit,
            whom: "the VM".into(),
        });
    }
    if !clock {
        return Err(DecodeError::Missing {
            kind: Kind::Clock,
            whom: "the VM".into(),
        });
    }
    Ok((vcpus, vm))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_round_trip() {
        let mut v = VcpuState::default();
        v.regs.rip = 0x1234;
        v.fpu.mxcsr = 0x1f80;
        v.fpu.xmm[3][5] = 9;
        v.msrs = vec![kvm_msr_entry {
            index: 0x10,
            data: 99,
            ..Default::default()
        }];
        let vm = VmState {
            irqchips: vec![kvm_irqchip::default(); 3],
            clock: kvm_clock_data {
                clock: 77,
                ..Default::default()
            },
            ..Default::default()
        };
        let bytes = encode(&[v], &vm);
        let (vcpus, back) = decode(&bytes, 1).unwrap();
        assert_eq!(vcpus[0].regs.rip, 0x1234);
        assert_eq!(vcpus[0].msrs[0].data, 99);
        assert_eq!(vcpus[0].fpu.mxcsr, 0x1f80);
        assert_eq!(vcpus[0].fpu.xmm[3][5], 9);
        assert_eq!(back.clock.clock, 77);
        // Any cut is refused, never misread.
        for cut in [1, 7, 9, bytes.len() - 1] {
            assert!(decode(&bytes[..bytes.len() - cut], 1).is_err(), "cut {cut}");
        }
        assert!(matches!(
            decode(&bytes, 0),
            Err(DecodeError::BadIndex { .. })
        ));
    }

    #[test]
    fn a_length_past_the_end_is_refused_before_anything_is_read() {
        // A regs record claiming 4 GiB of body: refused as cut short, nothing allocated by it.
        let mut bytes = vec![1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff];
        bytes.extend_from_slice(&[0; 64]);
        assert!(matches!(decode(&bytes, 1), Err(DecodeError::Truncated(0))));
        // A second, valid-length record after a first: its offset is named.
        let mut two = Vec::new();
        put(&mut two, Kind::MpState, 0, &kvm_mp_state::default());
        two.extend_from_slice(&[2, 0, 0, 0, 0, 0, 0, 0x80]);
        assert!(matches!(decode(&two, 1), Err(DecodeError::Truncated(12))));
    }
}
