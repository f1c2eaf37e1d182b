//! A seeded random-mutation fuzzer for the JSON row parser and the input reader (stable Rust,
//! bounded, run in CI). Mutations: byte flips, insertions of multi-byte UTF-8 (accents, smart
//! quotes, emoji, byte order marks, line separators), JSON punctuation, huge and non-finite
//! number literals, truncations, deleted and duplicated ranges.
//!
//! Properties, for every mutated row:
//! - no panic;
//! - accepted rows equal what the reference (slow) path gives, field for field, and carry the
//!   same unknown-field counts;
//! - rejected rows name the file and line they came from, with a reason.
//!
//! For mutated whole files through `convert --on-error skip`: no panic, and every row read is
//! accounted for (accepted + rejected = read; rejects.jsonl has one line per rejected row).
//!
//! Figures are printed (run with `--nocapture`, or `tools/integrity_report.sh`).

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use rankfeed::convert::row::{parse_row, parse_row_reference};
use rankfeed::convert::{convert, ConvertOptions, OnError};
use rankfeed::sample::KeyedRng;
use rankfeed::tokenizer::TextTokenizer;
use rankfeed::{Dataset, InputPosition};

const ROWS: usize = 200_000;
const FILES: usize = 400;

const INSERTS: &[&str] = &[
    "é",
    "\u{201c}",
    "\u{201d}",
    "😀",
    "\u{feff}",
    "\u{2028}",
    "\u{0}",
    "\\",
    "\\u",
    "\\ud800",
    "\"",
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "null",
    "true",
    "NaN",
    "-Infinity",
    "1e400",
    "-0",
    "1e38",
    "3.5e38",
    "\n",
    "\r",
    " ",
    "\"query\":",
    "\"pos_scores\":[1e999],",
];

fn fixture_rows() -> Vec<Vec<u8>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("tests/fixtures/roundtrip.jsonl")).unwrap();
    let mut rows: Vec<Vec<u8>> = text.lines().map(|l| l.as_bytes().to_vec()).collect();
    rows.push(
        br#"{"query":"q \"x\" \u00e9","pos":["a\nb"],"neg":["c"],"pos_scores":[1],"neg_scores":[0.25],"prompt":"p","query_prompt":null,"passage_prompt":"pp","z":[1,{"a":2}]}"#
            .to_vec(),
    );
    rows
}

fn mutate(rng: &mut KeyedRng, row: &[u8]) -> Vec<u8> {
    let mut b = row.to_vec();
    for _ in 0..1 + rng.below(3) {
        let at = |rng: &mut KeyedRng, b: &Vec<u8>| rng.below(b.len() as u64 + 1) as usize;
        match rng.below(7) {
            0 if !b.is_empty() => {
                let i = rng.below(b.len() as u64) as usize;
                b[i] = rng.below(256) as u8;
            }
            1 | 2 => {
                let i = at(rng, &b);
                let s = INSERTS[rng.below(INSERTS.len() as u64) as usize];
                b.splice(i..i, s.bytes());
            }
            3 => {
                let i = at(rng, &b);
                b.truncate(i);
            }
            4 => {
                b.splice(0..0, "\u{feff}".bytes());
            }
            5 => {
                let (i, j) = (at(rng, &b), at(rng, &b));
                b.drain(i.min(j)..i.max(j));
            }
            _ => {
                let (i, j) = (at(rng, &b), at(rng, &b));
                let piece = b[i.min(j)..i.max(j)].to_vec();
                let k = at(rng, &b);
                b.splice(k..k, piece);
            }
        }
    }
    b
}

#[test]
fn mutated_rows_never_panic_and_agree_with_the_reference_path() {
    let rows = fixture_rows();
    let mut rng = KeyedRng::new(&[0xf022]);
    let position = InputPosition {
        path: PathBuf::from("fuzz.jsonl"),
        line: 42,
        element: None,
    };
    let (mut accepted, mut rejected) = (0u64, 0u64);
    let mut by_reason: BTreeMap<String, u64> = BTreeMap::new();
    for n in 0..ROWS {
        let row = &rows[n % rows.len()];
        let bad = mutate(&mut rng, row);
        let result = catch_unwind(AssertUnwindSafe(|| {
            let (mut u1, mut u2) = (BTreeMap::new(), BTreeMap::new());
            let fast = parse_row(&bad, &position, &mut u1);
            let slow = parse_row_reference(&bad, &position, &mut u2);
            match fast {
                Ok(row) => {
                    let slow = slow.unwrap_or_else(|e| {
                        panic!("accepted by the fast path, rejected by the reference: {e}")
                    });
                    assert_eq!(row, slow, "fast and reference paths differ");
                    assert_eq!(u1, u2, "unknown-field counts differ");
                    Ok(())
                }
                Err(e) => {
                    assert_eq!(e.position, position, "a rejection must say where");
                    Err(e.reason.as_str())
                }
            }
        }));
        match result {
            Ok(Ok(())) => accepted += 1,
            Ok(Err(reason)) => {
                rejected += 1;
                *by_reason.entry(reason.into()).or_default() += 1;
            }
            Err(_) => panic!(
                "mutated row {n} made the parser panic or disagree: {:?}",
                String::from_utf8_lossy(&bad)
            ),
        }
    }
    eprintln!(
        "fuzz rows: {ROWS} mutated rows, {accepted} accepted (fast == reference), {rejected} rejected with file:line, 0 panics; by reason {by_reason:?}"
    );
    assert_eq!(accepted + rejected, ROWS as u64);
    assert!(
        accepted > 1000 && rejected > 1000,
        "mutations too weak or too strong"
    );
}

fn tokenizer() -> TextTokenizer {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sample/bert/tokenizer.json");
    TextTokenizer::from_file(p).unwrap()
}

#[test]
fn mutated_files_convert_under_skip_with_every_row_accounted_for() {
    let tok = tokenizer();
    let rows = fixture_rows();
    let dir = tempfile::tempdir().unwrap();
    let mut rng = KeyedRng::new(&[0xf11e]);
    let (mut converted, mut failed_whole, mut rows_read, mut rows_rejected) = (0, 0, 0u64, 0u64);
    for n in 0..FILES {
        let mut text = Vec::new();
        if rng.below(4) == 0 {
            text.extend_from_slice("\u{feff}".as_bytes());
        }
        let array = rng.below(5) == 0;
        if array {
            text.push(b'[');
        }
        for k in 0..1 + rng.below(12) {
            if k > 0 && array {
                text.push(b',');
            }
            let row = &rows[rng.below(rows.len() as u64) as usize];
            if rng.below(3) == 0 {
                text.extend(mutate(&mut rng, row));
            } else {
                text.extend_from_slice(row);
            }
            text.push(b'\n');
        }
        if array {
            text.push(b']');
        }
        if rng.below(6) == 0 {
            let cut = rng.below(text.len() as u64) as usize;
            text.truncate(cut);
        }
        let name = if array { "in.json" } else { "in.jsonl" };
        let input = dir.path().join(format!("{n}-{name}"));
        std::fs::write(&input, &text).unwrap();
        let out = dir.path().join(format!("out-{n}"));
        let options = ConvertOptions {
            on_error: OnError::Skip,
            max_line_bytes: 1 << 12,
            ..ConvertOptions::default()
        };
        let result = catch_unwind(AssertUnwindSafe(|| {
            convert(
                std::slice::from_ref(&input),
                &tok,
                &out,
                &options,
                &mut |_| {},
            )
        }));
        match result {
            Err(_) => panic!(
                "file {n} made convert panic: {:?}",
                String::from_utf8_lossy(&text)
            ),
            Ok(Err(e)) => {
                // Only a file with no rows at all may fail as a whole under skip.
                assert!(e.to_string().contains("no rows"), "file {n}: {e}");
                assert!(!out.exists());
                failed_whole += 1;
            }
            Ok(Ok(report)) => {
                converted += 1;
                let s = &report.manifest.sources[0];
                assert_eq!(s.rows_read, s.rows_accepted + s.rows_rejected, "file {n}");
                let listed = std::fs::read_to_string(out.join("rejects.jsonl"))
                    .map(|t| t.lines().count() as u64)
                    .unwrap_or(0);
                assert_eq!(listed, s.rows_rejected, "file {n}: rejects.jsonl");
                let ds = Dataset::open(&out).unwrap();
                ds.validate().unwrap();
                assert_eq!(ds.len() as u64, s.rows_accepted);
                rows_read += s.rows_read;
                rows_rejected += s.rows_rejected;
                std::fs::remove_dir_all(&out).unwrap();
            }
        }
    }
    eprintln!(
        "fuzz files: {FILES} mutated files, {converted} converted under skip ({rows_read} rows read, {rows_rejected} rejected and listed), {failed_whole} without any row, 0 panics"
    );
    assert!(converted > FILES / 2 && rows_rejected > 0);
}

/// The `batch_size` field (same-source batches): a positive integer or null, the same on
/// both paths; anything else is a `wrong_type` row naming the field.
#[test]
fn batch_size_field_is_a_positive_integer_on_both_paths() {
    let position = InputPosition {
        path: PathBuf::from("t.jsonl"),
        line: 1,
        element: None,
    };
    for (value, want) in [
        ("8", Ok(Some(8))),
        ("1", Ok(Some(1))),
        ("null", Ok(None)),
        ("0", Err(())),
        ("-3", Err(())),
        ("1.5", Err(())),
        ("\"8\"", Err(())),
        ("true", Err(())),
        ("[8]", Err(())),
    ] {
        let row = format!(r#"{{"query": "q", "pos": ["p"], "neg": [], "batch_size": {value}}}"#);
        for (path, got) in [
            (
                "fast",
                parse_row(row.as_bytes(), &position, &mut BTreeMap::new()),
            ),
            (
                "reference",
                parse_row_reference(row.as_bytes(), &position, &mut BTreeMap::new()),
            ),
        ] {
            match (&got, &want) {
                (Ok(r), Ok(b)) => assert_eq!(r.batch_size, *b, "{path} {value}"),
                (Err(e), Err(())) => {
                    assert_eq!(e.field.as_deref(), Some("batch_size"), "{path} {value}");
                    assert_eq!(e.reason.as_str(), "wrong_type", "{path} {value}");
                }
                _ => panic!("{path} {value}: {got:?}"),
            }
        }
    }
}
