//! Datasets made from other datasets (`merge`, `export`) trust nothing: every input is verified
//! in full before anything is written, so a damaged input is refused instead of being sealed
//! under fresh, valid checksums; shards are joined exactly once each, in shard order.
//!
//! The derivation fuzzer (`corrupted_inputs_are_never_laundered`) mutates each file of a shard
//! thousands of times (seeded: single bytes, runs of bytes, zeroed ranges) and asserts that each
//! merge and export of the mutated shard either fails, writing nothing, or gives output
//! identical to the unmutated run's. `RANKFEED_LONG=<factor>` multiplies the mutations.

mod support;

use std::path::{Path, PathBuf};

use rankfeed::convert::{convert, ConvertOptions, OnError};
use rankfeed::export::{export, ExportOptions, Layout};
use rankfeed::merge::merge;
use rankfeed::sample::KeyedRng;
use rankfeed::tokenizer::TextTokenizer;
use rankfeed::writer::WriterOptions;
use rankfeed::{Dataset, Error};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tokenizer() -> TextTokenizer {
    TextTokenizer::from_file(root().join("data/sample/bert/tokenizer.json")).unwrap()
}

/// The fixture rows plus two bad ones (so shards carry rejects.jsonl), converted whole and as
/// `n` shards with `--on-error skip`.
struct Shards {
    _dir: tempfile::TempDir,
    root: PathBuf,
    whole: PathBuf,
    shards: Vec<PathBuf>,
}

fn shards(n: usize) -> Shards {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let mut text = std::fs::read_to_string(self::root().join("tests/fixtures/roundtrip.jsonl"))
        .unwrap()
        .lines()
        .take(60)
        .collect::<Vec<_>>()
        .join("\n");
    text.push_str("\n{\"query\": \"no positive\", \"pos\": [], \"neg\": [\"x\"]}\nnot json\n");
    let input = root.join("train.jsonl");
    std::fs::write(&input, text).unwrap();
    let tok = tokenizer();
    let run = |out: &Path, shard| {
        let opts = ConvertOptions {
            shard,
            on_error: OnError::Skip,
            ..ConvertOptions::default()
        };
        convert(std::slice::from_ref(&input), &tok, out, &opts, &mut |_| {}).unwrap();
    };
    let whole = root.join("whole");
    run(&whole, None);
    let shards = (0..n)
        .map(|k| {
            let out = root.join(format!("shard-{k}"));
            run(&out, Some((k, n)));
            out
        })
        .collect();
    Shards {
        _dir: dir,
        root,
        whole,
        shards,
    }
}

/// Every file of a dataset directory, by name.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

/// Every file below `dir` (an export: part files in subdirectories), by relative path.
fn tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((
                    p.strip_prefix(dir).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                ));
            }
        }
    }
    out.sort();
    out
}

fn same_files(a: &Path, b: &Path) {
    let (fa, fb) = (files(a), files(b));
    let names = |f: &[(String, Vec<u8>)]| f.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&fa), names(&fb));
    for ((name, x), (_, y)) in fa.iter().zip(&fb) {
        assert!(
            x == y,
            "{name} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

fn merge_to(inputs: &[PathBuf], out: &Path) -> rankfeed::Result<rankfeed::Manifest> {
    merge(inputs, out, WriterOptions::default())
}

/// Flip bit 0 of the last token id of passage 0 (an in-vocabulary id stays in the vocabulary
/// for most ids): `open` accepts the file, only its checksum tells.
fn flip_a_token(shard: &Path) -> PathBuf {
    let ds = Dataset::open(shard).unwrap();
    let last = ds.passage(0).unwrap().len() - 1;
    let target = ds.passage(0).unwrap()[last];
    drop(ds);
    let path = shard.join("passages.arrow");
    let mut bytes = std::fs::read(&path).unwrap();
    let needle = target.to_le_bytes();
    let at = bytes
        .windows(4)
        .position(|w| w == needle)
        .expect("the token's bytes are in the file");
    bytes[at] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    let ds = Dataset::open(shard).expect("a flipped token still opens");
    assert_ne!(ds.passage(0).unwrap()[last], target);
    path
}

/// Finding 2 of issue 17: merge opened shards without checking their checksums, so a flipped
/// token id was merged and sealed under a fresh, valid checksum (and passed verify).
#[test]
fn merge_refuses_a_shard_that_fails_verify() {
    let s = shards(2);
    let bad = flip_a_token(&s.shards[1]);
    let out = s.root.join("merged");
    let err = merge_to(&s.shards, &out).unwrap_err();
    assert!(err.is_corrupt(), "{err}");
    assert!(
        err.to_string().contains(&bad.display().to_string()),
        "names the file: {err}"
    );
    assert!(!out.exists(), "nothing is written");
}

/// Finding 2 of issue 17, export: a dataset whose checksum fails is not exported.
#[test]
fn export_refuses_a_dataset_that_fails_verify() {
    let s = shards(2);
    flip_a_token(&s.shards[0]);
    let out = s.root.join("export");
    let ds = Dataset::open(&s.shards[0]).unwrap();
    for layout in [Layout::Flat, Layout::Tables] {
        let opts = ExportOptions {
            layout,
            ..Default::default()
        };
        let err = export(&ds, &out, &opts).unwrap_err();
        assert!(err.is_corrupt(), "{err}");
        assert!(!out.exists(), "nothing is written");
    }
}

/// Finding 10 of issue 17: merging the same shard twice doubled its rows silently.
#[test]
fn merge_refuses_a_shard_given_twice_overlaps_and_gaps() {
    let s = shards(4);
    let out = s.root.join("merged");
    let [a, b, c, d] = [0, 1, 2, 3].map(|k| s.shards[k].clone());
    for (inputs, want) in [
        (
            vec![a.clone(), b.clone(), b.clone(), c.clone(), d.clone()],
            "twice",
        ),
        (vec![a.clone(), c.clone(), d.clone()], "missing"),
        (vec![s.whole.clone(), a.clone()], "whole conversion"),
    ] {
        let err = merge_to(&inputs, &out).unwrap_err();
        assert!(matches!(err, Error::Input { .. }), "{err}");
        assert!(err.to_string().contains(want), "{want}: {err}");
        assert!(!out.exists());
    }
    // A merged part overlapping a shard it holds.
    let ab = s.root.join("ab");
    merge_to(&[a.clone(), b.clone()], &ab).unwrap();
    let err = merge_to(&[ab.clone(), b.clone(), c.clone(), d.clone()], &out).unwrap_err();
    assert!(err.to_string().contains("twice"), "{err}");
}

/// Shards are joined in shard order whatever order they are given in (Spark lists part
/// directories in any order), and merging in steps gives the same dataset as at once.
#[test]
fn shards_merge_in_shard_order_and_in_steps() {
    let s = shards(4);
    let shuffled: Vec<PathBuf> = [2, 0, 3, 1].iter().map(|&k| s.shards[k].clone()).collect();
    let at_once = s.root.join("at-once");
    let m = merge_to(&shuffled, &at_once).unwrap();
    assert_eq!(m.shards, None, "all four shards make the whole conversion");
    same_files(&s.whole, &at_once);
    // In steps: 0..2 and 2..4, then those two (given in reverse).
    let (lo, hi) = (s.root.join("lo"), s.root.join("hi"));
    let ml = merge_to(&s.shards[..2], &lo).unwrap();
    let r = ml.shards.expect("a partial merge records its shards");
    assert_eq!((r.start, r.end, r.of), (0, 2, 4));
    merge_to(&s.shards[2..], &hi).unwrap();
    let steps = s.root.join("steps");
    merge_to(&[hi, lo], &steps).unwrap();
    same_files(&s.whole, &steps);
}

/// Finding 8 of issue 17 (second half): a pair template without its second sequence opened,
/// and the loader failed later with a generic error. It is now a corrupt dataset at open.
#[test]
fn broken_tokenizer_facts_are_corrupt_at_open() {
    let s = shards(1);
    let path = s.whole.join("manifest.json");
    let original = std::fs::read_to_string(&path).unwrap();
    let mut m: serde_json::Value = serde_json::from_str(&original).unwrap();
    let pair = m["tokenizer"]["pair_template"].as_array_mut().unwrap();
    let b = pair
        .iter()
        .position(|p| p.to_string().contains("\"B\""))
        .expect("the pair template holds sequence B");
    pair.remove(b);
    let mut bytes = serde_json::to_vec_pretty(&m).unwrap();
    rankfeed::format::reseal(&mut bytes).unwrap();
    std::fs::write(&path, &bytes).unwrap();
    let err = Dataset::open(&s.whole).unwrap_err();
    assert!(err.is_corrupt(), "{err}");
    assert!(err.to_string().contains("pair_template"), "{err}");
    // A separator id outside the vocabulary, likewise.
    let mut m: serde_json::Value = serde_json::from_str(&original).unwrap();
    m["text"]["sep_ids"] = serde_json::json!([999_999]);
    let mut bytes = serde_json::to_vec_pretty(&m).unwrap();
    rankfeed::format::reseal(&mut bytes).unwrap();
    std::fs::write(&path, &bytes).unwrap();
    let err = Dataset::open(&s.whole).unwrap_err();
    assert!(err.to_string().contains("sep_ids"), "{err}");
}

/// One seeded mutation of `bytes`: a single byte changed, a run of 2-16 bytes changed, or a
/// range of up to 64 bytes zeroed (when that changes anything).
fn mutate(rng: &mut KeyedRng, bytes: &[u8]) -> (Vec<u8>, &'static str) {
    let mut out = bytes.to_vec();
    let n = out.len() as u64;
    let kind = rng.below(3);
    let at = rng.below(n) as usize;
    match kind {
        0 => out[at] ^= 1 + rng.below(255) as u8,
        1 => {
            let len = (2 + rng.below(15) as usize).min(out.len() - at);
            for b in &mut out[at..at + len] {
                *b ^= 1 + rng.below(255) as u8;
            }
        }
        _ => {
            let len = (1 + rng.below(64) as usize).min(out.len() - at);
            out[at..at + len].fill(0);
        }
    }
    if out == bytes {
        // A zeroed range that was zero already: change one byte instead.
        out[at] ^= 0x55;
    }
    (out, ["byte", "run", "zeroed"][kind as usize])
}

/// The acceptance test of issue 17: >= 2,000 mutations of each `.arrow` file of a shard (and
/// of its rejects.jsonl), each merged with the other shard and exported in both layouts. Each
/// either is refused with nothing written, or gives output identical to the unmutated run's.
/// 0 laundered.
#[test]
fn corrupted_inputs_are_never_laundered() {
    let s = shards(2);
    // The last shard holds the bad rows, so it has a rejects.jsonl.
    let (other, victim) = (s.shards[0].clone(), s.shards[1].clone());
    let work = s.root.join("work");
    // The unmutated runs.
    let want_merge = s.root.join("want-merge");
    merge_to(&s.shards, &want_merge).unwrap();
    let exports = [Layout::Flat, Layout::Tables].map(|layout| ExportOptions {
        layout,
        rows_per_file: 25,
        ..Default::default()
    });
    let want_export: Vec<_> = exports
        .iter()
        .enumerate()
        .map(|(i, o)| {
            let out = s.root.join(format!("want-export-{i}"));
            export(&Dataset::open(&victim).unwrap(), &out, o).unwrap();
            tree(&out)
        })
        .collect();
    let want_merge = files(&want_merge);
    let per_file = 2_000 * support::long();
    let mut rng = KeyedRng::new(&[0xde71]);
    let (mut refused, mut identical, mut laundered) = (0u64, 0u64, Vec::new());
    for name in [
        "groups.arrow",
        "passages.arrow",
        "prompts.arrow",
        "rejects.jsonl",
    ] {
        let path = victim.join(name);
        let original = std::fs::read(&path).unwrap();
        for case in 0..per_file {
            let (bytes, kind) = mutate(&mut rng, &original);
            std::fs::write(&path, &bytes).unwrap();
            let merged = merge_to(&[other.clone(), victim.clone()], &work);
            match merged {
                Err(_) => {
                    assert!(!work.exists(), "{name} case {case}: a refused merge wrote");
                    refused += 1;
                }
                Ok(_) => {
                    if files(&work) == want_merge {
                        identical += 1;
                    } else {
                        laundered.push(format!("merge {name} case {case} ({kind})"));
                    }
                    std::fs::remove_dir_all(&work).unwrap();
                }
            }
            for (o, want) in exports.iter().zip(&want_export) {
                let exported = Dataset::open(&victim).and_then(|ds| export(&ds, &work, o));
                match exported {
                    Err(_) => {
                        assert!(!work.exists(), "{name} case {case}: a refused export wrote");
                        refused += 1;
                    }
                    Ok(_) => {
                        if &tree(&work) == want {
                            identical += 1;
                        } else {
                            laundered.push(format!("export {name} case {case} ({kind})"));
                        }
                        std::fs::remove_dir_all(&work).unwrap();
                    }
                }
            }
        }
        std::fs::write(&path, &original).unwrap();
    }
    println!(
        "derivation: {} mutations x (merge + 2 exports): {refused} refused, {identical} identical, \
         {} laundered",
        4 * per_file,
        laundered.len()
    );
    assert!(laundered.is_empty(), "laundered: {laundered:?}");
    assert_eq!(refused + identical, 4 * per_file * 3);
}

/// A shard exported to Parquet and imported back is still that shard (the range travels in
/// the Parquet metadata), so it merges with the other shards into the whole conversion.
#[test]
fn an_imported_shard_is_still_a_shard() {
    let s = shards(2);
    let parquet = s.root.join("shard-0.parquet");
    export(
        &Dataset::open(&s.shards[0]).unwrap(),
        &parquet,
        &ExportOptions::default(),
    )
    .unwrap();
    let back = s.root.join("shard-0-back");
    let r = rankfeed::import::import(
        std::slice::from_ref(&parquet),
        &back,
        None,
        WriterOptions::default(),
    )
    .unwrap();
    let range = r.manifest.shards.expect("the shard range is carried");
    assert_eq!((range.start, range.end, range.of), (0, 1, 2));
    let merged = s.root.join("merged");
    let m = merge_to(&[s.shards[1].clone(), back], &merged).unwrap();
    assert_eq!(m.shards, None);
    let (a, b) = (
        Dataset::open(&merged).unwrap(),
        Dataset::open(&s.whole).unwrap(),
    );
    assert_eq!(a.len(), b.len());
    for row in 0..a.len() {
        assert_eq!(a.group(row).unwrap().query, b.group(row).unwrap().query);
    }
}

/// Rewrite `dir`'s manifest with `edit` applied, resealed (as a tool that edits it on purpose
/// would).
fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut m);
    let mut bytes = serde_json::to_vec_pretty(&m).unwrap();
    rankfeed::format::reseal(&mut bytes).unwrap();
    std::fs::write(&path, &bytes).unwrap();
}

/// Found by the adversarial review of issue 17: a shard range that merge called corrupt was
/// accepted by open and verify ("holds shard 0/0").
#[test]
fn open_refuses_a_shard_range_that_is_not_one() {
    let s = shards(2);
    for (start, end, of) in [(0, 1, 0), (2, 1, 3), (1, 1, 3), (0, 4, 3)] {
        edit_manifest(&s.shards[0], |m| {
            m["shards"] = serde_json::json!({"start": start, "end": end, "of": of})
        });
        let err = Dataset::open(&s.shards[0]).unwrap_err();
        assert!(
            err.is_corrupt() && err.to_string().contains("not a range"),
            "{err}"
        );
    }
}

/// Found by the adversarial review of issue 17: an empty input, which a single conversion
/// refuses, was published as a 0-row dataset by shard conversions and their merge.
#[test]
fn merging_the_shards_of_an_empty_input_is_refused_like_its_conversion() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("empty.jsonl");
    std::fs::write(&input, "\u{feff}\n\n").unwrap();
    let tok = tokenizer();
    let whole = convert(
        std::slice::from_ref(&input),
        &tok,
        &dir.path().join("whole"),
        &ConvertOptions::default(),
        &mut |_| {},
    )
    .unwrap_err();
    let shards: Vec<PathBuf> = (0..2)
        .map(|k| {
            let out = dir.path().join(format!("shard-{k}"));
            let opts = ConvertOptions {
                shard: Some((k, 2)),
                ..ConvertOptions::default()
            };
            convert(std::slice::from_ref(&input), &tok, &out, &opts, &mut |_| {}).unwrap();
            out
        })
        .collect();
    let out = dir.path().join("merged");
    let err = merge_to(&shards, &out).unwrap_err();
    assert_eq!(err.to_string(), whole.to_string());
    assert!(!out.exists());
}

/// Found by the adversarial review of issue 17: importing an export with a part file missing
/// published the smaller dataset without a word. The rows read are what is written (a subset
/// may be meant), and the report says how many the export held.
#[test]
fn importing_part_of_an_export_says_so() {
    let s = shards(1);
    let parquet = s.root.join("flat");
    let opts = ExportOptions {
        rows_per_file: 25,
        ..Default::default()
    };
    export(&Dataset::open(&s.whole).unwrap(), &parquet, &opts).unwrap();
    let import = |out: &str| {
        rankfeed::import::import(
            std::slice::from_ref(&parquet),
            &s.root.join(out),
            None,
            WriterOptions::default(),
        )
        .unwrap()
    };
    let all = import("all");
    assert!(
        !all.warnings.iter().any(|w| w.contains("missing")),
        "{:?}",
        all.warnings
    );
    std::fs::remove_file(parquet.join("part-00001.parquet")).unwrap();
    let part = import("part");
    assert!(
        part.warnings
            .iter()
            .any(|w| w.contains("missing") && w.contains(&format!("held {}", all.rows))),
        "{:?}",
        part.warnings
    );
}
