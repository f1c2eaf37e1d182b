//! JSON/JSONL -> dataset: read, check, format, deduplicate, tokenize, write.
//!
//! Pipeline (bounded memory, input order preserved):
//! ```text
//! reader thread: files -> rows (parse + check) -> chunks of rows ──(bounded channel)──┐
//! main thread:   format texts -> dedup passages by 128-bit hash -> tokenize the chunk's
//!                queries + new passages + new prompts in one parallel batch -> write
//! ```
//! The dedup table maps xxh3-128 of each formatted passage text to its id (16 + 4 bytes per
//! unique passage; a collision needs ~2^64 passages). It is the only state that grows with
//! the data. Passage ids are assigned in first-appearance order, so the output does not depend
//! on the number of threads.

pub mod row;
pub mod source;
pub mod text;

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Error, RejectReason, Result, RowError};
use crate::format::{self, Manifest, SourceStats, TextSettings};
use crate::tokenizer::TextTokenizer;
use crate::writer::{DatasetWriter, GroupRecord, ManifestInfo, WriterOptions};

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
}

impl Default for TextOptions {
    fn default() -> Self {
        TextOptions {
            query_instruction: None,
            query_instruction_format: "{}{}".into(),
            passage_instruction: None,
            passage_instruction_format: "{}{}".into(),
            sep_token: "\n".into(),
            default_prompt: None,
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
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            text: TextOptions::default(),
            on_error: OnError::Fail,
            writer: WriterOptions::default(),
            chunk_rows: 1024,
        }
    }
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
}

/// Identity hasher for keys that are already hashes.
#[derive(Default)]
struct PreHashed(u64);

impl Hasher for PreHashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, _: &[u8]) {
        unreachable!("only u128 keys are hashed")
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = v as u64;
    }
}

type DedupMap = HashMap<u128, u32, BuildHasherDefault<PreHashed>>;

/// One item from the reader: a good row, or a rejected one.
enum Item {
    Row(u32, Box<InputRow>),
    Reject(Box<RowError>),
}

/// Per-source counts kept by the reader.
#[derive(Default, Clone)]
struct ReadStats {
    rows_read: u64,
    rejected: BTreeMap<RejectReason, u64>,
    blank_lines: u64,
    unknown_fields: BTreeMap<String, u64>,
}

/// Convert `inputs` into a dataset at `out`. `progress` is called about ten times a second.
pub fn convert(
    inputs: &[PathBuf],
    tokenizer: &TextTokenizer,
    out: &Path,
    options: &ConvertOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<ConvertReport> {
    let start = Instant::now();
    let sources = source::discover(inputs)?;
    let t = &options.text;
    let query_fmt = Formatter::new(
        t.query_instruction.clone(),
        &unescape_format(&t.query_instruction_format),
    )?;
    let passage_fmt = Formatter::new(
        t.passage_instruction.clone(),
        &unescape_format(&t.passage_instruction_format),
    )?;
    let mut writer = DatasetWriter::create(out, options.writer.clone())?;
    let mut text = TextSettings {
        query_instruction: t.query_instruction.clone(),
        query_instruction_format: unescape_format(&t.query_instruction_format),
        passage_instruction: t.passage_instruction.clone(),
        passage_instruction_format: unescape_format(&t.passage_instruction_format),
        sep_token: t.sep_token.clone(),
        sep_ids: tokenizer.encode(&t.sep_token)?,
        ..TextSettings::default()
    };
    if let Some(p) = &t.default_prompt {
        text.default_prompt_llm = p.clone();
        text.default_prompt_matryoshka = p.clone();
    }
    let defaults =
        tokenizer.encode_batch(&[&text.default_prompt_llm, &text.default_prompt_matryoshka])?;
    let mut prompt_ids: HashMap<String, u32> = HashMap::new();
    for (tokens, expected) in defaults.iter().zip([
        format::PROMPT_ID_LLM_DEFAULT,
        format::PROMPT_ID_MATRYOSHKA_DEFAULT,
    ]) {
        let id = writer.add_prompt(tokens)?;
        debug_assert_eq!(id, expected);
    }

    let bytes_total: u64 = sources.iter().map(|s| s.bytes).sum();
    let bytes_read = Arc::new(AtomicU64::new(0));
    let chunk_rows = options.chunk_rows.max(1);
    let policy = options.on_error;
    let (tx, rx) = sync_channel::<Vec<Item>>(2);

    let mut state = Converter {
        tokenizer,
        writer: &mut writer,
        query_fmt,
        passage_fmt,
        dedup: DedupMap::default(),
        prompt_ids: &mut prompt_ids,
        next_passage: 0,
        accepted: vec![0; sources.len()],
        empty_neg: vec![0; sources.len()],
        rejected: 0,
        texts_tokenized: 2,
        tokens_tokenized: defaults.iter().map(|d| d.len() as u64).sum(),
        tokenize_time: Duration::ZERO,
    };

    let (read_result, main_result) = std::thread::scope(|scope| {
        let reader = scope.spawn({
            let sources = &sources;
            let bytes_read = bytes_read.clone();
            move || read_all(sources, policy, chunk_rows, bytes_read, tx)
        });
        let main = state.run(&rx, policy, &mut |s: &Converter<'_>| {
            progress(&Progress {
                bytes_read: bytes_read.load(Ordering::Relaxed),
                bytes_total,
                rows: s.accepted.iter().sum::<u64>() + s.rejected,
                rejected: s.rejected,
                tokens: s.tokens_tokenized,
                elapsed: start.elapsed(),
            })
        });
        drop(rx);
        (reader.join().expect("reader thread does not panic"), main)
    });
    main_result?;
    let read_stats = read_result?;

    let mut stats = Vec::with_capacity(sources.len());
    for (i, (src, rs)) in sources.iter().zip(read_stats).enumerate() {
        if rs.rows_read == 0 {
            return Err(Error::Config(format!(
                "{}: no rows (empty input)",
                src.path.display()
            )));
        }
        let rows_rejected: u64 = rs.rejected.values().sum();
        stats.push(SourceStats {
            id: i as u32,
            path: src.path.display().to_string(),
            bytes: src.bytes,
            rows_read: rs.rows_read,
            rows_accepted: state.accepted[i],
            rows_rejected,
            rejected_by_reason: rs
                .rejected
                .iter()
                .map(|(k, v)| (k.as_str().to_string(), *v))
                .collect(),
            rows_empty_neg: state.empty_neg[i],
            blank_lines: rs.blank_lines,
            unknown_fields: rs.unknown_fields,
        });
        debug_assert_eq!(rs.rows_read, state.accepted[i] + rows_rejected);
    }
    let report_counts = (
        state.texts_tokenized,
        state.tokens_tokenized,
        state.tokenize_time,
    );
    drop(state);
    let info = ManifestInfo {
        tokenizer: Some(tokenizer.facts().clone()),
        text,
        sources: stats,
    };
    let manifest = writer.finish(info)?;
    Ok(ConvertReport {
        manifest,
        elapsed: start.elapsed(),
        texts_tokenized: report_counts.0,
        tokens_tokenized: report_counts.1,
        tokenize_time: report_counts.2,
    })
}

/// The reader thread: every source in order, rows checked, sent in chunks.
fn read_all(
    sources: &[SourceFile],
    policy: OnError,
    chunk_rows: usize,
    bytes_read: Arc<AtomicU64>,
    tx: std::sync::mpsc::SyncSender<Vec<Item>>,
) -> Result<Vec<ReadStats>> {
    let mut all = Vec::with_capacity(sources.len());
    let mut chunk = Vec::with_capacity(chunk_rows);
    let mut receiver_gone = false;
    for (id, src) in sources.iter().enumerate() {
        let id = id as u32;
        let mut st = ReadStats::default();
        let mut stop = false;
        source::read_records(src, bytes_read.clone(), &mut |rec| {
            let item = match rec {
                Record::Blank => {
                    st.blank_lines += 1;
                    return true;
                }
                Record::Row(bytes, pos) => match parse_row(bytes, &pos, &mut st.unknown_fields) {
                    Ok(row) => Item::Row(id, Box::new(row)),
                    Err(e) => Item::Reject(Box::new(e)),
                },
                Record::Broken(e) => Item::Reject(Box::new(e)),
            };
            st.rows_read += 1;
            if let Item::Reject(e) = &item {
                *st.rejected.entry(e.reason).or_default() += 1;
                stop = policy == OnError::Fail;
            }
            chunk.push(item);
            if chunk.len() >= chunk_rows || stop {
                let full = std::mem::replace(&mut chunk, Vec::with_capacity(chunk_rows));
                if tx.send(full).is_err() {
                    receiver_gone = true;
                    return false;
                }
            }
            !stop
        })?;
        all.push(st);
        if stop || receiver_gone {
            break;
        }
    }
    if !chunk.is_empty() {
        let _ = tx.send(chunk);
    }
    all.resize(sources.len(), ReadStats::default());
    Ok(all)
}

/// The main-thread state: dedup, tokenize, write.
struct Converter<'a> {
    tokenizer: &'a TextTokenizer,
    writer: &'a mut DatasetWriter,
    query_fmt: Formatter,
    passage_fmt: Formatter,
    dedup: DedupMap,
    prompt_ids: &'a mut HashMap<String, u32>,
    next_passage: u32,
    accepted: Vec<u64>,
    empty_neg: Vec<u64>,
    rejected: u64,
    texts_tokenized: u64,
    tokens_tokenized: u64,
    tokenize_time: Duration,
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

/// The texts of one chunk to tokenize, and what to write once they are.
struct Job {
    /// Queries (one per pending row), then new passages, then new prompts.
    texts: Vec<String>,
    n_queries: usize,
    n_passages: usize,
    refs: Vec<i32>,
    pending: Vec<Pending>,
}

impl Converter<'_> {
    /// Main loop: chunks from the reader are deduplicated here (in order), tokenized on
    /// another thread (rayon inside), and written here, so dedup and writing of one chunk
    /// overlap the tokenization of the next.
    fn run(
        &mut self,
        rx: &Receiver<Vec<Item>>,
        policy: OnError,
        progress: &mut dyn FnMut(&Converter<'_>),
    ) -> Result<()> {
        let tokenizer = self.tokenizer;
        let (job_tx, job_rx) = sync_channel::<Job>(1);
        // Unbounded, but never holds more than the jobs in flight (at most 3).
        let (done_tx, done_rx) =
            std::sync::mpsc::channel::<(Job, Result<Vec<Vec<i32>>>, Duration)>();
        std::thread::scope(|scope| {
            scope.spawn(move || {
                for job in job_rx {
                    let t0 = Instant::now();
                    let texts: Vec<&str> = job.texts.iter().map(String::as_str).collect();
                    let tokens = tokenizer.encode_batch(&texts);
                    if done_tx.send((job, tokens, t0.elapsed())).is_err() {
                        return;
                    }
                }
            });
            let mut last = Instant::now();
            let mut in_flight = 0usize;
            let result = (|| -> Result<()> {
                for chunk in rx.iter() {
                    let job = self.prepare(chunk, policy)?;
                    // Write whatever is done before queueing more (keeps memory bounded).
                    while in_flight > 0 {
                        match done_rx.try_recv() {
                            Ok(done) => {
                                in_flight -= 1;
                                self.write(done)?;
                            }
                            Err(_) => break,
                        }
                    }
                    if job_tx.send(job).is_err() {
                        break;
                    }
                    in_flight += 1;
                    if last.elapsed() >= Duration::from_millis(100) {
                        progress(self);
                        last = Instant::now();
                    }
                }
                drop(job_tx);
                while in_flight > 0 {
                    let done = done_rx.recv().expect("tokenizer thread answers every job");
                    in_flight -= 1;
                    self.write(done)?;
                }
                Ok(())
            })();
            progress(self);
            result
        })
    }

    /// Format, deduplicate and resolve ids for one chunk; collect the texts to tokenize.
    fn prepare(&mut self, items: Vec<Item>, policy: OnError) -> Result<Job> {
        let mut queries: Vec<String> = Vec::with_capacity(items.len());
        let mut new_passages: Vec<String> = Vec::new();
        let mut new_prompts: Vec<String> = Vec::new();
        let mut refs: Vec<i32> = Vec::new();
        let mut pending: Vec<Pending> = Vec::with_capacity(items.len());
        let first_prompt = self.prompt_ids.len() as u32 + 2;
        for item in items {
            let row = match item {
                Item::Row(s, r) => (s, r),
                Item::Reject(e) => {
                    self.rejected += 1;
                    match policy {
                        OnError::Fail => return Err(Error::Row(e)),
                        OnError::Skip => {
                            self.writer.add_reject(&e)?;
                            continue;
                        }
                    }
                }
            };
            let (source, row) = (row.0, *row.1);
            queries.push(
                self.query_fmt
                    .apply(&row.query, row.query_prompt.as_deref())
                    .into_owned(),
            );
            let start = refs.len();
            let n_pos = row.pos.len();
            for p in row.pos.into_iter().chain(row.neg) {
                let text = match self.passage_fmt.apply(&p, row.passage_prompt.as_deref()) {
                    std::borrow::Cow::Borrowed(_) => p,
                    std::borrow::Cow::Owned(t) => t,
                };
                let key = xxhash_rust::xxh3::xxh3_128(text.as_bytes());
                let id = *self.dedup.entry(key).or_insert_with(|| {
                    new_passages.push(text);
                    self.next_passage += 1;
                    self.next_passage - 1
                });
                refs.push(id as i32);
            }
            let prompt = row.prompt.map(|p| {
                let next = first_prompt + new_prompts.len() as u32;
                *self.prompt_ids.entry(p).or_insert_with_key(|p| {
                    new_prompts.push(p.clone());
                    next
                })
            });
            pending.push(Pending {
                source,
                refs: start..refs.len(),
                n_pos,
                pos_scores: row.pos_scores,
                neg_scores: row.neg_scores,
                prompt,
            });
        }
        let (n_queries, n_passages) = (queries.len(), new_passages.len());
        let mut texts = queries;
        texts.extend(new_passages);
        texts.extend(new_prompts);
        Ok(Job {
            texts,
            n_queries,
            n_passages,
            refs,
            pending,
        })
    }

    /// Append a tokenized chunk to the dataset.
    fn write(&mut self, done: (Job, Result<Vec<Vec<i32>>>, Duration)) -> Result<()> {
        let (job, tokens, took) = done;
        let tokens = tokens?;
        self.tokenize_time += took;
        self.texts_tokenized += tokens.len() as u64;
        self.tokens_tokenized += tokens.iter().map(|t| t.len() as u64).sum::<u64>();
        let (query_tokens, rest) = tokens.split_at(job.n_queries);
        let (passage_tokens, prompt_tokens) = rest.split_at(job.n_passages);
        for t in passage_tokens {
            self.writer.add_passage(t)?;
        }
        for t in prompt_tokens {
            self.writer.add_prompt(t)?;
        }
        for (p, q) in job.pending.iter().zip(query_tokens) {
            let (pos, neg) = job.refs[p.refs.clone()].split_at(p.n_pos);
            if neg.is_empty() {
                self.empty_neg[p.source as usize] += 1;
            }
            self.writer.add_group(&GroupRecord {
                query: q,
                pos,
                neg,
                pos_scores: p.pos_scores.as_deref(),
                neg_scores: p.neg_scores.as_deref(),
                prompt: p.prompt,
                source: p.source,
            })?;
            self.accepted[p.source as usize] += 1;
        }
        Ok(())
    }
}
