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
//!   and `prompt: int` (a prompt id; 0 and 1 are the default prompts, and rows 0 and 1 of
//!   `prompts/`, when present, must hold them).
//!
//! `list` or `large_list`, int32 or int64 (ids must fit int32), any child field name: what
//! Spark, Polars and pyarrow write. Scores follow [`crate::parquet_read`]'s one rule; a score
//! list must be as long as its passage list.
//!
//! **Nothing carried is trusted that can be checked.** An import either refuses its input (an
//! `Error::Input` naming the file, and the row and field when one is to blame; an
//! `Error::Argument` naming `tokenizer` when the tokenizer given does not match) or writes
//! exactly what the input describes.
//!
//! **Metadata** (`rankfeed.manifest`, written by `export` into every file: format version,
//! tokenizer facts, text settings, the two default prompts, sources):
//! - every file read (all group files; `passages/` and `prompts/` too in the tables layout)
//!   must carry the same metadata, or none of them any: files of different exports, or one
//!   with metadata beside one without, are refused naming both files and the first field that
//!   differs;
//! - `format_version` must be one this build reads ([`format::SUPPORTED_VERSIONS`]);
//! - the tokenizer facts must pass [`TokenizerFacts::check`], and `text.sep_ids` and the
//!   default prompts must lie within the vocabulary; `default_prompts` holds exactly two;
//! - with `--tokenizer`, the facts read from that tokenizer.json are the ones used, and the
//!   carried ones must equal them field by field (all but `notes`, which only say where a
//!   fact was read): the error names the field. `text.sep_ids` must be the tokenizer's ids of
//!   `text.sep_token`, and the default prompts its ids of the default prompt texts, as
//!   `convert` makes them. A missing `text` or `default_prompts` is rebuilt from the tokenizer
//!   (as for files without metadata: the default text settings);
//! - without `--tokenizer`, only the checks above that need no tokenizer run: a fact set that
//!   is forged but self-consistent (a template or pad id replaced by another id of the
//!   vocabulary, a larger `vocab_size`, default prompts of other in-vocabulary ids) cannot be
//!   told from the real one, and [`ImportReport::warnings`] says so. A missing `text` or
//!   `default_prompts` is refused (never defaulted: the prompt ids would shift);
//! - files without metadata (Spark and Polars drop it; ids made elsewhere have none) need
//!   `--tokenizer`; with neither, import refuses. Text settings are then the defaults.
//!
//! **Order**: a `row` column must be in every group file or in none. Its values must be
//! non-null, non-negative and unique (gaps are fine: a subset of an export's files); rows are
//! written in `row` order (a Spark `repartition` shuffles them; restoring that order holds the
//! whole dataset in memory once). Without one, rows are written in file order.
//!
//! **Sources**: a `source` column, too, must be in every group file or in none (without one, a
//! row's source is its file). With a sources list in the metadata, a source value must be an
//! index into it, and every listed source is written (with no rows if none was imported);
//! without one, sources are numbered densely in order of first appearance (a value is never
//! used as a size). Rows must come grouped by source, in ascending order. Per-source counts
//! describe the import: `rows_read` = `rows_accepted` = the rows imported for the source,
//! `rows_rejected` 0 (an import never skips a row: a bad row fails it), `rows_empty_neg`
//! recounted; `rejected_by_reason` and `blank_lines` are cleared (they were the conversion's,
//! whose `rejects.jsonl` does not travel with the Parquet), while `path`, `bytes`,
//! `unknown_fields` and `batch_size` are kept from the list.
//!
//! Every token id is checked against the vocabulary.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, RecordBatch};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;
use serde_json::Value;

use crate::discover::parquet_files;
use crate::error::{Error, Result};
use crate::format::{self, col, ShardRange, SourceStats, TextSettings, TokenizerFacts};
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
    /// What the import could not check (tokenizer facts taken from the metadata without a
    /// tokenizer to check them against).
    pub warnings: Vec<String>,
}

/// What `export` stores in the Parquet metadata (see [`crate::export`]).
#[derive(serde::Deserialize, Default)]
struct Carried {
    format_version: Option<u32>,
    tokenizer: Option<TokenizerFacts>,
    text: Option<TextSettings>,
    sources: Option<Vec<SourceStats>>,
    default_prompts: Option<Vec<Vec<i32>>>,
    /// The shards of a sharded conversion the exported dataset held.
    shards: Option<ShardRange>,
}

/// Everything the manifest needs besides what the writer counts.
struct Meta {
    facts: TokenizerFacts,
    text: TextSettings,
    default_prompts: Vec<Vec<i32>>,
    /// The carried sources list; empty when none was carried.
    sources: Vec<SourceStats>,
    /// The carried shard range (kept, so the imported shard still merges as one).
    shards: Option<ShardRange>,
    warnings: Vec<String>,
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

    /// Every file of the input: each carries the metadata.
    fn all_files(&self) -> Vec<&PathBuf> {
        match self {
            Layout::Flat(f) => f.iter().collect(),
            Layout::Tables {
                groups,
                passages,
                prompts,
            } => groups.iter().chain(passages).chain(prompts).collect(),
        }
    }
}

/// One group as read, with passages and prompt as token ids.
struct Row {
    /// Index of its file, and its row in that file (for errors).
    origin: (usize, u64),
    row: Option<i64>,
    query: Vec<i32>,
    pos: Vec<Vec<i32>>,
    neg: Vec<Vec<i32>>,
    pos_scores: Option<Vec<f32>>,
    neg_scores: Option<Vec<f32>>,
    prompt: Option<Vec<i32>>,
    /// The `source` value, or the file's index without a `source` column.
    source: i64,
}

/// Passages and prompts of the tables layout, by id.
struct Tables {
    passages: Vec<Vec<i32>>,
    prompts: Vec<Vec<i32>>,
}

/// Import Parquet `inputs` (flat files, or a tables directory) into a dataset at `out`.
/// `tokenizer`, the tokenizer.json the ids were made with, supplies the tokenizer facts when
/// the files carry no rankfeed metadata, and checks them when they do (see the module docs).
pub fn import(
    inputs: &[PathBuf],
    out: &Path,
    tokenizer: Option<&TextTokenizer>,
    writer_options: WriterOptions,
) -> Result<ImportReport> {
    let start = Instant::now();
    let layout = Layout::discover(inputs)?;
    let files = layout.group_files().to_vec();
    let (first, carried) = read_agreed_metadata(&layout.all_files())?;
    let meta = resolve_meta(carried, tokenizer, first)?;
    let order = row_order(&files)?;
    let tables = match &layout {
        Layout::Flat(_) => None,
        Layout::Tables {
            passages, prompts, ..
        } => {
            let tables = Tables {
                passages: read_token_table(passages)?,
                prompts: read_token_table(prompts)?,
            };
            check_default_prompt_rows(&tables.prompts, &meta.default_prompts, prompts)?;
            Some(tables)
        }
    };
    let mut writer = DatasetWriter::create(out, writer_options)?;
    for p in &meta.default_prompts {
        writer.add_prompt(p)?;
    }
    let mut sink = Sink {
        files: &files,
        writer: &mut writer,
        facts: &meta.facts,
        sources: if meta.sources.is_empty() {
            Sources::Dense(HashMap::new(), Vec::new())
        } else {
            Sources::Carried(meta.sources.len())
        },
        has_source_column: order.has_source,
        per_source: vec![(0, 0); meta.sources.len()],
        last_source: (0, 0),
    };
    if order.sorted {
        read_rows(&files, tables.as_ref(), &mut |r| sink.write(r))?;
    } else {
        let mut rows = Vec::new();
        read_rows(&files, tables.as_ref(), &mut |r| {
            rows.push(r);
            Ok(())
        })?;
        rows.sort_by_key(|r| r.row);
        if let Some(w) = rows.windows(2).find(|w| w[0].row == w[1].row) {
            let (a, b) = (&w[0], &w[1]);
            return Err(bad(
                &files[b.origin.0],
                Some(b.origin.1),
                col::ROW,
                format!(
                    "{} repeats {} row {}: every row number must be unique",
                    b.row.unwrap_or_default(),
                    files[a.origin.0].display(),
                    a.origin.1
                ),
            ));
        }
        rows.into_iter().try_for_each(|r| sink.write(r))?;
    }
    let Sink {
        per_source,
        sources,
        ..
    } = sink;
    let rows: u64 = per_source.iter().map(|s| s.0).sum();
    if rows == 0 {
        return Err(Error::argument("inputs", "no rows in the Parquet inputs"));
    }
    let mut warnings = meta.warnings;
    let exported: u64 = meta.sources.iter().map(|s| s.rows_accepted).sum();
    if !meta.sources.is_empty() && rows != exported {
        warnings.push(format!(
            "imported {rows} rows; the exported dataset held {exported}: part files are \
             missing, or only some were given (the dataset written holds what was read)"
        ));
    }
    let cleaned = writer.cleaned().to_vec();
    let manifest = writer.finish(ManifestInfo {
        sources: source_stats(&per_source, meta.sources, sources),
        tokenizer: Some(meta.facts),
        text: meta.text,
        shards: meta.shards,
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
        warnings,
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

/// The `rankfeed.manifest` metadata of `path` as text, if any.
fn read_carried_json(path: &Path) -> Result<Option<String>> {
    let builder = open_reader(path)?;
    let kv = builder.metadata().file_metadata().key_value_metadata();
    Ok(kv
        .and_then(|kv| kv.iter().find(|k| k.key == format::PARQUET_MANIFEST_KEY))
        .and_then(|k| k.value.clone()))
}

fn parse_json(path: &Path, json: &str) -> Result<Value> {
    serde_json::from_str(json).map_err(|e| meta_error(path, "", e.to_string()))
}

/// An error in the metadata of `path`, at `field` (a path into the JSON; empty: the whole).
fn meta_error(path: &Path, field: &str, message: impl Into<String>) -> Error {
    let key = format::PARQUET_MANIFEST_KEY;
    Error::Input {
        path: path.to_path_buf(),
        row: None,
        field: Some(if field.is_empty() {
            key.to_string()
        } else {
            format!("{key}.{field}")
        }),
        message: message.into(),
    }
}

/// The metadata that every file carries, parsed, with the first file; `None` when no file
/// carries any. Files that disagree, or some with and some without, are an error naming both.
fn read_agreed_metadata<'a>(files: &[&'a PathBuf]) -> Result<(&'a Path, Option<Carried>)> {
    let mut first: Option<(&Path, Option<String>)> = None;
    let mut parsed_first: Option<Value> = None;
    for &path in files {
        let json = read_carried_json(path)?;
        let Some((first_path, first_json)) = &first else {
            first = Some((path, json));
            continue;
        };
        match (first_json, &json) {
            (None, None) => {}
            (Some(a), Some(b)) if a == b => {}
            (Some(a), Some(b)) => {
                let va = match &parsed_first {
                    Some(v) => v,
                    None => parsed_first.insert(parse_json(first_path, a)?),
                };
                let vb = parse_json(path, b)?;
                if *va == vb {
                    // The same metadata, written differently.
                    continue;
                }
                // The sections by consequence (the facts first), then anything else.
                let field = ["format_version", "tokenizer", "text", "default_prompts"]
                    .into_iter()
                    .find_map(|k| json_difference(&va[k], &vb[k]).map(|d| join_path(k, &d)))
                    .or_else(|| json_difference(va, &vb))
                    .unwrap_or_default();
                let (x, y) = (at_path(va, &field), at_path(&vb, &field));
                return Err(meta_error(
                    path,
                    &field,
                    format!(
                        "{} here, {} in {}: every file must carry the same metadata (these \
                         come from different exports, or one was edited)",
                        short(y),
                        short(x),
                        first_path.display()
                    ),
                ));
            }
            (with, _) => {
                let (without, with_path) = if with.is_some() {
                    (path.as_path(), *first_path)
                } else {
                    (*first_path, path.as_path())
                };
                return Err(meta_error(
                    without,
                    "",
                    format!(
                        "absent here but carried by {}: files with and without rankfeed \
                         metadata are not imported together (the one without cannot be \
                         checked against the others; import files of one export, or strip the \
                         metadata from all and give the tokenizer)",
                        with_path.display()
                    ),
                ));
            }
        }
    }
    let Some((path, json)) = first else {
        return Err(Error::argument("inputs", "no Parquet files"));
    };
    let carried = json
        .map(|j| {
            serde_json::from_str::<Carried>(&j).map_err(|e| meta_error(path, "", e.to_string()))
        })
        .transpose()?;
    Ok((path, carried))
}

/// The first place where two JSON values differ, as `a.b[2].c` (empty: the values
/// themselves); `None` when they are equal.
fn json_difference(a: &Value, b: &Value) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            x.keys()
                .chain(y.keys())
                .find_map(|k| match (x.get(k), y.get(k)) {
                    (Some(u), Some(v)) => json_difference(u, v).map(|d| join_path(k, &d)),
                    _ => Some(k.clone()),
                })
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            x.iter().zip(y).enumerate().find_map(|(i, (u, v))| {
                json_difference(u, v).map(|d| join_path(&format!("[{i}]"), &d))
            })
        }
        _ => (a != b).then(String::new),
    }
}

/// `head` followed by the path `rest` below it (`a` + `b.c` = `a.b.c`, `a` + `[1]` = `a[1]`).
fn join_path(head: &str, rest: &str) -> String {
    match rest.chars().next() {
        None => head.to_string(),
        Some('[') => format!("{head}{rest}"),
        Some(_) => format!("{head}.{rest}"),
    }
}

/// The value at a path made by [`json_difference`] (`Null` when absent).
fn at_path<'a>(v: &'a Value, path: &str) -> &'a Value {
    let mut v = v;
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (key, indices) = part.split_once('[').map_or((part, ""), |(k, i)| (k, i));
        if !key.is_empty() {
            v = v.get(key).unwrap_or(&Value::Null);
        }
        for i in indices.split('[').filter(|i| !i.is_empty()) {
            let i: usize = i.trim_end_matches(']').parse().unwrap_or(usize::MAX);
            v = v.get(i).unwrap_or(&Value::Null);
        }
    }
    v
}

/// A JSON value for a message: absent, or at most ~80 characters of it.
fn short(v: &Value) -> String {
    match v {
        Value::Null => "absent (or null)".into(),
        v => {
            let s = v.to_string();
            match s.char_indices().nth(80) {
                Some((i, _)) => format!("{}...", &s[..i]),
                None => s,
            }
        }
    }
}

/// Tokenizer facts, text settings, default prompts and sources from the metadata `carried`
/// (of file `path`, the first), checked against themselves and against `tokenizer`.
fn resolve_meta(
    carried: Option<Carried>,
    tokenizer: Option<&TextTokenizer>,
    path: &Path,
) -> Result<Meta> {
    let has_metadata = carried.is_some();
    let carried = carried.unwrap_or_default();
    if has_metadata {
        match carried.format_version {
            None => return Err(meta_error(path, "format_version", "absent")),
            Some(v) if !format::SUPPORTED_VERSIONS.contains(&v) => {
                return Err(Error::UnsupportedVersion {
                    path: path.to_path_buf(),
                    found: v,
                    supported: format::SUPPORTED_VERSIONS,
                })
            }
            Some(_) => {}
        }
    }
    if let Some(r) = carried.shards.filter(|r| !r.is_valid()) {
        return Err(meta_error(
            path,
            "shards",
            format!("{}..{} of {}: not a range of shards", r.start, r.end, r.of),
        ));
    }
    let mut warnings = Vec::new();
    let facts = match (carried.tokenizer, tokenizer) {
        (Some(facts), Some(t)) => {
            if let Some((field, ours, theirs)) = facts_difference(&facts, t.facts()) {
                return Err(Error::argument(
                    "tokenizer",
                    format!(
                        "{} was tokenized with other tokenizer facts than {}'s: `{field}` is \
                         {} in the metadata, {} in the tokenizer (the ids were made with \
                         another tokenizer, or the metadata was edited)",
                        path.display(),
                        t.path().display(),
                        short(&ours),
                        short(&theirs)
                    ),
                ));
            }
            t.facts().clone()
        }
        (Some(facts), None) => {
            warnings.push(format!(
                "{}: tokenizer facts taken from the Parquet metadata, checked only against \
                 themselves (a forged but consistent set cannot be told from the real one): \
                 give the tokenizer.json the ids were made with (CLI --tokenizer, Python \
                 tokenizer=) to check them",
                path.display()
            ));
            facts
        }
        (None, Some(t)) => t.facts().clone(),
        (None, None) => {
            let why = if has_metadata {
                "carries rankfeed metadata without tokenizer facts (a dataset written from \
                 ids)"
            } else {
                "carries no rankfeed metadata with tokenizer facts (Spark and Polars drop it; \
                 ids made elsewhere have none)"
            };
            return Err(Error::argument(
                "tokenizer",
                format!(
                    "{} {why}: give the tokenizer.json the ids were made with (CLI \
                     --tokenizer, Python tokenizer=)",
                    path.display()
                ),
            ));
        }
    };
    let given = |what: &str| {
        meta_error(
            path,
            what,
            "absent: give the tokenizer.json the ids were made with (CLI --tokenizer, Python \
             tokenizer=) to rebuild it",
        )
    };
    facts.check().map_err(|m| match tokenizer {
        Some(t) => Error::Tokenizer {
            path: t.path().to_path_buf(),
            message: format!("tokenizer facts: {m}"),
        },
        None => meta_error(path, "tokenizer", m),
    })?;
    let text = match (carried.text, tokenizer) {
        (Some(text), _) => text,
        (None, Some(t)) => TextSettings {
            sep_ids: t.encode(&TextSettings::default().sep_token)?,
            ..TextSettings::default()
        },
        (None, None) => return Err(given("text")),
    };
    let default_prompts = match (carried.default_prompts, tokenizer) {
        (Some(d), _) if d.len() != 2 => {
            return Err(meta_error(
                path,
                "default_prompts",
                format!(
                    "{} prompts: there are exactly two (the llm and the matryoshka default)",
                    d.len()
                ),
            ))
        }
        (Some(d), _) => d,
        (None, Some(t)) => {
            t.encode_batch(&[&text.default_prompt_llm, &text.default_prompt_matryoshka])?
        }
        (None, None) => return Err(given("default_prompts")),
    };
    facts
        .check_ids("text.sep_ids", &text.sep_ids)
        .map_err(|m| meta_error(path, "text.sep_ids", m))?;
    for (i, p) in default_prompts.iter().enumerate() {
        let field = format!("default_prompts[{i}]");
        facts
            .check_ids("token", p)
            .map_err(|m| meta_error(path, &field, m))?;
    }
    if let Some(t) = tokenizer {
        let made = |what: &str, ids: &[i32], text: &str| -> Result<()> {
            let want = t.encode(text)?;
            if ids == want {
                return Ok(());
            }
            Err(meta_error(
                path,
                what,
                format!(
                    "{ids:?} are not {}'s ids of {text:?}, {want:?} (the ids were made with \
                     another tokenizer, or the metadata was edited)",
                    t.path().display()
                ),
            ))
        };
        made("text.sep_ids", &text.sep_ids, &text.sep_token)?;
        made(
            "default_prompts[0]",
            &default_prompts[0],
            &text.default_prompt_llm,
        )?;
        made(
            "default_prompts[1]",
            &default_prompts[1],
            &text.default_prompt_matryoshka,
        )?;
    }
    Ok(Meta {
        facts,
        text,
        default_prompts,
        sources: carried.sources.unwrap_or_default(),
        shards: carried.shards,
        warnings,
    })
}

/// The first fact (all but `notes`) in which `a` and `b` differ, with both values.
fn facts_difference(a: &TokenizerFacts, b: &TokenizerFacts) -> Option<(String, Value, Value)> {
    let json = |f: &TokenizerFacts| {
        let mut v = serde_json::to_value(f).unwrap_or(Value::Null);
        if let Value::Object(o) = &mut v {
            o.remove("notes");
        }
        v
    };
    let (x, y) = (json(a), json(b));
    json_difference(&x, &y).map(|field| {
        let (u, v) = (at_path(&x, &field).clone(), at_path(&y, &field).clone());
        (field, u, v)
    })
}

/// Rows 0 and 1 of a tables layout's `prompts/`, when present, are the default prompts.
fn check_default_prompt_rows(
    prompts: &[Vec<i32>],
    defaults: &[Vec<i32>],
    files: &[PathBuf],
) -> Result<()> {
    for (id, (table, default)) in prompts.iter().zip(defaults).enumerate() {
        if table != default {
            return Err(bad(
                &files[0],
                None,
                col::TOKENS,
                format!(
                    "prompt id {id} holds {table:?}, but ids 0 and 1 are the default prompts, \
                     {default:?} (the metadata's, or the tokenizer's ids of the default texts)"
                ),
            ));
        }
    }
    Ok(())
}

/// What the first pass over the group files learned.
struct RowOrder {
    /// Rows are already in `row` order (or there is no `row` column).
    sorted: bool,
    /// The files have a `source` column.
    has_source: bool,
}

/// Whether every group file has a top-level column `name`; an error when only some do.
fn column_in_all(files: &[PathBuf], name: &str) -> Result<bool> {
    let mut seen: Option<(bool, &Path)> = None;
    for path in files {
        let builder = open_reader(path)?;
        let has = builder.schema().field_with_name(name).is_ok();
        match seen {
            None => seen = Some((has, path)),
            Some((h, other)) if h != has => {
                let (without, with) = if has {
                    (other, path.as_path())
                } else {
                    (path.as_path(), other)
                };
                return Err(bad(
                    without,
                    None,
                    name,
                    format!(
                        "no such column, but {} has one: it must be in every file or in none",
                        with.display()
                    ),
                ));
            }
            Some(_) => {}
        }
    }
    Ok(seen.is_some_and(|(h, _)| h))
}

/// Check the `row` and `source` columns' presence and the `row` values (non-null,
/// non-negative), and whether they are already increasing (a cheap first pass reading `row`
/// alone).
fn row_order(files: &[PathBuf]) -> Result<RowOrder> {
    let has_source = column_in_all(files, col::SOURCE)?;
    if !column_in_all(files, col::ROW)? {
        return Ok(RowOrder {
            sorted: true,
            has_source,
        });
    }
    let mut last = -1i64;
    let mut sorted = true;
    for path in files {
        let builder = open_reader(path)?;
        let Some(index) = builder
            .parquet_schema()
            .columns()
            .iter()
            .position(|c| c.name() == col::ROW && c.path().parts().len() == 1)
        else {
            return Err(bad(path, None, col::ROW, "not a column of integers".into()));
        };
        let mask = ProjectionMask::leaves(builder.parquet_schema(), [index]);
        let mut first_row = 0u64;
        batches(path, builder.with_projection(mask), &mut |b| {
            for r in ints(b.column(0).as_ref(), path, first_row, col::ROW)? {
                sorted &= r > last;
                last = r;
            }
            first_row += b.num_rows() as u64;
            Ok(())
        })?;
    }
    Ok(RowOrder { sorted, has_source })
}

/// A column of non-null, non-negative integers (int32 or int64); the error names the row (in
/// the file: the batch starts at `first_row`) and `field`.
fn ints(a: &dyn Array, path: &Path, first_row: u64, field: &str) -> Result<Vec<i64>> {
    use arrow_array::types::{Int32Type, Int64Type};
    if let Some(i) = (a.null_count() > 0)
        .then(|| (0..a.len()).find(|&i| a.is_null(i)))
        .flatten()
    {
        return Err(bad(path, Some(first_row + i as u64), field, "null".into()));
    }
    let values: Vec<i64> = match a.data_type() {
        arrow_schema::DataType::Int64 => a.as_primitive::<Int64Type>().values().to_vec(),
        arrow_schema::DataType::Int32 => a
            .as_primitive::<Int32Type>()
            .values()
            .iter()
            .map(|&v| v as i64)
            .collect(),
        t => {
            return Err(bad(
                path,
                None,
                field,
                format!("expected int32 or int64, found {t}"),
            ))
        }
    };
    if let Some(i) = values.iter().position(|&v| v < 0) {
        return Err(bad(
            path,
            Some(first_row + i as u64),
            field,
            format!("negative: {}", values[i]),
        ));
    }
    Ok(values)
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
        let mut first_row = 0u64;
        batches(path, open_reader(path)?, &mut |b| {
            let col = |name: &str| {
                b.column_by_name(name)
                    .cloned()
                    .ok_or_else(|| bad(path, None, name, "no such column".into()))
            };
            let (id, tokens) = (col(col::ID)?, col(col::TOKENS)?);
            let id = ints(id.as_ref(), path, first_row, col::ID)?;
            for (i, id) in id.into_iter().enumerate() {
                let row = Some(first_row + i as u64);
                let t = list_at(tokens.as_ref(), i)
                    .ok_or_else(|| bad(path, row, col::TOKENS, "null".into()))?;
                let t = ids(t.as_ref()).map_err(|m| bad(path, row, col::TOKENS, m))?;
                by_id.push((id, t));
            }
            first_row += b.num_rows() as u64;
            Ok(())
        })?;
    }
    by_id.sort_by_key(|(id, _)| *id);
    if by_id.iter().enumerate().any(|(i, (id, _))| *id != i as i64) {
        return Err(bad(
            &files[0],
            None,
            col::ID,
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
    for (file_index, path) in files.iter().enumerate() {
        let mut first_row = 0u64;
        batches(path, open_reader(path)?, &mut |b| {
            let cols = Columns::of(&b, path, first_row)?;
            for i in 0..b.num_rows() {
                let at = Cell {
                    path,
                    row: first_row + i as u64,
                    i,
                };
                f(cols.row(&at, tables, file_index)?)?;
            }
            first_row += b.num_rows() as u64;
            Ok(())
        })?;
    }
    Ok(())
}

/// Where a value is: the file, the row's index in the file, its index in the batch.
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
    row: Option<Vec<i64>>,
    query: ArrayRef,
    pos: ArrayRef,
    neg: ArrayRef,
    pos_scores: Option<ArrayRef>,
    neg_scores: Option<ArrayRef>,
    prompt: Option<ArrayRef>,
    source: Option<Vec<i64>>,
}

impl Columns {
    fn of(b: &RecordBatch, path: &Path, first_row: u64) -> Result<Columns> {
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
        let int_col = |name: &str| {
            col(name)
                .map(|c| ints(c.as_ref(), path, first_row, name))
                .transpose()
        };
        Ok(Columns {
            row: int_col(col::ROW)?,
            query: need(col::QUERY)?,
            pos: need(col::POS)?,
            neg: need(col::NEG)?,
            pos_scores: col(col::POS_SCORES),
            neg_scores: col(col::NEG_SCORES),
            prompt: col(col::PROMPT),
            source: int_col(col::SOURCE)?,
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
            row: self.row.as_ref().map(|r| r[i]),
            query,
            pos: passages(&self.pos, "pos")?,
            neg: passages(&self.neg, "neg")?,
            pos_scores: score(&self.pos_scores, "pos_scores")?,
            neg_scores: score(&self.neg_scores, "neg_scores")?,
            prompt: self.prompt_of(at, tables)?,
            source: self.source.as_ref().map_or(file_index as i64, |s| s[i]),
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
}

/// How source values become source ids.
enum Sources {
    /// The metadata lists this many sources: a value is an index into the list.
    Carried(usize),
    /// No list: ids in order of first appearance (value -> id), and each one's name.
    Dense(HashMap<i64, u32>, Vec<String>),
}

/// Checks and writes rows; counts rows per source.
struct Sink<'a> {
    files: &'a [PathBuf],
    writer: &'a mut DatasetWriter,
    facts: &'a TokenizerFacts,
    sources: Sources,
    has_source_column: bool,
    /// (rows, rows with no negatives) per source id.
    per_source: Vec<(u64, u64)>,
    /// The source id and value of the last row written.
    last_source: (u32, i64),
}

impl Sink<'_> {
    fn write(&mut self, r: Row) -> Result<()> {
        let path = &self.files[r.origin.0];
        let at = |field: &str, message: String| bad(path, Some(r.origin.1), field, message);
        let vocab = self.facts.vocab_size as i64;
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
                .find(|&&t| !(0..vocab).contains(&(t as i64)))
            {
                return Err(at(
                    field,
                    format!("token id {t} is outside the vocabulary of {vocab}"),
                ));
            }
        }
        if r.pos.is_empty() {
            return Err(at("pos", "empty: a group needs a positive".into()));
        }
        for (field, scores, passages) in [
            ("pos_scores", &r.pos_scores, &r.pos),
            ("neg_scores", &r.neg_scores, &r.neg),
        ] {
            if let Some(s) = scores.as_ref().filter(|s| s.len() != passages.len()) {
                return Err(at(
                    field,
                    format!(
                        "{} scores for {} passages ({})",
                        s.len(),
                        passages.len(),
                        crate::RejectReason::ScoreLengthMismatch
                    ),
                ));
            }
        }
        let source = self.source_id(&r, path)?;
        if source < self.last_source.0 {
            return Err(at(
                "source",
                format!(
                    "source {} after source {}: rows must be grouped by source in ascending \
                     order",
                    r.source, self.last_source.1
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
            source,
        })?;
        self.last_source = (source, r.source);
        let s = &mut self.per_source[source as usize];
        s.0 += 1;
        s.1 += u64::from(neg.is_empty());
        Ok(())
    }

    /// The source id of `r` (see the module docs); `per_source` has an entry for it.
    fn source_id(&mut self, r: &Row, path: &Path) -> Result<u32> {
        let what = if self.has_source_column {
            format!("{}", r.source)
        } else {
            format!("file {} (no source column)", r.origin.0)
        };
        match &mut self.sources {
            Sources::Carried(n) => usize::try_from(r.source)
                .ok()
                .filter(|s| s < n)
                .map(|s| s as u32)
                .ok_or_else(|| {
                    bad(
                        path,
                        Some(r.origin.1),
                        col::SOURCE,
                        format!("{what} is not one of the {n} sources the metadata lists (0..{n})"),
                    )
                }),
            Sources::Dense(ids, names) => {
                if let Some(&id) = ids.get(&r.source) {
                    return Ok(id);
                }
                let id = u32::try_from(names.len())
                    .ok()
                    .filter(|&id| id <= i32::MAX as u32)
                    .ok_or_else(|| Error::argument("inputs", "more than 2^31 sources"))?;
                ids.insert(r.source, id);
                names.push(if self.has_source_column {
                    format!("{} (source {})", path.display(), r.source)
                } else {
                    path.display().to_string()
                });
                self.per_source.push((0, 0));
                Ok(id)
            }
        }
    }
}

/// Source statistics (see the module docs): the carried list with its counts replaced by
/// the import's, or one per source in order of first appearance.
fn source_stats(
    per_source: &[(u64, u64)],
    carried: Vec<SourceStats>,
    sources: Sources,
) -> Vec<SourceStats> {
    let base: Vec<SourceStats> = match sources {
        Sources::Carried(_) => carried,
        Sources::Dense(_, names) => names
            .into_iter()
            .map(|path| SourceStats {
                path,
                ..SourceStats::default()
            })
            .collect(),
    };
    base.into_iter()
        .zip(per_source)
        .enumerate()
        .map(|(i, (s, &(n, empty)))| SourceStats {
            id: i as u32,
            rows_read: n,
            rows_accepted: n,
            rows_rejected: 0,
            rejected_by_reason: Default::default(),
            rows_empty_neg: empty,
            blank_lines: 0,
            ..s
        })
        .collect()
}
