//! Teacher scores (issue 22): a seeded generator of small datasets (queries from a small pool,
//! so rows repeat questions; row prompts; passages shared across rows, positives and negatives)
//! crossed with scoring settings (pair modes, budgets, truncation, padding multiple, packed,
//! batch size, token budget, world size). For every case:
//! - the unique pairs are exactly the distinct (query tokens, prompt, passage id) of a naive
//!   reference, in first-reference order, and every slot maps to its pair;
//! - the ranks' batches hold every pair exactly once, at most `batch_size` each, within the
//!   token budget unless a pair alone exceeds it, longest first, ranks within one batch of each
//!   other; each batch row holds the pair's tokens as the collator builds it;
//! - scoring killed at a random batch of each rank (the log's tail torn or damaged at random)
//!   and resumed gives the uninterrupted run's scores; the attached dataset holds, for every
//!   slot of every row, its pair's score, and everything else unchanged;
//! - logs of another plan or dataset, missing or unfinished ranks, wrong or non-finite scores
//!   are errors;
//! - every rank's pairs file holds its plan's pairs once each, in order, with their batch,
//!   ids, token types and decoded texts; scores files written back in any integer / float
//!   type, shuffled and split, read back to exactly the scores; one defect each (a pair
//!   missing, twice or unknown, a non-finite score, a passage or content key that is not the
//!   pair's, another dataset's seal) is an error naming the file.
//!
//! `RANKFEED_LONG=<factor>` multiplies the cases.

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use rankfeed::collate::{Batch, Ids};
use rankfeed::format::{SourceStats, TextSettings};
use rankfeed::options::Options;
use rankfeed::sample::KeyedRng;
use rankfeed::score::{attach, collect, log_path, ScoreLog, ScorePlan, UniquePairs};
use rankfeed::tokenizer::TextTokenizer;
use rankfeed::writer::{DatasetWriter, GroupRecord, ManifestInfo, WriterOptions};
use rankfeed::Dataset;

struct Row {
    query: Vec<i32>,
    pos: Vec<i32>,
    neg: Vec<i32>,
    /// Index into `Spec::prompts`.
    prompt: Option<usize>,
    scores: bool,
}

struct Spec {
    passages: Vec<Vec<i32>>,
    prompts: Vec<Vec<i32>>,
    rows: Vec<Row>,
}

fn gen(case: u64) -> Spec {
    let mut rng = KeyedRng::new(&[0x5c0e, case]);
    let words = |rng: &mut KeyedRng, n: u64| -> Vec<i32> {
        (0..n).map(|_| 1000 + rng.below(40) as i32).collect()
    };
    let n_passages = 1 + rng.below(40) as usize;
    let mut passages: Vec<Vec<i32>> = Vec::new();
    for _ in 0..n_passages {
        let l = rng.below(30);
        let p = words(&mut rng, l);
        if !passages.contains(&p) {
            passages.push(p);
        }
    }
    let queries: Vec<Vec<i32>> = (0..1 + rng.below(8))
        .map(|_| {
            let l = 1 + rng.below(12);
            words(&mut rng, l)
        })
        .collect();
    let prompts: Vec<Vec<i32>> = (0..rng.below(3))
        .map(|_| {
            let l = 1 + rng.below(4);
            words(&mut rng, l)
        })
        .collect();
    let n = passages.len() as u64;
    let rows = (0..1 + rng.below(25))
        .map(|_| Row {
            query: queries[rng.below(queries.len() as u64) as usize].clone(),
            pos: (0..1 + rng.below(3)).map(|_| rng.below(n) as i32).collect(),
            neg: (0..rng.below(5)).map(|_| rng.below(n) as i32).collect(),
            prompt: (!prompts.is_empty() && rng.below(2) == 0)
                .then(|| rng.below(prompts.len() as u64) as usize),
            scores: rng.below(3) == 0,
        })
        .collect();
    Spec {
        passages,
        prompts,
        rows,
    }
}

fn write(dir: &Path, spec: &Spec) -> Dataset {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let facts = TextTokenizer::from_file(root.join("data/sample/bert/tokenizer.json"))
        .unwrap()
        .facts()
        .clone();
    let mut w = DatasetWriter::create(
        dir,
        WriterOptions {
            rows_per_batch: 8,
            overwrite: true,
        },
    )
    .unwrap();
    w.add_prompt(&[1, 2]).unwrap();
    w.add_prompt(&[3]).unwrap();
    let prompt_ids: Vec<u32> = spec
        .prompts
        .iter()
        .map(|p| w.intern_prompt(p).unwrap())
        .collect();
    // Passages interned in first-reference order, as a conversion stores them.
    let mut ids = vec![None; spec.passages.len()];
    let mut rows = Vec::new();
    for r in &spec.rows {
        let mut map = |v: &Vec<i32>| -> Vec<i32> {
            v.iter()
                .map(|&p| {
                    *ids[p as usize].get_or_insert_with(|| {
                        w.intern_passage(&spec.passages[p as usize]).unwrap() as i32
                    })
                })
                .collect()
        };
        rows.push((map(&r.pos), map(&r.neg)));
    }
    for (r, (pos, neg)) in spec.rows.iter().zip(&rows) {
        let ps: Vec<f32> = pos.iter().map(|&p| p as f32).collect();
        let ns: Vec<f32> = neg.iter().map(|&p| -(p as f32)).collect();
        w.add_group(&GroupRecord {
            query: &r.query,
            pos,
            neg,
            pos_scores: r.scores.then_some(&ps[..]),
            neg_scores: r.scores.then_some(&ns[..]),
            prompt: r.prompt.map(|i| prompt_ids[i]),
            source: 0,
        })
        .unwrap();
    }
    let n = rows.len() as u64;
    w.finish(ManifestInfo {
        tokenizer: Some(facts),
        text: TextSettings::default(),
        sources: vec![SourceStats {
            path: "in.jsonl".into(),
            rows_read: n,
            rows_accepted: n,
            rows_empty_neg: rows.iter().filter(|r| r.1.is_empty()).count() as u64,
            ..Default::default()
        }],
        shards: None,
    })
    .unwrap();
    Dataset::open(dir).unwrap()
}

fn options(rng: &mut KeyedRng) -> Options {
    let mut o = Options::DEFAULT;
    o.mode = ["encoder", "llm", "matryoshka"][rng.below(3) as usize]
        .parse()
        .unwrap();
    o.query_max_len = 1 + rng.below(16) as usize;
    o.passage_max_len = 1 + rng.below(32) as usize;
    if o.mode == "encoder".parse().unwrap() && rng.below(2) == 0 {
        o.truncation = "longest_first".parse().unwrap();
    }
    o.pad_to_multiple_of = (rng.below(3) == 0).then(|| 1 + rng.below(8) as usize);
    o.packed = rng.below(4) == 0;
    o.batch_size = 1 + rng.below(9) as usize;
    o.max_tokens = (rng.below(2) == 0).then(|| 1 + rng.below(200) as usize);
    o.world_size = 1 + rng.below(4);
    // Sampling settings are ignored: random values must not matter.
    o.seed = rng.below(1000);
    o.group_size = 1 + rng.below(5) as usize;
    o.shuffle = rng.below(2) == 0;
    o
}

/// The real tokens of row `k` of a pair batch.
fn row_tokens(b: &Batch, k: usize) -> Vec<i64> {
    let get = |ids: &Ids, i: usize| ids.get(i);
    if let Some(cu) = &b.cu_seqlens {
        return (cu[k] as usize..cu[k + 1] as usize)
            .map(|i| get(&b.input_ids, i))
            .collect();
    }
    let mask = b.attention_mask.as_ref().expect("mask on");
    (k * b.len..(k + 1) * b.len)
        .filter(|&i| get(mask, i) == 1)
        .map(|i| get(&b.input_ids, i))
        .collect()
}

/// Pair `p` as the plan's collator builds it: its ids.
fn want_ids(ds: &Dataset, plan: &ScorePlan, p: u32) -> Vec<i64> {
    want_pair(ds, plan, p, |pair| {
        pair.ids().iter().map(|&t| t as i64).collect()
    })
}

/// `f` of pair `p` as the plan's collator builds it (from the first row holding it).
fn want_pair<T>(
    ds: &Dataset,
    plan: &ScorePlan,
    p: u32,
    f: impl FnOnce(&rankfeed::collate::Pair<'_>) -> T,
) -> T {
    let c = plan.collator();
    let (row, passage) = plan.pairs().first(p);
    let g = ds.group_ids(row as usize).unwrap();
    let prompt = c.prompt_of(ds, g.prompt).unwrap();
    f(&c.pair(g.query, ds.passage(passage as i32).unwrap(), prompt))
}

/// A teacher: any deterministic function of what the model sees.
fn teacher(tokens: &[i64]) -> f32 {
    let h = xxhash_rust::xxh3::xxh3_64(bytemuck::cast_slice(tokens));
    (h % 100_000) as f32 / 1000.0 - 50.0
}

/// Score rank `rank`'s batches from `start` to `end` into `work`.
fn score_range(plan: &ScorePlan, work: &Path, end: u64) -> ScoreLog {
    let mut log = ScoreLog::open(work, plan).unwrap();
    while log.next() < end {
        let b = plan.batch(log.next()).unwrap();
        let s: Vec<f32> = (0..b.pairs.len())
            .map(|k| teacher(&row_tokens(&b.batch, k)))
            .collect();
        log.append(plan, b.index, &s).unwrap();
    }
    log
}

#[test]
fn scores_cover_every_unique_pair_once_and_resume_exactly() {
    let cases = 80 * support::long();
    let (mut unique, mut total, mut resumed, mut torn, mut refused) = (0, 0, 0u64, 0u64, 0u64);
    for case in 0..cases {
        let tmp = tempfile::tempdir().unwrap();
        let spec = gen(case);
        let ds = Arc::new(write(&tmp.path().join("ds"), &spec));
        let mut rng = KeyedRng::new(&[0x5c0f, case]);
        let o = options(&mut rng);

        // Unique pairs against a naive reference.
        let pairs = UniquePairs::build(&ds).unwrap();
        let mut naive: HashMap<(Vec<i32>, Option<u32>, i32), u32> = HashMap::new();
        let mut slots = Vec::new();
        for row in 0..ds.len() {
            let g = ds.group(row).unwrap();
            for &p in g.pos.iter().chain(g.neg) {
                let n = naive.len() as u32;
                slots.push(*naive.entry((g.query.to_vec(), g.prompt, p)).or_insert(n));
            }
        }
        assert_eq!(pairs.slots(), &slots[..], "case {case}");
        assert_eq!(pairs.len(), naive.len(), "case {case}");
        unique += pairs.len();
        total += pairs.total();

        // Every rank's plan.
        let plans: Vec<ScorePlan> = (0..o.world_size)
            .map(|rank| {
                let mut o = o.clone();
                o.rank = rank;
                ScorePlan::new(ds.clone(), &o).unwrap()
            })
            .collect();
        let mut seen = vec![0u32; pairs.len()];
        let mut global: Vec<Vec<u32>> = vec![Vec::new(); plans[0].global_batches() as usize];
        for (rank, plan) in plans.iter().enumerate() {
            assert!(plan.len().abs_diff(plans[0].len()) <= 1, "case {case}");
            for i in 0..plan.len() {
                let b = plan.batch(i).unwrap();
                assert!(!b.pairs.is_empty() && b.pairs.len() <= o.batch_size);
                global[(i * o.world_size) as usize + rank] = b.pairs.clone();
                let lens: Vec<usize> = b
                    .pairs
                    .iter()
                    .map(|&p| want_pair(&ds, plan, p, |pair| pair.len()))
                    .collect();
                for (k, &p) in b.pairs.iter().enumerate() {
                    seen[p as usize] += 1;
                    let want = want_ids(&ds, plan, p);
                    assert_eq!(row_tokens(&b.batch, k), want, "case {case} pair {p}");
                }
                if let Some(t) = o.max_tokens {
                    let m = o.pad_to_multiple_of.unwrap_or(1);
                    let used = if o.packed {
                        lens.iter().sum::<usize>()
                    } else {
                        b.pairs.len() * lens[0].div_ceil(m) * m
                    };
                    assert!(used <= t || b.pairs.len() == 1, "case {case}: {used} > {t}");
                }
            }
        }
        assert!(seen.iter().all(|&n| n == 1), "case {case}: {seen:?}");
        // Longest first, across the global order.
        let len_of = |p: u32| want_pair(&ds, &plans[0], p, |pair| pair.len());
        let order: Vec<usize> = global.iter().flatten().map(|&p| len_of(p)).collect();
        assert!(order.windows(2).all(|w| w[0] >= w[1]), "case {case}");

        // Scoring, killed and resumed at random on every rank.
        let work = tmp.path().join("work");
        for plan in &plans {
            let stop = rng.below(plan.len() + 1);
            drop(score_range(plan, &work, stop));
            let (rank, world) = plan.shard();
            let path = log_path(&work, rank, world);
            let before = ScoreLog::open(&work, plan).unwrap().next();
            assert_eq!(before, stop, "case {case}");
            match rng.below(4) {
                // Torn: a few bytes of the last record lost.
                0 if stop > 0 => {
                    let len = std::fs::metadata(&path).unwrap().len();
                    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
                    f.set_len(len - 1 - rng.below(8)).unwrap();
                    torn += 1;
                }
                // Damaged: a byte of the last record flipped.
                1 if stop > 0 => {
                    let mut bytes = std::fs::read(&path).unwrap();
                    let at = bytes.len() - 1 - rng.below(12) as usize;
                    bytes[at] ^= 0x40;
                    std::fs::write(&path, bytes).unwrap();
                    torn += 1;
                }
                // Garbage appended.
                2 => {
                    let mut f = std::fs::OpenOptions::new()
                        .append(true)
                        .open(&path)
                        .unwrap();
                    std::io::Write::write_all(&mut f, b"RFSR\x07").unwrap();
                    torn += 1;
                }
                _ => {}
            }
            let log = ScoreLog::open(&work, plan).unwrap();
            assert!(log.next() + 1 >= stop && log.next() <= stop, "case {case}");
            resumed += (stop > 0 && stop < plan.len()) as u64;
            if !plan.is_empty() && o.world_size > 1 && plan.shard().0 == 0 {
                // Not every rank has finished: collecting is refused.
                assert!(collect(&ds, &work).is_err(), "case {case}");
                refused += 1;
            }
            let log = score_range(plan, &work, plan.len());
            assert!(log.is_complete());
        }
        let scores = collect(&ds, &work).unwrap();
        for (p, &s) in scores.iter().enumerate() {
            let tokens = want_ids(&ds, &plans[0], p as u32);
            assert_eq!(s, teacher(&tokens), "case {case} pair {p}");
        }

        // Attached: every slot's pair score, everything else unchanged.
        let out = tmp.path().join("scored");
        attach(&ds, &scores, &out, WriterOptions::default()).unwrap();
        let scored = Dataset::open(&out).unwrap();
        scored.validate().unwrap();
        assert_eq!(scored.len(), ds.len());
        let mut slot = pairs.slots().iter();
        for row in 0..ds.len() {
            let (a, b) = (ds.group(row).unwrap(), scored.group(row).unwrap());
            assert_eq!(
                (a.query, a.pos, a.neg, a.source),
                (b.query, b.pos, b.neg, b.source)
            );
            // (Row prompts are interned in first-reference order: the ids may differ, the
            // tokens may not.)
            let tokens =
                |d: &Dataset, p: Option<u32>| p.map(|p| d.prompt_tokens(p).unwrap().to_vec());
            assert_eq!(
                tokens(&ds, a.prompt),
                tokens(&scored, b.prompt),
                "case {case} row {row}"
            );
            let want: Vec<f32> = slot
                .by_ref()
                .take(a.pos.len() + a.neg.len())
                .map(|&p| scores[p as usize])
                .collect();
            let got: Vec<f32> = b
                .pos_scores
                .unwrap()
                .iter()
                .chain(b.neg_scores.unwrap())
                .copied()
                .collect();
            assert_eq!(got, want, "case {case} row {row}");
        }
        let prov = scored.manifest().provenance.as_ref().unwrap();
        assert_eq!(prov["scored"]["from_seal"], ds.manifest().checksum.as_str());
    }
    eprintln!(
        "scores: {cases} cases, {unique} unique of {total} pairs ({:.1}% saved), {resumed} mid-run resumes, {torn} torn/damaged/garbage tails, {refused} early collects refused",
        100.0 * (1.0 - unique as f64 / total.max(1) as f64)
    );
}

#[test]
fn logs_of_another_plan_or_dataset_and_bad_scores_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let mut spec = gen(3);
    spec.rows.truncate(6);
    let ds = Arc::new(write(&tmp.path().join("ds"), &spec));
    let mut o = Options::DEFAULT;
    o.batch_size = 2;
    let plan = ScorePlan::new(ds.clone(), &o).unwrap();
    let work = tmp.path().join("work");
    let mut log = ScoreLog::open(&work, &plan).unwrap();
    let b = plan.batch(0).unwrap();
    // One score per pair, finite, in order.
    let e = log
        .append(&plan, 0, &vec![0.0; b.pairs.len() + 1])
        .unwrap_err();
    assert!(e.to_string().contains("scores for"), "{e}");
    let mut bad = vec![0.5; b.pairs.len()];
    bad[0] = f32::NAN;
    let e = log.append(&plan, 0, &bad).unwrap_err();
    assert!(e.to_string().contains("finite"), "{e}");
    if plan.len() > 1 {
        let b1 = plan.batch(1).unwrap();
        let e = log
            .append(&plan, 1, &vec![0.0; b1.pairs.len()])
            .unwrap_err();
        assert!(e.to_string().contains("is next"), "{e}");
    }
    log.append(&plan, 0, &vec![1.0; b.pairs.len()]).unwrap();
    drop(log);
    // Other settings, same work dir: refused, never mixed.
    o.batch_size = 3;
    let other = ScorePlan::new(ds.clone(), &o).unwrap();
    let e = ScoreLog::open(&work, &other).unwrap_err();
    assert!(e.to_string().contains("other scoring settings"), "{e}");
    // Another dataset's logs.
    let mut spec2 = gen(4);
    spec2.rows.truncate(5);
    let ds2 = Arc::new(write(&tmp.path().join("ds2"), &spec2));
    o.batch_size = 2;
    let p2 = ScorePlan::new(ds2.clone(), &o).unwrap();
    let e = ScoreLog::open(&work, &p2).unwrap_err();
    assert!(e.to_string().contains("dataset"), "{e}");
    let e = collect(&ds2, &work).unwrap_err();
    assert!(e.to_string().contains("not of"), "{e}");
    // Unfinished, then finished.
    if plan.len() > 1 {
        let e = collect(&ds, &work).unwrap_err();
        assert!(e.to_string().contains("run it again"), "{e}");
    }
    score_range(&plan, &work, plan.len());
    let scores = collect(&ds, &work).unwrap();
    // A missing rank of a wider world.
    let w2 = tmp.path().join("w2");
    o.world_size = 2;
    o.rank = 1;
    let r1 = ScorePlan::new(ds.clone(), &o).unwrap();
    score_range(&r1, &w2, r1.len());
    let e = collect(&ds, &w2).unwrap_err();
    assert!(e.to_string().contains("rank 0 of 2"), "{e}");
    // attach: the count and finiteness.
    let out = tmp.path().join("out");
    let e = attach(&ds, &scores[1..], &out, WriterOptions::default()).unwrap_err();
    assert!(e.to_string().contains("unique pairs"), "{e}");
    let mut inf = scores.clone();
    inf[0] = f32::INFINITY;
    let e = attach(&ds, &inf, &out, WriterOptions::default()).unwrap_err();
    assert!(e.to_string().contains("finite"), "{e}");
    assert!(!out.exists());
    // Settings out of range, an embedder layout, a rank beyond the world.
    let mut o = Options::DEFAULT;
    o.mode = "embedder".parse().unwrap();
    let e = ScorePlan::new(ds.clone(), &o).unwrap_err();
    assert!(e.to_string().contains("pair mode"), "{e}");
    let mut o = Options::DEFAULT;
    o.rank = 2;
    o.world_size = 2;
    assert!(ScorePlan::new(ds.clone(), &o).is_err());
    let mut o = Options::DEFAULT;
    o.batch_size = 0;
    assert!(ScorePlan::new(ds, &o).is_err());
}

/// A pairs export read back: per row (pair, batch, row, passage_id, input_ids, token types,
/// texts) and the file's `rankfeed.pairs` metadata.
struct Exported {
    pair: Vec<i64>,
    batch: Vec<i64>,
    row: Vec<i64>,
    passage: Vec<i64>,
    key: Vec<i64>,
    ids: Vec<Vec<i64>>,
    types: Option<Vec<Vec<i64>>>,
    texts: Option<Vec<[Option<String>; 3]>>,
    meta: Vec<rankfeed::score::PairsMeta>,
}

fn read_pairs(dir: &Path) -> Exported {
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Int32Type, Int64Type};
    use arrow_array::Array;
    let mut e = Exported {
        pair: vec![],
        batch: vec![],
        row: vec![],
        passage: vec![],
        key: vec![],
        ids: vec![],
        types: None,
        texts: None,
        meta: vec![],
    };
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|f| f.unwrap().path())
        .collect();
    files.sort();
    for f in files {
        let b = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
            std::fs::File::open(&f).unwrap(),
        )
        .unwrap();
        let kv = b.metadata().file_metadata().key_value_metadata().unwrap();
        let m = kv
            .iter()
            .find(|k| k.key == rankfeed::score::PAIRS_KEY)
            .unwrap();
        e.meta
            .push(serde_json::from_str(m.value.as_deref().unwrap()).unwrap());
        for batch in b.build().unwrap() {
            let batch = batch.unwrap();
            let int = |name: &str| -> Vec<i64> {
                let c = batch.column_by_name(name).unwrap();
                match c.data_type() {
                    arrow_schema::DataType::Int64 => {
                        c.as_primitive::<Int64Type>().values().to_vec()
                    }
                    _ => c
                        .as_primitive::<Int32Type>()
                        .values()
                        .iter()
                        .map(|&v| v as i64)
                        .collect(),
                }
            };
            let lists = |name: &str| -> Option<Vec<Vec<i64>>> {
                let c = batch.column_by_name(name)?.as_list::<i32>().clone();
                Some(
                    (0..c.len())
                        .map(|i| {
                            let v = c.value(i);
                            v.as_primitive::<Int32Type>()
                                .values()
                                .iter()
                                .map(|&t| t as i64)
                                .collect()
                        })
                        .collect(),
                )
            };
            e.pair.extend(int("pair"));
            e.batch.extend(int("batch"));
            e.row.extend(int("row"));
            e.passage.extend(int("passage_id"));
            e.key.extend(int("key"));
            e.ids.extend(lists("input_ids").unwrap());
            if let Some(t) = lists("token_type_ids") {
                e.types.get_or_insert_with(Vec::new).extend(t);
            }
            if batch.column_by_name("query_text").is_some() {
                let s = |name: &str, i: usize| {
                    let c = batch.column_by_name(name).unwrap().as_string::<i32>();
                    (!c.is_null(i)).then(|| c.value(i).to_string())
                };
                let t = e.texts.get_or_insert_with(Vec::new);
                for i in 0..batch.num_rows() {
                    t.push([
                        s("query_text", i),
                        s("prompt_text", i),
                        s("passage_text", i),
                    ]);
                }
            }
        }
    }
    e
}

/// Write `(pair, score)` rows (plus `row` / `passage_id` when given) as a Parquet file, with
/// the pair column as `pair_type` and the score as f32 or f64, optionally with metadata.
fn write_scores(
    path: &Path,
    rows: &[(i64, f64, i64, i64, i64)],
    (pair_type, wide, checks): (u64, bool, bool),
    meta: Option<String>,
) {
    use arrow_array::{ArrayRef, Float32Array, Float64Array, Int32Array, Int64Array};
    use arrow_array::{UInt32Array, UInt64Array};
    let pair: ArrayRef = match pair_type {
        0 => Arc::new(Int32Array::from_iter_values(
            rows.iter().map(|r| r.0 as i32),
        )),
        1 => Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))),
        2 => Arc::new(UInt32Array::from_iter_values(
            rows.iter().map(|r| r.0 as u32),
        )),
        _ => Arc::new(UInt64Array::from_iter_values(
            rows.iter().map(|r| r.0 as u64),
        )),
    };
    let score: ArrayRef = if wide {
        Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.1)))
    } else {
        Arc::new(Float32Array::from_iter_values(
            rows.iter().map(|r| r.1 as f32),
        ))
    };
    let mut cols = vec![("score", score), ("pair", pair)];
    if checks {
        cols.push((
            "row",
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.2))),
        ));
        cols.push((
            "passage_id",
            Arc::new(Int32Array::from_iter_values(
                rows.iter().map(|r| r.3 as i32),
            )),
        ));
    }
    let batch = arrow_array::RecordBatch::try_from_iter(cols).unwrap();
    let props = parquet::file::properties::WriterProperties::builder()
        .set_max_row_group_row_count(Some(7))
        .set_key_value_metadata(meta.map(|m| {
            vec![parquet::file::metadata::KeyValue::new(
                rankfeed::score::PAIRS_KEY.to_string(),
                m,
            )]
        }))
        .build();
    let mut w = parquet::arrow::ArrowWriter::try_new(
        std::fs::File::create(path).unwrap(),
        batch.schema(),
        Some(props),
    )
    .unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

#[test]
fn pairs_exported_and_scores_files_read_back_exactly_or_refused() {
    use rankfeed::score::{export_pairs, read_scores};
    let tok = TextTokenizer::from_file(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sample/bert/tokenizer.json"),
    )
    .unwrap();
    let cases = 60 * support::long();
    let mut refused: HashMap<&str, u64> = HashMap::new();
    let mut files_written = 0;
    for case in 0..cases {
        let tmp = tempfile::tempdir().unwrap();
        let ds = Arc::new(write(&tmp.path().join("ds"), &gen(1000 + case)));
        let mut rng = KeyedRng::new(&[0x9a15, case]);
        let o = options(&mut rng);
        let text = rng.below(2) == 0;
        // Every rank's export: together every pair exactly once, as its plan batches it.
        let mut all: Vec<(i64, f64, i64, i64, i64)> = Vec::new();
        let mut seen = vec![0u32; UniquePairs::build(&ds).unwrap().len()];
        let mut metas = Vec::new();
        for rank in 0..o.world_size {
            let mut o = o.clone();
            o.rank = rank;
            let plan = ScorePlan::new(ds.clone(), &o).unwrap();
            let dir = tmp.path().join(format!("pairs-{rank}"));
            let r = export_pairs(&plan, &dir, text.then_some(&tok), false).unwrap();
            let e = read_pairs(&dir);
            assert_eq!(r.pairs as usize, e.pair.len(), "case {case}");
            let mut k = 0;
            for i in 0..plan.len() {
                for &p in plan.batch_pairs(i).unwrap() {
                    assert_eq!(e.pair[k], p as i64, "case {case}");
                    assert_eq!(e.batch[k] as u64, i * o.world_size + rank, "case {case}");
                    let (row, passage) = plan.pairs().first(p);
                    assert_eq!((e.row[k], e.passage[k]), (row as i64, passage as i64));
                    assert_eq!(
                        e.key[k],
                        rankfeed::score::content_key(&ds, row, passage).unwrap()
                    );
                    assert_eq!(e.ids[k], want_ids(&ds, &plan, p), "case {case} pair {p}");
                    let types = want_pair(&ds, &plan, p, |pair| pair.type_ids());
                    match &e.types {
                        Some(t) => {
                            let t: Vec<u8> = t[k].iter().map(|&v| v as u8).collect();
                            assert_eq!(t, types, "case {case} pair {p}");
                        }
                        None => assert!(!plan.collator().has_token_type_ids()),
                    }
                    if let Some(texts) = &e.texts {
                        let g = ds.group_ids(row as usize).unwrap();
                        let prompt = plan.collator().prompt_of(&ds, g.prompt).unwrap();
                        let passage = ds.passage(passage as i32).unwrap();
                        assert_eq!(texts[k][0], Some(tok.decode(g.query).unwrap()));
                        assert_eq!(
                            texts[k][1],
                            (!prompt.is_empty()).then(|| tok.decode(prompt).unwrap())
                        );
                        assert_eq!(texts[k][2], Some(tok.decode(passage).unwrap()));
                    } else {
                        assert!(!text, "case {case}");
                    }
                    seen[p as usize] += 1;
                    all.push((
                        p as i64,
                        teacher(&e.ids[k]) as f64,
                        row as i64,
                        passage as i64,
                        e.key[k],
                    ));
                    k += 1;
                }
            }
            assert_eq!(k, e.pair.len(), "case {case}");
            for m in &e.meta {
                assert_eq!(m.seal, ds.manifest().checksum);
                assert_eq!(
                    (m.plan.as_str(), m.rank, m.world_size),
                    (plan.digest(), rank, o.world_size)
                );
                assert_eq!(m.unique_pairs as usize, seen.len());
            }
            metas.extend(e.meta);
            // Publishing never replaces an output unless asked.
            assert!(export_pairs(&plan, &dir, None, false).is_err());
        }
        assert!(seen.iter().all(|&n| n == 1), "case {case}");

        // Scores written by "another tool": shuffled, split, any integer and float type, with
        // or without the checked columns and the metadata.
        for i in (1..all.len()).rev() {
            all.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let scores_dir = tmp.path().join("scores");
        std::fs::create_dir(&scores_dir).unwrap();
        let parts = 1 + rng.below(4) as usize;
        let style = (rng.below(4), rng.below(2) == 0, rng.below(2) == 0);
        let meta = (rng.below(2) == 0).then(|| serde_json::to_string(&metas[0]).unwrap());
        let chunk = all.len().div_ceil(parts).max(1);
        let mut paths = Vec::new();
        for (i, rows) in all.chunks(chunk).enumerate() {
            let p = scores_dir.join(format!("part-{i}.parquet"));
            write_scores(&p, rows, style, meta.clone());
            paths.push(p);
            files_written += 1;
        }
        let want: Vec<f32> = (0..seen.len())
            .map(|p| {
                let plan = ScorePlan::new(ds.clone(), &o).unwrap();
                teacher(&want_ids(&ds, &plan, p as u32))
            })
            .collect();
        // A directory or the files: the same scores.
        assert_eq!(
            read_scores(&ds, std::slice::from_ref(&scores_dir)).unwrap(),
            want
        );
        assert_eq!(read_scores(&ds, &paths).unwrap(), want, "case {case}");

        // One defect at random: always an error naming the file.
        let bad = tmp.path().join("bad.parquet");
        let mut rows = all.clone();
        let kind = [
            "missing",
            "twice",
            "unknown",
            "nonfinite",
            "passage",
            "seal",
        ][rng.below(6) as usize];
        let mut style = style;
        let mut meta = meta;
        let at = rng.below(rows.len() as u64) as usize;
        match kind {
            "missing" => {
                rows.remove(at);
            }
            "twice" => rows.push(rows[at]),
            "unknown" => rows[at].0 = seen.len() as i64 + rng.below(3) as i64,
            "nonfinite" => {
                rows[at].1 = [f64::NAN, f64::INFINITY, 1e300][rng.below(3) as usize];
                style.1 = true;
            }
            "passage" => {
                rows[at].3 += 1;
                style.2 = true;
            }
            "key" => {
                // Another dataset's pair: same ids, other content.
                rows[at].4 ^= 1 << rng.below(63);
                style.2 = true;
            }
            _ => {
                let mut m = metas[0].clone();
                m.seal = "xxh3-128:0".into();
                meta = Some(serde_json::to_string(&m).unwrap());
            }
        }
        if kind == "unknown" && style.0 >= 2 && rows[at].0 < 0 {
            continue;
        }
        write_scores(&bad, &rows, style, meta);
        let e = read_scores(&ds, std::slice::from_ref(&bad))
            .unwrap_err()
            .to_string();
        let expect = match kind {
            "missing" => "have no score",
            "twice" => "scored twice",
            "unknown" => "does not exist",
            "nonfinite" => "finite",
            "passage" | "key" => "does not belong",
            _ => "these are pairs of dataset",
        };
        assert!(e.contains(expect), "case {case} {kind}: {e}");
        if kind != "missing" {
            assert!(e.contains("bad.parquet"), "case {case} {kind}: {e}");
        }
        *refused.entry(kind).or_default() += 1;
    }
    eprintln!("pairs files: {cases} cases, {files_written} scores files read back exactly; refused {refused:?}");
}

#[test]
fn scores_files_without_the_columns_or_with_nulls_are_errors() {
    use arrow_array::{ArrayRef, Float32Array, Int64Array};
    let tmp = tempfile::tempdir().unwrap();
    let ds = write(&tmp.path().join("ds"), &gen(7));
    let n = UniquePairs::build(&ds).unwrap().len() as i64;
    let put = |name: &str, cols: Vec<(&str, ArrayRef)>| {
        let path = tmp.path().join(name);
        let batch = arrow_array::RecordBatch::try_from_iter(cols).unwrap();
        let mut w = parquet::arrow::ArrowWriter::try_new(
            std::fs::File::create(&path).unwrap(),
            batch.schema(),
            None,
        )
        .unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        path
    };
    let pairs: ArrayRef = Arc::new(Int64Array::from_iter_values(0..n));
    let no_score = put("a.parquet", vec![("pair", pairs.clone())]);
    let e = rankfeed::score::read_scores(&ds, &[no_score]).unwrap_err();
    assert!(e.to_string().contains("`score` column"), "{e}");
    let mut values: Vec<Option<f32>> = vec![Some(1.0); n as usize];
    values[n as usize - 1] = None;
    let null = put(
        "b.parquet",
        vec![
            ("pair", pairs.clone()),
            ("score", Arc::new(Float32Array::from(values))),
        ],
    );
    let e = rankfeed::score::read_scores(&ds, &[null]).unwrap_err();
    assert!(e.to_string().contains("null score"), "{e}");
    let mut ids: Vec<Option<i64>> = (0..n).map(Some).collect();
    ids[0] = None;
    let null_pair = put(
        "c.parquet",
        vec![
            ("pair", Arc::new(Int64Array::from(ids))),
            ("score", Arc::new(Float32Array::from(vec![1.0; n as usize]))),
        ],
    );
    let e = rankfeed::score::read_scores(&ds, &[null_pair]).unwrap_err();
    assert!(
        e.to_string().contains("row 0") || e.to_string().contains(":0"),
        "{e}"
    );
    // Two columns of one name: refused (reading the first would ignore the other).
    let twice = put(
        "d.parquet",
        vec![
            ("pair", pairs.clone()),
            ("score", Arc::new(Float32Array::from(vec![1.0; n as usize]))),
            ("score", Arc::new(Float32Array::from(vec![2.0; n as usize]))),
        ],
    );
    let e = rankfeed::score::read_scores(&ds, &[twice]).unwrap_err();
    assert!(
        e.to_string().contains("two columns are named `score`"),
        "{e}"
    );
    // Any integer or float type is a score (Polars' list lengths are uint32).
    let u32s = put(
        "e.parquet",
        vec![
            (
                "pair",
                Arc::new(arrow_array::UInt16Array::from_iter_values(0..n as u16)),
            ),
            (
                "score",
                Arc::new(arrow_array::UInt32Array::from_iter_values(0..n as u32)),
            ),
        ],
    );
    let got = rankfeed::score::read_scores(&ds, &[u32s]).unwrap();
    assert_eq!(got, (0..n).map(|v| v as f32).collect::<Vec<_>>());
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let e = rankfeed::score::read_scores(&ds, &[empty]).unwrap_err();
    assert!(e.to_string().contains("no .parquet files"), "{e}");
}
