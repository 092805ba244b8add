//! One agent per pin directory: two agents sharing pinned maps would overwrite each
//! other's services and slots. The running agent holds an exclusive `flock` on the
//! directory itself (bpffs holds no plain files to lock); the kernel releases it
//! when the agent exits, however it exits, so a kill -9 leaves no stale lock.

use std::{fs::File, os::fd::AsRawFd as _, path::Path};

use anyhow::{bail, Context as _, Result};

use super::loader::ensure_bpffs;

/// Held for the agent's lifetime.
pub struct PinDirLock {
    directory: File,
}

impl PinDirLock {
    /// Takes the lock, creating the directory if needed; fails at once, saying so,
    /// when another agent holds it.
    pub fn acquire(dir: &Path) -> Result<PinDirLock> {
        ensure_bpffs(dir)?;
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating pin directory {}", dir.display()))?;
        let directory =
            File::open(dir).with_context(|| format!("opening pin directory {}", dir.display()))?;
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(directory.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let error = std::io::Error::last_os_error();
            if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
                bail!(
                    "another agent is running with --pin-dir {}: stop it first (two agents would overwrite each other's maps)",
                    dir.display()
                );
            }
            return Err(error).with_context(|| format!("locking {}", dir.display()));
        }
        Ok(PinDirLock { directory })
    }

    /// Takes the lock again (creating the directory) if `dir` is no longer the
    /// directory locked: it was removed, and a lock on a deleted directory keeps
    /// nobody out.
    pub fn renew(&mut self, dir: &Path) -> Result<()> {
        use std::os::unix::fs::MetadataExt as _;
        let held = self.directory.metadata()?;
        let same = std::fs::metadata(dir)
            .is_ok_and(|now| (held.dev(), held.ino()) == (now.dev(), now.ino()));
        if !same {
            *self = PinDirLock::acquire(dir)?;
        }
        Ok(())
    }
}
