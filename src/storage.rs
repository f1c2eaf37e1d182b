//! Read-only memory maps and prefetch hints: the only `unsafe` in rankfeed.
//!
//! Dataset files are written once into a temporary directory and renamed into place when
//! complete; rankfeed never modifies a published file. A file truncated underneath a live map
//! by another program would still raise SIGBUS on access: that is inherent to mmap, and the
//! reason writers must always write new files and rename them.

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{Error, Result};

/// Open `path` for reading only if it is a regular file (after following symlinks): a FIFO,
/// device or socket is refused before any read, so it can neither hang the caller (a FIFO
/// with no writer) nor feed it without end (`/dev/zero`). The open itself does not block:
/// `O_NONBLOCK` is set for it (it has no effect on regular files).
pub fn open_regular(path: &Path) -> Result<File> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32);
    }
    let file = options.open(path).map_err(|e| Error::io(path, e))?;
    let kind = file.metadata().map_err(|e| Error::io(path, e))?.file_type();
    if !kind.is_file() {
        return Err(Error::input(
            path,
            format!("not a regular file ({})", describe(kind)),
        ));
    }
    Ok(file)
}

/// [`open_regular`] for a file of a dataset, where anything but a regular file is corruption.
pub fn open_dataset_file(path: &Path) -> Result<File> {
    open_regular(path).map_err(|e| match e {
        Error::Input { path, message, .. } => Error::Corrupt { path, message },
        e => e,
    })
}

fn describe(kind: std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if kind.is_fifo() {
            return "a FIFO";
        }
        if kind.is_char_device() || kind.is_block_device() {
            return "a device";
        }
        if kind.is_socket() {
            return "a socket";
        }
    }
    if kind.is_dir() {
        "a directory"
    } else {
        "not a file"
    }
}

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
        let file = open_dataset_file(path)?;
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

/// Ask the processor to start loading the cache lines of `items` into the cache, without
/// waiting for them: a hint that changes no value, only when the loads of a later read are
/// served. The collator issues these for the next stage's scattered reads (passage offsets,
/// then tokens), so their cache misses overlap instead of being met one at a time.
#[inline]
pub fn prefetch<T>(items: &[T]) {
    const LINE: usize = 64;
    let start = items.as_ptr() as usize;
    let end = start + std::mem::size_of_val(items);
    let mut line = start & !(LINE - 1);
    while line < end {
        prefetch_line(line);
        line += LINE;
    }
}

#[inline(always)]
fn prefetch_line(addr: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: a prefetch never faults and has no architectural effect: it reads nothing
        // into a register and writes nothing, whatever the address (x86 guarantees this for
        // PREFETCHh). The address is also never a dangling one: it lies in a cache line
        // overlapping a live slice. `_mm_prefetch` is `unsafe` only because it takes a raw
        // pointer and needs SSE, which every x86_64 processor has.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(addr as *const i8) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = addr;
    }
}

#[cfg(test)]
mod tests {
    use super::prefetch;

    #[test]
    fn prefetch_is_a_no_op_on_values() {
        let v: Vec<i32> = (0..10_000).collect();
        prefetch::<i32>(&[]);
        prefetch(&v[..1]);
        prefetch(&v[3..4000]);
        prefetch(&v);
        assert_eq!(v, (0..10_000).collect::<Vec<i32>>());
    }
}
