//! The private runtime directory of one `hype run`: created fresh, with an unpredictable name
//! and mode 0700, under
//! `$XDG_RUNTIME_DIR` (or the system temporary directory), holds the backends' sockets, and is
//! removed with everything in it when the run ends.

use std::fs::DirBuilder;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::problem::RunError;

/// A runtime directory that is removed on drop.
#[derive(Debug)]
pub struct RuntimeDir {
    path: PathBuf,
}

/// The directory runtime directories go in.
pub fn base() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if Path::new(&d).is_absolute() && Path::new(&d).is_dir() => PathBuf::from(d),
        _ => std::env::temp_dir(),
    }
}

impl RuntimeDir {
    /// Creates `base()/hype-NAME.PID.RANDOM` with mode 0700; fails if it exists. The random
    /// part makes the name unpredictable to other local users.
    pub fn create(name: &str) -> Result<Self, RunError> {
        let path = base().join(format!(
            "hype-{name}.{}.{:016x}",
            std::process::id(),
            random_u64()
        ));
        let err = |source| RunError::RuntimeDir {
            path: path.clone(),
            source,
        };
        DirBuilder::new().mode(0o700).create(&path).map_err(err)?;
        let dir = RuntimeDir { path: path.clone() };
        // The umask can only take bits away; make it exactly 0700 anyway.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
        Ok(dir)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// 64 bits from the kernel's random source (`getrandom(2)`); falls back to a hash of the time
/// and the PID if that is unavailable (the directory is still created exclusively).
fn random_u64() -> u64 {
    let mut v = [0u8; 8];
    // SAFETY: getrandom writes at most `v.len()` bytes into the buffer we own.
    let n = unsafe { libc::getrandom(v.as_mut_ptr().cast(), v.len(), 0) };
    if n == v.len() as isize {
        return u64::from_ne_bytes(v);
    }
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one((std::time::SystemTime::now(), std::process::id()))
}

impl Drop for RuntimeDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            log::warn!(
                "cannot remove runtime directory {}: {e}",
                self.path.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unpredictable_and_private() {
        let a = RuntimeDir::create("rtdtest").unwrap();
        let b = RuntimeDir::create("rtdtest").unwrap();
        assert_ne!(
            a.path(),
            b.path(),
            "two runs of one PID got the same directory"
        );
        for d in [&a, &b] {
            let name = d.path().file_name().unwrap().to_str().unwrap();
            let random = name.rsplit('.').next().unwrap();
            assert_eq!(random.len(), 16, "{name}");
            assert!(random.chars().all(|c| c.is_ascii_hexdigit()), "{name}");
            let mode = std::fs::metadata(d.path()).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700, "{name}");
        }
        let (pa, pb) = (a.path().to_path_buf(), b.path().to_path_buf());
        drop((a, b));
        assert!(!pa.exists() && !pb.exists());
    }
}
