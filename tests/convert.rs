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

/// What the reader makes of one JSON array file: the rows it accepts (line, element, value)
/// and the rows it rejects (line, element, reason), in order.
type ArrayOutcome = (
    Vec<(u64, Option<u64>, serde_json::Value)>,
    Vec<(u64, Option<u64>, RejectReason)>,
);

fn read_array_file(path: &Path) -> ArrayOutcome {
    use rankfeed::convert::row::parse_row;
    use rankfeed::convert::source::{self, Record};
    let sources = source::discover(&[path.to_path_buf()]).unwrap();
    let (mut accepted, mut rejected) = (Vec::new(), Vec::new());
    let mut unknown = Default::default();
    source::read_records(&sources[0], Default::default(), 1 << 20, &mut |r| {
        match r {
            Record::Row(bytes, pos) => match parse_row(bytes, &pos, &mut unknown) {
                Ok(_) => accepted.push((
                    pos.line,
                    pos.element,
                    serde_json::from_slice(bytes).unwrap(),
                )),
                Err(e) => rejected.push((pos.line, pos.element, e.reason)),
            },
            Record::Broken(e) => rejected.push((e.position.line, e.position.element, e.reason)),
            Record::TooLong(pos, _) => panic!("too long at {pos}"),
            Record::Blank => panic!("a blank line in an array"),
        }
        true
    })
    .unwrap();
    (accepted, rejected)
}

fn query_of(v: &serde_json::Value) -> &str {
    v["query"].as_str().unwrap()
}

/// A row whose query is `q`.
fn row_q(q: &str) -> String {
    format!(r#"{{"query": "{q}", "pos": ["a, ] }} {{ ["], "neg": ["b"]}}"#)
}

/// Issue 17, finding 3: `[a,,b]`, `[a,]`, `[a,b,,]` were accepted as if the empty elements
/// were not there (Python's json rejects them). Each empty element is now a rejected
/// `invalid_json` row at the line of the `,` or `]` that ends it, an error under the default
/// policy; the elements around it are read as usual.
#[test]
fn empty_array_elements_are_rejected_rows_at_their_line() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (row_q("qa"), row_q("qb"));
    // (text, accepted (line, element), rejected (line, element))
    type Case = (String, Vec<(u64, u64)>, Vec<(u64, u64)>);
    let cases: Vec<Case> = vec![
        (format!("[{a},,{b}]"), vec![(1, 0), (1, 2)], vec![(1, 1)]),
        (format!("[{a},]"), vec![(1, 0)], vec![(1, 1)]),
        (
            format!("[{a},{b},,]"),
            vec![(1, 0), (1, 1)],
            vec![(1, 2), (1, 3)],
        ),
        (format!("[,{a}]"), vec![(1, 1)], vec![(1, 0)]),
        ("[,]".to_string(), vec![], vec![(1, 0), (1, 1)]),
        (
            format!("[\n  {a},\n  ,\n  {b}\n]\n"),
            vec![(2, 0), (4, 2)],
            vec![(3, 1)],
        ),
        (
            format!("[\r\n{a},\r\n{b},\r\n]"),
            vec![(2, 0), (3, 1)],
            vec![(4, 2)],
        ),
    ];
    let skip = skip();
    for (i, (text, ok, bad)) in cases.iter().enumerate() {
        assert!(
            serde_json::from_str::<serde_json::Value>(text).is_err(),
            "a JSON parser rejects {text:?}"
        );
        let p = write(dir.path(), &format!("empty{i}.json"), text);
        let (accepted, rejected) = read_array_file(&p);
        assert_eq!(
            accepted.iter().map(|r| (r.0, r.1)).collect::<Vec<_>>(),
            ok.iter().map(|&(l, e)| (l, Some(e))).collect::<Vec<_>>(),
            "{text:?}: accepted"
        );
        assert_eq!(
            rejected,
            bad.iter()
                .map(|&(l, e)| (l, Some(e), RejectReason::InvalidJson))
                .collect::<Vec<_>>(),
            "{text:?}: rejected"
        );
        // The default policy fails at the first empty element, naming its line.
        let err = run(
            std::slice::from_ref(&p),
            &dir.path().join(format!("fail{i}")),
            &ConvertOptions::default(),
        )
        .unwrap_err();
        let Error::Row(e) = &err else { panic!("{err}") };
        let (line, element) = bad[0];
        assert_eq!(
            (e.reason, e.position.line, e.position.element),
            (RejectReason::InvalidJson, line, Some(element)),
            "{text:?}"
        );
        assert!(err.to_string().contains("empty array element"), "{err}");
        // Under skip: every row accounted for, rejects.jsonl at the right lines.
        if ok.is_empty() {
            continue;
        }
        let out = dir.path().join(format!("skip{i}"));
        let m = run(std::slice::from_ref(&p), &out, &skip).unwrap();
        let s = &m.sources[0];
        assert_eq!(
            (s.rows_accepted, s.rows_rejected),
            (ok.len() as u64, bad.len() as u64)
        );
        let rejects: Vec<serde_json::Value> = std::fs::read_to_string(out.join("rejects.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let got: Vec<(u64, u64)> = rejects
            .iter()
            .map(|r| (r["line"].as_u64().unwrap(), r["element"].as_u64().unwrap()))
            .collect();
        assert_eq!(&got, bad, "{text:?}");
    }
}

/// Malformed elements that do not lose the ones after them: one rejected row each, and the
/// next element is read as usual. Some are missing closing brackets, which used to make the
/// element run to the end of the file.
const MALFORMED: &[&str] = &[
    // Missing the closing brace (a truncated or hand-edited row).
    r#"{"query": "bad", "pos": ["a"], "neg": ["b"]"#,
    r#"{"query": "bad", "pos": ["a"], "neg": ["b"], "x": {"y": [1, {"z": 2}]"#,
    // Missing a closing bracket inside: the brace closes it.
    r#"{"query": "bad", "pos": ["a", "neg": ["b"]}"#,
    // Closers without openers.
    r#"{"query": "bad", "pos": ["a"]], "neg": []}"#,
    r#"{"query": "bad", "pos": ["a"], "neg": []}}"#,
    // Balanced, but not JSON.
    r#"{"query": "bad" "pos": ["a"], "neg": []}"#,
    r#"{'query': 'bad, worse', "pos": ["a"], "neg": []}"#,
    r#"{"query": "bad", "pos": ["a"], "neg": [],}"#,
    "{not json}",
    "NaNx",
    r#"{"query": "bad", "pos": ["a"], "neg": []} {"query": "glued"}"#,
];

/// Issue 17, finding 3: `[BAD, R2, R3]` under skip gave 0 accepted, 1 rejected when BAD was
/// missing its closing brace: the element ran to the end of the file. Now BAD is one
/// rejected row at its line, and R2, R3 are accepted, wherever BAD is and however the array
/// is laid out.
#[test]
fn a_malformed_array_element_does_not_swallow_the_elements_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let layouts: [(&str, &str, &str); 4] = [
        ("[", ", ", "]"),
        ("[\n  ", ",\n  ", "\n]\n"),
        ("[\r\n", "\r\n,\r\n", "\r\n]"),
        ("\u{feff}\n[", ",\n\n", "]"),
    ];
    let mut checked = 0;
    for (b, bad) in MALFORMED.iter().enumerate() {
        assert!(
            serde_json::from_str::<serde_json::Value>(bad).is_err(),
            "{bad}"
        );
        for (l, (open, sep, close)) in layouts.iter().enumerate() {
            for at in 0..3 {
                let mut elements: Vec<String> = (0..3).map(|i| row_q(&format!("r{i}"))).collect();
                elements[at] = bad.to_string();
                let text = format!("{open}{}{close}", elements.join(sep));
                // The line each element starts on.
                let mut lines = Vec::new();
                let mut offset = open.len();
                for e in &elements {
                    lines.push(1 + text[..offset].matches('\n').count() as u64);
                    offset += e.len() + sep.len();
                }
                let p = write(dir.path(), &format!("bad-{b}-{l}-{at}.json"), &text);
                let (accepted, rejected) = read_array_file(&p);
                let want: Vec<(u64, Option<u64>, String)> = (0..3)
                    .filter(|&i| i != at)
                    .map(|i| (lines[i], Some(i as u64), format!("r{i}")))
                    .collect();
                let got: Vec<(u64, Option<u64>, String)> = accepted
                    .iter()
                    .map(|(l, e, v)| (*l, *e, query_of(v).to_string()))
                    .collect();
                assert_eq!(got, want, "{text:?}: accepted");
                assert_eq!(rejected.len(), 1, "{text:?}: {rejected:?}");
                assert_eq!(
                    (rejected[0].0, rejected[0].1),
                    (lines[at], Some(at as u64)),
                    "{text:?}"
                );
                checked += 1;
            }
        }
    }
    // End to end, the finding's case: [BAD, R2, R3] under skip.
    let text = format!("[{}, {}, {}]", MALFORMED[0], row_q("r1"), row_q("r2"));
    let p = write(dir.path(), "finding.json", &text);
    let m = run(std::slice::from_ref(&p), &dir.path().join("o"), &skip()).unwrap();
    assert_eq!(
        (m.sources[0].rows_accepted, m.sources[0].rows_rejected),
        (2, 1)
    );
    // A `]` after a complete element closes the array: what follows is one rejected row.
    let text = format!("[{}], {}]", row_q("r0"), row_q("r1"));
    let p = write(dir.path(), "closed.json", &text);
    let (accepted, rejected) = read_array_file(&p);
    assert_eq!((accepted.len(), rejected.len()), (1, 1), "{text}");
    println!("malformed array elements: {checked} arrays, each one rejected row");
}

/// Invariant over random arrays: valid ones are split into exactly the elements a JSON parser
/// sees (strings full of `,`, brackets, escapes; nested values; any whitespace), each at the
/// line it starts on; with empty and malformed elements mixed in, every valid element is
/// still accepted, at its line and index, and every empty or malformed one is one rejected
/// row at its own.
#[test]
fn random_arrays_split_into_their_elements() {
    use rankfeed::sample::KeyedRng;
    let dir = tempfile::tempdir().unwrap();
    let texts = [
        "plain",
        "a, b",
        "]",
        "}, {",
        "[[\\\"",
        "\\\\",
        "\\\\\\\"],",
        "é ü \\u00e9",
        "line\\nbreak",
    ];
    let ws = ["", " ", "\n", "\r\n", "\t", " \n  "];
    let sets = 2000;
    let (mut valid_arrays, mut elements) = (0, 0);
    for set in 0..sets as u64 {
        let mut rng = KeyedRng::new(&[17, 3, set]);
        let mut pick = |n: usize| rng.below(n as u64) as usize;
        let n = 1 + pick(5);
        let corrupt = set % 2 == 1;
        // (element text or None for an empty one, whether it is a valid row)
        let mut items: Vec<(Option<String>, bool)> = Vec::new();
        for i in 0..n {
            if corrupt && pick(4) == 0 {
                items.push((None, false));
            }
            if corrupt && pick(4) == 0 {
                items.push((Some(MALFORMED[pick(MALFORMED.len())].to_string()), false));
            }
            let t = |p: &mut dyn FnMut(usize) -> usize| texts[p(texts.len())];
            let mut row = format!(
                r#"{{"query":{w}"q{i} {}",{w}"pos":[{w}"{}"{w}],"neg":["{}",{w}"{}"]"#,
                t(&mut pick),
                t(&mut pick),
                t(&mut pick),
                t(&mut pick),
                w = ws[pick(ws.len())],
            );
            if pick(2) == 0 {
                row += r#","meta":{"k":[1,{"x":"]}"}],"s":"{[,"}"#;
            }
            row.push('}');
            items.push((Some(row), true));
        }
        if corrupt && pick(3) == 0 {
            items.push((None, false));
        }
        let mut text = String::from(["", "\u{feff}", "\n", "\u{feff} \r\n"][pick(4)]);
        text.push('[');
        // Expected: per element, (line, index, query) accepted, or (line, index) rejected.
        let (mut want_ok, mut want_bad) = (Vec::new(), Vec::new());
        // An empty element is reported at the line of the ',' or ']' that ends it.
        let mut empty = None;
        let delimiter = |text: &mut String, empty: &mut Option<usize>, want: &mut Vec<_>, c| {
            if let Some(i) = empty.take() {
                want.push((1 + text.matches('\n').count() as u64, Some(i as u64)));
            }
            text.push(c);
        };
        for (i, (item, valid)) in items.iter().enumerate() {
            if i > 0 {
                text += ws[pick(ws.len())];
                delimiter(&mut text, &mut empty, &mut want_bad, ',');
            }
            text += ws[pick(ws.len())];
            let line = 1 + text.matches('\n').count() as u64;
            match item {
                Some(e) => {
                    text += e;
                    if *valid {
                        let v: serde_json::Value = serde_json::from_str(e).unwrap();
                        want_ok.push((line, Some(i as u64), v));
                    } else {
                        want_bad.push((line, Some(i as u64)));
                    }
                }
                None => empty = Some(i),
            }
        }
        text += ws[pick(ws.len())];
        delimiter(&mut text, &mut empty, &mut want_bad, ']');
        text += ws[pick(ws.len())];
        let p = write(dir.path(), &format!("r{set}.json"), &text);
        let (accepted, rejected) = read_array_file(&p);
        if !corrupt {
            // Exactly what a JSON parser gives.
            let body = text.trim_start_matches('\u{feff}');
            let parsed: Vec<serde_json::Value> = serde_json::from_str(body).unwrap();
            let got: Vec<&serde_json::Value> = accepted.iter().map(|a| &a.2).collect();
            assert_eq!(got, parsed.iter().collect::<Vec<_>>(), "{text:?}");
            valid_arrays += 1;
        }
        assert_eq!(accepted, want_ok, "{text:?}");
        let bad: Vec<(u64, Option<u64>)> = rejected.iter().map(|r| (r.0, r.1)).collect();
        assert_eq!(bad, want_bad, "{text:?}");
        elements += items.len();
    }
    println!("random arrays: {sets} ({valid_arrays} valid), {elements} elements, 0 differences");
}
