//! The loader: an iterator of collated batches with background prefetch and a resumable state.
//!
//! Batch `k` of epoch `e` is a pure function of (dataset, options, e, k): its selections come
//! from [`crate::sample`], its arrays from [`Collator`]. Prefetch threads therefore only change
//! *when* a batch is computed, never *what* it holds: with 0, 1 or N threads the sequence is the
//! same, and resuming at (epoch, step) is O(1).
//!
//! Threads are plain `std::thread`s (not a rayon pool), started lazily on the first `next()`,
//! and restarted when the process id changes: a loader created before a `fork` (PyTorch
//! DataLoader workers) works in the child.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, TryRecvError};
use std::sync::Arc;

use crate::collate::{Batch, CollateOptions, Collator};
use crate::dataset::{Dataset, GroupIds};
use crate::error::{Error, Result};
use crate::limits::{self, range};
use crate::sample::budget::{Budget, BudgetPlan, Cost};
use crate::sample::length::LengthOrder;
use crate::sample::no_dup::{Key, NoDup, NoDupPlan};
use crate::sample::same_source::{batch_sources, BatchSource, Grouping, SourceBatches};
use crate::sample::{sample_group, EpochOrder, Selection, Shard, Tail, Universe};
use crate::storage;

pub use crate::options::Options;

/// Loader settings.
#[derive(Debug, Clone, PartialEq)]
pub struct LoaderOptions {
    /// Queries per batch.
    pub batch_size: usize,
    /// Seed of every random choice.
    pub seed: u64,
    /// Rank and world size; padding or dropping the tail as torch's DistributedSampler.
    pub shard: Shard,
    /// Shuffle rows each epoch (default true).
    pub shuffle: bool,
    /// Drop the last incomplete batch of each epoch (torch's `DataLoader(drop_last=True)`,
    /// the Trainer's `dataloader_drop_last`). Length-grouped, the short tail is left out before
    /// sorting. Same-source, each source's incomplete global batch is dropped instead of
    /// filled, as the drop shard tail does (FlagEmbedding's rule). With `max_tokens` it is an
    /// error: token-budget batches have no fixed size to fall short of. No duplicates, every
    /// rank's share of a global batch below `batch_size` is dropped (see
    /// [`crate::sample::no_dup`]).
    pub drop_last: bool,
    /// `max_example_num_per_dataset`: keep a seeded random subset of each larger source.
    pub max_example_num_per_dataset: Option<u64>,
    /// Leave out rows with no negatives (otherwise they are an error when group_size >= 2).
    pub skip_rows_without_negatives: bool,
    /// Never draw a negative whose passage is one of the row's positives (same passage id
    /// after dedup): negatives are drawn from the row's others, by the same rule. A row left
    /// with none counts as a row without negatives.
    pub exclude_false_negatives: bool,
    /// Background threads computing batches (0: compute in the caller's thread).
    pub prefetch_threads: usize,
    /// Batches computed ahead, in total.
    pub prefetch_depth: usize,
    /// How epochs are cut into batches.
    pub strategy: Strategy,
    /// Weighted mixing (see [`crate::sample::universe`]): one weight per source (input file,
    /// in the manifest's order); source `s` gives each epoch `weights[s] / sum(weights)` of
    /// its rows, the epoch keeping its length.
    pub weights: Option<Vec<f64>>,
    /// Collation settings.
    pub collate: CollateOptions,
}

/// How epochs are cut into batches: the batching strategies, which exclude each other.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Strategy {
    /// `batch_size` consecutive groups of the epoch order.
    #[default]
    Random,
    /// Length-grouped batches with megabatch multiplier `M` (see [`crate::sample::length`]):
    /// each run of `M * batch_size` groups of the epoch order is sorted by the length the
    /// collator pads each group to, longest first, and cut into `M` batches; the batch
    /// holding the epoch's longest group trades places with batch 0, so out-of-memory shows at
    /// step 0.
    LengthGrouped {
        /// The multiplier `M`.
        megabatch: usize,
    },
    /// Token-budget batches (see [`crate::sample::budget`]): each batch takes as many groups
    /// as fit `max_tokens` (padded: groups x group_size x padded length; packed: real
    /// tokens), at most `batch_size`; every rank takes the same number of steps. With a
    /// `megabatch` the groups are sorted by length within megabatches first. The number of
    /// steps varies by epoch.
    TokenBudget {
        /// The budget per batch and rank.
        max_tokens: usize,
        /// Length-sort within megabatches of this multiplier first.
        megabatch: Option<usize>,
    },
    /// Same-source batches (see [`crate::sample::same_source`]): every global batch (all
    /// ranks at one step) holds rows of one source.
    SameSource {
        /// Groups per rank in a batch of each source (default: the source's `batch_size` row
        /// field, else `batch_size`).
        batch_sizes: Option<Vec<usize>>,
        /// Sources with fewer rows per epoch than this are merged with the other small
        /// sources of their directory (FlagEmbedding's `small_threshold`; 0: none).
        small_threshold: u64,
        /// A merged group of small sources with fewer rows than this is left out
        /// (FlagEmbedding's `drop_threshold`).
        drop_threshold: u64,
    },
    /// No-duplicates batches (see [`crate::sample::no_dup`]): no two groups of a global
    /// batch (all ranks at one step) share a query or a drawn passage, so in-batch negatives
    /// are never false. Each row joins the first global batch with room that holds none of
    /// its keys (sentence-transformers' `NoDuplicatesBatchSampler`); rows that collide wait
    /// for later batches, in their order. The number of steps varies by epoch.
    NoDuplicates,
}

impl Strategy {
    /// The length-grouping multiplier, if the batches are length-sorted.
    pub fn megabatch(&self) -> Option<usize> {
        match self {
            Strategy::LengthGrouped { megabatch } => Some(*megabatch),
            Strategy::TokenBudget { megabatch, .. } => *megabatch,
            _ => None,
        }
    }
}

impl Default for LoaderOptions {
    fn default() -> Self {
        LoaderOptions {
            batch_size: 4,
            seed: 42,
            shard: Shard::default(),
            shuffle: true,
            drop_last: false,
            max_example_num_per_dataset: None,
            skip_rows_without_negatives: false,
            exclude_false_negatives: false,
            prefetch_threads: 1,
            prefetch_depth: 8,
            strategy: Strategy::Random,
            weights: None,
            collate: CollateOptions::default(),
        }
    }
}

impl LoaderOptions {
    /// Check every numeric setting against [`limits`], and the estimated size of a batch and
    /// of the prefetched batches, before anything is allocated.
    pub fn check(&self) -> Result<()> {
        let c = &self.collate;
        c.check()?;
        range("batch_size", self.batch_size, 1, limits::BATCH_SIZE)?;
        range(
            "prefetch_threads",
            self.prefetch_threads,
            0,
            limits::PREFETCH_THREADS,
        )?;
        range(
            "prefetch_depth",
            self.prefetch_depth,
            0,
            limits::PREFETCH_DEPTH,
        )?;
        if let Some(m) = self.strategy.megabatch() {
            range("length_grouped", m, 1, limits::MEGABATCH_MULT)?;
        }
        if let Strategy::TokenBudget { max_tokens, .. } = self.strategy {
            range("max_tokens", max_tokens, 1, limits::MAX_TOKENS)?;
        }
        let source_sizes = match &self.strategy {
            Strategy::SameSource { batch_sizes, .. } => batch_sizes.as_deref().unwrap_or(&[]),
            _ => &[],
        };
        for &b in source_sizes {
            range("source_batch_sizes", b, 1, limits::BATCH_SIZE)?;
        }
        if self.max_example_num_per_dataset == Some(0) {
            return Err(Error::argument(
                "max_example_num_per_dataset",
                "0 leaves no row to train on (None: no cap)",
            ));
        }
        if let Some(w) = &self.weights {
            crate::sample::universe::check_weights(w)?;
        }
        self.check_combination()?;
        self.shard.check()?;
        self.check_batch_bytes("batch_size", self.batch_size)?;
        match source_sizes.iter().max() {
            Some(&b) => self.check_batch_bytes("source_batch_sizes", b),
            None => Ok(()),
        }
    }

    /// The estimated size of a batch of `b` groups per rank, and of the prefetched batches,
    /// against [`limits::BATCH_BYTES`] and [`limits::PREFETCH_BYTES`]; `name` is the setting
    /// that gave `b` (`batch_size`, or a per-source batch size).
    fn check_batch_bytes(&self, name: &'static str, b: usize) -> Result<()> {
        let c = &self.collate;
        // A pair is at most its capped query and passage, the special tokens, sep and prompt
        // (bounded generously), padded; each of input_ids, attention_mask, token_type_ids
        // takes 8 bytes an element.
        let (qm, pm) = (c.query_max_len as u64, c.passage_max_len as u64);
        let len = qm + pm / 4 + pm + qm / 2 + 4096;
        let m = c.pad_to_multiple_of.unwrap_or(1) as u64;
        let padded = len.div_ceil(m) * m;
        let bytes = (b as u64) * (c.group_size as u64) * padded * 8 * 3;
        if bytes > limits::BATCH_BYTES {
            return Err(Error::argument(
                name,
                format!(
                    "batches of up to {bytes} bytes ({name} {b} x group_size {} x length {padded}) \
                     exceed the limit of {} bytes",
                    c.group_size,
                    limits::BATCH_BYTES
                ),
            ));
        }
        if bytes * self.prefetch_depth as u64 > limits::PREFETCH_BYTES {
            return Err(Error::argument(
                "prefetch_depth",
                format!(
                    "{} batches of up to {bytes} bytes ahead exceed the limit of {} bytes",
                    self.prefetch_depth,
                    limits::PREFETCH_BYTES
                ),
            ));
        }
        Ok(())
    }

    /// The settings that do not combine with the strategy.
    fn check_combination(&self) -> Result<()> {
        if let Strategy::TokenBudget { .. } = self.strategy {
            if self.shard.tail == Tail::Uneven {
                return Err(Error::argument(
                    "max_tokens",
                    "max_tokens does not combine with the uneven shard tail (use pad or drop)",
                ));
            }
            if self.drop_last {
                return Err(Error::argument(
                    "drop_last",
                    "drop_last does not combine with max_tokens: token-budget batches vary in \
                     size by design, so none is an incomplete batch to drop (leave drop_last off)",
                ));
            }
        }
        Ok(())
    }
}

/// Where a loader is: the next batch is `step` of `epoch` (counted from `offset`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LoaderState {
    /// Epoch.
    pub epoch: u64,
    /// Batches of that epoch already yielded (since `offset`).
    pub step: u64,
    /// Positions of the epoch's global order trained on before this loader's batches of the
    /// epoch began, by a run with another world size or batch size (elastic resumption, see
    /// [`Loader::restore`]); the epoch's batches are cut from the rest of its order. 0 but
    /// in a resumed epoch; every later epoch starts at 0.
    pub offset: u64,
}

/// Batches of `batch` rows a rank's `rows` are cut into (the last one short, or dropped
/// with `drop_last`).
fn batches(rows: u64, batch: u64, drop_last: bool) -> u64 {
    if drop_last {
        rows / batch
    } else {
        rows.div_ceil(batch)
    }
}

/// The keys of a checkpoint that are a position, not a setting.
pub const POSITION: [&str; 3] = ["epoch", "step", "offset"];

/// How [`Loader::restore`] continued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resumed {
    /// At the state's batch, the batches exactly those the state's run would have had next.
    Exact,
    /// On another world size or batch size: from the first position of the epoch's global
    /// order not yet trained on (`consumed` positions were, counting earlier resumptions).
    Elastic {
        /// Positions of the epoch's global order already trained on.
        consumed: u64,
    },
}

/// `v (its JSON type)`, for messages, in Python's spelling (the checkpoints' main reader).
fn described(v: &serde_json::Value) -> String {
    use serde_json::Value as V;
    let (repr, ty) = match v {
        V::Null => ("None".to_string(), "NoneType"),
        V::Bool(b) => ((if *b { "True" } else { "False" }).to_string(), "bool"),
        V::Number(n) if n.is_f64() => (format!("{:?}", n.as_f64().unwrap_or(f64::NAN)), "float"),
        V::Number(n) => (n.to_string(), "int"),
        V::String(s) => (format!("'{s}'"), "str"),
        V::Array(_) => (v.to_string(), "list"),
        V::Object(_) => (v.to_string(), "dict"),
    };
    format!("{repr} ({ty})")
}

/// A checkpoint key as a `'static` name for errors: an option's, else the extra keys'.
fn static_name(k: &str) -> &'static str {
    crate::options::Options::names()
        .iter()
        .chain(&["dataset", "rows_per_epoch", "steps_per_epoch"])
        .find(|n| **n == k)
        .copied()
        .unwrap_or("state")
}

/// A megabatch's positions sorted by group length, keyed by (epoch, megabatch).
type SortedMegabatch = ((u64, u64), Arc<Vec<u64>>);

/// Per-epoch values computed once and shared by the prefetch threads: the epochs last computed
/// ([`EPOCHS_CACHED`]), oldest first.
type EpochCache<T> = std::sync::Mutex<Epochs<T>>;

/// The values of an [`EpochCache`], by epoch.
type Epochs<T> = Vec<(u64, Arc<T>)>;

/// How an epoch is cut into batches.
#[derive(Debug, Clone)]
enum Schedule {
    /// `batch_size` consecutive positions of the rank's order.
    Random,
    /// Length-grouped megabatches with this multiplier.
    Grouped(u64),
    /// Token-budget batches, planned once per epoch.
    Budget(Budget),
    /// Same-source batches.
    SameSource(SameSource),
    /// No-duplicates batches, planned once per epoch.
    NoDup(NoDup),
}

/// What batches are computed from; shared with the prefetch threads.
#[derive(Debug)]
struct Plan {
    ds: Arc<Dataset>,
    universe: Universe,
    collator: Collator,
    options: LoaderOptions,
    schedule: Schedule,
    /// Length grouping: the epoch's group lengths by position (4 bytes a row), once computed.
    lengths: EpochCache<LengthOrder>,
    /// Length grouping: the last megabatches sorted, by (epoch, megabatch): each serves
    /// `M` consecutive batches, so it is sorted once, not once per batch.
    sorted: std::sync::Mutex<Vec<SortedMegabatch>>,
    /// Token budget: the epoch's batches (8 bytes a row), once computed.
    budget: EpochCache<BudgetPlan>,
    /// No duplicates: the epoch's batches (8 bytes a row), once computed.
    no_dup: EpochCache<NoDupPlan>,
    /// Batches of epoch 0 from its start, once computed.
    first_steps: std::sync::OnceLock<u64>,
    /// What the plans are shared by in this process ([`SharedPlans`]): the dataset's
    /// directory and seal, and every option but the prefetch ones.
    shared: String,
}

/// Fill `out` on scoped threads, part `k` being `out[bounds[k]..bounds[k + 1]]` filled by
/// `f(k, part)`; the first error in part order is the one returned. Epoch passes (length and
/// budget plans) run on all cores this way: scoped threads, not a rayon pool, because a loader
/// may run in a forked DataLoader worker, where a pool made before the fork has no threads.
/// Each part's values depend on its range alone, so the split never changes the result.
fn fill_parts<T: Send>(
    out: &mut [T],
    bounds: &[usize],
    f: impl Fn(usize, &mut [T]) -> Result<()> + Sync,
) -> Result<()> {
    let mut parts = Vec::with_capacity(bounds.len());
    let mut rest = out;
    for w in bounds.windows(2) {
        let (part, tail) = rest.split_at_mut(w[1] - w[0]);
        parts.push(part);
        rest = tail;
    }
    if parts.len() <= 1 {
        return parts.into_iter().try_for_each(|p| f(0, p));
    }
    let done: Vec<Result<()>> = std::thread::scope(|s| {
        let handles: Vec<_> = parts
            .into_iter()
            .enumerate()
            .map(|(k, part)| {
                let f = &f;
                s.spawn(move || f(k, part))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(Error::Internal("an epoch pass thread panicked".into()))
                })
            })
            .collect()
    });
    done.into_iter().collect()
}

/// How an epoch pass runs: on every core (at most [`EPOCH_PASS_THREADS`]) for the epoch a
/// trainer waits for, or on one thread for a later epoch computed ahead, which stops early
/// when `stop` is set (the loader was dropped or moved to another epoch).
#[derive(Debug, Clone, Copy)]
struct Pass<'a> {
    threads: usize,
    stop: Option<&'a AtomicBool>,
}

impl Pass<'_> {
    /// On every core, to the end.
    fn now() -> Pass<'static> {
        Pass {
            threads: std::thread::available_parallelism()
                .map_or(1, |t| t.get())
                .min(EPOCH_PASS_THREADS),
            stop: None,
        }
    }

    /// An error once the pass should stop (what a pass computed ahead returns, unused).
    #[inline]
    fn go_on(&self) -> Result<()> {
        match self.stop {
            Some(s) if s.load(Ordering::Relaxed) => Err(Error::Internal(
                "an epoch pass computed ahead was stopped".into(),
            )),
            _ => Ok(()),
        }
    }
}

/// `0..n` cut into one part per thread of `pass`, or one part below `min` (starting threads
/// costs more): the bounds for [`fill_parts`].
fn even_bounds(n: usize, min: usize, pass: Pass<'_>) -> Vec<usize> {
    let threads = if n < min { 1 } else { pass.threads.max(1) };
    let chunk = n.div_ceil(threads).max(1);
    (0..=threads).map(|t| (t * chunk).min(n)).collect()
}

/// An epoch pass whose value at each position `i` of `0..n` is `f(row(i), scratch)`, a
/// function of the row alone (`row(i) < rows`): `f` runs once for each distinct row, in row
/// order, and the values are gathered by position. Row order is the dataset's storage order:
/// a row's id lists follow the previous row's, and its passages (numbered in first-reference
/// order at conversion) mostly follow the previous row's passages, so the pass streams through
/// the maps where position order (shuffled) would miss the cache on every list and passage
/// length once the dataset outgrows it. The distinct rows are a bitmap with a running count
/// per 64 rows, and their values are stored densely: while it runs the pass holds 8 bytes a
/// position (its row), `size_of::<T>()` a position (the result) and a distinct row, and 2 bits
/// a dataset row, so a rank of many, or a small subset of a large dataset, pays for its own
/// rows only. The first error in row order is the one returned.
fn row_pass<T: Send + Sync + Copy + Default, S: Default>(
    pass: Pass<'_>,
    rows: usize,
    n: u64,
    row: impl Fn(u64) -> u64 + Sync,
    f: impl Fn(u64, &mut S) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    let n = usize::try_from(n).map_err(|_| Error::Internal("an epoch beyond memory".into()))?;
    let split = EPOCH_PASS_SPLIT as usize;
    let by_position = even_bounds(n, split, pass);
    let mut at = vec![0u64; n];
    fill_parts(&mut at, &by_position, |k, part| {
        let start = by_position[k];
        for (j, r) in part.iter_mut().enumerate() {
            *r = row((start + j) as u64);
        }
        Ok(())
    })?;
    pass.go_on()?;
    let words = rows.div_ceil(64);
    let mut wanted = vec![0u64; words];
    for &r in &at {
        if r >= rows as u64 {
            return Err(Error::Internal(format!(
                "an epoch order names row {r} of {rows}"
            )));
        }
        wanted[(r / 64) as usize] |= 1 << (r % 64);
    }
    // before[w]: the distinct rows below row 64 * w (the index of word w's first value).
    let mut before = Vec::with_capacity(words + 1);
    let mut count = 0usize;
    for w in &wanted {
        before.push(count);
        count += w.count_ones() as usize;
    }
    before.push(count);
    let by_word = even_bounds(words, split / 64, pass);
    let bounds: Vec<usize> = by_word.iter().map(|&w| before[w]).collect();
    let mut values = vec![T::default(); count];
    fill_parts(&mut values, &bounds, |k, part| {
        let mut scratch = S::default();
        let mut j = 0;
        let first = by_word[k];
        for (w, &word) in wanted[first..by_word[k + 1]].iter().enumerate() {
            pass.go_on()?;
            let base = (first + w) as u64 * 64;
            let mut bits = word;
            while bits != 0 {
                part[j] = f(base + bits.trailing_zeros() as u64, &mut scratch)?;
                j += 1;
                bits &= bits - 1;
            }
        }
        Ok(())
    })?;
    pass.go_on()?;
    let mut out = vec![T::default(); n];
    fill_parts(&mut out, &by_position, |k, part| {
        let start = by_position[k];
        for (j, v) in part.iter_mut().enumerate() {
            let r = at[start + j];
            let (w, bit) = ((r / 64) as usize, r % 64);
            *v = values[before[w] + (wanted[w] & ((1u64 << bit) - 1)).count_ones() as usize];
        }
        Ok(())
    })?;
    Ok(out)
}

/// Scratch space of [`Plan::measure`]: a row's drawn negatives and passage ids.
#[derive(Debug, Default)]
struct Measuring {
    neg: Vec<u32>,
    ids: Vec<i32>,
}

/// Rows below which an epoch pass runs on one thread (starting threads costs more).
const EPOCH_PASS_SPLIT: u64 = 1 << 16;
/// Threads an epoch pass uses at most.
const EPOCH_PASS_THREADS: usize = 8;

/// The cached value for `epoch`, or `make()` stored as it. The lock is held while computing,
/// so other threads wait for the value instead of computing it again (a plan computed ahead
/// holds no lock while it runs: see [`offer`]). A plan another loader of this process computed
/// for the same dataset and settings (`shared`, see [`SharedPlans`]) is taken from there.
fn cached<T: Send + Sync + 'static>(
    cache: &EpochCache<T>,
    shared: &str,
    epoch: u64,
    make: impl FnOnce() -> Result<T>,
) -> Result<Arc<T>> {
    let mut c = lock(cache)?;
    if let Some(v) = c.iter().find(|(e, _)| *e == epoch).map(|(_, v)| v.clone()) {
        return Ok(v);
    }
    let v = match SharedPlans::get(shared, epoch) {
        Some(v) => v,
        None => {
            let v = Arc::new(make()?);
            SharedPlans::put(shared, epoch, v.clone());
            v
        }
    };
    keep(&mut c, epoch, v.clone());
    Ok(v)
}

/// Store `v` as `epoch`'s value unless one is there (the value is the same: a plan is a pure
/// function of its epoch), and share it with the process's other loaders.
fn offer<T: Send + Sync + 'static>(
    cache: &EpochCache<T>,
    shared: &str,
    epoch: u64,
    v: Arc<T>,
) -> Result<()> {
    let evicted = {
        let mut c = lock(cache)?;
        if c.iter().any(|(e, _)| *e == epoch) {
            return Ok(());
        }
        keep(&mut c, epoch, v.clone())
    };
    drop(evicted);
    SharedPlans::put(shared, epoch, v);
    Ok(())
}

/// Epoch plans shared by the loaders of one process: a loader of the same dataset (its
/// directory and manifest seal) with the same settings (every option but the prefetch ones)
/// takes the plan another computed instead of computing it again. `RankfeedIterable` makes a
/// loader per pass, and one more to count each epoch's steps: without this each epoch's plan
/// would be computed twice, and the plan a pass's loader computed ahead for the next epoch
/// would go with it. The [`SHARED_PLANS`] most recently computed plans are kept (4 to 8 bytes
/// a row each). Never waited for: a lock another thread holds (or held at a `fork`, in the
/// child) means computing the plan, not blocking.
struct SharedPlans;

/// One shared plan: its loader key, epoch, and value.
type SharedPlan = (Arc<str>, u64, Arc<dyn std::any::Any + Send + Sync>);

static SHARED: std::sync::Mutex<Vec<SharedPlan>> = std::sync::Mutex::new(Vec::new());

/// Plans a process keeps for its loaders ([`SharedPlans`]): a pass's and the next epoch's of
/// one run, and one more (an evaluation loader, a probe at another epoch).
const SHARED_PLANS: usize = 3;

impl SharedPlans {
    /// The lock, if it can be had without waiting long (a few tries).
    fn lock() -> Option<std::sync::MutexGuard<'static, Vec<SharedPlan>>> {
        for _ in 0..64 {
            match SHARED.try_lock() {
                Ok(g) => return Some(g),
                Err(std::sync::TryLockError::WouldBlock) => std::thread::yield_now(),
                Err(std::sync::TryLockError::Poisoned(_)) => return None,
            }
        }
        None
    }

    fn get<T: Send + Sync + 'static>(key: &str, epoch: u64) -> Option<Arc<T>> {
        let g = Self::lock()?;
        let (_, _, v) = g.iter().find(|(k, e, _)| **k == *key && *e == epoch)?;
        v.clone().downcast::<T>().ok()
    }

    fn put<T: Send + Sync + 'static>(key: &str, epoch: u64, v: Arc<T>) {
        let key: Arc<str> = key.into();
        let evicted = {
            let Some(mut g) = Self::lock() else {
                return;
            };
            let at = g.iter().position(|(k, e, _)| *k == key && *e == epoch);
            let evicted = match at {
                Some(i) => Some(g.remove(i)),
                None if g.len() >= SHARED_PLANS => Some(g.remove(0)),
                None => None,
            };
            g.push((key, epoch, v));
            evicted
        };
        // Freed once the lock is released (a large plan takes a while to free).
        drop(evicted);
    }
}

/// Add `epoch`'s value, keeping the [`EPOCHS_CACHED`] most recently added; returns the value
/// evicted, for the caller to drop once it has released the lock.
fn keep<T>(c: &mut Epochs<T>, epoch: u64, v: Arc<T>) -> Option<(u64, Arc<T>)> {
    let evicted = (c.len() >= EPOCHS_CACHED).then(|| c.remove(0));
    c.push((epoch, v));
    evicted
}

/// Whether `epoch`'s value is cached.
fn has<T>(cache: &EpochCache<T>, epoch: u64) -> Result<bool> {
    Ok(lock(cache)?.iter().any(|(e, _)| *e == epoch))
}

/// Epochs whose plans a loader keeps: the one it serves and the next, computed ahead.
const EPOCHS_CACHED: usize = 2;

fn lock<T>(cache: &EpochCache<T>) -> Result<std::sync::MutexGuard<'_, Epochs<T>>> {
    cache
        .lock()
        .map_err(|_| Error::Internal("an epoch cache was poisoned".into()))
}

impl Plan {
    /// The same plan with empty caches: what a forked child uses (see [`Loader::after_fork`]).
    fn fresh(&self) -> Plan {
        let first_steps = std::sync::OnceLock::new();
        if let Some(&n) = self.first_steps.get() {
            let _ = first_steps.set(n);
        }
        Plan {
            ds: self.ds.clone(),
            universe: self.universe.clone(),
            collator: self.collator.clone(),
            options: self.options.clone(),
            schedule: self.schedule.clone(),
            lengths: std::sync::Mutex::new(Vec::new()),
            sorted: std::sync::Mutex::new(Vec::new()),
            budget: std::sync::Mutex::new(Vec::new()),
            no_dup: std::sync::Mutex::new(Vec::new()),
            first_steps,
            shared: self.shared.clone(),
        }
    }

    /// Batches of `epoch` from its position `offset` on (see [`LoaderState::offset`]).
    fn steps(&self, epoch: u64, offset: u64) -> Result<u64> {
        let b = self.options.batch_size as u64;
        Ok(match &self.schedule {
            Schedule::Budget(_) => self.budget_plan(epoch)?.len(),
            Schedule::NoDup(_) => self.no_dup_plan(epoch)?.len(),
            Schedule::SameSource(ss) => ss.batches.len(),
            Schedule::Random | Schedule::Grouped(_) => {
                batches(self.order(epoch, offset).len(), b, self.options.drop_last)
            }
        })
    }

    /// Rows `[lo, hi)` of batch `step` of `epoch` in `order`.
    fn span(&self, order: &EpochOrder, step: u64) -> std::ops::Range<u64> {
        let b = self.options.batch_size as u64;
        (step * b).min(order.len())..((step + 1) * b).min(order.len())
    }

    fn order(&self, epoch: u64, offset: u64) -> EpochOrder<'_> {
        let o = &self.options;
        EpochOrder::new(&self.universe, o.seed, epoch, o.shard, o.shuffle).after(offset)
    }

    /// The selection (positive, negatives) of `row` in `epoch`: a pure function of both.
    fn select(&self, epoch: u64, row: u64) -> Result<Selection> {
        let o = &self.options;
        let group = self.ds.group_ids(row as usize)?;
        // The collator reads the drawn entries of these lists next.
        storage::prefetch(&group.pos[..group.pos.len().min(64)]);
        storage::prefetch(&group.neg[..group.neg.len().min(64)]);
        let mut neg = Vec::with_capacity(o.collate.group_size.saturating_sub(1));
        let pos = draw_group(o, epoch, row, &group, &mut neg)?;
        Ok(Selection { row, pos, neg })
    }

    /// Length grouping: the positions (in the epoch order) of batch `step`'s groups (see
    /// [`crate::sample::length`]); the megabatch is sorted once and cached for its batches.
    /// The epoch is the positions its batches hold: with `drop_last`, the short tail is left
    /// out before sorting, as in random order (it would otherwise sort into the kept batches).
    fn grouped_span(&self, epoch: u64, offset: u64, step: u64, mult: u64) -> Result<Vec<u64>> {
        let b = self.options.batch_size as u64;
        let lengths = cached(&self.lengths, &self.shared, epoch, || {
            self.length_order(epoch, offset, Pass::now())
        })?;
        let source = lengths.source_batch(step, b, mult);
        let key = (epoch, source / mult);
        let hit = self
            .sorted
            .lock()
            .ok()
            .and_then(|c| c.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone()));
        let sorted = match hit {
            Some(v) => v,
            None => {
                let v = Arc::new(lengths.sorted(key.1, mult * b));
                if let Ok(mut cache) = self.sorted.lock() {
                    if cache.len() >= 8 {
                        cache.remove(0);
                    }
                    cache.push((key, v.clone()));
                }
                v
            }
        };
        Ok(LengthOrder::batch_in(&sorted, source, b, mult))
    }

    /// Length grouping: the group length at each position `epoch`'s batches hold. With
    /// `drop_last`, the short tail is left out before sorting, as in random order (it would
    /// otherwise sort into the kept batches).
    fn length_order(&self, epoch: u64, offset: u64, pass: Pass<'_>) -> Result<LengthOrder> {
        let order = self.order(epoch, offset);
        let b = self.options.batch_size as u64;
        let kept = if self.options.drop_last {
            order.len() / b * b
        } else {
            order.len()
        };
        Ok(LengthOrder::new(row_pass(
            pass,
            self.ds.len(),
            kept,
            |i| order.row(i),
            |row, s| Ok(self.measure(epoch, row, s)?.0),
        )?))
    }

    /// The longest pair and the total tokens (saturated at `u32::MAX`) of `row`'s drawn group
    /// in `epoch`: what the length and budget plans measure ([`Collator::group_tokens`] of its
    /// selection, without allocating). (Drawing 64 rows' groups first and prefetching their
    /// passages' offsets before reading them was measured slower: 966-1,117 ms against 485-912
    /// ms at 4M rows.)
    fn measure(&self, epoch: u64, row: u64, s: &mut Measuring) -> Result<(u32, u32)> {
        let (g, pos) = self.draw(epoch, row, &mut s.neg)?;
        let (longest, total) = self
            .collator
            .drawn_tokens(&self.ds, &g, row, pos, &s.neg, &mut s.ids)?;
        Ok((longest as u32, total.min(u32::MAX as usize) as u32))
    }

    /// The group of `row` and its positive in `epoch`, its negatives into `neg` (what
    /// [`Plan::select`] draws, without its prefetching and allocation: for passes over every
    /// row of an epoch).
    fn draw(&self, epoch: u64, row: u64, neg: &mut Vec<u32>) -> Result<(GroupIds<'_>, u32)> {
        let o = &self.options;
        let g = self.ds.group_ids(row as usize)?;
        let pos = draw_group(o, epoch, row, &g, neg)?;
        Ok((g, pos))
    }

    /// Token budget: the epoch's plan, from the group lengths of the global order (every
    /// rank computes the same plan, one group-length computation per row: no tokens).
    fn budget_plan(&self, epoch: u64) -> Result<Arc<BudgetPlan>> {
        let Schedule::Budget(budget) = self.schedule else {
            return Err(Error::Internal("no token budget".into()));
        };
        cached(&self.budget, &self.shared, epoch, || {
            self.make_budget(epoch, budget, Pass::now())
        })
    }

    /// Token budget: `epoch`'s plan computed (see [`Plan::budget_plan`]).
    fn make_budget(&self, epoch: u64, budget: Budget, pass: Pass<'_>) -> Result<BudgetPlan> {
        let order = self.order(epoch, 0);
        let n = order.global_len();
        let (mut sizes, mut longest) = (
            Vec::with_capacity(n as usize),
            Vec::with_capacity(n as usize),
        );
        let pairs = row_pass(
            pass,
            self.ds.len(),
            n,
            |p| order.global_row(p),
            |row, s| self.measure(epoch, row, s),
        )?;
        for (l, total) in pairs {
            longest.push(l);
            sizes.push(match budget.cost {
                Cost::Packed => total,
                Cost::Padded { .. } => l,
            });
        }
        Ok(BudgetPlan::new(&sizes, &longest, budget))
    }

    /// No duplicates: the epoch's plan, from the keys of every row of the global order (its
    /// query, and the passages it draws: one draw per row, no tokens read).
    fn no_dup_plan(&self, epoch: u64) -> Result<Arc<NoDupPlan>> {
        let Schedule::NoDup(settings) = self.schedule else {
            return Err(Error::Internal("no no-duplicates schedule".into()));
        };
        cached(&self.no_dup, &self.shared, epoch, || {
            self.make_no_dup(epoch, settings, Pass::now())
        })
    }

    /// No duplicates: `epoch`'s plan computed (see [`Plan::no_dup_plan`]; one thread).
    fn make_no_dup(&self, epoch: u64, settings: NoDup, pass: Pass<'_>) -> Result<NoDupPlan> {
        let order = self.order(epoch, 0);
        let mut neg = Vec::with_capacity(self.options.collate.group_size);
        NoDupPlan::new(self.universe.len(), settings, &mut |p, out| {
            pass.go_on()?;
            let row = order.global_row(p);
            let (g, pos) = self.draw(epoch, row, &mut neg)?;
            out.push(Key::query(crate::audit::query_key(g.query, g.prompt)));
            out.push(Key::passage(g.pos[pos as usize]));
            out.extend(neg.iter().map(|&j| Key::passage(g.neg[j as usize])));
            Ok(())
        })
    }

    /// Whether batches come from a per-epoch plan (length, token-budget and no-duplicates
    /// batches): what a loader computes ahead for the next epoch.
    fn plans_epochs(&self) -> bool {
        matches!(
            self.schedule,
            Schedule::Grouped(_) | Schedule::Budget(_) | Schedule::NoDup(_)
        )
    }

    /// Compute `epoch`'s plan on this thread, unless cached, and offer it to the cache; stops
    /// early (an error, unused) once `stop` is set. A loader runs this in the background for
    /// the epoch after the one it serves, so that epoch's start does not wait for its pass.
    fn plan_ahead(&self, epoch: u64, stop: &AtomicBool) -> Result<()> {
        let pass = Pass {
            threads: 1,
            stop: Some(stop),
        };
        // Computed unless cached here or by another loader of the process; offered unless
        // stopped meanwhile (the loader moved on: its epoch's plan stays cached).
        fn ahead<T: Send + Sync + 'static>(
            cache: &EpochCache<T>,
            shared: &str,
            epoch: u64,
            pass: Pass<'_>,
            make: impl FnOnce() -> Result<T>,
        ) -> Result<()> {
            if has(cache, epoch)? {
                return Ok(());
            }
            let v = match SharedPlans::get::<T>(shared, epoch) {
                Some(v) => v,
                None => Arc::new(make()?),
            };
            pass.go_on()?;
            offer(cache, shared, epoch, v)
        }
        let shared = self.shared.as_str();
        match self.schedule {
            Schedule::Grouped(_) => ahead(&self.lengths, shared, epoch, pass, || {
                self.length_order(epoch, 0, pass)
            }),
            Schedule::Budget(b) => ahead(&self.budget, shared, epoch, pass, || {
                self.make_budget(epoch, b, pass)
            }),
            Schedule::NoDup(d) => ahead(&self.no_dup, shared, epoch, pass, || {
                self.make_no_dup(epoch, d, pass)
            }),
            _ => Ok(()),
        }
    }

    fn selections(&self, epoch: u64, offset: u64, step: u64) -> Result<Vec<Selection>> {
        Ok(self.drawn(epoch, offset, step)?.0)
    }

    /// The selections of batch `step` of `epoch`, and whether the batch is marked
    /// `no_in_batch_neg` (same-source batches of a source so named).
    fn drawn(&self, epoch: u64, offset: u64, step: u64) -> Result<(Vec<Selection>, bool)> {
        let o = &self.options;
        let order = self.order(epoch, offset);
        let mut no_in_batch_neg = false;
        let rows: Vec<u64> = match &self.schedule {
            Schedule::Random => self.span(&order, step).map(|i| order.row(i)).collect(),
            Schedule::Grouped(mult) => self
                .grouped_span(epoch, offset, step, *mult)?
                .into_iter()
                .map(|i| order.row(i))
                .collect(),
            Schedule::Budget(_) => self
                .budget_plan(epoch)?
                .batch(step, o.shard.rank)
                .into_iter()
                .map(|p| order.global_row(p))
                .collect(),
            Schedule::NoDup(_) => self
                .no_dup_plan(epoch)?
                .batch(step)
                .into_iter()
                .map(|p| order.global_row(p))
                .collect(),
            Schedule::SameSource(ss) => {
                let (g, within) = ss
                    .batches
                    .batch(o.seed, epoch, step, o.shard.rank, o.shuffle);
                no_in_batch_neg = ss.groups[g].no_in_batch_neg;
                within
                    .into_iter()
                    .map(|k| order.rows().row(ss.groups[g].index(&self.universe, k)))
                    .collect()
            }
        };
        for &row in &rows {
            self.ds.prefetch_group(row as usize);
        }
        let selections = rows
            .into_iter()
            .map(|row| self.select(epoch, row))
            .collect::<Result<_>>()?;
        Ok((selections, no_in_batch_neg))
    }

    /// Batch `step` of `epoch`. `next` is the step this thread computes after it: in random
    /// order its groups are prefetched before this batch is collated, so their cache misses
    /// overlap the copy.
    fn batch(&self, epoch: u64, offset: u64, step: u64, next: Option<u64>) -> Result<Batch> {
        let steps = self.steps(epoch, offset)?;
        if step >= steps {
            return Err(Error::OutOfRange {
                what: "step",
                index: step,
                len: steps,
            });
        }
        let (selections, no_in_batch_neg) = self.drawn(epoch, offset, step)?;
        if let (Schedule::Random, Some(next)) = (&self.schedule, next.filter(|&n| n < steps)) {
            let order = self.order(epoch, offset);
            for i in self.span(&order, next) {
                self.ds.prefetch_group(order.row(i) as usize);
            }
        }
        let mut batch = self.collator.collate(&self.ds, selections)?;
        batch.no_in_batch_neg = no_in_batch_neg;
        Ok(batch)
    }
}

/// Same-source batching: the batch sources (a source, or small sources merged), their
/// batches, and their per-rank batch sizes.
#[derive(Debug, Clone)]
struct SameSource {
    batches: SourceBatches,
    groups: Vec<BatchSource>,
    /// Rows per epoch and per-rank batch size of each batch source.
    takes: Vec<u64>,
    sizes: Vec<u64>,
}

/// Running prefetch threads for one epoch from one step on.
struct Prefetch {
    pid: u32,
    epoch: u64,
    receivers: Vec<Receiver<Result<Batch>>>,
    next: u64,
    first: u64,
}

/// The next epoch's plan, computed on a background thread (see [`Plan::plan_ahead`]).
struct Ahead {
    pid: u32,
    epoch: u64,
    stop: Arc<AtomicBool>,
    /// Disconnects when the thread ends (nothing is sent).
    done: Receiver<()>,
}

/// An iterator of batches; see the module docs.
pub struct Loader {
    plan: Arc<Plan>,
    /// The process `plan` belongs to (see [`Loader::after_fork`]).
    plan_pid: u32,
    state: LoaderState,
    prefetch: Option<Prefetch>,
    ahead: Option<Ahead>,
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.stop_ahead();
    }
}

impl std::fmt::Debug for Loader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader")
            .field("options", &self.plan.options)
            .field("state", &self.state)
            .finish()
    }
}

impl Loader {
    /// A loader over `ds`. Checks the options, and that every row it may draw can form a
    /// group: with group_size >= 2, rows without negatives are an error naming how many and
    /// how to skip them, unless `skip_rows_without_negatives`.
    pub fn new(ds: Arc<Dataset>, options: LoaderOptions) -> Result<Loader> {
        options.check()?;
        let collator = Collator::new(&ds, options.collate.clone())?;
        let universe = universe(&ds, &options)?;
        if options.collate.knowledge_distillation
            && !options.collate.seed_scores()
            && !ds.all_rows_have_scores()
        {
            return Err(Error::argument(
                "knowledge_distillation",
                "needs pos_scores and neg_scores on every row; some rows have none",
            ));
        }
        let schedule = schedule(&ds, &universe, &options)?;
        if let Schedule::SameSource(ss) = &schedule {
            if let Some(&b) = ss.sizes.iter().max() {
                options.check_batch_bytes("source_batch_sizes", b as usize)?;
            }
        }
        check_steps(&universe, &options, &schedule)?;
        let shared = {
            let o = LoaderOptions {
                prefetch_threads: 0,
                prefetch_depth: 0,
                ..options.clone()
            };
            format!("{}\n{}\n{o:?}", ds.dir().display(), ds.manifest().checksum)
        };
        let loader = Loader {
            plan: Arc::new(Plan {
                ds,
                universe,
                collator,
                options,
                schedule,
                lengths: std::sync::Mutex::new(Vec::new()),
                sorted: std::sync::Mutex::new(Vec::new()),
                budget: std::sync::Mutex::new(Vec::new()),
                no_dup: std::sync::Mutex::new(Vec::new()),
                first_steps: std::sync::OnceLock::new(),
                shared,
            }),
            plan_pid: std::process::id(),
            state: LoaderState::default(),
            prefetch: None,
            ahead: None,
        };
        loader.check_no_dup_steps()?;
        Ok(loader)
    }

    /// No duplicates: an epoch with rows but no global batch is an error (see
    /// [`check_steps`]). Whether one is left depends on the rows' keys, so epoch 0 is planned
    /// here (its plan is cached for its batches); later epochs draw other negatives and can
    /// differ, in the rare data where the tails leave nothing (a key in nearly every row).
    fn check_no_dup_steps(&self) -> Result<()> {
        let o = &self.plan.options;
        let n = self.plan.universe.len();
        if !matches!(self.plan.schedule, Schedule::NoDup(_))
            || n == 0
            || o.shard.tail == Tail::Uneven
        {
            return Ok(());
        }
        let plan = self.plan.no_dup_plan(0)?;
        if plan.global_batches == 0 {
            return Err(Error::argument(
                "no_duplicates",
                format!(
                    "an epoch of {n} rows would have 0 no-duplicates batches: with world_size {} \
                     and batch_size {}, {} leaves no global batch whose rows share no query or \
                     passage (use drop_last=false, the pad tail, fewer ranks or a smaller batch)",
                    o.shard.world_size,
                    o.batch_size,
                    if o.drop_last {
                        "drop_last (every global batch is incomplete)"
                    } else if o.shard.tail == Tail::Drop {
                        "the drop tail"
                    } else {
                        "the pad tail (no row could fill one to a multiple of world_size without a duplicate)"
                    },
                ),
            ));
        }
        Ok(())
    }

    /// Batches in `epoch` for this rank (every rank has as many). Token-budget batches plan
    /// the epoch here (once; an error reading the data shows here).
    pub fn steps(&self, epoch: u64) -> Result<u64> {
        self.plan_for(epoch).steps(epoch, self.offset(epoch))
    }

    /// Batches in the current epoch for this rank ([`Loader::steps`] of the current epoch).
    pub fn steps_per_epoch(&self) -> Result<u64> {
        self.steps(self.state.epoch)
    }

    /// Rows this run trains on per epoch (all ranks, before padding).
    pub fn rows_per_epoch(&self) -> u64 {
        self.plan.universe.len()
    }

    /// Token budgets: the share of `epoch`'s batches (this rank's) that hold `batch_size`
    /// groups, the most a batch takes, so that `batch_size` and not `max_tokens` ended them;
    /// None for the other strategies. Near 1, the budget is not reached: raise `batch_size`.
    pub fn budget_capped(&self, epoch: u64) -> Result<Option<f64>> {
        let Schedule::Budget(_) = self.plan.schedule else {
            return Ok(None);
        };
        let plan = self.plan_for(epoch).budget_plan(epoch)?;
        let cap = self.plan.options.batch_size;
        let rank = self.plan.options.shard.rank;
        let capped = (0..plan.len())
            .filter(|&k| plan.batch(k, rank).len() >= cap)
            .count();
        Ok(Some(capped as f64 / plan.len().max(1) as f64))
    }

    /// Notes on settings that do not do what they seem to (each a sentence naming the
    /// setting): `max_tokens` that `batch_size` keeps batches from reaching.
    pub fn notes(&self) -> Result<Vec<String>> {
        let mut notes = Vec::new();
        if let (Some(share), Strategy::TokenBudget { max_tokens, .. }) =
            (self.budget_capped(0)?, &self.plan.options.strategy)
        {
            if share >= 0.5 {
                notes.push(format!(
                    "max_tokens {max_tokens} is not reached: {:.0}% of the batches end at \
                     batch_size {} groups first (batch_size is the most groups a batch takes: \
                     raise it to fill the token budget)",
                    100.0 * share,
                    self.plan.options.batch_size
                ));
            }
        }
        Ok(notes)
    }

    /// The collator in use.
    pub fn collator(&self) -> &Collator {
        &self.plan.collator
    }

    /// The dataset batches are drawn from.
    pub fn dataset(&self) -> &Arc<Dataset> {
        &self.plan.ds
    }

    /// The settings.
    pub fn options(&self) -> &LoaderOptions {
        &self.plan.options
    }

    /// The selections of batch `step` of `epoch` (pure).
    pub fn selections(&self, epoch: u64, step: u64) -> Result<Vec<Selection>> {
        self.plan_for(epoch)
            .selections(epoch, self.offset(epoch), step)
    }

    /// Batch `step` of `epoch` (pure; does not move the loader). In the current epoch, steps
    /// count from the state's offset (after an elastic [`Loader::restore`], the batches are
    /// cut from the rest of the epoch).
    pub fn batch(&self, epoch: u64, step: u64) -> Result<Batch> {
        self.plan_for(epoch)
            .batch(epoch, self.offset(epoch), step, None)
    }

    /// Collate user-chosen selections with this loader's settings.
    pub fn collate(&self, selections: Vec<Selection>) -> Result<Batch> {
        self.plan.collator.collate(&self.plan.ds, selections)
    }

    /// The state to save: the next batch is `step` of `epoch`.
    pub fn state(&self) -> LoaderState {
        self.state
    }

    /// Continue from a saved state. An offset needs the random order (the others cannot
    /// continue from a prefix of the epoch's order) and must lie within the epoch.
    pub fn set_state(&mut self, state: LoaderState) -> Result<()> {
        self.after_fork();
        if state.offset > 0 {
            if self.plan.options.strategy != Strategy::Random {
                return Err(Error::argument(
                    "offset",
                    "only batches in the default (random) order continue from an offset",
                ));
            }
            if state.offset >= self.plan.universe.len() {
                return Err(Error::argument(
                    "offset",
                    format!(
                        "{} is not within the {} rows of an epoch",
                        state.offset,
                        self.plan.universe.len()
                    ),
                ));
            }
        }
        self.state = state;
        self.prefetch = None;
        self.keep_ahead_of(state.epoch);
        Ok(())
    }

    /// Batches of epoch 0 from its start (computed once): a setting a checkpoint records.
    fn first_steps(&self) -> Result<u64> {
        if let Some(&n) = self.plan.first_steps.get() {
            return Ok(n);
        }
        let n = self.plan_for(0).steps(0, 0)?;
        Ok(*self.plan.first_steps.get_or_init(|| n))
    }

    /// What a checkpoint is valid for, by name: every setting of the options
    /// ([`Options::settings`]: all but the prefetch ones), the dataset's seal (`dataset`), and
    /// what they imply (`rows_per_epoch`, `steps_per_epoch` of epoch 0).
    pub fn settings(&self) -> Result<serde_json::Map<String, serde_json::Value>> {
        let mut m = self.plan.options.options().settings();
        m.insert(
            "dataset".into(),
            self.plan.ds.manifest().checksum.clone().into(),
        );
        m.insert("rows_per_epoch".into(), self.rows_per_epoch().into());
        m.insert("steps_per_epoch".into(), self.first_steps()?.into());
        Ok(m)
    }

    /// The state to checkpoint: the position ([`POSITION`]: epoch, step, offset) and
    /// [`Loader::settings`].
    pub fn checkpoint(&self) -> Result<serde_json::Map<String, serde_json::Value>> {
        let mut m = self.settings()?;
        let s = self.state;
        m.insert("epoch".into(), s.epoch.into());
        m.insert("step".into(), s.step.into());
        m.insert("offset".into(), s.offset.into());
        Ok(m)
    }

    /// Continue from a [`Loader::checkpoint`], which must have been taken with this loader's
    /// settings: a missing or unknown key, or a setting that differs (in value or in JSON
    /// type: 2, 2.0, "2" and true differ), is an [`Error::Argument`] naming it. The rank may
    /// differ (a state is a position of every rank).
    ///
    /// Elastic: a state taken with another `world_size` or `batch_size` (or both) continues
    /// the epoch in the default (random) order: the positions of the epoch's global order the
    /// earlier run trained on are skipped, and the rest of the epoch is sharded and cut into
    /// batches over this loader's ranks. With the uneven tail each row of the epoch trains
    /// exactly as often as in an uninterrupted epoch; with pad or drop, the tail is applied to
    /// the rest of the epoch on the new world size, so a resumption can repeat (pad) or leave
    /// out (drop) up to `world_size - 1` rows of that epoch more than an uninterrupted epoch
    /// would (as a DistributedSampler over the rest would). The other strategies refuse
    /// another world or batch size. An `offset` key absent (a state written before elastic
    /// resumption) is 0.
    pub fn restore(
        &mut self,
        state: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Resumed> {
        let own = self.settings()?;
        // A state written before a setting existed was taken with its default.
        let mut filled = state.clone();
        for (k, v) in Options::added_later() {
            filled.entry(k).or_insert(v);
        }
        let state = &filled;
        for k in state.keys() {
            if !POSITION.contains(&k.as_str()) && !own.contains_key(k) {
                let known: Vec<&str> = POSITION
                    .iter()
                    .copied()
                    .chain(own.keys().map(|k| k.as_str()))
                    .collect();
                return Err(Error::argument(
                    "state",
                    format!("state_dict has an unknown key {k:?} (expected {known:?})"),
                ));
            }
        }
        let uint = |k: &'static str, required: bool| -> Result<u64> {
            match state.get(k) {
                None if !required => Ok(0),
                None => Err(Error::argument(k, format!("state_dict has no {k:?}"))),
                Some(v) => v.as_u64().ok_or_else(|| {
                    Error::argument(
                        k,
                        format!(
                            "state_dict's {k} must be a non-negative integer, got {}",
                            described(v)
                        ),
                    )
                }),
            }
        };
        if state
            .get("epoch")
            .and_then(|e| e.as_u64())
            .is_some_and(|e| e > limits::EPOCH)
        {
            return Err(Error::argument(
                "epoch",
                format!("state_dict's epoch is beyond {}", limits::EPOCH),
            ));
        }
        // The rank may differ, but it is a rank: a non-negative integer (bounded below).
        if let Some(r) = state.get("rank") {
            if r.as_u64().is_none_or(|r| r >= limits::WORLD_SIZE) {
                return Err(Error::argument(
                    "rank",
                    format!(
                        "state_dict's rank must be a rank (0..{}), got {}",
                        limits::WORLD_SIZE,
                        described(r)
                    ),
                ));
            }
        }
        let (epoch, step, offset) = (
            uint("epoch", true)?,
            uint("step", true)?,
            uint("offset", false)?,
        );
        let mut missing: Vec<&str> = own
            .keys()
            .map(|k| k.as_str())
            .filter(|k| !state.contains_key(*k))
            .collect();
        missing.sort_by_key(|k| *k != "dataset");
        if let Some(first) = missing.first() {
            let list: Vec<String> = missing.iter().map(|k| format!("{k:?}")).collect();
            return Err(Error::argument(
                static_name(first),
                format!("state_dict has no {}", list.join(", ")),
            ));
        }
        // Settings that may differ: the rank always; world_size and batch_size when elastic
        // (and steps_per_epoch, which they imply: compared below when not elastic).
        let mut elastic: Vec<&'static str> = Vec::new();
        let mut steps_differ = None;
        for (k, want) in &own {
            let name = static_name(k);
            let got = &state[k]; // present: checked above
            if got == want || name == "rank" {
                continue;
            }
            let differs = Error::argument(
                name,
                format!(
                    "state_dict was taken with {k} = {}, this loader has {}",
                    described(got),
                    described(want)
                ),
            );
            match name {
                "world_size" | "batch_size" => {
                    let most = if name == "world_size" {
                        limits::WORLD_SIZE
                    } else {
                        limits::BATCH_SIZE as u64
                    };
                    if got.as_u64().is_none_or(|v| v == 0 || v > most) {
                        return Err(differs);
                    }
                    if self.plan.options.strategy != Strategy::Random {
                        return Err(Error::argument(
                            name,
                            format!(
                                "state_dict was taken with {k} = {}, this loader has {}: only \
                                 the default (random) order resumes with another world_size or \
                                 batch_size; resume with the same ones",
                                described(got),
                                described(want)
                            ),
                        ));
                    }
                    elastic.push(name);
                }
                "steps_per_epoch" => steps_differ = Some(differs),
                _ => return Err(differs),
            }
        }
        // Ranks differ in step counts only with the uneven tail (which splits DataLoader
        // workers' work): there another rank's state is compared and clamped by its own.
        let other_rank = state.get("rank") != own.get("rank");
        let uneven_rank = other_rank && self.plan.options.shard.tail == Tail::Uneven;
        if elastic.is_empty() {
            if let Some(differs) = steps_differ.filter(|_| !uneven_rank) {
                return Err(differs);
            }
            let steps = self
                .plan
                .steps(epoch, offset.min(self.plan.universe.len()))?;
            let step = if uneven_rank { step.min(steps) } else { step };
            let at = LoaderState {
                epoch,
                step,
                offset,
            };
            if step > steps {
                return Err(Error::argument(
                    "step",
                    format!("step {step} is beyond the {steps} batches of epoch {epoch}"),
                ));
            }
            self.set_state(at)?;
            return Ok(Resumed::Exact);
        }
        // The earlier run's shape: its batches of the epoch began at `offset`.
        let world = state["world_size"].as_u64().unwrap_or(1);
        let batch = state["batch_size"].as_u64().unwrap_or(1);
        let n = self.plan.universe.len();
        if offset >= n.max(1) {
            return Err(Error::argument(
                "offset",
                format!("offset {offset} is not within the {n} rows of an epoch"),
            ));
        }
        let shard = Shard {
            rank: 0,
            world_size: world,
            tail: self.plan.options.shard.tail,
        };
        let per_rank = shard.samples_per_rank(n - offset);
        let steps = batches(per_rank, batch, self.plan.options.drop_last);
        if step > steps {
            return Err(Error::argument(
                "step",
                format!(
                    "step {step} is beyond the {steps} batches of epoch {epoch} at world_size \
                     {world} and batch_size {batch}"
                ),
            ));
        }
        if step == steps {
            self.set_epoch(epoch + 1);
            return Ok(Resumed::Elastic { consumed: n });
        }
        // Steps 0..step of every rank held the global positions below step * batch * world.
        let consumed = offset + step * batch * world;
        self.set_state(LoaderState {
            epoch,
            step: 0,
            offset: consumed,
        })?;
        Ok(Resumed::Elastic { consumed })
    }

    /// In a process forked from the one that made (or last used) this loader, start from the
    /// same plan with empty caches: a lock of the parent's caches may have been held at the
    /// fork by one of its threads (a prefetch thread computing an epoch's plan, a plan computed
    /// ahead), which the child does not have, so the child never touches them. `next`,
    /// `set_epoch` and `set_state` call this; a caller that forks and then uses the `&self`
    /// methods (`batch`, `steps`, ...) calls it first. O(1) otherwise (a pid check).
    pub fn after_fork(&mut self) {
        let pid = std::process::id();
        if self.plan_pid != pid {
            let fresh = Arc::new(self.plan.fresh());
            // Never dropped here: its locks are the parent's.
            std::mem::forget(std::mem::replace(&mut self.plan, fresh));
            self.plan_pid = pid;
        }
    }

    /// Start epoch `epoch` from its first batch.
    pub fn set_epoch(&mut self, epoch: u64) {
        self.after_fork();
        self.state = LoaderState {
            epoch,
            step: 0,
            offset: 0,
        };
        self.prefetch = None;
        self.keep_ahead_of(epoch);
    }

    /// The plan, for a caller about to use `epoch`'s: a pass computed ahead for `epoch` that
    /// has not ended yet is stopped, so the caller computes the plan at once on every core
    /// instead of waiting for one thread (an epoch shorter than that pass starts no later than
    /// without it); one that has ended has cached it.
    fn plan_for(&self, epoch: u64) -> &Plan {
        if let Some(a) = &self.ahead {
            if a.epoch == epoch
                && a.pid == std::process::id()
                && matches!(a.done.try_recv(), Err(TryRecvError::Empty))
            {
                a.stop.store(true, Ordering::Relaxed);
            }
        }
        &self.plan
    }

    /// After the current epoch's first batch: compute the next epoch's plan on a background
    /// thread (length, token-budget and no-duplicates batches), so its start does not wait
    /// for a pass over every row. One thread, at most one pass at a time; the plan is the same
    /// as computed on demand (a pure function of the epoch), only earlier.
    fn look_ahead(&mut self) {
        let Some(epoch) = self.state.epoch.checked_add(1) else {
            return;
        };
        if !self.plan.plans_epochs() {
            return;
        }
        let pid = std::process::id();
        if self
            .ahead
            .as_ref()
            .is_some_and(|a| a.pid == pid && a.epoch == epoch)
        {
            return;
        }
        self.stop_ahead();
        let stop = Arc::new(AtomicBool::new(false));
        let (done, rx) = sync_channel::<()>(0);
        let (plan, flag) = (self.plan.clone(), stop.clone());
        let spawned = std::thread::Builder::new()
            .name("rankfeed-plan-ahead".into())
            .spawn(move || {
                let _done = done;
                // An error (or a stop) leaves the epoch uncached: computed on demand, where
                // the error reaches the caller.
                let _ = plan.plan_ahead(epoch, &flag);
            });
        if spawned.is_ok() {
            self.ahead = Some(Ahead {
                pid,
                epoch,
                stop,
                done: rx,
            });
        }
    }

    /// Stop a pass computed ahead unless it is for `epoch`.
    fn keep_ahead_of(&mut self, epoch: u64) {
        if self.ahead.as_ref().is_some_and(|a| a.epoch != epoch) {
            self.stop_ahead();
        }
    }

    /// Stop the pass computed ahead, if any (it ends at its next check, within 64 rows).
    fn stop_ahead(&mut self) {
        if let Some(a) = self.ahead.take() {
            a.stop.store(true, Ordering::Relaxed);
            if a.pid != std::process::id() {
                // Forked: the thread did not come along. Leave its channel untouched.
                std::mem::forget(a.done);
            }
        }
    }

    /// The offset of `epoch`: the state's in the current epoch, else 0.
    fn offset(&self, epoch: u64) -> u64 {
        if epoch == self.state.epoch {
            self.state.offset
        } else {
            0
        }
    }

    fn start_prefetch(&mut self) -> Result<()> {
        let o = &self.plan.options;
        let threads = o.prefetch_threads;
        let per_thread = o.prefetch_depth.div_ceil(threads).max(1);
        let (epoch, first, offset) = (self.state.epoch, self.state.step, self.state.offset);
        let steps = self.plan.steps(epoch, offset)?;
        let mut receivers = Vec::with_capacity(threads);
        for t in 0..threads as u64 {
            let (tx, rx) = sync_channel(per_thread);
            let plan = self.plan.clone();
            std::thread::Builder::new()
                .name(format!("rankfeed-prefetch-{t}"))
                .spawn(move || {
                    let mut step = first + t;
                    while step < steps {
                        let batch = plan.batch(epoch, offset, step, Some(step + threads as u64));
                        if tx.send(batch).is_err() {
                            return;
                        }
                        step += threads as u64;
                    }
                })
                .map_err(|e| Error::io("<prefetch thread>", e))?;
            receivers.push(rx);
        }
        self.prefetch = Some(Prefetch {
            pid: std::process::id(),
            epoch,
            receivers,
            next: first,
            first,
        });
        Ok(())
    }
}

impl Iterator for Loader {
    type Item = Result<Batch>;

    /// The next batch of the current epoch; after the last one, `None` once, and the loader
    /// moves to the next epoch (so `for batch in &mut loader` is one epoch).
    fn next(&mut self) -> Option<Result<Batch>> {
        self.after_fork();
        let steps = match self.steps(self.state.epoch) {
            Ok(s) => s,
            Err(e) => return Some(Err(e)),
        };
        if self.state.step >= steps {
            self.set_epoch(self.state.epoch + 1);
            return None;
        }
        let batch = if self.plan.options.prefetch_threads == 0 {
            let (epoch, step, offset) = (self.state.epoch, self.state.step, self.state.offset);
            self.plan.batch(epoch, offset, step, Some(step + 1))
        } else {
            let stale = self.prefetch.as_ref().is_none_or(|p| {
                p.pid != std::process::id()
                    || p.epoch != self.state.epoch
                    || p.next != self.state.step
            });
            if stale {
                if let Some(p) = self.prefetch.take() {
                    if p.pid != std::process::id() {
                        // Forked: the threads did not come along, and a channel lock may have
                        // been held mid-send at the fork. Leak the receivers, never touch them.
                        std::mem::forget(p.receivers);
                    }
                }
                if let Err(e) = self.start_prefetch() {
                    return Some(Err(e));
                }
            }
            let p = self.prefetch.as_mut().expect("started above");
            let t = ((p.next - p.first) % p.receivers.len() as u64) as usize;
            p.next += 1;
            p.receivers[t]
                .recv()
                .unwrap_or_else(|_| Err(Error::Internal("a prefetch thread stopped".into())))
        };
        self.state.step += 1;
        if batch.is_ok() {
            self.look_ahead();
        }
        Some(batch)
    }
}

/// Indices of the negatives of `g` that are not one of its positives (same passage id).
fn true_negatives(g: &GroupIds<'_>) -> Vec<u32> {
    (0..g.neg.len() as u32)
        .filter(|&j| !g.pos.contains(&g.neg[j as usize]))
        .collect()
}

/// Whether some negative of `g` is one of its positives.
fn has_false_negative(g: &GroupIds<'_>) -> bool {
    g.neg.iter().any(|n| g.pos.contains(n))
}

/// Draw the group of `row` in `epoch` ([`sample_group`]); with `exclude_false_negatives`, from
/// the negatives that are not positives of the row, their indices mapped back to the row's
/// `neg` (a row without false negatives draws exactly as without the option).
pub fn draw_group(
    o: &LoaderOptions,
    epoch: u64,
    row: u64,
    g: &GroupIds<'_>,
    neg: &mut Vec<u32>,
) -> Result<u32> {
    let g_size = o.collate.group_size;
    if o.exclude_false_negatives && g_size >= 2 && has_false_negative(g) {
        let keep = true_negatives(g);
        let pos = sample_group(o.seed, epoch, row, g.pos.len(), keep.len(), g_size, neg)?;
        for j in neg.iter_mut() {
            *j = keep[*j as usize];
        }
        return Ok(pos);
    }
    sample_group(o.seed, epoch, row, g.pos.len(), g.neg.len(), g_size, neg)
}

/// The rows a run trains on: by source when the manifest counts each source's rows, with
/// rows without negatives left out when asked, capped and weighted.
fn universe(ds: &Dataset, options: &LoaderOptions) -> Result<Universe> {
    let m = ds.manifest();
    let accepted: Vec<u64> = m.sources.iter().map(|s| s.rows_accepted).collect();
    let by_source = accepted.iter().sum::<u64>() == ds.len() as u64 && !accepted.is_empty();
    let mut universe = if by_source {
        Universe::sources(&accepted, options.seed)
    } else {
        let per_source = [
            (
                "max_example_num_per_dataset",
                options.max_example_num_per_dataset.is_some(),
            ),
            ("weights", options.weights.is_some()),
            (
                "same_source",
                matches!(options.strategy, Strategy::SameSource { .. }),
            ),
        ];
        if let Some((name, _)) = per_source.iter().find(|(_, on)| *on) {
            return Err(Error::argument(
                name,
                "needs per-source row counts, which this dataset's manifest lacks",
            ));
        }
        Universe::all(ds.len() as u64)
    };
    let g = options.collate.group_size;
    let mut empty_neg: u64 = m.sources.iter().map(|s| s.rows_empty_neg).sum();
    if options.exclude_false_negatives && g >= 2 {
        // Rows whose every negative is a positive have no negative left: one pass over the
        // passage id lists (not the tokens).
        let mut none_left = 0u64;
        for r in 0..ds.len() {
            let ids = ds.group_ids(r)?;
            if !ids.neg.is_empty() && true_negatives(&ids).is_empty() {
                none_left += 1;
            }
        }
        if none_left > 0 {
            if options.skip_rows_without_negatives {
                universe = universe.filter(|r| {
                    let ids = ds.group_ids(r as usize)?;
                    Ok(ids.neg.is_empty() || !true_negatives(&ids).is_empty())
                })?;
            } else {
                return Err(Error::argument(
                    "exclude_false_negatives",
                    format!(
                        "{none_left} rows have negatives that are all positives of their row, so none is left \
                         for group_size {g}; skip them with skip_rows_without_negatives (CLI: \
                         --skip-empty-neg), or find them with `rankfeed audit`"
                    ),
                ));
            }
        }
        empty_neg += none_left;
    }
    let mut universe = if g >= 2 && (empty_neg > 0 || !by_source) {
        if options.skip_rows_without_negatives {
            universe.filter(|r| Ok(!ds.group_ids(r as usize)?.neg.is_empty()))?
        } else if empty_neg > 0 {
            return Err(Error::argument(
                "group_size",
                format!(
                    "{empty_neg} rows have no negatives, but group_size {g} needs {} per group; \
                     skip them with skip_rows_without_negatives (CLI: --skip-empty-neg) or use group_size 1",
                    g - 1
                ),
            ));
        } else {
            universe
        }
    } else {
        universe
    };
    if let Some(cap) = options.max_example_num_per_dataset {
        universe = universe.cap(cap);
    }
    if let Some(w) = &options.weights {
        universe = universe.weigh(w)?;
    }
    Ok(universe)
}

/// An epoch with rows but no batch is an error naming its cause (an epoch of 0 steps would
/// train nothing, silently): more ranks than rows with the drop tail, fewer rows per rank than
/// `batch_size` with `drop_last`, or no source filling a same-source global batch. Epochs do
/// not change length (only their token-budget plan does, never to 0 steps while they have
/// rows), so epoch 0 speaks for all. The uneven tail is left alone: it splits work among
/// DataLoader workers, where a worker may have nothing to do.
fn check_steps(universe: &Universe, o: &LoaderOptions, schedule: &Schedule) -> Result<()> {
    let (n, w, b) = (universe.len(), o.shard.world_size, o.batch_size as u64);
    if n == 0 || o.shard.tail == Tail::Uneven {
        return Ok(());
    }
    if o.shard.tail == Tail::Drop && n < w {
        return Err(Error::argument(
            "world_size",
            format!(
                "world_size {w} is above the {n} rows of an epoch: with the drop shard tail \
                 every rank would get 0 rows and 0 steps (use fewer ranks or shard_tail='pad')"
            ),
        ));
    }
    match schedule {
        Schedule::SameSource(ss) if ss.batches.is_empty() => Err(Error::argument(
            "same_source",
            format!(
                "an epoch of {n} rows would have 0 same-source batches: the batch sources (after \
                 small_threshold and drop_threshold) give {:?} rows each, and with the drop tail \
                 or drop_last none fills a global batch of world_size {w} x its batch size {:?} \
                 (use smaller batch sizes, fewer ranks, lower thresholds, or the pad tail)",
                ss.takes, ss.sizes
            ),
        )),
        Schedule::Random | Schedule::Grouped(_)
            if o.drop_last && o.shard.samples_per_rank(n) < b =>
        {
            Err(Error::argument(
                "drop_last",
                format!(
                    "{} rows per rank ({n} rows, world_size {w}) are fewer than batch_size {b}: \
                     with drop_last an epoch would have 0 steps",
                    o.shard.samples_per_rank(n)
                ),
            ))
        }
        _ => Ok(()),
    }
}

/// How epochs are cut into batches, from the options.
fn schedule(ds: &Dataset, universe: &Universe, o: &LoaderOptions) -> Result<Schedule> {
    let c = &o.collate;
    Ok(match &o.strategy {
        Strategy::SameSource {
            batch_sizes,
            small_threshold,
            drop_threshold,
        } => {
            let (groups, takes, sizes) = batch_sources(
                &ds.manifest().sources,
                &universe.takes(),
                Grouping {
                    sizes: batch_sizes.as_deref(),
                    default_size: o.batch_size as u64,
                    small_threshold: *small_threshold,
                    drop_threshold: *drop_threshold,
                },
            )?;
            // drop_last drops each source's incomplete global batch, as the drop tail does.
            let tail = match o.shard.tail {
                Tail::Pad if o.drop_last => Tail::Drop,
                t => t,
            };
            let batches = SourceBatches::new(&takes, &sizes, o.shard.world_size, tail)?;
            Schedule::SameSource(SameSource {
                batches,
                groups,
                takes,
                sizes,
            })
        }
        Strategy::TokenBudget {
            max_tokens,
            megabatch,
        } => Schedule::Budget(Budget {
            max_tokens: *max_tokens as u64,
            max_groups: o.batch_size as u64,
            world: o.shard.world_size,
            mult: megabatch.map(|m| m as u64),
            cost: if c.packed {
                Cost::Packed
            } else {
                Cost::Padded {
                    group_size: c.group_size as u64,
                    multiple: c.pad_to_multiple_of.unwrap_or(1) as u64,
                }
            },
        }),
        Strategy::LengthGrouped { megabatch } => Schedule::Grouped(*megabatch as u64),
        Strategy::NoDuplicates => Schedule::NoDup(NoDup {
            world: o.shard.world_size,
            rank: o.shard.rank,
            batch: o.batch_size as u64,
            tail: o.shard.tail,
            drop_last: o.drop_last,
        }),
        Strategy::Random => Schedule::Random,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_split_across_threads_is_the_sequential_pass() {
        let f = |i: usize| xxhash_rust::xxh3::xxh3_64(&i.to_le_bytes());
        for n in [0, 1, 7, 1000, 65_535, 65_536, 200_003] {
            for (min, threads) in [(1, 2), (64, 3), (65_536, 8), (1, 1)] {
                let pass = Pass {
                    threads,
                    stop: None,
                };
                let bounds = even_bounds(n, min, pass);
                assert_eq!((bounds[0], *bounds.last().unwrap()), (0, n));
                assert!(bounds.windows(2).all(|w| w[0] <= w[1]), "{bounds:?}");
                let mut out = vec![0u64; n];
                fill_parts(&mut out, &bounds, |k, part| {
                    for (j, v) in part.iter_mut().enumerate() {
                        *v = f(bounds[k] + j);
                    }
                    Ok(())
                })
                .unwrap();
                assert!(out.iter().enumerate().all(|(i, &v)| v == f(i)), "n {n}");
            }
        }
        // The first error in part order is the one returned.
        let bounds = [0, 10, 20, 30];
        let e = fill_parts(&mut [0u8; 30], &bounds, |k, _| match k {
            0 => Ok(()),
            k => Err(Error::Internal(format!("part {k}"))),
        })
        .unwrap_err();
        assert!(e.to_string().contains("part 1"), "{e}");
    }

    #[test]
    fn a_row_ordered_pass_is_the_pass_by_position() {
        // Rows repeated (weighted sources, padded shards), left out (subsets, other ranks) and
        // in any order: each position gets its row's value.
        let f = |r: u64, scratch: &mut Vec<u32>| -> Result<u64> {
            scratch.clear();
            scratch.push(r as u32);
            Ok(xxhash_rust::xxh3::xxh3_64(&r.to_le_bytes()) | 1)
        };
        for (rows, n, k) in [
            (0usize, 0u64, 1u64),
            (10, 7, 3),
            (1000, 1000, 7),
            (70_000, 200_003, 31),
            (300_000, 70_000, 13),
        ] {
            let row = |i: u64| (i * k + i / 3) % rows as u64;
            let mut scratch = Vec::new();
            let want: Vec<u64> = (0..n).map(|i| f(row(i), &mut scratch).unwrap()).collect();
            for threads in [1, 2, 5] {
                let pass = Pass {
                    threads,
                    stop: None,
                };
                let got = row_pass(pass, rows, n, row, f).unwrap();
                assert_eq!(got, want, "{rows} {n} {threads}");
            }
        }
        // A pass told to stop stops with an error.
        let stop = AtomicBool::new(true);
        let pass = Pass {
            threads: 1,
            stop: Some(&stop),
        };
        assert!(row_pass(pass, 100, 100, |i| i, |r, _: &mut ()| Ok(r)).is_err());
        // An error is returned, and a row outside the dataset is one.
        let e = row_pass(
            Pass::now(),
            100_000,
            100_000,
            |i| i,
            |r, _: &mut ()| {
                if r == 99_000 {
                    Err(Error::Internal(format!("at {r}")))
                } else {
                    Ok(r)
                }
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("at 99000"), "{e}");
        assert!(row_pass(Pass::now(), 10, 3, |i| i + 8, |r, _: &mut ()| Ok(r)).is_err());
    }

    /// A small length-grouped (or token-budget) loader over a written dataset.
    fn planned_loader(strategy: Strategy, dir: &std::path::Path) -> Loader {
        use crate::writer::{DatasetWriter, GroupRecord, ManifestInfo, WriterOptions};
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let facts = crate::tokenizer::TextTokenizer::from_file(
            root.join("data/sample/bert/tokenizer.json"),
        )
        .unwrap()
        .facts()
        .clone();
        let dir = dir.join("ds");
        let mut w = DatasetWriter::create(&dir, WriterOptions::default()).unwrap();
        for p in 0..200i32 {
            w.add_passage(&vec![1000 + p; 1 + (p % 37) as usize])
                .unwrap();
        }
        for r in 0..3000i32 {
            w.add_group(&GroupRecord {
                query: &vec![2000 + r % 50; 1 + (r % 9) as usize],
                pos: &[r % 200],
                neg: &[(r * 7 + 1) % 200, (r * 13 + 5) % 200, (r * 3 + 9) % 200],
                pos_scores: None,
                neg_scores: None,
                prompt: None,
                source: 0,
            })
            .unwrap();
        }
        w.finish(ManifestInfo {
            tokenizer: Some(facts),
            text: Default::default(),
            sources: vec![crate::format::SourceStats {
                path: "in.jsonl".into(),
                rows_read: 3000,
                rows_accepted: 3000,
                ..Default::default()
            }],
            shards: None,
        })
        .unwrap();
        let ds = Arc::new(Dataset::open(&dir).unwrap());
        let mut o = LoaderOptions {
            batch_size: 8,
            strategy,
            ..Default::default()
        };
        o.collate.group_size = 4;
        Loader::new(ds, o).unwrap()
    }

    #[test]
    fn the_next_epochs_plan_is_computed_ahead_and_stopped_when_not_needed() {
        let _serial = SHARED_SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        for strategy in [
            Strategy::LengthGrouped { megabatch: 5 },
            Strategy::TokenBudget {
                max_tokens: 512,
                megabatch: Some(5),
            },
            Strategy::NoDuplicates,
        ] {
            let dir = tempfile::tempdir().unwrap();
            let mut l = planned_loader(strategy.clone(), dir.path());
            let cached = |l: &Loader, e: u64| match l.plan.schedule {
                Schedule::Grouped(_) => has(&l.plan.lengths, e).unwrap(),
                Schedule::Budget(_) => has(&l.plan.budget, e).unwrap(),
                _ => has(&l.plan.no_dup, e).unwrap(),
            };
            assert!(
                l.ahead.is_none(),
                "nothing computed ahead before the first batch"
            );
            l.next().unwrap().unwrap();
            let a = l.ahead.as_ref().expect("epoch 1 computed ahead");
            assert_eq!(a.epoch, 1);
            let _ = a.done.recv();
            assert!(cached(&l, 1), "{strategy:?}: epoch 1's plan is cached");
            assert!(cached(&l, 0), "{strategy:?}: epoch 0's plan is kept");
            // Moving elsewhere stops it; the epoch served then plans its next.
            l.set_epoch(5);
            assert!(l.ahead.is_none());
            l.next().unwrap().unwrap();
            assert_eq!(l.ahead.as_ref().map(|a| a.epoch), Some(6));
            // The epoch computed ahead is the epoch computed on demand.
            let _ = l.ahead.as_ref().unwrap().done.recv();
            let other = tempfile::tempdir().unwrap();
            let fresh = planned_loader(strategy.clone(), other.path());
            for k in 0..l.steps(6).unwrap() {
                assert_eq!(l.selections(6, k).unwrap(), fresh.selections(6, k).unwrap());
            }
        }
    }

    /// The loader tests that put plans in the process's [`SharedPlans`] run one at a time, so
    /// none evicts the plan another is checking.
    static SHARED_SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn loaders_of_one_dataset_and_settings_share_their_plans() {
        let _serial = SHARED_SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let strategy = Strategy::LengthGrouped { megabatch: 5 };
        let a = planned_loader(strategy.clone(), dir.path());
        let plan_of = |l: &Loader, e: u64| {
            l.steps(e).unwrap();
            l.selections(e, 0).unwrap();
            let c = lock(&l.plan.lengths).unwrap();
            c.iter()
                .find(|(k, _)| *k == e)
                .map(|(_, v)| v.clone())
                .unwrap()
        };
        let first = plan_of(&a, 3);
        // Another loader of the dataset (opened again), same settings but the prefetch ones:
        // the same plan, not computed again.
        let ds = Arc::new(Dataset::open(dir.path().join("ds")).unwrap());
        let o = LoaderOptions {
            prefetch_threads: 3,
            ..a.options().clone()
        };
        let b = Loader::new(ds.clone(), o.clone()).unwrap();
        assert!(Arc::ptr_eq(&first, &plan_of(&b, 3)));
        // Another seed is another plan.
        let c = Loader::new(ds, LoaderOptions { seed: 99, ..o }).unwrap();
        let other = plan_of(&c, 3);
        assert!(!Arc::ptr_eq(&first, &other));
        assert_ne!(*first, *other);
    }
}
