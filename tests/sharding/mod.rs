//! Helpers shared by the tests of Parquet text input and sharded conversion (`interop.rs`,
//! `shards.rs`): Parquet text files as Polars writes them, a sharded conversion and its merge,
//! and the comparison of two datasets that must be the same.

// Each test crate uses a part of these.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{
    Float64Builder, LargeListBuilder, LargeStringBuilder, ListBuilder, StringBuilder,
};
use arrow_array::{ArrayRef, RecordBatch};
use parquet::arrow::ArrowWriter;
use rankfeed::convert::{convert, ConvertOptions, OnError};
use rankfeed::tokenizer::TextTokenizer;
use rankfeed::writer::WriterOptions;
use rankfeed::Dataset;

/// The bundled BERT tokenizer (loading costs ~0.1 s: load it once per test).
pub fn tokenizer() -> TextTokenizer {
    TextTokenizer::from_file(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sample/bert/tokenizer.json"),
    )
    .unwrap()
}

/// Write `rows` (query, pos, neg, optional pos_scores and prompt) as one Parquet file, typed
/// as Polars writes them: large_list<large_string> passages, large_string query, double scores.
pub fn text_parquet(path: &Path, rows: &[serde_json::Value]) {
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

/// [`text_parquet`] with row groups of `per_group` rows.
pub fn text_parquet_row_groups(path: &Path, rows: &[serde_json::Value], per_group: usize) {
    let tmp = path.with_extension("one.parquet");
    text_parquet(&tmp, rows);
    let file = std::fs::File::open(&tmp).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let batches: Vec<RecordBatch> = reader.map(|b| b.unwrap()).collect();
    let props = parquet::file::properties::WriterProperties::builder()
        .set_max_row_group_row_count(Some(per_group))
        .build();
    let mut w = ArrowWriter::try_new(
        std::fs::File::create(path).unwrap(),
        batches[0].schema(),
        Some(props),
    )
    .unwrap();
    for b in &batches {
        w.write(b).unwrap();
    }
    w.close().unwrap();
    std::fs::remove_file(tmp).unwrap();
}

/// Convert `inputs` into `out` (shard `shard`, or all of it) under the policy.
pub fn convert_into(
    tokenizer: &TextTokenizer,
    inputs: &[PathBuf],
    out: &Path,
    shard: Option<(usize, usize)>,
    on_error: OnError,
) -> rankfeed::Result<rankfeed::Manifest> {
    let opts = ConvertOptions {
        shard,
        on_error,
        ..ConvertOptions::default()
    };
    convert(inputs, tokenizer, out, &opts, &mut |_| {}).map(|r| r.manifest)
}

/// Convert shards `0..n` of `inputs` into `dir/shard-{n}-{k}` and merge them into
/// `dir/merged-{n}`, which is returned.
pub fn shard_and_merge(
    tokenizer: &TextTokenizer,
    inputs: &[PathBuf],
    dir: &Path,
    n: usize,
    on_error: OnError,
) -> rankfeed::Result<PathBuf> {
    let shards = (0..n)
        .map(|k| {
            let out = dir.join(format!("shard-{n}-{k}"));
            convert_into(tokenizer, inputs, &out, Some((k, n)), on_error).map(|_| out)
        })
        .collect::<rankfeed::Result<Vec<PathBuf>>>()?;
    let merged = dir.join(format!("merged-{n}"));
    rankfeed::merge::merge(&shards, &merged, WriterOptions::default())?;
    Ok(merged)
}

/// How datasets `a` and `b` differ in their columns (every `.arrow` file byte for byte).
pub fn column_differences(a: &Path, b: &Path) -> Vec<String> {
    ["groups.arrow", "passages.arrow", "prompts.arrow"]
        .into_iter()
        .filter(|name| std::fs::read(a.join(name)).unwrap() != std::fs::read(b.join(name)).unwrap())
        .map(|name| format!("{name} differs"))
        .collect()
}

/// Assert that datasets `a` and `b` have the same columns.
pub fn same_columns(a: &Path, b: &Path) {
    let d = column_differences(a, b);
    assert!(d.is_empty(), "{}", d.join("; "));
}

/// How a conversion and the merge of its shards differ. They must be the same in the files
/// and in the manifest's sources and stats: everything but the files' own checksums (equal
/// files give equal sums anyway) and timestamps, of which there are none.
pub fn dataset_differences(a: &Path, b: &Path) -> Vec<String> {
    let mut d = column_differences(a, b);
    let read = |p: &Path| Dataset::open(p).unwrap().manifest().clone();
    let (ma, mb) = (read(a), read(b));
    if ma.sources != mb.sources {
        d.push(format!(
            "sources and stats: {:?} != {:?}",
            ma.sources, mb.sources
        ));
    }
    if ma.counts != mb.counts {
        d.push(format!("counts: {:?} != {:?}", ma.counts, mb.counts));
    }
    if ma.files != mb.files {
        d.push(format!(
            "file sizes and checksums (rejects.jsonl included): {:?} != {:?}",
            ma.files, mb.files
        ));
    }
    d
}

/// Assert that a conversion and the merge of its shards are the same (see
/// [`dataset_differences`]).
pub fn same_dataset(a: &Path, b: &Path) {
    let d = dataset_differences(a, b);
    assert!(d.is_empty(), "{}", d.join("\n"));
}
