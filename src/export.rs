//! Parquet out: a dataset as files that Spark, Polars, pyarrow and DuckDB read without casts.
//!
//! Two layouts (both directories of `part-NNNNN.parquet` files, zstd-compressed):
//!
//! ```text
//! flat/                     one row per query, passages resolved to their tokens
//!   row: int64  query: list<int32>  pos: list<list<int32>>  neg: list<list<int32>>
//!   pos_scores: list<float>?  neg_scores: list<float>?  prompt: list<int32>? (null = default)
//!   source: int32
//! tables/
//!   passages/  id: int32  tokens: list<int32>
//!   groups/    row: int64  query: list<int32>  pos: list<int32>  neg: list<int32> (passage ids)
//!              pos_scores: list<float>?  neg_scores: list<float>?  prompt: int32?  source: int32
//!   prompts/   id: int32  tokens: list<int32>
//! ```
//!
//! Only types Spark reads as they are: int32/int64/float, `list` (never `large_list`), list
//! children named `element` (the Parquet spec's name, which Spark and Polars write too).
//! Every file carries the dataset's tokenizer facts and text settings in its key-value
//! metadata (`rankfeed.manifest`), so `import` can restore them. Row groups hold about 64 MB.
//! The dataset is verified in full before anything is written.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::builder::{Float32Builder, Int32Builder, ListBuilder};
use arrow_array::{ArrayRef, Int32Array, Int64Array, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;

use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::format::col;
use crate::publish::Staging;

/// Key of the key-value metadata entry holding the manifest.
pub const MANIFEST_KEY: &str = crate::format::PARQUET_MANIFEST_KEY;

/// Which layout to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// One row per query, passages resolved to tokens.
    Flat,
    /// passages / groups / prompts, with passage-id references.
    Tables,
}

impl std::str::FromStr for Layout {
    type Err = Error;
    fn from_str(s: &str) -> Result<Layout> {
        match s {
            "flat" => Ok(Layout::Flat),
            "tables" => Ok(Layout::Tables),
            _ => Err(Error::argument(
                "layout",
                format!("{s:?}: expected flat or tables"),
            )),
        }
    }
}

/// Export options.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// Layout.
    pub layout: Layout,
    /// Rows per file before a new `part-NNNNN.parquet` starts.
    pub rows_per_file: usize,
    /// Target bytes of token data per row group.
    pub row_group_bytes: usize,
    /// Replace an existing output directory.
    pub overwrite: bool,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            layout: Layout::Flat,
            rows_per_file: 1_000_000,
            row_group_bytes: 64 << 20,
            overwrite: false,
        }
    }
}

/// What an export wrote.
#[derive(Debug, Clone, Default)]
pub struct ExportReport {
    /// Files written.
    pub files: Vec<PathBuf>,
    /// Bytes written.
    pub bytes: u64,
    /// Rows written (all tables).
    pub rows: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Stale staging directories of dead processes removed before publishing.
    pub cleaned: Vec<PathBuf>,
}

/// A list field with Parquet's child name.
pub(crate) fn list_of(name: &str, item: DataType, nullable: bool) -> Field {
    Field::new(
        name,
        DataType::List(Arc::new(Field::new("element", item, true))),
        nullable,
    )
}

fn tokens_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(col::ID, DataType::Int32, false),
        list_of(col::TOKENS, DataType::Int32, false),
    ]))
}

fn groups_schema(flat: bool) -> SchemaRef {
    let ids = |name| {
        if flat {
            list_of(
                name,
                DataType::List(Arc::new(Field::new("element", DataType::Int32, true))),
                false,
            )
        } else {
            list_of(name, DataType::Int32, false)
        }
    };
    Arc::new(Schema::new(vec![
        Field::new(col::ROW, DataType::Int64, false),
        list_of(col::QUERY, DataType::Int32, false),
        ids(col::POS),
        ids(col::NEG),
        list_of(col::POS_SCORES, DataType::Float32, true),
        list_of(col::NEG_SCORES, DataType::Float32, true),
        if flat {
            list_of(col::PROMPT, DataType::Int32, true)
        } else {
            Field::new(col::PROMPT, DataType::Int32, true)
        },
        Field::new(col::SOURCE, DataType::Int32, false),
    ]))
}

pub(crate) fn int_list() -> ListBuilder<Int32Builder> {
    ListBuilder::new(Int32Builder::new()).with_field(Arc::new(Field::new(
        "element",
        DataType::Int32,
        true,
    )))
}

fn float_list() -> ListBuilder<Float32Builder> {
    ListBuilder::new(Float32Builder::new()).with_field(Arc::new(Field::new(
        "element",
        DataType::Float32,
        true,
    )))
}

fn nested_int_list() -> ListBuilder<ListBuilder<Int32Builder>> {
    ListBuilder::new(int_list()).with_field(Arc::new(Field::new(
        "element",
        DataType::List(Arc::new(Field::new("element", DataType::Int32, true))),
        true,
    )))
}

/// Writes `part-NNNNN.parquet` files into a directory, rolling over every `rows_per_file`,
/// each carrying `(key, json)` in its key-value metadata.
pub(crate) struct PartWriter {
    dir: PathBuf,
    schema: SchemaRef,
    props: WriterProperties,
    rows_per_file: usize,
    current: Option<ArrowWriter<std::fs::File>>,
    rows_in_file: usize,
    report: ExportReport,
}

impl PartWriter {
    pub(crate) fn new(
        dir: PathBuf,
        schema: SchemaRef,
        (key, json): (&str, &str),
        rows_per_group: usize,
        rows_per_file: usize,
    ) -> Result<Self> {
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(
                ZstdLevel::try_new(3).expect("valid level"),
            ))
            .set_max_row_group_row_count(Some(rows_per_group.max(1)))
            .set_key_value_metadata(Some(vec![KeyValue::new(key.to_string(), json.to_string())]))
            .build();
        Ok(PartWriter {
            dir,
            schema,
            props,
            rows_per_file: rows_per_file.max(1),
            current: None,
            rows_in_file: 0,
            report: ExportReport::default(),
        })
    }

    /// Append `batch`, starting a new file whenever the current one is full.
    pub(crate) fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        let mut offset = 0;
        while offset < batch.num_rows() {
            if self.current.is_none() || self.rows_in_file >= self.rows_per_file {
                self.close_file()?;
                let path = self
                    .dir
                    .join(format!("part-{:05}.parquet", self.report.files.len()));
                let file = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
                self.current = Some(
                    ArrowWriter::try_new(file, self.schema.clone(), Some(self.props.clone()))
                        .map_err(|e| Error::parquet(&path, e))?,
                );
                self.report.files.push(path);
                self.rows_in_file = 0;
            }
            let take = (self.rows_per_file - self.rows_in_file).min(batch.num_rows() - offset);
            let part = batch.slice(offset, take);
            self.current
                .as_mut()
                .expect("opened above")
                .write(&part)
                .map_err(|e| Error::parquet(&self.dir, e))?;
            self.rows_in_file += take;
            self.report.rows += take as u64;
            offset += take;
        }
        Ok(())
    }

    fn close_file(&mut self) -> Result<()> {
        if let Some(w) = self.current.take() {
            w.close().map_err(|e| Error::parquet(&self.dir, e))?;
        }
        Ok(())
    }

    pub(crate) fn finish(mut self) -> Result<ExportReport> {
        self.close_file()?;
        if self.report.files.is_empty() {
            // An empty table is still a readable file with the schema.
            let path = self.dir.join("part-00000.parquet");
            let file = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
            ArrowWriter::try_new(file, self.schema.clone(), Some(self.props.clone()))
                .map_err(|e| Error::parquet(&self.dir, e))?
                .close()
                .map_err(|e| Error::parquet(&self.dir, e))?;
            self.report.files.push(path);
        }
        for f in &self.report.files {
            self.report.bytes += std::fs::metadata(f).map_err(|e| Error::io(f, e))?.len();
        }
        Ok(self.report)
    }
}

/// The manifest parts that `import` restores, as JSON.
fn manifest_json(ds: &Dataset) -> Result<String> {
    let m = ds.manifest();
    let defaults = [
        crate::format::PROMPT_ID_LLM_DEFAULT,
        crate::format::PROMPT_ID_MATRYOSHKA_DEFAULT,
    ]
    .iter()
    .filter(|&&id| (id as usize) < ds.num_prompts())
    .map(|&id| ds.prompt_tokens(id).map(<[i32]>::to_vec))
    .collect::<Result<Vec<_>>>()?;
    Ok(serde_json::json!({
        "format_version": m.format_version,
        "tokenizer": m.tokenizer,
        "text": m.text,
        "sources": m.sources,
        "shards": m.shards,
        "default_prompts": defaults,
    })
    .to_string())
}

/// Export `ds` to Parquet under `out` (a directory). The dataset is verified in full first
/// ([`Dataset::validate`]: checksums, rows, ids): a corrupt dataset is an error and nothing is
/// written, so an export never carries damaged data under a clean Parquet file.
pub fn export(ds: &Dataset, out: &Path, options: &ExportOptions) -> Result<ExportReport> {
    let start = Instant::now();
    ds.validate()?;
    let staging = Staging::new(out, options.overwrite)?;
    let stage = staging.path();
    let meta = manifest_json(ds)?;
    let c = &ds.manifest().counts;
    let mut report = match options.layout {
        Layout::Flat => {
            let per_row = 4 * (c.passage_ref_tokens + c.query_tokens) / c.groups.max(1) + 64;
            let rows_per_group =
                (options.row_group_bytes as u64 / per_row.max(1)).clamp(1024, 1 << 20) as usize;
            let mut w = PartWriter::new(
                stage.to_path_buf(),
                groups_schema(true),
                (MANIFEST_KEY, &meta),
                rows_per_group,
                options.rows_per_file,
            )?;
            write_groups(ds, &mut w, rows_per_group, true)?;
            w.finish()?
        }
        Layout::Tables => {
            let mut total = ExportReport::default();
            for (name, rows, tokens) in [
                ("passages", ds.num_passages(), c.passage_tokens),
                ("prompts", ds.num_prompts(), 0),
            ] {
                let per_row = 4 * tokens / (rows as u64).max(1) + 16;
                let rows_per_group =
                    (options.row_group_bytes as u64 / per_row).clamp(1024, 1 << 20) as usize;
                let mut w = PartWriter::new(
                    stage.join(name),
                    tokens_schema(),
                    (MANIFEST_KEY, &meta),
                    rows_per_group,
                    options.rows_per_file,
                )?;
                for lo in (0..rows).step_by(rows_per_group) {
                    let hi = (lo + rows_per_group).min(rows);
                    let mut tokens = int_list();
                    for id in lo..hi {
                        let t = if name == "passages" {
                            ds.passage(id as i32)?
                        } else {
                            ds.prompt_tokens(id as u32)?
                        };
                        tokens.values().append_slice(t);
                        tokens.append(true);
                    }
                    let ids = Int32Array::from_iter_values((lo..hi).map(|i| i as i32));
                    let batch = RecordBatch::try_new(
                        tokens_schema(),
                        vec![Arc::new(ids), Arc::new(tokens.finish())],
                    )?;
                    w.write(&batch)?;
                }
                merge_reports(&mut total, w.finish()?);
            }
            let rows_per_group = 1 << 16;
            let mut w = PartWriter::new(
                stage.join("groups"),
                groups_schema(false),
                (MANIFEST_KEY, &meta),
                rows_per_group,
                options.rows_per_file,
            )?;
            write_groups(ds, &mut w, rows_per_group, false)?;
            merge_reports(&mut total, w.finish()?);
            total
        }
    };
    for f in &mut report.files {
        if let Ok(rel) = f.strip_prefix(stage) {
            *f = out.join(rel);
        }
    }
    report.cleaned = staging.commit()?;
    report.elapsed = start.elapsed();
    Ok(report)
}

fn merge_reports(total: &mut ExportReport, r: ExportReport) {
    total.files.extend(r.files);
    total.bytes += r.bytes;
    total.rows += r.rows;
}

fn write_groups(ds: &Dataset, w: &mut PartWriter, rows_per_batch: usize, flat: bool) -> Result<()> {
    let n = ds.len();
    for lo in (0..n).step_by(rows_per_batch.max(1)) {
        let hi = (lo + rows_per_batch).min(n);
        let mut query = int_list();
        let (mut pos_ids, mut neg_ids) = (int_list(), int_list());
        let (mut pos_tok, mut neg_tok) = (nested_int_list(), nested_int_list());
        let (mut ps, mut ns) = (float_list(), float_list());
        let mut prompt_tok = int_list();
        let mut prompt_id = Int32Builder::new();
        let mut source = Int32Builder::new();
        for row in lo..hi {
            let g = ds.group(row)?;
            query.values().append_slice(g.query);
            query.append(true);
            if flat {
                for (ids, out) in [(g.pos, &mut pos_tok), (g.neg, &mut neg_tok)] {
                    for &id in ids {
                        out.values()
                            .values()
                            .append_slice(ds.referenced_passage(id)?);
                        out.values().append(true);
                    }
                    out.append(true);
                }
                match g.prompt {
                    Some(p) => {
                        prompt_tok.values().append_slice(ds.prompt_tokens(p)?);
                        prompt_tok.append(true);
                    }
                    None => prompt_tok.append_null(),
                }
            } else {
                pos_ids.values().append_slice(g.pos);
                pos_ids.append(true);
                neg_ids.values().append_slice(g.neg);
                neg_ids.append(true);
                prompt_id.append_option(g.prompt.map(|p| p as i32));
            }
            for (scores, out) in [(g.pos_scores, &mut ps), (g.neg_scores, &mut ns)] {
                match scores {
                    Some(s) => {
                        out.values().append_slice(s);
                        out.append(true);
                    }
                    None => out.append_null(),
                }
            }
            source.append_value(g.source as i32);
        }
        let rows = Int64Array::from_iter_values((lo..hi).map(|r| r as i64));
        // The layouts differ in how passages and prompts are given: tokens, or ids.
        let (pos, neg, prompt): (ArrayRef, ArrayRef, ArrayRef) = if flat {
            (
                Arc::new(pos_tok.finish()),
                Arc::new(neg_tok.finish()),
                Arc::new(prompt_tok.finish()),
            )
        } else {
            (
                Arc::new(pos_ids.finish()),
                Arc::new(neg_ids.finish()),
                Arc::new(prompt_id.finish()),
            )
        };
        let columns: Vec<ArrayRef> = vec![
            Arc::new(rows),
            Arc::new(query.finish()),
            pos,
            neg,
            Arc::new(ps.finish()),
            Arc::new(ns.finish()),
            prompt,
            Arc::new(source.finish()),
        ];
        w.write(&RecordBatch::try_new(groups_schema(flat), columns)?)?;
    }
    Ok(())
}
