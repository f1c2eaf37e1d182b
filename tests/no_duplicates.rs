//! No-duplicates batches (issue 22), through the public [`Loader`] only: a seeded generator of
//! small datasets where collisions are common (queries from a small pool, some the same tokens
//! with another prompt; positives and negatives from a small passage pool; rows without
//! negatives; 1-2 sources), crossed with loader settings (batch sizes 1-6, world sizes 1-4,
//! every shard tail, drop_last, group sizes 1-4, exclude_false_negatives, shuffle, weights,
//! epochs 0-2, encoder and embedder mode, prefetch threads), checks:
//! - no two groups of a global batch (all ranks at one step) share a query (tokens and
//!   prompt) or a drawn passage id;
//! - the batches are exactly those of a naive reference written from the README's rule
//!   (sentence-transformers' quadratic loop over the epoch order, then the tails), so every
//!   row of the epoch is trained exactly once but for what the tails drop or pad, counted;
//! - with the uneven tail and no drop_last, every row of the epoch exactly once;
//! - every rank takes the same number of steps (pad, drop), with equal shares at each step;
//!   no batch is empty or above batch_size;
//! - two loaders give the same batches, the iterator with prefetch threads the same as
//!   `batch(e, k)`, and a resumption at a random step (`set_state`, `restore`) the rest;
//! - on datasets without collisions, the batches are random order's.
//!
//! `RANKFEED_LONG=<factor>` multiplies the datasets.

mod support;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use rankfeed::collate::{CollateOptions, Mode};
use rankfeed::format::{SourceStats, TextSettings, TokenizerFacts};
use rankfeed::loader::{Loader, LoaderOptions, LoaderState, Strategy};
use rankfeed::sample::{KeyedRng, Selection, Shard, Tail};
use rankfeed::tokenizer::TextTokenizer;
use rankfeed::writer::{DatasetWriter, GroupRecord, ManifestInfo, WriterOptions};
use rankfeed::Dataset;

const DATASETS: u64 = 60;
const CONFIGS: u64 = 12;
/// The README's pad filler window: the first max(1024, 8 x W x B) positions.
const FILL_WINDOW: u64 = 1024;

fn bert_facts() -> TokenizerFacts {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    TextTokenizer::from_file(root.join("data/sample/bert/tokenizer.json"))
        .unwrap()
        .facts()
        .clone()
}

#[derive(Clone, Debug)]
struct Row {
    query: Vec<i32>,
    prompt: Option<u32>,
    pos: Vec<i32>,
    neg: Vec<i32>,
    source: u32,
}

struct Data {
    _dir: tempfile::TempDir,
    ds: Arc<Dataset>,
    rows: Vec<Row>,
    sources: u32,
    /// No two rows share a query or any passage.
    clean: bool,
}

/// 1 to `max` random tokens.
fn toks(rng: &mut KeyedRng, max: u64) -> Vec<i32> {
    let n = 1 + rng.below(max);
    (0..n).map(|_| 1000 + rng.below(28_000) as i32).collect()
}

fn write(rows: Vec<Row>, passages: &[Vec<i32>], sources: u32, clean: bool) -> Data {
    let dir = tempfile::tempdir().unwrap();
    let mut w = DatasetWriter::create(
        dir.path(),
        WriterOptions {
            rows_per_batch: 16,
            overwrite: true,
        },
    )
    .unwrap();
    for p in passages {
        w.add_passage(p).unwrap();
    }
    w.add_prompt(&[2000, 2001]).unwrap();
    w.add_prompt(&[2002]).unwrap();
    let mut rows = rows;
    rows.sort_by_key(|r| r.source); // sources are contiguous runs of rows
    for r in &rows {
        w.add_group(&GroupRecord {
            query: &r.query,
            pos: &r.pos,
            neg: &r.neg,
            pos_scores: None,
            neg_scores: None,
            prompt: r.prompt,
            source: r.source,
        })
        .unwrap();
    }
    let stats = (0..sources)
        .map(|s| {
            let mine = rows.iter().filter(|r| r.source == s);
            let n = mine.clone().count() as u64;
            SourceStats {
                id: s,
                path: format!("s{s}.jsonl"),
                rows_read: n,
                rows_accepted: n,
                rows_empty_neg: mine.filter(|r| r.neg.is_empty()).count() as u64,
                ..Default::default()
            }
        })
        .collect();
    w.finish(ManifestInfo {
        tokenizer: Some(bert_facts()),
        text: TextSettings::default(),
        sources: stats,
        shards: None,
    })
    .unwrap();
    let ds = Arc::new(Dataset::open(dir.path()).unwrap());
    Data {
        _dir: dir,
        ds,
        rows,
        sources,
        clean,
    }
}

/// A dataset for key `d`: collisions common, or (one in five) none at all.
fn gen_data(d: u64) -> Data {
    let mut rng = KeyedRng::new(&[0x0d0b5, d]);
    let n = match rng.below(3) {
        0 => 1 + rng.below(12),
        _ => 1 + rng.below(150),
    };
    let sources = if n >= 2 { 1 + rng.below(2) as u32 } else { 1 };
    let clean = rng.below(5) == 0;
    let mut passages: Vec<Vec<i32>> = Vec::new();
    let mut new_passage = |rng: &mut KeyedRng| {
        passages.push(toks(rng, 20));
        passages.len() as i32 - 1
    };
    let mut rows = Vec::new();
    if clean {
        for r in 0..n {
            let pos = (0..1 + rng.below(2))
                .map(|_| new_passage(&mut rng))
                .collect();
            let neg = (0..1 + rng.below(5))
                .map(|_| new_passage(&mut rng))
                .collect();
            let mut query = toks(&mut rng, 6);
            query.push(r as i32); // unique
            rows.push(Row {
                query,
                prompt: None,
                pos,
                neg,
                source: (r % sources as u64) as u32,
            });
        }
    } else {
        let pool = 2 + rng.below(2 * n + 2);
        let ids: Vec<i32> = (0..pool).map(|_| new_passage(&mut rng)).collect();
        let queries: Vec<Vec<i32>> = (0..1 + rng.below(n)).map(|_| toks(&mut rng, 6)).collect();
        let empty_rate = [0, 0, 5][rng.below(3) as usize];
        for r in 0..n {
            let pick = |rng: &mut KeyedRng, k: u64| -> Vec<i32> {
                (0..k)
                    .map(|_| ids[rng.below(ids.len() as u64) as usize])
                    .collect()
            };
            let k = 1 + rng.below(3);
            let pos = pick(&mut rng, k);
            let neg = if empty_rate > 0 && rng.below(empty_rate) == 0 {
                Vec::new()
            } else {
                let k = 1 + rng.below(6);
                pick(&mut rng, k)
            };
            rows.push(Row {
                query: queries[rng.below(queries.len() as u64) as usize].clone(),
                prompt: [None, None, Some(0), Some(1)][rng.below(4) as usize],
                pos,
                neg,
                source: if r < sources as u64 {
                    r as u32
                } else {
                    rng.below(sources as u64) as u32
                },
            });
        }
    }
    write(rows, &passages, sources, clean)
}

#[derive(Debug, Clone)]
struct Config {
    batch_size: usize,
    group_size: usize,
    world: u64,
    tail: Tail,
    drop_last: bool,
    shuffle: bool,
    seed: u64,
    epoch: u64,
    exclude: bool,
    weights: Option<Vec<f64>>,
    embedder: bool,
    threads: usize,
}

fn gen_config(d: u64, i: u64, data: &Data) -> Config {
    let mut rng = KeyedRng::new(&[0xc0f, d, i]);
    Config {
        batch_size: 1 + rng.below(6) as usize,
        group_size: [1usize, 2, 3, 4][rng.below(4) as usize],
        world: 1 + rng.below(4),
        tail: [Tail::Pad, Tail::Drop, Tail::Uneven][rng.below(3) as usize],
        drop_last: rng.below(5) == 0,
        shuffle: rng.below(4) != 0,
        seed: rng.below(1000),
        epoch: rng.below(3),
        exclude: rng.below(2) == 0,
        weights: (data.sources == 2 && rng.below(4) == 0).then(|| vec![1.0, 3.0]),
        embedder: rng.below(3) == 0,
        threads: [0usize, 1, 2][rng.below(3) as usize],
    }
}

fn options(c: &Config, rank: u64, threads: usize, strategy: Strategy) -> LoaderOptions {
    LoaderOptions {
        batch_size: c.batch_size,
        seed: c.seed,
        shard: Shard {
            rank,
            world_size: c.world,
            tail: c.tail,
        },
        shuffle: c.shuffle,
        drop_last: c.drop_last,
        skip_rows_without_negatives: true,
        exclude_false_negatives: c.exclude,
        prefetch_threads: threads,
        prefetch_depth: 4,
        weights: c.weights.clone(),
        strategy,
        collate: CollateOptions {
            mode: if c.embedder {
                Mode::Embedder
            } else {
                Mode::Encoder
            },
            query_max_len: 16,
            passage_max_len: 24,
            group_size: c.group_size,
            ..CollateOptions::default()
        },
        ..LoaderOptions::default()
    }
}

/// What a global batch holds at most once.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Query(Vec<i32>, Option<u32>),
    Passage(i32),
}

/// The keys of a selection, from the rows as written (duplicates within a group removed).
fn keys(rows: &[Row], s: &Selection) -> Vec<Key> {
    let r = &rows[s.row as usize];
    let mut k = vec![
        Key::Query(r.query.clone(), r.prompt),
        Key::Passage(r.pos[s.pos as usize]),
    ];
    k.extend(s.neg.iter().map(|&j| Key::Passage(r.neg[j as usize])));
    let mut seen = HashSet::new();
    k.retain(|x| seen.insert(x.clone()));
    k
}

/// The README's rule, naively: the epoch order (a loader in random order, one rank, batch
/// size 1, the uneven tail), sentence-transformers' loop, then per global batch the tail and
/// drop_last. The global batches (selections, in striping order) of every rank's steps, and
/// for each rank the indices of the global batches it has a share in.
fn reference(c: &Config, data: &Data) -> (Vec<Vec<Selection>>, Vec<Vec<usize>>) {
    let plain = Config {
        world: 1,
        tail: Tail::Uneven,
        drop_last: false,
        batch_size: 1,
        ..c.clone()
    };
    let l = Loader::new(data.ds.clone(), options(&plain, 0, 0, Strategy::Random)).unwrap();
    let order: Vec<Selection> = (0..l.steps(c.epoch).unwrap())
        .flat_map(|k| l.selections(c.epoch, k).unwrap())
        .collect();
    let key_of: Vec<Vec<Key>> = order.iter().map(|s| keys(&data.rows, s)).collect();
    let (w, b) = (c.world, c.batch_size as u64);
    let cap = (w * b) as usize;
    let collide = |held: &[Key], p: usize| key_of[p].iter().any(|k| held.contains(k));
    let mut remaining: Vec<usize> = (0..order.len()).collect();
    let mut batches: Vec<Vec<usize>> = Vec::new();
    while !remaining.is_empty() {
        let (mut held, mut batch) = (Vec::new(), Vec::new());
        for &p in &remaining {
            if collide(&held, p) {
                continue;
            }
            batch.push(p);
            held.extend(key_of[p].iter().cloned());
            if batch.len() == cap {
                break;
            }
        }
        remaining.retain(|p| !batch.contains(p));
        batches.push(batch);
    }
    let window = (order.len() as u64).min(FILL_WINDOW.max(8 * w * b)) as usize;
    let mut global = Vec::new();
    let mut by_rank = vec![Vec::new(); w as usize];
    for mut batch in batches {
        let m = batch.len() as u64;
        if m % w != 0 {
            match c.tail {
                Tail::Pad => {
                    let mut held: Vec<Key> =
                        batch.iter().flat_map(|&p| key_of[p].clone()).collect();
                    let mut fill = Vec::new();
                    for (q, ks) in key_of.iter().enumerate().take(window) {
                        if fill.len() as u64 == w - m % w {
                            break;
                        }
                        if !ks.iter().any(|k| held.contains(k)) {
                            held.extend(ks.iter().cloned());
                            fill.push(q);
                        }
                    }
                    if fill.len() as u64 == w - m % w {
                        batch.extend(fill);
                    } else {
                        batch.truncate((m / w * w) as usize);
                    }
                }
                Tail::Drop => batch.truncate((m / w * w) as usize),
                Tail::Uneven => {}
            }
        }
        let len = batch.len() as u64;
        let share = |r: u64| len.saturating_sub(r).div_ceil(w);
        let kept: Vec<bool> = (0..w)
            .map(|r| share(r) > 0 && !(c.drop_last && share(r) < b))
            .collect();
        if !kept.iter().any(|&k| k) {
            continue;
        }
        for r in 0..w as usize {
            if kept[r] {
                by_rank[r].push(global.len());
            }
        }
        global.push(batch.iter().map(|&p| order[p].clone()).collect());
    }
    (global, by_rank)
}

#[derive(Default, Debug)]
struct Stats {
    accepted: u64,
    refused: u64,
    batches: u64,
    deferred: u64,
    padded: u64,
    dropped: u64,
    clean_compared: u64,
}

fn check(c: &Config, data: &Data, stats: &mut Stats) -> Result<(), String> {
    let epoch = c.epoch;
    let make = |rank: u64, threads: usize| {
        Loader::new(
            data.ds.clone(),
            options(c, rank, threads, Strategy::NoDuplicates),
        )
    };
    // Weights on a source whose every row is skipped are refused by every strategy.
    let plain = Config {
        world: 1,
        tail: Tail::Uneven,
        drop_last: false,
        ..c.clone()
    };
    if let Err(rankfeed::Error::Argument {
        name: "weights", ..
    }) = Loader::new(data.ds.clone(), options(&plain, 0, 0, Strategy::Random))
    {
        return match make(0, 0) {
            Err(rankfeed::Error::Argument {
                name: "weights", ..
            }) => {
                stats.refused += 1;
                Ok(())
            }
            _ => Err("weights on a source without rows accepted".into()),
        };
    }
    let (global, by_rank) = reference(c, data);
    let n = Loader::new(data.ds.clone(), options(c, 0, 0, Strategy::Random))
        .map(|l| l.rows_per_epoch())
        .or_else(|_| {
            let plain = Config {
                tail: Tail::Uneven,
                drop_last: false,
                ..c.clone()
            };
            Loader::new(data.ds.clone(), options(&plain, 0, 0, Strategy::Random))
                .map(|l| l.rows_per_epoch())
        })
        .map_err(|e| format!("the plain loader: {e}"))?;
    let mut loaders = Vec::new();
    for rank in 0..c.world {
        match make(rank, c.threads) {
            Ok(l) => loaders.push(l),
            Err(rankfeed::Error::Argument { name, .. }) => {
                // Refused only when the epoch has rows but would have no batch.
                let empty = n > 0 && c.tail != Tail::Uneven;
                // The check plans epoch 0.
                let epoch0 = Config {
                    epoch: 0,
                    ..c.clone()
                };
                let why_ok = match name {
                    "world_size" => c.tail == Tail::Drop && n < c.world,
                    "no_duplicates" => empty && reference(&epoch0, data).0.is_empty(),
                    _ => false,
                };
                if !why_ok {
                    return Err(format!("refused naming {name}"));
                }
                stats.refused += 1;
                return Ok(());
            }
            Err(e) => return Err(format!("refused: {e}")),
        }
    }
    stats.accepted += 1;
    // Against the reference, rank by rank; and the promises on their own.
    let w = c.world as usize;
    let mut per_rank: Vec<Vec<Vec<Selection>>> = Vec::new();
    for (rank, l) in loaders.iter_mut().enumerate() {
        let steps = l.steps(epoch).map_err(|e| e.to_string())?;
        let want: Vec<Vec<Selection>> = by_rank[rank]
            .iter()
            .map(|&g| global[g].iter().skip(rank).step_by(w).cloned().collect())
            .collect();
        let got: Vec<Vec<Selection>> = (0..steps)
            .map(|k| l.selections(epoch, k).unwrap())
            .collect();
        if got != want {
            return Err(format!(
                "rank {rank}: {} batches differ from the reference's {}",
                got.len(),
                want.len()
            ));
        }
        // The iterator (prefetch threads) and a second loader computing in the caller.
        let pure = make(rank as u64, 0).map_err(|e| e.to_string())?;
        let batches: Vec<_> = (0..steps).map(|k| pure.batch(epoch, k).unwrap()).collect();
        l.set_epoch(epoch);
        let iterated: Vec<_> = l.by_ref().collect::<rankfeed::Result<_>>().unwrap();
        if iterated != batches {
            return Err(format!(
                "rank {rank}: the iterator differs from batch(e, k)"
            ));
        }
        // Resume at a random step: set_state, and restore from a checkpoint.
        let start = KeyedRng::new(&[c.seed, rank as u64, 0x5e5]).below(steps + 1);
        let mut r = make(rank as u64, c.threads).unwrap();
        r.set_state(LoaderState {
            epoch,
            step: start,
            offset: 0,
        })
        .unwrap();
        let state = r.checkpoint().unwrap();
        let rest: Vec<_> = r.by_ref().collect::<rankfeed::Result<_>>().unwrap();
        let mut q = make(rank as u64, 0).unwrap();
        q.restore(&state).map_err(|e| format!("restore: {e}"))?;
        let restored: Vec<_> = q.by_ref().collect::<rankfeed::Result<_>>().unwrap();
        if rest[..] != batches[start as usize..] || restored != rest {
            return Err(format!("rank {rank}: resumed at step {start} differs"));
        }
        for (k, b) in got.iter().enumerate() {
            if b.is_empty() || b.len() > c.batch_size {
                return Err(format!("rank {rank} step {k}: {} groups", b.len()));
            }
        }
        stats.batches += steps;
        per_rank.push(got);
    }
    if c.tail != Tail::Uneven {
        let steps: Vec<usize> = per_rank.iter().map(Vec::len).collect();
        if steps.iter().any(|&s| s != steps[0]) {
            return Err(format!("steps by rank {steps:?}"));
        }
        for k in 0..steps[0] {
            let sizes: Vec<usize> = per_rank.iter().map(|r| r[k].len()).collect();
            if sizes.iter().any(|&s| s != sizes[0]) {
                return Err(format!("step {k}: groups by rank {sizes:?}"));
            }
        }
    }
    // No duplicates within a global batch (the batches of the ranks that have one).
    for g in &global {
        let mut held = HashSet::new();
        for s in g {
            for k in keys(&data.rows, s) {
                if !held.insert(k.clone()) {
                    return Err(format!("{k:?} twice in a global batch"));
                }
            }
        }
    }
    // Every row of the epoch: exactly once with the uneven tail and no drop_last; and the
    // rows padded and dropped, counted against the epoch.
    let mut seen: HashMap<u64, u64> = HashMap::new();
    for s in per_rank.iter().flatten().flatten() {
        *seen.entry(s.row).or_default() += 1;
    }
    let total: u64 = seen.values().sum();
    let plain = Config {
        world: 1,
        tail: Tail::Uneven,
        drop_last: false,
        batch_size: 1,
        ..c.clone()
    };
    let p = Loader::new(data.ds.clone(), options(&plain, 0, 0, Strategy::Random)).unwrap();
    let mut epoch_rows: HashMap<u64, u64> = HashMap::new();
    for k in 0..p.steps(epoch).unwrap() {
        for s in p.selections(epoch, k).unwrap() {
            *epoch_rows.entry(s.row).or_default() += 1;
        }
    }
    if c.tail == Tail::Uneven && !c.drop_last && seen != epoch_rows {
        return Err("the uneven tail did not train every row exactly once".into());
    }
    let (mut padded, mut dropped) = (0, 0);
    for (r, &want) in &epoch_rows {
        let got = seen.get(r).copied().unwrap_or(0);
        padded += got.saturating_sub(want);
        dropped += want.saturating_sub(got);
    }
    if total + dropped != n + padded || seen.keys().any(|r| !epoch_rows.contains_key(r)) {
        return Err(format!(
            "{total} groups seen, {n} rows, {padded} padded, {dropped} dropped"
        ));
    }
    stats.padded += padded;
    stats.dropped += dropped;
    stats.deferred += global
        .windows(2)
        .filter(|g| g[0].len() < c.world as usize * c.batch_size)
        .count() as u64;
    // Without collisions: random order's batches, when the padding comes from outside the
    // last batch (the epoch has more than one global batch) or none is needed.
    let needs_fill = c.tail == Tail::Pad && n % c.world != 0;
    if data.clean && c.weights.is_none() && (!needs_fill || n > c.world * c.batch_size as u64) {
        for rank in 0..c.world {
            let Ok(random) = Loader::new(data.ds.clone(), options(c, rank, 0, Strategy::Random))
            else {
                continue;
            };
            let steps = random.steps(epoch).unwrap();
            let want: Vec<Vec<Selection>> = (0..steps)
                .map(|k| random.selections(epoch, k).unwrap())
                .collect();
            if per_rank[rank as usize] != want {
                return Err(format!(
                    "rank {rank}: clean data, not random order's batches"
                ));
            }
        }
        stats.clean_compared += 1;
    }
    Ok(())
}

#[test]
fn no_global_batch_holds_a_query_or_a_passage_twice() {
    let datasets = DATASETS * support::long();
    let mut stats = Stats::default();
    let mut failures = Vec::new();
    let t = std::time::Instant::now();
    for d in 0..datasets {
        let data = gen_data(d);
        for i in 0..CONFIGS {
            let c = gen_config(d, i, &data);
            if let Err(m) = check(&c, &data, &mut stats) {
                if failures.len() < 20 {
                    eprintln!("dataset {d} config {i}: {m}\n  {c:?}");
                }
                failures.push(m);
            }
        }
    }
    println!(
        "no duplicates: {} configurations, {} failures ({} accepted, {} refused as they must \
         be; {} batches; {} incomplete global batches before the last; {} groups padded, {} \
         dropped; {} clean datasets equal to random order; {:.1} s)",
        datasets * CONFIGS,
        failures.len(),
        stats.accepted,
        stats.refused,
        stats.batches,
        stats.deferred,
        stats.padded,
        stats.dropped,
        stats.clean_compared,
        t.elapsed().as_secs_f64()
    );
    assert!(failures.is_empty(), "{} failures", failures.len());
    assert!(stats.deferred > 0 && stats.padded > 0 && stats.dropped > 0);
    assert!(stats.clean_compared > 0 && stats.refused > 0);
}

/// The plan's cost at 100k rows (one pass: a draw and a few hash lookups per row), printed
/// for the README, with collisions as in mined data (queries from a pool of 80k, negatives
/// from 300k passages) and with a hub passage among the negatives of 20% of the rows (every
/// global batch holds one at most, so the epoch needs 20k batches): both near-linear, far from
/// the quadratic loop's cost. `cargo test --release --test no_duplicates -- --nocapture`.
#[test]
fn the_plan_is_near_linear_at_100k_rows() {
    let n = 100_000u64;
    for hub in [false, true] {
        let mut rng = KeyedRng::new(&[0x100c, hub as u64]);
        let passages: Vec<Vec<i32>> = (0..300_000).map(|_| toks(&mut rng, 3)).collect();
        let queries: Vec<Vec<i32>> = (0..80_000).map(|_| toks(&mut rng, 6)).collect();
        let rows: Vec<Row> = (0..n)
            .map(|_| {
                let mut neg: Vec<i32> = (0..10).map(|_| rng.below(300_000) as i32).collect();
                if hub && rng.below(5) == 0 {
                    neg[0] = 0;
                }
                Row {
                    query: queries[rng.below(80_000) as usize].clone(),
                    prompt: None,
                    pos: vec![rng.below(300_000) as i32],
                    neg,
                    source: 0,
                }
            })
            .collect();
        let data = write(rows, &passages, 1, false);
        let c = Config {
            batch_size: 8,
            group_size: 8,
            world: 4,
            tail: Tail::Pad,
            drop_last: false,
            shuffle: true,
            seed: 1,
            epoch: 1,
            exclude: false,
            weights: None,
            embedder: true,
            threads: 0,
        };
        let random = Loader::new(data.ds.clone(), options(&c, 0, 0, Strategy::Random)).unwrap();
        let t = std::time::Instant::now();
        let l = Loader::new(data.ds.clone(), options(&c, 0, 0, Strategy::NoDuplicates)).unwrap();
        let steps = l.steps(1).unwrap(); // epoch 1's plan (epoch 0's: at creation)
        let plan = t.elapsed().as_secs_f64() / 2.0;
        let t = std::time::Instant::now();
        let mut neg = Vec::new();
        for row in 0..n {
            let g = data.ds.group_ids(row as usize).unwrap();
            let o = l.options();
            std::hint::black_box(rankfeed::loader::draw_group(o, 1, row, &g, &mut neg).unwrap());
        }
        let draws = t.elapsed().as_secs_f64();
        let full = (0..steps)
            .filter(|&k| l.selections(1, k).unwrap().len() == c.batch_size)
            .count();
        println!(
            "no_duplicates plan, {n} rows, G=8, world 4 x batch 8{}: {:.1} ms an epoch \
             ({:.0} ns a row; the draws alone {:.0} ns a row); {steps} steps ({full} full), \
             random order {}",
            if hub {
                ", a hub negative in 20% of rows"
            } else {
                ""
            },
            plan * 1e3,
            plan * 1e9 / n as f64,
            draws * 1e9 / n as f64,
            random.steps(1).unwrap()
        );
        assert!(plan < 5.0, "{plan} s: not near-linear");
        if hub {
            // ~70% of the hub rows draw it (7 of 10 negatives): one global batch each.
            assert!(steps >= n / 5 * 6 / 10, "{steps}");
        }
    }
}
