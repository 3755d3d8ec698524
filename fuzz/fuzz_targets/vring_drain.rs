//! The shared vring drain loop (`hype_daemon::vring::Drain`) every backend runs when a ring is
//! kicked, over a split virtqueue whose descriptor table, avail ring and indices are all from
//! the input: garbage avail indices, heads out of range, looping chains. The loop must end and
//! never report more used chains than it completed.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let size = u16::from_le_bytes([data[0], data[1]]);
    let event_idx = data[2] & 1 == 1;
    let rounds = data[3] % 8;
    hype_daemon::fuzzing::drain(&data[4..], size, event_idx, rounds);
});
