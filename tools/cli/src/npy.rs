//! Writing `.npy` files (NumPy format 1.0), so tests and users get exact dtypes and shapes.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use rankfeed::collate::Ids;

/// A 2-D little-endian float32 C-order `.npy` file (format 1.0-3.0) as embeddings; anything
/// else is an error naming the file and what it holds.
pub fn read_f32_2d(path: &Path) -> Result<rankfeed::mine::Embeddings> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let bad = |why: String| anyhow::anyhow!("{}: {why}", path.display());
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("not a .npy file".into()));
    }
    let (len, start): (usize, usize) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(bad(format!(".npy format version {v} is not supported"))),
    };
    let end = start
        .checked_add(len)
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| bad("header runs past the end".into()))?;
    let dict =
        std::str::from_utf8(&bytes[start..end]).map_err(|_| bad("header is not text".into()))?;
    let entries =
        header_entries(dict).ok_or_else(|| bad(format!("header {dict:?} is not a dict")))?;
    let field =
        |key: &str| -> Option<&str> { entries.iter().find(|(k, _)| *k == key).map(|(_, v)| *v) };
    let descr = field("descr").unwrap_or("");
    if !(descr.starts_with("'<f4'") || descr.starts_with("'=f4'")) {
        return Err(bad(format!(
            "dtype {} (need float32, little-endian: np.asarray(x, dtype='<f4'))",
            descr.split(',').next().unwrap_or("?")
        )));
    }
    if !field("fortran_order").unwrap_or("").starts_with("False") {
        return Err(bad(
            "Fortran order (need C order: np.ascontiguousarray)".into()
        ));
    }
    let shape = field("shape").unwrap_or("");
    let inner = shape
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| bad(format!("shape {shape}")))?;
    let dims: Vec<usize> = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| bad(format!("shape ({inner})")))?;
    let [rows, dim] = dims[..] else {
        return Err(bad(format!("shape ({inner}) is not 2-D (rows, dim)")));
    };
    let data = &bytes[end..];
    let want = rows
        .checked_mul(dim)
        .and_then(|n| n.checked_mul(4))
        .ok_or_else(|| bad("shape overflows".into()))?;
    if data.len() != want {
        return Err(bad(format!(
            "holds {} data bytes, shape ({rows}, {dim}) needs {want} (truncated?)",
            data.len()
        )));
    }
    let values = data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok(rankfeed::mine::Embeddings { values, dim })
}

/// The top-level `'key': value` entries of a .npy header dict (values: a quoted string, a
/// word such as False, or a parenthesized tuple), so a key spelled inside a value is never
/// taken for one.
fn header_entries(dict: &str) -> Option<Vec<(&str, &str)>> {
    let body = dict
        .trim()
        .strip_prefix('{')?
        .trim_end()
        .strip_suffix('}')?;
    let mut out = Vec::new();
    let mut rest = body.trim_start();
    while !rest.is_empty() {
        let q = rest.chars().next()?;
        if q != '\'' && q != '"' {
            return None;
        }
        let end = rest[1..].find(q)? + 1;
        let key = &rest[1..end];
        rest = rest[end + 1..].trim_start().strip_prefix(':')?.trim_start();
        let len = match rest.chars().next()? {
            c @ ('\'' | '"') => rest[1..].find(c)? + 2,
            '(' => rest.find(')')? + 1,
            _ => rest.find([',', '}']).unwrap_or(rest.len()),
        };
        out.push((key, rest[..len].trim_end()));
        rest = rest[len..].trim_start();
        rest = rest.strip_prefix(',').unwrap_or(rest).trim_start();
    }
    Some(out)
}

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
