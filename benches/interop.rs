//! Parquet export and import throughput, one run, same dataset.
//!
//!     cargo bench --bench interop
//!
//! A dataset of 300k groups (16 negatives of 24-120 random token ids each, 100k unique passages)
//! is written once into target/bench-data/interop; then flat and tables exports, and the import
//! of the flat export, are timed.

use std::path::PathBuf;
use std::time::Instant;

use rankfeed::export::{export, ExportOptions, Layout};
use rankfeed::writer::{DatasetWriter, GroupRecord, ManifestInfo, WriterOptions};
use rankfeed::Dataset;

const GROUPS: usize = 300_000;
const PASSAGES: usize = 100_000;

fn main() {
    let base = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-data/interop");
    let dir = base.join("ds");
    if Dataset::open(&dir).map(|d| d.len()).unwrap_or(0) != GROUPS {
        let mut state = 7u64;
        let mut next = move |n: u64| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) % n
        };
        let mut w = DatasetWriter::create(
            &dir,
            WriterOptions {
                overwrite: true,
                ..Default::default()
            },
        )
        .unwrap();
        for _ in 0..2 {
            w.add_prompt(&[1, 2, 3]).unwrap();
        }
        for _ in 0..PASSAGES {
            let t: Vec<i32> = (0..24 + next(96)).map(|_| next(30000) as i32).collect();
            w.add_passage(&t).unwrap();
        }
        for _ in 0..GROUPS {
            let q: Vec<i32> = (0..4 + next(28)).map(|_| next(30000) as i32).collect();
            let pos = [next(PASSAGES as u64) as i32];
            let neg: Vec<i32> = (0..16).map(|_| next(PASSAGES as u64) as i32).collect();
            let ns: Vec<f32> = neg.iter().map(|_| next(1000) as f32 / 1000.0).collect();
            w.add_group(&GroupRecord {
                query: &q,
                pos: &pos,
                neg: &neg,
                pos_scores: Some(&[1.0]),
                neg_scores: Some(&ns),
                prompt: None,
                source: 0,
            })
            .unwrap();
        }
        w.finish(ManifestInfo {
            sources: vec![Default::default()],
            ..Default::default()
        })
        .unwrap();
    }
    let ds = Dataset::open(&dir).unwrap();
    let arrow_bytes: u64 = ds.manifest().files.values().map(|f| f.bytes).sum();
    let c = ds.manifest().counts.clone();
    let flat_token_bytes = 4 * (c.passage_ref_tokens + c.query_tokens);
    println!(
        "interop bench: {} groups, {} passages, {:.0} MB of Arrow files; the flat layout resolves {:.0} MB of token ids",
        ds.len(),
        ds.num_passages(),
        arrow_bytes as f64 / 1e6,
        flat_token_bytes as f64 / 1e6
    );
    for layout in [Layout::Flat, Layout::Tables] {
        let out = base.join(format!("{layout:?}").to_lowercase());
        let t = Instant::now();
        let r = export(
            &ds,
            &out,
            &ExportOptions {
                layout,
                overwrite: true,
                ..Default::default()
            },
        )
        .unwrap();
        let s = t.elapsed().as_secs_f64();
        let logical = if layout == Layout::Flat {
            flat_token_bytes
        } else {
            arrow_bytes
        };
        println!(
            "  export {layout:?}: {:.2} s, {:.0} MB/s of token data ({} files, {:.0} MB of zstd Parquet)",
            s,
            logical as f64 / 1e6 / s,
            r.files.len(),
            r.bytes as f64 / 1e6
        );
    }
    let flat = base.join("flat");
    let parquet_bytes: u64 = std::fs::read_dir(&flat)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    let t = Instant::now();
    let r = rankfeed::import::import(
        &[flat],
        &base.join("imported"),
        WriterOptions {
            overwrite: true,
            ..Default::default()
        },
    )
    .unwrap();
    let s = t.elapsed().as_secs_f64();
    println!(
        "  import flat: {:.2} s, {:.0} MB/s of token data ({:.0} MB/s of Parquet), {} rows, {} unique passages",
        s,
        flat_token_bytes as f64 / 1e6 / s,
        parquet_bytes as f64 / 1e6 / s,
        r.rows,
        r.manifest.counts.passages
    );
}
