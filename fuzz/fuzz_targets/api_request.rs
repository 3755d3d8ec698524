//! The control API's request handling on one connection: the fuzzer's bytes as one request or
//! several pipelined, read, routed to a fake VM and answered (`hype_api::fuzzing::request`).
//! Every answer must be a well-formed HTTP/1.1 response and the limits must hold.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| hype_api::fuzzing::request(data));
