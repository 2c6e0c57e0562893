//! The on-disk cache of compiled plugin modules. Loading a compiled module
//! (`Module::deserialize_file`) runs machine code from the file, so it is
//! `unsafe`: the file must be one this process wrote for this engine. The
//! cache makes that so: its directory is created `0700`, and is used only
//! when it is owned by the effective user and writable by nobody else;
//! entries are written to a temporary name and renamed into place, so a
//! file is never read half-written or changed under a loaded module.
//! wasmtime itself refuses (safely, with an error) an artifact from another
//! version or configuration.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A cache directory only this user can write.
#[derive(Debug, Clone)]
pub struct TrustedDir {
    dir: PathBuf,
}

impl TrustedDir {
    /// Opens (creating, `0700`) `dir`, refusing one another user owns or
    /// others can write.
    pub fn open(dir: &Path) -> io::Result<Self> {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        let meta = std::fs::symlink_metadata(dir)?;
        if !meta.is_dir() {
            return Err(io::Error::other(format!("{} is not a directory", dir.display())));
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me {
            return Err(io::Error::other(format!(
                "{} is owned by uid {}, not by this process's uid {me}",
                dir.display(),
                meta.uid()
            )));
        }
        if meta.permissions().mode() & 0o022 != 0 {
            return Err(io::Error::other(format!(
                "{} can be written by other users (mode {:o}); make it 0700",
                dir.display(),
                meta.permissions().mode() & 0o777
            )));
        }
        Ok(Self { dir: dir.to_path_buf() })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The compiled module stored as `name`, if there is one. A file that
    /// does not load (another wasmtime, a torn write) is removed.
    pub fn load(&self, engine: &wasmtime::Engine, name: &str) -> Option<wasmtime::Module> {
        let path = self.path(name);
        let meta = std::fs::symlink_metadata(&path).ok()?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        if !meta.is_file() || meta.uid() != me || meta.permissions().mode() & 0o022 != 0 {
            let _ = std::fs::remove_file(&path);
            return None;
        }
        // SAFETY: the file is in a directory only this user can write
        // (checked by `open`), is a regular file this user owns and nobody
        // else can write, and was written whole by `store` (renamed into
        // place). Entries are never rewritten in place, so the mapping
        // cannot change while the module lives.
        match unsafe { wasmtime::Module::deserialize_file(engine, &path) } {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %format!("{e:#}"), "a cached plugin module does not load; compiling it again");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Stores `bytes` as `name`: written to a temporary file, synced, and
    /// renamed into place.
    pub fn store(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        use std::io::Write as _;
        let tmp = self.path(&format!(".{name}.{}.tmp", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        let written = f.write_all(bytes).and_then(|()| f.sync_all());
        drop(f);
        match written.and_then(|()| std::fs::rename(&tmp, self.path(name))) {
            Ok(()) => Ok(()),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }
}
