//! block-http's overlay file: opening a file whose header and bitmap come from the input, then
//! reading from it, must fail cleanly or give consistent answers, never panic.
#![no_main]

use hype_block_http::Overlay;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("hype-fuzz-overlay-{}", std::process::id()));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    const DISK: u64 = 1 << 22;
    if let Ok(o) = Overlay::open(&path, DISK, "fuzz-identity", 65536) {
        let g = o.granule();
        assert!(g > 0);
        let mut buf = vec![0u8; 4096];
        for i in 0..(DISK / g).min(64) {
            if o.is_local(i) {
                let _ = o.read_local(i * g, &mut buf);
            }
        }
        assert!(o.local_granules() <= DISK / g);
    }
    let _ = std::fs::remove_file(&path);
});
