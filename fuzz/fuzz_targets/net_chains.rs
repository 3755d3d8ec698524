//! net-tap's TX, RX and control-queue chain handling (`hype_net_tap::fuzzing::chains`) on a
//! ring in fuzzer-filled guest memory, a socket pair standing in for the tap: frames on the
//! tap within the maximum frame length and equal to their chains, used lengths within the
//! chains' writable bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = hype_net_tap::fuzzing::chains(data);
});
