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

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

use crate::collate::{Batch, CollateOptions, Collator};
use crate::dataset::{Dataset, GroupIds};
use crate::error::{Error, Result};
use crate::limits::{self, range};
use crate::sample::budget::{Budget, BudgetPlan, Cost};
use crate::sample::length::LengthOrder;
use crate::sample::same_source::{batch_sources, BatchSource, Grouping, SourceBatches};
use crate::sample::{sample_group, EpochOrder, Selection, Shard, Tail, Universe};
use crate::storage;

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
    /// error: token-budget batches have no fixed size to fall short of.
    pub drop_last: bool,
    /// `max_example_num_per_dataset`: keep a seeded random subset of each larger source.
    pub max_example_num_per_dataset: Option<u64>,
    /// Leave out rows with no negatives (otherwise they are an error when group_size >= 2).
    pub skip_rows_without_negatives: bool,
    /// Background threads computing batches (0: compute in the caller's thread).
    pub prefetch_threads: usize,
    /// Batches computed ahead, in total.
    pub prefetch_depth: usize,
    /// Length-grouped batches with this megabatch multiplier `M` (see [`crate::sample::length`]):
    /// each run of `M * batch_size` groups of the epoch order is sorted by the length the
    /// collator pads each group to, longest first, and cut into `M` batches; the batch
    /// holding the epoch's longest group trades places with batch 0, so out-of-memory shows at
    /// step 0.
    pub length_grouped: Option<usize>,
    /// Token-budget batches (see [`crate::sample::budget`]): each batch takes as many groups
    /// as fit `max_tokens` (padded: groups x group_size x padded length; packed: real
    /// tokens), at most `batch_size`; every rank takes the same number of steps. With
    /// `length_grouped` the groups are sorted by length within megabatches first. The number
    /// of steps varies by epoch.
    pub max_tokens: Option<usize>,
    /// Weighted mixing (see [`crate::sample::universe`]): one weight per source (input file,
    /// in the manifest's order); source `s` gives each epoch `weights[s] / sum(weights)` of
    /// its rows, the epoch keeping its length.
    pub weights: Option<Vec<f64>>,
    /// Same-source batches (see [`crate::sample::same_source`]): every global batch (all
    /// ranks at one step) holds rows of one source.
    pub same_source: bool,
    /// With `same_source`: groups per rank in a batch of each source (default: the source's
    /// `batch_size` row field, else `batch_size`).
    pub source_batch_sizes: Option<Vec<usize>>,
    /// With `same_source`: sources with fewer rows per epoch than this are merged with the
    /// other small sources of their directory (FlagEmbedding's `small_threshold`; 0: none).
    pub small_threshold: u64,
    /// With `same_source`: a merged group of small sources with fewer rows than this is left
    /// out (FlagEmbedding's `drop_threshold`).
    pub drop_threshold: u64,
    /// Collation settings.
    pub collate: CollateOptions,
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
            prefetch_threads: 1,
            prefetch_depth: 8,
            length_grouped: None,
            max_tokens: None,
            weights: None,
            same_source: false,
            source_batch_sizes: None,
            small_threshold: 0,
            drop_threshold: 0,
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
        if let Some(m) = self.length_grouped {
            range("length_grouped", m, 1, limits::MEGABATCH_MULT)?;
        }
        if let Some(t) = self.max_tokens {
            range("max_tokens", t, 1, limits::MAX_TOKENS)?;
        }
        for &b in self.source_batch_sizes.iter().flatten() {
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
        match self.source_batch_sizes.iter().flatten().max() {
            Some(&b) if self.same_source => self.check_batch_bytes("source_batch_sizes", b),
            _ => Ok(()),
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

    /// The batching strategies that do not combine.
    fn check_combination(&self) -> Result<()> {
        let conflict = |a: &'static str, b: &str| {
            Err(Error::argument(a, format!("{a} does not combine with {b}")))
        };
        if self.same_source && self.length_grouped.is_some() {
            return conflict("same_source", "length_grouped");
        }
        if self.same_source && self.max_tokens.is_some() {
            return conflict("same_source", "max_tokens");
        }
        for (name, set) in [
            ("source_batch_sizes", self.source_batch_sizes.is_some()),
            ("small_threshold", self.small_threshold > 0),
            ("drop_threshold", self.drop_threshold > 0),
        ] {
            if set && !self.same_source {
                return Err(Error::argument(name, "only applies with same_source"));
            }
        }
        if self.max_tokens.is_some() && self.shard.tail == Tail::Uneven {
            return conflict("max_tokens", "the uneven shard tail (use pad or drop)");
        }
        if self.max_tokens.is_some() && self.drop_last {
            return conflict(
                "drop_last",
                "max_tokens: token-budget batches vary in size by design, so none is an \
                 incomplete batch to drop (leave drop_last off)",
            );
        }
        Ok(())
    }
}

/// Where a loader is: the next batch is `step` of `epoch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LoaderState {
    /// Epoch.
    pub epoch: u64,
    /// Batches of that epoch already yielded.
    pub step: u64,
}

/// A megabatch's positions sorted by group length, keyed by (epoch, megabatch).
type SortedMegabatch = ((u64, u64), Arc<Vec<u64>>);

/// A per-epoch value computed once and shared by the prefetch threads.
type EpochCache<T> = std::sync::Mutex<Option<(u64, Arc<T>)>>;

/// How an epoch is cut into batches.
#[derive(Debug)]
enum Schedule {
    /// `batch_size` consecutive positions of the rank's order.
    Random,
    /// Length-grouped megabatches with this multiplier.
    Grouped(u64),
    /// Token-budget batches, planned once per epoch.
    Budget(Budget),
    /// Same-source batches.
    SameSource(SameSource),
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
}

/// The cached value for `epoch`, or `make()` stored as it. The lock is held while computing,
/// so other threads wait for the value instead of computing it again.
fn cached<T>(
    cache: &EpochCache<T>,
    epoch: u64,
    make: impl FnOnce() -> Result<T>,
) -> Result<Arc<T>> {
    let mut c = cache
        .lock()
        .map_err(|_| Error::Internal("an epoch cache was poisoned".into()))?;
    if let Some((e, v)) = c.as_ref() {
        if *e == epoch {
            return Ok(v.clone());
        }
    }
    let v = Arc::new(make()?);
    *c = Some((epoch, v.clone()));
    Ok(v)
}

impl Plan {
    fn steps(&self, epoch: u64) -> Result<u64> {
        let b = self.options.batch_size as u64;
        Ok(match &self.schedule {
            Schedule::Budget(_) => self.budget_plan(epoch)?.len(),
            Schedule::SameSource(ss) => ss.batches.len(),
            Schedule::Random | Schedule::Grouped(_) => {
                let n = self.options.shard.samples_per_rank(self.universe.len());
                if self.options.drop_last {
                    n / b
                } else {
                    n.div_ceil(b)
                }
            }
        })
    }

    /// Rows `[lo, hi)` of batch `step` of `epoch` in `order`.
    fn span(&self, order: &EpochOrder, step: u64) -> std::ops::Range<u64> {
        let b = self.options.batch_size as u64;
        (step * b).min(order.len())..((step + 1) * b).min(order.len())
    }

    fn order(&self, epoch: u64) -> EpochOrder<'_> {
        let o = &self.options;
        EpochOrder::new(&self.universe, o.seed, epoch, o.shard, o.shuffle)
    }

    /// The selection (positive, negatives) of `row` in `epoch`: a pure function of both.
    fn select(&self, epoch: u64, row: u64) -> Result<Selection> {
        let o = &self.options;
        let group = self.ds.group_ids(row as usize)?;
        // The collator reads the drawn entries of these lists next.
        storage::prefetch(&group.pos[..group.pos.len().min(64)]);
        storage::prefetch(&group.neg[..group.neg.len().min(64)]);
        let mut neg = Vec::with_capacity(o.collate.group_size.saturating_sub(1));
        let pos = sample_group(
            o.seed,
            epoch,
            row,
            group.pos.len(),
            group.neg.len(),
            o.collate.group_size,
            &mut neg,
        )?;
        Ok(Selection { row, pos, neg })
    }

    /// Length grouping: the positions (in the epoch order) of batch `step`'s groups (see
    /// [`crate::sample::length`]); the megabatch is sorted once and cached for its batches.
    /// The epoch is the positions its batches hold: with `drop_last`, the short tail is left
    /// out before sorting, as in random order (it would otherwise sort into the kept batches).
    fn grouped_span(
        &self,
        order: &EpochOrder,
        epoch: u64,
        step: u64,
        mult: u64,
    ) -> Result<Vec<u64>> {
        let b = self.options.batch_size as u64;
        let kept = if self.options.drop_last {
            order.len() / b * b
        } else {
            order.len()
        };
        let lengths = cached(&self.lengths, epoch, || {
            let mut neg = Vec::with_capacity(self.options.collate.group_size);
            Ok(LengthOrder::new(
                (0..kept)
                    .map(|i| self.length_of(epoch, order.row(i), &mut neg))
                    .collect::<Result<Vec<u32>>>()?,
            ))
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

    /// The group length of `row` in `epoch` ([`Collator::group_len`] of its selection), with
    /// `neg` as scratch space: the length pass calls this for every row of an epoch.
    fn length_of(&self, epoch: u64, row: u64, neg: &mut Vec<u32>) -> Result<u32> {
        let (g, pos) = self.draw(epoch, row, neg)?;
        Ok(self.collator.drawn_len(&self.ds, &g, row, pos, neg)? as u32)
    }

    /// The group of `row` and its positive in `epoch`, its negatives into `neg` (what
    /// [`Plan::select`] draws, without its prefetching and allocation: for passes over every
    /// row of an epoch).
    fn draw(&self, epoch: u64, row: u64, neg: &mut Vec<u32>) -> Result<(GroupIds<'_>, u32)> {
        let o = &self.options;
        let g = self.ds.group_ids(row as usize)?;
        let (n_pos, n_neg) = (g.pos.len(), g.neg.len());
        let pos = sample_group(o.seed, epoch, row, n_pos, n_neg, o.collate.group_size, neg)?;
        Ok((g, pos))
    }

    /// Token budget: the epoch's plan, from the group lengths of the global order (every
    /// rank computes the same plan, one group-length computation per row: no tokens).
    fn budget_plan(&self, epoch: u64) -> Result<Arc<BudgetPlan>> {
        let Schedule::Budget(budget) = self.schedule else {
            return Err(Error::Internal("no token budget".into()));
        };
        cached(&self.budget, epoch, || {
            let order = self.order(epoch);
            let n = order.global_len();
            let (mut sizes, mut longest) = (
                Vec::with_capacity(n as usize),
                Vec::with_capacity(n as usize),
            );
            let mut neg = Vec::with_capacity(self.options.collate.group_size);
            for p in 0..n {
                let row = order.global_row(p);
                let (g, pos) = self.draw(epoch, row, &mut neg)?;
                let (l, total) = self.collator.drawn_tokens(&self.ds, &g, row, pos, &neg)?;
                longest.push(l as u32);
                sizes.push(match budget.cost {
                    Cost::Packed => total.min(u32::MAX as usize) as u32,
                    Cost::Padded { .. } => l as u32,
                });
            }
            Ok(BudgetPlan::new(&sizes, &longest, budget))
        })
    }

    fn selections(&self, epoch: u64, step: u64) -> Result<Vec<Selection>> {
        Ok(self.drawn(epoch, step)?.0)
    }

    /// The selections of batch `step` of `epoch`, and whether the batch is marked
    /// `no_in_batch_neg` (same-source batches of a source so named).
    fn drawn(&self, epoch: u64, step: u64) -> Result<(Vec<Selection>, bool)> {
        let o = &self.options;
        let order = self.order(epoch);
        let mut no_in_batch_neg = false;
        let rows: Vec<u64> = match &self.schedule {
            Schedule::Random => self.span(&order, step).map(|i| order.row(i)).collect(),
            Schedule::Grouped(mult) => self
                .grouped_span(&order, epoch, step, *mult)?
                .into_iter()
                .map(|i| order.row(i))
                .collect(),
            Schedule::Budget(_) => self
                .budget_plan(epoch)?
                .batch(step, o.shard.rank)
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
    fn batch(&self, epoch: u64, step: u64, next: Option<u64>) -> Result<Batch> {
        let steps = self.steps(epoch)?;
        if step >= steps {
            return Err(Error::OutOfRange {
                what: "step",
                index: step,
                len: steps,
            });
        }
        let (selections, no_in_batch_neg) = self.drawn(epoch, step)?;
        if let (Schedule::Random, Some(next)) = (&self.schedule, next.filter(|&n| n < steps)) {
            let order = self.order(epoch);
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
#[derive(Debug)]
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

/// An iterator of batches; see the module docs.
pub struct Loader {
    plan: Arc<Plan>,
    state: LoaderState,
    prefetch: Option<Prefetch>,
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
        Ok(Loader {
            plan: Arc::new(Plan {
                ds,
                universe,
                collator,
                options,
                schedule,
                lengths: std::sync::Mutex::new(None),
                sorted: std::sync::Mutex::new(Vec::new()),
                budget: std::sync::Mutex::new(None),
            }),
            state: LoaderState::default(),
            prefetch: None,
        })
    }

    /// Batches in `epoch` for this rank (every rank has as many). Token-budget batches plan
    /// the epoch here (once; an error reading the data shows here).
    pub fn steps(&self, epoch: u64) -> Result<u64> {
        self.plan.steps(epoch)
    }

    /// Batches in the current epoch for this rank ([`Loader::steps`] of the current epoch).
    pub fn steps_per_epoch(&self) -> Result<u64> {
        self.plan.steps(self.state.epoch)
    }

    /// Rows this run trains on per epoch (all ranks, before padding).
    pub fn rows_per_epoch(&self) -> u64 {
        self.plan.universe.len()
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
        self.plan.selections(epoch, step)
    }

    /// Batch `step` of `epoch` (pure; does not move the loader).
    pub fn batch(&self, epoch: u64, step: u64) -> Result<Batch> {
        self.plan.batch(epoch, step, None)
    }

    /// Collate user-chosen selections with this loader's settings.
    pub fn collate(&self, selections: Vec<Selection>) -> Result<Batch> {
        self.plan.collator.collate(&self.plan.ds, selections)
    }

    /// The state to save: the next batch is `step` of `epoch`.
    pub fn state(&self) -> LoaderState {
        self.state
    }

    /// Continue from a saved state.
    pub fn set_state(&mut self, state: LoaderState) {
        self.state = state;
        self.prefetch = None;
    }

    /// Start epoch `epoch` from its first batch.
    pub fn set_epoch(&mut self, epoch: u64) {
        self.set_state(LoaderState { epoch, step: 0 });
    }

    fn start_prefetch(&mut self) -> Result<()> {
        let o = &self.plan.options;
        let threads = o.prefetch_threads;
        let per_thread = o.prefetch_depth.div_ceil(threads).max(1);
        let (epoch, first) = (self.state.epoch, self.state.step);
        let steps = self.plan.steps(epoch)?;
        let mut receivers = Vec::with_capacity(threads);
        for t in 0..threads as u64 {
            let (tx, rx) = sync_channel(per_thread);
            let plan = self.plan.clone();
            std::thread::Builder::new()
                .name(format!("rankfeed-prefetch-{t}"))
                .spawn(move || {
                    let mut step = first + t;
                    while step < steps {
                        let batch = plan.batch(epoch, step, Some(step + threads as u64));
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
        let steps = match self.plan.steps(self.state.epoch) {
            Ok(s) => s,
            Err(e) => return Some(Err(e)),
        };
        if self.state.step >= steps {
            self.set_epoch(self.state.epoch + 1);
            return None;
        }
        let batch = if self.plan.options.prefetch_threads == 0 {
            let (epoch, step) = (self.state.epoch, self.state.step);
            self.plan.batch(epoch, step, Some(step + 1))
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
        Some(batch)
    }
}

/// The rows a run trains on: by source when the manifest counts each source's rows, with
/// rows without negatives left out when asked, capped and weighted.
fn universe(ds: &Dataset, options: &LoaderOptions) -> Result<Universe> {
    let m = ds.manifest();
    let accepted: Vec<u64> = m.sources.iter().map(|s| s.rows_accepted).collect();
    let by_source = accepted.iter().sum::<u64>() == ds.len() as u64 && !accepted.is_empty();
    let universe = if by_source {
        Universe::sources(&accepted, options.seed)
    } else {
        let per_source = [
            (
                "max_example_num_per_dataset",
                options.max_example_num_per_dataset.is_some(),
            ),
            ("weights", options.weights.is_some()),
            ("same_source", options.same_source),
        ];
        if let Some((name, _)) = per_source.iter().find(|(_, on)| *on) {
            return Err(Error::argument(
                name,
                "needs per-source row counts, which this dataset's manifest lacks",
            ));
        }
        Universe::all(ds.len() as u64)
    };
    let empty_neg: u64 = m.sources.iter().map(|s| s.rows_empty_neg).sum();
    let g = options.collate.group_size;
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
    if o.same_source {
        let (groups, takes, sizes) = batch_sources(
            &ds.manifest().sources,
            &universe.takes(),
            Grouping {
                sizes: o.source_batch_sizes.as_deref(),
                default_size: o.batch_size as u64,
                small_threshold: o.small_threshold,
                drop_threshold: o.drop_threshold,
            },
        )?;
        // drop_last drops each source's incomplete global batch, as the drop tail does.
        let tail = match o.shard.tail {
            Tail::Pad if o.drop_last => Tail::Drop,
            t => t,
        };
        let batches = SourceBatches::new(&takes, &sizes, o.shard.world_size, tail)?;
        return Ok(Schedule::SameSource(SameSource {
            batches,
            groups,
            takes,
            sizes,
        }));
    }
    let c = &o.collate;
    Ok(match (o.max_tokens, o.length_grouped) {
        (Some(t), mult) => Schedule::Budget(Budget {
            max_tokens: t as u64,
            max_groups: o.batch_size as u64,
            world: o.shard.world_size,
            mult: mult.map(|m| m as u64),
            cost: if c.packed {
                Cost::Packed
            } else {
                Cost::Padded {
                    group_size: c.group_size as u64,
                    multiple: c.pad_to_multiple_of.unwrap_or(1) as u64,
                }
            },
        }),
        (None, Some(m)) => Schedule::Grouped(m as u64),
        (None, None) => Schedule::Random,
    })
}
