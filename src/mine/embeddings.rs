//! Embeddings read from Parquet (what Spark, Polars or a `datasets` map write): an `embedding`
//! column of lists (list, large_list or fixed_size_list) of floats (half, float or double, each
//! a finite float32 once converted), one dimension for every row, and optionally an `id`
//! column giving each row's id (query embeddings: the dataset row; passage embeddings: the
//! corpus passage id), the ids 0..n once each; without it, ids follow the files' row order.

use std::path::PathBuf;

use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef};
use arrow_schema::DataType;

use super::Embeddings;
use crate::error::{Error, Result};

/// The list at row `i` of a list, large_list or fixed_size_list column.
fn vector_at(a: &dyn Array, i: usize) -> Option<ArrayRef> {
    if a.is_null(i) {
        return None;
    }
    match a.data_type() {
        DataType::FixedSizeList(..) => Some(a.as_fixed_size_list().value(i)),
        _ => crate::parquet_read::list_at(a, i),
    }
}

/// Embeddings from Parquet files or directories (see the module docs).
pub fn read_embeddings(inputs: &[PathBuf]) -> Result<Embeddings> {
    let files = crate::discover::parquet_files(inputs)?;
    let mut values: Vec<f32> = Vec::new();
    let mut dim: Option<usize> = None;
    let mut ids: Vec<(i64, usize, u64)> = Vec::new();
    let mut with_ids = None;
    for (file_index, path) in files.iter().enumerate() {
        let file = crate::storage::open_regular(path)?;
        let builder = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|e| Error::parquet(path, e))?;
        let schema = builder.schema().clone();
        crate::parquet_read::unique_columns(&schema).map_err(|m| Error::input(path, m))?;
        let has = |n: &str| schema.fields().iter().any(|f| f.name() == n);
        if !has("embedding") {
            return Err(Error::input(
                path,
                "an embeddings file needs an `embedding` column (a list of floats per row)",
            ));
        }
        match with_ids {
            None => with_ids = Some(has("id")),
            Some(w) if w != has("id") => {
                return Err(Error::input(
                    path,
                    "some embeddings files have an `id` column and some do not",
                ))
            }
            _ => {}
        }
        let reader = builder
            .with_batch_size(8192)
            .build()
            .map_err(|e| Error::parquet(path, e))?;
        let mut base = 0u64;
        for batch in reader {
            let batch = batch.map_err(|e| Error::parquet(path, e.into()))?;
            let at = |i: usize, field: &str, message: String| Error::Input {
                path: path.clone(),
                row: Some(base + i as u64),
                field: Some(field.into()),
                message,
            };
            let col = batch.column_by_name("embedding").expect("checked");
            for i in 0..batch.num_rows() {
                let v = vector_at(col.as_ref(), i)
                    .ok_or_else(|| at(i, "embedding", "not a list of floats (or null)".into()))?;
                if v.data_type().is_integer() || *v.data_type() == DataType::Boolean {
                    return Err(at(
                        i,
                        "embedding",
                        format!("embeddings are floats, found {}", v.data_type()),
                    ));
                }
                let v = crate::parquet_read::scores_at(v.as_ref()).map_err(|(m, _, j)| {
                    let m = m
                        .replace("null score", "null")
                        .replace("scores must be", "must be");
                    at(i, "embedding", format!("value {j}: {m}"))
                })?;
                match dim {
                    None if v.is_empty() => {
                        return Err(at(i, "embedding", "an empty embedding".into()))
                    }
                    None => dim = Some(v.len()),
                    Some(d) if d != v.len() => {
                        return Err(at(
                            i,
                            "embedding",
                            format!("{} values where the first row has {d}", v.len()),
                        ))
                    }
                    _ => {}
                }
                values.extend_from_slice(&v);
            }
            if has("id") {
                let v = crate::parquet_read::integers(batch.column_by_name("id").expect("checked"))
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
    let Some(dim) = dim else {
        return Err(Error::argument(
            "embeddings",
            "no embeddings in the files given",
        ));
    };
    if with_ids != Some(true) {
        return Ok(Embeddings { values, dim });
    }
    let slot_of = crate::parquet_read::order_by_ids(&ids, &files)?;
    let mut ordered = vec![0f32; values.len()];
    for (k, slot) in slot_of.into_iter().enumerate() {
        ordered[slot * dim..(slot + 1) * dim].copy_from_slice(&values[k * dim..(k + 1) * dim]);
    }
    Ok(Embeddings {
        values: ordered,
        dim,
    })
}
