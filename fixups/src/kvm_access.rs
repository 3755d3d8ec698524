//! [`VcpuAccess`] for a real KVM vCPU, and reading the emulation-failure report from `kvm_run`.

use std::cell::Cell;

use std::sync::OnceLock;

use kvm_bindings::{
    kvm_msr_entry, kvm_regs, kvm_run, kvm_sregs, kvm_xsave, Msrs, KVM_EXIT_INTERNAL_ERROR,
    KVM_INTERNAL_ERROR_EMULATION, KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
    KVM_SYNC_X86_REGS, KVM_SYNC_X86_SREGS,
};
use kvm_ioctls::{Cap, Kvm, SyncReg, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::decode::MAX_INSN_LEN;
use super::host_atomic;
use super::page_walk::{self, AccessFault, AccessKind, DataAccess, DataTarget};
use super::vcpu::{FxImage, VcpuAccess, VcpuError, X87State, EFER_LMA, FXSAVE_SIZE};

/// How registers are reached: ioctls, or the `kvm_run` sync area.
enum Handle<'a> {
    Ioctl(&'a VcpuFd),
    Synced {
        vcpu: &'a mut VcpuFd,
        regs: bool,
        sregs: bool,
    },
}

/// A KVM vCPU plus the guest memory its virtual addresses resolve into. Made for one exit:
/// it caches the special registers it read.
pub struct KvmVcpuAccess<'a> {
    handle: Handle<'a>,
    mem: &'a GuestMemoryMmap<()>,
    /// Special registers read by ioctl (each page walk needs CR3/CR4/EFER).
    sregs_cache: Cell<Option<kvm_sregs>>,
}

impl<'a> KvmVcpuAccess<'a> {
    /// Wraps `vcpu`; registers are read and written with ioctls; guest memory reads go to `mem`.
    pub fn new(vcpu: &'a VcpuFd, mem: &'a GuestMemoryMmap<()>) -> Self {
        KvmVcpuAccess {
            handle: Handle::Ioctl(vcpu),
            mem,
            sregs_cache: Cell::new(None),
        }
    }

    /// Wraps `vcpu` using `KVM_CAP_SYNC_REGS`: registers and special registers come from the
    /// `kvm_run` area KVM filled at the exit, and changes go back there (applied on the next
    /// `KVM_RUN`), saving four of the five ioctls of a typical fix-up (each costs several
    /// microseconds on PVM).
    ///
    /// The run loop enables this once per vCPU before running it, with
    /// `vcpu.set_sync_valid_reg(SyncReg::Register)` and `(SyncReg::SystemRegister)`, and must
    /// not change registers by ioctl between the exit and the next run. Register sets that were
    /// not enabled fall back to ioctls.
    pub fn with_sync_regs(vcpu: &'a mut VcpuFd, mem: &'a GuestMemoryMmap<()>) -> Self {
        let valid = vcpu.get_kvm_run().kvm_valid_regs;
        KvmVcpuAccess {
            handle: Handle::Synced {
                regs: valid & u64::from(KVM_SYNC_X86_REGS) != 0,
                sregs: valid & u64::from(KVM_SYNC_X86_SREGS) != 0,
                vcpu,
            },
            mem,
            sregs_cache: Cell::new(None),
        }
    }

    fn fd(&self) -> &VcpuFd {
        match &self.handle {
            Handle::Ioctl(vcpu) => vcpu,
            Handle::Synced { vcpu, .. } => vcpu,
        }
    }
}

const PAGE_SIZE: u64 = 0x1000;

/// `struct kvm_xsave`'s region: 4096 bytes.
const KVM_XSAVE_SIZE: usize = std::mem::size_of::<kvm_xsave>();
/// XSTATE_BV (the XSAVE header's first word) lies right after the legacy region.
const XSTATE_BV_WORD: usize = FXSAVE_SIZE / 4;
/// XSTATE_BV bits of the x87 and SSE components.
const XFEATURE_FP_SSE: u32 = 0b11;

/// How many bytes KVM's XSAVE ioctls move for this process's vCPUs: `KVM_CAP_XSAVE2`'s answer
/// (4096 where KVM predates it). Larger only once dynamically enabled state (AMX) was
/// requested for guests with `arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM)`, which hype never does.
fn kvm_xsave_size() -> usize {
    static SIZE: OnceLock<usize> = OnceLock::new();
    *SIZE.get_or_init(|| match Kvm::new() {
        Ok(kvm) => usize::try_from(kvm.check_extension_int(Cap::Xsave2))
            .unwrap_or(0)
            .max(KVM_XSAVE_SIZE),
        Err(_) => KVM_XSAVE_SIZE,
    })
}

/// Asks KVM now, once, how large its XSAVE area is (normally done lazily at the first fix-up
/// that saves FPU state, by opening the KVM device): a process that confines its vCPU threads
/// calls this before, so a vCPU thread never opens a file.
pub fn prepare_for_sandbox() {
    let _ = kvm_xsave_size();
}

/// One page-sized piece of a checked data access.
struct Piece {
    /// Offset into the access.
    offset: usize,
    /// Length of the piece.
    len: usize,
    /// Where it goes.
    target: DataTarget,
}

impl KvmVcpuAccess<'_> {
    /// Translates `gva` by walking the long-mode page tables without permission checks (see
    /// [`page_walk`]); `None` outside long mode or when not mapped (then `KVM_TRANSLATE`
    /// decides, which knows every paging mode). Walking first costs no ioctl when the special
    /// registers are synced, and sees user pages that `KVM_TRANSLATE` hides under SMAP.
    fn walk_page_tables(&self, gva: u64) -> Result<Option<u64>, VcpuError> {
        let sregs = self.sregs()?;
        if sregs.efer & EFER_LMA == 0 {
            return Ok(None);
        }
        let read_entry = |gpa: u64| self.mem.read_obj::<u64>(GuestAddress(gpa)).ok();
        Ok(page_walk::translate(read_entry, sregs.cr3, sregs.cr4, gva))
    }

    /// Translates every page of the `len`-byte data access at `gva` with `access`, checking
    /// them all before anything is read or written (long mode only).
    fn translate_range(
        &self,
        gva: u64,
        len: usize,
        access: DataAccess,
        kind: AccessKind,
    ) -> Result<Vec<Piece>, VcpuError> {
        let sregs = self.sregs()?;
        if sregs.efer & EFER_LMA == 0 {
            return Err(VcpuError::NotLongMode { gva });
        }
        let read_entry = |gpa: u64| self.mem.read_obj::<u64>(GuestAddress(gpa)).ok();
        let mut pieces = Vec::new();
        let mut offset = 0usize;
        while offset < len {
            let va = gva.wrapping_add(offset as u64);
            let page_left = (PAGE_SIZE - (va & (PAGE_SIZE - 1))) as usize;
            let piece_len = page_left.min(len - offset);
            let target =
                page_walk::translate_data(read_entry, sregs.cr3, sregs.cr4, va, access, kind)
                    .map_err(|fault| match fault {
                        AccessFault::PageFault { error_code } => VcpuError::PageFault {
                            gva: va,
                            error_code,
                        },
                        AccessFault::TableUnreadable { gpa } => {
                            VcpuError::ReadMemory { gva: va, gpa }
                        }
                    })?;
            pieces.push(Piece {
                offset,
                len: piece_len,
                target,
            });
            offset += piece_len;
        }
        Ok(pieces)
    }

    /// Sets the accessed bit of every paging entry `target` walked, and the dirty bit of its
    /// leaf when `dirty`, atomically (the guest may update the entries concurrently).
    fn set_accessed_dirty(
        &self,
        gva: u64,
        target: &DataTarget,
        dirty: bool,
    ) -> Result<(), VcpuError> {
        let levels = target.levels.min(target.entries.len());
        for (i, &entry_gpa) in target.entries[..levels].iter().enumerate() {
            let bits = if dirty && i + 1 == levels {
                page_walk::ACCESSED | page_walk::DIRTY
            } else {
                page_walk::ACCESSED
            };
            let entry = self.host_ptr(entry_gpa, 8).ok_or(VcpuError::WriteMemory {
                gva,
                gpa: entry_gpa,
            })?;
            // SAFETY: `host_ptr` checked that the 8 bytes lie inside one mapped region of guest
            // memory, which outlives `self`, and are 8-byte aligned. The guest may access the
            // entry concurrently; the update is atomic.
            unsafe { host_atomic::set_bits_u64(entry, bits) };
        }
        Ok(())
    }

    /// The vCPU's XSAVE state (`KVM_GET_XSAVE`), refusing layouts larger than `kvm_xsave`.
    fn xsave(&self) -> Result<kvm_xsave, VcpuError> {
        let size = kvm_xsave_size();
        if size > KVM_XSAVE_SIZE {
            return Err(VcpuError::XsaveTooLarge { size });
        }
        self.fd().get_xsave().map_err(VcpuError::GetXsave)
    }

    /// Host address of `len` bytes of guest memory at `gpa`, if they lie in one region and the
    /// host address is aligned to `len` (the atomic operations need both).
    fn host_ptr(&self, gpa: u64, len: usize) -> Option<*mut u8> {
        let slice = self.mem.get_slice(GuestAddress(gpa), len).ok()?;
        let ptr = slice.ptr_guard_mut().as_ptr();
        (ptr as usize % len == 0).then_some(ptr)
    }
}

impl VcpuAccess for KvmVcpuAccess<'_> {
    fn regs(&self) -> Result<kvm_regs, VcpuError> {
        match &self.handle {
            Handle::Synced {
                vcpu, regs: true, ..
            } => Ok(vcpu.sync_regs().regs),
            _ => self.fd().get_regs().map_err(VcpuError::GetRegs),
        }
    }

    fn set_regs(&mut self, regs: &kvm_regs) -> Result<(), VcpuError> {
        match &mut self.handle {
            Handle::Synced {
                vcpu, regs: true, ..
            } => {
                vcpu.sync_regs_mut().regs = *regs;
                vcpu.set_sync_dirty_reg(SyncReg::Register);
                Ok(())
            }
            _ => self.fd().set_regs(regs).map_err(VcpuError::SetRegs),
        }
    }

    fn sregs(&self) -> Result<kvm_sregs, VcpuError> {
        match &self.handle {
            Handle::Synced {
                vcpu, sregs: true, ..
            } => Ok(vcpu.sync_regs().sregs),
            _ => {
                if let Some(sregs) = self.sregs_cache.get() {
                    return Ok(sregs);
                }
                let sregs = self.fd().get_sregs().map_err(VcpuError::GetSregs)?;
                self.sregs_cache.set(Some(sregs));
                Ok(sregs)
            }
        }
    }

    fn set_sregs(&mut self, sregs: &kvm_sregs) -> Result<(), VcpuError> {
        match &mut self.handle {
            Handle::Synced {
                vcpu, sregs: true, ..
            } => {
                vcpu.sync_regs_mut().sregs = *sregs;
                vcpu.set_sync_dirty_reg(SyncReg::SystemRegister);
                Ok(())
            }
            _ => {
                self.sregs_cache.set(None);
                self.fd().set_sregs(sregs).map_err(VcpuError::SetSregs)?;
                self.sregs_cache.set(Some(*sregs));
                Ok(())
            }
        }
    }

    fn msrs(&self, indices: &[u32], values: &mut [u64]) -> Result<(), VcpuError> {
        let first = indices.first().copied().unwrap_or(0);
        let entries: Vec<kvm_msr_entry> = indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|_| VcpuError::MsrUnavailable { index: first })?;
        let read = self
            .fd()
            .get_msrs(&mut msrs)
            .map_err(|source| VcpuError::GetMsr {
                index: first,
                source,
            })?;
        // KVM stops at the first MSR it cannot read and returns how many it read.
        let got = msrs.as_slice();
        for (i, (&index, value)) in indices.iter().zip(values.iter_mut()).enumerate() {
            match got.get(i) {
                Some(e) if i < read && e.index == index => *value = e.data,
                _ => return Err(VcpuError::MsrUnavailable { index }),
            }
        }
        Ok(())
    }

    fn x87_state(&self) -> Result<X87State, VcpuError> {
        let fpu = self.fd().get_fpu().map_err(VcpuError::GetFpu)?;
        Ok(X87State {
            status: fpu.fsw,
            control: fpu.fcw,
        })
    }

    fn read_virt(&self, gva: u64, buf: &mut [u8]) -> Result<(), VcpuError> {
        let mut done = 0usize;
        while done < buf.len() {
            let va = gva.wrapping_add(done as u64);
            let page_left = (PAGE_SIZE - (va & (PAGE_SIZE - 1))) as usize;
            let chunk = page_left.min(buf.len() - done);
            let gpa = match self.walk_page_tables(va)? {
                Some(gpa) => gpa,
                None => {
                    let tr = self
                        .fd()
                        .translate_gva(va)
                        .map_err(|source| VcpuError::Translate { gva: va, source })?;
                    if tr.valid == 0 {
                        return Err(VcpuError::Unmapped { gva: va });
                    }
                    tr.physical_address
                }
            };
            self.mem
                .read_slice(&mut buf[done..done + chunk], GuestAddress(gpa))
                .map_err(|_| VcpuError::ReadMemory { gva: va, gpa })?;
            done += chunk;
        }
        Ok(())
    }

    fn fx_state(&self) -> Result<FxImage, VcpuError> {
        let xsave = self.xsave()?;
        let mut image = [0u8; FXSAVE_SIZE];
        for (chunk, word) in image.chunks_exact_mut(4).zip(xsave.region.iter()) {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        Ok(image)
    }

    fn set_fx_state(&mut self, image: &FxImage) -> Result<(), VcpuError> {
        // Read back just before writing: everything but the x87/SSE fields stays as KVM has it.
        let mut xsave = self.xsave()?;
        for (i, chunk) in image.chunks_exact(4).enumerate() {
            let byte = i * 4;
            // MXCSR_MASK (28..32) is the CPU's, and 416..512 are not loaded by fxrstor.
            if byte == 28 || byte >= 416 {
                continue;
            }
            xsave.region[i] = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        }
        // The loaded components are in use from now on; with their XSTATE_BV bits clear KVM
        // would load their initial state instead.
        xsave.region[XSTATE_BV_WORD] |= XFEATURE_FP_SSE;
        // SAFETY: `self.xsave()` checked that KVM moves at most the 4096 bytes of `kvm_xsave`
        // for this process's vCPUs (KVM_CAP_XSAVE2), so KVM_SET_XSAVE reads only `xsave`.
        unsafe { self.fd().set_xsave(&xsave) }.map_err(VcpuError::SetXsave)
    }

    fn read_data(&self, gva: u64, access: DataAccess, buf: &mut [u8]) -> Result<(), VcpuError> {
        let pieces = self.translate_range(gva, buf.len(), access, AccessKind::Read)?;
        for piece in &pieces {
            let va = gva.wrapping_add(piece.offset as u64);
            self.set_accessed_dirty(va, &piece.target, false)?;
            let gpa = piece.target.gpa;
            self.mem
                .read_slice(
                    &mut buf[piece.offset..piece.offset + piece.len],
                    GuestAddress(gpa),
                )
                .map_err(|_| VcpuError::ReadMemory { gva: va, gpa })?;
        }
        Ok(())
    }

    fn write_data(&mut self, gva: u64, access: DataAccess, data: &[u8]) -> Result<(), VcpuError> {
        let pieces = self.translate_range(gva, data.len(), access, AccessKind::Write)?;
        // Every piece must be guest RAM before anything is written.
        for piece in &pieces {
            let gpa = piece.target.gpa;
            self.mem
                .get_slice(GuestAddress(gpa), piece.len)
                .map_err(|_| VcpuError::WriteMemory {
                    gva: gva.wrapping_add(piece.offset as u64),
                    gpa,
                })?;
        }
        for piece in &pieces {
            let va = gva.wrapping_add(piece.offset as u64);
            self.set_accessed_dirty(va, &piece.target, true)?;
            let gpa = piece.target.gpa;
            self.mem
                .write_slice(
                    &data[piece.offset..piece.offset + piece.len],
                    GuestAddress(gpa),
                )
                .map_err(|_| VcpuError::WriteMemory { gva: va, gpa })?;
        }
        Ok(())
    }

    fn cmpxchg16b(
        &mut self,
        gva: u64,
        access: DataAccess,
        expected: u128,
        new: u128,
    ) -> Result<u128, VcpuError> {
        if gva % 16 != 0 {
            return Err(VcpuError::Misaligned { gva });
        }
        let sregs = self.sregs()?;
        if sregs.efer & EFER_LMA == 0 {
            return Err(VcpuError::NotLongMode { gva });
        }
        let read_entry = |gpa: u64| self.mem.read_obj::<u64>(GuestAddress(gpa)).ok();
        let target = page_walk::translate_write(read_entry, sregs.cr3, sregs.cr4, gva, access)
            .map_err(|fault| match fault {
                AccessFault::PageFault { error_code } => VcpuError::PageFault { gva, error_code },
                AccessFault::TableUnreadable { gpa } => VcpuError::ReadMemory { gva, gpa },
            })?;
        let gpa = target.gpa;
        let data = self
            .host_ptr(gpa, 16)
            .ok_or(VcpuError::WriteMemory { gva, gpa })?;
        // Accessed bits on every entry walked, dirty on the leaf: a locked cmpxchg16b always
        // writes (the old value back on failure), so hardware sets them either way.
        self.set_accessed_dirty(gva, &target, true)?;
        // SAFETY: `host_ptr` checked that the 16 bytes lie inside one mapped region of guest
        // memory, which outlives `self`, and are 16-byte aligned; other vCPUs may access them
        // concurrently, which the locked instruction makes safe.
        Ok(unsafe { host_atomic::cmpxchg16b(data, expected, new) })
    }

    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) -> Result<(), VcpuError> {
        let mut events = self.fd().get_vcpu_events().map_err(VcpuError::GetEvents)?;
        if events.exception.injected != 0 || events.exception.pending != 0 {
            return Err(VcpuError::ExceptionPending {
                pending: events.exception.nr,
                vector,
            });
        }
        // Injected (not pending): KVM delivers it on the next entry exactly as given, with RIP
        // as it stands. Other fields and flags are written back as read.
        events.exception.injected = 1;
        events.exception.pending = 0;
        events.exception.nr = vector;
        events.exception.has_error_code = u8::from(error_code.is_some());
        events.exception.error_code = error_code.unwrap_or(0);
        events.exception_has_payload = 0;
        events.exception_payload = 0;
        self.fd()
            .set_vcpu_events(&events)
            .map_err(VcpuError::SetEvents)
    }
}

/// The instruction bytes an emulation failure reported, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EmulationFailure {
    bytes: [u8; MAX_INSN_LEN],
    len: usize,
}

impl EmulationFailure {
    /// The reported bytes at RIP; empty when KVM reported none (then fetch them at RIP).
    pub fn insn_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// Reads the emulation-failure report of a `KVM_EXIT_INTERNAL_ERROR` exit from `kvm_run`.
///
/// Returns `None` unless the exit is an internal error with suberror
/// `KVM_INTERNAL_ERROR_EMULATION`, the only kind the fix-ups handle.
pub fn emulation_failure(run: &kvm_run) -> Option<EmulationFailure> {
    if run.exit_reason != KVM_EXIT_INTERNAL_ERROR {
        return None;
    }
    // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, for which KVM fills the `internal` /
    // `emulation_failure` members of the union; both are plain integers and byte arrays valid
    // for any bit pattern, so reading them cannot produce an invalid value.
    let failure = unsafe { run.__bindgen_anon_1.emulation_failure };
    if failure.suberror != KVM_INTERNAL_ERROR_EMULATION {
        return None;
    }
    let mut out = EmulationFailure {
        bytes: [0; MAX_INSN_LEN],
        len: 0,
    };
    // ndata counts the u64 words after `ndata`: flags, then insn_size + 15 bytes (two words).
    if failure.ndata >= 3
        && failure.flags & u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) != 0
    {
        // SAFETY: the union has one member, a struct of a u8 and a u8 array; any bit pattern is
        // a valid value of it.
        let insn = unsafe { failure.__bindgen_anon_1.__bindgen_anon_1 };
        let len = usize::from(insn.insn_size).min(MAX_INSN_LEN);
        out.bytes[..len].copy_from_slice(&insn.insn_bytes[..len]);
        out.len = len;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn internal_error_run(suberror: u32, ndata: u32, flags: u64, bytes: &[u8]) -> Box<kvm_run> {
        let mut run: Box<kvm_run> = Box::default();
        run.exit_reason = KVM_EXIT_INTERNAL_ERROR;
        // Build the emulation_failure member by value and store it.
        let mut insn =
            kvm_bindings::kvm_run__bindgen_ty_1__bindgen_ty_14__bindgen_ty_1__bindgen_ty_1 {
                insn_size: bytes.len() as u8,
                ..Default::default()
            };
        insn.insn_bytes[..bytes.len().min(15)].copy_from_slice(&bytes[..bytes.len().min(15)]);
        run.__bindgen_anon_1.emulation_failure =
            kvm_bindings::kvm_run__bindgen_ty_1__bindgen_ty_14 {
                suberror,
                ndata,
                flags,
                __bindgen_anon_1:
                    kvm_bindings::kvm_run__bindgen_ty_1__bindgen_ty_14__bindgen_ty_1 {
                        __bindgen_anon_1: insn,
                    },
            };
        run
    }

    #[test]
    fn reads_reported_bytes() {
        let run = internal_error_run(
            KVM_INTERNAL_ERROR_EMULATION,
            4,
            u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES),
            &[0x0f, 0x01, 0xca],
        );
        let f = emulation_failure(&run).unwrap();
        assert_eq!(f.insn_bytes(), &[0x0f, 0x01, 0xca]);
    }

    #[test]
    fn no_bytes_without_the_flag() {
        let run = internal_error_run(KVM_INTERNAL_ERROR_EMULATION, 4, 0, &[0xcc]);
        assert_eq!(emulation_failure(&run).unwrap().insn_bytes(), &[] as &[u8]);
        let run = internal_error_run(
            KVM_INTERNAL_ERROR_EMULATION,
            1,
            u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES),
            &[0xcc],
        );
        assert_eq!(emulation_failure(&run).unwrap().insn_bytes(), &[] as &[u8]);
    }

    #[test]
    fn oversized_insn_size_is_clamped() {
        let mut run = internal_error_run(
            KVM_INTERNAL_ERROR_EMULATION,
            4,
            u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES),
            &[0x90; 15],
        );
        run.__bindgen_anon_1
            .emulation_failure
            .__bindgen_anon_1
            .__bindgen_anon_1
            .insn_size = 200;
        assert_eq!(emulation_failure(&run).unwrap().insn_bytes().len(), 15);
    }

    #[test]
    fn other_exits_and_suberrors_are_not_emulation_failures() {
        let run = internal_error_run(2, 0, 0, &[]);
        assert!(emulation_failure(&run).is_none());
        let mut run = internal_error_run(KVM_INTERNAL_ERROR_EMULATION, 0, 0, &[]);
        run.exit_reason = kvm_bindings::KVM_EXIT_MMIO;
        assert!(emulation_failure(&run).is_none());
    }
}
