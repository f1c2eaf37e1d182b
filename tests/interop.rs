//! Parquet export/import, Parquet text input, sharded conversion and merge.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{
    Float64Builder, LargeListBuilder, LargeStringBuilder, ListBuilder, StringBuilder,
};
use arrow_array::{ArrayRef, RecordBatch};
use parquet::arrow::ArrowWriter;
use rankfeed::convert::{convert, ConvertOptions, OnError};
use rankfeed::export::{export, ExportOptions, Layout};
use rankfeed::tokenizer::TextTokenizer;
use rankfeed::writer::WriterOptions;
use rankfeed::Dataset;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tokenizer() -> TextTokenizer {
    TextTokenizer::from_file(root().join("data/sample/bert/tokenizer.json")).unwrap()
}

fn run(inputs: &[PathBuf], out: &Path, opts: ConvertOptions) -> rankfeed::Manifest {
    convert(inputs, &tokenizer(), out, &opts, &mut |_| {})
        .unwrap()
        .manifest
}

fn same_columns(a: &Path, b: &Path) {
    for name in ["groups.arrow", "passages.arrow", "prompts.arrow"] {
        assert!(
            std::fs::read(a.join(name)).unwrap() == std::fs::read(b.join(name)).unwrap(),
            "{name} differs"
        );
    }
}

#[test]
fn export_then_import_reproduces_the_columns() {
    let dir = tempfile::tempdir().unwrap();
    let ds_dir = dir.path().join("ds");
    run(
        &[root().join("tests/fixtures/roundtrip.jsonl")],
        &ds_dir,
        ConvertOptions::default(),
    );
    let ds = Dataset::open(&ds_dir).unwrap();
    for (layout, rows_per_file) in [(Layout::Flat, 50), (Layout::Tables, 1_000_000)] {
        let out = dir.path().join(format!("{layout:?}"));
        let r = export(
            &ds,
            &out,
            &ExportOptions {
                layout,
                rows_per_file,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(r.bytes > 0);
        if layout == Layout::Flat {
            assert_eq!(
                r.files.len(),
                ds.len().div_ceil(50),
                "several files for large outputs"
            );
            let back = dir.path().join("back");
            let imported =
                rankfeed::import::import(&[out], &back, WriterOptions::default()).unwrap();
            assert_eq!(imported.rows, ds.len() as u64);
            same_columns(&ds_dir, &back);
            let m = Dataset::open(&back).unwrap();
            assert_eq!(
                m.manifest().tokenizer,
                ds.manifest().tokenizer,
                "tokenizer facts carried in metadata"
            );
            assert_eq!(m.manifest().text, ds.manifest().text);
            m.validate().unwrap();
        } else {
            for t in ["passages", "groups", "prompts"] {
                assert!(out.join(t).join("part-00000.parquet").exists());
            }
        }
    }
}

fn text_parquet(path: &Path, rows: &[serde_json::Value]) {
    // As Polars writes: large_list<large_string> passages, large_string query, double scores.
    let mut query = LargeStringBuilder::new();
    let mut pos = LargeListBuilder::new(LargeStringBuilder::new());
    let mut neg = ListBuilder::new(StringBuilder::new());
    let mut ps = LargeListBuilder::new(Float64Builder::new());
    let mut prompt = StringBuilder::new();
    for r in rows {
        query.append_value(r["query"].as_str().unwrap());
        for p in r["pos"].as_array().unwrap() {
            pos.values().append_value(p.as_str().unwrap());
        }
        pos.append(true);
        for p in r["neg"].as_array().unwrap() {
            neg.values().append_value(p.as_str().unwrap());
        }
        neg.append(true);
        match r.get("pos_scores") {
            Some(s) => {
                for x in s.as_array().unwrap() {
                    ps.values().append_value(x.as_f64().unwrap());
                }
                ps.append(true);
            }
            None => ps.append_null(),
        }
        prompt.append_option(r.get("prompt").and_then(|p| p.as_str()));
    }
    let cols: Vec<(&str, ArrayRef)> = vec![
        ("query", Arc::new(query.finish())),
        ("pos", Arc::new(pos.finish())),
        ("neg", Arc::new(neg.finish())),
        ("pos_scores", Arc::new(ps.finish())),
        ("prompt", Arc::new(prompt.finish())),
    ];
    let batch = RecordBatch::try_from_iter(cols).unwrap();
    let mut w =
        ArrowWriter::try_new(std::fs::File::create(path).unwrap(), batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

#[test]
fn parquet_text_input_converts_like_json() {
    let dir = tempfile::tempdir().unwrap();
    let rows: Vec<serde_json::Value> = (0..40)
        .map(|i| {
            let mut r = serde_json::json!({
                "query": format!("what is thing {i}"),
                "pos": [format!("thing {i} is a thing")],
                "neg": [format!("thing {} is another", i + 1), "a shared negative"],
                "pos_scores": [0.5 + i as f64],
            });
            if i % 3 == 0 {
                r["prompt"] = "Judge.".into();
            }
            r
        })
        .collect();
    let json = dir.path().join("rows.jsonl");
    std::fs::write(
        &json,
        rows.iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>()
            .join("\n"),
    )
    .unwrap();
    let pq = dir.path().join("rows.parquet");
    text_parquet(&pq, &rows);
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    run(&[json], &a, ConvertOptions::default());
    run(std::slice::from_ref(&pq), &b, ConvertOptions::default());
    same_columns(&a, &b);
    // A bad row in Parquet: position is the file and row.
    let mut bad = rows.clone();
    bad[7]["pos"] = serde_json::json!([]);
    let bad_pq = dir.path().join("bad.parquet");
    text_parquet(&bad_pq, &bad);
    let err = convert(
        std::slice::from_ref(&bad_pq),
        &tokenizer(),
        &dir.path().join("c"),
        &ConvertOptions::default(),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("bad.parquet row 7"), "{err}");
    let skip = ConvertOptions {
        on_error: OnError::Skip,
        ..ConvertOptions::default()
    };
    let m = run(&[bad_pq], &dir.path().join("d"), skip);
    assert_eq!(
        (m.sources[0].rows_accepted, m.sources[0].rows_rejected),
        (39, 1)
    );
}

#[test]
fn shards_merge_into_the_single_conversion() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir(&input).unwrap();
    let lines: Vec<String> = std::fs::read_to_string(root().join("tests/fixtures/roundtrip.jsonl"))
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    for (k, chunk) in lines.chunks(37).enumerate() {
        std::fs::write(input.join(format!("part-{k:02}.jsonl")), chunk.join("\n")).unwrap();
    }
    let whole = dir.path().join("whole");
    let m = run(
        std::slice::from_ref(&input),
        &whole,
        ConvertOptions::default(),
    );
    assert_eq!(m.sources.len(), 5);
    let mut shards = Vec::new();
    for k in 0..3 {
        let out = dir.path().join(format!("shard-{k}"));
        run(
            std::slice::from_ref(&input),
            &out,
            ConvertOptions {
                shard: Some((k, 3)),
                ..ConvertOptions::default()
            },
        );
        shards.push(out);
    }
    let merged = dir.path().join("merged");
    let mm = rankfeed::merge::merge(&shards, &merged, WriterOptions::default()).unwrap();
    same_columns(&whole, &merged);
    assert_eq!(
        mm.sources
            .iter()
            .map(|s| s.rows_accepted)
            .collect::<Vec<_>>(),
        m.sources
            .iter()
            .map(|s| s.rows_accepted)
            .collect::<Vec<_>>()
    );
    // Shards from another tokenizer or text settings are refused.
    let other = dir.path().join("other");
    let opts = ConvertOptions {
        text: rankfeed::convert::TextOptions {
            query_instruction: Some("Q: ".into()),
            ..Default::default()
        },
        shard: Some((0, 3)),
        ..ConvertOptions::default()
    };
    run(&[input], &other, opts);
    let err = rankfeed::merge::merge(
        &[shards[0].clone(), other],
        &dir.path().join("bad"),
        WriterOptions::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("differ"), "{err}");
}
