//! virtio-blk request parsing and execution on fuzzed guest memory: descriptor table, headers,
//! data and status buffers all come from the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 5 {
        return;
    }
    let head = u16::from_le_bytes([data[0], data[1]]);
    let table_size = u16::from_le_bytes([data[2], data[3]]);
    let read_only = data[4] & 1 == 1;
    hype_block::fuzzing::request(&data[5..], head, table_size, read_only);
});
