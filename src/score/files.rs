//! Teacher scores computed elsewhere: the unique pairs out as Parquet, a scores file back in.
//!
//! **Pairs** ([`export_pairs`]): a directory of `part-NNNNN.parquet` files (zstd), one row per
//! unique pair of the plan's rank, in the plan's order (longest first, so consecutive rows
//! batch with little padding):
//!
//! ```text
//! pair: int64         the pair id (what a scores file names)
//! batch: int64        the plan's global batch (scoring batch by batch pads least)
//! row: int64          the first row holding the pair
//! passage_id: int32   the passage (deduplicated id)
//! key: int64          a digest of the pair's content (query, prompt and passage tokens)
//! input_ids: list<int32>        the sequence the model sees (template, truncation, prompt)
//! token_type_ids: list<int32>   (only when the tokenizer uses them)
//! query_text, prompt_text (null without a prompt), passage_text: string
//!                               (only with a tokenizer: decoded from the stored ids, for a
//!                                teacher with another tokenizer)
//! ```
//!
//! Every file's key-value metadata holds `rankfeed.pairs`: the dataset's seal, the plan's
//! digest, the rank and world size, the pair count.
//!
//! **Scores** ([`read_scores`]): Parquet files (or directories of them) with an integer `pair`
//! column and a numeric `score` column, in any order and split across any number of files
//! (what Spark, Polars or pandas write). Each pair id of the dataset must be scored exactly
//! once with a finite float32; a file that also has `row`, `passage_id` or `key` columns has
//! them checked against the pair (carry `key` along: it catches scores of another dataset
//! whose pair ids happen to line up), and one that carries `rankfeed.pairs` metadata must name
//! this dataset's seal. Any violation is an error naming the file, row and column.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::builder::{Int32Builder, ListBuilder, StringBuilder};
use arrow_array::{ArrayRef, Int32Array, Int64Array, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;
use serde::{Deserialize, Serialize};

use super::{pair_of, PlanReport, ScorePlan, UniquePairs};
use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::export::{int_list, list_of, PartWriter};
use crate::publish::Staging;
use crate::tokenizer::TextTokenizer;

/// Key of the key-value metadata entry of a pairs file.
pub const PAIRS_KEY: &str = "rankfeed.pairs";
const PAIRS_FORMAT: &str = "rankfeed-pairs";
/// Pairs per record batch (and at most per row group).
const CHUNK: usize = 65_536;
/// Pairs per part file.
const PAIRS_PER_FILE: usize = 4 << 20;
/// Pair ids listed when some are missing.
const LISTED: usize = 5;

/// The `rankfeed.pairs` metadata of a pairs file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairsMeta {
    /// `rankfeed-pairs`.
    pub format: String,
    /// The dataset's seal.
    pub seal: String,
    /// [`ScorePlan::digest`].
    pub plan: String,
    /// The plan's rank.
    pub rank: u64,
    /// The plan's world size.
    pub world_size: u64,
    /// Unique pairs of the dataset (all ranks).
    pub unique_pairs: u64,
}

/// What [`export_pairs`] wrote.
#[derive(Debug, Clone)]
pub struct PairsReport {
    /// Pairs written (this rank's).
    pub pairs: u64,
    /// Files written.
    pub files: Vec<PathBuf>,
    /// Bytes written.
    pub bytes: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Stale staging directories of dead processes removed before publishing.
    pub cleaned: Vec<PathBuf>,
    /// The plan's figures.
    pub plan: PlanReport,
}

fn pairs_schema(types: bool, text: bool) -> SchemaRef {
    let mut fields = vec![
        Field::new("pair", DataType::Int64, false),
        Field::new("batch", DataType::Int64, false),
        Field::new("row", DataType::Int64, false),
        Field::new("passage_id", DataType::Int32, false),
        Field::new("key", DataType::Int64, false),
        list_of("input_ids", DataType::Int32, false),
    ];
    if types {
        fields.push(list_of("token_type_ids", DataType::Int32, false));
    }
    if text {
        fields.push(Field::new("query_text", DataType::Utf8, false));
        fields.push(Field::new("prompt_text", DataType::Utf8, true));
        fields.push(Field::new("passage_text", DataType::Utf8, false));
    }
    Arc::new(Schema::new(fields))
}

/// Column builders of one chunk of pairs.
struct Columns {
    pair: Vec<i64>,
    batch: Vec<i64>,
    row: Vec<i64>,
    passage: Vec<i32>,
    key: Vec<i64>,
    ids: ListBuilder<Int32Builder>,
    types: Option<ListBuilder<Int32Builder>>,
    text: Option<[StringBuilder; 3]>,
}

impl Columns {
    fn new(types: bool, text: bool) -> Columns {
        Columns {
            pair: Vec::new(),
            batch: Vec::new(),
            row: Vec::new(),
            passage: Vec::new(),
            key: Vec::new(),
            ids: int_list(),
            types: types.then(int_list),
            text: text.then(|| std::array::from_fn(|_| StringBuilder::new())),
        }
    }

    fn take(&mut self, schema: &SchemaRef) -> Result<RecordBatch> {
        let mut cols: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from(std::mem::take(&mut self.pair))),
            Arc::new(Int64Array::from(std::mem::take(&mut self.batch))),
            Arc::new(Int64Array::from(std::mem::take(&mut self.row))),
            Arc::new(Int32Array::from(std::mem::take(&mut self.passage))),
            Arc::new(Int64Array::from(std::mem::take(&mut self.key))),
            Arc::new(self.ids.finish()),
        ];
        if let Some(t) = &mut self.types {
            cols.push(Arc::new(t.finish()));
        }
        if let Some(text) = &mut self.text {
            for b in text.iter_mut() {
                cols.push(Arc::new(b.finish()));
            }
        }
        RecordBatch::try_new(schema.clone(), cols)
            .map_err(|e| Error::input("pairs", format!("building a record batch: {e}")))
    }
}

/// A digest of pair (first row `row`, passage `passage`)'s content: the query's tokens, its
/// prompt's tokens (if any) and the passage's tokens (ids of rows and passages do not enter).
pub fn content_key(ds: &Dataset, row: u32, passage: u32) -> Result<i64> {
    let g = ds.group_ids(row as usize)?;
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut part = |tokens: &[i32]| {
        h.update(&(tokens.len() as u64).to_le_bytes());
        h.update(bytemuck::cast_slice(tokens));
    };
    part(g.query);
    match g.prompt {
        Some(p) => part(ds.prompt_tokens(p)?),
        None => part(&[-1]),
    }
    part(ds.referenced_passage(passage as i32)?);
    Ok(h.digest() as i64)
}

/// Write this rank's unique pairs of `plan` under `out` (a directory, published atomically;
/// see the module docs). With `tokenizer` (it must be the dataset's), the query, prompt and
/// passage texts are added, decoded from the stored ids.
pub fn export_pairs(
    plan: &ScorePlan,
    out: &Path,
    tokenizer: Option<&TextTokenizer>,
    overwrite: bool,
) -> Result<PairsReport> {
    let start = Instant::now();
    let ds = plan.dataset();
    if let Some(t) = tokenizer {
        let ours = ds.tokenizer_fingerprint();
        if ours != Some(t.facts().fingerprint.as_str()) {
            return Err(Error::argument(
                "tokenizer",
                format!(
                    "{} is not the dataset's tokenizer (fingerprint {}, the dataset's {}): \
                     its texts would not be the dataset's",
                    t.path().display(),
                    t.facts().fingerprint,
                    ours.unwrap_or("not recorded")
                ),
            ));
        }
    }
    let (rank, world_size) = plan.shard();
    let meta = serde_json::to_string(&PairsMeta {
        format: PAIRS_FORMAT.into(),
        seal: ds.manifest().checksum.clone(),
        plan: plan.digest().into(),
        rank,
        world_size,
        unique_pairs: plan.pairs().len() as u64,
    })
    .expect("plain struct");
    let types = plan.collator().has_token_type_ids();
    let schema = pairs_schema(types, tokenizer.is_some());
    let staging = Staging::new(out, overwrite)?;
    let mut w = PartWriter::new(
        staging.path().to_path_buf(),
        schema.clone(),
        (PAIRS_KEY, &meta),
        CHUNK,
        PAIRS_PER_FILE,
    )?;
    let mut cols = Columns::new(types, tokenizer.is_some());
    let mut written = 0u64;
    for index in 0..plan.len() {
        let global = index * world_size + rank;
        for &p in plan.batch_pairs(index)? {
            let (row, passage) = plan.pairs().first(p);
            let pair = pair_of(ds, plan.collator(), (row, passage))?;
            cols.pair.push(p as i64);
            cols.batch.push(global as i64);
            cols.row.push(row as i64);
            cols.passage.push(passage as i32);
            cols.key.push(content_key(ds, row, passage)?);
            cols.ids.values().append_slice(&pair.ids());
            cols.ids.append(true);
            if let Some(t) = &mut cols.types {
                let ids: Vec<i32> = pair.type_ids().into_iter().map(i32::from).collect();
                t.values().append_slice(&ids);
                t.append(true);
            }
            if let (Some(text), Some(tok)) = (&mut cols.text, tokenizer) {
                let g = ds.group_ids(row as usize)?;
                let prompt = plan.collator().prompt_of(ds, g.prompt)?;
                text[0].append_value(tok.decode(g.query)?);
                if prompt.is_empty() {
                    text[1].append_null();
                } else {
                    text[1].append_value(tok.decode(prompt)?);
                }
                text[2].append_value(tok.decode(ds.referenced_passage(passage as i32)?)?);
            }
            written += 1;
            if cols.pair.len() == CHUNK {
                w.write(&cols.take(&schema)?)?;
            }
        }
    }
    if !cols.pair.is_empty() {
        w.write(&cols.take(&schema)?)?;
    }
    let r = w.finish()?;
    let files: Vec<PathBuf> = r
        .files
        .iter()
        .map(|f| out.join(f.file_name().expect("part file")))
        .collect();
    let cleaned = staging.commit()?;
    Ok(PairsReport {
        pairs: written,
        files,
        bytes: r.bytes,
        elapsed: start.elapsed(),
        cleaned,
        plan: plan.report()?,
    })
}

/// An error at `row` (0-based, counted over the file) of `path`, column `field`.
fn at(path: &Path, row: u64, field: &str, message: impl Into<String>) -> Error {
    Error::Input {
        path: path.to_path_buf(),
        row: Some(row),
        field: Some(field.into()),
        message: message.into(),
    }
}

/// One score per unique pair of `ds` ([`UniquePairs`] order) from Parquet scores files (see
/// the module docs).
pub fn read_scores(ds: &Dataset, inputs: &[PathBuf]) -> Result<Vec<f32>> {
    let pairs = UniquePairs::build(ds)?;
    let n = pairs.len();
    // NaN marks a pair not yet scored (every score read is finite).
    let mut scores = vec![f32::NAN; n];
    let seal = &ds.manifest().checksum;
    for path in crate::discover::parquet_files(inputs)? {
        let file = crate::storage::open_regular(&path)?;
        let builder =
            ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| Error::parquet(&path, e))?;
        if let Some(kv) = builder.metadata().file_metadata().key_value_metadata() {
            if let Some(json) = kv
                .iter()
                .find(|k| k.key == PAIRS_KEY)
                .and_then(|k| k.value.clone())
            {
                let meta: PairsMeta = serde_json::from_str(&json).map_err(|e| Error::Input {
                    path: path.clone(),
                    row: None,
                    field: Some(PAIRS_KEY.into()),
                    message: format!("unreadable pairs metadata: {e}"),
                })?;
                if &meta.seal != seal {
                    return Err(Error::Input {
                        path: path.clone(),
                        row: None,
                        field: Some(PAIRS_KEY.into()),
                        message: format!(
                            "these are pairs of dataset {}, not of {} (seal {seal})",
                            meta.seal,
                            ds.dir().display()
                        ),
                    });
                }
            }
        }
        let schema = builder.schema().clone();
        crate::parquet_read::unique_columns(&schema).map_err(|m| Error::input(&path, m))?;
        let find = |name: &str| schema.fields().iter().position(|f| f.name() == name);
        let (Some(pair_col), Some(score_col)) = (find("pair"), find("score")) else {
            return Err(Error::input(
                &path,
                format!(
                    "a scores file needs an integer `pair` and a numeric `score` column; \
                     found {:?}",
                    schema.fields().iter().map(|f| f.name()).collect::<Vec<_>>()
                ),
            ));
        };
        let checks: Vec<(&str, usize)> = ["row", "passage_id", "key"]
            .into_iter()
            .filter_map(|c| find(c).map(|i| (c, i)))
            .collect();
        let mut roots = vec![pair_col, score_col];
        roots.extend(checks.iter().map(|c| c.1));
        roots.sort_unstable();
        let mask = ProjectionMask::roots(builder.parquet_schema(), roots.iter().copied());
        let reader = builder
            .with_projection(mask)
            .with_batch_size(CHUNK)
            .build()
            .map_err(|e| Error::parquet(&path, e))?;
        let mut base = 0u64;
        for batch in reader {
            let batch = batch.map_err(|e| Error::parquet(&path, e.into()))?;
            let col = |name: &str| batch.column_by_name(name).expect("projected");
            let ids = crate::parquet_read::integers(col("pair").as_ref())
                .map_err(|(i, m)| at(&path, base + i as u64, "pair", m))?;
            let values = crate::parquet_read::scores_at(col("score").as_ref())
                .map_err(|(m, _, i)| at(&path, base + i as u64, "score", m))?;
            let mut checked = Vec::new();
            for (name, _) in &checks {
                let v = crate::parquet_read::integers(col(name).as_ref())
                    .map_err(|(i, m)| at(&path, base + i as u64, name, m))?;
                checked.push((*name, v));
            }
            for (i, (&id, &score)) in ids.iter().zip(&values).enumerate() {
                let row = base + i as u64;
                if id < 0 || id as u64 >= n as u64 {
                    return Err(at(
                        &path,
                        row,
                        "pair",
                        format!("pair {id} does not exist: the dataset has {n} unique pairs"),
                    ));
                }
                let (first_row, passage) = pairs.first(id as u32);
                for (name, v) in &checked {
                    let (want, what) = match *name {
                        "row" => (first_row as i64, "first row"),
                        "passage_id" => (passage as i64, "passage"),
                        _ => (content_key(ds, first_row, passage)?, "content key"),
                    };
                    if v[i] != want {
                        return Err(at(
                            &path,
                            row,
                            name,
                            format!(
                                "{} for pair {id}, whose {what} is {want}: the file does not \
                                 belong to this dataset",
                                v[i]
                            ),
                        ));
                    }
                }
                let slot = &mut scores[id as usize];
                if !slot.is_nan() {
                    return Err(at(
                        &path,
                        row,
                        "pair",
                        format!("pair {id} is scored twice (each pair exactly once)"),
                    ));
                }
                *slot = score;
            }
            base += batch.num_rows() as u64;
        }
    }
    let missing: Vec<usize> = (0..n).filter(|&p| scores[p].is_nan()).collect();
    if !missing.is_empty() {
        let listed: Vec<String> = missing
            .iter()
            .take(LISTED)
            .map(|&p| {
                let (row, passage) = pairs.first(p as u32);
                format!("{p} (row {row}, passage {passage})")
            })
            .collect();
        return Err(Error::argument(
            "scores",
            format!(
                "{} of {n} unique pairs have no score, e.g. {}",
                missing.len(),
                listed.join(", ")
            ),
        ));
    }
    Ok(scores)
}
