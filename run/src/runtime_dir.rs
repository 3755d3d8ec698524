//! The private runtime directory of one `hype run`: created with mode 0700 under
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
    /// Creates `base()/hype-NAME.PID` with mode 0700; fails if it exists.
    pub fn create(name: &str) -> Result<Self, RunError> {
        let path = base().join(format!("hype-{name}.{}", std::process::id()));
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
