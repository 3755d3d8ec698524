//! Guest RAM files shared with other processes: created sealed against resizing, and checked
//! before they are used.
//!
//! A vhost-user backend maps the frontend's memory file. If the file is shorter than the region
//! the frontend describes, or is truncated later, touching the missing pages kills the backend
//! with SIGBUS. So the VMM (and the test kit) create the file with [`create_sealed`]: its size
//! is fixed by `F_SEAL_SHRINK | F_SEAL_GROW` and no other seal can be added (`F_SEAL_SEAL`, so
//! one backend cannot freeze the file with `F_SEAL_FUTURE_WRITE` against the next). A backend
//! checks every region with [`check_region`] before it uses the memory.

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};

/// The seals [`create_sealed`] puts on a guest RAM file.
pub const GUEST_RAM_SEALS: libc::c_int =
    libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// Why a memory region cannot be used safely.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    /// fstat on the region's file failed.
    #[error("cannot stat the memory file")]
    Stat(#[source] io::Error),
    /// The region reaches beyond the end of its file: touching it would raise SIGBUS.
    #[error("region {offset:#x}+{len:#x} reaches beyond the end of its {file_size:#x}-byte file")]
    BeyondFile {
        /// Offset of the region in the file.
        offset: u64,
        /// Length of the region.
        len: u64,
        /// The file's size.
        file_size: u64,
    },
    /// The file is a memfd that can still shrink: the frontend could truncate it under us.
    #[error("the memory file is a memfd not sealed against shrinking (F_SEAL_SHRINK)")]
    NotSealed,
}

/// Why [`create_sealed`] failed.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// memfd_create failed.
    #[error("cannot create a memory file")]
    Create(#[source] io::Error),
    /// ftruncate failed.
    #[error("cannot size the memory file to {size} bytes")]
    Resize {
        /// The size asked for.
        size: u64,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// F_ADD_SEALS failed.
    #[error("cannot seal the memory file")]
    Seal(#[source] io::Error),
}

/// Creates a memfd of `size` bytes named `name`, sealed with [`GUEST_RAM_SEALS`].
pub fn create_sealed(name: &CStr, size: u64) -> Result<File, CreateError> {
    // SAFETY: `name` is a valid NUL-terminated string; the return value is checked.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(CreateError::Create(io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|source| CreateError::Resize { size, source })?;
    // SAFETY: F_ADD_SEALS on a descriptor we own, with a valid seal mask.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, GUEST_RAM_SEALS) } < 0 {
        return Err(CreateError::Seal(io::Error::last_os_error()));
    }
    Ok(file)
}

/// The seals of `file`, or `None` when it is not a file that supports sealing (a regular file,
/// hugetlbfs before memfd, ...).
pub fn seals(file: &File) -> Option<libc::c_int> {
    // SAFETY: F_GET_SEALS only reads the descriptor's state.
    let s = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    (s >= 0).then_some(s)
}

/// Checks that `offset..offset+len` of `file` can be touched without SIGBUS, now and later:
/// within the file's size, and, when the file supports seals (a memfd), sealed against
/// shrinking. Files that cannot be sealed (a regular or hugetlbfs file shared by the frontend)
/// are checked for size only: whoever can truncate them is the frontend itself.
pub fn check_region(file: &File, offset: u64, len: u64) -> Result<(), RegionError> {
    let file_size = file.metadata().map_err(RegionError::Stat)?.len();
    if offset.checked_add(len).is_none_or(|end| end > file_size) {
        return Err(RegionError::BeyondFile {
            offset,
            len,
            file_size,
        });
    }
    match seals(file) {
        Some(s) if s & libc::F_SEAL_SHRINK == 0 => Err(RegionError::NotSealed),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_memfd_keeps_its_size() {
        let f = create_sealed(c"hype-test", 1 << 20).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 1 << 20);
        assert!(f.set_len(4096).is_err(), "shrinking a sealed memfd");
        assert!(f.set_len(2 << 20).is_err(), "growing a sealed memfd");
        // SAFETY: F_ADD_SEALS on a descriptor we own.
        let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_FUTURE_WRITE) };
        assert!(r < 0, "another seal could be added");
        assert_eq!(seals(&f), Some(GUEST_RAM_SEALS));
        check_region(&f, 0, 1 << 20).unwrap();
        check_region(&f, 4096, (1 << 20) - 4096).unwrap();
    }

    #[test]
    fn regions_beyond_the_file_or_unsealed_memfds_are_refused() {
        let f = create_sealed(c"hype-test", 1 << 20).unwrap();
        assert!(matches!(
            check_region(&f, 0, 2 << 20),
            Err(RegionError::BeyondFile { .. })
        ));
        assert!(matches!(
            check_region(&f, u64::MAX, 2),
            Err(RegionError::BeyondFile { .. })
        ));
        // SAFETY: valid name and flags; checked.
        let fd = unsafe { libc::memfd_create(c"hype-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor nobody else owns.
        let unsealed = unsafe { File::from_raw_fd(fd) };
        unsealed.set_len(1 << 20).unwrap();
        assert!(matches!(
            check_region(&unsealed, 0, 1 << 20),
            Err(RegionError::NotSealed)
        ));
        // A regular file cannot be sealed: checked for size only.
        let path = std::env::temp_dir().join(format!("hype-memfd-test-{}", std::process::id()));
        let regular = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        regular.set_len(8192).unwrap();
        check_region(&regular, 0, 8192).unwrap();
        assert!(check_region(&regular, 0, 8193).is_err());
        std::fs::remove_file(&path).unwrap();
    }
}
