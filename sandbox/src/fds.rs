//! Closing the file descriptors a hype process inherited by accident: anything but stdio and
//! the sockets systemd hands over (`LISTEN_FDS`, from fd 3, when `LISTEN_PID` is this process).
//! A descriptor left open by a careless parent (a shell's, a supervisor's) would otherwise stay
//! reachable from a confined process, whatever its Landlock rules say.

/// `SD_LISTEN_FDS_START`.
const LISTEN_FDS_START: u32 = 3;

/// How many descriptors from fd 3 systemd passed to this process (0 when none, or when
/// `LISTEN_PID` names another process).
fn listen_fds() -> u32 {
    let pid_matches = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
        .is_some_and(|p| p == std::process::id());
    if !pid_matches {
        return 0;
    }
    std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.trim().parse::<u32>().ok())
        .unwrap_or(0)
        .min(4096)
}

/// Closes every inherited descriptor above stderr except systemd's `LISTEN_FDS`. Call first
/// thing in `main`, before anything opens a file. Returns how many it closed.
pub fn close_inherited_fds() -> usize {
    let first = LISTEN_FDS_START + listen_fds();
    let open = open_fds_from(first);
    // SAFETY: close_range(2) takes no pointers; nothing in this process uses these
    // descriptors (they were inherited, and main has opened nothing yet).
    let r = unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, 0u32) };
    if r != 0 {
        // Kernels before 5.9: close them one by one.
        for fd in &open {
            // SAFETY: as above, for one descriptor.
            unsafe { libc::close(*fd) };
        }
    }
    open.len()
}

/// The descriptors open from `first` on, from /proc/self/fd (for the count and the fallback).
fn open_fds_from(first: u32) -> Vec<libc::c_int> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    let fds: Vec<libc::c_int> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<libc::c_int>().ok())
        .filter(|fd| u32::try_from(*fd).is_ok_and(|f| f >= first))
        .collect();
    // The directory's own descriptor was among them and is closed by now.
    fds.into_iter()
        .filter(|fd| {
            // SAFETY: F_GETFD only queries the descriptor.
            let flags = unsafe { libc::fcntl(*fd, libc::F_GETFD) };
            flags >= 0
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_fds_only_for_this_process() {
        // Nothing set in the test environment: no systemd descriptors.
        assert_eq!(listen_fds(), 0);
    }
}
