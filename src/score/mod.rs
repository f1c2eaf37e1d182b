//! Teacher scores: every *unique* (query, passage) pair of a dataset scored once, in
//! length-sorted batches, sharded across ranks, resumable at any batch, and attached to a new
//! dataset as `pos_scores` / `neg_scores` (the input is never modified).
//!
//! **Unique pairs** ([`UniquePairs`]): a pair is a query (its tokens and prompt, so two rows
//! asking the same question with the same prompt share it) and a passage id (passages are
//! deduplicated at conversion). Pair ids are given in first-reference order: row by row, the
//! row's positives then its negatives. They depend on the dataset only, not on any setting.
//!
//! **Batches** ([`ScorePlan`]): the pairs as the model sees them, built by the loader's own
//! collator ([`Collator::pair`]: the pair template, truncation, prompt) under the loader
//! options given, sorted by length, longest first (ties by pair id), and cut into batches of at
//! most `batch_size` pairs, or with `max_tokens` as many as fit that many tokens (padded: pairs
//! x the first pair's padded length; packed: real tokens; a pair alone over the budget gets a
//! batch of its own). Sorted, a batch's pairs have nearly one length: inference pads little.
//! Only the collation settings, `batch_size`, `max_tokens`, `rank` and `world_size` matter; the
//! sampling settings are ignored. Global batch `b` belongs to rank `b % world_size`.
//!
//! **Logs** ([`ScoreLog`]): a rank appends each scored batch to
//! `WORK/scores-RANK-of-WORLD.log` (a JSON header line naming the dataset's seal and the plan,
//! then one record per batch: its pair ids and scores, checksummed). A restarted rank reads its
//! log, checks that it belongs to this dataset and plan (another is an error, never a mix),
//! drops a torn last record and resumes at the next batch. [`collect`] reads every rank's log
//! and gives the score of every pair, each exactly once; anything missing or repeated is an
//! error.
//!
//! **Attaching** ([`attach`]): the input verified in full, then its rows written in order with
//! the score of each slot's pair as `pos_scores` / `neg_scores` (every row gets both), all else
//! unchanged; passages interned in first-reference order as every derived dataset is (a dataset
//! rankfeed wrote keeps its ids). Scores must be finite. The manifest's provenance records the
//! input seal and a digest of the scores.

mod files;

pub use files::{content_key, export_pairs, read_scores, PairsMeta, PairsReport, PAIRS_KEY};

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::hash::BuildHasherDefault;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::collate::{Batch, Collator, Mode, Pair};
use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::format::{self, SourceStats};
use crate::options::Options;
use crate::writer::{DatasetWriter, ManifestInfo, PreHashed, WriterOptions};

/// Pairs per scoring batch unless `batch_size` says otherwise (Python's `rankfeed.score` and
/// the `rankfeed pairs` command): inference batches are larger than training groups.
pub const DEFAULT_BATCH_SIZE: usize = 64;

/// Every unique (query, passage) pair of a dataset, and the pair of every row's slots.
#[derive(Debug, Clone)]
pub struct UniquePairs {
    /// Per slot (rows in order; a row's positives, then its negatives): its pair.
    slots: Vec<u32>,
    /// Per pair: the first row holding it, and its passage id.
    first: Vec<(u32, u32)>,
}

impl UniquePairs {
    /// The pairs of `ds` (reads ids only, never passage tokens).
    pub fn build(ds: &Dataset) -> Result<UniquePairs> {
        if ds.len() > u32::MAX as usize {
            return Err(Error::argument(
                "dataset",
                format!("{} rows: scoring handles up to 2^32", ds.len()),
            ));
        }
        let mut ids: HashMap<u128, u32, BuildHasherDefault<PreHashed>> = HashMap::default();
        let mut slots = Vec::with_capacity(ds.manifest().counts.passage_refs as usize);
        let mut first = Vec::new();
        for row in 0..ds.len() {
            let g = ds.group_ids(row)?;
            let query = crate::audit::query_key(g.query, g.prompt);
            for &p in g.pos.iter().chain(g.neg) {
                let key = pair_key(query, p);
                let next = first.len();
                let id = *ids.entry(key).or_insert_with(|| next as u32);
                if id as usize == next {
                    if next == u32::MAX as usize {
                        return Err(Error::argument(
                            "dataset",
                            "more than 2^32 - 1 unique pairs",
                        ));
                    }
                    first.push((row as u32, p as u32));
                }
                slots.push(id);
            }
        }
        Ok(UniquePairs { slots, first })
    }

    /// Unique pairs.
    pub fn len(&self) -> usize {
        self.first.len()
    }

    /// Whether the dataset has no pair.
    pub fn is_empty(&self) -> bool {
        self.first.is_empty()
    }

    /// Pairs counted with repetition (every slot of every row).
    pub fn total(&self) -> usize {
        self.slots.len()
    }

    /// The first row holding pair `pair`, and its passage id.
    pub fn first(&self, pair: u32) -> (u32, u32) {
        self.first[pair as usize]
    }

    /// The pair of every slot, rows in order (a row's positives, then its negatives).
    pub fn slots(&self) -> &[u32] {
        &self.slots
    }
}

fn pair_key(query: u128, passage: i32) -> u128 {
    let mut bytes = [0u8; 20];
    bytes[..16].copy_from_slice(&query.to_le_bytes());
    bytes[16..].copy_from_slice(&passage.to_le_bytes());
    xxhash_rust::xxh3::xxh3_128(&bytes)
}

/// The options scoring uses from loader options: the collation settings, as one pair per row.
fn collation(ds: &Dataset, options: &Options) -> Result<Collator> {
    let mut o = options.clone();
    // A row of a scoring batch is one pair, and nothing is gathered.
    o.group_size = 1;
    o.knowledge_distillation = false;
    // (Sampling settings do not apply; the budget is the plan's, checked below.)
    o.max_tokens = None;
    o.length_grouped = None;
    o.same_source = false;
    let resolved = o.resolve(&ds.manifest().sources)?;
    if resolved.collate.mode == Mode::Embedder {
        return Err(Error::argument(
            "mode",
            "teacher scores are computed on (query, passage) pairs: use a pair mode \
             (encoder, llm or matryoshka) for the teacher's layout",
        ));
    }
    Collator::new(ds, resolved.collate)
}

/// The pair (first row holding it, passage id) as the model sees it.
fn pair_of<'a>(
    ds: &'a Dataset,
    collator: &'a Collator,
    (row, passage): (u32, u32),
) -> Result<Pair<'a>> {
    let g = ds.group_ids(row as usize)?;
    let prompt = collator.prompt_of(ds, g.prompt)?;
    Ok(collator.pair(g.query, ds.referenced_passage(passage as i32)?, prompt))
}

/// One batch of a plan: the pairs it holds and their collated arrays.
#[derive(Debug, Clone)]
pub struct PairBatch {
    /// Index of the batch among this rank's.
    pub index: u64,
    /// The pair ids, one per row of `batch`.
    pub pairs: Vec<u32>,
    /// The arrays (no selections, no teacher scores).
    pub batch: Batch,
}

/// What a rank scores: the unique pairs of a dataset, length-sorted and cut into batches.
#[derive(Debug)]
pub struct ScorePlan {
    ds: Arc<Dataset>,
    collator: Collator,
    pairs: UniquePairs,
    /// Per pair: its length as the model sees it.
    lens: Vec<u32>,
    /// Pair ids, longest pair first.
    order: Vec<u32>,
    /// Start of each global batch in `order`, then `order.len()`.
    starts: Vec<usize>,
    rank: u64,
    world_size: u64,
    /// Pairs each alone over `max_tokens`.
    over_budget: u64,
    digest: String,
}

/// Figures of a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanReport {
    /// Unique (query, passage) pairs: what is scored.
    pub unique_pairs: u64,
    /// Pairs counted with repetition (every row's positives and negatives).
    pub total_pairs: u64,
    /// Batches of all ranks.
    pub batches: u64,
    /// Batches of this rank.
    pub rank_batches: u64,
    /// Pairs of this rank.
    pub rank_pairs: u64,
    /// Real tokens of all pairs.
    pub tokens: u64,
    /// Tokens of the padded arrays of all batches (`tokens` when packed).
    pub padded_tokens: u64,
    /// Pairs each alone over `max_tokens` (given a batch of their own).
    pub over_budget: u64,
}

impl ScorePlan {
    /// The plan of `ds` under loader `options` (see the module docs); `ds` is verified in full
    /// first.
    pub fn new(ds: Arc<Dataset>, options: &Options) -> Result<ScorePlan> {
        let collator = collation(&ds, options)?;
        crate::limits::range(
            "batch_size",
            options.batch_size,
            1,
            crate::limits::BATCH_SIZE,
        )?;
        if let Some(t) = options.max_tokens {
            crate::limits::range("max_tokens", t, 1, crate::limits::MAX_TOKENS)?;
        }
        if options.world_size == 0 || options.rank >= options.world_size {
            return Err(Error::argument(
                "rank",
                format!(
                    "rank {} of world_size {}: the rank must be below the world size",
                    options.rank, options.world_size
                ),
            ));
        }
        ds.validate_whole("score")?;
        let pairs = UniquePairs::build(&ds)?;
        let mut lens = vec![0u32; pairs.len()];
        for (pair, len) in lens.iter_mut().enumerate() {
            *len = pair_of(&ds, &collator, pairs.first(pair as u32))?.len() as u32;
        }
        let mut order: Vec<u32> = (0..pairs.len() as u32).collect();
        order.sort_unstable_by_key(|&p| (std::cmp::Reverse(lens[p as usize]), p));
        let multiple = options.pad_to_multiple_of.unwrap_or(1);
        let padded = |len: u32| (len as usize).div_ceil(multiple) * multiple;
        let mut starts = vec![0usize];
        let mut over_budget = 0u64;
        let mut i = 0;
        while i < order.len() {
            let mut n = 0;
            let mut tokens = 0usize;
            let head = padded(lens[order[i] as usize]);
            while i + n < order.len() && n < options.batch_size {
                let len = lens[order[i + n] as usize] as usize;
                let fits = match options.max_tokens {
                    None => true,
                    Some(t) if options.packed => tokens + len <= t,
                    Some(t) => (n + 1) * head <= t,
                };
                if !fits {
                    break;
                }
                tokens += len;
                n += 1;
            }
            if n == 0 {
                over_budget += 1;
                n = 1;
            }
            i += n;
            starts.push(i);
        }
        let digest = {
            let mut h = xxhash_rust::xxh3::Xxh3::new();
            h.update(format!("{:?}", collator.options()).as_bytes());
            h.update(bytemuck::cast_slice(&order));
            for s in &starts {
                h.update(&(*s as u64).to_le_bytes());
            }
            h.update(&options.world_size.to_le_bytes());
            format!("{:016x}", h.digest())
        };
        Ok(ScorePlan {
            ds,
            collator,
            pairs,
            lens,
            order,
            starts,
            rank: options.rank,
            world_size: options.world_size,
            over_budget,
            digest,
        })
    }

    /// The unique pairs.
    pub fn pairs(&self) -> &UniquePairs {
        &self.pairs
    }

    /// The dataset.
    pub fn dataset(&self) -> &Arc<Dataset> {
        &self.ds
    }

    /// The collator the batches are built with.
    pub fn collator(&self) -> &Collator {
        &self.collator
    }

    /// Batches of all ranks.
    pub fn global_batches(&self) -> u64 {
        (self.starts.len() - 1) as u64
    }

    /// Batches of this rank.
    pub fn len(&self) -> u64 {
        let b = self.global_batches();
        (b + self.world_size - 1 - self.rank) / self.world_size
    }

    /// Whether this rank has nothing to score.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// This rank and the world size.
    pub fn shard(&self) -> (u64, u64) {
        (self.rank, self.world_size)
    }

    /// A digest of everything that decides the batches (settings, order, cuts, world size).
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// The pair ids of this rank's batch `index` (global batch `index * world + rank`).
    pub fn batch_pairs(&self, index: u64) -> Result<&[u32]> {
        if index >= self.len() {
            return Err(Error::argument(
                "batch",
                format!("batch {index} of a rank with {} batches", self.len()),
            ));
        }
        let b = (index * self.world_size + self.rank) as usize;
        Ok(&self.order[self.starts[b]..self.starts[b + 1]])
    }

    /// This rank's batch `index`, collated.
    pub fn batch(&self, index: u64) -> Result<PairBatch> {
        let ids = self.batch_pairs(index)?;
        let pairs = ids
            .iter()
            .map(|&p| pair_of(&self.ds, &self.collator, self.pairs.first(p)))
            .collect::<Result<Vec<_>>>()?;
        Ok(PairBatch {
            index,
            pairs: ids.to_vec(),
            batch: self.collator.collate_pairs(&pairs),
        })
    }

    /// The plan's figures.
    pub fn report(&self) -> Result<PlanReport> {
        let (mut tokens, mut padded) = (0u64, 0u64);
        let multiple = self.collator.options().pad_to_multiple_of.unwrap_or(1) as u64;
        for w in self.starts.windows(2) {
            let batch = &self.order[w[0]..w[1]];
            let head = self.lens[batch[0] as usize] as u64;
            tokens += batch
                .iter()
                .map(|&p| self.lens[p as usize] as u64)
                .sum::<u64>();
            padded += head.div_ceil(multiple) * multiple * batch.len() as u64;
        }
        if self.collator.options().packed {
            padded = tokens;
        }
        let rank_pairs = (0..self.len())
            .map(|i| self.batch_pairs(i).map(|b| b.len() as u64))
            .sum::<Result<u64>>()?;
        Ok(PlanReport {
            unique_pairs: self.pairs.len() as u64,
            total_pairs: self.pairs.total() as u64,
            batches: self.global_batches(),
            rank_batches: self.len(),
            rank_pairs,
            tokens,
            padded_tokens: padded,
            over_budget: self.over_budget,
        })
    }
}

/// The header line of a score log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct LogHeader {
    format: String,
    version: u32,
    /// The scored dataset's seal.
    seal: String,
    /// [`ScorePlan::digest`].
    plan: String,
    rank: u64,
    world_size: u64,
    /// Batches of this rank.
    batches: u64,
    /// Unique pairs of the dataset.
    pairs: u64,
}

const LOG_FORMAT: &str = "rankfeed-scores";
const LOG_VERSION: u32 = 1;
const RECORD_MAGIC: [u8; 4] = *b"RFSR";
/// Largest header line read.
const MAX_HEADER: usize = 1 << 16;

/// The log of rank `rank` of `world` in `work_dir`.
pub fn log_path(work_dir: &Path, rank: u64, world: u64) -> PathBuf {
    work_dir.join(format!("scores-{rank:05}-of-{world:05}.log"))
}

/// One rank's scores, appended batch by batch (see the module docs).
#[derive(Debug)]
pub struct ScoreLog {
    path: PathBuf,
    /// The plan's digest.
    plan: String,
    file: File,
    next: u64,
    batches: u64,
    /// Records dropped at open (a torn or damaged tail).
    dropped_bytes: u64,
}

/// One parsed record.
struct Record {
    index: u64,
    pairs: Vec<u32>,
    scores: Vec<f32>,
}

/// The records of a log's body from `bytes`, and the length of the valid prefix: parsing stops
/// at the first incomplete or damaged record.
fn parse_records(bytes: &[u8]) -> (Vec<Record>, usize) {
    let mut out = Vec::new();
    let mut at = 0usize;
    loop {
        let rest = &bytes[at..];
        if rest.len() < 16 || rest[..4] != RECORD_MAGIC {
            break;
        }
        let index = u64::from_le_bytes(rest[4..12].try_into().unwrap_or_default());
        let n = u32::from_le_bytes(rest[12..16].try_into().unwrap_or_default()) as usize;
        let body = 16 + n * 8;
        if rest.len() < body + 8 {
            break;
        }
        let sum = u64::from_le_bytes(rest[body..body + 8].try_into().unwrap_or_default());
        if xxhash_rust::xxh3::xxh3_64(&rest[..body]) != sum {
            break;
        }
        let word = |i: usize| -> [u8; 4] { rest[i..i + 4].try_into().unwrap_or_default() };
        let pairs = (0..n)
            .map(|k| u32::from_le_bytes(word(16 + 4 * k)))
            .collect();
        let scores = (0..n)
            .map(|k| f32::from_le_bytes(word(16 + 4 * n + 4 * k)))
            .collect();
        out.push(Record {
            index,
            pairs,
            scores,
        });
        at += body + 8;
    }
    (out, at)
}

/// The header and body of a log file.
fn read_log(path: &Path) -> Result<(LogHeader, Vec<u8>, usize)> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| Error::io(path, e))?;
    let end = memchr::memchr(b'\n', &bytes[..bytes.len().min(MAX_HEADER)])
        .ok_or_else(|| Error::corrupt(path, "no header line: not a rankfeed score log"))?;
    let header: LogHeader = serde_json::from_slice(&bytes[..end])
        .map_err(|e| Error::corrupt(path, format!("header: {e}")))?;
    if header.format != LOG_FORMAT || header.version != LOG_VERSION {
        return Err(Error::corrupt(
            path,
            format!(
                "a {} log, version {}: this build reads {LOG_FORMAT} version {LOG_VERSION}",
                header.format, header.version
            ),
        ));
    }
    Ok((header, bytes, end + 1))
}

impl ScoreLog {
    /// Open (or start) `plan`'s log in `work_dir`: a log of another dataset or plan is an
    /// error; one of this plan is checked record by record against the plan and resumed after
    /// its last complete record.
    pub fn open(work_dir: &Path, plan: &ScorePlan) -> Result<ScoreLog> {
        std::fs::create_dir_all(work_dir).map_err(|e| Error::io(work_dir, e))?;
        let (rank, world) = plan.shard();
        let path = log_path(work_dir, rank, world);
        let header = LogHeader {
            format: LOG_FORMAT.into(),
            version: LOG_VERSION,
            seal: plan.ds.manifest().checksum.clone(),
            plan: plan.digest.clone(),
            rank,
            world_size: world,
            batches: plan.len(),
            pairs: plan.pairs.len() as u64,
        };
        if !path.exists() {
            let mut line =
                serde_json::to_vec(&header).map_err(|e| Error::Internal(e.to_string()))?;
            line.push(b'\n');
            let tmp = path.with_extension("log.tmp");
            std::fs::write(&tmp, &line).map_err(|e| Error::io(&tmp, e))?;
            std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
        }
        let (found, bytes, body) = read_log(&path)?;
        if found != header {
            let what = if found.seal != header.seal {
                format!("dataset {} (this one is {})", found.seal, header.seal)
            } else {
                "other scoring settings (batch_size, max_tokens, lengths or layout)".to_string()
            };
            return Err(Error::input(
                &path,
                format!(
                    "holds scores of {what}: use another work_dir, or remove this one to start over"
                ),
            ));
        }
        let (records, valid) = parse_records(&bytes[body..]);
        for (k, r) in records.iter().enumerate() {
            let want = plan.batch_pairs(k as u64).ok();
            if r.index != k as u64 || want != Some(&r.pairs[..]) {
                return Err(Error::corrupt(
                    &path,
                    format!("record {k} does not hold the plan's batch {k}"),
                ));
            }
        }
        let keep = (body + valid) as u64;
        let file = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let dropped_bytes = bytes.len() as u64 - keep;
        if dropped_bytes > 0 {
            file.set_len(keep).map_err(|e| Error::io(&path, e))?;
        }
        let mut log = ScoreLog {
            path,
            plan: plan.digest.clone(),
            file,
            next: records.len() as u64,
            batches: plan.len(),
            dropped_bytes,
        };
        log.file
            .seek(SeekFrom::End(0))
            .map_err(|e| Error::io(&log.path, e))?;
        Ok(log)
    }

    /// The next batch to score (the batches before it are in the log).
    pub fn next(&self) -> u64 {
        self.next
    }

    /// Whether every batch of the rank is in the log.
    pub fn is_complete(&self) -> bool {
        self.next == self.batches
    }

    /// Bytes of a torn or damaged tail dropped at open.
    pub fn dropped_bytes(&self) -> u64 {
        self.dropped_bytes
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append the scores of `plan`'s batch `index` (it must be [`ScoreLog::next`]): one finite
    /// score per pair, in the batch's order.
    pub fn append(&mut self, plan: &ScorePlan, index: u64, scores: &[f32]) -> Result<()> {
        if index != self.next {
            return Err(Error::argument(
                "batch",
                format!("batch {index} scored, but batch {} is next", self.next),
            ));
        }
        if plan.digest != self.plan {
            return Err(Error::argument(
                "plan",
                format!("{} is the log of another plan", self.path.display()),
            ));
        }
        let pairs = plan.batch_pairs(index)?;
        if scores.len() != pairs.len() {
            return Err(Error::argument(
                "scores",
                format!(
                    "batch {index}: {} scores for {} pairs (one score per pair, in order)",
                    scores.len(),
                    pairs.len()
                ),
            ));
        }
        if let Some(k) = scores.iter().position(|s| !s.is_finite()) {
            return Err(Error::argument(
                "scores",
                format!(
                    "batch {index}: the score of pair {} (row {k} of the batch) is {}: teacher \
                     scores must be finite",
                    pairs[k], scores[k]
                ),
            ));
        }
        let n = scores.len();
        let mut rec = Vec::with_capacity(24 + 8 * n);
        rec.extend_from_slice(&RECORD_MAGIC);
        rec.extend_from_slice(&index.to_le_bytes());
        rec.extend_from_slice(&(n as u32).to_le_bytes());
        for p in pairs {
            rec.extend_from_slice(&p.to_le_bytes());
        }
        for s in scores {
            rec.extend_from_slice(&s.to_le_bytes());
        }
        let sum = xxhash_rust::xxh3::xxh3_64(&rec);
        rec.extend_from_slice(&sum.to_le_bytes());
        self.file
            .write_all(&rec)
            .map_err(|e| Error::io(&self.path, e))?;
        self.next += 1;
        if self.is_complete() {
            self.file
                .sync_data()
                .map_err(|e| Error::io(&self.path, e))?;
        }
        Ok(())
    }
}

/// The logs of a work dir, checked against a dataset: per rank, its complete records (`None`:
/// no log, or an unfinished one).
struct Logs {
    world_size: u64,
    pairs: u64,
    ranks: Vec<Option<Vec<Record>>>,
    /// Per rank, (records, batches) of an unfinished log.
    unfinished: Vec<(u64, u64, u64)>,
}

fn read_logs(ds: &Dataset, work_dir: &Path) -> Result<Logs> {
    let entries = std::fs::read_dir(work_dir).map_err(|e| Error::io(work_dir, e))?;
    let mut logs: Vec<PathBuf> = Vec::new();
    for e in entries {
        let path = e.map_err(|e| Error::io(work_dir, e))?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        if name.is_some_and(|n| n.starts_with("scores-") && n.ends_with(".log")) {
            logs.push(path);
        }
    }
    logs.sort();
    let Some(first) = logs.first() else {
        return Err(Error::input(work_dir, "holds no score logs (scores-*.log)"));
    };
    let (head, _, _) = read_log(first)?;
    let seal = &ds.manifest().checksum;
    if head.world_size == 0 || head.world_size > crate::limits::WORLD_SIZE {
        return Err(Error::corrupt(
            first,
            format!("world size {}", head.world_size),
        ));
    }
    let mut out = Logs {
        world_size: head.world_size,
        pairs: head.pairs,
        ranks: (0..head.world_size).map(|_| None).collect(),
        unfinished: Vec::new(),
    };
    let mut seen = vec![false; head.world_size as usize];
    for path in &logs {
        let (h, bytes, body) = read_log(path)?;
        if &h.seal != seal {
            return Err(Error::input(
                path,
                format!("holds scores of dataset {}, not of {seal}", h.seal),
            ));
        }
        if (h.plan.as_str(), h.world_size, h.pairs)
            != (head.plan.as_str(), head.world_size, head.pairs)
        {
            return Err(Error::input(
                path,
                format!(
                    "was scored under other settings than {} (one plan per work_dir)",
                    first.display()
                ),
            ));
        }
        if h.rank >= h.world_size || std::mem::replace(&mut seen[h.rank as usize], true) {
            return Err(Error::input(
                path,
                format!("rank {} is repeated or out of range", h.rank),
            ));
        }
        let (records, valid) = parse_records(&bytes[body..]);
        if records.len() as u64 == h.batches && body + valid == bytes.len() {
            out.ranks[h.rank as usize] = Some(records);
        } else {
            out.unfinished
                .push((h.rank, records.len() as u64, h.batches));
        }
    }
    Ok(out)
}

/// The ranks of the logs in `work_dir` that have not finished (no log yet, or an unfinished
/// one), and the world size; logs of another dataset or plan are an error.
pub fn pending(ds: &Dataset, work_dir: &Path) -> Result<(Vec<u64>, u64)> {
    let logs = read_logs(ds, work_dir)?;
    let ranks = (0..logs.world_size)
        .filter(|&r| logs.ranks[r as usize].is_none())
        .collect();
    Ok((ranks, logs.world_size))
}

/// The score of every pair of `ds` from the logs in `work_dir`: every rank's log present,
/// complete, of this dataset and one plan; every pair scored exactly once.
pub fn collect(ds: &Dataset, work_dir: &Path) -> Result<Vec<f32>> {
    let logs = read_logs(ds, work_dir)?;
    if let Some(&(rank, done, of)) = logs.unfinished.first() {
        return Err(Error::input(
            log_path(work_dir, rank, logs.world_size),
            format!("rank {rank} has scored {done} of its {of} batches: run it again to finish"),
        ));
    }
    let mut scores: Vec<Option<f32>> = vec![None; logs.pairs as usize];
    for (rank, records) in logs.ranks.into_iter().enumerate() {
        let path = log_path(work_dir, rank as u64, logs.world_size);
        let Some(records) = records else {
            return Err(Error::input(
                path,
                format!("missing: rank {rank} of {} has not scored", logs.world_size),
            ));
        };
        for r in records {
            for (&p, &s) in r.pairs.iter().zip(&r.scores) {
                let slot = scores.get_mut(p as usize).ok_or_else(|| {
                    Error::corrupt(
                        &path,
                        format!("pair {p} beyond the dataset's {}", logs.pairs),
                    )
                })?;
                if slot.replace(s).is_some() {
                    return Err(Error::corrupt(&path, format!("pair {p} is scored twice")));
                }
            }
        }
    }
    scores
        .into_iter()
        .enumerate()
        .map(|(p, s)| {
            s.ok_or_else(|| Error::input(work_dir, format!("pair {p} has no score in any log")))
        })
        .collect()
}

/// What [`finish`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finished {
    /// These ranks (of the world size) have not finished: nothing was written.
    Pending(Vec<u64>, u64),
    /// The scores were attached.
    Attached,
    /// `out` already holds this dataset with these scores (another rank attached them).
    Present,
}

/// The digest of a scores vector, as the provenance records it.
fn scores_digest(scores: &[f32]) -> String {
    format!(
        "{:016x}",
        xxhash_rust::xxh3::xxh3_64(bytemuck::cast_slice(scores))
    )
}

/// Once every rank's log in `work_dir` is complete, attach the scores: under an exclusive lock
/// of the work dir (ranks finishing together attach once), `write(scores)` unless `out` (when
/// local) already holds this dataset with these scores.
pub fn finish(
    ds: &Dataset,
    work_dir: &Path,
    out: &Path,
    write: impl FnOnce(&[f32]) -> Result<()>,
) -> Result<Finished> {
    let (ranks, world) = pending(ds, work_dir)?;
    if !ranks.is_empty() {
        return Ok(Finished::Pending(ranks, world));
    }
    let lock_path = work_dir.join("attach.lock");
    let lock = File::create(&lock_path).map_err(|e| Error::io(&lock_path, e))?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| Error::io(&lock_path, e.into()))?;
    let scores = collect(ds, work_dir)?;
    let present = crate::dataset::read_manifest(out).ok().is_some_and(|m| {
        m.provenance.as_ref().is_some_and(|p| {
            p["scored"]["from_seal"] == ds.manifest().checksum.as_str()
                && p["scored"]["scores_xxh3_64"] == scores_digest(&scores).as_str()
        })
    });
    if present {
        return Ok(Finished::Present);
    }
    write(&scores)?;
    Ok(Finished::Attached)
}

/// Write `ds` to `out` with `scores` (one per unique pair, [`UniquePairs`] order) as every
/// row's teacher scores (see the module docs). `ds` is verified in full first.
pub fn attach(
    ds: &Dataset,
    scores: &[f32],
    out: &Path,
    writer: WriterOptions,
) -> Result<crate::Manifest> {
    ds.validate_whole("score")?;
    let pairs = UniquePairs::build(ds)?;
    if scores.len() != pairs.len() {
        return Err(Error::argument(
            "scores",
            format!(
                "{} scores for {} unique pairs (one per pair id)",
                scores.len(),
                pairs.len()
            ),
        ));
    }
    if let Some(p) = scores.iter().position(|s| !s.is_finite()) {
        let (row, passage) = pairs.first(p as u32);
        return Err(Error::argument(
            "scores",
            format!(
                "pair {p} (row {row}, passage {passage}) is scored {}: teacher scores must be finite",
                scores[p]
            ),
        ));
    }
    let mut w = DatasetWriter::create(out, writer)?;
    for id in [
        format::PROMPT_ID_LLM_DEFAULT,
        format::PROMPT_ID_MATRYOSHKA_DEFAULT,
    ] {
        w.add_prompt(ds.prompt_tokens(id)?)?;
    }
    let mut slots = pairs.slots().iter();
    let (mut pos, mut neg) = (Vec::new(), Vec::new());
    let mut scratch = (Vec::new(), Vec::new());
    for row in 0..ds.len() {
        let g = ds.group(row)?;
        pos.clear();
        neg.clear();
        pos.extend(
            slots
                .by_ref()
                .take(g.pos.len())
                .map(|&p| scores[p as usize]),
        );
        neg.extend(
            slots
                .by_ref()
                .take(g.neg.len())
                .map(|&p| scores[p as usize]),
        );
        crate::merge::write_group(
            ds,
            &mut w,
            &g,
            g.neg,
            (Some(&pos), Some(&neg)),
            g.source,
            &mut scratch,
        )?;
    }
    crate::merge::copy_rejects(ds, &mut w)?;
    let m = ds.manifest();
    w.set_provenance(Some(serde_json::json!({
        "scored": {
            "from_seal": m.checksum,
            "unique_pairs": pairs.len(),
            "scores_xxh3_64": scores_digest(scores),
        }
    })));
    let sources: Vec<SourceStats> = m.sources.clone();
    w.finish(ManifestInfo {
        tokenizer: m.tokenizer.clone(),
        text: m.text.clone(),
        sources,
        shards: None,
    })
}
