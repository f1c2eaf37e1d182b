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
use rankfeed::writer::WriterOptions;

mod common;
use rankfeed::Dataset;

const GROUPS: usize = 300_000;
const PASSAGES: usize = 100_000;

fn main() {
    let base = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-data/interop");
    let dir = base.join("ds");
    if Dataset::open(&dir).map(|d| d.len()).unwrap_or(0) != GROUPS {
        common::write_synthetic(
            &dir,
            &common::Synthetic {
                groups: GROUPS,
                passages: PASSAGES,
                passage_len: (24, 96),
                query_len: (4, 28),
                negatives: (16, 0),
                seed: 7,
            },
        );
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
        None,
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
