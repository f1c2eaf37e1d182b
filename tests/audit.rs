//! `rankfeed audit` (issue 22): a crafted dataset with one known defect of every kind gives
//! exactly the known counts; a seeded generator of small datasets (queries and passages drawn
//! from small pools so that duplicates, false negatives and conflicts happen, scores with ties
//! and NaNs, 1-3 sources) checks every finding against a naive reference written from the
//! definitions (quadratic, obviously right), plus the truncation invariants.
//!
//! `RANKFEED_LONG=<factor>` multiplies the generated datasets.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use rankfeed::audit::{audit, Audit, Finding};
use rankfeed::format::{SourceStats, TextSettings, TokenizerFacts};
use rankfeed::options::Options;
use rankfeed::sample::KeyedRng;
use rankfeed::tokenizer::TextTokenizer;
use rankfeed::writer::{DatasetWriter, GroupRecord, ManifestInfo, WriterOptions};
use rankfeed::Dataset;

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
    pos: Vec<i32>,
    neg: Vec<i32>,
    scores: Option<(Vec<f32>, Vec<f32>)>,
    source: u32,
}

fn write(dir: &Path, passages: &[Vec<i32>], rows: &[Row], n_sources: u32) -> Dataset {
    let mut w = DatasetWriter::create(
        dir,
        WriterOptions {
            rows_per_batch: 8,
            overwrite: true,
        },
    )
    .unwrap();
    for p in passages {
        w.add_passage(p).unwrap();
    }
    for r in rows {
        w.add_group(&GroupRecord {
            query: &r.query,
            pos: &r.pos,
            neg: &r.neg,
            pos_scores: r.scores.as_ref().map(|s| s.0.as_slice()),
            neg_scores: r.scores.as_ref().map(|s| s.1.as_slice()),
            prompt: None,
            source: r.source,
        })
        .unwrap();
    }
    let sources = (0..n_sources)
        .map(|s| {
            let n = rows.iter().filter(|r| r.source == s).count() as u64;
            SourceStats {
                id: s,
                path: format!("s{s}.jsonl"),
                rows_read: n,
                rows_accepted: n,
                rows_empty_neg: rows
                    .iter()
                    .filter(|r| r.source == s && r.neg.is_empty())
                    .count() as u64,
                ..Default::default()
            }
        })
        .collect();
    w.finish(ManifestInfo {
        tokenizer: Some(bert_facts()),
        text: TextSettings::default(),
        sources,
        shards: None,
    })
    .unwrap();
    Dataset::open(dir).unwrap()
}

fn toks(base: i32, n: usize) -> Vec<i32> {
    (0..n as i32).map(|i| 1000 + base * 7 + i).collect()
}

fn finding(count: u64, rows: &[u64]) -> Finding {
    Finding {
        count,
        rows: rows.len() as u64,
        examples: rows.iter().copied().take(5).collect(),
    }
}

#[test]
fn a_crafted_dataset_gives_the_known_counts() {
    let passages: Vec<Vec<i32>> = (0..9)
        .map(|i| if i == 8 { toks(i, 200) } else { toks(i, 5) })
        .collect();
    let (qa, qb, qc, qd) = (toks(50, 4), toks(60, 10), toks(70, 3), toks(80, 40));
    let sc = |p: &[f32], n: &[f32]| Some((p.to_vec(), n.to_vec()));
    let row = |query: &Vec<i32>, pos: &[i32], neg: &[i32], scores, source| Row {
        query: query.clone(),
        pos: pos.to_vec(),
        neg: neg.to_vec(),
        scores,
        source,
    };
    let rows = vec![
        // 0: clean.
        row(&qa, &[0], &[1, 2], sc(&[0.9], &[0.1, 0.2]), 0),
        // 1: one false negative (3), and a negative scored above the positive.
        row(&qb, &[3], &[3, 4], sc(&[0.5], &[0.6, 0.1]), 0),
        // 2: its only negative is its positive.
        row(&qc, &[5], &[5], sc(&[0.7], &[0.7]), 0),
        // 3: no negatives, a 40-token query, a 200-token positive.
        row(&qd, &[8], &[], None, 0),
        // 4: query A again, 1 positive here and negative in row 0, 0 the other way round.
        row(&qa, &[1], &[0], None, 1),
        // 5: an exact repeat of row 0.
        row(&qa, &[0], &[2, 1], sc(&[1.0], &[0.3, 0.2]), 1),
        // 6, 7: constant scores in source 2, an infinity and a NaN in row 7.
        row(&toks(90, 3), &[6], &[7], sc(&[2.0], &[2.0]), 2),
        row(
            &toks(91, 3),
            &[7],
            &[6],
            sc(&[f32::INFINITY], &[f32::NAN]),
            2,
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let ds = write(dir.path(), &passages, &rows, 3);
    // The other dataset shares query B and passages 3 and 8 (as tokens, under other ids).
    let other_dir = tempfile::tempdir().unwrap();
    let other = write(
        other_dir.path(),
        &[toks(99, 6), passages[8].clone(), passages[3].clone()],
        &[
            row(&qb, &[2], &[0, 1], None, 0),
            row(&toks(98, 2), &[1], &[0], None, 0),
        ],
        1,
    );
    let options = Options {
        query_max_len: 32,
        passage_max_len: 128,
        ..Options::DEFAULT
    };
    let a = audit(&ds, &options, Some(&other), 5).unwrap();
    assert_eq!((a.rows, a.passages, a.passage_refs), (8, 9, 18));
    assert_eq!(a.false_negatives, finding(2, &[1, 2]));
    assert_eq!(a.rows_without_true_negatives, finding(1, &[2]));
    assert_eq!(a.rows_without_negatives, finding(1, &[3]));
    let d = &a.duplicate_queries;
    assert_eq!((d.queries, d.rows), (1, 3));
    assert_eq!(d.repeated_rows, finding(1, &[5]));
    assert_eq!(d.conflicting, finding(1, &[0, 4, 5]));
    // (A, 1) and (A, 0); rows 0, 4 and 5 hold the negative side.
    assert_eq!(a.positive_elsewhere, finding(2, &[0, 4, 5]));
    // Row 1: 0.6 >= 0.5; row 2: 0.7 >= 0.7; row 6: 2.0 >= 2.0 (row 7's NaN never compares).
    assert_eq!(a.score_inversions, finding(3, &[1, 2, 6]));
    let s: Vec<_> = a.sources.iter().map(|s| &s.scores).collect();
    assert_eq!((s[0].rows_with_scores, s[0].rows_missing_scores), (3, 1));
    assert!(!s[0].constant && !s[1].constant && s[2].constant);
    // Both lists' non-finite scores, one row (regression: each list was counted as a row).
    assert_eq!(s[2].non_finite, finding(2, &[7]));
    assert_eq!((s[0].min, s[0].max), (Some(0.1), Some(0.9)));
    assert_eq!(a.sources[0].rows_without_negatives, finding(1, &[3]));
    assert_eq!(a.sources[1].share, 0.25);
    // Truncation, FlagEmbedding's encoder rule with BERT's 3 pair specials: the query is cut to
    // 32 + 128/4 = 64 (none is that long), the passage to 128 + 32/2 = 144, then the pair to
    // 160 by cutting the passage: only row 3's pair (40 + 144 + 3 = 187 -> passage 117) cuts.
    let t = &a.truncation;
    assert_eq!(
        (t.queries.cut, t.queries.of, t.queries.tokens_lost),
        (0, 8, 0)
    );
    assert_eq!(
        (t.passages.cut, t.passages.of, t.passages.tokens_lost),
        (1, 9, 83)
    );
    let pairs = t.pairs.as_ref().unwrap();
    assert_eq!((pairs.cut, pairs.of, pairs.tokens_lost), (1, 18, 83));
    // Embedder mode: each sequence on its own, [CLS] .. [SEP] of 32 and 128.
    let e = audit(
        &ds,
        &Options {
            mode: rankfeed::collate::Mode::Embedder,
            ..options.clone()
        },
        None,
        5,
    )
    .unwrap();
    assert_eq!(e.truncation.queries.tokens_lost, 40 - 30);
    assert_eq!(e.truncation.passages.tokens_lost, 200 - 126);
    assert!(e.truncation.pairs.is_none() && e.against.is_none());
    let o = a.against.as_ref().unwrap();
    assert_eq!(o.queries, finding(1, &[1]));
    assert_eq!(o.passages, finding(2, &[1, 3]));
    // The text report names each finding with its rows.
    let text = a.summary();
    assert!(
        text.contains("false negatives") && text.contains("(rows 1, 2)"),
        "{text}"
    );
    assert!(text.contains("CONSTANT"), "{text}");
    // Another tokenizer's ids are not compared.
    let mut facts = bert_facts();
    facts.fingerprint = "xxh3-128:other".into();
    let third = tempfile::tempdir().unwrap();
    let mut w = DatasetWriter::create(
        third.path(),
        WriterOptions {
            overwrite: true,
            ..WriterOptions::default()
        },
    )
    .unwrap();
    w.add_passage(&[1]).unwrap();
    w.finish(ManifestInfo {
        tokenizer: Some(facts),
        text: TextSettings::default(),
        sources: Vec::new(),
        shards: None,
    })
    .unwrap();
    let t = Dataset::open(third.path()).unwrap();
    let e = audit(&ds, &options, Some(&t), 5).unwrap_err().to_string();
    assert!(e.contains("another tokenizer"), "{e}");
}

/// The findings by their definitions, quadratic in the rows.
fn naive(rows: &[Row], examples: usize) -> BTreeMap<&'static str, Finding> {
    let mk = |count: u64, rs: BTreeSet<u64>| Finding {
        count,
        rows: rs.len() as u64,
        examples: rs.into_iter().take(examples).collect(),
    };
    let mut out = BTreeMap::new();
    let (mut fneg, mut fneg_rows, mut none_true, mut no_neg) =
        (0, BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    let (mut inv, mut inv_rows) = (0, BTreeSet::new());
    for (i, r) in rows.iter().enumerate() {
        let f = r.neg.iter().filter(|n| r.pos.contains(n)).count() as u64;
        if f > 0 {
            fneg += f;
            fneg_rows.insert(i as u64);
            if f == r.neg.len() as u64 {
                none_true.insert(i as u64);
            }
        }
        if r.neg.is_empty() {
            no_neg.insert(i as u64);
        }
        if let Some((ps, ns)) = &r.scores {
            let k = ns.iter().filter(|&&n| ps.iter().any(|&p| n >= p)).count() as u64;
            if k > 0 {
                inv += k;
                inv_rows.insert(i as u64);
            }
        }
    }
    out.insert("false_negatives", mk(fneg, fneg_rows));
    out.insert(
        "rows_without_true_negatives",
        mk(none_true.len() as u64, none_true),
    );
    out.insert("rows_without_negatives", mk(no_neg.len() as u64, no_neg));
    out.insert("score_inversions", mk(inv, inv_rows));
    let set = |v: &[i32]| v.iter().copied().collect::<BTreeSet<i32>>();
    let (mut repeated, mut conflicting, mut conf_rows) = (BTreeSet::new(), 0, BTreeSet::new());
    let (mut pairs, mut else_rows) = (BTreeSet::new(), BTreeSet::new());
    let mut dup_queries = 0;
    let mut dup_rows = 0;
    let mut seen_q: Vec<&Vec<i32>> = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        let same: Vec<usize> = (0..rows.len())
            .filter(|&j| rows[j].query == r.query)
            .collect();
        if same.len() > 1 && !seen_q.contains(&&r.query) {
            seen_q.push(&r.query);
            dup_queries += 1;
            dup_rows += same.len();
            if same
                .iter()
                .any(|&j| (set(&rows[j].pos), set(&rows[j].neg)) != (set(&r.pos), set(&r.neg)))
            {
                conflicting += 1;
                conf_rows.extend(same.iter().map(|&j| j as u64));
            }
        }
        for &j in &same {
            if j < i && (set(&rows[j].pos), set(&rows[j].neg)) == (set(&r.pos), set(&r.neg)) {
                repeated.insert(i as u64);
            }
            if j != i {
                for n in &r.neg {
                    if rows[j].pos.contains(n) {
                        pairs.insert((r.query.clone(), *n));
                        else_rows.insert(i as u64);
                    }
                }
            }
        }
    }
    out.insert("repeated_rows", mk(repeated.len() as u64, repeated));
    out.insert("conflicting", mk(conflicting, conf_rows));
    out.insert("positive_elsewhere", mk(pairs.len() as u64, else_rows));
    out.insert(
        "dup",
        Finding {
            count: dup_queries,
            rows: dup_rows as u64,
            examples: Vec::new(),
        },
    );
    out
}

fn got(a: &Audit) -> BTreeMap<&'static str, Finding> {
    let d = &a.duplicate_queries;
    BTreeMap::from([
        ("false_negatives", a.false_negatives.clone()),
        (
            "rows_without_true_negatives",
            a.rows_without_true_negatives.clone(),
        ),
        ("rows_without_negatives", a.rows_without_negatives.clone()),
        ("score_inversions", a.score_inversions.clone()),
        ("repeated_rows", d.repeated_rows.clone()),
        ("conflicting", d.conflicting.clone()),
        ("positive_elsewhere", a.positive_elsewhere.clone()),
        (
            "dup",
            Finding {
                count: d.queries,
                rows: d.rows,
                examples: Vec::new(),
            },
        ),
    ])
}

#[test]
fn generated_datasets_match_the_definitions() {
    let n = 150 * support::long();
    // (The LLM layouts need the mode's default prompt, which only conversion stores.)
    let modes = [
        rankfeed::collate::Mode::Encoder,
        rankfeed::collate::Mode::Embedder,
    ];
    for case in 0..n {
        let mut rng = KeyedRng::new(&[0xa0d17, case]);
        let n_passages = 1 + rng.below(12) as usize;
        let passages: Vec<Vec<i32>> = (0..n_passages)
            .map(|i| {
                let cap = if rng.below(4) == 0 { 300 } else { 20 };
                toks(i as i32, 1 + rng.below(cap) as usize)
            })
            .collect();
        let n_queries = 1 + rng.below(6) as i32;
        let n_sources = 1 + rng.below(3) as u32;
        let n_rows = 1 + rng.below(40) as usize;
        let scored = rng.below(3);
        let score = |rng: &mut KeyedRng| match rng.below(12) {
            0 => f32::NAN,
            1..=4 => 0.5,
            _ => rng.below(5) as f32 / 4.0,
        };
        let rows: Vec<Row> = (0..n_rows)
            .map(|_| {
                let q = rng.below(n_queries as u64) as i32;
                let pick = |k: u64, rng: &mut KeyedRng| -> Vec<i32> {
                    (0..k)
                        .map(|_| rng.below(n_passages as u64) as i32)
                        .collect()
                };
                let pos = pick(1 + rng.below(3), &mut rng);
                let neg = pick(rng.below(5), &mut rng);
                let scores = (scored == 2 || (scored == 1 && rng.below(2) == 0)).then(|| {
                    (
                        pos.iter().map(|_| score(&mut rng)).collect(),
                        neg.iter().map(|_| score(&mut rng)).collect(),
                    )
                });
                Row {
                    query: toks(100 + q, 1 + (q as usize * 13) % 50),
                    pos,
                    neg,
                    scores,
                    source: rng.below(n_sources as u64) as u32,
                }
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let ds = write(dir.path(), &passages, &rows, n_sources);
        let examples = rng.below(4) as usize;
        let mode = modes[rng.below(2) as usize];
        let options = Options {
            mode,
            truncation: if mode == rankfeed::collate::Mode::Embedder || rng.below(2) == 0 {
                rankfeed::collate::Truncation::FlagEmbedding
            } else {
                rankfeed::collate::Truncation::LongestFirst
            },
            query_max_len: 4 + rng.below(40) as usize,
            passage_max_len: 8 + rng.below(100) as usize,
            ..Options::DEFAULT
        };
        let a = audit(&ds, &options, Some(&ds), examples).unwrap();
        assert_eq!(got(&a), naive(&rows, examples), "case {case}");
        // Truncation: counts within their totals; a dataset against itself overlaps fully.
        let t = &a.truncation;
        assert_eq!(t.queries.of, n_rows as u64);
        assert!(t.passages.of <= n_passages as u64 && t.queries.cut <= t.queries.of);
        match &t.pairs {
            Some(p) => {
                assert_eq!(p.of, a.passage_refs, "case {case}");
                // Each passage's worst cut is one of its pairs' cuts.
                assert!(p.cut <= p.of && p.cut >= t.passages.cut, "case {case}");
                assert!(p.tokens_lost >= t.passages.tokens_lost, "case {case}");
            }
            None => assert_eq!(mode, rankfeed::collate::Mode::Embedder),
        }
        let o = a.against.as_ref().unwrap();
        assert_eq!(o.queries.rows, n_rows as u64, "case {case}");
        assert_eq!(o.passages.count, n_passages as u64, "case {case}");
        // Per source: rows add up, scores counted once per row.
        let total: u64 = a.sources.iter().map(|s| s.rows).sum();
        assert_eq!(total, n_rows as u64);
        for (s, sa) in a.sources.iter().enumerate() {
            let mine: Vec<&Row> = rows.iter().filter(|r| r.source == s as u32).collect();
            assert_eq!(
                sa.scores.rows_with_scores,
                mine.iter().filter(|r| r.scores.is_some()).count() as u64
            );
            let finite: Vec<f32> = mine
                .iter()
                .filter_map(|r| r.scores.as_ref())
                .flat_map(|(p, n)| p.iter().chain(n))
                .copied()
                .filter(|v| v.is_finite())
                .collect();
            let constant = finite.len() >= 2 && finite.iter().all(|&v| v == finite[0]);
            assert_eq!(sa.scores.constant, constant, "case {case} source {s}");
        }
    }
}

/// `exclude_false_negatives` (issue 22), over generated datasets and loader settings (random,
/// length-grouped and token-budget batches, group sizes 2-5, world sizes 1-3): no drawn
/// negative is one of its row's positives; a row without false negatives draws exactly what it
/// draws without the option; rows whose every negative is a positive are refused with an error
/// naming the option, or left out with `skip_rows_without_negatives` (and then never drawn),
/// while every other row is still trained once per epoch.
#[test]
fn excluded_false_negatives_are_never_drawn() {
    use rankfeed::loader::{Loader, LoaderOptions, Strategy};
    use rankfeed::sample::{Shard, Tail};
    use std::sync::Arc;
    let n = 120 * support::long();
    let (mut refused, mut skipped, mut checked) = (0, 0, 0);
    for case in 0..n {
        let mut rng = KeyedRng::new(&[0xfa15e, case]);
        let n_passages = 2 + rng.below(10) as usize;
        let passages: Vec<Vec<i32>> = (0..n_passages)
            .map(|i| toks(i as i32, 1 + rng.below(30) as usize))
            .collect();
        let n_rows = 1 + rng.below(50) as usize;
        let rows: Vec<Row> = (0..n_rows)
            .map(|r| {
                let pick = |k: u64, rng: &mut KeyedRng| -> Vec<i32> {
                    (0..k)
                        .map(|_| rng.below(n_passages as u64) as i32)
                        .collect()
                };
                let pos = pick(1 + rng.below(3), &mut rng);
                let neg = pick(1 + rng.below(6), &mut rng);
                Row {
                    query: toks(200 + r as i32, 1 + rng.below(10) as usize),
                    pos,
                    neg,
                    scores: None,
                    source: 0,
                }
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let ds = Arc::new(write(dir.path(), &passages, &rows, 1));
        let none_left: Vec<bool> = rows
            .iter()
            .map(|r| r.neg.iter().all(|n| r.pos.contains(n)))
            .collect();
        let skip = rng.below(2) == 0;
        let mut world = 1 + rng.below(3);
        let strategy = match rng.below(3) {
            0 => Strategy::Random,
            1 => Strategy::LengthGrouped {
                megabatch: 1 + rng.below(4) as usize,
            },
            _ => {
                world = 1; // (token budgets pad the tail; one rank has none)
                Strategy::TokenBudget {
                    max_tokens: 2000,
                    megabatch: None,
                }
            }
        };
        let opts = |exclude: bool, rank: u64| {
            let mut o = LoaderOptions {
                batch_size: 1 + rng.clone().below(4) as usize,
                seed: case,
                shard: Shard {
                    rank,
                    world_size: world,
                    tail: if world == 1 { Tail::Pad } else { Tail::Uneven },
                },
                skip_rows_without_negatives: skip,
                exclude_false_negatives: exclude,
                prefetch_threads: 0,
                strategy: strategy.clone(),
                ..LoaderOptions::default()
            };
            o.collate.group_size = 2 + (case % 4) as usize;
            o
        };
        let epoch = case % 3;
        let loaders: Result<Vec<Loader>, _> = (0..world)
            .map(|rank| Loader::new(ds.clone(), opts(true, rank)))
            .collect();
        let loaders = match loaders {
            Err(e) => {
                assert!(none_left.iter().any(|&x| x) && !skip, "case {case}: {e}");
                assert!(e.to_string().contains("exclude_false_negatives"), "{e}");
                refused += 1;
                continue;
            }
            Ok(l) => l,
        };
        if none_left.iter().any(|&x| x) {
            skipped += 1;
        }
        let mut seen = vec![0u32; n_rows];
        for l in &loaders {
            for step in 0..l.steps(epoch).unwrap() {
                for s in l.selections(epoch, step).unwrap() {
                    let r = &rows[s.row as usize];
                    seen[s.row as usize] += 1;
                    assert!(
                        !none_left[s.row as usize],
                        "case {case}: row {} drawn",
                        s.row
                    );
                    for &j in &s.neg {
                        assert!(
                            !r.pos.contains(&r.neg[j as usize]),
                            "case {case}: row {} drew a false negative",
                            s.row
                        );
                    }
                    // Rows without false negatives draw as without the option.
                    let clean = r.neg.iter().all(|n| !r.pos.contains(n));
                    if clean {
                        let mut neg = Vec::new();
                        let pos = rankfeed::sample::sample_group(
                            case,
                            epoch,
                            s.row,
                            r.pos.len(),
                            r.neg.len(),
                            2 + (case % 4) as usize,
                            &mut neg,
                        )
                        .unwrap();
                        assert_eq!((pos, &neg), (s.pos, &s.neg), "case {case}");
                    }
                }
            }
        }
        for (r, &k) in seen.iter().enumerate() {
            assert_eq!(
                k,
                u32::from(!none_left[r]),
                "case {case}: row {r} seen {k} times"
            );
        }
        checked += 1;
    }
    eprintln!("exclude_false_negatives: {checked} checked ({skipped} with rows left out), {refused} refused");
    assert!(checked > n / 3 && refused > 0 && skipped > 0);
}
