//! Writing a dataset directory from token ids: streaming, bounded memory, atomic publish.
//!
//! Files are written into a staging directory beside the output and published by
//! [`DatasetWriter::finish`] with [`crate::publish`]: the output path names the old dataset or
//! the complete new one at every instant, never a partial one and never nothing. Dropping an
//! unfinished writer removes the staging directory; one left by a killed process is removed by
//! the next run that writes to the same output.
//! Memory: one record batch per file is buffered (`rows_per_batch` rows), plus one `u32` per
//! passage for statistics and 24 bytes per distinct passage for interning.
//!
//! **Interning** is the writer's: [`DatasetWriter::intern_passage`] and
//! [`DatasetWriter::intern_prompt`] store each distinct token sequence once (keyed by its
//! xxh3-128) and return its id, in first-appearance order. `convert`, `import` and `merge` all
//! go through them, so a dataset's passage ids depend only on the sequence of token lists
//! written: converting in shards and merging gives the same files as converting at once.

use std::collections::BTreeMap;
use std::fs::File;
use std::hash::Hasher;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::{ArrayRef, Float32Array, Int32Array, LargeListArray, RecordBatch};
use arrow_buffer::{NullBufferBuilder, OffsetBuffer, ScalarBuffer};
use arrow_ipc::writer::{FileWriter, IpcWriteOptions};
use arrow_ipc::MetadataVersion;
use arrow_schema::{DataType, Field, SchemaRef};
use xxhash_rust::xxh3::Xxh3;

use crate::error::{Error, Result, RowError};
use crate::format::{self, Counts, FileEntry, Manifest, SourceStats, TextSettings, TokenizerFacts};
use crate::publish::Staging;

/// A `Write` that hashes and counts what passes through.
struct HashingWriter<W: Write> {
    inner: W,
    hasher: Xxh3,
    bytes: u64,
}

impl<W: Write> HashingWriter<W> {
    fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Xxh3::new(),
            bytes: 0,
        }
    }

    fn entry(&self) -> FileEntry {
        FileEntry {
            bytes: self.bytes,
            xxh3_64: format!("{:016x}", self.hasher.digest()),
        }
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

type IpcOut = FileWriter<HashingWriter<BufWriter<File>>>;

fn ipc_writer(path: &Path, schema: &SchemaRef) -> Result<IpcOut> {
    let file = File::create(path).map_err(|e| Error::io(path, e))?;
    let out = HashingWriter::new(BufWriter::with_capacity(1 << 20, file));
    let options = IpcWriteOptions::try_new(format::ALIGNMENT, false, MetadataVersion::V5)?;
    Ok(FileWriter::try_new_with_options(out, schema, options)?)
}

fn finish_ipc(mut w: IpcOut, path: &Path) -> Result<FileEntry> {
    w.finish()?;
    let mut out = w.into_inner()?;
    out.flush().map_err(|e| Error::io(path, e))?;
    let entry = out.entry();
    // fsync happens for the whole directory when it is published.
    out.inner
        .into_inner()
        .map_err(|e| Error::io(path, e.into_error()))?;
    Ok(entry)
}

/// A list column being filled: 64-bit offsets, values, optional validity.
struct ListBuf<T> {
    offsets: Vec<i64>,
    values: Vec<T>,
    nulls: NullBufferBuilder,
}

impl<T: Copy> ListBuf<T> {
    fn new() -> Self {
        ListBuf {
            offsets: vec![0],
            values: Vec::new(),
            nulls: NullBufferBuilder::new(0),
        }
    }

    fn push(&mut self, v: Option<&[T]>) {
        match v {
            Some(v) => {
                self.values.extend_from_slice(v);
                self.nulls.append_non_null();
            }
            None => self.nulls.append_null(),
        }
        self.offsets.push(self.values.len() as i64);
    }

    /// Build the array and reset.
    fn take(&mut self, item: DataType, make: impl FnOnce(Vec<T>) -> ArrayRef) -> Result<ArrayRef> {
        let offsets = std::mem::replace(&mut self.offsets, vec![0]);
        let values = std::mem::take(&mut self.values);
        let nulls = self.nulls.finish();
        let field = Arc::new(Field::new("item", item, false));
        let array = LargeListArray::try_new(
            field,
            OffsetBuffer::new(ScalarBuffer::from(offsets)),
            make(values),
            nulls,
        )?;
        Ok(Arc::new(array))
    }
}

fn int32s(v: Vec<i32>) -> ArrayRef {
    Arc::new(Int32Array::from(v))
}

fn float32s(v: Vec<f32>) -> ArrayRef {
    Arc::new(Float32Array::from(v))
}

/// A tokens file (passages.arrow, prompts.arrow) being written.
struct TokensFile {
    path: PathBuf,
    schema: SchemaRef,
    out: IpcOut,
    buf: ListBuf<i32>,
    pending: usize,
    rows: u64,
}

impl TokensFile {
    fn create(path: PathBuf) -> Result<Self> {
        let schema = format::tokens_schema();
        let out = ipc_writer(&path, &schema)?;
        Ok(TokensFile {
            path,
            schema,
            out,
            buf: ListBuf::new(),
            pending: 0,
            rows: 0,
        })
    }

    fn push(&mut self, tokens: &[i32], rows_per_batch: usize) -> Result<u64> {
        self.buf.push(Some(tokens));
        self.pending += 1;
        let id = self.rows;
        self.rows += 1;
        if self.pending == rows_per_batch {
            self.flush()?;
        }
        Ok(id)
    }

    fn flush(&mut self) -> Result<()> {
        if self.pending == 0 {
            return Ok(());
        }
        let col = self.buf.take(DataType::Int32, int32s)?;
        self.out
            .write(&RecordBatch::try_new(self.schema.clone(), vec![col])?)?;
        self.pending = 0;
        Ok(())
    }

    fn finish(mut self) -> Result<FileEntry> {
        self.flush()?;
        finish_ipc(self.out, &self.path)
    }
}

/// One group as given to the writer: the same type the reader hands out.
pub type GroupRecord<'a> = crate::format::Group<'a>;

/// groups.arrow being written.
struct GroupsFile {
    path: PathBuf,
    schema: SchemaRef,
    out: IpcOut,
    query: ListBuf<i32>,
    pos: ListBuf<i32>,
    neg: ListBuf<i32>,
    pos_scores: ListBuf<f32>,
    neg_scores: ListBuf<f32>,
    prompt: Vec<Option<i32>>,
    source: Vec<i32>,
}

impl GroupsFile {
    fn create(path: PathBuf) -> Result<Self> {
        let schema = format::groups_schema();
        let out = ipc_writer(&path, &schema)?;
        Ok(GroupsFile {
            path,
            schema,
            out,
            query: ListBuf::new(),
            pos: ListBuf::new(),
            neg: ListBuf::new(),
            pos_scores: ListBuf::new(),
            neg_scores: ListBuf::new(),
            prompt: Vec::new(),
            source: Vec::new(),
        })
    }

    fn push(&mut self, g: &GroupRecord<'_>) {
        self.query.push(Some(g.query));
        self.pos.push(Some(g.pos));
        self.neg.push(Some(g.neg));
        self.pos_scores.push(g.pos_scores);
        self.neg_scores.push(g.neg_scores);
        self.prompt.push(g.prompt.map(|p| p as i32));
        self.source.push(g.source as i32);
    }

    fn flush(&mut self) -> Result<()> {
        if self.source.is_empty() {
            return Ok(());
        }
        let columns = vec![
            self.query.take(DataType::Int32, int32s)?,
            self.pos.take(DataType::Int32, int32s)?,
            self.neg.take(DataType::Int32, int32s)?,
            self.pos_scores.take(DataType::Float32, float32s)?,
            self.neg_scores.take(DataType::Float32, float32s)?,
            Arc::new(Int32Array::from(std::mem::take(&mut self.prompt))) as ArrayRef,
            Arc::new(Int32Array::from(std::mem::take(&mut self.source))) as ArrayRef,
        ];
        self.out
            .write(&RecordBatch::try_new(self.schema.clone(), columns)?)?;
        Ok(())
    }

    fn finish(mut self) -> Result<FileEntry> {
        self.flush()?;
        finish_ipc(self.out, &self.path)
    }
}

/// Options of a [`DatasetWriter`].
#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// Rows per record batch (default [`format::DEFAULT_ROWS_PER_BATCH`]).
    pub rows_per_batch: usize,
    /// Replace an existing dataset at the output path.
    pub overwrite: bool,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            rows_per_batch: format::DEFAULT_ROWS_PER_BATCH,
            overwrite: false,
        }
    }
}

/// What the manifest needs besides what the writer counted itself.
#[derive(Debug, Clone, Default)]
pub struct ManifestInfo {
    /// Tokenizer facts (None for pre-tokenized input).
    pub tokenizer: Option<TokenizerFacts>,
    /// Formatting settings.
    pub text: TextSettings,
    /// Per-source statistics.
    pub sources: Vec<SourceStats>,
    /// The shards of a sharded conversion this dataset holds (None: a whole conversion).
    pub shards: Option<format::ShardRange>,
}

struct OpenFiles {
    passages: TokensFile,
    prompts: TokensFile,
    groups: GroupsFile,
}

/// Writes a dataset directory; see the module docs.
pub struct DatasetWriter {
    staging: Staging,
    options: WriterOptions,
    /// The open files; `None` only inside `finish`, which consumes the writer.
    files: Option<OpenFiles>,
    rejects: Option<HashingWriter<BufWriter<File>>>,
    passage_lens: Vec<u32>,
    passage_ids: KeyIds,
    prompt_ids: KeyIds,
    counts: Counts,
    provenance: Option<serde_json::Value>,
}

/// Values of 128-bit keys that are already hashes (xxh3-128 of a passage's text or tokens), for
/// conversion's dedup tables, which hold an entry per unique passage: the keys and values live
/// in dense arrays in insertion order and the hash table holds only their 4-byte index, so an
/// entry costs 20 bytes plus ~6 of table, where a `HashMap<u128, u32>` slot is 32 bytes (~50
/// an entry at its load): at 8.3M unique passages, ~250 MB instead of ~550 MB a table.
#[derive(Default)]
pub(crate) struct KeyIds {
    keys: Vec<u128>,
    values: Vec<u32>,
    table: hashbrown::HashTable<u32>,
}

impl KeyIds {
    /// The value of `key`, if inserted.
    #[inline]
    pub(crate) fn get(&self, key: u128) -> Option<u32> {
        let keys = &self.keys;
        self.table
            .find(key as u64, |&i| keys[i as usize] == key)
            .map(|&i| self.values[i as usize])
    }

    /// Insert `key` (not present: callers ask [`KeyIds::get`] first) with `value`.
    pub(crate) fn insert(&mut self, key: u128, value: u32) -> Result<()> {
        let i = u32::try_from(self.keys.len())
            .map_err(|_| Error::argument("inputs", "more than 2^32 unique passages"))?;
        self.keys.push(key);
        self.values.push(value);
        let keys = &self.keys;
        self.table
            .insert_unique(key as u64, i, |&j| keys[j as usize] as u64);
        Ok(())
    }
}

/// Identity hasher for keys that are already hashes.
#[derive(Default)]
pub(crate) struct PreHashed(u64);

impl Hasher for PreHashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ b as u64;
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = v as u64;
    }
}

fn token_key(tokens: &[i32]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(bytemuck::cast_slice(tokens))
}

impl DatasetWriter {
    /// Start writing a dataset that will appear at `out_dir` when [`finish`](Self::finish)ed.
    pub fn create(out_dir: impl AsRef<Path>, options: WriterOptions) -> Result<Self> {
        if options.rows_per_batch == 0 {
            return Err(Error::argument("rows_per_batch", "must be positive"));
        }
        let staging = Staging::new(out_dir.as_ref(), options.overwrite)?;
        let tmp = staging.path();
        let files = OpenFiles {
            passages: TokensFile::create(tmp.join(format::PASSAGES_FILE))?,
            prompts: TokensFile::create(tmp.join(format::PROMPTS_FILE))?,
            groups: GroupsFile::create(tmp.join(format::GROUPS_FILE))?,
        };
        Ok(DatasetWriter {
            staging,
            options,
            files: Some(files),
            rejects: None,
            passage_lens: Vec::new(),
            passage_ids: KeyIds::default(),
            prompt_ids: KeyIds::default(),
            counts: Counts::default(),
            provenance: None,
        })
    }

    /// The id of passage `tokens`: stored now if no earlier passage had the same tokens.
    pub fn intern_passage(&mut self, tokens: &[i32]) -> Result<u32> {
        let key = token_key(tokens);
        if let Some(id) = self.passage_ids.get(key) {
            return Ok(id);
        }
        let id = self.add_passage(tokens)?;
        self.passage_ids.insert(key, id)?;
        Ok(id)
    }

    /// The id of a row's prompt `tokens`: stored now if no earlier row prompt had the same
    /// tokens (the default prompts, added with [`DatasetWriter::add_prompt`], are not shared).
    pub fn intern_prompt(&mut self, tokens: &[i32]) -> Result<u32> {
        let key = token_key(tokens);
        if let Some(id) = self.prompt_ids.get(key) {
            return Ok(id);
        }
        let id = self.add_prompt(tokens)?;
        self.prompt_ids.insert(key, id)?;
        Ok(id)
    }

    /// Append a passage as a new row, even if it repeats one; returns its id.
    pub fn add_passage(&mut self, tokens: &[i32]) -> Result<u32> {
        let rows_per_batch = self.options.rows_per_batch;
        let id = self.files().passages.push(tokens, rows_per_batch)?;
        let id = u32::try_from(id)
            .ok()
            .filter(|&i| i <= i32::MAX as u32)
            .ok_or_else(|| Error::argument("inputs", "more than 2^31 unique passages"))?;
        self.passage_lens.push(tokens.len() as u32);
        self.counts.passages += 1;
        self.counts.passage_tokens += tokens.len() as u64;
        Ok(id)
    }

    /// Append a prompt; returns its id.
    pub fn add_prompt(&mut self, tokens: &[i32]) -> Result<u32> {
        let rows_per_batch = self.options.rows_per_batch;
        let id = self.files().prompts.push(tokens, rows_per_batch)?;
        self.counts.prompts += 1;
        u32::try_from(id).map_err(|_| Error::argument("inputs", "more than 2^32 prompts"))
    }

    /// Number of passages added so far.
    pub fn num_passages(&self) -> u64 {
        self.counts.passages
    }

    /// Append a group. Passage and prompt ids must have been returned by this writer.
    pub fn add_group(&mut self, g: &GroupRecord<'_>) -> Result<()> {
        let n = self.counts.passages;
        let mut ref_tokens = 0u64;
        for &id in g.pos.iter().chain(g.neg) {
            match usize::try_from(id)
                .ok()
                .and_then(|i| self.passage_lens.get(i))
            {
                Some(&len) => ref_tokens += len as u64,
                None => {
                    return Err(Error::Internal(format!(
                        "group {}: passage id {id} was not added (have {n})",
                        self.counts.groups
                    )));
                }
            }
        }
        if g.prompt.is_some_and(|p| p as u64 >= self.counts.prompts) {
            return Err(Error::Internal(format!(
                "prompt id {:?} was not added",
                g.prompt
            )));
        }
        if g.pos_scores.is_some_and(|s| s.len() != g.pos.len())
            || g.neg_scores.is_some_and(|s| s.len() != g.neg.len())
        {
            return Err(Error::Internal(format!(
                "group {}: score list length differs from its passage list",
                self.counts.groups
            )));
        }
        let rows_per_batch = self.options.rows_per_batch;
        let groups = &mut self.files().groups;
        groups.push(g);
        if groups.source.len() == rows_per_batch {
            groups.flush()?;
        }
        self.counts.groups += 1;
        self.counts.passage_refs += (g.pos.len() + g.neg.len()) as u64;
        self.counts.passage_ref_tokens += ref_tokens;
        self.counts.query_tokens += g.query.len() as u64;
        Ok(())
    }

    /// Record a rejected input row in rejects.jsonl.
    pub fn add_reject(&mut self, e: &RowError) -> Result<()> {
        let line = serde_json::json!({
            "file": e.position.path.display().to_string(),
            "line": e.position.line,
            "element": e.position.element,
            "field": e.field,
            "reason": e.reason.as_str(),
            "message": e.message,
        });
        let mut bytes = serde_json::to_vec(&line)
            .map_err(|e| Error::Internal(format!("serializing a reject: {e}")))?;
        bytes.push(b'\n');
        self.add_reject_line(&bytes)
    }

    /// Append one line (with its newline) of another dataset's rejects.jsonl (merge).
    pub fn add_reject_line(&mut self, line: &[u8]) -> Result<()> {
        let path = self.staging.path().join(format::REJECTS_FILE);
        if self.rejects.is_none() {
            let f = File::create(&path).map_err(|e| Error::io(&path, e))?;
            self.rejects = Some(HashingWriter::new(BufWriter::new(f)));
        }
        let Some(w) = self.rejects.as_mut() else {
            unreachable!("created above")
        };
        w.write_all(line).map_err(|e| Error::io(&path, e))
    }

    fn files(&mut self) -> &mut OpenFiles {
        match self.files.as_mut() {
            Some(f) => f,
            None => unreachable!("present until finish, which consumes the writer"),
        }
    }

    /// Stale staging directories of dead processes removed when this writer was created.
    pub fn cleaned(&self) -> &[PathBuf] {
        self.staging.cleaned()
    }

    /// Record how the dataset was derived (the manifest's `provenance`: e.g. the settings of
    /// `rankfeed mine`).
    pub fn set_provenance(&mut self, provenance: Option<serde_json::Value>) {
        self.provenance = provenance;
    }

    /// Counts so far.
    pub fn counts(&self) -> &Counts {
        &self.counts
    }

    /// Flush everything, write the manifest and publish the directory at the output path.
    pub fn finish(mut self, info: ManifestInfo) -> Result<Manifest> {
        let mut files = BTreeMap::new();
        let Some(open) = self.files.take() else {
            unreachable!("present until finish, which consumes the writer")
        };
        files.insert(format::PASSAGES_FILE.to_string(), open.passages.finish()?);
        files.insert(format::PROMPTS_FILE.to_string(), open.prompts.finish()?);
        files.insert(format::GROUPS_FILE.to_string(), open.groups.finish()?);
        if let Some(mut r) = self.rejects.take() {
            let path = self.staging.path().join(format::REJECTS_FILE);
            r.flush().map_err(|e| Error::io(&path, e))?;
            files.insert(format::REJECTS_FILE.to_string(), r.entry());
        }
        let manifest = Manifest {
            format: format::FORMAT_NAME.to_string(),
            format_version: format::FORMAT_VERSION,
            tool_version: env!("CARGO_PKG_VERSION").to_string(),
            rows_per_batch: self.options.rows_per_batch as u64,
            counts: self.counts.clone(),
            tokenizer: info.tokenizer,
            text: info.text,
            sources: info.sources,
            shards: info.shards,
            provenance: self.provenance.take(),
            files,
            checksum: String::new(),
        };
        let path = self.staging.path().join(format::MANIFEST_FILE);
        let (json, manifest) = manifest
            .seal()
            .map_err(|e| Error::Internal(format!("serializing the manifest: {e}")))?;
        std::fs::write(&path, json).map_err(|e| Error::io(&path, e))?;
        self.staging.commit()?;
        Ok(manifest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against a `HashMap`: keys equal in their low 64 bits (the table's hash) but not in the
    /// others stay apart, and every key keeps the value it was given first.
    #[test]
    fn key_ids_are_a_map_of_whole_keys() {
        let mut ids = KeyIds::default();
        let mut want = std::collections::HashMap::new();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut seen = Vec::new();
        for i in 0..50_000u32 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // Few distinct low halves (16k): many keys share a hash. Every fifth key repeats
            // an earlier one, which must keep its first value.
            let key = if i % 5 == 4 {
                seen[(x % seen.len() as u64) as usize]
            } else {
                ((x as u128) << 64) | (x >> 50) as u128
            };
            seen.push(key);
            let v = match ids.get(key) {
                Some(v) => v,
                None => {
                    ids.insert(key, i).unwrap();
                    i
                }
            };
            assert_eq!(v, *want.entry(key).or_insert(i), "key {key:x}");
            let other = key.wrapping_add(1 << 64);
            assert_eq!(ids.get(other), want.get(&other).copied());
        }
        assert_eq!(ids.keys.len(), want.len());
    }
}
