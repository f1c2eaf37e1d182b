//! Open time and memory of a large dataset (>= 5M groups, random ids, no tokenizer).
//!
//!     cargo bench --bench open
//!
//! Prints: warm open time (median of 20), RSS growth after open, open + first group, the
//! per-access cost of a random group with its passages, and the full linear validation time.
//! The dataset is written once into target/bench-data/open-5m (about 1.2 GB) and reused.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use std::sync::Arc;

mod common;

use rankfeed::collate::CollateOptions;
use rankfeed::loader::{Loader, LoaderOptions};
use rankfeed::sample::KeyedRng;
use rankfeed::Dataset;

const GROUPS: usize = 5_000_000;
const PASSAGES: usize = 1_000_000;

fn build(out: &Path) {
    let t = Instant::now();
    common::write_synthetic(
        out,
        &common::Synthetic {
            groups: GROUPS,
            passages: PASSAGES,
            passage_len: (16, 96),
            query_len: (4, 28),
            negatives: (1, 15),
            seed: 1,
        },
    );
    eprintln!(
        "wrote {} in {:.1} s",
        out.display(),
        t.elapsed().as_secs_f64()
    );
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-data/open-5m-v2");
    let reusable = Dataset::open(&dir).is_ok_and(|d| d.len() == GROUPS);
    if !reusable {
        build(&dir);
    }
    // Warm the page cache, then measure in a fresh state each time.
    Dataset::open(&dir).unwrap().validate().unwrap();

    let rss0 = rss_bytes();
    let t = Instant::now();
    let ds = Dataset::open(&dir).unwrap();
    let first_open = t.elapsed();
    let rss1 = rss_bytes();
    let g = ds.group(0).unwrap();
    let _ = ds.passage(g.pos[0]).unwrap();
    let rss2 = rss_bytes();
    drop(ds);

    let opens: Vec<Duration> = (0..20)
        .map(|_| {
            let t = Instant::now();
            let ds = Dataset::open(&dir).unwrap();
            let e = t.elapsed();
            std::hint::black_box(ds.len());
            e
        })
        .collect();
    let open_first: Vec<Duration> = (0..20)
        .map(|_| {
            let t = Instant::now();
            let ds = Dataset::open(&dir).unwrap();
            let g = ds.group(GROUPS / 2).unwrap();
            let n: usize = g
                .pos
                .iter()
                .chain(g.neg)
                .map(|&id| ds.passage(id).unwrap().len())
                .sum();
            std::hint::black_box(n);
            t.elapsed()
        })
        .collect();

    // Open, create a loader (B=4, G=16, q32/p192), collate the first batch.
    let open_loader_batch: Vec<Duration> = (0..20)
        .map(|_| {
            let t = Instant::now();
            let ds = Arc::new(Dataset::open(&dir).unwrap());
            let mut loader = Loader::new(
                ds,
                LoaderOptions {
                    batch_size: 4,
                    prefetch_threads: 0,
                    collate: CollateOptions {
                        group_size: 16,
                        query_max_len: 32,
                        passage_max_len: 192,
                        pad_id: Some(0),
                        ..CollateOptions::default()
                    },
                    ..LoaderOptions::default()
                },
            )
            .unwrap();
            std::hint::black_box(loader.next().unwrap().unwrap());
            t.elapsed()
        })
        .collect();

    let ds = Dataset::open(&dir).unwrap();
    let mut rng = KeyedRng::new(&[99]);
    let n = 1_000_000;
    let t = Instant::now();
    let mut tokens = 0usize;
    for _ in 0..n {
        let g = ds.group(rng.below(GROUPS as u64) as usize).unwrap();
        tokens += g.query.len();
        for &id in g.pos.iter().chain(g.neg) {
            tokens += ds.passage(id).unwrap().len();
        }
    }
    let per_group = t.elapsed() / n;
    std::hint::black_box(tokens);
    let t = Instant::now();
    ds.validate().unwrap();
    let validate = t.elapsed();
    let bytes: u64 = ds.manifest().files.values().map(|f| f.bytes).sum();

    println!(
        "open bench: {} groups, {} passages, {:.2} GB on disk",
        ds.len(),
        ds.num_passages(),
        bytes as f64 / 1e9
    );
    println!(
        "  open (warm, median of 20): {:.3} ms (target < 50 ms); first open in this process {:.3} ms",
        median(opens).as_secs_f64() * 1e3,
        first_open.as_secs_f64() * 1e3
    );
    println!(
        "  RSS growth after open: {:.2} MiB (target < 64 MiB); after reading one group: {:.2} MiB",
        (rss1.saturating_sub(rss0)) as f64 / (1 << 20) as f64,
        (rss2.saturating_sub(rss0)) as f64 / (1 << 20) as f64
    );
    println!(
        "  open + first group with its passages (median of 20): {:.3} ms",
        median(open_first).as_secs_f64() * 1e3
    );
    println!(
        "  open + loader + first collated batch (B=4, G=16; median of 20): {:.3} ms (target < 10 ms)",
        median(open_loader_batch).as_secs_f64() * 1e3
    );
    println!(
        "  random group + all its passages (checked, zero-copy): {} ns",
        per_group.as_nanos()
    );
    println!(
        "  full validation (every offset, id, score and the checksums; linear): {:.2} s ({:.2} GB/s)",
        validate.as_secs_f64(),
        bytes as f64 / validate.as_secs_f64() / 1e9
    );
}
