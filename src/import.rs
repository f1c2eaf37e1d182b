//! Parquet in, pre-tokenized: token ids computed elsewhere (by `export`, or by anything else)
//! become a dataset without tokenizing again.
//!
//! Two layouts, as `export` writes them:
//! - **flat** (files, or directories of `.parquet` files): one row per query;
//!   `query: list<int>`, `pos`/`neg: list<list<int>>` (each passage's ids) required;
//!   `pos_scores`/`neg_scores: list<number>`, `prompt: list<int>` (null = the default prompt),
//!   `source: int`, `row: int` optional;
//! - **tables** (one directory holding `passages/`, `prompts/` and `groups/`): passages and
//!   prompts as `id: int`, `tokens: list<int>`; groups with `pos`/`neg: list<int>` passage ids
//!   and `prompt: int` (a prompt id; 0 and 1 are the default prompts).
//!
//! `list` or `large_list`, int32 or int64 (ids must fit int32), any child field name: what
//! Spark, Polars and pyarrow write. Scores follow [`crate::parquet_read`]'s one rule.
//!
//! **Order**: with a `row` column, rows are written in `row` order (a Spark `repartition`
//! shuffles them; restoring that order holds the whole dataset in memory once); without one,
//! in file order.
//!
//! **Tokenizer facts** (needed to build pairs: special ids, templates, pad) come from the
//! `rankfeed.manifest` metadata that `export` writes, or from a tokenizer (`--tokenizer`) when
//! the files carry none (Spark drops key-value metadata; ids made elsewhere have none). With
//! neither, import refuses; with both, they must be the same tokenizer. Every token id is
//! checked against the vocabulary.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, RecordBatch};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;

use crate::discover::parquet_files;
use crate::error::{Error, Result};
use crate::format::{self, col, SourceStats, TextSettings, TokenizerFacts};
use crate::parquet_read::{ids, list_at, scores};
use crate::tokenizer::TextTokenizer;
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

/// What `export` stores in the Parquet metadata.
#[derive(serde::Deserialize, Default)]
struct Carried {
    tokenizer: Option<TokenizerFacts>,
    text: Option<TextSettings>,
    sources: Option<Vec<SourceStats>>,
    default_prompts: Option<Vec<Vec<i32>>>,
}

/// Everything the manifest needs besides what the writer counts.
struct Meta {
    facts: TokenizerFacts,
    text: TextSettings,
    default_prompts: Vec<Vec<i32>>,
    sources: Vec<SourceStats>,
}

/// The input, by layout.
enum Layout {
    Flat(Vec<PathBuf>),
    Tables {
        groups: Vec<PathBuf>,
        passages: Vec<PathBuf>,
        prompts: Vec<PathBuf>,
    },
}

impl Layout {
    fn discover(inputs: &[PathBuf]) -> Result<Layout> {
        if let [dir] = inputs {
            if dir.join("groups").is_dir() && dir.join("passages").is_dir() {
                let sub = |name: &str| parquet_files(&[dir.join(name)]);
                return Ok(Layout::Tables {
                    groups: sub("groups")?,
                    passages: sub("passages")?,
                    prompts: sub("prompts")?,
                });
            }
        }
        Ok(Layout::Flat(parquet_files(inputs)?))
    }

    fn group_files(&self) -> &[PathBuf] {
        match self {
            Layout::Flat(f) => f,
            Layout::Tables { groups, .. } => groups,
        }
    }
}

/// One group as read, with passages and prompt as token ids.
struct Row {
    /// Index of its file, and its index across the files (for errors).
    origin: (usize, u64),
    row: Option<i64>,
    query: Vec<i32>,
    pos: Vec<Vec<i32>>,
    neg: Vec<Vec<i32>>,
    pos_scores: Option<Vec<f32>>,
    neg_scores: Option<Vec<f32>>,
    prompt: Option<Vec<i32>>,
    source: u32,
}

/// Passages and prompts of the tables layout, by id.
struct Tables {
    passages: Vec<Vec<i32>>,
    prompts: Vec<Vec<i32>>,
}

/// Import Parquet `inputs` (flat files, or a tables directory) into a dataset at `out`.
/// `tokenizer` supplies the tokenizer facts when the files carry no rankfeed metadata.
pub fn import(
    inputs: &[PathBuf],
    out: &Path,
    tokenizer: Option<&TextTokenizer>,
    writer_options: WriterOptions,
) -> Result<ImportReport> {
    let start = Instant::now();
    let layout = Layout::discover(inputs)?;
    let files = layout.group_files().to_vec();
    let meta = resolve_meta(read_carried(&files[0])?, tokenizer, &files[0])?;
    let tables = match &layout {
        Layout::Flat(_) => None,
        Layout::Tables {
            passages, prompts, ..
        } => Some(Tables {
            passages: read_token_table(passages)?,
            prompts: read_token_table(prompts)?,
        }),
    };
    let mut writer = DatasetWriter::create(out, writer_options)?;
    for p in &meta.default_prompts {
        writer.add_prompt(p)?;
    }
    let mut sink = Sink {
        files: &files,
        writer: &mut writer,
        vocab: meta.facts.vocab_size as i64,
        per_source: Vec::new(),
    };
    if needs_reorder(&files)? {
        let mut rows = Vec::new();
        read_rows(&files, tables.as_ref(), &mut |r| {
            rows.push(r);
            Ok(())
        })?;
        rows.sort_by_key(|r| r.row);
        rows.into_iter().try_for_each(|r| sink.write(r))?;
    } else {
        read_rows(&files, tables.as_ref(), &mut |r| sink.write(r))?;
    }
    let per_source = std::mem::take(&mut sink.per_source);
    let rows: u64 = per_source.iter().map(|s| s.0).sum();
    if rows == 0 {
        return Err(Error::argument("inputs", "no rows in the Parquet inputs"));
    }
    let cleaned = writer.cleaned().to_vec();
    let manifest = writer.finish(ManifestInfo {
        sources: source_stats(&per_source, meta.sources, &files),
        tokenizer: Some(meta.facts),
        text: meta.text,
        shards: None,
    })?;
    let bytes = files
        .iter()
        .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .sum();
    Ok(ImportReport {
        rows,
        bytes,
        files: files.len(),
        elapsed: start.elapsed(),
        manifest,
        cleaned,
    })
}

fn open_reader(path: &Path) -> Result<ParquetRecordBatchReaderBuilder<std::fs::File>> {
    let file = crate::storage::open_regular(path)?;
    ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| Error::parquet(path, e))
}

fn batches(
    path: &Path,
    builder: ParquetRecordBatchReaderBuilder<std::fs::File>,
    f: &mut dyn FnMut(RecordBatch) -> Result<()>,
) -> Result<()> {
    let reader = builder
        .with_batch_size(4096)
        .build()
        .map_err(|e| Error::parquet(path, e))?;
    for batch in reader {
        f(batch.map_err(|e| Error::parquet(path, e.into()))?)?;
    }
    Ok(())
}

/// The `rankfeed.manifest` metadata of `path`, if any.
fn read_carried(path: &Path) -> Result<Option<Carried>> {
    let builder = open_reader(path)?;
    let kv = builder.metadata().file_metadata().key_value_metadata();
    let json = kv
        .and_then(|kv| kv.iter().find(|k| k.key == format::PARQUET_MANIFEST_KEY))
        .and_then(|k| k.value.clone());
    json.map(|j| {
        serde_json::from_str(&j)
            .map_err(|e| Error::input(path, format!("{}: {e}", format::PARQUET_MANIFEST_KEY)))
    })
    .transpose()
}

/// Tokenizer facts, text settings and default prompts from the metadata, or the tokenizer.
fn resolve_meta(
    carried: Option<Carried>,
    tokenizer: Option<&TextTokenizer>,
    path: &Path,
) -> Result<Meta> {
    let carried = carried.unwrap_or_default();
    let sources = carried.sources.unwrap_or_default();
    match (carried.tokenizer, tokenizer) {
        (Some(facts), given) => {
            if let Some(t) = given.filter(|t| t.facts().fingerprint != facts.fingerprint) {
                return Err(Error::argument(
                    "tokenizer",
                    format!(
                        "{} was tokenized with {}, the tokenizer given is {}",
                        path.display(),
                        facts.fingerprint,
                        t.facts().fingerprint
                    ),
                ));
            }
            Ok(Meta {
                facts,
                text: carried.text.unwrap_or_default(),
                default_prompts: carried.default_prompts.unwrap_or_default(),
                sources,
            })
        }
        (None, Some(t)) => {
            let text = TextSettings {
                sep_ids: t.encode(&TextSettings::default().sep_token)?,
                ..TextSettings::default()
            };
            let default_prompts =
                t.encode_batch(&[&text.default_prompt_llm, &text.default_prompt_matryoshka])?;
            Ok(Meta {
                facts: t.facts().clone(),
                text,
                default_prompts,
                sources,
            })
        }
        (None, None) => Err(Error::argument(
            "tokenizer",
            format!(
                "{} carries no rankfeed metadata with tokenizer facts (Spark and Polars drop \
                 it; ids made elsewhere have none): give the tokenizer.json the ids were made \
                 with (CLI --tokenizer, Python tokenizer=)",
                path.display()
            ),
        )),
    }
}

/// Whether the files have a `row` column that is not already in increasing order (read
/// alone, a cheap first pass).
fn needs_reorder(files: &[PathBuf]) -> Result<bool> {
    let mut last = i64::MIN;
    for path in files {
        let builder = open_reader(path)?;
        let Some(index) = builder
            .parquet_schema()
            .columns()
            .iter()
            .position(|c| c.name() == col::ROW && c.path().parts().len() == 1)
        else {
            return Ok(false);
        };
        let mask = ProjectionMask::leaves(builder.parquet_schema(), [index]);
        let mut sorted = true;
        batches(path, builder.with_projection(mask), &mut |b| {
            let rows = ids64(b.column(0).as_ref()).map_err(|m| bad(path, None, "row", m))?;
            for r in rows {
                sorted &= r > last;
                last = r;
            }
            Ok(())
        })?;
        if !sorted {
            return Ok(true);
        }
    }
    Ok(false)
}

fn ids64(a: &dyn Array) -> std::result::Result<Vec<i64>, String> {
    use arrow_array::types::{Int32Type, Int64Type};
    match a.data_type() {
        _ if a.null_count() > 0 => Err("null".into()),
        arrow_schema::DataType::Int64 => Ok(a.as_primitive::<Int64Type>().values().to_vec()),
        arrow_schema::DataType::Int32 => Ok(a
            .as_primitive::<Int32Type>()
            .values()
            .iter()
            .map(|&v| v as i64)
            .collect()),
        t => Err(format!("expected int32 or int64, found {t}")),
    }
}

fn bad(path: &Path, row: Option<u64>, field: &str, message: String) -> Error {
    Error::Input {
        path: path.to_path_buf(),
        row,
        field: Some(field.into()),
        message,
    }
}

/// A tokens table (`id`, `tokens`) as a vector indexed by id; ids must be 0..n.
fn read_token_table(files: &[PathBuf]) -> Result<Vec<Vec<i32>>> {
    let mut by_id: Vec<(i64, Vec<i32>)> = Vec::new();
    for path in files {
        batches(path, open_reader(path)?, &mut |b| {
            let col = |name: &str| {
                b.column_by_name(name)
                    .cloned()
                    .ok_or_else(|| bad(path, None, name, "no such column".into()))
            };
            let (id, tokens) = (col(col::ID)?, col(col::TOKENS)?);
            let id = ids64(id.as_ref()).map_err(|m| bad(path, None, "id", m))?;
            for (i, id) in id.into_iter().enumerate() {
                let t = list_at(tokens.as_ref(), i)
                    .ok_or_else(|| bad(path, Some(i as u64), "tokens", "null".into()))?;
                let t = ids(t.as_ref()).map_err(|m| bad(path, Some(i as u64), "tokens", m))?;
                by_id.push((id, t));
            }
            Ok(())
        })?;
    }
    by_id.sort_by_key(|(id, _)| *id);
    if by_id.iter().enumerate().any(|(i, (id, _))| *id != i as i64) {
        return Err(bad(
            &files[0],
            None,
            "id",
            "ids are not 0..n without gaps".into(),
        ));
    }
    Ok(by_id.into_iter().map(|(_, t)| t).collect())
}

/// Every group row of `files` in file order, to `f`.
fn read_rows(
    files: &[PathBuf],
    tables: Option<&Tables>,
    f: &mut dyn FnMut(Row) -> Result<()>,
) -> Result<()> {
    let mut index = 0u64;
    for (file_index, path) in files.iter().enumerate() {
        batches(path, open_reader(path)?, &mut |b| {
            let cols = Columns::of(&b, path)?;
            for i in 0..b.num_rows() {
                let at = Cell {
                    path,
                    row: index,
                    i,
                };
                f(cols.row(&at, tables, file_index)?)?;
                index += 1;
            }
            Ok(())
        })?;
    }
    Ok(())
}

/// Where a value is: the file, the row's index across the files, its index in the batch.
struct Cell<'a> {
    path: &'a Path,
    row: u64,
    i: usize,
}

impl Cell<'_> {
    fn bad(&self, field: &str, message: impl Into<String>) -> Error {
        bad(self.path, Some(self.row), field, message.into())
    }
}

/// The columns of one record batch of groups.
struct Columns {
    row: Option<ArrayRef>,
    query: ArrayRef,
    pos: ArrayRef,
    neg: ArrayRef,
    pos_scores: Option<ArrayRef>,
    neg_scores: Option<ArrayRef>,
    prompt: Option<ArrayRef>,
    source: Option<ArrayRef>,
}

impl Columns {
    fn of(b: &RecordBatch, path: &Path) -> Result<Columns> {
        let col = |name: &str| b.column_by_name(name).cloned();
        let need = |name: &str| {
            col(name).ok_or_else(|| {
                bad(
                    path,
                    None,
                    name,
                    "no such column (need query, pos, neg)".into(),
                )
            })
        };
        Ok(Columns {
            row: col(col::ROW),
            query: need(col::QUERY)?,
            pos: need(col::POS)?,
            neg: need(col::NEG)?,
            pos_scores: col(col::POS_SCORES),
            neg_scores: col(col::NEG_SCORES),
            prompt: col(col::PROMPT),
            source: col(col::SOURCE),
        })
    }

    fn row(&self, at: &Cell<'_>, tables: Option<&Tables>, file_index: usize) -> Result<Row> {
        let i = at.i;
        let list = |a: &ArrayRef, name: &str| {
            list_at(a.as_ref(), i).ok_or_else(|| at.bad(name, "null or not a list"))
        };
        let query = ids(list(&self.query, "query")?.as_ref()).map_err(|m| at.bad("query", m))?;
        let passages = |a: &ArrayRef, name: &str| -> Result<Vec<Vec<i32>>> {
            let outer = list(a, name)?;
            match tables {
                None => (0..outer.len())
                    .map(|j| {
                        let field = format!("{name}[{j}]");
                        let inner = list_at(outer.as_ref(), j)
                            .ok_or_else(|| at.bad(&field, "not a list of ids"))?;
                        ids(inner.as_ref()).map_err(|m| at.bad(&field, m))
                    })
                    .collect(),
                Some(t) => ids(outer.as_ref())
                    .map_err(|m| at.bad(name, m))?
                    .into_iter()
                    .map(|id| {
                        usize::try_from(id)
                            .ok()
                            .and_then(|id| t.passages.get(id).cloned())
                            .ok_or_else(|| {
                                at.bad(name, format!("passage id {id} not in passages/"))
                            })
                    })
                    .collect(),
            }
        };
        let score = |a: &Option<ArrayRef>, name: &str| -> Result<Option<Vec<f32>>> {
            match a.as_ref().and_then(|c| list_at(c.as_ref(), i)) {
                Some(s) => scores(s.as_ref())
                    .map(Some)
                    .map_err(|(m, _)| at.bad(name, m)),
                None => Ok(None),
            }
        };
        Ok(Row {
            origin: (file_index, at.row),
            row: match &self.row {
                Some(r) => Some(ids64(&r.slice(i, 1)).map_err(|m| at.bad("row", m))?[0]),
                None => None,
            },
            query,
            pos: passages(&self.pos, "pos")?,
            neg: passages(&self.neg, "neg")?,
            pos_scores: score(&self.pos_scores, "pos_scores")?,
            neg_scores: score(&self.neg_scores, "neg_scores")?,
            prompt: self.prompt_of(at, tables)?,
            source: self.source_of(at, file_index as u32)?,
        })
    }

    fn prompt_of(&self, at: &Cell<'_>, tables: Option<&Tables>) -> Result<Option<Vec<i32>>> {
        let Some(p) = &self.prompt else {
            return Ok(None);
        };
        if p.is_null(at.i) {
            return Ok(None);
        }
        match tables {
            None => {
                let l = list_at(p.as_ref(), at.i).ok_or_else(|| at.bad("prompt", "not a list"))?;
                ids(l.as_ref()).map(Some).map_err(|m| at.bad("prompt", m))
            }
            Some(t) => {
                let id = ids(&p.slice(at.i, 1)).map_err(|m| at.bad("prompt", m))?[0];
                match usize::try_from(id) {
                    // 0 and 1 are the default prompts: the mode's default.
                    Ok(0 | 1) => Ok(None),
                    Ok(id) if id < t.prompts.len() => Ok(Some(t.prompts[id].clone())),
                    _ => Err(at.bad("prompt", format!("prompt id {id} not in prompts/"))),
                }
            }
        }
    }

    fn source_of(&self, at: &Cell<'_>, file_index: u32) -> Result<u32> {
        match &self.source {
            Some(s) if !s.is_null(at.i) => {
                let v = ids(&s.slice(at.i, 1)).map_err(|m| at.bad("source", m))?[0];
                u32::try_from(v).map_err(|_| at.bad("source", format!("negative: {v}")))
            }
            _ => Ok(file_index),
        }
    }
}

/// Checks and writes rows; counts rows per source.
struct Sink<'a> {
    files: &'a [PathBuf],
    writer: &'a mut DatasetWriter,
    vocab: i64,
    /// (rows, rows with no negatives) per source id.
    per_source: Vec<(u64, u64)>,
}

impl Sink<'_> {
    fn write(&mut self, r: Row) -> Result<()> {
        let at = |field: &str, message: String| Error::Input {
            path: self.files[r.origin.0].clone(),
            row: Some(r.origin.1),
            field: Some(field.into()),
            message,
        };
        let lists = [("query", std::slice::from_ref(&r.query))]
            .into_iter()
            .chain([("pos", &r.pos[..]), ("neg", &r.neg[..])])
            .chain(
                r.prompt
                    .as_ref()
                    .map(|p| ("prompt", std::slice::from_ref(p))),
            );
        for (field, lists) in lists {
            if let Some(t) = lists
                .iter()
                .flatten()
                .find(|&&t| !(0..self.vocab).contains(&(t as i64)))
            {
                return Err(at(
                    field,
                    format!("token id {t} is outside the vocabulary of {}", self.vocab),
                ));
            }
        }
        if r.pos.is_empty() {
            return Err(at("pos", "empty: a group needs a positive".into()));
        }
        if self.per_source.len() > r.source as usize + 1 {
            return Err(at(
                "source",
                format!(
                    "{} after {}: rows must be grouped by source in ascending order",
                    r.source,
                    self.per_source.len() - 1
                ),
            ));
        }
        let mut intern = |ps: &[Vec<i32>]| -> Result<Vec<i32>> {
            ps.iter()
                .map(|p| self.writer.intern_passage(p).map(|id| id as i32))
                .collect()
        };
        let (pos, neg) = (intern(&r.pos)?, intern(&r.neg)?);
        let prompt = r
            .prompt
            .as_deref()
            .map(|p| self.writer.intern_prompt(p))
            .transpose()?;
        self.writer.add_group(&GroupRecord {
            query: &r.query,
            pos: &pos,
            neg: &neg,
            pos_scores: r.pos_scores.as_deref(),
            neg_scores: r.neg_scores.as_deref(),
            prompt,
            source: r.source,
        })?;
        if self.per_source.len() <= r.source as usize {
            self.per_source.resize(r.source as usize + 1, (0, 0));
        }
        let s = &mut self.per_source[r.source as usize];
        s.0 += 1;
        s.1 += u64::from(neg.is_empty());
        Ok(())
    }
}

/// Source statistics: carried ones where the metadata had them (counts of accepted rows
/// recomputed), else one per source id named after its file.
fn source_stats(
    per_source: &[(u64, u64)],
    known: Vec<SourceStats>,
    files: &[PathBuf],
) -> Vec<SourceStats> {
    per_source
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
            s.rows_read = s.rows_read.max(n + s.rows_rejected);
            s
        })
        .collect()
}
