//! The console backend's transmit and receive chain handling (`hype_console::fuzzing::chains`)
//! on a ring in fuzzer-filled guest memory: bytes out equal the chains' readable bytes (up to
//! the output buffer's bound), input lands in the writable buffers, used lengths stay within
//! them.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = hype_console::fuzzing::chains(data);
});
