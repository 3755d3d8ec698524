//! A synthetic vCPU for unit tests: registers, MSRs, x87 words, an FXSAVE image of the x87/SSE
//! state and a sparse virtual memory.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

use super::page_walk::{pf, DataAccess};
use super::vcpu::{
    FxImage, VcpuAccess, VcpuError, X87State, CR0_PE, EFER_LMA, EFER_SCE, FXSAVE_SIZE,
};

const PAGE: u64 = 0x1000;

/// An FXSAVE image, boxed (arrays this long have no `Default`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FxBox(pub Box<FxImage>);

impl Default for FxBox {
    fn default() -> Self {
        FxBox(Box::new([0; FXSAVE_SIZE]))
    }
}

/// A vCPU whose every piece of state is a plain field.
#[derive(Debug, Clone, Default)]
pub struct FakeVcpu {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub msrs: HashMap<u32, u64>,
    pub x87: X87State,
    /// The x87/SSE state (what `fx_state` returns and `set_fx_state` loads).
    pub fx: FxBox,
    /// Number of set_fx_state calls.
    pub fx_writes: usize,
    /// The access of the last read_data / write_data.
    pub last_data_access: std::cell::Cell<Option<DataAccess>>,
    /// Virtual pages, by page number.
    pub pages: BTreeMap<u64, Vec<u8>>,
    /// Virtual page numbers that are read-only (writes page-fault).
    pub read_only: BTreeSet<u64>,
    /// The access of the last cmpxchg16b.
    pub last_write_access: Option<DataAccess>,
    /// Exceptions injected, in order.
    pub injected: Vec<(u8, Option<u32>)>,
    /// Whether an exception is already pending (injection then fails).
    pub exception_pending: bool,
    /// Number of set_regs / set_sregs calls.
    pub writes: usize,
    /// Number of msrs() calls (each one KVM_GET_MSRS on a real vCPU).
    pub msr_reads: std::cell::Cell<usize>,
}

impl FakeVcpu {
    /// 64-bit long mode at `cpl` with flat segments, paging on.
    pub fn long_mode(cpl: u16) -> Self {
        let mut cpu = FakeVcpu::default();
        cpu.sregs.cr0 = CR0_PE | (1 << 31) | (1 << 5);
        cpu.sregs.cr4 = 1 << 5;
        cpu.sregs.efer = EFER_LMA | (1 << 8) | EFER_SCE;
        let code = kvm_segment {
            selector: if cpl == 0 { 0x10 } else { 0x33 },
            type_: 0xb,
            present: 1,
            dpl: cpl as u8,
            s: 1,
            l: 1,
            g: 1,
            limit: 0xffff_ffff,
            ..Default::default()
        };
        let data = kvm_segment {
            selector: if cpl == 0 { 0 } else { 0x2b },
            type_: 0x3,
            present: 1,
            dpl: cpl as u8,
            s: 1,
            db: 1,
            g: 1,
            limit: 0xffff_ffff,
            ..Default::default()
        };
        cpu.sregs.cs = code;
        cpu.sregs.ss = data;
        cpu.sregs.ds = data;
        cpu.sregs.es = data;
        cpu.regs.rflags = 0x2;
        cpu
    }

    /// 32-bit protected mode (no paging) at CPL 0.
    pub fn protected32() -> Self {
        let mut cpu = FakeVcpu::default();
        cpu.sregs.cr0 = CR0_PE;
        cpu.sregs.cs = kvm_segment {
            selector: 0x8,
            type_: 0xb,
            present: 1,
            s: 1,
            db: 1,
            g: 1,
            limit: 0xffff_ffff,
            ..Default::default()
        };
        cpu.regs.rflags = 0x2;
        cpu
    }

    /// Writes `bytes` at virtual address `gva`, creating pages as needed.
    pub fn poke(&mut self, gva: u64, bytes: &[u8]) {
        for (i, b) in bytes.iter().enumerate() {
            let a = gva.wrapping_add(i as u64);
            let page = self
                .pages
                .entry(a / PAGE)
                .or_insert_with(|| vec![0; PAGE as usize]);
            page[(a % PAGE) as usize] = *b;
        }
    }

    /// Writes little-endian u64 words at `gva`.
    pub fn poke_u64s(&mut self, gva: u64, words: &[u64]) {
        for (i, w) in words.iter().enumerate() {
            self.poke(gva + 8 * i as u64, &w.to_le_bytes());
        }
    }

    /// Removes the page holding `gva`.
    pub fn unmap(&mut self, gva: u64) {
        self.pages.remove(&(gva / PAGE));
    }
}

impl VcpuAccess for FakeVcpu {
    fn regs(&self) -> Result<kvm_regs, VcpuError> {
        Ok(self.regs)
    }

    fn set_regs(&mut self, regs: &kvm_regs) -> Result<(), VcpuError> {
        self.regs = *regs;
        self.writes += 1;
        Ok(())
    }

    fn sregs(&self) -> Result<kvm_sregs, VcpuError> {
        Ok(self.sregs)
    }

    fn set_sregs(&mut self, sregs: &kvm_sregs) -> Result<(), VcpuError> {
        self.sregs = *sregs;
        self.writes += 1;
        Ok(())
    }

    fn msrs(&self, indices: &[u32], values: &mut [u64]) -> Result<(), VcpuError> {
        self.msr_reads.set(self.msr_reads.get() + 1);
        for (&index, value) in indices.iter().zip(values.iter_mut()) {
            *value = *self
                .msrs
                .get(&index)
                .ok_or(VcpuError::MsrUnavailable { index })?;
        }
        Ok(())
    }

    fn x87_state(&self) -> Result<X87State, VcpuError> {
        Ok(self.x87)
    }

    fn read_virt(&self, gva: u64, buf: &mut [u8]) -> Result<(), VcpuError> {
        for (i, out) in buf.iter_mut().enumerate() {
            let a = gva.wrapping_add(i as u64);
            let page = self
                .pages
                .get(&(a / PAGE))
                .ok_or(VcpuError::Unmapped { gva: a })?;
            *out = page[(a % PAGE) as usize];
        }
        Ok(())
    }

    fn fx_state(&self) -> Result<FxImage, VcpuError> {
        Ok(*self.fx.0)
    }

    fn set_fx_state(&mut self, image: &FxImage) -> Result<(), VcpuError> {
        // As on KVM: MXCSR_MASK and the bytes fxrstor does not load stay.
        let mut next = *self.fx.0;
        next[..28].copy_from_slice(&image[..28]);
        next[32..416].copy_from_slice(&image[32..416]);
        *self.fx.0 = next;
        self.fx_writes += 1;
        Ok(())
    }

    fn read_data(&self, gva: u64, access: DataAccess, buf: &mut [u8]) -> Result<(), VcpuError> {
        self.last_data_access.set(Some(access));
        let user = if access.user { pf::USER } else { 0 };
        for i in 0..buf.len() as u64 {
            let a = gva.wrapping_add(i);
            if !self.pages.contains_key(&(a / PAGE)) {
                return Err(VcpuError::PageFault {
                    gva: a,
                    error_code: user,
                });
            }
        }
        self.read_virt(gva, buf)
    }

    fn write_data(&mut self, gva: u64, access: DataAccess, data: &[u8]) -> Result<(), VcpuError> {
        self.last_data_access.set(Some(access));
        let user = if access.user { pf::USER } else { 0 };
        for i in 0..data.len() as u64 {
            let a = gva.wrapping_add(i);
            if !self.pages.contains_key(&(a / PAGE)) {
                return Err(VcpuError::PageFault {
                    gva: a,
                    error_code: pf::WRITE | user,
                });
            }
            if self.read_only.contains(&(a / PAGE)) {
                return Err(VcpuError::PageFault {
                    gva: a,
                    error_code: pf::PRESENT | pf::WRITE | user,
                });
            }
        }
        self.poke(gva, data);
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
        self.last_write_access = Some(access);
        let user = if access.user { pf::USER } else { 0 };
        if !self.pages.contains_key(&(gva / PAGE)) {
            return Err(VcpuError::PageFault {
                gva,
                error_code: pf::WRITE | user,
            });
        }
        if self.read_only.contains(&(gva / PAGE)) {
            return Err(VcpuError::PageFault {
                gva,
                error_code: pf::PRESENT | pf::WRITE | user,
            });
        }
        let mut old = [0u8; 16];
        self.read_virt(gva, &mut old)?;
        let found = u128::from_le_bytes(old);
        if found == expected {
            self.poke(gva, &new.to_le_bytes());
        }
        Ok(found)
    }

    fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) -> Result<(), VcpuError> {
        if self.exception_pending {
            return Err(VcpuError::ExceptionPending {
                pending: 14,
                vector,
            });
        }
        self.injected.push((vector, error_code));
        self.exception_pending = true;
        Ok(())
    }
}
