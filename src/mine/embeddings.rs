//! Embeddings read from Parquet (what Spark, Polars or a `datasets` map write): an `embedding`
//! column of lists (list, large_list or fixed_size_list) of floats (half, float or double, each
//! a finite float32 once converted), one dimension for every row, and optionally an `id`
//! column giving each row's id (query embeddings: the dataset row; passage embeddings: the
//! corpus passage id), the ids 0..n once each; without it, ids follow the files' row order.

use std::path::{Path, PathBuf};

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
    let open = |path: &Path, reader: &crate::parquet_read::Opened| -> Result<()> {
        if !reader
            .schema()
            .fields()
            .iter()
            .any(|f| f.name() == "embedding")
        {
            return Err(Error::input(
                path,
                "an embeddings file needs an `embedding` column (a list of floats per row)",
            ));
        }
        Ok(())
    };
    let rows = |batch: &arrow_array::RecordBatch,
                at: &dyn Fn(usize, &str, String) -> Error|
     -> Result<()> {
        let col = batch.column_by_name("embedding").expect("checked");
        for i in 0..batch.num_rows() {
            let v = vector_at(col.as_ref(), i)
                .ok_or_else(|| at(i, "embedding", "not a list of floats (or null)".into()))?;
            let v = crate::parquet_read::floats_at(v.as_ref())
                .map_err(|(m, j)| at(i, "embedding", format!("value {j}: {m}")))?;
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
        Ok(())
    };
    let slot_of = crate::parquet_read::read_rows(&files, "embeddings", open, rows)?;
    let Some(dim) = dim else {
        return Err(Error::argument(
            "embeddings",
            "no embeddings in the files given",
        ));
    };
    let Some(slot_of) = slot_of else {
        return Ok(Embeddings { values, dim });
    };
    let mut ordered = vec![0f32; values.len()];
    for (k, slot) in slot_of.into_iter().enumerate() {
        ordered[slot * dim..(slot + 1) * dim].copy_from_slice(&values[k * dim..(k + 1) * dim]);
    }
    Ok(Embeddings {
        values: ordered,
        dim,
    })
}
