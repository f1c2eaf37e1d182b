//! Parquet in, pre-tokenized: flat files (one row per query, token ids already computed, by
//! `export` or by anything else) become a dataset without tokenizing again.
//!
//! Accepted columns, by name: `query: list<int>`, `pos: list<list<int>>`,
//! `neg: list<list<int>>` (required); `pos_scores`, `neg_scores: list<float|double>`,
//! `prompt: list<int>` (null = the default prompt), `source: int` (optional). `list` or
//! `large_list`, int32 or int64 (ids must fit int32), any child field name: what Spark, Polars
//! and pyarrow write. Passages are deduplicated by their token ids. When the files carry the
//! `rankfeed.manifest` metadata that `export` writes, tokenizer facts, text settings, default
//! prompts and source names are restored.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::error::{Error, Result};
use crate::export::MANIFEST_KEY;
use crate::format::{SourceStats, TextSettings, TokenizerFacts};
use crate::writer::{DatasetWriter, GroupRecord, ManifestInfo, WriterOptions};

/// What an import did.
#[derive(Debug, Clone)]
pub struct ImportReport {
    /// Rows (groups) imported.
    pub rows: u64,
    /// Parquet bytes read.
    pub bytes: u64,
    /// Files read.
    pub files: usize,
    /// Wall time.
    pub elapsed: Duration,
    /// The manifest written.
    pub manifest: crate::Manifest,
    /// Stale staging directories of dead processes removed before writing.
    pub cleaned: Vec<PathBuf>,
}

/// Expand files and directories into `.parquet` files (directories: sorted, not recursive;
/// Spark's `_SUCCESS` and dot files are skipped).
pub fn discover_parquet(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for input in inputs {
        let meta = std::fs::metadata(input).map_err(|e| Error::io(input, e))?;
        if meta.is_dir() {
            let files = crate::convert::source::list_dir(input, |p| {
                p.extension().is_some_and(|e| e == "parquet")
            })?;
            if files.is_empty() {
                return Err(Error::input(input, "directory has no .parquet files"));
            }
            out.extend(files);
        } else {
            out.push(input.clone());
        }
    }
    Ok(out)
}

/// The list at row `i` of a list or large_list column, or None when null.
pub(crate) fn list_at(a: &dyn Array, i: usize) -> Option<ArrayRef> {
    if a.is_null(i) {
        return None;
    }
    match a.data_type() {
        DataType::List(_) => Some(a.as_list::<i32>().value(i)),
        DataType::LargeList(_) => Some(a.as_list::<i64>().value(i)),
        _ => None,
    }
}

/// Makes the error of one field of the row being read.
type Bad<'a> = &'a dyn Fn(String) -> Error;

/// Integer ids as i32 (int32 or int64 in range, no nulls).
fn ids(a: &dyn Array, bad: Bad<'_>) -> Result<Vec<i32>> {
    if a.null_count() > 0 {
        return Err(bad("null id".into()));
    }
    match a.data_type() {
        DataType::Int32 => Ok(a
            .as_primitive::<arrow_array::types::Int32Type>()
            .values()
            .to_vec()),
        DataType::Int64 => a
            .as_primitive::<arrow_array::types::Int64Type>()
            .values()
            .iter()
            .map(|&v| i32::try_from(v).map_err(|_| bad(format!("id {v} does not fit int32"))))
            .collect(),
        t => Err(bad(format!("ids must be int32 or int64, found {t}"))),
    }
}

/// Scores as f32 (float or double, finite).
fn scores(a: &dyn Array, bad: Bad<'_>) -> Result<Vec<f32>> {
    let v: Vec<f32> = match a.data_type() {
        DataType::Float32 => a
            .as_primitive::<arrow_array::types::Float32Type>()
            .values()
            .to_vec(),
        DataType::Float64 => a
            .as_primitive::<arrow_array::types::Float64Type>()
            .values()
            .iter()
            .map(|&x| x as f32)
            .collect(),
        t => return Err(bad(format!("scores must be float or double, found {t}"))),
    };
    if a.null_count() > 0 || v.iter().any(|x| !x.is_finite()) {
        return Err(bad("null or non-finite score".into()));
    }
    Ok(v)
}

#[derive(serde::Deserialize, Default)]
struct Carried {
    tokenizer: Option<TokenizerFacts>,
    text: Option<TextSettings>,
    sources: Option<Vec<SourceStats>>,
    default_prompts: Option<Vec<Vec<i32>>>,
}

/// Import flat pre-tokenized Parquet `inputs` into a dataset at `out`.
pub fn import(
    inputs: &[PathBuf],
    out: &Path,
    writer_options: WriterOptions,
) -> Result<ImportReport> {
    let start = Instant::now();
    let files = discover_parquet(inputs)?;
    let mut writer = DatasetWriter::create(out, writer_options)?;
    let mut carried: Option<Carried> = None;
    let mut passages: HashMap<u128, u32> = HashMap::new();
    let mut prompts: HashMap<Vec<i32>, u32> = HashMap::new();
    let mut per_source: Vec<(u64, u64)> = Vec::new(); // (rows, rows with no negatives)
    let (mut rows, mut bytes) = (0u64, 0u64);
    let mut last_source = 0u32;
    for (file_index, path) in files.iter().enumerate() {
        let file = crate::storage::open_regular(path)?;
        bytes += file.metadata().map_err(|e| Error::io(path, e))?.len();
        let builder =
            ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| Error::parquet(path, e))?;
        if carried.is_none() {
            let kv = builder.metadata().file_metadata().key_value_metadata();
            let json = kv
                .and_then(|kv| kv.iter().find(|k| k.key == MANIFEST_KEY))
                .and_then(|k| k.value.clone());
            let c: Carried = match json {
                Some(j) => serde_json::from_str(&j)
                    .map_err(|e| Error::corrupt(path, format!("{MANIFEST_KEY}: {e}")))?,
                None => Carried::default(),
            };
            let defaults = c
                .default_prompts
                .clone()
                .unwrap_or_else(|| vec![Vec::new(), Vec::new()]);
            for p in defaults.iter().take(2) {
                writer.add_prompt(p)?;
            }
            carried = Some(c);
        }
        let reader = builder
            .with_batch_size(4096)
            .build()
            .map_err(|e| Error::parquet(path, e))?;
        for batch in reader {
            let batch: RecordBatch = batch.map_err(|e| Error::parquet(path, e.into()))?;
            let col = |name: &str| batch.column_by_name(name).cloned();
            let need = |name: &str| {
                col(name).ok_or_else(|| Error::Input {
                    path: path.clone(),
                    row: None,
                    field: Some(name.into()),
                    message: "no such column (need query, pos, neg)".into(),
                })
            };
            let (query, pos, neg) = (need("query")?, need("pos")?, need("neg")?);
            let (ps, ns, prompt, source) = (
                col("pos_scores"),
                col("neg_scores"),
                col("prompt"),
                col("source"),
            );
            for i in 0..batch.num_rows() {
                let at = |field: &str, message: String| Error::Input {
                    path: path.clone(),
                    row: Some(rows),
                    field: Some(field.into()),
                    message,
                };
                let q = list_at(query.as_ref(), i)
                    .ok_or_else(|| at("query", "null or not a list".into()))?;
                let q = ids(q.as_ref(), &|m| at("query", m))?;
                let mut refs = [Vec::new(), Vec::new()];
                for (k, (name, column)) in [("pos", &pos), ("neg", &neg)].into_iter().enumerate() {
                    let outer = list_at(column.as_ref(), i)
                        .ok_or_else(|| at(name, "null or not a list".into()))?;
                    for j in 0..outer.len() {
                        let field = format!("{name}[{j}]");
                        let inner = list_at(outer.as_ref(), j)
                            .ok_or_else(|| at(&field, "not a list of ids".into()))?;
                        let tokens = ids(inner.as_ref(), &|m| at(&field, m))?;
                        let key = xxhash_rust::xxh3::xxh3_128(bytemuck::cast_slice(&tokens));
                        let id = match passages.get(&key) {
                            Some(&id) => id,
                            None => {
                                let id = writer.add_passage(&tokens)?;
                                passages.insert(key, id);
                                id
                            }
                        };
                        refs[k].push(id as i32);
                    }
                }
                if refs[0].is_empty() {
                    return Err(at("pos", "empty: a group needs a positive".into()));
                }
                let score = |column: &Option<ArrayRef>, name: &str| -> Result<Option<Vec<f32>>> {
                    match column.as_ref().and_then(|c| list_at(c.as_ref(), i)) {
                        Some(s) => Ok(Some(scores(s.as_ref(), &|m| at(name, m))?)),
                        None => Ok(None),
                    }
                };
                let (pos_scores, neg_scores) =
                    (score(&ps, "pos_scores")?, score(&ns, "neg_scores")?);
                let prompt_id = match prompt.as_ref().and_then(|c| list_at(c.as_ref(), i)) {
                    Some(p) => {
                        let tokens = ids(p.as_ref(), &|m| at("prompt", m))?;
                        Some(match prompts.get(&tokens) {
                            Some(&id) => id,
                            None => {
                                let id = writer.add_prompt(&tokens)?;
                                prompts.insert(tokens, id);
                                id
                            }
                        })
                    }
                    None => None,
                };
                let src = match source.as_ref() {
                    Some(s) if !s.is_null(i) => {
                        let v = ids(&s.slice(i, 1), &|m| at("source", m))?[0];
                        u32::try_from(v).map_err(|_| at("source", format!("negative: {v}")))?
                    }
                    _ => file_index as u32,
                };
                if src < last_source {
                    return Err(at(
                        "source",
                        format!("{src} after {last_source}: rows must be grouped by source in ascending order"),
                    ));
                }
                last_source = src;
                if per_source.len() <= src as usize {
                    per_source.resize(src as usize + 1, (0, 0));
                }
                per_source[src as usize].0 += 1;
                per_source[src as usize].1 += u64::from(refs[1].is_empty());
                writer.add_group(&GroupRecord {
                    query: &q,
                    pos: &refs[0],
                    neg: &refs[1],
                    pos_scores: pos_scores.as_deref(),
                    neg_scores: neg_scores.as_deref(),
                    prompt: prompt_id,
                    source: src,
                })?;
                rows += 1;
            }
        }
    }
    if rows == 0 {
        return Err(Error::argument("inputs", "no rows in the Parquet inputs"));
    }
    let carried = carried.unwrap_or_default();
    let known = carried.sources.unwrap_or_default();
    let sources = per_source
        .iter()
        .enumerate()
        .map(|(i, &(n, empty))| {
            let mut s = known.get(i).cloned().unwrap_or_else(|| SourceStats {
                path: files
                    .get(i)
                    .map_or_else(String::new, |p| p.display().to_string()),
                ..SourceStats::default()
            });
            s.id = i as u32;
            s.rows_accepted = n;
            s.rows_empty_neg = empty;
            if s.rows_read < n + s.rows_rejected {
                s.rows_read = n + s.rows_rejected;
            }
            s
        })
        .collect();
    let cleaned = writer.cleaned().to_vec();
    let manifest = writer.finish(ManifestInfo {
        tokenizer: carried.tokenizer,
        text: carried.text.unwrap_or_default(),
        sources,
    })?;
    Ok(ImportReport {
        rows,
        bytes,
        files: files.len(),
        elapsed: start.elapsed(),
        manifest,
        cleaned,
    })
}
