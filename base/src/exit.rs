//! Exit codes of hype's binaries: 2 when the command line was wrong, 1 when running failed.
//!
//! Every backend binary (and the `hype` subcommands that run the same backends) reports a
//! failure the same way: the error and its sources on one line of stderr, prefixed by the
//! program name, and an exit code a supervisor can act on:
//!
//! * [`EXIT_USAGE`] (2): restarting with the same command line fails the same way. Bad or
//!   contradictory arguments, input files or URLs named on the command line that are missing,
//!   unreadable or of the wrong kind, a socket path in use.
//! * [`EXIT_RUNTIME`] (1): everything else, above all failures after serving started.

use std::process::ExitCode;

/// Exit code of a usage error (the same code clap uses for bad arguments).
pub const EXIT_USAGE: u8 = 2;

/// Exit code of a runtime error.
pub const EXIT_RUNTIME: u8 = 1;

/// An error that can end a backend command, classified for its exit code.
///
/// Implement it for a backend's top-level error: [`is_usage`](Self::is_usage) says whether
/// the user must change the command line (exit 2) or something failed while running (exit 1).
/// Wrapped errors of other crates delegate to their own implementation.
pub trait CommandError: std::error::Error {
    /// Whether this error is the command line's fault: bad or contradictory arguments, an
    /// input named on the command line that is missing, unusable or in use.
    fn is_usage(&self) -> bool;
}

/// The exit code for `err`: [`EXIT_USAGE`] or [`EXIT_RUNTIME`].
pub fn exit_code(err: &dyn CommandError) -> ExitCode {
    ExitCode::from(exit_code_number(err))
}

/// The exit code for `err` as a number, for callers that compare or log it.
pub fn exit_code_number(err: &dyn CommandError) -> u8 {
    if err.is_usage() {
        EXIT_USAGE
    } else {
        EXIT_RUNTIME
    }
}

/// The line a binary prints for `err`: `program: error: source: source`, always one line
/// (line breaks inside messages become spaces).
pub fn error_line(program: &str, err: &dyn std::error::Error) -> String {
    let chain = crate::error_chain(err);
    let flat: Vec<&str> = chain
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    format!("{program}: {}", flat.join(" "))
}

/// Ends a program's `main`: success, or the error on one line of stderr and its exit code.
///
/// ```no_run
/// # #[derive(Debug, thiserror::Error)] #[error("failed")] struct Failed;
/// # impl hype_base::CommandError for Failed { fn is_usage(&self) -> bool { false } }
/// # fn run() -> Result<(), Failed> { Ok(()) }
/// fn main() -> std::process::ExitCode {
///     hype_base::report_exit("hype-example", run())
/// }
/// ```
pub fn report_exit<E: CommandError>(program: &str, result: Result<(), E>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}", error_line(program, &e));
            exit_code(&e)
        }
    }
}

/// Parses the process's command line into `P`. `--help` and `--version` print as usual and
/// give `Err(ExitCode::SUCCESS)`; a bad command line prints clap's message on one line of
/// stderr and gives `Err` with [`EXIT_USAGE`].
///
/// ```no_run
/// # #[derive(clap::Parser)] struct Cli {}
/// fn main() -> std::process::ExitCode {
///     let cli: Cli = match hype_base::parse_command_line("hype-example") {
///         Ok(cli) => cli,
///         Err(code) => return code,
///     };
///     std::process::ExitCode::SUCCESS
/// }
/// ```
pub fn parse_command_line<P: clap::Parser>(program: &str) -> Result<P, ExitCode> {
    parse_args_from(program, std::env::args_os())
}

/// Like [`parse_command_line`], for an explicit argument list (the first item is the program).
pub fn parse_args_from<P, I, T>(program: &str, args: I) -> Result<P, ExitCode>
where
    P: clap::Parser,
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    match P::try_parse_from(args) {
        Ok(p) => Ok(p),
        Err(e) if !e.use_stderr() => {
            // --help and --version go to stdout.
            let _ = e.print();
            Err(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("{}", usage_error_line(program, &e));
            Err(ExitCode::from(EXIT_USAGE))
        }
    }
}

/// clap's error message reduced to one line: its first paragraph (the error, and for example
/// the missing arguments it lists), without the `error: ` prefix, then a pointer to `--help`.
pub fn usage_error_line(program: &str, err: &clap::Error) -> String {
    let text = err.to_string();
    let paragraph: Vec<&str> = text
        .lines()
        .map(str::trim)
        .skip_while(|l| l.is_empty())
        .take_while(|l| !l.is_empty())
        .collect();
    let message = paragraph.join(" ");
    let message = message.strip_prefix("error: ").unwrap_or(&message);
    let message = if message.is_empty() {
        "invalid arguments"
    } else {
        message
    };
    format!("{program}: {message} (see --help)")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    #[derive(Debug, thiserror::Error)]
    #[error("outer\nsecond line")]
    struct Multi(#[source] io::Error);

    impl CommandError for Multi {
        fn is_usage(&self) -> bool {
            false
        }
    }

    #[test]
    fn error_line_is_one_line_with_the_chain() {
        let e = Multi(io::Error::other("inner\n"));
        assert_eq!(error_line("prog", &e), "prog: outer second line: inner");
    }

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[arg(long)]
        count: u8,
    }

    #[test]
    fn clap_errors_become_one_usage_line() {
        let err = <Cli as clap::Parser>::try_parse_from(["prog", "--count", "x"]).unwrap_err();
        let line = usage_error_line("prog", &err);
        assert!(!line.contains('\n'), "{line}");
        assert!(
            line.starts_with("prog: invalid value 'x' for '--count"),
            "{line}"
        );
        assert!(line.ends_with("(see --help)"), "{line}");
        let err = <Cli as clap::Parser>::try_parse_from(["prog"]).unwrap_err();
        let line = usage_error_line("prog", &err);
        assert_eq!(
            line,
            "prog: the following required arguments were not provided: --count <COUNT> (see --help)"
        );
        assert!(parse_args_from::<Cli, _, _>("prog", ["prog", "--count", "300"]).is_err());
        let cli = parse_args_from::<Cli, _, _>("prog", ["prog", "--count", "3"]).unwrap();
        assert_eq!(cli.count, 3);
    }
}
