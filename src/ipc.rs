//! Reading the layout of an Arrow IPC file from its bytes, with every offset checked.
//!
//! We do not hand the bytes to arrow-ipc's decoder: it can panic on corrupt input and
//! validates whole columns (linear) at open. Instead we parse the footer and each record
//! batch's metadata (flatbuffers, verified by the generated `root_as_*` functions), check every
//! block and buffer against the file size and alignment, and keep byte ranges. Typed views are
//! then taken per access with `bytemuck` (alignment and length checked, no `unsafe`).
//!
//! Cost: O(number of record batches), independent of the number of rows.

use std::ops::Range;
use std::path::Path;

use arrow_ipc::{root_as_footer, root_as_message, MetadataVersion};
use arrow_schema::{DataType, Schema};

use crate::error::{Error, Result};

const MAGIC: &[u8; 6] = b"ARROW1";
const CONTINUATION: u32 = 0xFFFF_FFFF;

/// One field node of a record batch: its length and null count.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Node {
    pub len: usize,
    pub null_count: usize,
}

/// The byte layout of one record batch.
#[derive(Debug, Clone)]
pub(crate) struct BatchLayout {
    pub rows: usize,
    /// Field nodes, depth-first.
    pub nodes: Vec<Node>,
    /// Absolute byte ranges of the buffers, depth-first.
    pub buffers: Vec<Range<usize>>,
}

/// The layout of a whole IPC file.
#[derive(Debug, Clone)]
pub(crate) struct FileLayout {
    pub batches: Vec<BatchLayout>,
}

fn le_i32(b: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_le_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

/// Number of (nodes, buffers) a field of this type occupies in a record batch.
fn field_shape(dt: &DataType) -> Option<(usize, usize)> {
    match dt {
        DataType::Int32 | DataType::Int64 | DataType::Float32 | DataType::Float64 => Some((1, 2)),
        DataType::List(f) | DataType::LargeList(f) => {
            let (n, b) = field_shape(f.data_type())?;
            Some((1 + n, 2 + b))
        }
        _ => None,
    }
}

/// Whether two data types are equal ignoring child field names and nullability.
fn same_type(a: &DataType, b: &DataType) -> bool {
    match (a, b) {
        (DataType::LargeList(x), DataType::LargeList(y))
        | (DataType::List(x), DataType::List(y)) => same_type(x.data_type(), y.data_type()),
        _ => a == b,
    }
}

/// Parse and check the layout of the Arrow IPC file `bytes` (read from `path`, for errors),
/// whose schema must match `expected` (field names and types, in order).
pub(crate) fn read_layout(path: &Path, bytes: &[u8], expected: &Schema) -> Result<FileLayout> {
    let bad = |m: String| Error::corrupt(path, m);
    let len = bytes.len();
    if len < 8 + 4 + 6 || &bytes[..6] != MAGIC || &bytes[len - 6..] != MAGIC {
        return Err(bad(format!(
            "not an Arrow IPC file (missing ARROW1 magic; {len} bytes; truncated?)"
        )));
    }
    let footer_len = le_i32(bytes, len - 10).ok_or_else(|| bad("no footer length".into()))?;
    let footer_end = len - 10;
    let footer_start = usize::try_from(footer_len)
        .ok()
        .and_then(|l| footer_end.checked_sub(l))
        .filter(|&s| s >= 8)
        .ok_or_else(|| bad(format!("footer length {footer_len} does not fit the file")))?;
    let footer = root_as_footer(&bytes[footer_start..footer_end])
        .map_err(|e| bad(format!("invalid footer: {e}")))?;
    if footer.version() < MetadataVersion::V4 {
        return Err(bad(format!(
            "metadata version {:?} is too old (need V4 or V5)",
            footer.version()
        )));
    }
    let fb_schema = footer
        .schema()
        .ok_or_else(|| bad("footer has no schema".into()))?;
    let schema = arrow_ipc::convert::try_fb_to_schema(fb_schema)
        .map_err(|e| bad(format!("invalid schema: {e}")))?;
    check_schema(&schema, expected).map_err(bad)?;
    if footer.dictionaries().is_some_and(|d| !d.is_empty()) {
        return Err(bad("dictionary batches are not supported".into()));
    }
    let (want_nodes, want_buffers) = expected
        .fields()
        .iter()
        .map(|f| field_shape(f.data_type()).expect("rankfeed schemas use supported types"))
        .fold((0, 0), |(n, b), (fnodes, fbufs)| (n + fnodes, b + fbufs));

    let mut batches = Vec::new();
    for (i, block) in footer.recordBatches().iter().flatten().enumerate() {
        let at = |m: String| bad(format!("record batch {i}: {m}"));
        let offset = usize::try_from(block.offset()).map_err(|_| at("negative offset".into()))?;
        let meta_len =
            usize::try_from(block.metaDataLength()).map_err(|_| at("negative metadata".into()))?;
        let body_len =
            usize::try_from(block.bodyLength()).map_err(|_| at("negative body length".into()))?;
        let body_start = offset
            .checked_add(meta_len)
            .filter(|&e| e <= footer_start)
            .ok_or_else(|| at("metadata extends past the data".into()))?;
        let body_end = body_start
            .checked_add(body_len)
            .filter(|&e| e <= footer_start)
            .ok_or_else(|| {
                at(format!(
                    "body of {body_len} bytes extends past the data (truncated?)"
                ))
            })?;
        let (fb_start, fb_len) = match le_i32(bytes, offset) {
            Some(c) if c as u32 == CONTINUATION => (offset + 8, le_i32(bytes, offset + 4)),
            Some(c) => (offset + 4, Some(c)),
            None => return Err(at("no message header".into())),
        };
        let fb_end = fb_len
            .and_then(|l| usize::try_from(l).ok())
            .and_then(|l| fb_start.checked_add(l))
            .filter(|&e| e <= body_start)
            .ok_or_else(|| at("message length does not fit its block".into()))?;
        let message = root_as_message(&bytes[fb_start..fb_end])
            .map_err(|e| at(format!("invalid message: {e}")))?;
        let rb = message
            .header_as_record_batch()
            .ok_or_else(|| at("block is not a record batch".into()))?;
        if rb.compression().is_some() {
            return Err(at(
                "compressed buffers are not supported; write uncompressed IPC".into(),
            ));
        }
        let rows = usize::try_from(rb.length()).map_err(|_| at("negative length".into()))?;
        let nodes: Vec<Node> = rb
            .nodes()
            .iter()
            .flatten()
            .map(|n| {
                Ok(Node {
                    len: usize::try_from(n.length()).map_err(|_| at("negative node".into()))?,
                    null_count: usize::try_from(n.null_count())
                        .map_err(|_| at("negative null count".into()))?,
                })
            })
            .collect::<Result<_>>()?;
        let buffers: Vec<Range<usize>> = rb
            .buffers()
            .iter()
            .flatten()
            .map(|b| {
                let s = usize::try_from(b.offset())
                    .ok()
                    .and_then(|o| body_start.checked_add(o));
                let e = s.and_then(|s| {
                    usize::try_from(b.length())
                        .ok()
                        .and_then(|l| s.checked_add(l))
                });
                match (s, e) {
                    (Some(s), Some(e)) if e <= body_end => Ok(s..e),
                    _ => Err(at("buffer extends past its body".into())),
                }
            })
            .collect::<Result<_>>()?;
        if nodes.len() != want_nodes || buffers.len() != want_buffers {
            return Err(at(format!(
                "has {} nodes and {} buffers, the schema needs {want_nodes} and {want_buffers}",
                nodes.len(),
                buffers.len()
            )));
        }
        if nodes.first().is_some_and(|n| n.len != rows) {
            return Err(at("field length differs from the batch length".into()));
        }
        batches.push(BatchLayout {
            rows,
            nodes,
            buffers,
        });
    }
    Ok(FileLayout { batches })
}

fn check_schema(found: &Schema, expected: &Schema) -> std::result::Result<(), String> {
    let f = found.fields();
    let e = expected.fields();
    if f.len() != e.len()
        || f.iter()
            .zip(e.iter())
            .any(|(a, b)| a.name() != b.name() || !same_type(a.data_type(), b.data_type()))
    {
        return Err(format!(
            "unexpected schema: found [{}], expected [{}]",
            describe(found),
            describe(expected)
        ));
    }
    Ok(())
}

fn describe(s: &Schema) -> String {
    s.fields()
        .iter()
        .map(|f| format!("{}: {}", f.name(), f.data_type()))
        .collect::<Vec<_>>()
        .join(", ")
}
