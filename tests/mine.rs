//! `rankfeed mine` (issue 22): a seeded generator of small datasets (passages and queries drawn
//! from small token pools so that BM25 scores tie and positives rank high; duplicated passage
//! ids across positives and negatives) crossed with random mining settings (windows, floors,
//! ceilings, absolute and relative margins, top and random sampling, BM25 and dense). Every run
//! is checked against a brute-force ranking of every passage:
//! - no mined negative is one of its row's positives, none repeats, at most `num_negatives`;
//! - each negative's rank (positives removed) lies in the window, its score within the floor,
//!   ceiling and margins; `top` takes exactly the first candidates, `random` a subset of them;
//! - a row short of `num_negatives` had no more candidates (nothing topped up from outside);
//! - the result does not depend on the number of threads; shards merged equal the whole run's
//!   files byte for byte; the manifest records the settings.
//!
//! `RANKFEED_LONG=<factor>` multiplies the cases.

mod support;

use std::path::Path;

use rankfeed::format::{SourceStats, TextSettings};
use rankfeed::mine::{
    mine, mine_negatives, Bm25Index, Bm25Params, Corpus, Embeddings, MineOptions, MineReport,
    Passages, Retriever, Sampling, SearchScratch,
};
use rankfeed::sample::KeyedRng;
use rankfeed::tokenizer::TextTokenizer;
use rankfeed::writer::{DatasetWriter, GroupRecord, ManifestInfo, WriterOptions};
use rankfeed::Dataset;

struct Spec {
    passages: Vec<Vec<i32>>,
    rows: Vec<(Vec<i32>, Vec<i32>, Vec<i32>)>,
}

fn gen(case: u64) -> Spec {
    let mut rng = KeyedRng::new(&[0x313e, case]);
    let vocab = 3 + rng.below(30) as i32;
    let n_passages = 1 + rng.below(60) as usize;
    let words = |rng: &mut KeyedRng, n: u64| -> Vec<i32> {
        (0..n)
            .map(|_| 1000 + rng.below(vocab as u64) as i32)
            .collect()
    };
    let mut passages: Vec<Vec<i32>> = Vec::new();
    while passages.len() < n_passages {
        let l = 1 + rng.below(25);
        let p = words(&mut rng, l);
        if !passages.contains(&p) {
            passages.push(p);
        } else if rng.below(8) == 0 {
            break;
        }
    }
    let n = passages.len() as u64;
    // (Sometimes beyond one block of dense queries.)
    let most = if rng.below(4) == 0 { 90 } else { 30 };
    let n_rows = 1 + rng.below(most);
    let rows = (0..n_rows)
        .map(|_| {
            let ql = 1 + rng.below(6);
            let q = words(&mut rng, ql);
            let pos = (0..1 + rng.below(3)).map(|_| rng.below(n) as i32).collect();
            let neg = (0..rng.below(4)).map(|_| rng.below(n) as i32).collect();
            (q, pos, neg)
        })
        .collect();
    Spec { passages, rows }
}

fn write(dir: &Path, spec: &Spec) -> Dataset {
    write_text(dir, spec, TextSettings::default())
}

fn write_text(dir: &Path, spec: &Spec, text: TextSettings) -> Dataset {
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
    // The default prompts a conversion stores first (mine copies them).
    w.add_prompt(&[1]).unwrap();
    w.add_prompt(&[2]).unwrap();
    // Passages interned in first-reference order, as a conversion stores them.
    let mut ids = vec![None; spec.passages.len()];
    let mut rows = Vec::new();
    for (q, pos, neg) in &spec.rows {
        let mut map = |v: &Vec<i32>| -> Vec<i32> {
            v.iter()
                .map(|&p| {
                    *ids[p as usize].get_or_insert_with(|| {
                        w.intern_passage(&spec.passages[p as usize]).unwrap() as i32
                    })
                })
                .collect()
        };
        let (pos, neg) = (map(pos), map(neg));
        rows.push((q.clone(), pos, neg));
    }
    for p in &spec.passages {
        w.intern_passage(p).unwrap();
    }
    let n = rows.len() as u64;
    for (q, pos, neg) in &rows {
        w.add_group(&GroupRecord {
            query: q,
            pos,
            neg,
            pos_scores: None,
            neg_scores: None,
            prompt: None,
            source: 0,
        })
        .unwrap();
    }
    w.finish(ManifestInfo {
        tokenizer: Some(facts),
        text,
        sources: vec![SourceStats {
            path: "in.jsonl".into(),
            rows_read: n + 2,
            rows_accepted: n,
            rows_rejected: 2,
            rows_empty_neg: rows.iter().filter(|r| r.2.is_empty()).count() as u64,
            ..Default::default()
        }],
        shards: None,
    })
    .unwrap();
    Dataset::open(dir).unwrap()
}

fn options(rng: &mut KeyedRng) -> MineOptions {
    let range_min = rng.below(4) as usize;
    let maybe = |rng: &mut KeyedRng, v: f32| (rng.below(4) == 0).then_some(v);
    MineOptions {
        num_negatives: 1 + rng.below(8) as usize,
        range_min,
        range_max: range_min + 1 + rng.below(30) as usize,
        min_score: maybe(rng, 0.3),
        max_score: maybe(rng, 3.0),
        margin: maybe(rng, 0.2),
        relative_margin: maybe(rng, 0.1),
        sampling: if rng.below(2) == 0 {
            Sampling::Top
        } else {
            Sampling::Random
        },
        seed: rng.below(1000),
        k1: [1.5, 1.2, 0.9][rng.below(3) as usize],
        b: [0.75, 0.0, 1.0][rng.below(3) as usize],
    }
}

/// The positives of every row with the same query as `row` (the same tokens; no prompts here).
fn query_positives(ds: &Dataset, row: usize) -> Vec<i32> {
    let q = ds.group_ids(row).unwrap().query;
    (0..ds.len())
        .map(|r| ds.group_ids(r).unwrap())
        .filter(|g| g.query == q)
        .flat_map(|g| g.pos.to_vec())
        .collect()
}

/// Every corpus passage scored for `row`, brute force, best first (ties by id): each distinct
/// token list once (its first id), those with the tokens of a positive of the row's query
/// removed.
fn brute_force(
    ds: &Dataset,
    corpus: &[Vec<i32>],
    retriever: &Retriever,
    index: Option<&Bm25Index>,
    row: usize,
) -> Vec<(i32, f32)> {
    let g = ds.group_ids(row).unwrap();
    let positives: Vec<&[i32]> = query_positives(ds, row)
        .into_iter()
        .map(|p| ds.passage(p).unwrap())
        .collect();
    let mut all: Vec<(i32, f32)> = (0..corpus.len())
        .filter(|&c| corpus[..c].iter().all(|e| e != &corpus[c]))
        .filter(|&c| !positives.contains(&&corpus[c][..]))
        .map(|c| {
            let s = match retriever {
                Retriever::Bm25 { .. } => index.unwrap().score(g.query, &corpus[c]),
                Retriever::Dense { queries, passages } => {
                    let d = queries.dim;
                    let (q, v) = (
                        &queries.values[row * d..(row + 1) * d],
                        &passages.values[c * d..(c + 1) * d],
                    );
                    q.iter().zip(v).map(|(a, b)| a * b).sum::<f32>()
                }
            };
            (c as i32, s)
        })
        .filter(|&(_, s)| matches!(retriever, Retriever::Dense { .. }) || s > 0.0)
        .collect();
    all.sort_by(|a, b| (b.1 + 0.0).total_cmp(&(a.1 + 0.0)).then(a.0.cmp(&b.0)));
    all
}

/// A corpus for a case: the dataset's own passages, or token lists (the dataset's passages
/// shuffled, some twice, and passages the dataset lacks) as [`Passages`] or as another
/// dataset. Returns the kind and the corpus' passages by id.
fn corpus_tokens(
    ds: &Dataset,
    rng: &mut KeyedRng,
    kind: u64,
    dir: &Path,
) -> (Option<Passages>, Option<Dataset>, Vec<Vec<i32>>) {
    let own: Vec<Vec<i32>> = (0..ds.num_passages())
        .map(|p| ds.passage(p as i32).unwrap().to_vec())
        .collect();
    if kind == 0 {
        return (None, None, own);
    }
    let mut lists = own.clone();
    for i in (1..lists.len()).rev() {
        lists.swap(i, rng.below(i as u64 + 1) as usize);
    }
    lists.truncate(lists.len() - rng.below(lists.len() as u64 / 2 + 1) as usize);
    for _ in 0..rng.below(6) {
        if !own.is_empty() {
            let p = own[rng.below(own.len() as u64) as usize].clone();
            let at = rng.below(lists.len() as u64 + 1) as usize;
            lists.insert(at, p);
        }
        let l = 1 + rng.below(10);
        let fresh: Vec<i32> = (0..l).map(|_| 1000 + rng.below(20) as i32).collect();
        let at = rng.below(lists.len() as u64 + 1) as usize;
        lists.insert(at, fresh);
    }
    if kind == 1 {
        return (Some(Passages::new(lists.clone(), "generated")), None, lists);
    }
    // Another dataset: its passages interned in the list order (duplicates once).
    let spec = Spec {
        passages: lists.clone(),
        rows: vec![(vec![1000], vec![0], vec![])],
    };
    let other = write_passages(dir, &spec);
    let tokens = (0..other.num_passages())
        .map(|p| other.passage(p as i32).unwrap().to_vec())
        .collect();
    (None, Some(other), tokens)
}

/// A dataset holding `spec`'s passages (each once, in order) and rows.
fn write_passages(dir: &Path, spec: &Spec) -> Dataset {
    let mut distinct: Vec<Vec<i32>> = Vec::new();
    for p in &spec.passages {
        if !distinct.contains(p) {
            distinct.push(p.clone());
        }
    }
    write(
        dir,
        &Spec {
            passages: distinct,
            rows: spec.rows.clone(),
        },
    )
}

#[test]
fn mined_negatives_keep_every_rule() {
    let n = 120 * support::long();
    let (mut short, mut full, mut dense_cases, mut refused) = (0, 0, 0, 0);
    let mut kinds = [0u64; 3];
    for case in 0..n {
        let spec = gen(case);
        let dir = tempfile::tempdir().unwrap();
        let ds = write(dir.path(), &spec);
        let mut rng = KeyedRng::new(&[0x0915, case]);
        let o = options(&mut rng);
        let kind = rng.below(3);
        let (passages, other, corpus) = corpus_tokens(&ds, &mut rng, kind, &dir.path().join("c"));
        let corpus_of = || match (&passages, &other) {
            (Some(p), _) => Corpus::Passages(p),
            (_, Some(d)) => Corpus::Dataset(d),
            _ => Corpus::Own,
        };
        let retriever = if rng.below(3) == 0 {
            dense_cases += 1;
            let dim = 1 + rng.below(12) as usize;
            // Small integer grid values: dot products are exact, so ranks tie for real.
            let mut e = |rows: usize| Embeddings {
                values: (0..rows * dim).map(|_| rng.below(5) as f32 - 2.0).collect(),
                dim,
            };
            Retriever::Dense {
                queries: e(ds.len()),
                passages: e(corpus.len()),
            }
        } else {
            Retriever::Bm25 { index: None }
        };
        // The reference index: each distinct token list once.
        let distinct: Vec<&Vec<i32>> = (0..corpus.len())
            .filter(|&c| corpus[..c].iter().all(|e| e != &corpus[c]))
            .map(|c| &corpus[c])
            .collect();
        let index = match &retriever {
            Retriever::Bm25 { .. } => {
                Some(Bm25Index::build(|k| Ok(&distinct[k][..]), distinct.len(), o.bm25()).unwrap())
            }
            _ => None,
        };
        // (A margin needs every positive's score: dense, from its embedding in the corpus.)
        let dense = matches!(retriever, Retriever::Dense { .. });
        let margins = o.margin.is_some() || o.relative_margin.is_some();
        let all_in = (0..ds.len()).all(|r| {
            ds.group_ids(r)
                .unwrap()
                .pos
                .iter()
                .all(|&p| corpus.iter().any(|c| c[..] == *ds.passage(p).unwrap()))
        });
        let mut report = MineReport::default();
        let got = mine_negatives(&ds, corpus_of(), &retriever, &o, 0..ds.len(), &mut report);
        if dense && margins && !all_in {
            let e = got.unwrap_err().to_string();
            assert!(e.contains("not in the corpus"), "case {case}: {e}");
            refused += 1;
            continue;
        }
        let mined = got.unwrap();
        if kind == 0 {
            // The same passages as another corpus: the same result.
            let p = Passages::new(corpus.clone(), "own");
            let via = |c| {
                mine_negatives(
                    &ds,
                    c,
                    &retriever,
                    &o,
                    0..ds.len(),
                    &mut MineReport::default(),
                )
            };
            assert_eq!(via(Corpus::Passages(&p)).unwrap(), mined, "case {case}");
            assert_eq!(via(Corpus::Dataset(&ds)).unwrap(), mined, "case {case}");
        }
        kinds[kind as usize] += 1;
        // One thread gives the same.
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let again = one
            .install(|| {
                mine_negatives(
                    &ds,
                    corpus_of(),
                    &retriever,
                    &o,
                    0..ds.len(),
                    &mut MineReport::default(),
                )
            })
            .unwrap();
        assert_eq!(mined, again, "case {case}: threads changed the result");
        // Any split of the rows (shards, dense blocks) gives each row the same result.
        let cut = rng.below(ds.len() as u64 + 1) as usize;
        let mut split = Vec::new();
        for part in [0..cut, cut..ds.len()] {
            split.extend(
                mine_negatives(
                    &ds,
                    corpus_of(),
                    &retriever,
                    &o,
                    part,
                    &mut MineReport::default(),
                )
                .unwrap(),
            );
        }
        assert_eq!(mined, split, "case {case}: split at row {cut}");
        for (row, negs) in mined.iter().enumerate() {
            let g = ds.group_ids(row).unwrap();
            let ranked = brute_force(&ds, &corpus, &retriever, index.as_ref(), row);
            let lowest_pos = g
                .pos
                .iter()
                .map(|&p| match &retriever {
                    Retriever::Bm25 { .. } => index
                        .as_ref()
                        .unwrap()
                        .score(g.query, ds.passage(p).unwrap()),
                    Retriever::Dense { queries, passages } => {
                        let d = queries.dim;
                        // The first corpus passage with the positive's tokens.
                        let Some(c) = corpus.iter().position(|c| c[..] == *ds.passage(p).unwrap())
                        else {
                            return f32::INFINITY;
                        };
                        queries.values[row * d..(row + 1) * d]
                            .iter()
                            .zip(&passages.values[c * d..(c + 1) * d])
                            .map(|(a, b)| a * b)
                            .sum()
                    }
                })
                .fold(f32::INFINITY, f32::min);
            let window: Vec<(i32, f32)> = ranked
                .iter()
                .copied()
                .skip(o.range_min)
                .take(o.range_max - o.range_min)
                .filter(|&(_, s)| {
                    o.min_score.is_none_or(|m| s >= m)
                        && o.max_score.is_none_or(|m| s <= m)
                        && o.margin.is_none_or(|m| s <= lowest_pos - m)
                        && o.relative_margin
                            .is_none_or(|m| s <= lowest_pos - lowest_pos.abs() * m)
                })
                .collect();
            let ids: Vec<i32> = window.iter().map(|c| c.0).collect();
            assert!(negs.len() <= o.num_negatives, "case {case}");
            assert_eq!(
                negs.len(),
                o.num_negatives.min(ids.len()),
                "case {case} row {row}: short only when the window is"
            );
            for n in negs {
                let tokens = &corpus[*n as usize];
                assert!(
                    !query_positives(&ds, row)
                        .iter()
                        .any(|&p| ds.passage(p).unwrap() == &tokens[..]),
                    "case {case} row {row}: a positive of the query mined"
                );
                assert!(
                    ids.contains(n),
                    "case {case} row {row}: {n} outside the window/filters"
                );
            }
            let mut d = negs.clone();
            d.sort();
            d.dedup();
            assert_eq!(d.len(), negs.len(), "case {case}: a negative twice");
            // In rank order; top takes the first.
            let at: Vec<usize> = negs
                .iter()
                .map(|n| ids.iter().position(|x| x == n).unwrap())
                .collect();
            assert!(
                at.windows(2).all(|w| w[0] < w[1]),
                "case {case}: not in rank order: {negs:?} at {at:?} of {window:?}, options {o:?}"
            );
            if o.sampling == Sampling::Top {
                assert_eq!(negs[..], ids[..negs.len()], "case {case}");
            }
            if negs.len() < o.num_negatives {
                short += 1;
            } else {
                full += 1;
            }
        }
    }
    eprintln!(
        "mine: {n} cases ({dense_cases} dense; corpus own/passages/dataset {kinds:?}; \
         {refused} dense margins without the positives refused), rows full {full}, short {short}"
    );
    assert!(short > 0 && full > 0 && dense_cases > 0 && kinds.iter().all(|&k| k > 0));
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn shards_merge_into_the_whole_run_and_the_manifest_says_how() {
    for case in 0..(12 * support::long()) {
        let spec = gen(1000 + case);
        let tmp = tempfile::tempdir().unwrap();
        let ds = write(&tmp.path().join("in"), &spec);
        let mut rng = KeyedRng::new(&[0x5a1d, case]);
        let o = MineOptions {
            range_min: 0,
            ..options(&mut rng)
        };
        let r = Retriever::Bm25 { index: None };
        let w = WriterOptions::default();
        let whole = tmp.path().join("whole");
        // Half the cases mine from passages outside the dataset.
        let kind = rng.below(2);
        let (passages, _, corpus) = corpus_tokens(&ds, &mut rng, kind, tmp.path());
        let corpus_of = || passages.as_ref().map_or(Corpus::Own, Corpus::Passages);
        mine(&ds, corpus_of(), &r, &o, None, &whole, w.clone()).unwrap();
        // The output holds the mined passages' tokens.
        let mined = mine_negatives(
            &ds,
            corpus_of(),
            &r,
            &o,
            0..ds.len(),
            &mut MineReport::default(),
        )
        .unwrap();
        let out = Dataset::open(&whole).unwrap();
        for (row, negs) in mined.iter().enumerate() {
            let g = out.group(row).unwrap();
            let got: Vec<&[i32]> = g.neg.iter().map(|&p| out.passage(p).unwrap()).collect();
            let want: Vec<&[i32]> = negs.iter().map(|&c| &corpus[c as usize][..]).collect();
            assert_eq!(got, want, "case {case} row {row}");
        }
        // Case 0: more shards than rows, so some shards are empty (regression: an empty shard
        // 0 made the next shard, starting at row 0 too, count the input's rejects again).
        let n = if case == 0 {
            ds.len() as u64 + 2
        } else {
            1 + rng.below(4)
        };
        // The shards keep the BM25 index in a file: the first builds it, the others load it.
        let kept = Retriever::Bm25 {
            index: Some(tmp.path().join("bm25.index")),
        };
        let shards: Vec<_> = (0..n)
            .map(|k| {
                let p = tmp.path().join(format!("s{k}"));
                let report =
                    mine(&ds, corpus_of(), &kept, &o, Some((k, n)), &p, w.clone()).unwrap();
                assert_eq!(report.index_loaded, k > 0, "case {case} shard {k}");
                p
            })
            .collect();
        let merged = tmp.path().join("merged");
        rankfeed::merge::merge(&shards, &merged, w.clone()).unwrap();
        let (m, full) = (files(&merged), files(&whole));
        for ((name, a), (_, b)) in m.iter().zip(&full) {
            if a != b && name.ends_with(".json") {
                panic!(
                    "case {case}: {n} shards: {name} differs:\n{}\nvs the whole run's\n{}",
                    String::from_utf8_lossy(a),
                    String::from_utf8_lossy(b)
                );
            }
            assert!(a == b, "case {case}: {n} shards: {name} differs");
        }
        assert_eq!(m.len(), full.len());
        let out = Dataset::open(&whole).unwrap();
        out.validate().unwrap();
        let p = out.manifest().provenance.as_ref().unwrap();
        assert_eq!(p["mined"]["options"]["num_negatives"], o.num_negatives);
        assert_eq!(p["mined"]["from_seal"], ds.manifest().checksum.as_str());
        assert_eq!(
            out.manifest().sources[0].rows_read,
            ds.manifest().sources[0].rows_read
        );
        // Differently mined shards are not one run.
        if n > 1 {
            let other = tmp.path().join("other");
            let o2 = MineOptions {
                seed: o.seed + 1,
                ..o.clone()
            };
            mine(&ds, corpus_of(), &r, &o2, Some((0, n)), &other, w.clone()).unwrap();
            let mut mixed = shards.clone();
            mixed[0] = other;
            let e = rankfeed::merge::merge(&mixed, &tmp.path().join("m2"), w.clone()).unwrap_err();
            assert!(e.to_string().contains("derived differently"), "{e}");
        }
    }
    // A kept index of other parameters, another corpus or damaged is an error, never used.
    let spec = gen(8);
    let tmp = tempfile::tempdir().unwrap();
    let ds = write(&tmp.path().join("in"), &spec);
    let file = tmp.path().join("bm25.index");
    let kept = Retriever::Bm25 {
        index: Some(file.clone()),
    };
    let o = MineOptions {
        range_min: 0,
        ..MineOptions::default()
    };
    let run = |o: &MineOptions, c: Corpus<'_>| {
        mine_negatives(&ds, c, &kept, o, 0..ds.len(), &mut MineReport::default())
    };
    let built = run(&o, Corpus::Own).unwrap();
    assert_eq!(run(&o, Corpus::Own).unwrap(), built);
    let e = run(
        &MineOptions {
            k1: 1.2,
            ..o.clone()
        },
        Corpus::Own,
    )
    .unwrap_err();
    assert!(e.to_string().contains("k1"), "{e}");
    let p = Passages::new(vec![vec![1000, 1001]], "x");
    let e = run(&o, Corpus::Passages(&p)).unwrap_err();
    assert!(e.to_string().contains("another corpus"), "{e}");
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&file, &bytes).unwrap();
    let e = run(&o, Corpus::Own).unwrap_err();
    assert!(e.to_string().contains("checksum"), "{e}");
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let e = run(&o, Corpus::Own).unwrap_err();
    assert!(e.to_string().contains("truncated"), "{e}");
    std::fs::write(&file, b"garbage").unwrap();
    assert!(run(&o, Corpus::Own).is_err());
    // An edited header field (the average length scores every positive): damage too.
    std::fs::remove_file(&file).unwrap();
    run(&o, Corpus::Own).unwrap();
    let bytes = std::fs::read(&file).unwrap();
    let nl = bytes.iter().position(|&b| b == b'\n').unwrap();
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[..nl]).unwrap();
    header["avg_len"] = serde_json::json!(3.0);
    let mut edited = serde_json::to_vec(&header).unwrap();
    edited.extend_from_slice(&bytes[nl..]);
    std::fs::write(&file, &edited).unwrap();
    let e = run(&o, Corpus::Own).unwrap_err();
    assert!(e.to_string().contains("checksum"), "{e}");
    header["avg_len"] = serde_json::json!(0.0);
    let mut edited = serde_json::to_vec(&header).unwrap();
    edited.extend_from_slice(&bytes[nl..]);
    std::fs::write(&file, &edited).unwrap();
    assert!(run(&o, Corpus::Own).is_err());
    // A directory (or any non-regular file) at the path is refused, not read.
    std::fs::remove_file(&file).unwrap();
    std::fs::create_dir(&file).unwrap();
    let e = run(&o, Corpus::Own).unwrap_err();
    assert!(e.to_string().contains("not a regular file"), "{e}");
    std::fs::remove_dir(&file).unwrap();
    assert_eq!(run(&o, Corpus::Own).unwrap(), built);
    // An existing output is refused before any work.
    let existing = tmp.path().join("existing");
    std::fs::create_dir(&existing).unwrap();
    let e = mine(
        &ds,
        Corpus::Own,
        &kept,
        &o,
        None,
        &existing,
        WriterOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(e, rankfeed::Error::Exists { .. }), "{e}");

    // A search over the index agrees with scoring each passage.
    let spec = gen(7);
    let tmp = tempfile::tempdir().unwrap();
    let ds = write(tmp.path(), &spec);
    let idx = Bm25Index::build(
        |d| ds.passage(d as i32),
        ds.num_passages(),
        Bm25Params::default(),
    )
    .unwrap();
    let q = ds.group_ids(0).unwrap().query;
    for (d, s) in idx.search(q, 1000, &mut SearchScratch::default()) {
        assert_eq!(s, idx.score(q, ds.passage(d as i32).unwrap()));
    }
}

#[test]
fn bad_settings_are_errors_naming_them() {
    let spec = gen(3);
    let tmp = tempfile::tempdir().unwrap();
    let ds = write(&tmp.path().join("in"), &spec);
    let r = Retriever::Bm25 { index: None };
    let run = |o: MineOptions| {
        mine(
            &ds,
            Corpus::Own,
            &r,
            &o,
            None,
            &tmp.path().join("o"),
            WriterOptions {
                overwrite: true,
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string()
    };
    assert!(run(MineOptions {
        range_min: 5,
        range_max: 5,
        ..Default::default()
    })
    .contains("range_min"));
    assert!(run(MineOptions {
        margin: Some(f32::NAN),
        ..Default::default()
    })
    .contains("margin"));
    assert!(run(MineOptions {
        range_max: usize::MAX,
        ..Default::default()
    })
    .contains("range_max"));
    let bad = Retriever::Dense {
        queries: Embeddings {
            values: vec![0.0; 3],
            dim: 1,
        },
        passages: Embeddings {
            values: vec![0.0; 3],
            dim: 1,
        },
    };
    let e = mine(
        &ds,
        Corpus::Own,
        &bad,
        &MineOptions::default(),
        None,
        &tmp.path().join("o"),
        WriterOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("embeddings"), "{e}");
    // Corpora that cannot be this dataset's passages.
    let o = MineOptions::default();
    let neg = |c: Corpus<'_>| {
        mine_negatives(&ds, c, &r, &o, 0..ds.len(), &mut MineReport::default())
            .unwrap_err()
            .to_string()
    };
    let foreign = Passages::new(vec![vec![1000], vec![99_999, 1001]], "t.parquet");
    let e = neg(Corpus::Passages(&foreign));
    assert!(
        e.contains("passage 1 (t.parquet)") && e.contains("vocabulary"),
        "{e}"
    );
    let e = neg(Corpus::Passages(&Passages::new(
        Vec::<Vec<i32>>::new(),
        "none",
    )));
    assert!(e.contains("no passages"), "{e}");
    let instructed = write_text(
        &tmp.path().join("instructed"),
        &spec,
        TextSettings {
            passage_instruction: Some("passage: ".into()),
            ..TextSettings::default()
        },
    );
    let e = neg(Corpus::Dataset(&instructed));
    assert!(e.contains("formats passages"), "{e}");
}

#[test]
fn dense_ranking_across_blocks_and_chunks_equals_brute_force() {
    // Beyond one block of queries and one chunk of passages (and duplicates in the corpus):
    // small integer values, so every inner product is exact and ties are real.
    let mut rng = KeyedRng::new(&[0xd3e5, 1]);
    let n_passages = 9_000 + rng.below(500) as usize;
    let mut passages: Vec<Vec<i32>> = (0..n_passages)
        .map(|i| vec![1000 + (i % 7000) as i32, 1000 + (i / 7000) as i32 + 7000])
        .collect();
    passages.dedup();
    let n = passages.len() as u64;
    let rows = (0..75)
        .map(|_| {
            let pos = (0..1 + rng.below(2)).map(|_| rng.below(n) as i32).collect();
            (vec![1000], pos, vec![])
        })
        .collect();
    let spec = Spec { passages, rows };
    let tmp = tempfile::tempdir().unwrap();
    let ds = write(tmp.path(), &spec);
    let dim = 16;
    let mut e = |rows: usize| Embeddings {
        values: (0..rows * dim).map(|_| rng.below(5) as f32 - 2.0).collect(),
        dim,
    };
    let retriever = Retriever::Dense {
        queries: e(ds.len()),
        passages: e(ds.num_passages()),
    };
    let o = MineOptions {
        range_min: 3,
        range_max: 60,
        num_negatives: 20,
        sampling: Sampling::Top,
        ..MineOptions::default()
    };
    let corpus: Vec<Vec<i32>> = (0..ds.num_passages())
        .map(|p| ds.passage(p as i32).unwrap().to_vec())
        .collect();
    let mined = mine_negatives(
        &ds,
        Corpus::Own,
        &retriever,
        &o,
        0..ds.len(),
        &mut MineReport::default(),
    )
    .unwrap();
    for (row, negs) in mined.iter().enumerate() {
        let ranked = brute_force(&ds, &corpus, &retriever, None, row);
        let want: Vec<i32> = ranked[o.range_min..o.range_max]
            .iter()
            .take(o.num_negatives)
            .map(|c| c.0)
            .collect();
        assert_eq!(negs, &want, "row {row}");
    }
    // A corpus with duplicates (gathered chunks): the same ranking by tokens.
    let mut lists = corpus.clone();
    lists.insert(17, corpus[5000].clone());
    lists.insert(5000, corpus[3].clone());
    let p = Passages::new(lists.clone(), "dups");
    let Retriever::Dense { queries, passages } = &retriever else {
        unreachable!()
    };
    let mut values = Vec::new();
    for l in &lists {
        let at = corpus.iter().position(|c| c == l).unwrap();
        values.extend_from_slice(&passages.values[at * dim..(at + 1) * dim]);
    }
    let dup = Retriever::Dense {
        queries: queries.clone(),
        passages: Embeddings { values, dim },
    };
    let again = mine_negatives(
        &ds,
        Corpus::Passages(&p),
        &dup,
        &o,
        0..ds.len(),
        &mut MineReport::default(),
    )
    .unwrap();
    for (a, b) in mined.iter().zip(&again) {
        let ta: Vec<&Vec<i32>> = a.iter().map(|&i| &corpus[i as usize]).collect();
        let tb: Vec<&Vec<i32>> = b.iter().map(|&i| &lists[i as usize]).collect();
        assert_eq!(ta, tb);
    }
}
