//! Checking, before anything starts, that a TAP interface can be opened the way
//! `hype net-tap` opens it: `TUNSETIFF` on `/dev/net/tun`, then close. A TAP that did not
//! exist is created by the probe and vanishes again when it is closed.

use std::fs::File;
use std::os::fd::AsRawFd;

use super::problem::Problem;

/// Opens and closes TAP `name`; `what` names the option for messages.
pub fn probe_tap(what: &str, name: &str) -> Result<(), Problem> {
    let tun = File::options()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|source| Problem::TunDevice {
            what: what.to_string(),
            source,
        })?;
    let base = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    let mut result = tunsetiff(&tun, name, base);
    if result
        .as_ref()
        .is_err_and(|e| e.raw_os_error() == Some(libc::EINVAL))
    {
        // An existing multi-queue TAP accepts only multi-queue opens.
        let tun2 = File::options()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .map_err(|source| Problem::TunDevice {
                what: what.to_string(),
                source,
            })?;
        result = tunsetiff(&tun2, name, base | libc::IFF_MULTI_QUEUE as libc::c_short);
    }
    result.map_err(|source| match source.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => Problem::TapPermission {
            what: what.to_string(),
            name: name.to_string(),
        },
        Some(libc::EBUSY) => Problem::TapBusy {
            what: what.to_string(),
            name: name.to_string(),
        },
        _ => Problem::Tap {
            what: what.to_string(),
            name: name.to_string(),
            source,
        },
    })
}

/// `TUNSETIFF` with `flags` on an open `/dev/net/tun`.
fn tunsetiff(tun: &File, name: &str, flags: libc::c_short) -> std::io::Result<()> {
    // SAFETY: ifreq is plain old data (a name array and a union of integers); all zeroes is a
    // valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    // The caller checked the name is at most 15 bytes; copy at most IFNAMSIZ - 1 regardless so
    // the name stays NUL-terminated.
    for (dst, src) in ifr
        .ifr_name
        .iter_mut()
        .zip(name.bytes().take(libc::IFNAMSIZ - 1))
    {
        *dst = src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = flags;
    // SAFETY: TUNSETIFF reads and writes an ifreq; `ifr` is a valid ifreq owned by this frame
    // for the whole call, and `tun` is an open /dev/net/tun.
    let r = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
