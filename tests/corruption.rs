//! The corruption suite: thousands of damaged copies of a converted dataset, by class. Every
//! variant must be either reported corrupt by `Dataset::open` or `Dataset::validate` (verify),
//! or be byte-identical in everything a batch depends on (tokenizer facts, text settings,
//! every group, passage and prompt). Never a panic, never a signal, never a hang (a watchdog
//! aborts the run if one variant takes more than 20 s), never an undetected change.
//!
//! Classes:
//! - `flip:FILE`: 1-3 random bytes of one file set to random values;
//! - `truncate:FILE`: the file cut at a random length;
//! - `zero:FILE`: a 512-byte sector or a 4 KiB page of the file zeroed;
//! - `flip2`: bytes flipped in two files at once;
//! - `manifest-edit`: one manifest field changed by hand, as JSON (template ids, special ids,
//!   flags, vocabulary size, sizes, counts, checksums, removed or added file entries);
//! - `manifest-edit-resealed`: the same kind of edit with the manifest's seal recomputed (a
//!   deliberate forger), limited to edits the data can contradict: ids outside the
//!   vocabulary, impossible template type ids, sizes, counts, checksums, file entries;
//! - `swap`: a file taken from another dataset, or two files of the dataset exchanged;
//! - `special`: a file replaced by a FIFO, a symlink to /dev/zero, a directory, a symlink to
//!   another dataset's file, a symlink to an identical copy (must pass), or removed; a
//!   rejects.jsonl added where the manifest lists none.
//!
//! Figures per class are printed (run with `--nocapture`, or `tools/integrity_report.sh`).

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rankfeed::convert::{convert, ConvertOptions, OnError};
use rankfeed::sample::KeyedRng;
use rankfeed::tokenizer::TextTokenizer;
use rankfeed::Dataset;
use serde_json::Value;

const FILES: [&str; 5] = [
    "manifest.json",
    "groups.arrow",
    "passages.arrow",
    "prompts.arrow",
    "rejects.jsonl",
];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Convert the fixture (plus two bad rows, so that rejects.jsonl exists) into `out`.
fn make_dataset(out: &Path, shift: usize) -> PathBuf {
    let tok = TextTokenizer::from_file(root().join("data/sample/bert/tokenizer.json")).unwrap();
    let text = std::fs::read_to_string(root().join("tests/fixtures/roundtrip.jsonl")).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines.rotate_left(shift);
    let mut input = lines.join("\n");
    input.push_str("\n{\"query\": 1}\n{not json\n");
    let src = out.with_extension("jsonl");
    std::fs::write(&src, input).unwrap();
    let options = ConvertOptions {
        on_error: OnError::Skip,
        writer: rankfeed::writer::WriterOptions {
            rows_per_batch: 16,
            overwrite: false,
        },
        ..ConvertOptions::default()
    };
    convert(&[src], &tok, out, &options, &mut |_| {}).unwrap();
    out.to_path_buf()
}

/// Everything a batch depends on, as bytes.
fn digest(ds: &Dataset) -> rankfeed::Result<Vec<u8>> {
    let m = ds.manifest();
    let mut out = format!(
        "{}\n{}\n",
        serde_json::to_string(&m.tokenizer).unwrap(),
        serde_json::to_string(&m.text).unwrap()
    )
    .into_bytes();
    for r in 0..ds.len() {
        out.extend(format!("{:?}\n", ds.group(r)?).bytes());
    }
    for p in 0..ds.num_passages() {
        out.extend(format!("{:?}\n", ds.passage(p as i32)?).bytes());
    }
    for p in 0..ds.num_prompts() {
        out.extend(format!("{:?}\n", ds.prompt_tokens(p as u32)?).bytes());
    }
    Ok(out)
}

#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    variants: u64,
    at_open: u64,
    at_verify: u64,
    identical: u64,
}

enum Outcome {
    Open,
    Verify,
    Identical,
}

fn check(dir: &Path, original: &[u8]) -> Result<Outcome, String> {
    let ds = match Dataset::open(dir) {
        Ok(ds) => ds,
        Err(e) if e.is_corrupt() => return Ok(Outcome::Open),
        // A missing file is an I/O error at open: reported, not trusted.
        Err(rankfeed::Error::Io { .. }) => return Ok(Outcome::Open),
        Err(e) => return Err(format!("open failed with a non-corruption error: {e}")),
    };
    match ds.validate() {
        Err(e) if e.is_corrupt() => return Ok(Outcome::Verify),
        Err(e) => return Err(format!("verify failed with a non-corruption error: {e}")),
        Ok(()) => {}
    }
    match digest(&ds) {
        Ok(d) if d == original => Ok(Outcome::Identical),
        Ok(_) => Err("UNDETECTED: open and verify pass but the data differs".into()),
        Err(e) => Err(format!("verify passed but reading failed: {e}")),
    }
}

/// A copy of `good` in `dir`: hard links (never written through: a file to change is
/// removed first, then written anew).
fn link_copy(good: &Path, dir: &Path) {
    std::fs::create_dir(dir).unwrap();
    for f in FILES {
        std::fs::hard_link(good.join(f), dir.join(f)).unwrap();
    }
}

fn replace(dir: &Path, name: &str, bytes: &[u8]) {
    let p = dir.join(name);
    let _ = std::fs::remove_file(&p);
    std::fs::write(p, bytes).unwrap();
}

struct Suite {
    good: PathBuf,
    scratch: PathBuf,
    original: Vec<u8>,
    tallies: BTreeMap<String, Tally>,
    n: u64,
    heartbeat: Arc<AtomicU64>,
    start: Instant,
}

impl Suite {
    /// Build a variant with `make`, check it, tally it under `class`.
    fn variant(&mut self, class: &str, make: impl FnOnce(&Path)) {
        self.n += 1;
        let dir = self.scratch.join(format!("v{}", self.n));
        link_copy(&self.good, &dir);
        make(&dir);
        self.heartbeat
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
        let outcome = catch_unwind(AssertUnwindSafe(|| check(&dir, &self.original)))
            .unwrap_or_else(|_| Err("PANIC".into()));
        let t = self.tallies.entry(class.to_string()).or_default();
        t.variants += 1;
        match outcome {
            Ok(Outcome::Open) => t.at_open += 1,
            Ok(Outcome::Verify) => t.at_verify += 1,
            Ok(Outcome::Identical) => t.identical += 1,
            Err(e) => panic!("variant {} ({class}): {e}", self.n),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn bytes(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.good.join(name)).unwrap()
    }
}

fn manifest_edits(m: &Value, rng: &mut KeyedRng) -> Vec<(String, Value)> {
    let vocab = m["tokenizer"]["vocab_size"].as_i64().unwrap();
    let id = |rng: &mut KeyedRng| -> Value {
        match rng.below(5) {
            0 => (-1).into(),
            1 => vocab.into(),
            2 => (vocab + 1 + rng.below(1000) as i64).into(),
            3 => i32::MAX.into(),
            _ => (rng.below(vocab as u64) as i64).into(),
        }
    };
    let mut edits: Vec<(String, Value)> = vec![
        ("/tokenizer/pair_template/0/special/ids/0".into(), id(rng)),
        ("/tokenizer/pair_template/2/special/ids/0".into(), id(rng)),
        ("/tokenizer/single_template/0/special/ids/0".into(), id(rng)),
        (
            "/tokenizer/pair_template/3/sequence/type_id".into(),
            (rng.below(4)).into(),
        ),
        ("/tokenizer/pad_id".into(), id(rng)),
        ("/tokenizer/unk_id".into(), id(rng)),
        ("/tokenizer/eos_id".into(), id(rng)),
        ("/tokenizer/bos_id".into(), id(rng)),
        (
            "/tokenizer/has_token_type_ids".into(),
            (!m["tokenizer"]["has_token_type_ids"].as_bool().unwrap()).into(),
        ),
        (
            "/tokenizer/vocab_size".into(),
            (rng.below(vocab as u64 * 2)).into(),
        ),
        ("/tokenizer/padding_side".into(), "left".into()),
        ("/text/sep_ids/0".into(), id(rng)),
        ("/text/query_instruction".into(), "Query: ".into()),
        ("/rows_per_batch".into(), (1 + rng.below(64)).into()),
        ("/format_version".into(), (rng.below(4)).into()),
        ("/counts/groups".into(), (rng.below(400)).into()),
        ("/counts/passages".into(), (rng.below(2000)).into()),
        ("/counts/prompts".into(), (rng.below(10)).into()),
        ("/sources/0/rows_accepted".into(), (rng.below(400)).into()),
    ];
    for f in &FILES[1..] {
        edits.push((format!("/files/{f}/bytes"), (rng.below(100_000)).into()));
        edits.push((
            format!("/files/{f}/xxh3_64"),
            format!("{:016x}", rng.next_u64()).into(),
        ));
        edits.push((format!("/files/{f}"), Value::Null)); // null = remove the entry
    }
    edits.push((
        "/files/extra.arrow".into(),
        serde_json::json!({"bytes": 0, "xxh3_64": "0000000000000000"}),
    ));
    edits
}

/// Apply a JSON-pointer edit (a `Null` value on a `/files/NAME` pointer removes the entry).
fn apply(m: &mut Value, pointer: &str, value: &Value) -> bool {
    if let Some(name) = pointer.strip_prefix("/files/").filter(|n| !n.contains('/')) {
        let files = m["files"].as_object_mut().unwrap();
        return if value.is_null() {
            files.remove(name).is_some()
        } else {
            files.insert(name.into(), value.clone());
            true
        };
    }
    match m.pointer_mut(pointer) {
        Some(slot) if slot != value => {
            *slot = value.clone();
            true
        }
        _ => false,
    }
}

/// Whether a resealed edit is one the data or the facts can contradict (the rest are
/// forgeries of valid-looking settings, which no checksum stored beside the data can catch).
fn contradictable(pointer: &str, value: &Value, vocab: i64) -> bool {
    let outside = value.as_i64().is_some_and(|v| v < 0 || v >= vocab);
    (pointer.contains("/ids/") || pointer.ends_with("_id") || pointer.contains("sep_ids"))
        && outside
        || pointer.ends_with("type_id") && value.as_u64().is_some_and(|v| v > 1)
        || pointer.starts_with("/files/")
        || pointer.starts_with("/counts/")
            && !pointer.ends_with("prompts")
            && !pointer.ends_with("groups")
        || pointer == "/format_version"
}

#[test]
fn every_corruption_is_detected_or_harmless() {
    let tmp = tempfile::tempdir().unwrap();
    let good = make_dataset(&tmp.path().join("good"), 0);
    let other = make_dataset(&tmp.path().join("other"), 37);
    let scratch = tmp.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    let original = digest(&Dataset::open(&good).unwrap()).unwrap();
    Dataset::open(&good).unwrap().validate().unwrap();

    // Watchdog: a variant that hangs aborts the whole run with a message.
    let heartbeat = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    {
        let heartbeat = heartbeat.clone();
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_secs(1));
            let last = heartbeat.load(Ordering::Relaxed);
            if start.elapsed().as_millis() as u64 > last + 20_000 {
                eprintln!("corruption suite: a variant hung for 20 s");
                std::process::abort();
            }
        });
    }
    let mut s = Suite {
        good: good.clone(),
        scratch,
        original,
        tallies: BTreeMap::new(),
        n: 0,
        heartbeat,
        start,
    };
    let mut rng = KeyedRng::new(&[0xc022]);

    for f in FILES {
        let bytes = s.bytes(f);
        for _ in 0..1200 {
            let mut b = bytes.clone();
            for _ in 0..1 + rng.below(3) {
                let at = rng.below(b.len() as u64) as usize;
                b[at] = rng.below(256) as u8;
            }
            s.variant(&format!("flip:{f}"), |d| replace(d, f, &b));
        }
        for _ in 0..200 {
            let cut = rng.below(bytes.len() as u64) as usize;
            s.variant(&format!("truncate:{f}"), |d| replace(d, f, &bytes[..cut]));
        }
        for _ in 0..200 {
            let size = if rng.below(2) == 0 { 512 } else { 4096 };
            let blocks = bytes.len().div_ceil(size) as u64;
            let at = rng.below(blocks) as usize * size;
            let mut b = bytes.clone();
            let end = (at + size).min(b.len());
            b[at..end].fill(0);
            s.variant(&format!("zero:{f}"), |d| replace(d, f, &b));
        }
    }
    for _ in 0..500 {
        let (i, j) = (rng.below(5) as usize, rng.below(5) as usize);
        let (fa, fb) = (FILES[i], FILES[j]);
        let (mut a, mut b) = (s.bytes(fa), s.bytes(fb));
        let ia = rng.below(a.len() as u64) as usize;
        a[ia] ^= 1 + rng.below(255) as u8;
        let ib = rng.below(b.len() as u64) as usize;
        b[ib] ^= 1 + rng.below(255) as u8;
        s.variant("flip2", |d| {
            replace(d, fa, &a);
            if fa != fb {
                replace(d, fb, &b);
            }
        });
    }

    let manifest: Value = serde_json::from_slice(&s.bytes("manifest.json")).unwrap();
    let vocab = manifest["tokenizer"]["vocab_size"].as_i64().unwrap();
    let (mut edits_done, mut resealed_done) = (0, 0);
    while edits_done < 1000 || resealed_done < 600 {
        for (pointer, value) in manifest_edits(&manifest, &mut rng) {
            let mut m = manifest.clone();
            if !apply(&mut m, &pointer, &value) {
                continue;
            }
            let plain = serde_json::to_vec_pretty(&m).unwrap();
            if edits_done < 1000 {
                edits_done += 1;
                s.variant("manifest-edit", |d| replace(d, "manifest.json", &plain));
            }
            if resealed_done < 600 && contradictable(&pointer, &value, vocab) {
                resealed_done += 1;
                let mut sealed = plain.clone();
                rankfeed::format::reseal(&mut sealed).unwrap();
                s.variant("manifest-edit-resealed", |d| {
                    replace(d, "manifest.json", &sealed)
                });
            }
        }
    }

    let other_dir = other.clone();
    for f in FILES {
        let theirs = std::fs::read(other_dir.join(f)).unwrap();
        s.variant("swap", |d| replace(d, f, &theirs));
        for g in FILES {
            if f < g {
                let (a, b) = (s.bytes(f), s.bytes(g));
                s.variant("swap", |d| {
                    replace(d, f, &b);
                    replace(d, g, &a);
                });
            }
        }
    }

    for f in FILES {
        s.variant("special", |d| {
            std::fs::remove_file(d.join(f)).unwrap();
            rustix::fs::mknodat(
                rustix::fs::CWD,
                d.join(f),
                rustix::fs::FileType::Fifo,
                rustix::fs::Mode::from_raw_mode(0o644),
                0,
            )
            .unwrap();
        });
        s.variant("special", |d| {
            std::fs::remove_file(d.join(f)).unwrap();
            std::os::unix::fs::symlink("/dev/zero", d.join(f)).unwrap();
        });
        s.variant("special", |d| {
            std::fs::remove_file(d.join(f)).unwrap();
            std::fs::create_dir(d.join(f)).unwrap();
        });
        s.variant("special", |d| {
            std::fs::remove_file(d.join(f)).unwrap();
            std::os::unix::fs::symlink(other_dir.join(f), d.join(f)).unwrap();
        });
        let copy = s.scratch.join(format!("copy-{f}"));
        std::fs::copy(good.join(f), &copy).unwrap();
        s.variant("special", |d| {
            std::fs::remove_file(d.join(f)).unwrap();
            std::os::unix::fs::symlink(&copy, d.join(f)).unwrap();
        });
        s.variant("special", |d| std::fs::remove_file(d.join(f)).unwrap());
    }
    // A rejects.jsonl where the manifest lists none.
    let no_rejects = tmp.path().join("clean");
    {
        let tok = TextTokenizer::from_file(root().join("data/sample/bert/tokenizer.json")).unwrap();
        convert(
            &[root().join("tests/fixtures/roundtrip.jsonl")],
            &tok,
            &no_rejects,
            &ConvertOptions::default(),
            &mut |_| {},
        )
        .unwrap();
        std::fs::write(no_rejects.join("rejects.jsonl"), "{}\n").unwrap();
        assert!(Dataset::open(&no_rejects).unwrap_err().is_corrupt());
        s.tallies.entry("special".into()).or_default().variants += 1;
        s.tallies.entry("special".into()).or_default().at_open += 1;
    }

    let mut total = Tally::default();
    eprintln!("corruption suite ({} s):", start.elapsed().as_secs());
    eprintln!(
        "  {:<28} {:>8} {:>9} {:>11} {:>10} {:>10}",
        "class", "variants", "at open", "at verify", "identical", "undetected"
    );
    for (class, t) in &s.tallies {
        eprintln!(
            "  {class:<28} {:>8} {:>9} {:>11} {:>10} {:>10}",
            t.variants, t.at_open, t.at_verify, t.identical, 0
        );
        total.variants += t.variants;
        total.at_open += t.at_open;
        total.at_verify += t.at_verify;
        total.identical += t.identical;
    }
    eprintln!(
        "  {:<28} {:>8} {:>9} {:>11} {:>10} {:>10}   (0 panics, 0 signals, 0 hangs)",
        "total", total.variants, total.at_open, total.at_verify, total.identical, 0
    );
    assert!(total.variants >= 10_000, "{} variants", total.variants);
    // A changed byte is never trusted: only no-op mutations may come out identical.
    assert!(total.identical < total.variants / 50, "{total:?}");
}
