//! The golden format-v2 dataset (`tests/fixtures/golden-v2/`, converted from
//! `tests/fixtures/golden-v2.jsonl` with the bundled BERT tokenizer, `--on-error skip
//! --rows-per-batch 4 --query-instruction "Query: "`): committed bytes that lock the format.
//! - Reading: this build opens and verifies the committed files and reads from them what the
//!   input says (ids from the tokenizer, scores, prompts, sources, rejects).
//! - Writing: converting the same input again gives the committed bytes.
//!
//! A change that alters the bytes or the reading of format v2 fails here: bump the format
//! version and add a new golden directory instead of editing this one.

use std::path::{Path, PathBuf};

use rankfeed::convert::{convert, ConvertOptions, OnError, TextOptions};
use rankfeed::tokenizer::TextTokenizer;
use rankfeed::writer::WriterOptions;
use rankfeed::Dataset;
use serde_json::Value;

const INPUT: &str = "tests/fixtures/golden-v2.jsonl";
const GOLDEN: &str = "tests/fixtures/golden-v2";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tokenizer() -> TextTokenizer {
    TextTokenizer::from_file(root().join("data/sample/bert/tokenizer.json")).unwrap()
}

fn options() -> ConvertOptions {
    ConvertOptions {
        on_error: OnError::Skip,
        text: TextOptions {
            query_instruction: Some("Query: ".into()),
            ..TextOptions::default()
        },
        writer: WriterOptions {
            rows_per_batch: 4,
            overwrite: false,
        },
        ..ConvertOptions::default()
    }
}

#[test]
fn golden_v2_reads_as_its_input_says() {
    let ds = Dataset::open(root().join(GOLDEN)).unwrap();
    ds.validate().unwrap();
    let m = ds.manifest();
    assert_eq!((m.format_version, m.rows_per_batch), (2, 4));
    assert_eq!((ds.len(), m.sources[0].rows_rejected), (14, 1));
    let tok = tokenizer();
    let rows: Vec<Value> = std::fs::read_to_string(root().join(INPUT))
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|r: &Value| r["pos"].as_array().is_some_and(|p| !p.is_empty()))
        .collect();
    for (i, r) in rows.iter().enumerate() {
        let g = ds.group(i).unwrap();
        let instruction = r["query_prompt"].as_str().unwrap_or("Query: ");
        let query = format!("{instruction}{}", r["query"].as_str().unwrap());
        assert_eq!(g.query, tok.encode(&query).unwrap(), "row {i} query");
        for (ids, texts) in [(g.pos, &r["pos"]), (g.neg, &r["neg"])] {
            let want: Vec<Vec<i32>> = texts
                .as_array()
                .unwrap()
                .iter()
                .map(|t| tok.encode(t.as_str().unwrap()).unwrap())
                .collect();
            let got: Vec<Vec<i32>> = ids
                .iter()
                .map(|&p| ds.passage(p).unwrap().to_vec())
                .collect();
            assert_eq!(got, want, "row {i} passages");
        }
        let scores = |v: &Value| {
            v.as_array().map(|a| {
                a.iter()
                    .map(|x| x.as_f64().unwrap() as f32)
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(
            g.pos_scores.map(<[f32]>::to_vec),
            scores(&r["pos_scores"]),
            "row {i}"
        );
        assert_eq!(
            g.neg_scores.map(<[f32]>::to_vec),
            scores(&r["neg_scores"]),
            "row {i}"
        );
        match r["prompt"].as_str() {
            Some(p) => assert_eq!(
                ds.prompt_tokens(g.prompt.unwrap()).unwrap(),
                tok.encode(p).unwrap()
            ),
            None => assert_eq!(g.prompt, None),
        }
    }
    // The two rows with the same prompt share one stored prompt.
    assert_eq!(ds.num_prompts(), 3);
}

#[test]
fn golden_v2_is_what_this_build_writes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("again");
    // The input path as given is recorded: convert from the repository root, as the golden was.
    let input = PathBuf::from(INPUT);
    let input = if Path::new(INPUT).exists() {
        input
    } else {
        root().join(INPUT)
    };
    convert(&[input], &tokenizer(), &out, &options(), &mut |_| {}).unwrap();
    for name in [
        "groups.arrow",
        "passages.arrow",
        "prompts.arrow",
        "rejects.jsonl",
    ] {
        assert!(
            std::fs::read(out.join(name)).unwrap()
                == std::fs::read(root().join(GOLDEN).join(name)).unwrap(),
            "{name} differs from the golden v2 bytes"
        );
    }
    let manifest = |p: &Path| -> Value {
        let mut v: Value =
            serde_json::from_slice(&std::fs::read(p.join("manifest.json")).unwrap()).unwrap();
        let o = v.as_object_mut().unwrap();
        for volatile in ["tool_version", "checksum"] {
            o.remove(volatile);
        }
        v
    };
    assert_eq!(manifest(&out), manifest(&root().join(GOLDEN)));
}
