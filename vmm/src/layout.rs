//! Guest physical memory layout (x86_64).
//!
//! ```text
//! 0x0000_0500  GDT                      0x0000_0520  IDT (empty)
//! 0x0000_6000  PVH hvm_start_info       0x0000_6040  PVH module list
//! 0x0000_6100  PVH memory map           0x0000_7000  zero page (boot_params)
//! 0x0000_8ff0  boot stack top           0x0000_9000  PML4
//! 0x0000_a000  PDPT                     0x0000_b000  4 page directories (4 GiB identity map)
//! 0x0002_0000  kernel command line      0x0009_fc00  EBDA (reserved)
//! 0x000e_0000  ACPI tables, RSDP first (platform acpi; reserved)
//! 0x000f_0000  MP floating pointer and MP configuration table (BIOS area, reserved)
//! 0x0010_0000  kernel (bzImage) / PVH vmlinux at its link address; initrd at the top of low RAM
//! 0xc000_0000  start of the 32-bit MMIO hole (virtio-mmio devices, IOAPIC, LAPIC, TSS)
//! 0x1_0000_0000 RAM above the hole, for guests larger than 3 GiB
//! ```

/// GDT location.
pub const GDT_ADDR: u64 = 0x500;
/// IDT location (an empty IDT is loaded before the kernel sets its own).
pub const IDT_ADDR: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// PVH module list (one entry: the initrd).
pub const PVH_MODLIST_ADDR: u64 = 0x6040;
/// PVH memory map.
pub const PVH_MEMMAP_ADDR: u64 = 0x6100;
/// Most entries the PVH memory map may have before it runs into the zero page.
pub const PVH_MEMMAP_MAX_ENTRIES: usize = (ZERO_PAGE_ADDR - PVH_MEMMAP_ADDR) as usize / 24;
/// Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer for the 64-bit entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Top-level page table.
pub const PML4_ADDR: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPT_ADDR: u64 = 0xa000;
/// First of four page directories (2 MiB pages) mapping the first 4 GiB.
pub const PD_ADDR: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Room reserved for the command line.
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// Start of the extended BIOS data area; reserved in the e820 map.
pub const EBDA_START: u64 = 0x9fc00;
/// MP floating pointer, followed by the MP configuration table.
pub const MPTABLE_ADDR: u64 = 0xf0000;
/// Room for the MP table (254 processors fit with room to spare).
pub const MPTABLE_MAX_SIZE: u64 = 0x10000;
/// End of conventional ("base") memory.
pub const BASE_MEM_END: u64 = 0xa0000;
/// Start of the BIOS area that is reported reserved (it holds the ACPI tables and the MP table).
pub const BIOS_AREA_START: u64 = ACPI_TABLES_ADDR;
/// ACPI tables (RSDP first, 16-byte aligned, where a BIOS scan would find it too).
pub const ACPI_TABLES_ADDR: u64 = 0xe0000;
/// Room for the ACPI tables, up to the MP table.
pub const ACPI_TABLES_SIZE: u64 = MPTABLE_ADDR - ACPI_TABLES_ADDR;
/// Start of high memory: kernels are loaded here or above.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole (4 GiB).
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// First virtio-mmio device window; each device gets [`VIRTIO_MMIO_SIZE`] bytes.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio register window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// KVM's three-page TSS region (in the hole).
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// KVM's identity-map page (in the hole, just below the TSS).
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;
/// IOAPIC MMIO base.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// Local APIC MMIO base.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
