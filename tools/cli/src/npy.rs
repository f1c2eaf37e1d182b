//! Writing `.npy` files (NumPy format 1.0), so tests and users get exact dtypes and shapes.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use rankfeed::collate::Ids;

fn header(descr: &str, shape: &[usize]) -> Vec<u8> {
    let shape = match shape {
        [n] => format!("({n},)"),
        dims => format!(
            "({})",
            dims.iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    // magic (6) + version (2) + header length (2) + dict + '\n' is a multiple of 64.
    while (10 + dict.len() + 1) % 64 != 0 {
        dict.push(' ');
    }
    dict.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out
}

/// Write `ids` with `shape` to `path`.
pub fn write_ids(path: &Path, ids: &Ids, shape: &[usize]) -> Result<()> {
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    match ids {
        Ids::I64(v) => {
            f.write_all(&header("<i8", shape))?;
            for x in v {
                f.write_all(&x.to_le_bytes())?;
            }
        }
        Ids::I32(v) => {
            f.write_all(&header("<i4", shape))?;
            for x in v {
                f.write_all(&x.to_le_bytes())?;
            }
        }
    }
    f.flush()?;
    Ok(())
}

/// Write float32 values to `path`.
pub fn write_f32(path: &Path, values: &[f32]) -> Result<()> {
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    f.write_all(&header("<f4", &[values.len()]))?;
    for x in values {
        f.write_all(&x.to_le_bytes())?;
    }
    f.flush()?;
    Ok(())
}
