//! End-to-end: JSON inputs -> dataset -> views, with the bundled BERT tokenizer.

use std::io::Write;
use std::path::{Path, PathBuf};

use rankfeed::convert::{convert, ConvertOptions, OnError, TextOptions};
use rankfeed::tokenizer::TextTokenizer;
use rankfeed::{Dataset, Error, RejectReason};

fn tokenizer() -> TextTokenizer {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sample/bert/tokenizer.json");
    TextTokenizer::from_file(p).unwrap()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn run(
    inputs: &[PathBuf],
    out: &Path,
    opts: &ConvertOptions,
) -> rankfeed::Result<rankfeed::Manifest> {
    convert(inputs, &tokenizer(), out, opts, &mut |_| {}).map(|r| r.manifest)
}

fn skip() -> ConvertOptions {
    ConvertOptions {
        on_error: OnError::Skip,
        ..ConvertOptions::default()
    }
}

const GOOD: &str = r#"{"query": "what is a cat", "pos": ["A cat is a small mammal."], "neg": ["A dog barks.", "Fish swim."], "pos_scores": [0.9], "neg_scores": [0.1, 0.2]}"#;

/// One bad row per class, with the reason we expect.
fn bad_rows() -> Vec<(&'static str, RejectReason)> {
    use RejectReason::*;
    vec![
        (r#"{"query": "q", "pos": ["a"], "neg": ["b"]"#, InvalidJson),
        ("[1, 2]", NotAnObject),
        (r#"{"pos": ["a"], "neg": ["b"]}"#, MissingField),
        (r#"{"query": "q", "neg": ["b"]}"#, MissingField),
        (r#"{"query": "q", "pos": ["a"]}"#, MissingField),
        (r#"{"query": ["q"], "pos": ["a"], "neg": []}"#, WrongType),
        (r#"{"query": "q", "pos": "a", "neg": []}"#, WrongType),
        (r#"{"query": "q", "pos": null, "neg": []}"#, WrongType),
        (r#"{"query": "q", "pos": [], "neg": ["b"]}"#, EmptyPos),
        (
            r#"{"query": "q", "pos": ["a"], "neg": ["b", "c"], "neg_scores": [0.1]}"#,
            ScoreLengthMismatch,
        ),
        (
            r#"{"query": "q", "pos": ["a"], "neg": ["b"], "pos_scores": ["high"]}"#,
            NonNumericScore,
        ),
        (
            r#"{"query": "q", "pos": ["a"], "neg": ["b"], "pos_scores": [true]}"#,
            BooleanScore,
        ),
        (
            r#"{"query": "q", "pos": ["a"], "neg": ["b"], "pos_scores": [NaN]}"#,
            NonFiniteScore,
        ),
        (
            r#"{"query": "q", "pos": ["a"], "neg": ["b"], "neg_scores": [1e40]}"#,
            NonFiniteScore,
        ),
    ]
}

#[test]
fn each_bad_row_fails_with_file_and_line_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    for (i, (row, reason)) in bad_rows().into_iter().enumerate() {
        let input = write(
            dir.path(),
            &format!("bad{i}.jsonl"),
            &format!("{GOOD}\n\n{row}\n{GOOD}\n"),
        );
        let out = dir.path().join(format!("out{i}"));
        let err = run(
            std::slice::from_ref(&input),
            &out,
            &ConvertOptions::default(),
        )
        .unwrap_err();
        let Error::Row(e) = &err else {
            panic!("{row}: expected a row error, got {err}")
        };
        assert_eq!(e.reason, reason, "{row}");
        assert_eq!(e.position.line, 3, "{row}");
        let msg = err.to_string();
        assert!(msg.contains(&format!("bad{i}.jsonl:3")), "{msg}");
        assert!(!out.exists(), "nothing may be written on failure");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .contains("rankfeed-tmp")
            })
            .collect();
        assert!(leftovers.is_empty(), "temporary directory left behind");
    }
}

#[test]
fn invalid_utf8_is_rejected_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("utf8.jsonl");
    let mut f = std::fs::File::create(&p).unwrap();
    writeln!(f, "{GOOD}").unwrap();
    f.write_all(b"{\"query\": \"caf\xe9\", \"pos\": [\"a\"], \"neg\": []}\n")
        .unwrap();
    drop(f);
    let err = run(
        std::slice::from_ref(&p),
        &dir.path().join("o"),
        &ConvertOptions::default(),
    )
    .unwrap_err();
    assert!(
        matches!(&err, Error::Row(e) if e.reason == RejectReason::InvalidUtf8 && e.position.line == 2),
        "{err}"
    );
}

#[test]
fn skip_policy_accounts_for_every_row() {
    let dir = tempfile::tempdir().unwrap();
    let rows = bad_rows();
    let mut text = String::new();
    for (row, _) in &rows {
        text.push_str(GOOD);
        text.push('\n');
        text.push_str(row);
        text.push('\n');
    }
    let input = write(dir.path(), "mixed.jsonl", &text);
    let out = dir.path().join("out");
    let m = run(std::slice::from_ref(&input), &out, &skip()).unwrap();
    let s = &m.sources[0];
    assert_eq!(s.rows_read, 2 * rows.len() as u64);
    assert_eq!(s.rows_accepted, rows.len() as u64);
    assert_eq!(s.rows_rejected, rows.len() as u64);
    assert_eq!(s.rows_accepted + s.rows_rejected, s.rows_read);
    assert_eq!(s.rejected_by_reason.values().sum::<u64>(), s.rows_rejected);
    for (_, reason) in &rows {
        assert!(
            s.rejected_by_reason.contains_key(reason.as_str()),
            "{reason}"
        );
    }
    // rejects.jsonl: one line per rejected row, with file, line and reason.
    let rejects = std::fs::read_to_string(out.join("rejects.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = rejects
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), rows.len());
    for (i, (l, (_, reason))) in lines.iter().zip(&rows).enumerate() {
        assert_eq!(l["line"], (2 * i + 2) as u64);
        assert_eq!(l["reason"], reason.as_str());
        assert!(l["file"].as_str().unwrap().ends_with("mixed.jsonl"));
    }
    let ds = Dataset::open(&out).unwrap();
    ds.validate().unwrap();
    assert_eq!(ds.len(), rows.len());
    assert!(m.files.contains_key("rejects.jsonl"));
}

#[test]
fn formats_compression_directories_and_order() {
    let dir = tempfile::tempdir().unwrap();
    let row = |i: usize| {
        format!(r#"{{"query": "query {i}", "pos": ["passage {i}"], "neg": ["shared negative"]}}"#)
    };
    let lines = |r: std::ops::Range<usize>| r.map(row).collect::<Vec<_>>().join("\n");
    let d = dir.path().join("in");
    std::fs::create_dir(&d).unwrap();
    write(&d, "a.jsonl", &lines(0..3));
    // .json holding one array, pretty-printed over several lines.
    let arr: Vec<serde_json::Value> = (3..6)
        .map(|i| serde_json::from_str(&row(i)).unwrap())
        .collect();
    write(&d, "b.json", &serde_json::to_string_pretty(&arr).unwrap());
    // .json holding JSON lines.
    write(&d, "c.json", &lines(6..8));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(lines(8..10).as_bytes()).unwrap();
    std::fs::write(d.join("d.jsonl.gz"), gz.finish().unwrap()).unwrap();
    std::fs::write(
        d.join("e.jsonl.zst"),
        zstd::encode_all(lines(10..12).as_bytes(), 3).unwrap(),
    )
    .unwrap();
    write(&d, "ignored.txt", "not an input");
    let extra = write(dir.path(), "z.jsonl", &lines(12..13));
    let out = dir.path().join("out");
    let m = run(&[d.clone(), extra], &out, &ConvertOptions::default()).unwrap();
    let names: Vec<String> = m
        .sources
        .iter()
        .map(|s| {
            Path::new(&s.path)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert_eq!(
        names,
        [
            "a.jsonl",
            "b.json",
            "c.json",
            "d.jsonl.gz",
            "e.jsonl.zst",
            "z.jsonl"
        ]
    );
    let tok = tokenizer();
    let ds = Dataset::open(&out).unwrap();
    assert_eq!(ds.len(), 13);
    let shared = tok.encode("shared negative").unwrap();
    for i in 0..13 {
        let g = ds.group(i).unwrap();
        assert_eq!(
            g.query,
            tok.encode(&format!("query {i}")).unwrap().as_slice(),
            "row {i} keeps input order"
        );
        assert_eq!(
            ds.passage(g.pos[0]).unwrap(),
            tok.encode(&format!("passage {i}")).unwrap().as_slice()
        );
        assert_eq!(ds.passage(g.neg[0]).unwrap(), shared.as_slice());
        assert_eq!(
            g.neg[0],
            ds.group(0).unwrap().neg[0],
            "dedup: one id per distinct text"
        );
    }
    assert_eq!(m.counts.passages, 14);
    assert_eq!(m.counts.passage_refs, 26);
    let expected_source = [0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 4, 5];
    for (i, s) in expected_source.iter().enumerate() {
        assert_eq!(ds.group(i).unwrap().source, *s);
    }
}

#[test]
fn array_elements_report_their_line() {
    let dir = tempfile::tempdir().unwrap();
    let text =
        format!("[\n  {GOOD},\n  {GOOD},\n  {{\"query\": 1, \"pos\": [\"a\"], \"neg\": []}}\n]\n");
    let p = write(dir.path(), "arr.json", &text);
    let err = run(
        std::slice::from_ref(&p),
        &dir.path().join("o"),
        &ConvertOptions::default(),
    )
    .unwrap_err();
    let Error::Row(e) = &err else { panic!("{err}") };
    assert_eq!((e.position.line, e.position.element), (4, Some(2)));
    assert!(
        err.to_string().contains("arr.json:4 (array element 2)"),
        "{err}"
    );
    // A truncated array under skip: the good elements are kept, the broken tail is one reject.
    let p = write(
        dir.path(),
        "trunc.json",
        &format!("[{GOOD},\n{GOOD},\n{{\"query\": \"q\", \"pos\""),
    );
    let m = run(std::slice::from_ref(&p), &dir.path().join("o2"), &skip()).unwrap();
    assert_eq!(
        (m.sources[0].rows_accepted, m.sources[0].rows_rejected),
        (2, 1)
    );
}

#[test]
fn missing_empty_and_bad_inputs_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let missing = dir.path().join("nope.jsonl");
    let err = run(
        std::slice::from_ref(&missing),
        &out,
        &ConvertOptions::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("nope.jsonl"), "{err}");
    let empty = write(dir.path(), "empty.jsonl", "\n\n");
    let err = run(
        std::slice::from_ref(&empty),
        &out,
        &ConvertOptions::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("empty.jsonl: no rows"), "{err}");
    let empty_dir = dir.path().join("emptydir");
    std::fs::create_dir(&empty_dir).unwrap();
    let err = run(
        std::slice::from_ref(&empty_dir),
        &out,
        &ConvertOptions::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("directory has no .json"), "{err}");
    let bad_tok = write(dir.path(), "tokenizer.json", "{\"not\": \"a tokenizer\"}");
    let err = TextTokenizer::from_file(&bad_tok).unwrap_err();
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
    assert!(!out.exists());
}

#[test]
fn instructions_and_row_prompts_are_applied_before_tokenizing() {
    let dir = tempfile::tempdir().unwrap();
    let input = write(
        dir.path(),
        "p.jsonl",
        concat!(
            r#"{"query": "cats", "pos": ["felines"], "neg": ["dogs"], "prompt": "Judge it."}"#,
            "\n",
            r#"{"query": "cats", "pos": ["felines"], "neg": ["dogs"], "query_prompt": "Find: ", "passage_prompt": "Doc: ", "prompt": "Judge it."}"#,
            "\n",
        ),
    );
    let opts = ConvertOptions {
        text: TextOptions {
            query_instruction: Some("Q: ".into()),
            query_instruction_format: "{}\\n{}".into(),
            passage_instruction: Some("P: ".into()),
            ..TextOptions::default()
        },
        ..ConvertOptions::default()
    };
    let out = dir.path().join("out");
    let m = run(&[input], &out, &opts).unwrap();
    assert_eq!(m.text.query_instruction_format, "{}\n{}");
    let tok = tokenizer();
    let ds = Dataset::open(&out).unwrap();
    let (a, b) = (ds.group(0).unwrap(), ds.group(1).unwrap());
    assert_eq!(a.query, tok.encode("Q: \ncats").unwrap().as_slice());
    assert_eq!(b.query, tok.encode("Find: \ncats").unwrap().as_slice());
    assert_eq!(
        ds.passage(a.pos[0]).unwrap(),
        tok.encode("P: felines").unwrap().as_slice()
    );
    assert_eq!(
        ds.passage(b.pos[0]).unwrap(),
        tok.encode("Doc: felines").unwrap().as_slice()
    );
    assert_ne!(
        a.pos[0], b.pos[0],
        "different formatted texts are different passages"
    );
    assert_eq!(a.prompt, b.prompt);
    let prompt = ds.prompt_tokens(a.prompt.unwrap()).unwrap();
    assert_eq!(prompt, tok.encode("Judge it.").unwrap().as_slice());
    assert_eq!(m.text.sep_ids, tok.encode("\n").unwrap());
    assert_eq!(
        ds.prompt_tokens(0).unwrap(),
        tok.encode(rankfeed::format::DEFAULT_LLM_PROMPT)
            .unwrap()
            .as_slice()
    );
}

#[test]
fn existing_output_needs_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let input = write(dir.path(), "a.jsonl", GOOD);
    let out = dir.path().join("out");
    run(
        std::slice::from_ref(&input),
        &out,
        &ConvertOptions::default(),
    )
    .unwrap();
    let err = run(
        std::slice::from_ref(&input),
        &out,
        &ConvertOptions::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    let mut opts = ConvertOptions::default();
    opts.writer.overwrite = true;
    run(&[input], &out, &opts).unwrap();
    Dataset::open(&out).unwrap().validate().unwrap();
}

#[test]
fn tokenizer_facts_come_from_the_files() {
    let t = tokenizer();
    let f = t.facts();
    assert_eq!(f.num_special_pair(), 3);
    assert!(f.has_token_type_ids);
    assert_eq!((f.pad_id, f.unk_id, f.bos_id), (Some(0), Some(100), None));
    // Truncation(128) and padding(128) of the MiniLM file are disabled.
    let long = "word ".repeat(300);
    assert_eq!(t.encode(&long).unwrap().len(), 300);
    assert_eq!(t.encode("hi").unwrap().len(), 1);
}

/// The cancel flag (set by Python when a progress callback raises, or on Ctrl-C) stops a
/// conversion with `Error::Interrupted`, and nothing is left at the output path.
#[test]
fn a_cancelled_conversion_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let input = write(dir.path(), "in.jsonl", &format!("{GOOD}\n").repeat(5000));
    let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let options = ConvertOptions {
        chunk_rows: 64,
        cancel: Some(cancel.clone()),
        ..ConvertOptions::default()
    };
    let out = dir.path().join("out");
    let mut calls = 0;
    let err = convert(&[input], &tokenizer(), &out, &options, &mut |_| {
        calls += 1;
        cancel.store(true, std::sync::atomic::Ordering::Relaxed);
    })
    .unwrap_err();
    assert!(matches!(err, Error::Interrupted(_)), "{err}");
    assert!(!out.exists());
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "only the input is left"
    );
}
