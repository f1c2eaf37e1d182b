//! Text rows from Parquet, as Spark or Polars write them: `query: string`,
//! `pos`/`neg: list<string>`, optional `pos_scores`/`neg_scores: list<float|double|int>`,
//! `prompt`/`query_prompt`/`passage_prompt: string`. `list` or `large_list`, `string`,
//! `large_string` or `string_view`. Each row becomes an [`InputRow`] or a [`RowError`] with the
//! file and row number, under the same reasons as JSON rows.

use std::borrow::Cow;
use std::path::Path;

use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::row::{InputRow, KNOWN_FIELDS};
use crate::error::{Error, InputPosition, RejectReason, Result, RowError};
use crate::parquet_read::{self, list_at};

/// A string at row `i` (None when null); Err when the column is not a string type.
fn string_at(a: &dyn Array, i: usize) -> std::result::Result<Option<String>, String> {
    if a.is_null(i) {
        return Ok(None);
    }
    match a.data_type() {
        DataType::Utf8 => Ok(Some(a.as_string::<i32>().value(i).to_string())),
        DataType::LargeUtf8 => Ok(Some(a.as_string::<i64>().value(i).to_string())),
        DataType::Utf8View => Ok(Some(a.as_string_view().value(i).to_string())),
        t => Err(format!("expected a string, found {t}")),
    }
}

fn strings_at(
    a: &dyn Array,
    i: usize,
) -> std::result::Result<Option<Vec<String>>, (String, RejectReason)> {
    if a.is_null(i) {
        return Ok(None);
    }
    let items = list_at(a, i).ok_or_else(|| {
        (
            format!("expected a list of strings, found {}", a.data_type()),
            RejectReason::WrongType,
        )
    })?;
    (0..items.len())
        .map(|j| match string_at(items.as_ref(), j) {
            Ok(Some(s)) => Ok(s),
            Ok(None) => Err((format!("element {j} is null"), RejectReason::WrongType)),
            Err(m) => Err((m, RejectReason::WrongType)),
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map(Some)
}

fn scores_at(
    a: &dyn Array,
    i: usize,
) -> std::result::Result<Option<Vec<f32>>, (String, RejectReason)> {
    match list_at(a, i) {
        Some(items) => parquet_read::scores(items.as_ref()).map(Some),
        None if a.is_null(i) => Ok(None),
        None => Err((
            format!("expected a list of numbers, found {}", a.data_type()),
            RejectReason::WrongType,
        )),
    }
}

/// Read the rows of a Parquet file (only `row_groups`, when given); `f` gets each row (or its
/// error) and returns whether to go on. Unknown columns are counted once per row in `unknown`.
/// Row numbers in errors count from the start of the file.
pub fn read_parquet_rows(
    path: &Path,
    row_groups: Option<&[usize]>,
    unknown: &mut std::collections::BTreeMap<String, u64>,
    f: &mut dyn FnMut(std::result::Result<InputRow<'static>, RowError>) -> bool,
) -> Result<()> {
    let file = crate::storage::open_regular(path)?;
    let builder =
        ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| Error::parquet(path, e))?;
    let meta = builder.metadata().clone();
    let groups: Vec<usize> = match row_groups {
        Some(g) => g.to_vec(),
        None => (0..meta.num_row_groups()).collect(),
    };
    for &g in &groups {
        // Rows before group g, so positions count from the start of the file.
        let first: i64 = (0..g).map(|i| meta.row_group(i).num_rows()).sum();
        let reader = ParquetRecordBatchReaderBuilder::try_new(crate::storage::open_regular(path)?)
            .map_err(|e| Error::parquet(path, e))?
            .with_row_groups(vec![g])
            .with_batch_size(1024)
            .build()
            .map_err(|e| Error::parquet(path, e))?;
        if !read_batches(path, reader, first as u64, unknown, f)? {
            return Ok(());
        }
    }
    Ok(())
}

/// The rows of `reader`, numbered from `row_index`; false when `f` asked to stop.
fn read_batches(
    path: &Path,
    reader: parquet::arrow::arrow_reader::ParquetRecordBatchReader,
    mut row_index: u64,
    unknown: &mut std::collections::BTreeMap<String, u64>,
    f: &mut dyn FnMut(std::result::Result<InputRow<'static>, RowError>) -> bool,
) -> Result<bool> {
    for batch in reader {
        let batch: RecordBatch = batch.map_err(|e| Error::parquet(path, e.into()))?;
        let names: Vec<String> = batch
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        let extra: Vec<&String> = names
            .iter()
            .filter(|n| !KNOWN_FIELDS.contains(&n.as_str()))
            .collect();
        let col = |name: &str| -> Option<ArrayRef> { batch.column_by_name(name).cloned() };
        let cols: Vec<Option<ArrayRef>> = KNOWN_FIELDS.iter().map(|n| col(n)).collect();
        for i in 0..batch.num_rows() {
            for e in &extra {
                *unknown.entry((*e).clone()).or_default() += 1;
            }
            let position = InputPosition {
                path: path.to_path_buf(),
                line: 0,
                element: Some(row_index),
            };
            row_index += 1;
            let row = build_row(&cols, i, &position);
            if !f(row) {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

fn build_row(
    cols: &[Option<ArrayRef>],
    i: usize,
    position: &InputPosition,
) -> std::result::Result<InputRow<'static>, RowError> {
    let err = |field: &str, reason, message: String| RowError {
        position: position.clone(),
        field: Some(field.to_string()),
        reason,
        message,
    };
    let get = |k: usize| cols[k].as_deref();
    // KNOWN_FIELDS order: query, pos, neg, pos_scores, neg_scores, prompt, query_prompt,
    // passage_prompt, batch_size.
    let query = match get(0).map(|a| string_at(a, i)) {
        None | Some(Ok(None)) => {
            return Err(err("query", RejectReason::MissingField, "missing".into()))
        }
        Some(Err(m)) => return Err(err("query", RejectReason::WrongType, m)),
        Some(Ok(Some(s))) => s,
    };
    let mut lists = Vec::with_capacity(2);
    for (k, name) in [(1, "pos"), (2, "neg")] {
        match get(k).map(|a| strings_at(a, i)) {
            None | Some(Ok(None)) => {
                return Err(err(
                    name,
                    RejectReason::MissingField,
                    "missing or null".into(),
                ))
            }
            Some(Err((m, r))) => return Err(err(name, r, m)),
            Some(Ok(Some(v))) => lists.push(v),
        }
    }
    let neg = lists.pop().expect("two lists");
    let pos = lists.pop().expect("two lists");
    if pos.is_empty() {
        return Err(err(
            "pos",
            RejectReason::EmptyPos,
            "empty list: a group needs at least one positive".into(),
        ));
    }
    let mut scores = Vec::with_capacity(2);
    for (k, name, want) in [(3, "pos_scores", pos.len()), (4, "neg_scores", neg.len())] {
        let s = match get(k).map(|a| scores_at(a, i)) {
            None => None,
            Some(Err((m, r))) => return Err(err(name, r, m)),
            Some(Ok(s)) => s,
        };
        if let Some(s) = &s {
            if s.len() != want {
                return Err(err(
                    name,
                    RejectReason::ScoreLengthMismatch,
                    format!("has {} scores for {want} passages", s.len()),
                ));
            }
        }
        scores.push(s);
    }
    let neg_scores = scores.pop().expect("two");
    let pos_scores = scores.pop().expect("two");
    let mut texts = Vec::with_capacity(3);
    for (k, name) in [(5, "prompt"), (6, "query_prompt"), (7, "passage_prompt")] {
        match get(k).map(|a| string_at(a, i)) {
            None => texts.push(None),
            Some(Err(m)) => return Err(err(name, RejectReason::WrongType, m)),
            Some(Ok(s)) => texts.push(s.map(Cow::Owned)),
        }
    }
    let passage_prompt = texts.pop().expect("three");
    let query_prompt = texts.pop().expect("three");
    let prompt = texts.pop().expect("three");
    let batch_size = match get(8).map(|a| batch_size_at(a, i)) {
        None | Some(Ok(None)) => None,
        Some(Ok(Some(b))) => Some(b),
        Some(Err(m)) => return Err(err("batch_size", RejectReason::WrongType, m)),
    };
    Ok(InputRow {
        query: Cow::Owned(query),
        pos: pos.into_iter().map(Cow::Owned).collect(),
        neg: neg.into_iter().map(Cow::Owned).collect(),
        pos_scores,
        neg_scores,
        prompt,
        query_prompt,
        passage_prompt,
        batch_size,
    })
}

/// A `batch_size` cell: a positive integer of any integer type within the loader's limit (as
/// the JSON path's), or null.
fn batch_size_at(a: &dyn Array, i: usize) -> std::result::Result<Option<u64>, String> {
    use arrow_array::types::{Int32Type, Int64Type, UInt32Type, UInt64Type};
    if a.is_null(i) {
        return Ok(None);
    }
    let v: Option<i128> = match a.data_type() {
        DataType::Int64 => Some(a.as_primitive::<Int64Type>().value(i) as i128),
        DataType::Int32 => Some(a.as_primitive::<Int32Type>().value(i) as i128),
        DataType::UInt64 => Some(a.as_primitive::<UInt64Type>().value(i) as i128),
        DataType::UInt32 => Some(a.as_primitive::<UInt32Type>().value(i) as i128),
        _ => None,
    };
    match v {
        Some(b) if u64::try_from(b).is_ok_and(super::row::batch_size_ok) => Ok(Some(b as u64)),
        Some(b) => Err(format!(
            "expected a positive integer up to {}, found {b}",
            crate::limits::BATCH_SIZE
        )),
        None => Err(format!(
            "expected an integer column, found {}",
            a.data_type()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::batch_size_at;
    use arrow_array::Int64Array;

    /// Issue 18, finding 5 (the Parquet path): a huge `batch_size` was accepted at convert
    /// and aborted a same-source loader; it is a reject, as on the JSON path.
    #[test]
    fn batch_size_beyond_the_limit_is_refused() {
        let limit = crate::limits::BATCH_SIZE as i64;
        let a = Int64Array::from(vec![1, limit, limit + 1, 1_000_000_000_000_000_000, 0]);
        let got: Vec<bool> = (0..a.len()).map(|i| batch_size_at(&a, i).is_ok()).collect();
        assert_eq!(got, [true, true, false, false, false]);
    }
}
