//! Reading values out of Arrow arrays decoded from Parquet, with one rule per kind of value,
//! shared by every Parquet reader (`import` of token ids, `convert` of text columns):
//!
//! - lists: `list` or `large_list`, any child field name (Spark writes `element`, arrow-rs
//!   `item`, Polars `large_list`);
//! - integers (ids, pair ids): any signed or unsigned integer type (Polars' list lengths are
//!   `uint32`), the value in range; no nulls;
//! - scores: any float (`half`, `float`, `double`) or integer type (Python's json reads `1` as
//!   a score too), each a finite float32 once converted; no nulls, no booleans.

use arrow_array::cast::AsArray;
use arrow_array::types::{Float16Type, Float32Type, Float64Type};
use arrow_array::{Array, ArrayRef};
use arrow_schema::DataType;

use crate::error::RejectReason;

/// `Err` naming the first column name that `schema` holds twice (pyarrow refuses such files;
/// reading the first of two columns would silently ignore the other).
pub fn unique_columns(schema: &arrow_schema::Schema) -> Result<(), String> {
    let mut seen = std::collections::HashSet::new();
    for f in schema.fields() {
        if !seen.insert(f.name()) {
            return Err(format!("two columns are named `{}`", f.name()));
        }
    }
    Ok(())
}

/// The strings of a string column (utf8, large_utf8 or utf8_view; `None` for a null); `Err`
/// names the type found otherwise.
pub fn strings(a: &dyn Array) -> Result<Vec<Option<&str>>, String> {
    fn get<'a>(
        n: usize,
        valid: impl Fn(usize) -> bool,
        value: impl Fn(usize) -> &'a str,
    ) -> Vec<Option<&'a str>> {
        (0..n).map(|i| valid(i).then(|| value(i))).collect()
    }
    match a.data_type() {
        DataType::Utf8 => {
            let c = a.as_string::<i32>();
            Ok(get(a.len(), |i| !c.is_null(i), |i| c.value(i)))
        }
        DataType::LargeUtf8 => {
            let c = a.as_string::<i64>();
            Ok(get(a.len(), |i| !c.is_null(i), |i| c.value(i)))
        }
        DataType::Utf8View => {
            let c = a.as_string_view();
            Ok(get(a.len(), |i| !c.is_null(i), |i| c.value(i)))
        }
        t => Err(format!("must be a string column, found {t}")),
    }
}

/// One Parquet reader opened by [`read_rows`], before its batches are read.
pub type Opened = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder<std::fs::File>;

/// Read `files` (kind `what`, named in errors: "corpus", "embeddings") batch by batch: each file
/// opened, its column names checked unique, then `open(path, &reader)` (required columns,
/// metadata); then `rows(&batch, &at)` for each batch, `at(i, field, message)` being the
/// error at row `i` of the batch (counted over its file). An `id` column, in every file or in
/// none, gives each row its place: the returned `slot_of` ([`order_by_ids`]); `None`
/// without ids (the rows' order is theirs).
pub fn read_rows(
    files: &[std::path::PathBuf],
    what: &str,
    mut open: impl FnMut(&std::path::Path, &Opened) -> crate::error::Result<()>,
    mut rows: impl FnMut(
        &arrow_array::RecordBatch,
        &dyn Fn(usize, &str, String) -> crate::error::Error,
    ) -> crate::error::Result<()>,
) -> crate::error::Result<Option<Vec<usize>>> {
    use crate::error::Error;
    let mut ids: Vec<(i64, usize, u64)> = Vec::new();
    let mut with_ids = None;
    for (file_index, path) in files.iter().enumerate() {
        let file = crate::storage::open_regular(path)?;
        let reader = Opened::try_new(file).map_err(|e| Error::parquet(path, e))?;
        let schema = reader.schema().clone();
        unique_columns(&schema).map_err(|m| Error::input(path, m))?;
        open(path, &reader)?;
        let has_id = schema.fields().iter().any(|f| f.name() == "id");
        if *with_ids.get_or_insert(has_id) != has_id {
            return Err(Error::input(
                path,
                format!("some {what} files have an `id` column and some do not"),
            ));
        }
        let batches = reader
            .with_batch_size(8192)
            .build()
            .map_err(|e| Error::parquet(path, e))?;
        let mut base = 0u64;
        for batch in batches {
            let batch = batch.map_err(|e| Error::parquet(path, e.into()))?;
            let at = |i: usize, field: &str, message: String| Error::Input {
                path: path.clone(),
                row: Some(base + i as u64),
                field: Some(field.into()),
                message,
            };
            rows(&batch, &at)?;
            if has_id {
                let v = integers(batch.column_by_name("id").expect("checked"))
                    .map_err(|(i, m)| at(i, "id", m))?;
                ids.extend(
                    v.into_iter()
                        .enumerate()
                        .map(|(i, id)| (id, file_index, base + i as u64)),
                );
            }
            base += batch.num_rows() as u64;
        }
    }
    if with_ids == Some(true) {
        return order_by_ids(&ids, files).map(Some);
    }
    Ok(None)
}

/// Where each of `n` items read in order belongs when an `id` column gave item k the id
/// `ids[k].0` (read at row `ids[k].2` of `files[ids[k].1]`): `slot_of[k]`. The ids must be
/// 0..n once each; `Err` names the file and row of the first that is not.
pub fn order_by_ids(
    ids: &[(i64, usize, u64)],
    files: &[std::path::PathBuf],
) -> crate::error::Result<Vec<usize>> {
    let n = ids.len();
    let mut seen = vec![false; n];
    let mut slot_of = Vec::with_capacity(n);
    for &(id, file, row) in ids {
        let at = |message: String| crate::error::Error::Input {
            path: files[file].clone(),
            row: Some(row),
            field: Some("id".into()),
            message,
        };
        let slot = usize::try_from(id).ok().filter(|&i| i < n).ok_or_else(|| {
            at(format!(
                "id {id} is outside 0..{n} (the ids must be 0..n once each)"
            ))
        })?;
        if std::mem::replace(&mut seen[slot], true) {
            return Err(at(format!(
                "id {id} is given twice (the ids must be 0..n once each)"
            )));
        }
        slot_of.push(slot);
    }
    Ok(slot_of)
}

/// The list at row `i` of a list or large_list column; None when null or not a list.
pub fn list_at(a: &dyn Array, i: usize) -> Option<ArrayRef> {
    if a.is_null(i) {
        return None;
    }
    match a.data_type() {
        DataType::List(_) => Some(a.as_list::<i32>().value(i)),
        DataType::LargeList(_) => Some(a.as_list::<i64>().value(i)),
        _ => None,
    }
}

/// Any integer column as i64 (no nulls); `Err` is (offset of the bad value, why).
pub fn integers(a: &dyn Array) -> Result<Vec<i64>, (usize, String)> {
    use arrow_array::types::*;
    if a.null_count() > 0 {
        let i = (0..a.len()).find(|&i| a.is_null(i)).unwrap_or(0);
        return Err((i, "null value".into()));
    }
    fn widen<T: arrow_array::ArrowPrimitiveType>(a: &dyn Array) -> Vec<i64>
    where
        T::Native: Into<i64>,
    {
        a.as_primitive::<T>()
            .values()
            .iter()
            .map(|&v| v.into())
            .collect()
    }
    Ok(match a.data_type() {
        DataType::Int8 => widen::<Int8Type>(a),
        DataType::Int16 => widen::<Int16Type>(a),
        DataType::Int32 => widen::<Int32Type>(a),
        DataType::Int64 => a.as_primitive::<Int64Type>().values().to_vec(),
        DataType::UInt8 => widen::<UInt8Type>(a),
        DataType::UInt16 => widen::<UInt16Type>(a),
        DataType::UInt32 => widen::<UInt32Type>(a),
        DataType::UInt64 => {
            let v = a.as_primitive::<UInt64Type>().values();
            let mut out = Vec::with_capacity(v.len());
            for (i, &x) in v.iter().enumerate() {
                out.push(i64::try_from(x).map_err(|_| (i, format!("{x} is out of range")))?);
            }
            out
        }
        t => return Err((0, format!("must be integers, found {t}"))),
    })
}

/// Integer ids as i32 (any integer type, each within int32; no nulls). `Err` says why not.
pub fn ids(a: &dyn Array) -> Result<Vec<i32>, String> {
    let wide = integers(a).map_err(|(i, m)| {
        if m.starts_with("must be") {
            format!("ids {m}")
        } else {
            format!("{m} at item {i}")
        }
    })?;
    wide.into_iter()
        .map(|v| i32::try_from(v).map_err(|_| format!("id {v} does not fit int32")))
        .collect()
}

/// A float column (half, float or double) widened; `None` for any other type.
fn widen_floats(a: &dyn Array) -> Option<Vec<f64>> {
    Some(match a.data_type() {
        DataType::Float16 => a
            .as_primitive::<Float16Type>()
            .values()
            .iter()
            .map(|&x| x.to_f64())
            .collect(),
        DataType::Float32 => a
            .as_primitive::<Float32Type>()
            .values()
            .iter()
            .map(|&x| x as f64)
            .collect(),
        DataType::Float64 => a.as_primitive::<Float64Type>().values().to_vec(),
        _ => return None,
    })
}

/// Each value as a finite float32; `Err` is (why, offset) of the first that is not.
fn finite_f32(wide: Vec<f64>) -> Result<Vec<f32>, (String, usize)> {
    wide.into_iter()
        .enumerate()
        .map(|(i, x)| {
            let y = x as f32;
            if y.is_finite() {
                Ok(y)
            } else {
                Err((format!("{x} is not a finite float32"), i))
            }
        })
        .collect()
}

/// The offset of the first null of `a`, if any.
fn first_null(a: &dyn Array) -> Option<usize> {
    (a.null_count() > 0).then(|| (0..a.len()).find(|&i| a.is_null(i)).unwrap_or(0))
}

/// Scores as finite float32s (see the module docs); `Err` gives the message, the reason a
/// JSON row with the same problem would be rejected for, and the offset of the bad value.
pub fn scores_at(a: &dyn Array) -> Result<Vec<f32>, (String, RejectReason, usize)> {
    if let Some(i) = first_null(a) {
        return Err(("null score".into(), RejectReason::NonNumericScore, i));
    }
    let wide: Vec<f64> = match widen_floats(a) {
        Some(wide) => wide,
        None => match a.data_type() {
            DataType::Boolean => {
                return Err((
                    "booleans are not scores".into(),
                    RejectReason::BooleanScore,
                    0,
                ))
            }
            t if t.is_integer() => integers(a)
                .map_err(|(i, m)| (m, RejectReason::NonNumericScore, i))?
                .into_iter()
                .map(|x| x as f64)
                .collect(),
            t => {
                return Err((
                    format!("scores must be numbers, found {t}"),
                    RejectReason::NonNumericScore,
                    0,
                ))
            }
        },
    };
    finite_f32(wide).map_err(|(m, i)| (m, RejectReason::NonFiniteScore, i))
}

/// Float values (half, float or double; no integers, no nulls) as finite float32s, as
/// embeddings are read; `Err` is (why, offset of the bad value).
pub fn floats_at(a: &dyn Array) -> Result<Vec<f32>, (String, usize)> {
    if let Some(i) = first_null(a) {
        return Err(("null value".into(), i));
    }
    let wide =
        widen_floats(a).ok_or_else(|| (format!("must be floats, found {}", a.data_type()), 0))?;
    finite_f32(wide)
}

/// [`scores_at`] without the offset.
pub fn scores(a: &dyn Array) -> Result<Vec<f32>, (String, RejectReason)> {
    scores_at(a).map_err(|(m, r, _)| (m, r))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{BooleanArray, Float64Array, Int64Array};

    #[test]
    fn one_rule_for_scores_and_ids() {
        assert_eq!(
            scores(&Int64Array::from(vec![1, 2])).unwrap(),
            vec![1.0, 2.0]
        );
        assert_eq!(
            scores(&Float64Array::from(vec![1e300])).unwrap_err().1,
            RejectReason::NonFiniteScore
        );
        assert_eq!(
            scores(&BooleanArray::from(vec![true])).unwrap_err().1,
            RejectReason::BooleanScore
        );
        assert_eq!(
            scores(&Float64Array::from(vec![Some(1.0), None]))
                .unwrap_err()
                .1,
            RejectReason::NonNumericScore
        );
        assert_eq!(ids(&Int64Array::from(vec![5])).unwrap(), vec![5]);
        assert!(ids(&Int64Array::from(vec![1 << 40])).is_err());
    }
}
