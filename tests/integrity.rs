//! One regression test per observation of the adversarial run on the write path (issue 9):
//! each failed before the fix. Crash and kill tests of publishing (observations 5 and 6 under
//! a real process) are in `tools/cli/tests/crash.rs`; the random suites in `fuzz_rows.rs`
//! and `corruption.rs`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rankfeed::convert::{convert, ConvertOptions, ConvertReport, OnError};
use rankfeed::tokenizer::TextTokenizer;
use rankfeed::writer::{DatasetWriter, GroupRecord, ManifestInfo, WriterOptions};
use rankfeed::{Dataset, Error};
use serde_json::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn tokenizer() -> TextTokenizer {
    TextTokenizer::from_file(root().join("data/sample/bert/tokenizer.json")).unwrap()
}

fn run(input: &Path, out: &Path, on_error: OnError) -> rankfeed::Result<ConvertReport> {
    let options = ConvertOptions {
        on_error,
        ..ConvertOptions::default()
    };
    convert(
        &[input.to_path_buf()],
        &tokenizer(),
        out,
        &options,
        &mut |_| {},
    )
}

fn small_dataset(dir: &Path, name: &str) -> PathBuf {
    let out = dir.join(name);
    run(
        &root().join("tests/fixtures/roundtrip.jsonl"),
        &out,
        OnError::Fail,
    )
    .unwrap();
    out
}

fn read_manifest(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

fn write_manifest(dir: &Path, m: &Value, reseal: bool) {
    let mut bytes = serde_json::to_vec_pretty(m).unwrap();
    if reseal {
        rankfeed::format::reseal(&mut bytes).unwrap();
    }
    std::fs::write(dir.join("manifest.json"), bytes).unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

const ROW: &str = r#"{"query": "q", "pos": ["a cat"], "neg": ["a dog"]}"#;

/// Observation 1: a BOM, or non-ASCII outside a string, panicked the prepare thread and
/// killed the conversion even under `--on-error skip`.
#[test]
fn obs1_bom_and_non_ascii_outside_strings_do_not_panic_convert() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let text = format!(
        "\u{feff}{ROW}\n{{\"query\": café, \"pos\": [\"a\"], \"neg\": []}}\n{{\u{201c}query\u{201d}: \u{201c}q\u{201d}}}\n\u{feff}{ROW}\n{ROW}\n"
    );
    std::fs::write(&input, text).unwrap();
    let report = run(&input, &dir.path().join("out"), OnError::Skip).unwrap();
    let s = &report.manifest.sources[0];
    assert_eq!((s.rows_read, s.rows_accepted, s.rows_rejected), (5, 3, 2));
    assert_eq!(s.rejected_by_reason["invalid_json"], 2);
    let rejects = std::fs::read_to_string(dir.path().join("out/rejects.jsonl")).unwrap();
    let lines: Vec<u64> = rejects
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["line"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(lines, vec![2, 3]);
    // Under the fail policy, the same file is an error that says where, not a panic.
    let err = run(&input, &dir.path().join("out2"), OnError::Fail).unwrap_err();
    assert!(err.to_string().contains("in.jsonl:2"), "{err}");
    // A JSON array file with a BOM.
    let array = dir.path().join("in.json");
    std::fs::write(&array, format!("\u{feff}[{ROW}, {ROW}]")).unwrap();
    let report = run(&array, &dir.path().join("out3"), OnError::Fail).unwrap();
    assert_eq!(report.manifest.counts.groups, 2);
}

/// Observation 2: one byte of manifest.json changed what the model sees and verify passed.
#[test]
fn obs2_a_changed_manifest_byte_is_caught_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let good = small_dataset(dir.path(), "good");
    let text = std::fs::read_to_string(good.join("manifest.json")).unwrap();
    // 101 ([CLS]) -> 901 in the pair template, as a byte edit.
    let at = text.find("\"pair_template\"").unwrap();
    let cls = at + text[at..].find("101").unwrap();
    let mut bytes = text.clone().into_bytes();
    bytes[cls] = b'9';
    let bad = dir.path().join("byte");
    copy_dir(&good, &bad);
    std::fs::write(bad.join("manifest.json"), &bytes).unwrap();
    let err = Dataset::open(&bad).unwrap_err();
    assert!(
        err.is_corrupt() && err.to_string().contains("checksum"),
        "{err}"
    );
    // has_token_type_ids flipped, and pair_template [-1], as JSON edits.
    let m = read_manifest(&good);
    for edit in [
        "/tokenizer/has_token_type_ids",
        "/tokenizer/pair_template/0/special/ids/0",
    ] {
        let mut e = m.clone();
        let slot = e.pointer_mut(edit).unwrap();
        *slot = match slot {
            Value::Bool(b) => Value::Bool(!*b),
            _ => Value::from(-1),
        };
        let bad = dir.path().join(edit.replace('/', "_"));
        copy_dir(&good, &bad);
        write_manifest(&bad, &e, false);
        assert!(Dataset::open(&bad).unwrap_err().is_corrupt(), "{edit}");
        // Even with the seal recomputed, an id outside the vocabulary fails: at open, where
        // the tokenizer facts are checked (issue 17: it used to pass open and fail verify).
        if edit.ends_with("ids/0") {
            write_manifest(&bad, &e, true);
            let err = Dataset::open(&bad).unwrap_err();
            assert!(err.to_string().contains("outside the vocabulary"), "{err}");
        }
    }
}

/// Observation 3: checksum entries were optional, a swapped groups.arrow trained on the
/// wrong queries, and token ids were never checked against the vocabulary.
#[test]
fn obs3_every_file_needs_its_entry_and_ids_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let good = small_dataset(dir.path(), "good");
    let m = read_manifest(&good);
    for name in ["groups.arrow", "passages.arrow", "prompts.arrow"] {
        let mut e = m.clone();
        e["files"].as_object_mut().unwrap().remove(name);
        let bad = dir.path().join(format!("no-{name}"));
        copy_dir(&good, &bad);
        write_manifest(&bad, &e, true);
        let err = Dataset::open(&bad).unwrap_err();
        assert!(err.to_string().contains("records no size"), "{err}");
    }
    // groups.arrow from another dataset (same size would pass open; the checksum catches it).
    let other = dir.path().join("other.jsonl");
    let text = std::fs::read_to_string(root().join("tests/fixtures/roundtrip.jsonl")).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines.swap(0, 1);
    std::fs::write(&other, lines.join("\n")).unwrap();
    let other_ds = dir.path().join("other");
    run(&other, &other_ds, OnError::Fail).unwrap();
    let bad = dir.path().join("swapped");
    copy_dir(&good, &bad);
    std::fs::copy(other_ds.join("groups.arrow"), bad.join("groups.arrow")).unwrap();
    let err = Dataset::open(&bad)
        .and_then(|ds| ds.validate())
        .unwrap_err();
    assert!(err.is_corrupt(), "{err}");
    // A token id beyond the vocabulary, written through the library's own writer.
    let out = dir.path().join("big-id");
    let mut w = DatasetWriter::create(&out, WriterOptions::default()).unwrap();
    w.add_prompt(&[1]).unwrap();
    w.add_prompt(&[2]).unwrap();
    let p = w.add_passage(&[5, i32::MAX]).unwrap() as i32;
    w.add_group(&GroupRecord {
        query: &[7],
        pos: &[p],
        neg: &[],
        pos_scores: None,
        neg_scores: None,
        prompt: None,
        source: 0,
    })
    .unwrap();
    w.finish(ManifestInfo {
        tokenizer: Some(tokenizer().facts().clone()),
        ..ManifestInfo::default()
    })
    .unwrap();
    let err = Dataset::open(&out).unwrap().validate().unwrap_err();
    assert!(
        err.to_string().contains("token id 2147483647 is outside"),
        "{err}"
    );
}

/// Observation 4: rejects.jsonl had a checksum that nothing checked.
#[test]
fn obs4_rejects_jsonl_is_verified() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, format!("{ROW}\n{{bad\n")).unwrap();
    let good = dir.path().join("good");
    run(&input, &good, OnError::Skip).unwrap();
    Dataset::open(&good).unwrap().validate().unwrap();
    let rejects = std::fs::read(good.join("rejects.jsonl")).unwrap();
    // Same size, one byte changed: open passes (sizes match), verify does not.
    let bad = dir.path().join("changed");
    copy_dir(&good, &bad);
    let mut b = rejects.clone();
    let i = b.iter().position(|&c| c == b'2').unwrap();
    b[i] = b'3';
    std::fs::write(bad.join("rejects.jsonl"), b).unwrap();
    let err = Dataset::open(&bad).unwrap().validate().unwrap_err();
    assert!(err.to_string().contains("rejects.jsonl"), "{err}");
    // Removed: open fails.
    std::fs::remove_file(bad.join("rejects.jsonl")).unwrap();
    assert!(Dataset::open(&bad).unwrap_err().is_corrupt());
}

/// Observation 5 (library level; the process-level crash tests are in tools/cli/tests):
/// `overwrite` replaced the old dataset in two renames, and `export` deleted its old output
/// before writing. Now a failed run leaves the old output untouched.
#[test]
fn obs5_a_failed_overwrite_leaves_the_old_output() {
    let dir = tempfile::tempdir().unwrap();
    let out = small_dataset(dir.path(), "ds");
    let before = std::fs::read(out.join("manifest.json")).unwrap();
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{not json\n").unwrap();
    let options = ConvertOptions {
        writer: WriterOptions {
            overwrite: true,
            ..WriterOptions::default()
        },
        ..ConvertOptions::default()
    };
    assert!(convert(&[bad], &tokenizer(), &out, &options, &mut |_| {}).is_err());
    assert_eq!(std::fs::read(out.join("manifest.json")).unwrap(), before);
    // Export: an existing output is kept when the export fails (here: a bad layout name is
    // refused first; an unreadable dataset fails midway).
    let pq = dir.path().join("pq");
    let ds = Dataset::open(&out).unwrap();
    rankfeed::export::export(&ds, &pq, &Default::default()).unwrap();
    let listing = |p: &Path| {
        let mut v: Vec<_> = std::fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        v.sort();
        v
    };
    let first = listing(&pq);
    let err = rankfeed::export::export(&ds, &pq, &Default::default()).unwrap_err();
    assert!(matches!(err, Error::Exists { .. }), "{err}");
    assert_eq!(listing(&pq), first);
    // No staging directory is left beside the outputs.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains("rankfeed-tmp")
        })
        .collect();
    assert!(left.is_empty());
}

/// Observation 6: staging directories of killed runs were never removed.
#[test]
fn obs6_stale_staging_directories_are_removed_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    // A process that is gone: a child that has exited and been reaped.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let stale = dir.path().join(format!(".ds.rankfeed-tmp-{dead}-0"));
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("passages.arrow"), vec![0u8; 1 << 20]).unwrap();
    // A staging directory of a live process (pid 1) is left alone.
    let live = dir.path().join(".ds.rankfeed-tmp-1-0");
    std::fs::create_dir(&live).unwrap();
    let report = run(
        &root().join("tests/fixtures/roundtrip.jsonl"),
        &dir.path().join("ds"),
        OnError::Fail,
    )
    .unwrap();
    assert_eq!(report.cleaned, vec![stale.clone()]);
    assert!(!stale.exists());
    assert!(live.exists());
}

/// Runs `f` on a thread; fails the test when it takes more than `limit` (a hang).
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .expect("did not finish in time (a hang)")
}

fn mkfifo(path: &Path) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        path,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
}

/// Observation 7: FIFOs hung forever; /dev/zero and huge files were read until memory ran
/// out; one long line aborted the process.
#[test]
fn obs7_reads_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let limit = Duration::from_secs(10);
    // Inputs: a FIFO, and a symlink to /dev/zero.
    mkfifo(&d.join("fifo.jsonl"));
    std::os::unix::fs::symlink("/dev/zero", d.join("zero.jsonl")).unwrap();
    for name in ["fifo.jsonl", "zero.jsonl"] {
        let (input, out) = (d.join(name), d.join(format!("out-{name}")));
        let err = within(limit, move || run(&input, &out, OnError::Skip).unwrap_err());
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }
    // Dataset files: a FIFO manifest, a manifest that is /dev/zero, a 2 GiB manifest, a FIFO
    // in place of groups.arrow.
    let good = small_dataset(&d, "good");
    type Damage = Box<dyn Fn(&Path)>;
    let damages: Vec<(&str, Damage)> = vec![
        (
            "fifo-manifest",
            Box::new(|p: &Path| mkfifo(&p.join("manifest.json"))),
        ),
        (
            "zero-manifest",
            Box::new(|p: &Path| {
                std::os::unix::fs::symlink("/dev/zero", p.join("manifest.json")).unwrap()
            }),
        ),
        (
            "huge-manifest",
            Box::new(|p: &Path| {
                let f = std::fs::File::create(p.join("manifest.json")).unwrap();
                f.set_len(2 << 30).unwrap(); // sparse
            }),
        ),
        (
            "fifo-groups",
            Box::new(|p: &Path| mkfifo(&p.join("groups.arrow"))),
        ),
    ];
    for (name, damage) in damages {
        let bad = d.join(name);
        copy_dir(&good, &bad);
        let victim = if name.ends_with("groups") {
            "groups.arrow"
        } else {
            "manifest.json"
        };
        std::fs::remove_file(bad.join(victim)).unwrap();
        damage(&bad);
        let t = Instant::now();
        let err = within(limit, move || Dataset::open(&bad).unwrap_err());
        assert!(err.is_corrupt(), "{name}: {err}");
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "{name}: {:?}",
            t.elapsed()
        );
    }
    // A 200 MB line: a `line_too_long` row under the default limit, not 8 GB of memory.
    let input = d.join("long.jsonl");
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&input).unwrap());
        writeln!(f, "{ROW}").unwrap();
        f.write_all(b"{\"query\": \"q\", \"pos\": [\"").unwrap();
        let chunk = vec![b'a'; 1 << 20];
        for _ in 0..200 {
            f.write_all(&chunk).unwrap();
        }
        writeln!(f, "\"], \"neg\": []}}").unwrap();
        writeln!(f, "{ROW}").unwrap();
    }
    let out = d.join("long-out");
    let t = Instant::now();
    let report = within(Duration::from_secs(60), move || {
        run(&input, &out, OnError::Skip).unwrap()
    });
    let s = &report.manifest.sources[0];
    assert_eq!((s.rows_accepted, s.rows_rejected), (2, 1));
    assert_eq!(s.rejected_by_reason["line_too_long"], 1);
    eprintln!("200 MB line rejected as line_too_long in {:?}", t.elapsed());
}

/// Observation 8: `1e400` and integers of a million digits were `invalid_json`, although
/// Python reads them (as inf) and the documented reason is `non_finite_score`.
#[test]
fn obs8_numbers_beyond_float32_are_non_finite_scores() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let million = "1".repeat(1_000_000);
    std::fs::write(
        &input,
        format!(
            "{ROW}\n{{\"query\":\"q\",\"pos\":[\"a\"],\"neg\":[\"b\"],\"neg_scores\":[1e400]}}\n{{\"query\":\"q\",\"pos\":[\"a\"],\"neg\":[],\"pos_scores\":[{million}]}}\n{{\"query\":\"q\",\"pos\":[\"a\"],\"neg\":[],\"pos_scores\":[1e39]}}\n"
        ),
    )
    .unwrap();
    let report = run(&input, &dir.path().join("out"), OnError::Skip).unwrap();
    let s = &report.manifest.sources[0];
    assert_eq!(s.rows_rejected, 3);
    assert_eq!(s.rejected_by_reason["non_finite_score"], 3, "{s:?}");
}
