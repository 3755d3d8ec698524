//! block-http's Content-Range parser on arbitrary header values.
#![no_main]

use hype_block_http::remote::ContentRange;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(r) = ContentRange::parse(s) {
        // What it accepts is a consistent range.
        let text = format!("{r:?}");
        assert!(!text.is_empty());
    }
});
