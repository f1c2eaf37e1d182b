//! Atomic publication of an output directory (a dataset, or a Parquet export).
//!
//! The promise: **the output path always names a complete output, the old one or the new one,
//! never nothing and never a mix**, whatever happens (an error, a kill -9, a power cut after
//! the final fsync).
//!
//! How:
//! 1. Everything is written into a staging directory beside the output,
//!    `.NAME.rankfeed-tmp-PID-SEQ`, on the same file system.
//! 2. [`Staging::commit`] fsyncs every file in it and the directory itself, then
//!    - when nothing is at the output path: `renameat2(RENAME_NOREPLACE)` moves the staging
//!      directory there (a directory that appeared meanwhile is never replaced);
//!    - when an old output is there and overwriting was asked for:
//!      `renameat2(RENAME_EXCHANGE)` swaps the two in one step, so the output path goes from
//!      the old complete directory to the new one; the old one, now under the staging name, is
//!      removed afterwards;
//!
//!    and fsyncs the parent directory so the rename itself is durable.
//! 3. Where the file system lacks `renameat2` flags (some network and FUSE file systems, and
//!    platforms other than Linux), replacing is refused with an error that says so rather
//!    than done in two steps that a crash could leave half-done; publishing to a new path
//!    still works there (plain `rename` of a directory onto a missing path, checked just
//!    before).
//!
//! A crashed run leaves its staging directory behind. The next run that publishes to the same
//! output removes every `.NAME.rankfeed-tmp-PID-*` whose process `PID` no longer exists and
//! reports each in [`Staging::cleaned`]. Staging directories of live processes are left alone.
//!
//! Tests can make the process abort at a named step by setting `RANKFEED_CRASH_AT` to one
//! of [`CRASH_POINTS`]; this is how the crash-safety tests reach every step.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// The steps of publishing at which `RANKFEED_CRASH_AT` can abort the process.
pub const CRASH_POINTS: &[&str] = &[
    "staged",        // staging directory complete, nothing synced yet
    "synced",        // files and staging directory fsynced
    "renamed",       // output path now names the new output, parent not yet synced
    "parent-synced", // durable; the old output not yet removed
];

const TAG: &str = "rankfeed-tmp";

/// A staging directory that becomes the output at `commit`, or disappears when dropped.
#[derive(Debug)]
pub struct Staging {
    out: PathBuf,
    dir: PathBuf,
    overwrite: bool,
    committed: bool,
    cleaned: Vec<PathBuf>,
}

impl Staging {
    /// Prepare to publish at `out`. Fails with [`Error::Exists`] when `out` exists and
    /// `overwrite` is false. Removes stale staging directories of dead processes first.
    pub fn new(out: &Path, overwrite: bool) -> Result<Staging> {
        let (parent, name) = split(out)?;
        if out.symlink_metadata().is_ok() && !overwrite {
            return Err(Error::Exists {
                path: out.to_path_buf(),
            });
        }
        let cleaned = remove_stale(&parent, &name)?;
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let dir = parent.join(format!(
            ".{name}.{TAG}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        // The output's parent may not exist yet (e.g. a directory of shards).
        std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
        std::fs::create_dir(&dir).map_err(|e| Error::io(&dir, e))?;
        Ok(Staging {
            out: out.to_path_buf(),
            dir,
            overwrite,
            committed: false,
            cleaned,
        })
    }

    /// The staging directory: write the output here.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The final output path.
    pub fn out(&self) -> &Path {
        &self.out
    }

    /// Stale staging directories removed when this one was made.
    pub fn cleaned(&self) -> &[PathBuf] {
        &self.cleaned
    }

    /// Make the staged directory the output, atomically and durably (see the module docs).
    pub fn commit(mut self) -> Result<Vec<PathBuf>> {
        crash_point("staged");
        sync_tree(&self.dir)?;
        crash_point("synced");
        let replaced = self.rename_into_place()?;
        self.committed = true;
        crash_point("renamed");
        let (parent, _) = split(&self.out)?;
        sync_dir(&parent)?;
        crash_point("parent-synced");
        if replaced {
            // The old output now sits under the staging name.
            std::fs::remove_dir_all(&self.dir).map_err(|e| {
                Error::io(
                    &self.dir,
                    std::io::Error::new(
                        e.kind(),
                        format!("the new output is in place; removing the old one failed: {e}"),
                    ),
                )
            })?;
        }
        Ok(std::mem::take(&mut self.cleaned))
    }

    /// Returns whether an old output was swapped out (and now sits at `self.dir`).
    fn rename_into_place(&self) -> Result<bool> {
        let exists = self.out.symlink_metadata().is_ok();
        if exists && !self.overwrite {
            return Err(Error::Exists {
                path: self.out.clone(),
            });
        }
        let flags = if exists {
            rustix::fs::RenameFlags::EXCHANGE
        } else {
            rustix::fs::RenameFlags::NOREPLACE
        };
        let cwd = rustix::fs::CWD;
        match rustix::fs::renameat_with(cwd, &self.dir, cwd, &self.out, flags) {
            Ok(()) => Ok(exists),
            Err(e) if e == rustix::io::Errno::EXIST => Err(Error::Exists {
                path: self.out.clone(),
            }),
            Err(e) if unsupported(e) && !exists => {
                // No renameat2 here: a plain rename onto a path that was just seen missing.
                std::fs::rename(&self.dir, &self.out).map_err(|e| Error::io(&self.out, e))?;
                Ok(false)
            }
            Err(e) if unsupported(e) => Err(Error::io(
                &self.out,
                std::io::Error::new(
                    std::io::ErrorKind::Unsupported,
                    "this file system cannot swap directories atomically (renameat2 \
                     RENAME_EXCHANGE); remove the old output first or write to a new path",
                ),
            )),
            Err(e) => Err(Error::io(&self.out, e.into())),
        }
    }
}

#[cfg(target_os = "linux")]
fn unsupported(e: rustix::io::Errno) -> bool {
    e == rustix::io::Errno::INVAL || e == rustix::io::Errno::NOSYS
}

#[cfg(not(target_os = "linux"))]
fn unsupported(_: rustix::io::Errno) -> bool {
    true
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// `(parent, file name)` of an output path.
fn split(out: &Path) -> Result<(PathBuf, String)> {
    let name = out
        .file_name()
        .ok_or_else(|| Error::argument("output", format!("{} has no file name", out.display())))?
        .to_string_lossy()
        .into_owned();
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((parent, name))
}

/// Remove `parent/.NAME.rankfeed-tmp-PID-*` whose process is gone; returns what was removed.
fn remove_stale(parent: &Path, name: &str) -> Result<Vec<PathBuf>> {
    let prefix = format!(".{name}.{TAG}-");
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(parent) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(Error::io(parent, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(parent, e))?;
        let file_name = entry.file_name();
        let Some(rest) = file_name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        if process_alive(pid) {
            continue;
        }
        let path = entry.path();
        std::fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
        removed.push(path);
    }
    Ok(removed)
}

/// Whether a process with this id exists (ours included). Errs on the side of "alive".
fn process_alive(pid: i32) -> bool {
    if pid as u32 == std::process::id() {
        return true;
    }
    match rustix::process::Pid::from_raw(pid) {
        None => false,
        Some(p) => !matches!(
            rustix::process::test_kill_process(p),
            Err(rustix::io::Errno::SRCH)
        ),
    }
}

/// fsync every regular file under `dir` (recursively), then the directories, bottom-up.
fn sync_tree(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(|e| Error::io(&path, e))?;
        if kind.is_dir() {
            sync_tree(&path)?;
        } else if kind.is_file() {
            File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::io(&path, e))?;
        }
    }
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(dir, e))
}

/// Abort the process here when `RANKFEED_CRASH_AT` names this step (crash-safety tests).
fn crash_point(step: &str) {
    if std::env::var_os("RANKFEED_CRASH_AT").is_some_and(|v| v == step) {
        eprintln!("RANKFEED_CRASH_AT={step}: aborting");
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage_with(out: &Path, overwrite: bool, content: &str) -> Result<Vec<PathBuf>> {
        let s = Staging::new(out, overwrite)?;
        std::fs::write(s.path().join("f"), content).unwrap();
        s.commit()
    }

    #[test]
    fn publishes_new_replaces_old_and_refuses_without_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        // The parent is created when missing (a directory of shards).
        let out = dir.path().join("a/b/out");
        stage_with(&out, false, "one").unwrap();
        assert_eq!(std::fs::read_to_string(out.join("f")).unwrap(), "one");
        let err = stage_with(&out, false, "two").unwrap_err();
        assert!(matches!(err, Error::Exists { .. }), "{err}");
        stage_with(&out, true, "two").unwrap();
        assert_eq!(std::fs::read_to_string(out.join("f")).unwrap(), "two");
        let names: Vec<_> = std::fs::read_dir(out.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("out")]);
    }

    #[test]
    fn a_directory_that_appears_meanwhile_is_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let s = Staging::new(&out, false).unwrap();
        std::fs::create_dir(&out).unwrap(); // an empty dir: plain rename(2) would replace it
        assert!(matches!(s.commit().unwrap_err(), Error::Exists { .. }));
        assert!(out.is_dir());
    }

    #[test]
    fn dropped_staging_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        drop(Staging::new(&out, false).unwrap());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
