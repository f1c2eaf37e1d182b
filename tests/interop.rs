//! Parquet export/import, Parquet text input, sharded conversion and merge.

mod sharding;

use std::path::{Path, PathBuf};

use rankfeed::convert::{convert, ConvertOptions, OnError};
use rankfeed::export::{export, ExportOptions, Layout};
use rankfeed::writer::WriterOptions;
use rankfeed::Dataset;
use sharding::{
    convert_into, same_columns, same_dataset, shard_and_merge, text_parquet,
    text_parquet_row_groups, tokenizer,
};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(inputs: &[PathBuf], out: &Path, opts: ConvertOptions) -> rankfeed::Manifest {
    convert(inputs, &tokenizer(), out, &opts, &mut |_| {})
        .unwrap()
        .manifest
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
                rankfeed::import::import(&[out], &back, None, WriterOptions::default()).unwrap();
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

/// Issue 11, observation 4: sharding was by whole files, so one large file went to the last
/// shard (the others empty) and the merged sources were wrong. Now one file shards by bytes,
/// line-aligned, and any N merges into the single conversion, stats and rejects included.
#[test]
fn one_jsonl_file_shards_by_bytes_and_merges_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(root().join("tests/fixtures/roundtrip.jsonl")).unwrap();
    let mut big = String::from("\u{feff}\n  \n\r\n");
    for (i, line) in text.lines().enumerate() {
        big.push_str(line);
        big.push('\n');
        if i % 17 == 0 {
            big.push_str("\n{not json\n");
        }
        if i % 29 == 0 {
            big.push_str(r#"{"query": "q", "pos": ["a"], "neg": ["b"], "extra": 1}"#);
            big.push('\n');
        }
    }
    let input = dir.path().join("train.jsonl");
    std::fs::write(&input, &big).unwrap();
    let (tok, inputs) = (tokenizer(), std::slice::from_ref(&input));
    let whole = dir.path().join("whole");
    convert_into(&tok, inputs, &whole, None, OnError::Skip).unwrap();
    for n in [1, 2, 3, 4, 7, 64] {
        let merged = shard_and_merge(&tok, inputs, dir.path(), n, OnError::Skip).unwrap();
        same_dataset(&whole, &merged);
        // Every shard did a part of the work.
        if n == 4 {
            for k in 0..4 {
                let m = Dataset::open(dir.path().join(format!("shard-4-{k}"))).unwrap();
                assert!(m.len() > 20, "shard {k} has {} rows", m.len());
                assert_eq!(m.manifest().sources.len(), 1);
            }
        }
    }
}

#[test]
fn parquet_and_mixed_inputs_shard_and_merge_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let rows: Vec<serde_json::Value> =
        std::fs::read_to_string(root().join("tests/fixtures/roundtrip.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    // Parquet with several row groups.
    let pq = dir.path().join("train.parquet");
    text_parquet_row_groups(&pq, &rows, 16);
    let tok = tokenizer();
    let whole = dir.path().join("whole");
    convert_into(&tok, std::slice::from_ref(&pq), &whole, None, OnError::Fail).unwrap();
    let merged = shard_and_merge(
        &tok,
        std::slice::from_ref(&pq),
        dir.path(),
        4,
        OnError::Fail,
    );
    same_dataset(&whole, &merged.unwrap());
    assert!(!Dataset::open(dir.path().join("shard-4-0"))
        .unwrap()
        .is_empty());
    // A directory mixing a large JSON lines file, a gzipped one and a JSON array.
    let mixed = dir.path().join("mixed");
    std::fs::create_dir(&mixed).unwrap();
    let lines: Vec<String> = rows.iter().map(|r| r.to_string()).collect();
    std::fs::write(mixed.join("a.jsonl"), lines[..120].join("\n")).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, lines[120..150].join("\n").as_bytes()).unwrap();
    std::fs::write(mixed.join("b.jsonl.gz"), gz.finish().unwrap()).unwrap();
    std::fs::write(
        mixed.join("c.json"),
        format!("[{}]", lines[150..].join(",\n")),
    )
    .unwrap();
    let (inputs, out) = (std::slice::from_ref(&mixed), dir.path().join("mixed-out"));
    convert_into(&tok, inputs, &out.join("whole"), None, OnError::Fail).unwrap();
    for n in [2, 5] {
        let merged = shard_and_merge(&tok, inputs, &out, n, OnError::Fail).unwrap();
        same_dataset(&out.join("whole"), &merged);
    }
    // The files that cannot be split are converted whole, with a warning.
    let warnings: Vec<String> = (0..2)
        .flat_map(|k| {
            let opts = ConvertOptions {
                shard: Some((k, 2)),
                ..ConvertOptions::default()
            };
            let out = dir.path().join(format!("warn-{k}"));
            convert(std::slice::from_ref(&mixed), &tok, &out, &opts, &mut |_| {})
                .unwrap()
                .warnings
        })
        .collect();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings
        .iter()
        .any(|w| w.contains("b.jsonl.gz: compressed")));
    assert!(warnings.iter().any(|w| w.contains("c.json: a JSON array")));
}
