//! The on-disk dataset format. This module owns the layout; it does no I/O.
//!
//! A dataset is a directory:
//!
//! ```text
//! dataset/
//!   manifest.json    format version, counts, tokenizer facts, text settings, per-source stats,
//!                    a checksum per file (see [`Manifest`])
//!   passages.arrow   one row per *unique* formatted passage text
//!                      tokens: large_list<int32>            (full length, no special tokens)
//!   groups.arrow     one row per accepted input row (query), in input order
//!                      query:      large_list<int32>        (formatted query, no special tokens)
//!                      pos:        large_list<int32>        (passage ids, rows of passages.arrow)
//!                      neg:        large_list<int32>        (passage ids)
//!                      pos_scores: large_list<float32>?     (null when the row had none)
//!                      neg_scores: large_list<float32>?
//!                      prompt:     int32?                   (row of prompts.arrow; null = default)
//!                      source:     int32                    (index into manifest.sources)
//!   prompts.arrow    tokens of the built-in default prompts and of each distinct row prompt
//!                      tokens: large_list<int32>
//!   rejects.jsonl    only with --on-error skip: one JSON object per rejected row
//! ```
//!
//! Each `.arrow` file is a plain, uncompressed Arrow IPC *file* (pyarrow `ipc.open_file`,
//! polars `read_ipc`/`scan_ipc`) whose buffers are 64-byte aligned. Record batches hold exactly
//! [`Manifest::rows_per_batch`] rows each except the last, so row `r` lives in batch
//! `r / rows_per_batch` at index `r % rows_per_batch`: an O(1) lookup. List offsets are 64-bit
//! (large_list), so a file may hold more than 2^31 tokens; they restart in every batch.
//!
//! Token ids are int32: vocabularies are below 2^31 and Spark has no unsigned types.
//!
//! ## Integrity (format version 2)
//! - `manifest.json` is sealed: its last field, `checksum`, is `xxh3-64` (16 lower-case hex
//!   digits) of the file's own bytes with those 16 digits replaced by `0`s. Any change to any
//!   byte of the manifest (an id in the pair template, a flag, a count, a checksum of another
//!   file, even whitespace) breaks the seal, and the seal is checked at every open.
//! - `files` lists **every** data file with its size and `xxh3-64`: the three `.arrow` files
//!   always, `rejects.jsonl` exactly when it exists. A missing entry, an unknown entry, a
//!   missing or extra file is corruption. Sizes are checked at open (O(1)); checksums, every
//!   row, and every token id against the tokenizer's vocabulary by `verify`.
//! - Version 1 datasets carried no seal and optional checksums; they are refused (re-convert).
//!
//! xxh3 detects accidental corruption and edits, not a forger who recomputes the sums.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow_schema::{DataType, Field, Schema};
use serde::{Deserialize, Serialize};

/// The format version this build writes.
pub const FORMAT_VERSION: u32 = 2;
/// The format versions this build reads.
pub const SUPPORTED_VERSIONS: &[u32] = &[2];
/// Largest `manifest.json` read (a manifest holds per-source stats: ~1 KB per input file).
pub const MAX_MANIFEST_BYTES: u64 = 64 << 20;
/// The `format` field of every manifest.
pub const FORMAT_NAME: &str = "rankfeed-dataset";

/// File names inside a dataset directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Unique passages.
pub const PASSAGES_FILE: &str = "passages.arrow";
/// One row per query.
pub const GROUPS_FILE: &str = "groups.arrow";
/// Prompt tokens.
pub const PROMPTS_FILE: &str = "prompts.arrow";
/// Rejected input rows (skip policy).
pub const REJECTS_FILE: &str = "rejects.jsonl";

/// The Parquet key-value metadata key under which `export` stores what `import` restores
/// (tokenizer facts, text settings, default prompts, sources).
pub const PARQUET_MANIFEST_KEY: &str = "rankfeed.manifest";

/// FlagEmbedding's default `query_instruction_format` / `passage_instruction_format`.
pub const DEFAULT_INSTRUCTION_FORMAT: &str = "{}{}";
/// FlagEmbedding's default `sep_token` of the LLM modes.
pub const DEFAULT_SEP_TOKEN: &str = "\n";

/// Rows per record batch unless the writer is told otherwise.
pub const DEFAULT_ROWS_PER_BATCH: usize = 1 << 16;
/// Buffer alignment inside the Arrow files.
pub const ALIGNMENT: usize = 64;

/// The default prompt of FlagEmbedding's LLM rerankers.
pub const DEFAULT_LLM_PROMPT: &str = "Given a query A and a passage B, determine whether the passage contains an answer to the query by providing a prediction of either 'Yes' or 'No'.";
/// The default prompt of the Matryoshka reranker.
pub const DEFAULT_MATRYOSHKA_PROMPT: &str =
    "Predict whether passage B contains an answer to query A.";
/// Prompt row holding the LLM default prompt.
pub const PROMPT_ID_LLM_DEFAULT: u32 = 0;
/// Prompt row holding the Matryoshka default prompt.
pub const PROMPT_ID_MATRYOSHKA_DEFAULT: u32 = 1;

/// Column names of groups.arrow, in order.
pub mod col {
    /// Query token ids.
    pub const QUERY: &str = "query";
    /// Positive passage ids.
    pub const POS: &str = "pos";
    /// Negative passage ids.
    pub const NEG: &str = "neg";
    /// Teacher scores of the positives.
    pub const POS_SCORES: &str = "pos_scores";
    /// Teacher scores of the negatives.
    pub const NEG_SCORES: &str = "neg_scores";
    /// Prompt id.
    pub const PROMPT: &str = "prompt";
    /// Source id.
    pub const SOURCE: &str = "source";
    /// Token ids of passages.arrow / prompts.arrow.
    pub const TOKENS: &str = "tokens";
    /// Parquet export: the group's row number.
    pub const ROW: &str = "row";
    /// Parquet tables export: a passage's or prompt's id.
    pub const ID: &str = "id";
}

fn large_list(name: &str, item: DataType, nullable: bool) -> Field {
    Field::new(
        name,
        DataType::LargeList(Arc::new(Field::new("item", item, false))),
        nullable,
    )
}

/// Schema of passages.arrow and prompts.arrow.
pub fn tokens_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![large_list(
        col::TOKENS,
        DataType::Int32,
        false,
    )]))
}

/// Schema of groups.arrow.
pub fn groups_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        large_list(col::QUERY, DataType::Int32, false),
        large_list(col::POS, DataType::Int32, false),
        large_list(col::NEG, DataType::Int32, false),
        large_list(col::POS_SCORES, DataType::Float32, true),
        large_list(col::NEG_SCORES, DataType::Float32, true),
        Field::new(col::PROMPT, DataType::Int32, true),
        Field::new(col::SOURCE, DataType::Int32, false),
    ]))
}

/// One training group (one input row): what the reader hands out, borrowed zero-copy from
/// the mapped files, and what the writer takes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Group<'a> {
    /// Query token ids (formatted, no special tokens).
    pub query: &'a [i32],
    /// Passage ids of the positives (non-empty).
    pub pos: &'a [i32],
    /// Passage ids of the negatives (may be empty).
    pub neg: &'a [i32],
    /// Teacher scores of the positives, as long as `pos`, when the row had them.
    pub pos_scores: Option<&'a [f32]>,
    /// Teacher scores of the negatives, as long as `neg`, when the row had them.
    pub neg_scores: Option<&'a [f32]>,
    /// Row of prompts.arrow holding this row's prompt; `None` means the mode's default.
    pub prompt: Option<u32>,
    /// Source (input file) id.
    pub source: u32,
}

/// One piece of a post-processing template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TemplatePiece {
    /// Special token ids inserted verbatim.
    Special {
        /// The ids.
        ids: Vec<i32>,
        /// token_type_id of these positions.
        type_id: u32,
    },
    /// The first (`a`) or second (`b`) sequence.
    Sequence {
        /// `"A"` or `"B"`.
        id: String,
        /// token_type_id of the sequence.
        type_id: u32,
    },
}

/// What pair building needs to know about the tokenizer, read from tokenizer.json (and the
/// tokenizer_config.json / special_tokens_map.json beside it when present).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenizerFacts {
    /// `xxh3-128:<hex>` of the tokenizer.json bytes.
    pub fingerprint: String,
    /// The tokenizer model type (WordPiece, Unigram, BPE, WordLevel).
    pub model: String,
    /// Vocabulary size including added tokens.
    pub vocab_size: u32,
    /// Template for one sequence (`[CLS] A [SEP]`); empty when the tokenizer adds nothing.
    pub single_template: Vec<TemplatePiece>,
    /// Template for a pair (`[CLS] A [SEP] B [SEP]`); empty when the tokenizer adds nothing.
    pub pair_template: Vec<TemplatePiece>,
    /// Whether the model takes token_type_ids (true when the pair template uses type id 1,
    /// or tokenizer_config.json lists them among model_input_names).
    pub has_token_type_ids: bool,
    /// Beginning-of-sequence id, if any.
    pub bos_id: Option<i32>,
    /// End-of-sequence id, if any.
    pub eos_id: Option<i32>,
    /// Padding id, if any.
    pub pad_id: Option<i32>,
    /// Unknown-token id, if any.
    pub unk_id: Option<i32>,
    /// `"right"` or `"left"`: the tokenizer's configured padding side.
    pub padding_side: String,
    /// Where each fact came from, for users who wonder.
    pub notes: Vec<String>,
}

impl TokenizerFacts {
    /// Check the facts against themselves: every special id within the vocabulary, template
    /// type ids 0 or 1, the pair template holding sequences A and B once each, the single
    /// template A once, both templates empty or neither. `Err` names the first fact that
    /// fails. What it cannot see: a fact set that is forged but consistent (another id within
    /// the vocabulary, a larger `vocab_size`); only the tokenizer file tells those apart.
    pub fn check(&self) -> Result<(), String> {
        let in_vocab = |what: &str, id: i32| self.check_ids(what, &[id]);
        for (what, id) in [
            ("bos", self.bos_id),
            ("eos", self.eos_id),
            ("pad", self.pad_id),
            ("unk", self.unk_id),
        ] {
            if let Some(id) = id {
                in_vocab(what, id)?;
            }
        }
        for (name, template, want) in [
            ("single_template", &self.single_template, &["A"][..]),
            ("pair_template", &self.pair_template, &["A", "B"][..]),
        ] {
            let mut seqs = Vec::new();
            for piece in template {
                let type_id = match piece {
                    TemplatePiece::Special { ids, type_id } => {
                        for &id in ids {
                            in_vocab(name, id)?;
                        }
                        *type_id
                    }
                    TemplatePiece::Sequence { id, type_id } => {
                        seqs.push(id.as_str());
                        *type_id
                    }
                };
                if type_id > 1 {
                    return Err(format!("{name}: type id {type_id} (expected 0 or 1)"));
                }
            }
            if !template.is_empty() && seqs != want {
                return Err(format!("{name}: sequences {seqs:?}, expected {want:?}"));
            }
        }
        if self.single_template.is_empty() != self.pair_template.is_empty() {
            return Err(format!(
                "single_template has {} pieces, pair_template {}: a tokenizer adds special \
                 tokens to both or to neither",
                self.single_template.len(),
                self.pair_template.len()
            ));
        }
        if !matches!(self.padding_side.as_str(), "left" | "right") {
            return Err(format!("padding_side {:?}", self.padding_side));
        }
        Ok(())
    }

    /// Check that every id of `ids` is within the vocabulary; `Err` names `what` and the
    /// first id outside.
    pub fn check_ids(&self, what: &str, ids: &[i32]) -> Result<(), String> {
        let vocab = self.vocab_size as i64;
        match ids.iter().find(|&&id| !(0..vocab).contains(&(id as i64))) {
            None => Ok(()),
            Some(id) => Err(format!(
                "{what} id {id} is outside the vocabulary of {vocab}"
            )),
        }
    }

    /// Number of special ids the pair template adds (BERT 3, XLM-R 4).
    pub fn num_special_pair(&self) -> usize {
        self.pair_template
            .iter()
            .map(|p| match p {
                TemplatePiece::Special { ids, .. } => ids.len(),
                TemplatePiece::Sequence { .. } => 0,
            })
            .sum()
    }
}

/// Text formatting applied before tokenization, exactly as FlagEmbedding does it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextSettings {
    /// `query_instruction_for_rerank`; when set, queries become `format(prompt, query)`.
    pub query_instruction: Option<String>,
    /// `query_instruction_format` (default `{}{}`), after `\n` unescaping.
    pub query_instruction_format: String,
    /// `passage_instruction_for_rerank`.
    pub passage_instruction: Option<String>,
    /// `passage_instruction_format` (default `{}{}`), after `\n` unescaping.
    pub passage_instruction_format: String,
    /// The separator text of LLM modes (default `"\n"`), taken literally.
    pub sep_token: String,
    /// Token ids of `sep_token` (no special tokens).
    pub sep_ids: Vec<i32>,
    /// The default prompt text used in `llm` mode (rows without a `prompt`).
    pub default_prompt_llm: String,
    /// The default prompt text used in `matryoshka` mode.
    pub default_prompt_matryoshka: String,
    /// Which row fields gave per-row instructions (recorded only when not the default).
    #[serde(default, skip_serializing_if = "Convention::is_reranker")]
    pub convention: Convention,
}

/// Which row fields carry per-row instructions, when an instruction is configured. The two
/// kinds of training read different fields (FlagEmbedding's reranker and embedder datasets),
/// and conversion bakes the formatted text into the ids, so a dataset records which it used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Convention {
    /// Rerankers: `query_prompt` replaces the query instruction, `passage_prompt` the passage
    /// instruction.
    #[default]
    Reranker,
    /// Embedders: `prompt` replaces the query instruction; there is no per-row passage
    /// instruction (`passage_prompt` and `query_prompt` are not read).
    Embedder,
}

impl Convention {
    /// The default.
    pub fn is_reranker(&self) -> bool {
        *self == Convention::Reranker
    }
}

impl std::str::FromStr for Convention {
    type Err = crate::error::Error;
    fn from_str(s: &str) -> crate::error::Result<Convention> {
        match s {
            "reranker" => Ok(Convention::Reranker),
            "embedder" => Ok(Convention::Embedder),
            _ => Err(crate::error::Error::argument(
                "convention",
                format!("{s:?}: expected reranker or embedder"),
            )),
        }
    }
}

impl Default for TextSettings {
    fn default() -> Self {
        TextSettings {
            query_instruction: None,
            query_instruction_format: DEFAULT_INSTRUCTION_FORMAT.into(),
            passage_instruction: None,
            passage_instruction_format: DEFAULT_INSTRUCTION_FORMAT.into(),
            sep_token: DEFAULT_SEP_TOKEN.into(),
            sep_ids: Vec::new(),
            default_prompt_llm: DEFAULT_LLM_PROMPT.into(),
            default_prompt_matryoshka: DEFAULT_MATRYOSHKA_PROMPT.into(),
            convention: Convention::Reranker,
        }
    }
}

/// Statistics of one input file (one *source*).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SourceStats {
    /// Source id (the `source` column).
    pub id: u32,
    /// The path as given.
    pub path: String,
    /// Input bytes (compressed size when compressed).
    pub bytes: u64,
    /// Rows read (accepted + rejected; blank lines are not rows).
    pub rows_read: u64,
    /// Rows stored in groups.arrow.
    pub rows_accepted: u64,
    /// Rows rejected, in total.
    pub rows_rejected: u64,
    /// Rejected rows by reason (snake_case names of [`crate::RejectReason`]).
    pub rejected_by_reason: BTreeMap<String, u64>,
    /// Accepted rows with an empty `neg` (usable only with group size 1).
    pub rows_empty_neg: u64,
    /// Blank lines skipped.
    pub blank_lines: u64,
    /// Unknown top-level fields and how many rows carried each (ignored).
    pub unknown_fields: BTreeMap<String, u64>,
    /// The `batch_size` of the first accepted row carrying one: this source's batch size in
    /// same-source batches (FlagEmbedding reads a file's first row).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<u64>,
}

/// The shards `start..end` of `of` of one sharded conversion (`--shard K/N` writes
/// `K..K+1` of `N`). `merge` uses it to refuse a shard given twice, overlapping shards, and
/// gaps, and to join shards in shard order whatever the order they are given in; shards that
/// add up to `0..of` make a whole conversion, whose manifest has no `shards`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRange {
    /// First shard held.
    pub start: u64,
    /// One past the last shard held.
    pub end: u64,
    /// Shards of the conversion.
    pub of: u64,
}

impl ShardRange {
    /// The range, or `None` when it covers the whole conversion (`0..of`).
    pub fn partial(start: u64, end: u64, of: u64) -> Option<ShardRange> {
        (start > 0 || end < of).then_some(ShardRange { start, end, of })
    }

    /// Whether the range is well formed: `start < end <= of`.
    pub fn is_valid(&self) -> bool {
        self.start < self.end && self.end <= self.of
    }
}

impl std::fmt::Display for ShardRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.end == self.start + 1 {
            write!(f, "shard {}/{}", self.start, self.of)
        } else {
            write!(f, "shards {}..{} of {}", self.start, self.end, self.of)
        }
    }
}

/// Size and checksum of one dataset file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Size in bytes.
    pub bytes: u64,
    /// xxh3-64 of the contents, lower-case hex.
    pub xxh3_64: String,
}

/// Row and token counts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Rows of groups.arrow.
    pub groups: u64,
    /// Rows of passages.arrow (unique passages).
    pub passages: u64,
    /// Rows of prompts.arrow.
    pub prompts: u64,
    /// Passage references (sum of |pos| + |neg| over groups), before dedup.
    pub passage_refs: u64,
    /// Total query tokens.
    pub query_tokens: u64,
    /// Total tokens of the unique passages.
    pub passage_tokens: u64,
    /// Total tokens the passage references would hold without dedup.
    pub passage_ref_tokens: u64,
}

impl Counts {
    /// Passage references per stored passage (>= 1; 1 means nothing repeated).
    pub fn dedup_ratio(&self) -> f64 {
        if self.passages == 0 {
            1.0
        } else {
            self.passage_refs as f64 / self.passages as f64
        }
    }
}

/// The contents of manifest.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT_NAME`].
    pub format: String,
    /// Format version; see [`SUPPORTED_VERSIONS`].
    pub format_version: u32,
    /// rankfeed version that wrote the dataset.
    pub tool_version: String,
    /// Rows per record batch in every .arrow file.
    pub rows_per_batch: u64,
    /// Row and token counts.
    pub counts: Counts,
    /// Tokenizer facts; `None` for datasets written from pre-tokenized ids.
    pub tokenizer: Option<TokenizerFacts>,
    /// Text formatting used at conversion.
    pub text: TextSettings,
    /// Per-source statistics, indexed by source id.
    pub sources: Vec<SourceStats>,
    /// Which shards of a sharded conversion this dataset holds; absent for a whole
    /// conversion (and for merged shards that add up to one). See [`ShardRange`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shards: Option<ShardRange>,
    /// How a derived dataset was made (`rankfeed mine` records its settings and the seal of
    /// the dataset it read); absent for conversions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provenance: Option<serde_json::Value>,
    /// Size and checksum of each .arrow file (and rejects.jsonl when present).
    pub files: BTreeMap<String, FileEntry>,
    /// The seal: xxh3-64 of the manifest's bytes with this value zeroed (see the module docs).
    /// Always the last field.
    #[serde(default)]
    pub checksum: String,
}

const SEAL_KEY: &[u8] = b"\"checksum\": \"";
const SEAL_ZERO: &str = "0000000000000000";

/// Where the 16 seal digits sit in a manifest's bytes (the last `"checksum": "`).
fn seal_range(bytes: &[u8]) -> Option<std::ops::Range<usize>> {
    let start = bytes.windows(SEAL_KEY.len()).rposition(|w| w == SEAL_KEY)? + SEAL_KEY.len();
    let end = start + SEAL_ZERO.len();
    (bytes.get(end) == Some(&b'"')).then_some(start..end)
}

fn seal_of(bytes: &[u8], range: std::ops::Range<usize>) -> String {
    let mut zeroed = bytes.to_vec();
    zeroed[range].copy_from_slice(SEAL_ZERO.as_bytes());
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&zeroed))
}

/// Recompute the seal of pretty-printed manifest bytes in place; returns it. rankfeed never
/// edits a written manifest: this is for tests and tools that do so on purpose.
pub fn reseal(bytes: &mut [u8]) -> Result<String, String> {
    let range = seal_range(bytes).ok_or("no \"checksum\": \"<16 hex digits>\" field")?;
    let sum = seal_of(bytes, range.clone());
    bytes[range].copy_from_slice(sum.as_bytes());
    Ok(sum)
}

impl Manifest {
    /// The manifest file's bytes, sealed, and the manifest with its `checksum` set.
    pub fn seal(mut self) -> Result<(Vec<u8>, Manifest), serde_json::Error> {
        self.checksum = SEAL_ZERO.into();
        let mut bytes = serde_json::to_vec_pretty(&self)?;
        self.checksum = reseal(&mut bytes).map_err(serde::ser::Error::custom)?;
        Ok((bytes, self))
    }

    /// Check the seal of manifest bytes whose parsed `checksum` is `parsed`: `Err` says why
    /// it does not hold.
    pub fn check_seal(bytes: &[u8], parsed: &str) -> Result<(), String> {
        let range = seal_range(bytes).ok_or("no \"checksum\" (the manifest is not sealed)")?;
        let stored = std::str::from_utf8(&bytes[range.clone()]).unwrap_or("");
        if stored != parsed {
            return Err("the \"checksum\" field is not the manifest's last".into());
        }
        let sum = seal_of(bytes, range);
        if sum != stored {
            return Err(format!(
                "checksum {sum} of the manifest differs from the one it records, {stored} \
                 (the manifest was changed after it was written)"
            ));
        }
        Ok(())
    }
}
