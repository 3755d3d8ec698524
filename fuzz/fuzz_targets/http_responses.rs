//! block-http's handling of server responses (`hype_block_http::fuzzing::responses`): HEAD
//! and the one-byte probe when an image is opened, then range reads, with status, headers
//! and body from the input. An accepted read is exactly the bytes asked for, from the image
//! version opened; a changed ETag/Last-Modified/size is refused.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = hype_block_http::fuzzing::responses(data);
});
