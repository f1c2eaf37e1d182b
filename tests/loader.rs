//! Sampler, collator and loader properties, against naive reference implementations.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use rankfeed::collate::{CollateOptions, Collator, IdType, Ids, Mode, Side};
use rankfeed::format::{TemplatePiece, TextSettings, TokenizerFacts};
use rankfeed::loader::{Loader, LoaderOptions, LoaderState, Strategy};
use rankfeed::sample::{sample_group, Selection, Shard, Tail};
use rankfeed::writer::{DatasetWriter, GroupRecord, ManifestInfo, WriterOptions};
use rankfeed::Dataset;

fn bert_like() -> TokenizerFacts {
    let special = |id, type_id| TemplatePiece::Special {
        ids: vec![id],
        type_id,
    };
    let seq = |id: &str, type_id| TemplatePiece::Sequence {
        id: id.into(),
        type_id,
    };
    TokenizerFacts {
        fingerprint: "test".into(),
        model: "WordPiece".into(),
        vocab_size: 1000,
        single_template: vec![special(101, 0), seq("A", 0), special(102, 0)],
        pair_template: vec![
            special(101, 0),
            seq("A", 0),
            special(102, 0),
            seq("B", 1),
            special(102, 1),
        ],
        has_token_type_ids: true,
        bos_id: None,
        eos_id: None,
        pad_id: Some(0),
        unk_id: Some(100),
        padding_side: "right".into(),
        notes: vec![],
    }
}

fn llama_like() -> TokenizerFacts {
    TokenizerFacts {
        pair_template: vec![],
        single_template: vec![],
        has_token_type_ids: false,
        bos_id: Some(1),
        eos_id: Some(2),
        pad_id: None,
        unk_id: Some(0),
        ..bert_like()
    }
}

/// Groups: query of length `q`, passages given by length; ids are recognisable (row*1000+i).
struct Spec {
    queries: Vec<Vec<i32>>,
    passages: Vec<Vec<i32>>,
    groups: Vec<(usize, Vec<i32>, Vec<i32>, bool)>, // (query, pos ids, neg ids, has scores)
    prompts: Vec<Vec<i32>>,                         // row prompts (ids 2..)
}

fn write(
    dir: &Path,
    facts: TokenizerFacts,
    spec: &Spec,
    sources: &[u64],
    empty_neg: u64,
) -> Arc<Dataset> {
    write_with(dir, facts, spec, sources, empty_neg, |_| {})
}

/// [`write`], with `edit` applied to each source's manifest entry.
fn write_with(
    dir: &Path,
    facts: TokenizerFacts,
    spec: &Spec,
    sources: &[u64],
    empty_neg: u64,
    edit: impl Fn(&mut rankfeed::format::SourceStats),
) -> Arc<Dataset> {
    let mut w = DatasetWriter::create(
        dir,
        WriterOptions {
            rows_per_batch: 7,
            overwrite: true,
        },
    )
    .unwrap();
    w.add_prompt(&[900, 901, 902, 903, 904]).unwrap(); // llm default
    w.add_prompt(&[910, 911]).unwrap(); // matryoshka default
    for p in &spec.prompts {
        w.add_prompt(p).unwrap();
    }
    for p in &spec.passages {
        w.add_passage(p).unwrap();
    }
    let mut src = 0u32;
    let mut left = sources[0];
    for (i, (q, pos, neg, scores)) in spec.groups.iter().enumerate() {
        while left == 0 {
            src += 1;
            left = sources[src as usize];
        }
        left -= 1;
        let ps: Vec<f32> = pos.iter().map(|&p| p as f32 + 0.5).collect();
        let ns: Vec<f32> = neg.iter().map(|&p| -(p as f32) - 0.25).collect();
        w.add_group(&GroupRecord {
            query: &spec.queries[*q],
            pos,
            neg,
            pos_scores: scores.then_some(&ps[..]),
            neg_scores: scores.then_some(&ns[..]),
            prompt: (i % 3 == 1 && !spec.prompts.is_empty())
                .then(|| 2 + (i % spec.prompts.len()) as u32),
            source: src,
        })
        .unwrap();
    }
    let stats = sources
        .iter()
        .enumerate()
        .map(|(i, &n)| rankfeed::format::SourceStats {
            id: i as u32,
            rows_read: n,
            rows_accepted: n,
            rows_empty_neg: if i == 0 { empty_neg } else { 0 },
            ..Default::default()
        })
        .map(|mut st| {
            edit(&mut st);
            st
        })
        .collect();
    w.finish(ManifestInfo {
        tokenizer: Some(facts),
        text: TextSettings {
            sep_ids: vec![13, 14],
            ..TextSettings::default()
        },
        sources: stats,
        shards: None,
    })
    .unwrap();
    Arc::new(Dataset::open(dir).unwrap())
}

/// The spec, as plain list operations (the semantics stated in src/collate/mod.rs and the README).
#[allow(clippy::too_many_arguments)]
fn naive_pair(
    mode: Mode,
    q: &[i32],
    p: &[i32],
    prompt: &[i32],
    sep: &[i32],
    qm: usize,
    pm: usize,
) -> (Vec<i32>, Vec<i32>, bool) {
    let mut q: Vec<i32> = q.to_vec();
    let mut p: Vec<i32> = p.to_vec();
    p.truncate(pm + qm / 2);
    match mode {
        Mode::Encoder => {
            q.truncate(qm + pm / 4);
            let ns = 3;
            let mut overlong = false;
            if q.len() + p.len() + ns > qm + pm {
                let r = q.len() + p.len() + ns - (qm + pm);
                if p.len() > r {
                    p.truncate(p.len() - r);
                } else {
                    overlong = true;
                }
            }
            let mut ids = vec![101];
            ids.extend(&q);
            ids.push(102);
            let first = ids.len();
            ids.extend(&p);
            ids.push(102);
            let types = (0..ids.len()).map(|i| i32::from(i >= first)).collect();
            (ids, types, overlong)
        }
        Mode::Llm | Mode::Matryoshka => {
            q.truncate(if mode == Mode::Matryoshka {
                qm
            } else {
                qm + pm / 4
            });
            let mut a = vec![1];
            a.extend(&q);
            let mut b: Vec<i32> = sep.to_vec();
            b.extend(&p);
            let max = (qm + pm) as i64 - prompt.len() as i64 - sep.len() as i64;
            let mut overlong = false;
            if (a.len() + b.len()) as i64 > max {
                let r = ((a.len() + b.len()) as i64 - max) as usize;
                if b.len() > r {
                    b.truncate(b.len() - r);
                } else {
                    overlong = true;
                }
            }
            let mut ids = a;
            ids.extend(&b);
            ids.extend(sep);
            ids.extend(prompt);
            (ids, vec![], overlong)
        }
        Mode::Embedder => unreachable!("pair modes only"),
    }
}

fn ids_vec(ids: &Ids) -> Vec<i64> {
    (0..ids.len()).map(|i| ids.get(i)).collect()
}

#[test]
fn pairs_match_the_spec_at_every_length_boundary() {
    let dir = tempfile::tempdir().unwrap();
    let passages: Vec<Vec<i32>> = (0..14).map(|n| (0..n).map(|i| 500 + i).collect()).collect();
    let queries: Vec<Vec<i32>> = (0..14).map(|n| (0..n).map(|i| 300 + i).collect()).collect();
    let spec = Spec {
        groups: (0..14)
            .map(|q| (q, vec![q as i32], (0..14).collect(), false))
            .collect(),
        queries,
        passages,
        prompts: vec![],
    };
    for (facts, modes) in [
        (bert_like(), vec![Mode::Encoder]),
        (llama_like(), vec![Mode::Llm, Mode::Matryoshka]),
    ] {
        let ds = write(
            &dir.path().join(format!("{:?}", modes[0])),
            facts.clone(),
            &spec,
            &[14],
            0,
        );
        for mode in modes {
            for (qm, pm) in [(2, 2), (4, 3), (6, 8), (3, 12), (9, 1), (1, 5)] {
                for side in [Side::Left, Side::Right] {
                    let c = Collator::new(
                        &ds,
                        CollateOptions {
                            mode,
                            query_max_len: qm,
                            passage_max_len: pm,
                            group_size: 14,
                            padding_side: Some(side),
                            pad_to_multiple_of: Some(4),
                            ..CollateOptions::default()
                        },
                    )
                    .unwrap();
                    let sels: Vec<Selection> = (0..14)
                        .map(|r| Selection {
                            row: r,
                            pos: 0,
                            neg: (0..13).collect(),
                        })
                        .collect();
                    let b = c.collate(&ds, sels.clone()).unwrap();
                    assert_eq!(b.len % 4, 0);
                    let ids = ids_vec(&b.input_ids);
                    let mask = ids_vec(b.attention_mask.as_ref().unwrap());
                    let prompt = if mode == Mode::Matryoshka {
                        vec![910, 911]
                    } else {
                        vec![900, 901, 902, 903, 904]
                    };
                    let mut k = 0;
                    let mut overlong = 0;
                    for sel in &sels {
                        let q = &spec.queries[sel.row as usize];
                        for pid in
                            std::iter::once(sel.row as i32).chain(sel.neg.iter().map(|&j| j as i32))
                        {
                            let (want, types, long) = naive_pair(
                                mode,
                                q,
                                &spec.passages[pid as usize],
                                &prompt,
                                &[13, 14],
                                qm,
                                pm,
                            );
                            overlong += long as u32;
                            let row = &ids[k * b.len..(k + 1) * b.len];
                            let m = &mask[k * b.len..(k + 1) * b.len];
                            let pad = b.len - want.len();
                            let (lo, hi) = match side {
                                Side::Right => (0, want.len()),
                                Side::Left => (pad, b.len),
                            };
                            let got: Vec<i32> = row[lo..hi].iter().map(|&v| v as i32).collect();
                            assert_eq!(got, want, "{mode:?} qm {qm} pm {pm} q {} p {pid}", q.len());
                            let pad_id = 0; // BERT pad, and unk for the llama-like tokenizer without a pad
                            assert!(row[..lo].iter().chain(&row[hi..]).all(|&v| v == pad_id));
                            assert!(
                                m[lo..hi].iter().all(|&v| v == 1)
                                    && m[..lo].iter().chain(&m[hi..]).all(|&v| v == 0)
                            );
                            if mode == Mode::Encoder {
                                let tt = ids_vec(b.token_type_ids.as_ref().unwrap());
                                let got: Vec<i32> = tt[k * b.len + lo..k * b.len + hi]
                                    .iter()
                                    .map(|&v| v as i32)
                                    .collect();
                                assert_eq!(got, types);
                            }
                            if mode == Mode::Matryoshka {
                                assert_eq!(
                                    b.query_lengths.as_ref().unwrap().get(k),
                                    (1 + q.len().min(qm) + 2) as i64
                                );
                                assert_eq!(b.prompt_lengths.as_ref().unwrap().get(k), 4);
                            }
                            k += 1;
                        }
                    }
                    assert_eq!(b.overlong, overlong);
                }
            }
        }
    }
}

fn small_spec(groups: usize, empty_every: Option<usize>) -> Spec {
    let passages: Vec<Vec<i32>> = (0..50).map(|n| vec![n; 1 + n as usize % 7]).collect();
    let queries: Vec<Vec<i32>> = (0..groups).map(|n| vec![n as i32; 1 + n % 5]).collect();
    Spec {
        groups: (0..groups)
            .map(|g| {
                let n_neg = if empty_every.is_some_and(|e| g % e == 0) {
                    0
                } else {
                    1 + g % 20
                };
                (
                    g,
                    vec![(g % 50) as i32, ((g + 1) % 50) as i32],
                    (0..n_neg as i32).map(|j| (j * 7 + g as i32) % 50).collect(),
                    true,
                )
            })
            .collect(),
        queries,
        passages,
        prompts: vec![vec![777], vec![778, 779]],
    }
}

fn loader(ds: &Arc<Dataset>, f: impl FnOnce(&mut LoaderOptions)) -> Loader {
    let mut o = LoaderOptions {
        batch_size: 3,
        seed: 5,
        prefetch_threads: 0,
        collate: CollateOptions {
            group_size: 4,
            knowledge_distillation: true,
            ..CollateOptions::default()
        },
        ..LoaderOptions::default()
    };
    f(&mut o);
    Loader::new(ds.clone(), o).unwrap()
}

#[test]
fn every_row_once_per_epoch_across_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let ds = write(dir.path(), bert_like(), &small_spec(103, None), &[103], 0);
    for world in 1..=5u64 {
        for tail in [Tail::Pad, Tail::Drop, Tail::Uneven] {
            for epoch in [0u64, 3] {
                let mut seen: HashMap<u64, u32> = HashMap::new();
                for rank in 0..world {
                    let mut l = loader(&ds, |o| {
                        o.shard = Shard {
                            rank,
                            world_size: world,
                            tail,
                        }
                    });
                    l.set_epoch(epoch);
                    for b in &mut l {
                        for s in b.unwrap().selections {
                            *seen.entry(s.row).or_default() += 1;
                        }
                    }
                    assert_eq!(
                        l.state(),
                        LoaderState {
                            epoch: epoch + 1,
                            step: 0,
                            offset: 0,
                        }
                    );
                }
                let total: u32 = seen.values().sum();
                match tail {
                    Tail::Drop => {
                        assert_eq!(total as u64, 103 / world * world);
                        assert!(seen.values().all(|&c| c == 1));
                    }
                    Tail::Uneven => {
                        assert_eq!(total, 103);
                        assert_eq!(seen.len(), 103, "every row exactly once");
                    }
                    Tail::Pad => {
                        assert_eq!(total as u64, 103u64.div_ceil(world) * world);
                        assert_eq!(seen.len(), 103, "every row visited");
                        let twice = seen.values().filter(|&&c| c == 2).count() as u64;
                        assert_eq!(
                            twice,
                            103u64.div_ceil(world) * world - 103,
                            "padding repeats the start"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn resume_and_thread_count_do_not_change_batches() {
    let dir = tempfile::tempdir().unwrap();
    let ds = write(dir.path(), bert_like(), &small_spec(103, None), &[103], 0);
    let reference: Vec<_> = loader(&ds, |_| {}).map(|b| b.unwrap()).collect();
    assert_eq!(reference.len(), 35);
    for threads in [1, 3] {
        let got: Vec<_> = loader(&ds, |o| {
            o.prefetch_threads = threads;
            o.prefetch_depth = 4;
        })
        .map(|b| b.unwrap())
        .collect();
        assert_eq!(got, reference, "{threads} threads");
    }
    for step in [0u64, 1, 17, 34] {
        let mut l = loader(&ds, |o| o.prefetch_threads = 2);
        l.set_state(LoaderState {
            epoch: 0,
            step,
            offset: 0,
        })
        .unwrap();
        let rest: Vec<_> = (&mut l).map(|b| b.unwrap()).collect();
        assert_eq!(rest, reference[step as usize..], "resume at step {step}");
    }
    // Epochs differ, and the same epoch is the same in a new loader.
    let mut l = loader(&ds, |_| {});
    l.set_epoch(1);
    let e1: Vec<_> = (&mut l).map(|b| b.unwrap().selections).collect();
    assert_ne!(
        e1,
        reference
            .iter()
            .map(|b| b.selections.clone())
            .collect::<Vec<_>>()
    );
    assert_eq!(loader(&ds, |_| {}).batch(1, 5).unwrap().selections, e1[5]);
    // Mid-epoch state save/restore while iterating with prefetch.
    let mut l = loader(&ds, |o| o.prefetch_threads = 2);
    let first: Vec<_> = (&mut l).take(10).map(|b| b.unwrap()).collect();
    assert_eq!(first, reference[..10]);
    let saved = l.state();
    let mut l2 = loader(&ds, |o| o.prefetch_threads = 1);
    l2.set_state(saved).unwrap();
    assert_eq!(l2.next().unwrap().unwrap(), reference[10]);
}

#[test]
fn teacher_scores_follow_the_selection() {
    let dir = tempfile::tempdir().unwrap();
    let spec = small_spec(40, None);
    let ds = write(dir.path(), bert_like(), &spec, &[40], 0);
    let l = loader(&ds, |_| {});
    for step in 0..l.steps(0).unwrap() {
        let b = l.batch(0, step).unwrap();
        let scores = b.teacher_scores.as_ref().unwrap();
        assert_eq!(scores.len(), b.rows);
        for (k, s) in b.selections.iter().enumerate() {
            let (_, pos, neg, _) = &spec.groups[s.row as usize];
            assert_eq!(scores[k * 4], pos[s.pos as usize] as f32 + 0.5);
            for (g, &j) in s.neg.iter().enumerate() {
                assert_eq!(scores[k * 4 + 1 + g], -(neg[j as usize] as f32) - 0.25);
            }
        }
    }
}

#[test]
fn rows_without_negatives_are_an_error_or_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let ds = write(dir.path(), bert_like(), &small_spec(30, Some(4)), &[30], 8);
    let err = Loader::new(ds.clone(), LoaderOptions::default()).unwrap_err();
    assert!(
        err.to_string().contains("8 rows have no negatives"),
        "{err}"
    );
    assert!(
        err.to_string().contains("skip_rows_without_negatives"),
        "{err}"
    );
    let l = loader(&ds, |o| o.skip_rows_without_negatives = true);
    assert_eq!(l.rows_per_epoch(), 22);
    let rows: Vec<u64> = (0..l.steps(0).unwrap())
        .flat_map(|s| l.batch(0, s).unwrap().selections)
        .map(|s| s.row)
        .collect();
    assert!(rows.iter().all(|r| r % 4 != 0));
    // Group size 1 needs no negatives.
    let l = loader(&ds, |o| {
        o.collate.group_size = 1;
    });
    assert_eq!(l.rows_per_epoch(), 30);
}

#[test]
fn caps_per_source_draw_a_new_subset_each_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let ds = three_sources(dir.path());
    let rows = |epoch| {
        let mut l = loader(&ds, |o| o.max_example_num_per_dataset = Some(10));
        l.set_epoch(epoch);
        let mut r: Vec<u64> = (&mut l)
            .flat_map(|b| b.unwrap().selections)
            .map(|s| s.row)
            .collect();
        r.sort();
        r
    };
    let e0 = rows(0);
    assert_eq!(e0.len(), 10 + 5 + 10);
    assert_eq!(e0.iter().filter(|&&r| r < 40).count(), 10);
    assert_eq!(e0.iter().filter(|&&r| (40..45).contains(&r)).count(), 5);
    let mut d = e0.clone();
    d.dedup();
    assert_eq!(d, e0, "no row twice in an epoch");
    let e1 = rows(1);
    assert_eq!(e1.len(), 25);
    assert_ne!(e0, e1, "a new subset each epoch");
    assert_eq!(
        e0.iter().filter(|&&r| (40..45).contains(&r)).count(),
        5,
        "a source under the cap gives all its rows"
    );
}

#[test]
fn int32_output_and_no_mask() {
    let dir = tempfile::tempdir().unwrap();
    let ds = write(dir.path(), bert_like(), &small_spec(20, None), &[20], 0);
    let a = loader(&ds, |_| {}).batch(0, 0).unwrap();
    let b = loader(&ds, |o| {
        o.collate.id_type = IdType::I32;
        o.collate.attention_mask = false;
    })
    .batch(0, 0)
    .unwrap();
    assert!(matches!(b.input_ids, Ids::I32(_)));
    assert!(b.attention_mask.is_none());
    assert_eq!(ids_vec(&a.input_ids), ids_vec(&b.input_ids));
    assert_eq!(b.input_ids.nbytes() * 2, a.input_ids.nbytes());
}

/// Pearson's chi-square statistic of observed counts against expected probabilities.
fn chi_square(observed: &[u64], expected_p: &[f64]) -> f64 {
    let n: u64 = observed.iter().sum();
    observed
        .iter()
        .zip(expected_p)
        .map(|(&o, &p)| {
            let e = p * n as f64;
            (o as f64 - e).powi(2) / e
        })
        .sum()
}

fn binomial(n: u64, k: u64) -> f64 {
    (0..k).fold(1.0, |acc, i| acc * (n - i) as f64 / (i + 1) as f64)
}

#[test]
fn negative_selection_frequencies_match_the_reference_distribution() {
    // Enough negatives (20, G-1 = 7): every position of the draw is uniform over the 20.
    let mut first = vec![0u64; 20];
    let mut last = vec![0u64; 20];
    let mut neg = Vec::new();
    let trials = 40_000u64;
    for row in 0..trials {
        sample_group(1234, 0, row, 1, 20, 8, &mut neg).unwrap();
        first[neg[0] as usize] += 1;
        last[neg[6] as usize] += 1;
    }
    let uniform = vec![1.0 / 20.0; 20];
    // Critical value of chi-square with 19 degrees of freedom at p = 0.001: 43.82.
    assert!(chi_square(&first, &uniform) < 43.82, "{first:?}");
    assert!(chi_square(&last, &uniform) < 43.82, "{last:?}");

    // Fewer negatives (3, G-1 = 7): 7 draws without replacement from [0,1,2] * 3. The number
    // of copies of index 0 is hypergeometric: P(c) = C(3,c) C(6,7-c) / C(9,7), c = 1..3.
    let mut copies = vec![0u64; 4];
    for row in 0..trials {
        sample_group(99, 2, row, 1, 3, 8, &mut neg).unwrap();
        copies[neg.iter().filter(|&&j| j == 0).count()] += 1;
    }
    assert_eq!(copies[0], 0);
    let p: Vec<f64> = (1..=3)
        .map(|c| binomial(3, c) * binomial(6, 7 - c) / binomial(9, 7))
        .collect();
    // 2 degrees of freedom at p = 0.001: 13.82.
    assert!(chi_square(&copies[1..], &p) < 13.82, "{copies:?} vs {p:?}");

    // Positives: uniform over the list.
    let mut pos = vec![0u64; 3];
    for row in 0..30_000 {
        pos[sample_group(7, 0, row, 3, 5, 2, &mut neg).unwrap() as usize] += 1;
    }
    assert!(chi_square(&pos, &[1.0 / 3.0; 3]) < 13.82, "{pos:?}");
}

/// Regression (issue 10, observation 4): `pad_to_multiple_of = 2^40` or `prefetch_depth = 2^40`
/// aborted the process on allocation. Every numeric setting is checked first, by name.
#[test]
fn settings_beyond_the_limits_are_argument_errors() {
    let dir = tempfile::tempdir().unwrap();
    let ds = write(dir.path(), bert_like(), &small_spec(30, None), &[30], 8);
    type Edit = fn(&mut LoaderOptions);
    let cases: [(&str, Edit); 12] = [
        ("pad_to_multiple_of", |o| {
            o.collate.pad_to_multiple_of = Some(1 << 40)
        }),
        ("pad_to_multiple_of", |o| {
            o.collate.pad_to_multiple_of = Some(0)
        }),
        ("prefetch_depth", |o| o.prefetch_depth = 1 << 40),
        ("prefetch_threads", |o| o.prefetch_threads = 1 << 20),
        ("batch_size", |o| o.batch_size = 0),
        ("group_size", |o| o.collate.group_size = 1 << 40),
        ("passage_max_len", |o| {
            o.collate.passage_max_len = usize::MAX
        }),
        ("batch_size", |o| {
            // Each within its own limit, together 500 GB a batch.
            o.batch_size = 1 << 16;
            o.collate.group_size = 1 << 10;
        }),
        // Issue 18: a padded token-budget epoch held world_size positions (2^40: an abort).
        ("world_size", |o| {
            o.shard.world_size = 1 << 40;
            o.strategy = Strategy::TokenBudget {
                max_tokens: 1000,
                megabatch: None,
            };
        }),
        // Issue 18, finding 6: 0 silently meant "off" (None is off).
        ("sub_batch_size", |o| {
            o.collate.mode = Mode::Embedder;
            o.collate.sub_batch_size = Some(0);
        }),
        // Issue 18: a cap of 0 left every epoch empty.
        ("max_example_num_per_dataset", |o| {
            o.max_example_num_per_dataset = Some(0)
        }),
        // Issue 18, finding 5: per-source sizes skipped the estimate batch_size gets.
        ("source_batch_sizes", |o| {
            o.strategy = Strategy::SameSource {
                batch_sizes: Some(vec![1 << 20]),
                small_threshold: 0,
                drop_threshold: 0,
            };
        }),
    ];
    for (name, edit) in cases {
        let mut o = LoaderOptions::default();
        edit(&mut o);
        match Loader::new(ds.clone(), o) {
            Err(rankfeed::Error::Argument { name: got, .. }) => assert_eq!(got, name),
            other => panic!("{name}: {other:?}"),
        }
    }
    // The collator alone (CLI show/collate) checks its own settings too.
    let o = CollateOptions {
        pad_to_multiple_of: Some(1 << 40),
        ..CollateOptions::default()
    };
    assert!(Collator::new(&ds, o).is_err());
}

/// Regression (issue 18, finding 5): a same-source batch size from the manifest (a row's
/// `batch_size` field, maybe from a foreign writer) of 10^18 aborted the process allocating
/// the batch; `source_batch_sizes=[2^20, 1, 1]` skipped the memory estimate `batch_size=2^20`
/// gets and aborted too. Both are refused at loader creation, naming the source or setting.
#[test]
fn same_source_batch_sizes_are_bounded_like_batch_size() {
    let dir = tempfile::tempdir().unwrap();
    let ds = write_with(
        dir.path(),
        bert_like(),
        &small_spec(60, None),
        &[40, 5, 15],
        0,
        |st| {
            st.path = format!("in/s{}.jsonl", st.id);
            st.batch_size = (st.id == 1).then_some(1_000_000_000_000_000_000);
        },
    );
    let same = |sizes: Option<Vec<usize>>| LoaderOptions {
        strategy: Strategy::SameSource {
            batch_sizes: sizes,
            small_threshold: 0,
            drop_threshold: 0,
        },
        ..LoaderOptions::default()
    };
    match Loader::new(ds.clone(), same(None)).unwrap_err() {
        rankfeed::Error::Corrupt { path, message } => {
            assert!(path.ends_with("manifest.json"), "{path:?}");
            assert!(message.contains("source 1 (in/s1.jsonl)"), "{message}");
            assert!(
                message.contains("batch_size 1000000000000000000"),
                "{message}"
            );
        }
        e => panic!("{e}"),
    }
    // Given sizes replace the manifest's: within the limits they work.
    let l = Loader::new(ds.clone(), same(Some(vec![3, 2, 4]))).unwrap();
    assert!(l.steps(0).unwrap() > 0);
    match Loader::new(ds.clone(), same(Some(vec![1 << 20, 1, 1]))).unwrap_err() {
        rankfeed::Error::Argument { name, message } => {
            assert_eq!(name, "source_batch_sizes");
            assert!(message.contains("exceed the limit"), "{message}");
        }
        e => panic!("{e}"),
    }
}

/// Regression (issue 18, finding 5): `weights=[1e308, 1, 0]` made an epoch of 2^64-1 rows
/// (the CLI bench never ended). Weights are relative: these give source 0 the whole epoch,
/// which keeps its length. Non-finite, negative or all-zero weights are refused by name
/// before anything is allocated (no dataset needed).
#[test]
fn huge_weights_keep_the_epoch_length_and_bad_ones_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ds = three_sources(dir.path());
    let l = loader(&ds, |o| o.weights = Some(vec![1e308, 1.0, 0.0]));
    assert_eq!(l.rows_per_epoch(), 60);
    assert_eq!(l.steps(0).unwrap(), 20);
    let rows: Vec<u64> = epoch_batches(&l, 0)
        .concat()
        .iter()
        .map(|s| s.row)
        .collect();
    assert_eq!(rows.len(), 60);
    assert!(
        rows.iter().all(|&r| source(r) == 0),
        "source 0's share is 1"
    );
    for bad in [
        vec![f64::NAN, 1.0, 1.0],
        vec![f64::INFINITY, 1.0, 1.0],
        vec![-1.0, 1.0, 1.0],
        vec![0.0, 0.0, 0.0],
    ] {
        let o = LoaderOptions {
            weights: Some(bad.clone()),
            ..LoaderOptions::default()
        };
        match o.check() {
            Err(rankfeed::Error::Argument { name, .. }) => assert_eq!(name, "weights", "{bad:?}"),
            other => panic!("{bad:?}: {other:?}"),
        }
    }
}

/// Regression (issue 18, finding 6): `drop_last` was silently ignored with `max_tokens` and
/// `same_source`. Token-budget batches vary in size by design, so the combination is refused
/// (Hugging Face has no incomplete token-budget batch to drop); same-source, each source's
/// incomplete global batch is dropped instead of filled, as FlagEmbedding always does, so
/// every batch is full and each row is trained at most once.
#[test]
fn drop_last_is_honoured_or_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ds = three_sources(dir.path());
    let err = Loader::new(
        ds.clone(),
        LoaderOptions {
            strategy: Strategy::TokenBudget {
                max_tokens: 200,
                megabatch: None,
            },
            drop_last: true,
            ..LoaderOptions::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(
            &err,
            rankfeed::Error::Argument {
                name: "drop_last",
                ..
            }
        ),
        "{err}"
    );
    let sizes = [3usize, 2, 4];
    for world in [1u64, 2] {
        let (seen, steps) = seen_across_ranks(
            world,
            1,
            &|shard| {
                loader(&ds, |o| {
                    o.strategy = Strategy::SameSource {
                        batch_sizes: Some(sizes.to_vec()),
                        small_threshold: 0,
                        drop_threshold: 0,
                    };
                    o.drop_last = true;
                    o.shard = shard;
                })
            },
            Tail::Pad,
        );
        let want: u64 = [40u64, 5, 15]
            .iter()
            .zip(sizes)
            .map(|(&n, b)| n / (world * b as u64))
            .sum();
        assert_eq!(steps.len() as u64, want, "world {world}");
        for ranks in &steps {
            let s = source(ranks[0][0].row);
            assert!(ranks.iter().all(|b| b.len() == sizes[s]), "full batches");
        }
        assert!(seen.values().all(|&c| c == 1), "each row at most once");
    }
}

/// Regression (issue 18, finding 6): an epoch with rows but no batch trained nothing,
/// silently: world_size above the rows with the drop tail, fewer rows per rank than
/// batch_size with drop_last, no source filling a same-source global batch. Each is an
/// error naming its cause.
#[test]
fn epochs_with_rows_but_no_batch_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ds = write(dir.path(), bert_like(), &small_spec(3, None), &[3], 0);
    let shard = |world_size, tail| Shard {
        rank: 0,
        world_size,
        tail,
    };
    let refused = |o: LoaderOptions| match Loader::new(ds.clone(), o) {
        Err(rankfeed::Error::Argument { name, message }) => (name, message),
        other => panic!("{other:?}"),
    };
    let (name, message) = refused(LoaderOptions {
        shard: shard(4, Tail::Drop),
        ..LoaderOptions::default()
    });
    assert_eq!(name, "world_size");
    assert!(
        message.contains("world_size 4") && message.contains("3 rows"),
        "{message}"
    );
    let (name, message) = refused(LoaderOptions {
        batch_size: 4,
        drop_last: true,
        ..LoaderOptions::default()
    });
    assert_eq!(name, "drop_last");
    assert!(message.contains("batch_size 4"), "{message}");
    let (name, _) = refused(LoaderOptions {
        strategy: Strategy::SameSource {
            batch_sizes: Some(vec![2]),
            small_threshold: 0,
            drop_threshold: 0,
        },
        shard: shard(2, Tail::Drop),
        ..LoaderOptions::default()
    });
    assert_eq!(name, "same_source");
    // The uneven tail splits work among DataLoader workers: a worker may get nothing.
    let idle = Loader::new(
        ds.clone(),
        LoaderOptions {
            shard: Shard {
                rank: 3,
                world_size: 4,
                tail: Tail::Uneven,
            },
            ..LoaderOptions::default()
        },
    )
    .unwrap();
    assert_eq!(idle.steps(0).unwrap(), 0);
}

/// Regression (issue 18, finding 6): `steps_per_epoch` turned errors into 0 steps; it is
/// now a `Result`, and it is the current epoch's count (token-budget epochs differ).
#[test]
fn steps_per_epoch_is_the_current_epochs_count() {
    let dir = tempfile::tempdir().unwrap();
    let ds = write(dir.path(), bert_like(), &small_spec(103, None), &[103], 0);
    let mut l = loader(&ds, |o| {
        o.batch_size = 16;
        o.strategy = Strategy::TokenBudget {
            max_tokens: 160,
            megabatch: None,
        };
    });
    let counts: Vec<u64> = (0..6).map(|e| l.steps(e).unwrap()).collect();
    for (e, &want) in counts.iter().enumerate() {
        l.set_epoch(e as u64);
        let got: rankfeed::Result<u64> = l.steps_per_epoch();
        assert_eq!(got.unwrap(), want, "epoch {e}");
    }
}

/// The three pair layouts with a tokenizer of their kind.
fn every_mode() -> [(TokenizerFacts, Mode); 3] {
    [
        (bert_like(), Mode::Encoder),
        (llama_like(), Mode::Llm),
        (llama_like(), Mode::Matryoshka),
    ]
}

/// Packed batches hold exactly the padded batch's rows without their padding, concatenated:
/// ids, token type ids, positions restarting at 0, cu_seqlens; every mode, both pad sides.
#[test]
fn packed_batches_are_the_padded_rows_unpadded() {
    let dir = tempfile::tempdir().unwrap();
    for (k, (facts, mode)) in every_mode().into_iter().enumerate() {
        let ds = write(
            &dir.path().join(format!("d{k}")),
            facts,
            &small_spec(40, None),
            &[40],
            0,
        );
        for side in [Side::Left, Side::Right] {
            let base = |packed| {
                loader(&ds, |o| {
                    o.collate.mode = mode;
                    o.collate.padding_side = Some(side);
                    o.collate.pad_to_multiple_of = Some(8);
                    o.collate.packed = packed;
                })
            };
            let (padded, packed) = (base(false), base(true));
            for step in 0..padded.steps(1).unwrap() {
                let a = padded.batch(1, step).unwrap();
                let b = packed.batch(1, step).unwrap();
                assert_eq!(a.selections, b.selections);
                assert_eq!((b.rows, b.real_tokens), (a.rows, a.real_tokens));
                assert!(b.attention_mask.is_none() && b.len as u64 == b.real_tokens);
                let mask = ids_vec(a.attention_mask.as_ref().unwrap());
                let keep = |v: &[i64]| -> Vec<i64> {
                    v.iter()
                        .zip(&mask)
                        .filter(|(_, &m)| m == 1)
                        .map(|(&x, _)| x)
                        .collect()
                };
                assert_eq!(ids_vec(&b.input_ids), keep(&ids_vec(&a.input_ids)));
                match (&a.token_type_ids, &b.token_type_ids) {
                    (Some(ta), Some(tb)) => assert_eq!(ids_vec(tb), keep(&ids_vec(ta))),
                    (None, None) => {}
                    _ => panic!("token_type_ids in one layout only"),
                }
                let lens: Vec<i64> = mask.chunks(a.len).map(|r| r.iter().sum()).collect();
                let cu = b.cu_seqlens.clone().unwrap();
                assert_eq!(cu.len(), a.rows + 1);
                assert_eq!(
                    cu.windows(2)
                        .map(|w| (w[1] - w[0]) as i64)
                        .collect::<Vec<_>>(),
                    lens
                );
                let pos: Vec<i64> = lens.iter().flat_map(|&n| 0..n).collect();
                assert_eq!(ids_vec(b.position_ids.as_ref().unwrap()), pos);
                assert_eq!(b.max_seqlen() as i64, *lens.iter().max().unwrap());
                assert_eq!(b.teacher_scores, a.teacher_scores);
                assert_eq!(
                    b.query_lengths.as_ref().map(ids_vec),
                    a.query_lengths.as_ref().map(ids_vec)
                );
            }
        }
    }
}

/// Length-grouped batches (issue 12): every row exactly once per epoch across ranks (for the
/// tails that promise it), batches independent of resume point and thread count, each batch
/// sorted within its megabatch, the longest group in the first batch, and a batch with the
/// same rows as random order collates to the same pairs.
#[test]
fn length_grouped_batches_keep_every_guarantee() {
    let dir = tempfile::tempdir().unwrap();
    let ds = write(dir.path(), bert_like(), &small_spec(103, None), &[103], 0);
    let grouped = |f: &dyn Fn(&mut LoaderOptions)| {
        loader(&ds, |o| {
            o.strategy = Strategy::LengthGrouped { megabatch: 3 };
            o.collate.knowledge_distillation = false;
            f(o);
        })
    };
    // Every row once, across ranks, with the uneven and drop tails.
    for world in [1u64, 2, 3] {
        for tail in [Tail::Uneven, Tail::Drop] {
            let mut seen: HashMap<u64, u32> = HashMap::new();
            for rank in 0..world {
                let mut l = grouped(&|o| {
                    o.shard = Shard {
                        rank,
                        world_size: world,
                        tail,
                    }
                });
                l.set_epoch(2);
                for b in &mut l {
                    for s in b.unwrap().selections {
                        *seen.entry(s.row).or_default() += 1;
                    }
                }
            }
            assert!(seen.values().all(|&c| c == 1), "{world} {tail:?}");
            let want = if tail == Tail::Uneven {
                103
            } else {
                103 / world * world
            };
            assert_eq!(seen.len() as u64, want, "{world} {tail:?}");
        }
    }
    // Resume at any step and any thread count give the same batches.
    let l = grouped(&|_| {});
    let all: Vec<Vec<Selection>> = (0..l.steps(1).unwrap())
        .map(|s| l.batch(1, s).unwrap().selections)
        .collect();
    for threads in [0, 1, 3] {
        for start in [0u64, 5, 17] {
            let mut r = grouped(&|o| o.prefetch_threads = threads);
            r.set_state(LoaderState {
                epoch: 1,
                step: start,
                offset: 0,
            })
            .unwrap();
            let got: Vec<Vec<Selection>> = r.by_ref().map(|b| b.unwrap().selections).collect();
            assert_eq!(
                got,
                all[start as usize..].to_vec(),
                "threads {threads} start {start}"
            );
        }
    }
    // A group's length is its longest pair's, in every mode (checked against the pairs).
    for (k, (facts, mode)) in every_mode().into_iter().enumerate() {
        let d = write(
            &dir.path().join(format!("m{k}")),
            facts,
            &small_spec(40, None),
            &[40],
            0,
        );
        for (qm, pm) in [(2, 3), (8, 16), (32, 128)] {
            let m = loader(&d, |o| {
                o.collate.mode = mode;
                o.collate.query_max_len = qm;
                o.collate.passage_max_len = pm;
            });
            for sel in m.selections(0, 0).unwrap() {
                let want = m
                    .collator()
                    .pairs(&d, &sel)
                    .unwrap()
                    .iter()
                    .map(|p| p.len())
                    .max();
                assert_eq!(Some(m.collator().group_len(&d, &sel).unwrap()), want);
            }
        }
    }
    // Sorted within megabatches; the epoch's longest group is in batch 0.
    let lens: Vec<Vec<usize>> = all
        .iter()
        .map(|b| {
            b.iter()
                .map(|s| l.collator().group_len(&ds, s).unwrap())
                .collect()
        })
        .collect();
    let longest = lens.iter().flatten().max().unwrap();
    assert_eq!(lens[0][0], *longest);
    // Batch 0 traded places with the first batch of some megabatch: put back, every
    // megabatch's batches are sorted.
    let sorted = |lens: &[Vec<usize>]| {
        lens.chunks(3).all(|mb| {
            let flat: Vec<usize> = mb.iter().flatten().copied().collect();
            flat.windows(2).all(|w| w[0] >= w[1])
        })
    };
    assert!(
        (0..lens.len()).step_by(3).any(|k| {
            let mut back = lens.clone();
            back.swap(0, k);
            sorted(&back)
        }),
        "{lens:?}"
    );
    // Same rows, same selections -> the same pairs as the random order's collator.
    let random = loader(&ds, |o| o.collate.knowledge_distillation = false);
    for sel in &all[..4] {
        let a = l.collate(sel.clone()).unwrap();
        let b = random.collate(sel.clone()).unwrap();
        assert_eq!(ids_vec(&a.input_ids), ids_vec(&b.input_ids));
    }
    // Fewer padded cells than random order on the same epoch.
    let cells = |l: &Loader| -> u64 {
        (0..l.steps(1).unwrap())
            .map(|s| {
                let b = l.batch(1, s).unwrap();
                (b.rows * b.len) as u64
            })
            .sum()
    };
    assert!(cells(&l) < cells(&random));
}

/// 60 rows in three sources of 40, 5 and 15 rows; [`source`] says which holds a row.
fn three_sources(dir: &Path) -> Arc<Dataset> {
    write(dir, bert_like(), &small_spec(60, None), &[40, 5, 15], 0)
}

/// The source of a row of [`three_sources`].
fn source(r: u64) -> usize {
    match r {
        0..40 => 0,
        40..45 => 1,
        _ => 2,
    }
}

/// Every batch of one epoch, by step.
fn epoch_batches(l: &Loader, epoch: u64) -> Vec<Vec<Selection>> {
    (0..l.steps(epoch).unwrap())
        .map(|s| l.batch(epoch, s).unwrap().selections)
        .collect()
}

/// Resuming at any step, with any thread count, gives the batches of the pure `batch(e, k)`.
fn assert_resumable(make: &dyn Fn(usize) -> Loader, epoch: u64) {
    let all = epoch_batches(&make(0), epoch);
    assert!(all.len() > 3);
    for threads in [0, 1, 3] {
        for start in [0, 1, all.len() as u64 / 2, all.len() as u64 - 1] {
            let mut l = make(threads);
            l.set_state(LoaderState {
                epoch,
                step: start,
                offset: 0,
            })
            .unwrap();
            let got: Vec<Vec<Selection>> = l.by_ref().map(|b| b.unwrap().selections).collect();
            assert_eq!(
                got,
                all[start as usize..],
                "threads {threads} start {start}"
            );
            assert_eq!(
                l.state(),
                LoaderState {
                    epoch: epoch + 1,
                    step: 0,
                    offset: 0,
                }
            );
        }
    }
}

/// Rows seen over one epoch by all ranks, each rank's step count, and the batches of each step
/// (all ranks together).
fn seen_across_ranks(
    world: u64,
    epoch: u64,
    make: &dyn Fn(Shard) -> Loader,
    tail: Tail,
) -> (HashMap<u64, u32>, Vec<Vec<Vec<Selection>>>) {
    let mut seen: HashMap<u64, u32> = HashMap::new();
    let mut by_step: Vec<Vec<Vec<Selection>>> = Vec::new();
    let mut steps = None;
    for rank in 0..world {
        let l = make(Shard {
            rank,
            world_size: world,
            tail,
        });
        let batches = epoch_batches(&l, epoch);
        assert_eq!(
            *steps.get_or_insert(batches.len()),
            batches.len(),
            "same steps on every rank"
        );
        for (k, b) in batches.into_iter().enumerate() {
            for s in &b {
                *seen.entry(s.row).or_default() += 1;
            }
            if by_step.len() <= k {
                by_step.push(Vec::new());
            }
            by_step[k].push(b);
        }
    }
    (seen, by_step)
}

/// Token-budget batches (issue 12): within the budget (a single group per rank may exceed
/// it), every row once per epoch across ranks with the drop tail and at least once with pad,
/// the same steps on every rank, resumable, thread-independent, and collating to the pairs
/// of the random order's collator.
#[test]
fn token_budget_batches_keep_every_guarantee() {
    let dir = tempfile::tempdir().unwrap();
    let ds = write(dir.path(), bert_like(), &small_spec(103, None), &[103], 0);
    for packed in [false, true] {
        for grouped in [None, Some(2)] {
            let make = |f: &dyn Fn(&mut LoaderOptions)| {
                loader(&ds, |o| {
                    o.batch_size = 16;
                    o.strategy = Strategy::TokenBudget {
                        max_tokens: 160,
                        megabatch: grouped,
                    };
                    o.collate.pad_to_multiple_of = Some(4);
                    o.collate.packed = packed;
                    f(o);
                })
            };
            for world in [1u64, 2, 3] {
                for tail in [Tail::Drop, Tail::Pad] {
                    let (seen, steps) =
                        seen_across_ranks(world, 1, &|shard| make(&|o| o.shard = shard), tail);
                    let total: u32 = seen.values().sum();
                    if tail == Tail::Drop {
                        assert!(seen.values().all(|&c| c == 1));
                        assert_eq!(total as u64, 103 / world * world);
                    } else {
                        assert_eq!(seen.len(), 103);
                        assert_eq!(total as u64, 103u64.div_ceil(world) * world);
                    }
                    for ranks in &steps {
                        let sizes: Vec<usize> = ranks.iter().map(Vec::len).collect();
                        assert!(sizes.iter().all(|&b| b == sizes[0] && b <= 16), "{sizes:?}");
                    }
                }
            }
            let l = make(&|_| {});
            let mut fill = 0.0;
            let steps = l.steps(1).unwrap();
            for k in 0..steps {
                let b = l.batch(1, k).unwrap();
                let tokens = if packed {
                    b.real_tokens as usize
                } else {
                    b.rows * b.len
                };
                assert!(tokens <= 160 || b.selections.len() == 1, "{tokens}");
                fill += tokens as f64 / 160.0;
            }
            assert!(
                fill / steps as f64 > 0.5,
                "packed {packed}: {}",
                fill / steps as f64
            );
            assert_resumable(&|threads| make(&|o| o.prefetch_threads = threads), 1);
            let random = loader(&ds, |o| {
                o.collate.pad_to_multiple_of = Some(4);
                o.collate.packed = packed;
            });
            let sel = l.batch(1, 2).unwrap().selections;
            assert_eq!(
                l.collate(sel.clone()).unwrap(),
                random.collate(sel).unwrap()
            );
        }
    }
    let err = Loader::new(
        ds.clone(),
        LoaderOptions {
            strategy: Strategy::TokenBudget {
                max_tokens: 100,
                megabatch: None,
            },
            shard: Shard {
                rank: 0,
                world_size: 2,
                tail: Tail::Uneven,
            },
            ..LoaderOptions::default()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("max_tokens"), "{err}");
}

/// Weighted mixing (issue 12): each source gives an epoch exactly its share (largest
/// remainder), rows of a down-weighted source are a new subset each epoch and never twice in
/// one, every position once across ranks, resumable.
#[test]
fn weighted_mixing_gives_each_source_its_share() {
    let dir = tempfile::tempdir().unwrap();
    let ds = three_sources(dir.path());
    let weights = vec![1.0, 2.0, 1.0];
    let make = |f: &dyn Fn(&mut LoaderOptions)| {
        loader(&ds, |o| {
            o.weights = Some(weights.clone());
            f(o);
        })
    };
    let mut subsets = Vec::new();
    for epoch in [0u64, 1] {
        let (seen, _) =
            seen_across_ranks(2, epoch, &|shard| make(&|o| o.shard = shard), Tail::Uneven);
        let mut share = [0u32; 3];
        for (&r, &c) in &seen {
            share[source(r)] += c;
        }
        assert_eq!(share, [15, 30, 15], "60 rows split 1:2:1");
        for r in 40..45 {
            assert_eq!(seen[&r], 6, "5 rows, 30 draws: six copies");
        }
        assert!(seen
            .iter()
            .filter(|(&r, _)| source(r) == 0)
            .all(|(_, &c)| c == 1));
        let mut s0: Vec<u64> = seen.keys().copied().filter(|&r| r < 40).collect();
        s0.sort();
        subsets.push(s0);
    }
    assert_ne!(subsets[0], subsets[1], "a new subset each epoch");
    assert_resumable(&|threads| make(&|o| o.prefetch_threads = threads), 1);
    for bad in [vec![1.0], vec![-1.0, 1.0, 1.0], vec![0.0, 0.0, 0.0]] {
        let err = Loader::new(
            ds.clone(),
            LoaderOptions {
                weights: Some(bad),
                ..LoaderOptions::default()
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("weights"), "{err}");
    }
}

/// Same-source batches (issue 12): every global batch holds one source's rows, per-source
/// batch sizes honoured, each row at most once per epoch with the drop tail and at least
/// once with pad, resumable, thread-independent.
#[test]
fn same_source_batches_hold_one_source() {
    let dir = tempfile::tempdir().unwrap();
    let ds = three_sources(dir.path());
    let sizes = [3usize, 2, 4];
    let make = |f: &dyn Fn(&mut LoaderOptions)| {
        loader(&ds, |o| {
            o.strategy = Strategy::SameSource {
                batch_sizes: Some(sizes.to_vec()),
                small_threshold: 0,
                drop_threshold: 0,
            };
            f(o);
        })
    };
    for world in [1u64, 2] {
        for tail in [Tail::Drop, Tail::Pad] {
            let (seen, steps) =
                seen_across_ranks(world, 3, &|shard| make(&|o| o.shard = shard), tail);
            for ranks in &steps {
                let rows: Vec<u64> = ranks.iter().flatten().map(|s| s.row).collect();
                let s = source(rows[0]);
                assert!(
                    rows.iter().all(|&r| source(r) == s),
                    "one source per global batch"
                );
                assert!(ranks.iter().all(|b| b.len() == sizes[s]), "its batch size");
            }
            match tail {
                Tail::Drop => {
                    assert!(seen.values().all(|&c| c == 1));
                    let want: u64 = [40u64, 5, 15]
                        .iter()
                        .zip(sizes)
                        .map(|(&n, b)| n / (world * b as u64) * world * b as u64)
                        .sum();
                    assert_eq!(seen.len() as u64, want);
                }
                _ => assert_eq!(seen.len(), 60, "every row at least once"),
            }
        }
    }
    assert_resumable(&|threads| make(&|o| o.prefetch_threads = threads), 2);
    let l = make(&|_| {});
    assert_ne!(epoch_batches(&l, 0), epoch_batches(&l, 1), "epochs differ");
    // Strategies exclude each other: in the typed options by construction, in the flat ones
    // (Python keywords, CLI flags) by an error naming one.
    let err = rankfeed::options::Options {
        same_source: true,
        length_grouped: Some(4),
        ..Default::default()
    }
    .resolve(&ds.manifest().sources)
    .unwrap_err();
    assert!(err.to_string().contains("does not combine"), "{err}");
}

/// Embedder batches (issue 13) against a naive implementation of the rules in
/// src/collate/embedder.rs: each query and passage on its own, cut to its max length minus the
/// template's special tokens, the template around it (plus eos for decoders), queries and
/// passages padded separately, and each sub-batch to its own longest.
#[test]
fn embedder_batches_follow_the_single_sequence_rules() {
    let dir = tempfile::tempdir().unwrap();
    let spec = small_spec(40, None);
    for (k, facts) in [bert_like(), llama_like()].into_iter().enumerate() {
        let ds = write(
            &dir.path().join(k.to_string()),
            facts.clone(),
            &spec,
            &[40],
            0,
        );
        let decoder = k == 1;
        let single = |ids: &[i32], max: usize| -> Vec<i32> {
            if decoder {
                let mut v: Vec<i32> = ids[..ids.len().min(max - 1)].to_vec();
                v.push(2);
                v
            } else {
                let mut v = vec![101];
                v.extend(&ids[..ids.len().min(max - 2)]);
                v.push(102);
                v
            }
        };
        for (qm, pm, sub, multiple) in [
            (3, 5, None, None),
            (4, 6, Some(3), Some(4)),
            (64, 64, Some(5), None),
        ] {
            let l = loader(&ds, |o| {
                o.collate.mode = Mode::Embedder;
                o.collate.query_max_len = qm;
                o.collate.passage_max_len = pm;
                o.collate.sub_batch_size = sub;
                o.collate.pad_to_multiple_of = multiple;
            });
            for step in 0..3 {
                let b = l.batch(0, step).unwrap();
                let e = b.embedder.as_ref().unwrap();
                let mut queries = Vec::new();
                let mut passages = Vec::new();
                for sel in &b.selections {
                    let g = ds.group(sel.row as usize).unwrap();
                    queries.push(single(g.query, qm));
                    passages.push(single(ds.passage(g.pos[sel.pos as usize]).unwrap(), pm));
                    for &j in &sel.neg {
                        passages.push(single(ds.passage(g.neg[j as usize]).unwrap(), pm));
                    }
                }
                assert_eq!(b.teacher_scores.as_ref().unwrap().len(), passages.len());
                for (want, got) in [(&queries, &e.queries), (&passages, &e.passages)] {
                    let chunk = sub.unwrap_or(want.len());
                    assert_eq!(got.len(), want.len().div_ceil(chunk));
                    for (seqs, padded) in want.chunks(chunk).zip(got) {
                        let longest = seqs.iter().map(Vec::len).max().unwrap();
                        let m = multiple.unwrap_or(1);
                        let len = longest.div_ceil(m) * m;
                        assert_eq!((padded.rows, padded.len), (seqs.len(), len));
                        let (ids, mask) = (
                            ids_vec(&padded.input_ids),
                            ids_vec(padded.attention_mask.as_ref().unwrap()),
                        );
                        for (r, s) in seqs.iter().enumerate() {
                            let row = &ids[r * len..(r + 1) * len];
                            let mrow = &mask[r * len..(r + 1) * len];
                            let pad = len - s.len();
                            let (content, pads, mcontent) = if decoder {
                                (&row[pad..], &row[..pad], &mrow[pad..])
                            } else {
                                (&row[..s.len()], &row[s.len()..], &mrow[..s.len()])
                            };
                            assert_eq!(content, s.iter().map(|&v| v as i64).collect::<Vec<_>>());
                            // BERT's pad is 0; the decoder has no pad, so unk (0).
                            let pad_id = 0;
                            assert!(pads.iter().all(|&v| v == pad_id));
                            assert!(mcontent.iter().all(|&v| v == 1));
                            assert_eq!(mrow.iter().sum::<i64>() as usize, s.len());
                        }
                        assert_eq!(padded.token_type_ids.is_some(), !decoder);
                        if let Some(t) = &padded.token_type_ids {
                            assert!(ids_vec(t).iter().all(|&v| v == 0));
                        }
                    }
                }
            }
        }
    }
}

/// Matryoshka teacher scores follow the seed code: by text (the first index holding the
/// same passage), 1 without scores, always present; per index as an option.
#[test]
fn matryoshka_scores_follow_the_seed_by_text() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ds");
    let mut w = DatasetWriter::create(&path, WriterOptions::default()).unwrap();
    for p in [vec![900], vec![910]] {
        w.add_prompt(&p).unwrap();
    }
    for n in 0..12 {
        w.add_passage(&[n, n]).unwrap();
    }
    // Row 0: positives [1, 1] and negatives [7, 8, 7, 9] (passages repeated with other
    // scores); row 1: no scores.
    type Row<'a> = (&'a [i32], &'a [i32], Option<(&'a [f32], &'a [f32])>);
    let rows: [Row; 2] = [
        (
            &[1, 1],
            &[7, 8, 7, 9],
            Some((&[0.9, 0.1], &[0.7, 0.8, 0.2, 0.6])),
        ),
        (&[2], &[3, 4, 3], None),
    ];
    for (pos, neg, scores) in rows {
        w.add_group(&GroupRecord {
            query: &[5, 6],
            pos,
            neg,
            pos_scores: scores.map(|s| s.0),
            neg_scores: scores.map(|s| s.1),
            prompt: None,
            source: 0,
        })
        .unwrap();
    }
    w.finish(ManifestInfo {
        tokenizer: Some(llama_like()),
        text: TextSettings {
            sep_ids: vec![13],
            ..TextSettings::default()
        },
        sources: vec![rankfeed::format::SourceStats {
            rows_read: 2,
            rows_accepted: 2,
            ..Default::default()
        }],
        shards: None,
    })
    .unwrap();
    let ds = Dataset::open(&path).unwrap();
    let collator = |kd: bool, by_index: bool| {
        Collator::new(
            &ds,
            CollateOptions {
                mode: Mode::Matryoshka,
                group_size: 4,
                knowledge_distillation: kd,
                matryoshka_scores_by_index: by_index,
                ..CollateOptions::default()
            },
        )
        .unwrap()
    };
    let sels = vec![
        Selection {
            row: 0,
            pos: 1,
            neg: vec![2, 1, 0],
        },
        Selection {
            row: 1,
            pos: 0,
            neg: vec![2, 1, 0],
        },
    ];
    // By text: positive index 1 is passage 1, first at index 0 -> 0.9; negative index 2 is
    // passage 7, first at index 0 -> 0.7. Row 1 has no scores -> 1.
    let seed = collator(false, false).collate(&ds, sels.clone()).unwrap();
    assert_eq!(
        seed.teacher_scores.unwrap(),
        vec![0.9, 0.7, 0.8, 0.7, 1.0, 1.0, 1.0, 1.0]
    );
    let by_index = collator(true, true)
        .collate(&ds, sels[..1].to_vec())
        .unwrap();
    assert_eq!(by_index.teacher_scores.unwrap(), vec![0.1, 0.2, 0.8, 0.7]);
    let none = collator(false, true)
        .collate(&ds, sels[..1].to_vec())
        .unwrap();
    assert!(
        none.teacher_scores.is_none(),
        "by index: only with distillation"
    );
}

/// Elastic resumption (issue 18): a run interrupted any number of times and resumed each time
/// on another world size and per-rank batch size (or the same) trains each row of the epoch
/// as often as an uninterrupted epoch promises: exactly once with the uneven tail; at least
/// once, and a row twice only for the padding of the last part, with the pad tail; at most
/// once, missing only the last part's cut, with the drop tail. Seeded over datasets of 1-200
/// rows, tails, drop_last, shuffle and 1-4 resumptions (world 1-4, batch 1-8);
/// RANKFEED_LONG=<factor> for more.
#[test]
fn elastic_resume_trains_each_row_of_the_epoch_as_promised() {
    let long: u64 = std::env::var("RANKFEED_LONG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let dir = tempfile::tempdir().unwrap();
    let sizes = [1usize, 2, 7, 30, 61, 200];
    let sets: Vec<_> = sizes
        .iter()
        .map(|&n| {
            let sub = dir.path().join(n.to_string());
            std::fs::create_dir_all(&sub).unwrap();
            write(&sub, bert_like(), &small_spec(n, None), &[n as u64], 0)
        })
        .collect();
    let mut rng = rankfeed::sample::KeyedRng::new(&[18, 0xe1a5]);
    let (mut runs, mut elastic, mut exact) = (0u64, 0u64, 0u64);
    while runs < 400 * long {
        let ds = &sets[rng.below(sets.len() as u64) as usize];
        let n = ds.len() as u64;
        let tail = [Tail::Pad, Tail::Drop, Tail::Uneven][rng.below(3) as usize];
        let drop_last = rng.below(4) == 0;
        let shuffle = rng.below(4) != 0;
        let epoch = rng.below(3);
        let shape =
            |rng: &mut rankfeed::sample::KeyedRng| (1 + rng.below(4), 1 + rng.below(8) as usize);
        let make = |world: u64, batch: usize, rank: u64| {
            Loader::new(
                ds.clone(),
                LoaderOptions {
                    batch_size: batch,
                    seed: 9,
                    shuffle,
                    drop_last,
                    prefetch_threads: 0,
                    shard: Shard {
                        rank,
                        world_size: world,
                        tail,
                    },
                    collate: CollateOptions {
                        group_size: 2,
                        ..CollateOptions::default()
                    },
                    ..LoaderOptions::default()
                },
            )
        };
        let (mut world, mut batch) = shape(&mut rng);
        let Ok(first) = make(world, batch, 0) else {
            continue; // e.g. more ranks than rows with the drop tail
        };
        let mut state = {
            let mut l = first;
            l.set_epoch(epoch);
            l.checkpoint().unwrap()
        };
        let mut count = vec![0u32; n as usize];
        let resumes = 1 + rng.below(4);
        let mut part = 0;
        let mut last_world = world;
        let mut last_batch = batch;
        let mut finished = false;
        loop {
            let mut ranks: Vec<Loader> = match (0..world).map(|r| make(world, batch, r)).collect() {
                Ok(v) => v,
                Err(_) => break,
            };
            let mut how = None;
            for l in &mut ranks {
                how = Some(l.restore(&state).unwrap());
            }
            match how {
                Some(rankfeed::loader::Resumed::Exact) => exact += 1,
                _ => elastic += 1,
            }
            if ranks[0].state().epoch != epoch {
                finished = true; // the state was at the end of the epoch
                break;
            }
            last_world = world;
            last_batch = batch;
            let steps = ranks[0].steps_per_epoch().unwrap();
            let here = ranks[0].state().step;

            // Run some steps (all of the rest in the last part).
            let todo = if part == resumes {
                steps - here
            } else {
                rng.below(steps - here + 1)
            };
            for _ in 0..todo {
                for l in &mut ranks {
                    if let Some(b) = l.next() {
                        for s in b.unwrap().selections {
                            count[s.row as usize] += 1;
                        }
                    }
                }
            }
            state = ranks[0].checkpoint().unwrap();
            if part == resumes {
                finished = true;
                break;
            }
            part += 1;
            (world, batch) = shape(&mut rng);
        }
        if !finished {
            continue; // a later shape was invalid for this dataset (drop tail, drop_last)
        }
        runs += 1;
        let ctx = format!(
            "n {n} tail {tail:?} drop_last {drop_last} last world {last_world} batch {last_batch}"
        );
        let missed = count.iter().filter(|&&c| c == 0).count() as u64;
        let extra: u64 = count.iter().map(|&c| c.saturating_sub(1) as u64).sum();
        let cut = if drop_last {
            last_batch as u64 * last_world + last_world
        } else {
            last_world
        };
        match tail {
            Tail::Uneven if !drop_last => assert!(missed == 0 && extra == 0, "{ctx}: {count:?}"),
            Tail::Pad if !drop_last => {
                assert_eq!(missed, 0, "{ctx}: {count:?}");
                assert!(extra < last_world, "{ctx}: {count:?}");
            }
            // Padded, then the last short batch dropped: both, as in an uninterrupted epoch.
            Tail::Pad => {
                assert!(extra < last_world, "{ctx}: {count:?}");
                assert!(missed < cut, "{ctx}: missed {missed}: {count:?}");
            }
            _ => {
                assert_eq!(extra, 0, "{ctx}: {count:?}");
                assert!(missed < cut, "{ctx}: missed {missed}: {count:?}");
            }
        }
    }
    println!(
        "elastic resumption: {runs} runs, {elastic} elastic and {exact} exact restores, every row as promised"
    );
    assert!(elastic > runs && exact > 0);
}
