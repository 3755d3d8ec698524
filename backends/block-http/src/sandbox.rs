//! The sandbox of `hype block-http`: HTTP(S) range requests to the image's server (TCP to its
//! port only), name resolution, TLS roots, and the overlay file; nothing else.
//!
//! Unlike the other backends it starts threads while it opens the image (the HTTP client's
//! runtime, the fetchers), so its Landlock rules are applied first, in [`restrict_files`],
//! and the seccomp filter once the socket is bound.

use std::path::Path;

use hype_daemon::sandbox::{
    Cond, FsAccess, Group, Policy, Refusal, Rule, Sandbox, CLONE3_REFUSED, RUNTIME, VHOST_USER,
};
use reqwest::Url;

use crate::Args;

const AF_UNIX: u64 = libc::AF_UNIX as u64;
const AF_INET: u64 = libc::AF_INET as u64;
const AF_INET6: u64 = libc::AF_INET6 as u64;

/// The HTTP client (reqwest over tokio, rustls) once serving: TCP sockets to the server
/// (reconnects included), the runtime's epoll and wake-ups, name resolution by glibc
/// (`/etc/hosts`, DNS over UDP/TCP). TLS roots and the CA file are read before.
pub static HTTP_CLIENT: Group = Group {
    name: "http-client",
    why: "reqwest/tokio/rustls: TCP/UDP sockets to the server and DNS, name resolution",
    rules: &[
        Rule::when(
            "socket",
            libc::SYS_socket,
            &[&[Cond::eq(0, AF_INET)], &[Cond::eq(0, AF_INET6)]],
        ),
        Rule::always("connect", libc::SYS_connect),
        Rule::always("getsockopt", libc::SYS_getsockopt),
        Rule::always("setsockopt", libc::SYS_setsockopt),
        Rule::always("getsockname", libc::SYS_getsockname),
        Rule::always("getpeername", libc::SYS_getpeername),
        Rule::always("sendto", libc::SYS_sendto),
        Rule::always("recvfrom", libc::SYS_recvfrom),
        // glibc's resolver sends the A and AAAA queries together.
        Rule::always("sendmmsg", libc::SYS_sendmmsg),
        // Reading resolver configuration again on later lookups (Landlock limits the paths);
        // uname for the resolver's default domain.
        Rule::always("openat", libc::SYS_openat),
        Rule::always("uname", libc::SYS_uname),
    ],
};

/// The overlay file (`--overlay`): copy-on-write granules, its bitmap and FLUSH.
pub static OVERLAY: Group = Group {
    name: "overlay",
    why: "--overlay: pread/pwrite of granules and bitmap, fdatasync/fsync for FLUSH, \
          fallocate (punching holes) for DISCARD/WRITE_ZEROES",
    rules: &[
        Rule::always("pread64", libc::SYS_pread64),
        Rule::always("pwrite64", libc::SYS_pwrite64),
        Rule::always("fdatasync", libc::SYS_fdatasync),
        Rule::always("fsync", libc::SYS_fsync),
        Rule::always("fallocate", libc::SYS_fallocate),
    ],
};

/// glibc's resolver first asks nscd over a Unix socket and copes with failure; a Unix socket
/// could reach any service on the host, so it is refused.
pub static UNIX_SOCKET_REFUSED: Refusal = Refusal {
    rule: Rule::when("socket", libc::SYS_socket, &[&[Cond::eq(0, AF_UNIX)]]),
    errno: libc::EACCES,
    why: "glibc tries nscd first and copes with failure; no Unix socket may be reached",
};

/// Everything `hype block-http` may call once serving.
pub static POLICY: Policy = Policy {
    name: "block-http",
    groups: &[&RUNTIME, &VHOST_USER, &HTTP_CLIENT, &OVERLAY],
    refusals: &[CLONE3_REFUSED, UNIX_SOCKET_REFUSED],
};

/// Files name resolution reads (glibc, files and dns built in), where they exist.
const RESOLVER_FILES: &[&str] = &[
    "/etc/hosts",
    "/etc/resolv.conf",
    "/etc/nsswitch.conf",
    "/etc/host.conf",
    "/etc/gai.conf",
    "/etc/services",
];

/// Where the platform verifier finds the system's TLS roots, where they exist.
const TLS_ROOTS: &[&str] = &[
    "/etc/ssl",
    "/etc/pki",
    "/usr/lib/ssl",
    "/usr/share/ca-certificates",
    "/usr/local/share/ca-certificates",
];

/// The proxy variables reqwest honours: their ports are allowed as TCP destinations too.
const PROXY_VARS: &[&str] = &[
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "ALL_PROXY",
    "all_proxy",
];

/// Adds block-http's Landlock rules to `sandbox`: the socket directory (the socket is bound
/// after they apply), the overlay, `--ca-cert`, `--credentials-file`, resolver files and TLS roots (read only), TCP
/// to the URL's port, DNS and any proxy's port.
pub fn add_rules(sandbox: &mut Sandbox, args: &Args) {
    hype_daemon::sandbox::allow_socket_bind(sandbox, &args.device.listen);
    if let Some(p) = &args.overlay {
        sandbox.files().allow(p, FsAccess::ReadWrite);
    }
    if let Some(p) = &args.ca_cert {
        sandbox.files().allow_if_exists(p, FsAccess::Read);
    }
    if let Some(p) = &args.credentials_file {
        sandbox.files().allow_if_exists(p, FsAccess::Read);
    }
    for p in RESOLVER_FILES.iter().chain(TLS_ROOTS) {
        sandbox.files().allow_if_exists(p, FsAccess::Read);
    }
    if let Some(port) = Url::parse(&args.url)
        .ok()
        .and_then(|u| u.port_or_known_default())
    {
        sandbox.files().allow_tcp_connect(port);
    }
    sandbox.files().allow_tcp_connect(53);
    for var in PROXY_VARS {
        if let Some(port) = std::env::var(var)
            .ok()
            .and_then(|v| Url::parse(&v).ok())
            .and_then(|u| u.port_or_known_default())
        {
            sandbox.files().allow_tcp_connect(port);
        }
    }
}

/// Drops root (`--user`), then applies the rules of [`add_rules`] before the HTTP client and
/// the fetchers start; creates
/// the overlay empty first if it is missing (a Landlock rule needs the file; the overlay code
/// takes an empty file as new).
pub fn restrict_files(sandbox: &mut Sandbox, args: &Args) -> Result<(), crate::Error> {
    // --user: drop first, while single-threaded; the overlay is then created as the user.
    sandbox
        .drop_privileges()
        .map_err(|e| crate::Error::Sandbox(hype_daemon::Error::Sandbox(e)))?;
    if !sandbox.is_on() {
        return Ok(());
    }
    if let Some(p) = &args.overlay {
        create_if_missing(p).map_err(|source| crate::Error::OverlayCreate {
            path: p.clone(),
            source,
        })?;
    }
    hype_daemon::sandbox::restrict_files(sandbox)?;
    Ok(())
}

fn create_if_missing(p: &Path) -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(p)
        .map(drop)
}
