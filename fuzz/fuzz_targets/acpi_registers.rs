//! The ACPI registers the guest reaches by port I/O (the power device and GED event port, the
//! hot-plug slot registers) under any sequence of reads and writes, any port, width and value,
//! interleaved with hot-plug, removal, the power button and a snapshot. What they answer must
//! match a model of the registers (`hype_vmm::fuzzing::acpi_registers`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| hype_vmm::fuzzing::acpi_registers(data));
