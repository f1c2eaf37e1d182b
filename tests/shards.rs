//! Sharded conversion is exact. For any set of input files (byte order marks, CRLF, blank and
//! whitespace-only lines, no trailing newline; JSON lines, JSON arrays, gzip, Parquet) and any
//! N up to twice the total byte length:
//! - level 1 (the reader, cheap): the records the shards `0..N` read, one after the other,
//!   are the records of the unsharded read (same rows, positions, blank lines and rejects);
//! - level 2 (end to end): `convert --shard K/N` for every K, then `merge`, gives the single
//!   conversion's dataset: every file byte for byte and the manifest's sources and stats.
//!
//! Planning a shard costs the same whatever N (`--shard K/N` with N = 10^12 is instant).
//!
//! The file sets come from a seeded generator; `RANKFEED_LONG=<factor>` multiplies their
//! number. Counts are printed (`--nocapture`).

mod sharding;
mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rankfeed::convert::parquet_rows::read_parquet_rows;
use rankfeed::convert::row::InputRow;
use rankfeed::convert::source::{self, Part, Record, SourceFile, DEFAULT_MAX_LINE_BYTES};
use rankfeed::convert::OnError;
use rankfeed::sample::KeyedRng;
use rankfeed::{InputPosition, RowError};
use sharding::{
    convert_into, dataset_differences, same_dataset, shard_and_merge, text_parquet_row_groups,
    tokenizer,
};

/// Valid rows, with commas, brackets, escapes and non-ASCII inside strings.
const VALID: &[&str] = &[
    r#"{"query":"q1","pos":["a"],"neg":["b"]}"#,
    r#"{"query": "q2", "pos": ["a, b", "c]"], "neg": []}"#,
    r#"{"query":"q3 \"x\" \\","pos":["p{"],"neg":["n"],"pos_scores":[1],"neg_scores":[0.5]}"#,
    r#"{"query":"é","pos":["naïve"],"neg":["b","c"],"prompt":"Judge.","extra":1}"#,
];

/// Rejected rows (balanced brackets, so that they are one element in an array too).
const INVALID: &[&str] = &[
    "{not json}",
    "[1, 2]",
    r#"{"query":"q"}"#,
    r#"{"query":"q","pos":[],"neg":["b"]}"#,
];

const BOM: &str = "\u{feff}";

fn pick<'a>(rng: &mut KeyedRng, from: &[&'a str]) -> &'a str {
    from[rng.below(from.len() as u64) as usize]
}

/// A row of a JSON lines file: mostly valid, sometimes with a BOM in front (a file
/// concatenated from Windows files) or leading whitespace.
fn line_row(rng: &mut KeyedRng) -> String {
    let row = if rng.below(4) == 0 {
        pick(rng, INVALID)
    } else {
        pick(rng, VALID)
    };
    match rng.below(10) {
        0 => format!("{BOM}{row}"),
        1 => format!("  {row}"),
        _ => row.to_string(),
    }
}

/// JSON lines: optional BOM, LF, CRLF or both, blank and whitespace-only lines (also first,
/// right after the BOM, and last), a trailing newline or not.
fn lines_text(rng: &mut KeyedRng) -> String {
    let crlf = rng.below(3);
    let eol = |rng: &mut KeyedRng| match crlf {
        0 => "\n",
        1 => "\r\n",
        _ => ["\n", "\r\n"][rng.below(2) as usize],
    };
    let blank = |rng: &mut KeyedRng| pick(rng, &["", " ", "\t", "  \t "]).to_string();
    let mut text = String::new();
    if rng.below(3) == 0 {
        text.push_str(BOM);
    }
    for _ in 0..rng.below(4).saturating_sub(1) {
        text += &(blank(rng) + eol(rng));
    }
    let rows = 1 + rng.below(4);
    for i in 0..rows {
        text += &line_row(rng);
        if i + 1 < rows || rng.below(3) > 0 {
            text += eol(rng);
        }
        if rng.below(4) == 0 {
            text += &blank(rng);
            if i + 1 < rows || rng.below(2) == 0 {
                text += eol(rng);
            }
        }
    }
    text
}

/// One JSON array: optional BOM and leading blank lines, elements separated by `,` and some
/// whitespace, sometimes an empty element (`,,`, a trailing `,`) or an invalid one.
fn array_text(rng: &mut KeyedRng) -> String {
    let ws = |rng: &mut KeyedRng| pick(rng, &["", " ", "\n", "\r\n  ", "\n\t"]);
    let mut text = String::new();
    if rng.below(3) == 0 {
        text.push_str(BOM);
    }
    text += pick(rng, &["", "\n", " \r\n"]);
    text.push('[');
    let n = 1 + rng.below(4);
    for i in 0..n {
        text += ws(rng);
        text += if rng.below(5) == 0 {
            pick(rng, INVALID)
        } else {
            pick(rng, VALID)
        };
        text += ws(rng);
        if i + 1 < n {
            text.push(',');
            if rng.below(8) == 0 {
                text.push(',');
            }
        }
    }
    if rng.below(8) == 0 {
        text.push(',');
    }
    text.push(']');
    text += pick(rng, &["", "\n", "\r\n", " \n\n"]);
    text
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

/// Write a random set of 1-5 input files into `dir`: `.jsonl`, `.json` holding lines or an
/// array, `.jsonl.gz`, and (when `parquet`) small Parquet text files of 1-3 row groups.
fn file_set(rng: &mut KeyedRng, dir: &Path, parquet: bool) -> Vec<PathBuf> {
    let files = 1 + rng.below(5);
    (0..files)
        .map(|i| {
            let kind = rng.below(if parquet { 10 } else { 9 });
            let (name, bytes) = match kind {
                0..=3 => (format!("{i}.jsonl"), lines_text(rng).into_bytes()),
                4 | 5 => (format!("{i}.json"), lines_text(rng).into_bytes()),
                6 => (format!("{i}.json"), array_text(rng).into_bytes()),
                7 | 8 => (format!("{i}.jsonl.gz"), gzip(lines_text(rng).as_bytes())),
                _ => {
                    let path = dir.join(format!("{i}.parquet"));
                    let rows: Vec<serde_json::Value> = (0..1 + rng.below(6))
                        .map(|_| {
                            let mut r: serde_json::Value =
                                serde_json::from_str(pick(rng, VALID)).unwrap();
                            if rng.below(5) == 0 {
                                r["pos"] = serde_json::json!([]);
                            }
                            r
                        })
                        .collect();
                    text_parquet_row_groups(&path, &rows, 1 + rng.below(3) as usize);
                    return path;
                }
            };
            let path = dir.join(name);
            std::fs::write(&path, bytes).unwrap();
            path
        })
        .collect()
}

/// N values for `total` input bytes: 1, 2, a few, about the total (one less, equal or one
/// more), and up to twice it.
fn n_values(rng: &mut KeyedRng, total: u64) -> Vec<usize> {
    let t = total.max(1);
    let mut ns = vec![
        1,
        2,
        3 + rng.below(6),
        t - 1 + rng.below(3),
        t + 1 + rng.below(t),
    ];
    ns.retain(|&n| n > 0);
    ns.sort_unstable();
    ns.dedup();
    ns.into_iter().map(|n| n as usize).collect()
}

/// A record, owned, for comparison (Parquet rows as parsed).
#[derive(Debug, Clone, PartialEq)]
enum Rec {
    Row(Vec<u8>, InputPosition),
    Blank,
    Broken(RowError),
    TooLong(InputPosition, u64),
    Parquet(Result<InputRow<'static>, RowError>),
}

/// Everything a conversion reads of each source, in order, according to its part.
fn records(sources: &[SourceFile]) -> Vec<Vec<Rec>> {
    sources
        .iter()
        .map(|src| {
            let mut out = Vec::new();
            if src.layout == source::Layout::Parquet {
                let groups = match &src.part {
                    Part::Nothing => return out,
                    Part::RowGroups(g) => Some(&g[..]),
                    _ => None,
                };
                let mut unknown = Default::default();
                read_parquet_rows(&src.path, groups, &mut unknown, &mut |r| {
                    out.push(Rec::Parquet(r));
                    true
                })
                .unwrap();
                return out;
            }
            source::read_records(src, Arc::default(), DEFAULT_MAX_LINE_BYTES, &mut |r| {
                out.push(match r {
                    Record::Row(b, p) => Rec::Row(b.to_vec(), p),
                    Record::Blank => Rec::Blank,
                    Record::Broken(e) => Rec::Broken(e),
                    Record::TooLong(p, n) => Rec::TooLong(p, n),
                });
                true
            })
            .unwrap();
            out
        })
        .collect()
}

/// The records of shards `0..n`, one after the other, per source.
fn sharded_records(sources: &[SourceFile], n: usize) -> Vec<Vec<Rec>> {
    let mut all = vec![Vec::new(); sources.len()];
    for k in 0..n {
        let mut mine = sources.to_vec();
        source::plan_shard(&mut mine, k, n).unwrap();
        for (a, r) in all.iter_mut().zip(records(&mine)) {
            a.extend(r);
        }
    }
    all
}

/// Level 1 on one file set: the N values where the shards' records differ from the whole's.
fn level1(inputs: &[PathBuf], ns: &[usize]) -> Vec<usize> {
    let sources = source::discover(inputs).unwrap();
    let whole = records(&sources);
    ns.iter()
        .copied()
        .filter(|&n| sharded_records(&sources, n) != whole)
        .collect()
}

fn total_bytes(inputs: &[PathBuf]) -> u64 {
    inputs
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum()
}

/// The file set of issue 17, finding 1: `b.jsonl` is `a.jsonl` with a BOM in front, so with
/// N = 2 the boundary (byte 1 of `b.jsonl`) falls inside the BOM.
fn bom_pair(dir: &Path) -> Vec<PathBuf> {
    let a: String = VALID[..3].iter().map(|r| format!("{r}\n")).collect();
    let (pa, pb) = (dir.join("a.jsonl"), dir.join("b.jsonl"));
    std::fs::write(&pa, &a).unwrap();
    std::fs::write(&pb, format!("{BOM}{a}")).unwrap();
    vec![pa, pb]
}

/// Issue 17, finding 1: shard 0 read nothing of `b.jsonl` (its budget, reduced by the BOM,
/// was 0) and shard 1 skipped line 1 as straddling its start: 5 groups merged instead of 6.
/// The first line starts at byte 0, BOM included, and belongs to the shard holding byte 0.
#[test]
fn a_shard_boundary_inside_a_byte_order_mark_keeps_the_first_line() {
    let dir = tempfile::tempdir().unwrap();
    let inputs = bom_pair(dir.path());
    let total = total_bytes(&inputs);
    let a_len = std::fs::metadata(&inputs[0]).unwrap().len();
    assert_eq!(
        source::plan_shard(&mut source::discover(&inputs).unwrap(), 0, 2).unwrap(),
        Vec::<String>::new()
    );
    assert_eq!(total / 2, a_len + 1, "N = 2 cuts b.jsonl inside its BOM");
    // Every N up to twice the length: boundaries at each byte of the BOM, and everywhere else.
    let ns: Vec<usize> = (1..=2 * total as usize).collect();
    assert_eq!(
        level1(&inputs, &ns),
        Vec::<usize>::new(),
        "N with differences"
    );
    // End to end: 6 groups, in the single conversion and in the merge of 2 (and 3) shards.
    let tok = tokenizer();
    let whole = dir.path().join("whole");
    let m = convert_into(&tok, &inputs, &whole, None, OnError::Fail).unwrap();
    assert_eq!(m.counts.groups, 6);
    for n in [2, 3] {
        let merged = shard_and_merge(&tok, &inputs, dir.path(), n, OnError::Fail).unwrap();
        same_dataset(&whole, &merged);
        rankfeed::Dataset::open(&merged)
            .unwrap()
            .validate()
            .unwrap();
    }
}

/// Run `f` on another thread; fail (instead of hanging) if it takes longer than `limit`.
fn within<T: Send + 'static>(
    limit: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(f()));
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("{what} took more than {limit:?}"))
}

/// Issue 17, finding 2: the owner of a file's first byte (or of a row group's) was found by a
/// scan over the N shards, so `--shard K/N` with a huge N on a compressed file, a JSON array
/// or a Parquet file hung. It is closed-form now: planning costs O(files + row groups).
#[test]
fn shard_planning_costs_the_same_for_any_number_of_shards() {
    let dir = tempfile::tempdir().unwrap();
    let rows: Vec<serde_json::Value> = VALID
        .iter()
        .map(|r| serde_json::from_str(r).unwrap())
        .collect();
    let pq = dir.path().join("c.parquet");
    text_parquet_row_groups(&pq, &rows, 1);
    let gz = dir.path().join("a.jsonl.gz");
    std::fs::write(&gz, gzip(lines_text(&mut KeyedRng::new(&[7])).as_bytes())).unwrap();
    let arr = dir.path().join("b.json");
    std::fs::write(&arr, array_text(&mut KeyedRng::new(&[8]))).unwrap();
    let inputs = vec![gz, arr, pq];
    let total = total_bytes(&inputs);
    let rows = VALID.len() as u64;
    let sources = source::discover(&inputs).unwrap();
    let whole = records(&sources);
    // The largest N the CLI and the library accept is usize::MAX.
    for n in [1_000_000_000_000usize, usize::MAX / 3, usize::MAX] {
        let sources = sources.clone();
        let (plans, took) = within(Duration::from_secs(20), "planning", move || {
            let t = Instant::now();
            // The shards that own each file's first byte and each row group's, and others.
            // Shard j holds bytes total * j / n .. total * (j + 1) / n.
            let bound = |j: usize| (total as u128 * j as u128 / n as u128) as u64;
            let owner = |at: u64| {
                let j = (((at as u128 + 1) * n as u128 - 1) / total as u128) as usize;
                assert!(
                    bound(j) <= at && at < bound(j + 1),
                    "the test's owner of {at}"
                );
                j
            };
            let mut ks: Vec<usize> = vec![0, 1, n / 2, n - 2, n - 1];
            let mut at = 0u64;
            for s in &sources {
                let groups = if s.layout == source::Layout::Parquet {
                    rows
                } else {
                    1
                };
                for g in 0..groups {
                    let o = owner(at + s.bytes * g / groups);
                    ks.extend([o.saturating_sub(1), o, (o + 1).min(n - 1)]);
                }
                at += s.bytes;
            }
            ks.sort_unstable();
            ks.dedup();
            let plans: Vec<Vec<SourceFile>> = ks
                .iter()
                .map(|&k| {
                    let mut mine = sources.clone();
                    source::plan_shard(&mut mine, k, n).unwrap();
                    mine
                })
                .collect();
            (plans, t.elapsed())
        });
        assert!(
            took < Duration::from_secs(1),
            "N = {n}: planning took {took:?}"
        );
        // Each file (and row group) is planned for exactly one of those shards.
        let mut got = vec![Vec::new(); whole.len()];
        for plan in &plans {
            for (g, r) in got.iter_mut().zip(records(plan)) {
                g.extend(r);
            }
        }
        assert_eq!(got, whole, "N = {n}");
    }
    // And end to end, through `convert`.
    let tok = Arc::new(tokenizer());
    let out = dir.path().join("last");
    let took = within(Duration::from_secs(60), "convert", move || {
        let t = Instant::now();
        let m = convert_into(
            &tok,
            &inputs,
            &out,
            Some((usize::MAX - 1, usize::MAX)),
            OnError::Skip,
        );
        (m.unwrap(), t.elapsed())
    });
    println!(
        "convert --shard {}/{}: {:?}",
        usize::MAX - 1,
        usize::MAX,
        took.1
    );
}

/// Level 1: the reader, over random file sets and N values.
#[test]
fn random_file_sets_read_the_same_records_sharded_or_whole() {
    let sets = 500 * support::long() as usize;
    let (mut checked, mut failed_sets, mut failed_ns) = (0usize, 0usize, Vec::new());
    let start = Instant::now();
    for set in 0..sets as u64 {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = KeyedRng::new(&[17, 1, set]);
        let inputs = file_set(&mut rng, dir.path(), set % 8 == 0);
        let ns = n_values(&mut rng, total_bytes(&inputs));
        checked += ns.len();
        let bad = level1(&inputs, &ns);
        if !bad.is_empty() {
            failed_sets += 1;
            if failed_ns.len() < 5 {
                failed_ns.push(format!("set {set} N {bad:?}: {inputs:?}"));
            }
        }
    }
    println!(
        "shards level 1: {sets} file sets x {checked} N values in {:.1} s, {failed_sets} file sets with differences",
        start.elapsed().as_secs_f64()
    );
    assert!(failed_ns.is_empty(), "{}", failed_ns.join("\n"));
}

/// Level 2: convert every shard, merge, compare with the single conversion.
#[test]
fn random_file_sets_shard_and_merge_into_the_single_conversion() {
    let sets = 30 * support::long() as usize;
    let tok = tokenizer();
    let (mut runs, mut failures) = (0usize, Vec::new());
    let start = Instant::now();
    for set in 0..sets as u64 {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = KeyedRng::new(&[17, 2, set]);
        let inputs = file_set(&mut rng, dir.path(), true);
        let total = total_bytes(&inputs) as usize;
        let whole = dir.path().join("whole");
        convert_into(&tok, &inputs, &whole, None, OnError::Skip).unwrap();
        let mut ns = vec![2, 3 + rng.below(6) as usize];
        if set % 8 == 0 {
            ns.push(9 + rng.below(total as u64) as usize % 56);
        }
        for n in ns {
            runs += 1;
            let diff = match shard_and_merge(&tok, &inputs, dir.path(), n, OnError::Skip) {
                Ok(merged) => dataset_differences(&whole, &merged),
                Err(e) => vec![e.to_string()],
            };
            if !diff.is_empty() {
                failures.push(format!("set {set} N {n}: {inputs:?}: {}", diff.join("; ")));
            }
        }
    }
    println!(
        "shards level 2: {sets} file sets, {runs} sharded conversions merged in {:.1} s, {} differences",
        start.elapsed().as_secs_f64(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{}",
        failures[..failures.len().min(5)].join("\n")
    );
}
