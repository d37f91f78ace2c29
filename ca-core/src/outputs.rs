//! Writing results: all or nothing, never over an existing file.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::error::{CoreError, Result};

/// Files to be written together.
#[derive(Default)]
pub struct OutputSet {
    files: Vec<(PathBuf, Vec<u8>, u32)>,
}

impl std::fmt::Debug for OutputSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Contents may be private keys.
        f.debug_list().entries(self.files.iter().map(|(p, _, _)| p)).finish()
    }
}

impl OutputSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// A public file (certificate, CRL, bundle): mode 0644.
    pub fn add(&mut self, path: impl Into<PathBuf>, contents: impl Into<Vec<u8>>) -> &mut Self {
        self.files.push((path.into(), contents.into(), 0o644));
        self
    }

    /// A secret file (a private key, a Secret manifest): mode 0600.
    pub fn add_private(&mut self, path: impl Into<PathBuf>, contents: impl Into<Vec<u8>>) -> &mut Self {
        self.files.push((path.into(), contents.into(), 0o600));
        self
    }

    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|(p, _, _)| p.as_path())
    }

    /// Refuses if any output exists or its directory does not.
    pub fn preflight(&self) -> Result<()> {
        preflight(self.paths())
    }

    /// Writes every file or none. Each file is written to a temporary in its directory, synced,
    /// then linked into place without replacing anything; on any failure the files already
    /// placed are removed again.
    pub fn commit(self) -> Result<Vec<PathBuf>> {
        self.preflight()?;
        let mut staged = Vec::new();
        for (path, contents, mode) in &self.files {
            let dir = parent_dir(path);
            let mut tmp = tempfile::Builder::new()
                .prefix(".pki-out-")
                .permissions(std::fs::Permissions::from_mode(*mode))
                .tempfile_in(dir)
                .map_err(|e| CoreError::io(dir, e))?;
            tmp.write_all(contents).and_then(|_| tmp.as_file().sync_all()).map_err(|e| CoreError::io(path, e))?;
            staged.push((path.clone(), tmp));
        }
        let mut placed: Vec<PathBuf> = Vec::new();
        for (path, tmp) in staged {
            if let Err(e) = tmp.persist_noclobber(&path) {
                for p in &placed {
                    let _ = std::fs::remove_file(p);
                }
                return Err(if e.error.kind() == std::io::ErrorKind::AlreadyExists {
                    CoreError::OutputExists(path)
                } else {
                    CoreError::io(path, e.error)
                });
            }
            placed.push(path);
        }
        Ok(placed)
    }
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Checks that none of `paths` exists, that their directories do, and that no path repeats.
pub fn preflight<'a>(paths: impl Iterator<Item = &'a Path>) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    for path in paths {
        if !seen.insert(path.to_path_buf()) {
            return Err(CoreError::Parse(format!("{} is named as an output twice", path.display())));
        }
        if path.symlink_metadata().is_ok() {
            return Err(CoreError::OutputExists(path.to_path_buf()));
        }
        let dir = parent_dir(path);
        if !dir.is_dir() {
            return Err(CoreError::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "output directory does not exist"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_or_nothing_and_no_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.pem");
        let b = dir.path().join("b.pem");
        std::fs::write(&b, "keep").unwrap();
        let mut set = OutputSet::new();
        set.add(&a, "A").add(&b, "B");
        assert!(matches!(set.commit(), Err(CoreError::OutputExists(p)) if p == b));
        assert!(!a.exists(), "nothing half-written");
        assert_eq!(std::fs::read_to_string(&b).unwrap(), "keep");

        let mut set = OutputSet::new();
        set.add(&a, "A").add_private(dir.path().join("k.pem"), "K");
        set.commit().unwrap();
        let mode = std::fs::metadata(dir.path().join("k.pem")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(".pki-out-"))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn missing_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut set = OutputSet::new();
        set.add(dir.path().join("nope/a.pem"), "A");
        assert!(set.commit().is_err());
    }
}
