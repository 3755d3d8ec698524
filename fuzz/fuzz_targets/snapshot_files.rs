//! The snapshot format's readers: a manifest, `state.bin` and `memory.bin` from the fuzzer,
//! through the checks and decoders a restore runs (`hype_vmm::fuzzing::snapshot_files`). They
//! must refuse what they cannot read, never panic or allocate by a length field, and what they
//! accept must encode back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| hype_vmm::fuzzing::snapshot_files(data));
