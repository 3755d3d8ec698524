//! The VMM's vhost-user frontend against a hostile backend
//! (`hype_frontend::fuzzing::handshake`): a thread on the other end of a socket pair answers
//! the handshake (features, protocol features, BACKEND_REQ, GET_QUEUE_NUM, GET_CONFIG) with
//! replies from the input. It must end in an error or a consistent success, never hang.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = hype_frontend::fuzzing::handshake(data);
});
