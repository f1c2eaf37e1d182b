//! Read-only memory maps: the only `unsafe` in rankfeed.
//!
//! Dataset files are written once into a temporary directory and renamed into place when
//! complete; rankfeed never modifies a published file. A file truncated underneath a live map
//! by another program would still raise SIGBUS on access: that is inherent to mmap, and the
//! reason writers must always write new files and rename them.

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{Error, Result};

/// A whole file mapped read-only.
#[derive(Debug)]
pub struct MappedFile {
    path: PathBuf,
    /// `None` for an empty file (a zero-length map is not allowed).
    map: Option<Mmap>,
}

impl MappedFile {
    /// Map `path` read-only.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let map = if len == 0 {
            None
        } else {
            // SAFETY: the map is read-only and private to this process. Dataset files are
            // published by rename after being fully written and are never modified in place by
            // rankfeed, so the bytes do not change under us in normal operation. Everything
            // read through the map is bounds-checked and validated before it is interpreted
            // (see `ipc` and `dataset`), so arbitrary bytes cannot cause undefined behaviour;
            // only an external truncation of the file can (SIGBUS), as with any mmap reader.
            let m = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
            #[cfg(unix)]
            {
                // Rows are read in random order (sampling); readahead of neighbours is wasted.
                let _ = m.advise(memmap2::Advice::Random);
            }
            Some(m)
        };
        Ok(MappedFile {
            path: path.to_path_buf(),
            map,
        })
    }

    /// The mapped bytes.
    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}
