//! JSON/JSONL -> dataset: read, check, format, deduplicate, tokenize, write.
//!
//! Pipeline (three stages joined by bounded channels, input order preserved):
//! ```text
//! prepare thread:  files -> rows (parse + check, texts borrowed from the line) -> format ->
//!                  dedup passages by 128-bit hash -> jobs: the chunk's queries, new passages
//!                  and new prompts, plus each row's passage ids
//! tokenize thread: one parallel encode_batch per job (rayon)
//! main thread:     append to the dataset writer; rejects; progress
//! ```
//! Only texts that must be tokenized are copied out of the input buffer; a repeated passage
//! costs one hash and one table probe.
//! The dedup table maps xxh3-128 of each formatted passage text to its id (16 + 4 bytes per
//! unique passage; a collision needs ~2^64 passages). It is the only state that grows with
//! the data. Passage ids are assigned in first-appearance order, so the output does not depend
//! on the number of threads.

pub mod parquet_rows;
pub mod row;
pub mod source;
pub mod text;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Error, RejectReason, Result, RowError};
use crate::format::{self, Manifest, ShardRange, SourceStats, TextSettings};
use crate::tokenizer::TextTokenizer;
use crate::writer::{DatasetWriter, GroupRecord, KeyIds, ManifestInfo, WriterOptions};

use row::{parse_row, InputRow};
use source::{Record, SourceFile};
use text::{unescape_format, Formatter};

/// What to do with a bad input row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnError {
    /// Stop at the first bad row; nothing is written.
    #[default]
    Fail,
    /// Skip it, record it in rejects.jsonl and the manifest, and go on.
    Skip,
}

/// Text formatting options, named after FlagEmbedding's arguments.
#[derive(Debug, Clone)]
pub struct TextOptions {
    /// `query_instruction_for_rerank`.
    pub query_instruction: Option<String>,
    /// `query_instruction_format` (a literal `\n` becomes a newline).
    pub query_instruction_format: String,
    /// `passage_instruction_for_rerank`.
    pub passage_instruction: Option<String>,
    /// `passage_instruction_format`.
    pub passage_instruction_format: String,
    /// `sep_token` (taken literally).
    pub sep_token: String,
    /// Overrides the default prompt of both LLM modes.
    pub default_prompt: Option<String>,
    /// Which row fields give per-row instructions (see [`format::Convention`]).
    pub convention: format::Convention,
}

impl Default for TextOptions {
    fn default() -> Self {
        TextOptions {
            query_instruction: None,
            query_instruction_format: format::DEFAULT_INSTRUCTION_FORMAT.into(),
            passage_instruction: None,
            passage_instruction_format: format::DEFAULT_INSTRUCTION_FORMAT.into(),
            sep_token: format::DEFAULT_SEP_TOKEN.into(),
            default_prompt: None,
            convention: format::Convention::Reranker,
        }
    }
}

/// Options of [`convert`].
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Text formatting.
    pub text: TextOptions,
    /// Bad-row policy.
    pub on_error: OnError,
    /// Output options.
    pub writer: WriterOptions,
    /// Rows per processing chunk (tokenized as one parallel batch).
    pub chunk_rows: usize,
    /// `(k, n)`: convert only the k-th of n equal byte ranges of the inputs (after directory
    /// expansion; line-aligned, see [`source::plan_shard`]), so n tasks can convert a corpus,
    /// even one large file, in parallel, and `merge` joins their outputs into exactly the
    /// single conversion's dataset.
    pub shard: Option<(usize, usize)>,
    /// Longest line (JSON lines) or array element (JSON array) read; a longer one is a
    /// `line_too_long` row error under the policy, and memory stays bounded by this.
    pub max_line_bytes: usize,
    /// Set to `true` (from a progress callback, a signal handler, another thread) to stop the
    /// conversion: it returns [`Error::Interrupted`] within one chunk, nothing is written.
    pub cancel: Option<Arc<AtomicBool>>,
    /// Names to record for inputs under these local paths instead of the paths (inputs
    /// downloaded from object storage are recorded under their URLs): `(local, name)`, a
    /// source at `local/rest` is recorded as `name/rest`.
    pub input_names: Vec<(PathBuf, String)>,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            text: TextOptions::default(),
            on_error: OnError::Fail,
            writer: WriterOptions::default(),
            chunk_rows: 1024,
            shard: None,
            max_line_bytes: source::DEFAULT_MAX_LINE_BYTES,
            cancel: None,
            input_names: Vec::new(),
        }
    }
}

/// The name recorded for a source at `path` (see [`ConvertOptions::input_names`]).
fn recorded_name(path: &Path, names: &[(PathBuf, String)]) -> String {
    for (local, name) in names {
        if let Ok(rest) = path.strip_prefix(local) {
            return if rest.as_os_str().is_empty() {
                name.clone()
            } else {
                format!("{name}/{}", rest.display())
            };
        }
    }
    path.display().to_string()
}

/// Progress of a running conversion.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// Raw input bytes read so far.
    pub bytes_read: u64,
    /// Raw input bytes in total.
    pub bytes_total: u64,
    /// Rows processed (accepted + rejected).
    pub rows: u64,
    /// Rows rejected.
    pub rejected: u64,
    /// Tokens produced.
    pub tokens: u64,
    /// Time since the start.
    pub elapsed: Duration,
}

/// The outcome of [`convert`].
#[derive(Debug, Clone)]
pub struct ConvertReport {
    /// The manifest written.
    pub manifest: Manifest,
    /// Wall time.
    pub elapsed: Duration,
    /// Texts sent to the tokenizer (queries, unique passages, prompts).
    pub texts_tokenized: u64,
    /// Tokens the tokenizer produced.
    pub tokens_tokenized: u64,
    /// Time spent inside the tokenizer.
    pub tokenize_time: Duration,
    /// Stale staging directories of dead processes removed before writing.
    pub cleaned: Vec<PathBuf>,
    /// Things the user should know (a file a shard had to convert whole).
    pub warnings: Vec<String>,
}

/// Size rayon's global pool, which the tokenizer uses. Only the first configuration in a process
/// takes effect; later calls return an error saying so.
pub fn configure_threads(n: usize) -> std::result::Result<(), String> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .map_err(|e| e.to_string())
}

/// Per-source counts kept by the prepare stage.
#[derive(Default, Clone)]
struct ReadStats {
    rows_read: u64,
    rejected: BTreeMap<RejectReason, u64>,
    blank_lines: u64,
    unknown_fields: BTreeMap<String, u64>,
    batch_size: Option<u64>,
}

/// A row waiting for its query tokens: passage ids already resolved.
struct Pending {
    source: u32,
    refs: std::ops::Range<usize>,
    n_pos: usize,
    pos_scores: Option<Vec<f32>>,
    neg_scores: Option<Vec<f32>>,
    prompt: Option<u32>,
}

/// One chunk of rows, ready to tokenize, then to write.
#[derive(Default)]
struct Job {
    /// Queries (one per pending row) while filling; then new passages and new prompts are
    /// appended by [`Job::assemble`], which is the order they are tokenized in.
    texts: Vec<String>,
    new_passages: Vec<String>,
    new_prompts: Vec<String>,
    n_queries: usize,
    n_passages: usize,
    refs: Vec<i32>,
    pending: Vec<Pending>,
    /// Rows rejected in this chunk (skip policy), in order.
    rejects: Vec<RowError>,
    /// The first bad row under the fail policy: the job ends there.
    fail: Option<RowError>,
}

impl Job {
    fn rows(&self) -> usize {
        self.pending.len() + self.rejects.len()
    }

    fn assemble(mut self) -> Job {
        self.n_queries = self.texts.len();
        self.n_passages = self.new_passages.len();
        self.texts.append(&mut self.new_passages);
        self.texts.append(&mut self.new_prompts);
        self
    }
}

/// Tokens of a job's texts, and the time the tokenizer took.
type Tokenized = (Job, Result<Vec<Vec<i32>>>, Duration);

/// Convert `inputs` into a dataset at `out`. `progress` is called about ten times a second.
pub fn convert(
    inputs: &[PathBuf],
    tokenizer: &TextTokenizer,
    out: &Path,
    options: &ConvertOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<ConvertReport> {
    let start = Instant::now();
    let (sources, warnings) = plan_sources(inputs, options.shard)?;
    let text = text_settings(&options.text, tokenizer)?;
    let mut preparer = Preparer::new(&text, options)?;
    let mut writer = DatasetWriter::create(out, options.writer.clone())?;
    let defaults =
        tokenizer.encode_batch(&[&text.default_prompt_llm, &text.default_prompt_matryoshka])?;
    for tokens in &defaults {
        writer.add_prompt(tokens)?;
    }
    let mut sink = Sink {
        writer: &mut writer,
        accepted: vec![0; sources.len()],
        empty_neg: vec![0; sources.len()],
        rows: 0,
        rejected: 0,
        texts_tokenized: defaults.len() as u64,
        tokens_tokenized: defaults.iter().map(|d| d.len() as u64).sum(),
        tokenize_time: Duration::ZERO,
        cancel: options.cancel.clone(),
        passage_ids: Vec::new(),
        prompt_ids: Vec::new(),
    };
    let read_stats = run_pipeline(&sources, &mut preparer, tokenizer, &mut sink, &mut |p| {
        progress(&Progress {
            elapsed: start.elapsed(),
            ..p.clone()
        })
    })?;
    let stats = source_stats(&sources, read_stats, &sink, options)?;
    let (texts_tokenized, tokens_tokenized, tokenize_time) = (
        sink.texts_tokenized,
        sink.tokens_tokenized,
        sink.tokenize_time,
    );
    let cleaned = writer.cleaned().to_vec();
    let manifest = writer.finish(ManifestInfo {
        tokenizer: Some(tokenizer.facts().clone()),
        text,
        sources: stats,
        shards: options
            .shard
            .and_then(|(k, n)| ShardRange::partial(k as u64, k as u64 + 1, n as u64)),
    })?;
    Ok(ConvertReport {
        manifest,
        elapsed: start.elapsed(),
        texts_tokenized,
        tokens_tokenized,
        tokenize_time,
        cleaned,
        warnings,
    })
}

/// The input files, and what this shard reads of each (with warnings).
fn plan_sources(
    inputs: &[PathBuf],
    shard: Option<(usize, usize)>,
) -> Result<(Vec<SourceFile>, Vec<String>)> {
    let mut sources = source::discover(inputs)?;
    let warnings = match shard {
        Some((k, n)) if n == 0 || k >= n => {
            return Err(Error::argument(
                "shard",
                format!("{k}/{n}: need 0 <= k < n"),
            ))
        }
        Some((k, n)) => source::plan_shard(&mut sources, k, n)?,
        None => Vec::new(),
    };
    Ok((sources, warnings))
}

/// The text settings recorded in the manifest, formats unescaped, sep tokenized.
fn text_settings(t: &TextOptions, tokenizer: &TextTokenizer) -> Result<TextSettings> {
    let mut text = TextSettings {
        query_instruction: t.query_instruction.clone(),
        query_instruction_format: unescape_format(&t.query_instruction_format),
        passage_instruction: t.passage_instruction.clone(),
        passage_instruction_format: unescape_format(&t.passage_instruction_format),
        sep_token: t.sep_token.clone(),
        sep_ids: tokenizer.encode(&t.sep_token)?,
        convention: t.convention,
        ..TextSettings::default()
    };
    if let Some(p) = &t.default_prompt {
        text.default_prompt_llm = p.clone();
        text.default_prompt_matryoshka = p.clone();
    }
    Ok(text)
}

/// The three stages (prepare, tokenize, write: see the module docs), joined; the prepare
/// stage's counts per source.
fn run_pipeline(
    sources: &[SourceFile],
    preparer: &mut Preparer,
    tokenizer: &TextTokenizer,
    sink: &mut Sink<'_>,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Vec<ReadStats>> {
    let bytes_total: u64 = sources.iter().map(|s| s.part_bytes()).sum();
    let bytes_read = Arc::new(AtomicU64::new(0));
    let (job_tx, job_rx) = sync_channel::<Job>(2);
    let (done_tx, done_rx) = sync_channel::<Tokenized>(2);
    let (read_result, write_result) = std::thread::scope(|scope| {
        let prepare = scope.spawn(|| preparer.run(sources, bytes_read.clone(), job_tx));
        let tokenize = scope.spawn(move || {
            for job in job_rx {
                let t0 = Instant::now();
                let texts: Vec<&str> = job.texts.iter().map(String::as_str).collect();
                let tokens = tokenizer.encode_batch(&texts);
                if done_tx.send((job, tokens, t0.elapsed())).is_err() {
                    return;
                }
            }
        });
        let write_result = sink.run(done_rx, &mut |s: &Sink<'_>| {
            progress(&Progress {
                bytes_read: bytes_read.load(Ordering::Relaxed),
                bytes_total,
                rows: s.rows,
                rejected: s.rejected,
                tokens: s.tokens_tokenized,
                elapsed: Duration::ZERO,
            })
        });
        let tokenized = tokenize.join().map_err(|p| panicked("tokenize", p));
        let prepared = prepare.join().map_err(|p| panicked("prepare", p));
        (prepared.and_then(|r| r), tokenized.and(write_result))
    });
    write_result?;
    read_result
}

/// Per-source statistics for the manifest; every row read is accounted for.
fn source_stats(
    sources: &[SourceFile],
    read_stats: Vec<ReadStats>,
    sink: &Sink<'_>,
    options: &ConvertOptions,
) -> Result<Vec<SourceStats>> {
    let sharded = options.shard.is_some();
    let mut stats = Vec::with_capacity(sources.len());
    for (i, (src, rs)) in sources.iter().zip(read_stats).enumerate() {
        if rs.rows_read == 0 && !sharded {
            return Err(Error::input(&src.path, "no rows (empty input)"));
        }
        let rows_rejected: u64 = rs.rejected.values().sum();
        if rs.rows_read != sink.accepted[i] + rows_rejected {
            return Err(Error::Internal(format!(
                "{}: count mismatch: read {} rows, accepted {} + rejected {}",
                src.path.display(),
                rs.rows_read,
                sink.accepted[i],
                rows_rejected
            )));
        }
        stats.push(SourceStats {
            id: i as u32,
            path: recorded_name(&src.path, &options.input_names),
            bytes: src.bytes,
            rows_read: rs.rows_read,
            rows_accepted: sink.accepted[i],
            rows_rejected,
            rejected_by_reason: rs
                .rejected
                .iter()
                .map(|(k, v)| (k.as_str().to_string(), *v))
                .collect(),
            rows_empty_neg: sink.empty_neg[i],
            blank_lines: rs.blank_lines,
            unknown_fields: rs.unknown_fields,
            batch_size: rs.batch_size,
        });
    }
    Ok(stats)
}

/// The error for a pipeline thread that panicked (a bug: input never makes rankfeed panic).
fn panicked(stage: &str, payload: Box<dyn std::any::Any + Send>) -> Error {
    let what = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    Error::Internal(format!("the {stage} thread of convert panicked: {what}"))
}

/// The prepare stage: parse, check, format, deduplicate.
struct Preparer {
    convention: format::Convention,
    query_fmt: Formatter,
    passage_fmt: Formatter,
    /// xxh3-128 of a formatted passage text -> its text id (the order texts are tokenized in).
    dedup: KeyIds,
    prompt_ids: HashMap<String, u32>,
    next_passage: u32,
    policy: OnError,
    chunk_rows: usize,
    max_line_bytes: usize,
    /// What stopped reading other than a row (a dedup table full).
    error: Option<Error>,
}

impl Preparer {
    fn new(text: &TextSettings, options: &ConvertOptions) -> Result<Preparer> {
        Ok(Preparer {
            convention: text.convention,
            query_fmt: Formatter::new(
                text.query_instruction.clone(),
                &text.query_instruction_format,
            )?,
            passage_fmt: Formatter::new(
                text.passage_instruction.clone(),
                &text.passage_instruction_format,
            )?,
            dedup: KeyIds::default(),
            error: None,
            prompt_ids: HashMap::new(),
            next_passage: 0,
            policy: options.on_error,
            chunk_rows: options.chunk_rows.max(1),
            max_line_bytes: options.max_line_bytes,
        })
    }

    /// Every source in order; jobs of `chunk_rows` rows go to `tx`.
    fn run(
        &mut self,
        sources: &[SourceFile],
        bytes_read: Arc<AtomicU64>,
        tx: SyncSender<Job>,
    ) -> Result<Vec<ReadStats>> {
        let mut all = vec![ReadStats::default(); sources.len()];
        let mut job = Job::default();
        let mut stop = false;
        for (id, src) in sources.iter().enumerate() {
            let st = &mut all[id];
            let id = id as u32;
            if src.layout == source::Layout::Parquet {
                let groups = match &src.part {
                    source::Part::Nothing => continue,
                    source::Part::RowGroups(g) => Some(&g[..]),
                    _ => None,
                };
                let mut unknown = std::mem::take(&mut st.unknown_fields);
                parquet_rows::read_parquet_rows(&src.path, groups, &mut unknown, &mut |row| {
                    self.take(&mut job, st, id, row, &tx, &mut stop)
                })?;
                st.unknown_fields = unknown;
                bytes_read.fetch_add(src.part_bytes(), Ordering::Relaxed);
            } else {
                let max = self.max_line_bytes;
                source::read_records(src, bytes_read.clone(), max, &mut |rec| {
                    let row = match rec {
                        Record::Blank => {
                            st.blank_lines += 1;
                            return true;
                        }
                        Record::Row(bytes, pos) => parse_row(bytes, &pos, &mut st.unknown_fields),
                        Record::Broken(e) => Err(e),
                        Record::TooLong(pos, len) => Err(Record::too_long(pos, len, max)),
                    };
                    self.take(&mut job, st, id, row, &tx, &mut stop)
                })?;
            }
            if stop {
                break;
            }
        }
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        if job.rows() > 0 {
            let _ = tx.send(job.assemble());
        }
        Ok(all)
    }

    /// Add one row (or its rejection) to `job`; send the job when full. Returns whether to go
    /// on (false after a failure under the fail policy, or when the consumer is gone).
    fn take(
        &mut self,
        job: &mut Job,
        st: &mut ReadStats,
        source: u32,
        row: std::result::Result<InputRow<'_>, RowError>,
        tx: &SyncSender<Job>,
        stop: &mut bool,
    ) -> bool {
        st.rows_read += 1;
        match row {
            Ok(row) => {
                st.batch_size = st.batch_size.or(row.batch_size);
                if let Err(e) = self.add_row(job, source, row) {
                    // The job holds part of this row: it is not sent, and reading stops.
                    self.error = Some(e);
                    *stop = true;
                    return false;
                }
            }
            Err(e) => {
                *st.rejected.entry(e.reason).or_default() += 1;
                match self.policy {
                    OnError::Skip => job.rejects.push(e),
                    OnError::Fail => {
                        job.fail = Some(e);
                        *stop = true;
                    }
                }
            }
        }
        if (job.rows() >= self.chunk_rows || *stop)
            && tx.send(std::mem::take(job).assemble()).is_err()
        {
            *stop = true;
        }
        !*stop
    }

    fn add_row(&mut self, job: &mut Job, source: u32, row: InputRow<'_>) -> Result<()> {
        let (query_prompt, passage_prompt) = match self.convention {
            format::Convention::Reranker => {
                (row.query_prompt.as_deref(), row.passage_prompt.as_deref())
            }
            format::Convention::Embedder => (row.prompt.as_deref(), None),
        };
        job.texts
            .push(self.query_fmt.apply(&row.query, query_prompt).into_owned());
        let start = job.refs.len();
        for p in row.pos.iter().chain(&row.neg) {
            let text = self.passage_fmt.apply(p, passage_prompt);
            let key = xxhash_rust::xxh3::xxh3_128(text.as_bytes());
            let id = match self.dedup.get(key) {
                Some(id) => id,
                None => {
                    // Text ids become passage ids (int32) once tokenized.
                    let id = self.next_passage;
                    if id > i32::MAX as u32 {
                        return Err(Error::argument("inputs", "more than 2^31 unique passages"));
                    }
                    job.new_passages.push(text.into_owned());
                    self.dedup.insert(key, id)?;
                    self.next_passage += 1;
                    id
                }
            };
            job.refs.push(id as i32);
        }
        let prompt = row.prompt.map(|p| {
            let next = self.prompt_ids.len() as u32 + 2;
            *self
                .prompt_ids
                .entry(p.into_owned())
                .or_insert_with_key(|p| {
                    job.new_prompts.push(p.clone());
                    next
                })
        });
        job.pending.push(Pending {
            source,
            refs: start..job.refs.len(),
            n_pos: row.pos.len(),
            pos_scores: row.pos_scores,
            neg_scores: row.neg_scores,
            prompt,
        });
        Ok(())
    }
}

/// The write stage.
struct Sink<'a> {
    writer: &'a mut DatasetWriter,
    accepted: Vec<u64>,
    empty_neg: Vec<u64>,
    rows: u64,
    rejected: u64,
    texts_tokenized: u64,
    tokens_tokenized: u64,
    tokenize_time: Duration,
    cancel: Option<Arc<AtomicBool>>,
    /// The writer's id of each distinct passage *text* (the prepare stage's ids): texts that
    /// tokenize alike share one stored passage.
    passage_ids: Vec<i32>,
    /// The writer's id of each distinct row prompt text (prepare ids from 2 on).
    prompt_ids: Vec<u32>,
}

impl Sink<'_> {
    fn run(&mut self, rx: Receiver<Tokenized>, progress: &mut dyn FnMut(&Sink<'_>)) -> Result<()> {
        let mut last = Instant::now();
        for done in rx {
            self.write(done)?;
            if last.elapsed() >= Duration::from_millis(100) {
                progress(self);
                last = Instant::now();
            }
            self.check_cancel()?;
        }
        progress(self);
        self.check_cancel()
    }

    fn check_cancel(&self) -> Result<()> {
        match &self.cancel {
            Some(c) if c.load(Ordering::Relaxed) => Err(Error::Interrupted(format!(
                "conversion stopped after {} rows; nothing was written",
                self.rows
            ))),
            _ => Ok(()),
        }
    }

    fn write(&mut self, (job, tokens, took): Tokenized) -> Result<()> {
        let tokens = tokens?;
        self.tokenize_time += took;
        self.texts_tokenized += tokens.len() as u64;
        self.tokens_tokenized += tokens.iter().map(|t| t.len() as u64).sum::<u64>();
        let (query_tokens, rest) = tokens.split_at(job.n_queries);
        let (passage_tokens, prompt_tokens) = rest.split_at(job.n_passages);
        for t in passage_tokens {
            let id = self.writer.intern_passage(t)?;
            self.passage_ids.push(id as i32);
        }
        for t in prompt_tokens {
            let id = self.writer.intern_prompt(t)?;
            self.prompt_ids.push(id);
        }
        let mut refs = Vec::new();
        for (p, q) in job.pending.iter().zip(query_tokens) {
            refs.clear();
            refs.extend(
                job.refs[p.refs.clone()]
                    .iter()
                    .map(|&text_id| self.passage_ids[text_id as usize]),
            );
            let (pos, neg) = refs.split_at(p.n_pos);
            if neg.is_empty() {
                self.empty_neg[p.source as usize] += 1;
            }
            self.writer.add_group(&GroupRecord {
                query: q,
                pos,
                neg,
                pos_scores: p.pos_scores.as_deref(),
                neg_scores: p.neg_scores.as_deref(),
                prompt: p
                    .prompt
                    .map(|text_id| self.prompt_ids[text_id as usize - 2]),
                source: p.source,
            })?;
            self.accepted[p.source as usize] += 1;
        }
        self.rows += job.pending.len() as u64;
        for e in &job.rejects {
            self.writer.add_reject(e)?;
        }
        self.rows += job.rejects.len() as u64;
        self.rejected += job.rejects.len() as u64;
        if let Some(e) = job.fail {
            return Err(Error::Row(Box::new(e)));
        }
        Ok(())
    }
}
