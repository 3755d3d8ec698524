//! The sandbox of `hype console`: guest output to the terminal, pty, client socket or log
//! files that are open already, input from them, the terminal's size and mode, accepting
//! console clients; no path except removing its sockets on exit.

use hype_daemon::sandbox::{
    Cond, Group, Policy, Rule, CLONE3_REFUSED, OPEN_REFUSED, RUNTIME, VHOST_USER,
};

const TIOCGWINSZ: u64 = libc::TIOCGWINSZ;
const TCGETS: u64 = libc::TCGETS;
const TCSETS: u64 = libc::TCSETS;
const TCSETSW: u64 = libc::TCSETSW;
const TCSETSF: u64 = libc::TCSETSF;

/// The console's I/O thread: reads and writes on the endpoint, the terminal's size on
/// SIGWINCH and its mode restored on exit, and client connections on `--output socket:`.
pub static CONSOLE_IO: Group = Group {
    name: "console",
    why: "endpoint I/O, terminal size (TIOCGWINSZ) and mode (TCGETS/TCSETS*), console clients",
    rules: &[
        // Console clients on --output socket: (input, and notices sent without SIGPIPE).
        Rule::always("recvfrom", libc::SYS_recvfrom),
        Rule::always("sendto", libc::SYS_sendto),
        Rule::when(
            "ioctl",
            libc::SYS_ioctl,
            &[
                &[Cond::eq(1, TIOCGWINSZ)],
                &[Cond::eq(1, TCGETS)],
                &[Cond::eq(1, TCSETS)],
                &[Cond::eq(1, TCSETSW)],
                &[Cond::eq(1, TCSETSF)],
            ],
        ),
    ],
};

/// Everything `hype console` may call once serving.
pub static POLICY: Policy = Policy {
    name: "console",
    groups: &[&RUNTIME, &VHOST_USER, &CONSOLE_IO],
    refusals: &[CLONE3_REFUSED, OPEN_REFUSED],
};
