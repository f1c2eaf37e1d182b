//! Conversion throughput against the raw `tokenizers` throughput on the same unique texts,
//! and the speed-up deduplication gives on data whose passages repeat. One process, same data.
//!
//!     cargo bench --bench convert
//!
//! Data: every usable WordNet noun synset (76k groups, ~810k passage references, built by
//! tools/make_sample.py from Debian's wordnet-base) when /usr/share/wordnet is present,
//! else the bundled 3k-row sample. Set RANKFEED_BENCH_JSONL to use your own file.

use std::collections::HashSet;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rankfeed::convert::{convert, ConvertOptions};
use rankfeed::tokenizer::TextTokenizer;
use rankfeed::writer::WriterOptions;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn bench_data() -> PathBuf {
    if let Ok(p) = std::env::var("RANKFEED_BENCH_JSONL") {
        return PathBuf::from(p);
    }
    let wordnet = Path::new("/usr/share/wordnet/data.noun");
    if wordnet.exists() {
        let out = root().join("target/bench-data/wordnet-all.jsonl");
        if !out.exists() {
            std::fs::create_dir_all(out.parent().unwrap()).unwrap();
            let status = std::process::Command::new("python3")
                .arg(root().join("tools/make_sample.py"))
                .args(["--rows", "0", "--out"])
                .arg(&out)
                .status()
                .expect("python3 runs");
            assert!(status.success(), "make_sample.py failed");
        }
        return out;
    }
    eprintln!("(wordnet-base not installed: using the bundled sample)");
    root().join("data/sample/wordnet-nouns.jsonl.gz")
}

fn read_rows(path: &Path) -> Vec<serde_json::Value> {
    let file = std::fs::File::open(path).unwrap();
    let reader: Box<dyn BufRead> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(std::io::BufReader::new(flate2::read::MultiGzDecoder::new(
            file,
        )))
    } else {
        Box::new(std::io::BufReader::new(file))
    };
    reader
        .lines()
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
        .collect()
}

fn as_refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn main() {
    let threads = rayon::current_num_threads();
    let data = bench_data();
    let tok = TextTokenizer::from_file(root().join("data/sample/bert/tokenizer.json")).unwrap();
    let rows = read_rows(&data);
    // The texts a converter must tokenize: every query, each unique passage, each unique prompt.
    let mut unique: Vec<String> = Vec::new();
    let mut all_refs: Vec<String> = Vec::new();
    let mut seen = HashSet::new();
    for r in &rows {
        unique.push(r["query"].as_str().unwrap().to_string());
        all_refs.push(r["query"].as_str().unwrap().to_string());
        for p in r["pos"]
            .as_array()
            .unwrap()
            .iter()
            .chain(r["neg"].as_array().unwrap())
        {
            let p = p.as_str().unwrap().to_string();
            all_refs.push(p.clone());
            if seen.insert(p.clone()) {
                unique.push(p);
            }
        }
        if let Some(p) = r.get("prompt").and_then(|p| p.as_str()) {
            if seen.insert(p.to_string()) {
                unique.push(p.to_string());
            }
        }
    }
    let raw = |texts: &[&str]| {
        // Chunked like a streaming converter must be, in large chunks (favours raw).
        let t = Instant::now();
        let mut tokens = 0usize;
        for c in texts.chunks(65536) {
            tokens += tok
                .encode_batch(c)
                .unwrap()
                .iter()
                .map(Vec::len)
                .sum::<usize>();
        }
        (t.elapsed().as_secs_f64(), tokens)
    };
    let unique_refs = as_refs(&unique);
    let _ = raw(&unique_refs[..unique_refs.len().min(20000)]); // warm up
    let out = root().join("target/bench-data/convert-out");
    let opts = ConvertOptions {
        writer: WriterOptions {
            overwrite: true,
            ..WriterOptions::default()
        },
        ..ConvertOptions::default()
    };
    // Interleaved, best of 3 each, so machine noise hits both sides alike.
    let (mut best, mut raw_s, mut raw_tokens) = (f64::MAX, f64::MAX, 0);
    let mut report = None;
    for _ in 0..3 {
        let (s, t) = raw(&unique_refs);
        raw_s = raw_s.min(s);
        raw_tokens = t;
        let r = convert(std::slice::from_ref(&data), &tok, &out, &opts, &mut |_| {}).unwrap();
        best = best.min(r.elapsed.as_secs_f64());
        report = Some(r);
    }
    let report = report.unwrap();
    let m = &report.manifest;
    let conv_tokens = report.tokens_tokenized as f64;
    let (all_s, all_tokens) = raw(&as_refs(&all_refs));

    println!(
        "convert bench: {} ({} rows), {threads} threads",
        data.display(),
        rows.len()
    );
    println!(
        "  raw tokenizers (encode_batch, same {} unique texts): {:.3} s, {:.3} M tokens/s (best of 3)",
        unique.len(),
        raw_s,
        raw_tokens as f64 / raw_s / 1e6
    );
    println!(
        "  rankfeed convert (read+check+dedup+tokenize+write):  {:.3} s, {:.3} M tokens/s (best of 3)",
        best,
        conv_tokens / best / 1e6
    );
    println!(
        "  ratio convert/raw tokens/s: {:.2} (target >= 0.85)",
        (conv_tokens / best) / (raw_tokens as f64 / raw_s)
    );
    println!(
        "  dedup: {} passage refs -> {} unique (ratio {:.2}); tokenizing every query+ref without dedup takes {:.3} s ({} tokens)",
        m.counts.passage_refs,
        m.counts.passages,
        m.counts.dedup_ratio(),
        all_s,
        all_tokens
    );
    println!(
        "  time inside the tokenizer during convert: {:.3} s of {:.3} s",
        report.tokenize_time.as_secs_f64(),
        report.elapsed.as_secs_f64()
    );
    println!(
        "  speed-up from dedup (no-dedup tokenize time / convert time): {:.2}x",
        all_s / best
    );
}
