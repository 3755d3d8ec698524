//! The one logging setup every backend uses.

/// Initialises `env_logger` once for the process.
///
/// The filter comes from `HYPE_LOG`, then `RUST_LOG`, then defaults to `info`. Calling this more
/// than once (for example from tests) is harmless.
pub fn init_logging() {
    let filter = std::env::var("HYPE_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".to_string());
    let _ = env_logger::Builder::new()
        .parse_filters(&filter)
        .format_timestamp_millis()
        .try_init();
}
