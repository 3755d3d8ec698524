//! Checking the guest memory a frontend hands over before any worker touches it.
//!
//! vhost-user-backend maps each region of SET_MEM_TABLE and installs the new memory before it
//! calls the backend's `update_memory`. A region larger than its file, or a memfd that the
//! frontend can still shrink, would kill this process with SIGBUS on first touch (a frontend
//! that is buggy or hostile must not be able to do that). [`accept_guest_memory`] checks every
//! region with [`hype_base::memfd::check_region`]; when one fails, it replaces the installed
//! memory with an empty map, so the rings cannot reach the mapping (every access is an address
//! error instead), and refuses the message.

use std::io;

use hype_base::memfd::{check_region, RegionError};
use vm_memory::{
    GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

/// Why a frontend's memory table was refused.
#[derive(Debug, thiserror::Error)]
pub enum MemoryRefused {
    /// A region has no file behind it (cannot happen with memory received over the socket).
    #[error("memory region {index} at guest address {gpa:#x} is not backed by a file")]
    NoFile {
        /// Index of the region.
        index: usize,
        /// Its guest physical address.
        gpa: u64,
    },
    /// A region cannot be used safely.
    #[error("memory region {index} at guest address {gpa:#x} is unsafe to map")]
    Unsafe {
        /// Index of the region.
        index: usize,
        /// Its guest physical address.
        gpa: u64,
        /// What is wrong with it.
        #[source]
        source: RegionError,
    },
}

/// Checks the memory `mem` now holds (call it from `VhostUserBackend::update_memory`). On
/// failure the memory is replaced by an empty map and the error is returned, to be answered to
/// the frontend.
pub fn accept_guest_memory(mem: &GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
    let verdict = check_all(&mem.memory());
    match verdict {
        Ok(()) => Ok(()),
        Err(e) => {
            log::error!(
                "refusing the frontend's guest memory: {}",
                hype_base::error_chain(&e)
            );
            match mem.lock() {
                Ok(guard) => guard.replace(GuestMemoryMmap::default()),
                Err(poisoned) => poisoned.into_inner().replace(GuestMemoryMmap::default()),
            }
            Err(io::Error::new(io::ErrorKind::InvalidInput, e))
        }
    }
}

/// Checks every region of `mem`.
pub fn check_all(mem: &GuestMemoryMmap) -> Result<(), MemoryRefused> {
    for (index, r) in mem.iter().enumerate() {
        let gpa = r.start_addr().0;
        let Some(fo) = r.file_offset() else {
            return Err(MemoryRefused::NoFile { index, gpa });
        };
        check_region(fo.file(), fo.start(), r.len()).map_err(|source| MemoryRefused::Unsafe {
            index,
            gpa,
            source,
        })?;
    }
    Ok(())
}
