//! Errors of setting up the sandbox.

use std::path::PathBuf;

/// Why a process could not be confined.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A policy does not compile to BPF (a hype bug).
    #[error("seccomp policy {0} does not compile")]
    Compile(&'static str, #[source] seccompiler::BackendError),
    /// A refusal's errno is negative (a hype bug).
    #[error("seccomp policy {0}: a refusal has a negative errno")]
    BadErrno(&'static str),
    /// The SIGSYS handler could not be installed.
    #[error("cannot install the SIGSYS handler")]
    SigsysHandler(#[source] std::io::Error),
    /// The kernel refused the filter (or could not apply it to every thread).
    #[error("cannot install the seccomp filter")]
    Install(#[source] seccompiler::Error),
    /// Building or enforcing the Landlock ruleset failed.
    #[error("cannot set up Landlock")]
    Landlock(#[source] landlock::RulesetError),
    /// A path of a Landlock rule cannot be opened.
    #[error("cannot open {path} for a Landlock rule")]
    LandlockPath {
        /// The path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: landlock::PathFdError,
    },
    /// `--user` was given and dropping root failed.
    #[error("cannot drop root")]
    Privileges(#[source] crate::privileges::PrivilegeError),
    /// The socket could not be given to the `--user` before dropping root.
    #[error("cannot give {path} to the --user")]
    GiveSocket {
        /// The socket.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}
