//! x86_64 machine setup: descriptor tables, page tables, e820, MP table, CPUID, registers.
pub mod cpuid;
pub mod e820;
pub mod gdt;
pub mod mptable;
pub mod paging;
pub mod regs;
