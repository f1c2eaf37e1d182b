//! Opening a dataset directory and reading it zero-copy.
//!
//! [`Dataset::open`] maps the files and checks, in time independent of the number of rows:
//! - the manifest is a regular file below [`format::MAX_MANIFEST_BYTES`], its seal holds (any
//!   changed byte fails here), it parses, names this format and a supported version;
//! - it lists exactly the files present (the three `.arrow` files, `rejects.jsonl` when
//!   present), each a regular file whose size equals the manifest's (a truncated or replaced
//!   file fails here);
//! - each Arrow file's footer, schema and every record batch's metadata are well formed, every
//!   buffer lies inside the file and is aligned, batch row counts follow `rows_per_batch` and
//!   add up to the manifest's counts (O(number of batches): ~80 batches per 5M rows).
//!
//! Checks that would be linear in the data happen **per access** instead, in O(1) each: list
//! offsets in bounds and ordered, null bits, passage and prompt ids below their table sizes,
//! score lists as long as their passage lists. A corrupt row is an `Err` when it is read, never
//! a panic and never undefined behaviour. [`Dataset::validate`] runs all of them over every row
//! plus the checksum of every file and every token id against the tokenizer's vocabulary, for
//! those who want to know up front (`rankfeed inspect --verify`): a dataset that passes it
//! holds exactly the bytes that were written.

use std::path::{Path, PathBuf};

use arrow_schema::Schema;
use bytemuck::Pod;

use crate::error::{Error, Result};
pub use crate::format::Group;
use crate::format::{self, Manifest};
use crate::ipc::{read_layout, BatchLayout, FileLayout};
use crate::storage::{self, MappedFile};

/// A record batch and its index.
#[derive(Debug, Clone, Copy)]
struct Loc<'a> {
    batch: usize,
    layout: &'a BatchLayout,
}

/// One Arrow file of the dataset, mapped, with its checked layout.
#[derive(Debug)]
struct Table {
    file: MappedFile,
    layout: FileLayout,
    rows: usize,
    rows_per_batch: usize,
    /// log2(rows_per_batch) when it is a power of two (the default): a shift instead of a
    /// division on every access.
    shift: Option<u32>,
}

impl Table {
    fn open(
        dir: &Path,
        name: &str,
        schema: &Schema,
        manifest: &Manifest,
        expected_rows: u64,
    ) -> Result<Table> {
        let path = dir.join(name);
        let entry = manifest.files.get(name).ok_or_else(|| {
            Error::corrupt(&path, "the manifest records no size and checksum for it")
        })?;
        let file = MappedFile::open(&path)?;
        if entry.bytes != file.bytes().len() as u64 {
            return Err(Error::corrupt(
                &path,
                format!(
                    "size is {} bytes, the manifest says {} (truncated or replaced?)",
                    file.bytes().len(),
                    entry.bytes
                ),
            ));
        }
        let layout = read_layout(&path, file.bytes(), schema)?;
        let rows_per_batch = usize::try_from(manifest.rows_per_batch)
            .ok()
            .filter(|&r| r > 0)
            .ok_or_else(|| Error::corrupt(&path, "manifest rows_per_batch must be positive"))?;
        let mut rows = 0usize;
        let n = layout.batches.len();
        for (i, b) in layout.batches.iter().enumerate() {
            let ok = if i + 1 < n {
                b.rows == rows_per_batch
            } else {
                b.rows <= rows_per_batch
            };
            if !ok {
                return Err(Error::corrupt(
                    &path,
                    format!(
                        "record batch {i} has {} rows; every batch but the last must have {rows_per_batch}",
                        b.rows
                    ),
                ));
            }
            rows += b.rows;
        }
        if rows as u64 != expected_rows {
            return Err(Error::corrupt(
                &path,
                format!("holds {rows} rows, the manifest says {expected_rows}"),
            ));
        }
        Ok(Table {
            file,
            layout,
            rows,
            rows_per_batch,
            shift: rows_per_batch
                .is_power_of_two()
                .then(|| rows_per_batch.trailing_zeros()),
        })
    }

    fn path(&self) -> &Path {
        self.file.path()
    }

    /// The batch holding `row` and the row's index inside it: O(1).
    #[inline(always)]
    fn locate(&self, row: usize, what: &'static str) -> Result<(Loc<'_>, usize)> {
        if row >= self.rows {
            return Err(Error::OutOfRange {
                what,
                index: row as u64,
                len: self.rows as u64,
            });
        }
        let (batch, index) = match self.shift {
            Some(s) => (row >> s, row & (self.rows_per_batch - 1)),
            None => (row / self.rows_per_batch, row % self.rows_per_batch),
        };
        let loc = Loc {
            batch,
            layout: &self.layout.batches[batch],
        };
        Ok((loc, index))
    }

    #[cold]
    #[inline(never)]
    fn corrupt(&self, row_in_batch: usize, b: Loc<'_>, msg: &str) -> Error {
        Error::corrupt(
            self.path(),
            format!(
                "row {}: {msg}",
                b.batch * self.rows_per_batch + row_in_batch
            ),
        )
    }

    /// The bytes of buffer `buf` of batch `b` (ranges checked against the file at open).
    #[inline(always)]
    fn bytes(&self, b: Loc<'_>, buf: usize) -> &[u8] {
        &self.file.bytes()[b.layout.buffers[buf].clone()]
    }

    /// The buffer `buf` of batch `b` as a slice of `T` (alignment checked).
    #[inline(always)]
    fn buffer<T: Pod>(&self, b: Loc<'_>, buf: usize, i: usize) -> Result<&[T]> {
        let bytes = self.bytes(b, buf);
        let whole = bytes.len() / std::mem::size_of::<T>() * std::mem::size_of::<T>();
        bytemuck::try_cast_slice(&bytes[..whole])
            .map_err(|e| self.corrupt(i, b, &format!("buffer {buf}: {e:?}")))
    }

    /// Whether entry `i` of node `node` (validity in buffer `buf`) is null.
    #[inline(always)]
    fn is_null(&self, b: Loc<'_>, node: usize, buf: usize, i: usize) -> Result<bool> {
        if b.layout.nodes[node].null_count == 0 {
            return Ok(false);
        }
        let bits = self.bytes(b, buf);
        match bits.get(i / 8) {
            Some(byte) => Ok(byte & (1 << (i % 8)) == 0),
            None => Err(self.corrupt(i, b, "validity bitmap too short")),
        }
    }

    /// The list at row `i` of the list column starting at node `node`, buffer `buf`.
    #[inline(always)]
    fn list<T: Pod>(&self, b: Loc<'_>, node: usize, buf: usize, i: usize) -> Result<Option<&[T]>> {
        if self.is_null(b, node, buf, i)? {
            return Ok(None);
        }
        let offsets: &[i64] = self.buffer(b, buf + 1, i)?;
        let values: &[T] = self.buffer(b, buf + 3, i)?;
        let values = &values[..values.len().min(b.layout.nodes[node + 1].len)];
        match (offsets.get(i), offsets.get(i + 1)) {
            (Some(&s), Some(&e)) if 0 <= s && s <= e && (e as u64) <= values.len() as u64 => {
                Ok(Some(&values[s as usize..e as usize]))
            }
            _ => Err(self.corrupt(i, b, "list offsets out of bounds or decreasing")),
        }
    }

    /// [`Table::list`], a null being corrupt (`what` names the column).
    #[inline(always)]
    fn non_null_list<T: Pod>(
        &self,
        b: Loc<'_>,
        node: usize,
        buf: usize,
        i: usize,
        what: &str,
    ) -> Result<&[T]> {
        match self.list(b, node, buf, i)? {
            Some(list) => Ok(list),
            None => Err(self.corrupt(i, b, &format!("{what} is null"))),
        }
    }

    /// Prefetch (see [`storage::prefetch`]) the `width`-byte entries `i` and `i + 1` of buffer
    /// `buf` of batch `b`: list offsets (`buf` the list's offsets buffer) or a value. A hint:
    /// an entry outside the buffer is ignored; the read that follows does the checks.
    #[inline]
    fn prefetch_entry(&self, b: Loc<'_>, buf: usize, i: usize, width: usize) {
        if let Some(entry) = self.bytes(b, buf).get(i * width..(i + 2) * width) {
            storage::prefetch(entry);
        }
    }

    /// The value at row `i` of the primitive column at node `node`, buffer `buf`.
    #[inline(always)]
    fn value<T: Pod>(&self, b: Loc<'_>, node: usize, buf: usize, i: usize) -> Result<Option<T>> {
        if self.is_null(b, node, buf, i)? {
            return Ok(None);
        }
        let values: &[T] = self.buffer(b, buf + 1, i)?;
        values
            .get(i)
            .copied()
            .map(Some)
            .ok_or_else(|| self.corrupt(i, b, "value buffer too short"))
    }
}

/// Node and buffer indices of the groups.arrow columns (see [`format::groups_schema`]; the
/// test `groups_col_follows_the_schema` derives them from it).
mod groups_col {
    pub const QUERY: (usize, usize) = (0, 0);
    pub const POS: (usize, usize) = (2, 4);
    pub const NEG: (usize, usize) = (4, 8);
    pub const POS_SCORES: (usize, usize) = (6, 12);
    pub const NEG_SCORES: (usize, usize) = (8, 16);
    pub const PROMPT: (usize, usize) = (10, 20);
    pub const SOURCE: (usize, usize) = (11, 22);
}

/// The part of a group that pair building reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupIds<'a> {
    /// Query token ids.
    pub query: &'a [i32],
    /// Positive passage ids.
    pub pos: &'a [i32],
    /// Negative passage ids.
    pub neg: &'a [i32],
    /// Prompt id; `None` means the mode's default.
    pub prompt: Option<u32>,
}

/// An opened dataset directory.
#[derive(Debug)]
pub struct Dataset {
    dir: PathBuf,
    manifest: Manifest,
    groups: Table,
    passages: Table,
    prompts: Table,
}

impl Dataset {
    /// Open the dataset in `dir`: map the files and check everything that does not take time
    /// proportional to the data (see the module docs).
    pub fn open(dir: impl AsRef<Path>) -> Result<Dataset> {
        let dir = dir.as_ref();
        let manifest = read_manifest(dir)?;
        check_facts(dir, &manifest)?;
        if let Some(r) = manifest.shards.filter(|r| !r.is_valid()) {
            return Err(Error::corrupt(
                dir.join(format::MANIFEST_FILE),
                format!(
                    "shards {}..{} of {}: not a range of shards",
                    r.start, r.end, r.of
                ),
            ));
        }
        check_file_list(dir, &manifest)?;
        let c = &manifest.counts;
        let groups = Table::open(
            dir,
            format::GROUPS_FILE,
            &format::groups_schema(),
            &manifest,
            c.groups,
        )?;
        let passages = Table::open(
            dir,
            format::PASSAGES_FILE,
            &format::tokens_schema(),
            &manifest,
            c.passages,
        )?;
        let prompts = Table::open(
            dir,
            format::PROMPTS_FILE,
            &format::tokens_schema(),
            &manifest,
            c.prompts,
        )?;
        Ok(Dataset {
            dir: dir.to_path_buf(),
            manifest,
            groups,
            passages,
            prompts,
        })
    }

    /// The fingerprint of the tokenizer the dataset was converted with, if recorded (ids of
    /// datasets with another one are other words).
    pub fn tokenizer_fingerprint(&self) -> Option<&str> {
        self.manifest()
            .tokenizer
            .as_ref()
            .map(|t| t.fingerprint.as_str())
    }

    /// The dataset directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Number of groups (queries).
    pub fn len(&self) -> usize {
        self.groups.rows
    }

    /// Whether the dataset has no groups.
    pub fn is_empty(&self) -> bool {
        self.groups.rows == 0
    }

    /// Number of unique passages.
    pub fn num_passages(&self) -> usize {
        self.passages.rows
    }

    /// Number of stored prompts.
    pub fn num_prompts(&self) -> usize {
        self.prompts.rows
    }

    /// The group at `row`, O(1), zero-copy.
    pub fn group(&self, row: usize) -> Result<Group<'_>> {
        let t = &self.groups;
        let (b, i) = t.locate(row, "row")?;
        let ids = self.ids_at(b, i)?;
        let pos_scores: Option<&[f32]> =
            t.list(b, groups_col::POS_SCORES.0, groups_col::POS_SCORES.1, i)?;
        let neg_scores: Option<&[f32]> =
            t.list(b, groups_col::NEG_SCORES.0, groups_col::NEG_SCORES.1, i)?;
        if pos_scores.is_some_and(|s| s.len() != ids.pos.len())
            || neg_scores.is_some_and(|s| s.len() != ids.neg.len())
        {
            return Err(t.corrupt(i, b, "score list length differs from its passage list"));
        }
        let source: i32 = t
            .value(b, groups_col::SOURCE.0, groups_col::SOURCE.1, i)?
            .ok_or_else(|| t.corrupt(i, b, "source is null"))?;
        if source < 0 || source as usize >= self.manifest.sources.len().max(1) {
            return Err(t.corrupt(i, b, &format!("source id {source} out of range")));
        }
        Ok(Group {
            query: ids.query,
            pos: ids.pos,
            neg: ids.neg,
            pos_scores,
            neg_scores,
            prompt: ids.prompt,
            source: source as u32,
        })
    }

    /// What pair building reads of a group (query, passage ids, prompt): fewer columns, so
    /// fewer cache misses than [`Dataset::group`] on the hot path.
    #[inline]
    pub fn group_ids(&self, row: usize) -> Result<GroupIds<'_>> {
        let (b, i) = self.groups.locate(row, "row")?;
        self.ids_at(b, i)
    }

    /// [`GroupIds`] of row `i` of record batch `b` of groups.arrow.
    #[inline]
    fn ids_at(&self, b: Loc<'_>, i: usize) -> Result<GroupIds<'_>> {
        let t = &self.groups;
        let ids = |(node, buf), what| t.non_null_list(b, node, buf, i, what);
        let prompt: Option<i32> = t.value(b, groups_col::PROMPT.0, groups_col::PROMPT.1, i)?;
        let prompt = match prompt {
            None => None,
            Some(p) if p >= 0 && (p as usize) < self.prompts.rows => Some(p as u32),
            Some(p) => return Err(t.corrupt(i, b, &format!("prompt id {p} out of range"))),
        };
        Ok(GroupIds {
            query: ids(groups_col::QUERY, "query")?,
            pos: ids(groups_col::POS, "pos")?,
            neg: ids(groups_col::NEG, "neg")?,
            prompt,
        })
    }

    /// Start loading what [`Dataset::group_ids`] of `row` reads (list offsets of query, pos and
    /// neg, the prompt id) without waiting for it. A hint: no value changes, no error (a row
    /// out of range is ignored and fails at the read).
    #[inline]
    pub fn prefetch_group(&self, row: usize) {
        let t = &self.groups;
        if let Ok((b, i)) = t.locate(row, "row") {
            for (_, buf) in [groups_col::QUERY, groups_col::POS, groups_col::NEG] {
                t.prefetch_entry(b, buf + 1, i, 8);
            }
            t.prefetch_entry(b, groups_col::PROMPT.1 + 1, i, 4);
        }
    }

    /// Start loading the list offsets of passage `id` without waiting (a hint, as
    /// [`Dataset::prefetch_group`]).
    #[inline]
    pub fn prefetch_passage(&self, id: i32) {
        let t = &self.passages;
        if let Some((b, i)) = usize::try_from(id)
            .ok()
            .and_then(|r| t.locate(r, "passage id").ok())
        {
            t.prefetch_entry(b, 1, i, 8);
        }
    }

    /// Token ids of passage `id`, O(1), zero-copy. Ids come from [`Group::pos`] / [`Group::neg`];
    /// an id outside the table is an [`Error::OutOfRange`].
    #[inline]
    pub fn passage(&self, id: i32) -> Result<&[i32]> {
        tokens_row(&self.passages, id, "passage id")
    }

    /// Token ids of passage `id` as stored in a group's `pos`/`neg`: an id outside the table
    /// is corruption of groups.arrow ([`Error::Corrupt`]), not a caller's bad index.
    #[inline]
    pub fn referenced_passage(&self, id: i32) -> Result<&[i32]> {
        self.passage(id).map_err(|e| match e {
            Error::OutOfRange { index, len, .. } => Error::corrupt(
                self.groups.path(),
                format!(
                    "a group references passage id {} (the dataset has {len})",
                    index as i64
                ),
            ),
            e => e,
        })
    }

    /// Token ids of prompt `id`.
    pub fn prompt_tokens(&self, id: u32) -> Result<&[i32]> {
        tokens_row(&self.prompts, id as i32, "prompt id")
    }

    /// Whether every group has both score lists, from the null counts in each record batch's
    /// metadata: O(number of batches).
    pub fn all_rows_have_scores(&self) -> bool {
        self.groups.layout.batches.iter().all(|b| {
            b.nodes[groups_col::POS_SCORES.0].null_count == 0
                && b.nodes[groups_col::NEG_SCORES.0].null_count == 0
        })
    }

    /// What deriving a dataset from this one (`action`: "mine", "score") checks first: the
    /// dataset is whole (not some shards of a conversion), then [`Dataset::validate`].
    pub fn validate_whole(&self, action: &str) -> Result<()> {
        if self.manifest.shards.is_some() {
            return Err(Error::input(
                &self.dir,
                format!("holds only some shards of a conversion: merge them first, then {action}"),
            ));
        }
        self.validate()
    }

    /// Check every row of every file, every id, every token id against the vocabulary, and the
    /// checksum of every file: linear in the data (the tokenizer facts were checked at open).
    /// `merge` and `export` run it on their inputs before writing anything.
    pub fn validate(&self) -> Result<()> {
        for (name, table) in [
            (format::GROUPS_FILE, &self.groups),
            (format::PASSAGES_FILE, &self.passages),
            (format::PROMPTS_FILE, &self.prompts),
        ] {
            check_sum(table.path(), table.file.bytes(), &self.manifest.files[name])?;
        }
        if let Some(entry) = self.manifest.files.get(format::REJECTS_FILE) {
            let path = self.dir.join(format::REJECTS_FILE);
            let rejects = MappedFile::open(&path)?;
            check_sum(&path, rejects.bytes(), entry)?;
        }
        let vocab = vocab_size(&self.manifest);
        let bad_token = |path: &Path, what: &dyn Fn() -> String, ids: &[i32]| -> Result<()> {
            match ids.iter().find(|&&t| !(0..vocab).contains(&(t as i64))) {
                None => Ok(()),
                Some(t) => Err(Error::corrupt(
                    path,
                    format!(
                        "{}: token id {t} is outside the vocabulary of {vocab}",
                        what()
                    ),
                )),
            }
        };
        for id in 0..self.passages.rows {
            bad_token(
                self.passages.path(),
                &|| format!("row {id}"),
                self.passage(id as i32)?,
            )?;
        }
        for id in 0..self.prompts.rows {
            bad_token(
                self.prompts.path(),
                &|| format!("row {id}"),
                self.prompt_tokens(id as u32)?,
            )?;
        }
        let n = self.passages.rows;
        for row in 0..self.groups.rows {
            let g = self.group(row)?;
            bad_token(self.groups.path(), &|| format!("row {row} query"), g.query)?;
            for &id in g.pos.iter().chain(g.neg) {
                if id < 0 || id as usize >= n {
                    return Err(Error::corrupt(
                        self.groups.path(),
                        format!("row {row}: passage id {id} out of range (have {n})"),
                    ));
                }
            }
            if g.pos.is_empty() {
                return Err(Error::corrupt(
                    self.groups.path(),
                    format!("row {row}: no positive"),
                ));
            }
            for s in g.pos_scores.into_iter().chain(g.neg_scores).flatten() {
                if !s.is_finite() {
                    return Err(Error::corrupt(
                        self.groups.path(),
                        format!("row {row}: non-finite score {s}"),
                    ));
                }
            }
        }
        Ok(())
    }
}

#[inline(always)]
fn tokens_row<'a>(t: &'a Table, id: i32, what: &'static str) -> Result<&'a [i32]> {
    let row = usize::try_from(id).map_err(|_| Error::OutOfRange {
        what,
        index: id as i64 as u64,
        len: t.rows as u64,
    })?;
    let (b, i) = t.locate(row, what)?;
    t.non_null_list(b, 0, 0, i, "tokens")
}

/// The number of token ids a dataset may hold: the tokenizer's vocabulary, or any int32.
fn vocab_size(manifest: &Manifest) -> i64 {
    manifest
        .tokenizer
        .as_ref()
        .map_or(i32::MAX as i64 + 1, |f| f.vocab_size as i64)
}

/// The tokenizer facts hold against themselves ([`format::TokenizerFacts::check`]: special
/// ids within the vocabulary, templates well formed) and the separator ids are within the
/// vocabulary: what pair building takes from the manifest, checked at open (O(1)), so a
/// template without its second sequence is a corrupt dataset, not a loader failure.
fn check_facts(dir: &Path, manifest: &Manifest) -> Result<()> {
    let Some(facts) = &manifest.tokenizer else {
        return Ok(());
    };
    let path = dir.join(format::MANIFEST_FILE);
    facts
        .check()
        .map_err(|m| Error::corrupt(&path, format!("tokenizer facts: {m}")))?;
    facts
        .check_ids("text.sep_ids", &manifest.text.sep_ids)
        .map_err(|m| Error::corrupt(&path, m))
}

fn check_sum(path: &Path, bytes: &[u8], entry: &format::FileEntry) -> Result<()> {
    let sum = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(bytes));
    if sum != entry.xxh3_64 || bytes.len() as u64 != entry.bytes {
        return Err(Error::corrupt(
            path,
            format!(
                "checksum {sum} ({} bytes) differs from the manifest's {} ({} bytes)",
                bytes.len(),
                entry.xxh3_64,
                entry.bytes
            ),
        ));
    }
    Ok(())
}

/// The manifest's `files` lists exactly the data files: the three tables, and rejects.jsonl
/// exactly when it exists (a regular file of the recorded size).
fn check_file_list(dir: &Path, manifest: &Manifest) -> Result<()> {
    let manifest_path = dir.join(format::MANIFEST_FILE);
    for name in manifest.files.keys() {
        if ![
            format::GROUPS_FILE,
            format::PASSAGES_FILE,
            format::PROMPTS_FILE,
            format::REJECTS_FILE,
        ]
        .contains(&name.as_str())
        {
            return Err(Error::corrupt(
                &manifest_path,
                format!("lists an unknown file {name:?}"),
            ));
        }
    }
    let rejects = dir.join(format::REJECTS_FILE);
    match (
        manifest.files.get(format::REJECTS_FILE),
        rejects.symlink_metadata().is_ok(),
    ) {
        (Some(_), false) => Err(Error::corrupt(
            &rejects,
            "missing (the manifest records it)",
        )),
        (None, true) => Err(Error::corrupt(
            &rejects,
            "the manifest records no size and checksum for it",
        )),
        (Some(entry), true) => {
            let file = storage::open_dataset_file(&rejects)?;
            let len = file.metadata().map_err(|e| Error::io(&rejects, e))?.len();
            if len != entry.bytes {
                return Err(Error::corrupt(
                    &rejects,
                    format!("size is {len} bytes, the manifest says {}", entry.bytes),
                ));
            }
            Ok(())
        }
        (None, false) => Ok(()),
    }
}

/// Read and check `dir/manifest.json`: a regular file, at most
/// [`format::MAX_MANIFEST_BYTES`], sealed (see [`format`]), of a supported version.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    use std::io::Read;
    let path = dir.join(format::MANIFEST_FILE);
    let file = storage::open_dataset_file(&path)?;
    let len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
    let mut text = Vec::new();
    if len <= format::MAX_MANIFEST_BYTES {
        // `take` holds the bound even if the file grows after the size was read.
        file.take(format::MAX_MANIFEST_BYTES + 1)
            .read_to_end(&mut text)
            .map_err(|e| Error::io(&path, e))?;
    }
    if len.max(text.len() as u64) > format::MAX_MANIFEST_BYTES {
        return Err(manifest_too_large(&path));
    }
    parse_manifest(&path, &text)
}

pub(crate) fn manifest_too_large(path: &Path) -> Error {
    Error::corrupt(
        path,
        format!(
            "larger than {} bytes: not a manifest",
            format::MAX_MANIFEST_BYTES
        ),
    )
}

/// Check and parse a manifest's bytes (read from `path`, named in errors): JSON, this format,
/// a supported version, sealed.
pub(crate) fn parse_manifest(path: &Path, text: &[u8]) -> Result<Manifest> {
    let path = path.to_path_buf();
    let value: serde_json::Value = serde_json::from_slice(text)
        .map_err(|e| Error::corrupt(&path, format!("not valid JSON: {e}")))?;
    if value.get("format").and_then(|f| f.as_str()) != Some(format::FORMAT_NAME) {
        return Err(Error::corrupt(
            &path,
            format!(
                "not a rankfeed manifest (no \"format\": \"{}\")",
                format::FORMAT_NAME
            ),
        ));
    }
    let version = value
        .get("format_version")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| Error::corrupt(&path, "no format_version"))?;
    if !format::SUPPORTED_VERSIONS.contains(&(version as u32)) || version > u32::MAX as u64 {
        return Err(Error::UnsupportedVersion {
            path,
            found: version.min(u32::MAX as u64) as u32,
            supported: format::SUPPORTED_VERSIONS,
        });
    }
    let manifest: Manifest = serde_json::from_value(value)
        .map_err(|e| Error::corrupt(&path, format!("invalid manifest: {e}")))?;
    Manifest::check_seal(text, &manifest.checksum).map_err(|m| Error::corrupt(&path, m))?;
    Ok(manifest)
}

#[cfg(test)]
mod layout_tests {
    use super::groups_col;
    use crate::format::{self, col};
    use arrow_schema::DataType;

    /// The (node, buffer) positions used to read groups.arrow are the ones the schema gives:
    /// a large_list is 2 nodes and 4 buffers (validity, offsets, child validity, child
    /// values), a primitive 1 node and 2 buffers, in field order.
    #[test]
    fn groups_col_follows_the_schema() {
        let mut at = std::collections::HashMap::new();
        let (mut node, mut buf) = (0, 0);
        for f in format::groups_schema().fields() {
            at.insert(f.name().clone(), (node, buf));
            match f.data_type() {
                DataType::LargeList(_) => (node, buf) = (node + 2, buf + 4),
                _ => (node, buf) = (node + 1, buf + 2),
            }
        }
        for (name, pos) in [
            (col::QUERY, groups_col::QUERY),
            (col::POS, groups_col::POS),
            (col::NEG, groups_col::NEG),
            (col::POS_SCORES, groups_col::POS_SCORES),
            (col::NEG_SCORES, groups_col::NEG_SCORES),
            (col::PROMPT, groups_col::PROMPT),
            (col::SOURCE, groups_col::SOURCE),
        ] {
            assert_eq!(at[name], pos, "{name}");
        }
        assert_eq!(at.len(), 7);
    }
}
