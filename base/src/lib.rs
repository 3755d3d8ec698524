//! The small pieces every hype program shares, whatever it is: one way to format an error
//! chain, one way to end `main` with the right exit code, one logging setup, guest RAM files
//! that are safe to share ([`memfd`]), one way to spell sizes and durations on a command line.
//!
//! * [`options`]: the `HEAD,key=value,...` grammar of every spec string.
//! * [`redact`]: secrets (user information, query tokens) out of URLs that are printed.
//! * [`signals`]: the one stop-on-signal handler (a flag and an optional wake-up eventfd).
//! * [`terminal`]: raw mode that is always restored, and the `Ctrl-a` escape filter, for
//!   every hype program that owns a terminal (the VMM's serial console, `hype console`).
//!
//! May depend on: `std`, `libc`, `clap`, `log`/`env_logger`, `thiserror`. Nothing KVM-, virtio- or
//! network-specific belongs here: the VMM, the supervisor and every backend link it.

mod error_chain;
mod exit;
pub mod log_limit;
mod logging;
pub mod memfd;
pub mod options;
pub mod redact;
pub mod signals;
pub mod terminal;
mod units;

pub use error_chain::error_chain;
pub use exit::{
    error_line, exit_code, exit_code_number, parse_args_from, parse_command_line, report_exit,
    usage_error_line, CommandError, EXIT_RUNTIME, EXIT_USAGE,
};
pub use logging::init_logging;
pub use redact::redact_url;
pub use units::{format_duration, format_size, parse_bytes, parse_duration, parse_size};
