//! Finding input files: the one rule for listing a directory, shared by `convert` (JSON and
//! Parquet text) and `import` (Parquet ids).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The files of directory `dir` for which `keep` holds, sorted (not recursive). Hidden files
/// and Spark's `_SUCCESS`-style markers (names starting with `.` or `_`) are skipped.
pub fn list_dir(dir: &Path, keep: impl Fn(&Path) -> bool) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .map(|e| e.map(|e| e.path()).map_err(|e| Error::io(dir, e)))
        .collect::<Result<_>>()?;
    files.retain(|p| {
        p.is_file()
            && !p
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(['.', '_']))
            && keep(p)
    });
    files.sort();
    Ok(files)
}

/// Expand files and directories (their files for which `keep` holds, see [`list_dir`]) into
/// files, in order. Errors: no inputs, a missing path, a directory without such files (`what`
/// names them). Files given by name are kept as given (their type is checked by the reader).
pub fn expand(
    inputs: &[PathBuf],
    keep: impl Fn(&Path) -> bool,
    what: &str,
) -> Result<Vec<PathBuf>> {
    if inputs.is_empty() {
        return Err(Error::argument("inputs", "no input paths given"));
    }
    let mut out = Vec::new();
    for input in inputs {
        let meta = std::fs::metadata(input).map_err(|e| Error::io(input, e))?;
        if meta.is_dir() {
            let files = list_dir(input, &keep)?;
            if files.is_empty() {
                return Err(Error::input(input, format!("directory has no {what}")));
            }
            out.extend(files);
        } else {
            out.push(input.clone());
        }
    }
    Ok(out)
}

/// Expand files and directories into `.parquet` files (directories: sorted, not recursive).
pub fn parquet_files(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    expand(
        inputs,
        |p| p.extension().is_some_and(|e| e == "parquet"),
        ".parquet files",
    )
}
