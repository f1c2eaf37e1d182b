//! The remote cache (feature `remote`) over `file://` URLs, the same code as S3 but for the
//! client: a fetched copy is the sealed bytes; a stale entry is never used; many openers
//! download once; and, over seeded random damage to the remote files (a flipped byte, a cut,
//! an extension, a removed or an extra file, an edited manifest), a fetch either gives the
//! sealed dataset or a clean error, and the cache never holds an entry that fails a full
//! verification. `RANKFEED_LONG=<factor>` multiplies the cases.
#![cfg(feature = "remote")]

mod support;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};

use rankfeed::convert::{convert, ConvertOptions};
use rankfeed::remote::{self, Cache};
use rankfeed::sample::KeyedRng;
use rankfeed::tokenizer::TextTokenizer;
use rankfeed::Dataset;

const ROWS: &str = concat!(
    r#"{"query":"q1","pos":["alpha beta"],"neg":["gamma","delta epsilon"]}"#,
    "\n",
    r#"{"query":"q2","pos":["zeta"],"neg":["gamma","eta theta iota"],"pos_scores":[1],"neg_scores":[0.5,0.2]}"#,
    "\n",
    r#"{"query":"q3","pos":["kappa"],"neg":["alpha beta"],"prompt":"Judge."}"#,
    "\n",
);

fn tokenizer() -> TextTokenizer {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sample/bert/tokenizer.json");
    TextTokenizer::from_file(&path).unwrap()
}

fn dataset(dir: &Path, name: &str, rows_per_batch: usize) -> PathBuf {
    let input = dir.join(format!("{name}.jsonl"));
    std::fs::write(&input, ROWS).unwrap();
    let out = dir.join(name);
    let mut options = ConvertOptions::default();
    options.writer.rows_per_batch = rows_per_batch;
    convert(&[input], &tokenizer(), &out, &options, &mut |_| {}).unwrap();
    out
}

fn url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

fn same_files(a: &Path, b: &Path) {
    let mut names: Vec<_> = std::fs::read_dir(a)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    for n in names {
        assert_eq!(
            std::fs::read(a.join(&n)).unwrap(),
            std::fs::read(b.join(&n)).unwrap(),
            "{n:?}"
        );
    }
}

fn entries(cache: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(cache) else {
        return Vec::new();
    };
    rd.map(|e| e.unwrap().path())
        .filter(|p| p.is_dir() && p.file_name().unwrap().len() == 16)
        .collect()
}

#[test]
fn a_fetched_copy_is_the_sealed_bytes_and_a_stale_entry_is_never_used() {
    let tmp = tempfile::tempdir().unwrap();
    let src = dataset(tmp.path(), "a", 2);
    let remote_dir = tmp.path().join("remote/ds");
    let up = remote::upload(&src, &url(&remote_dir), false).unwrap();
    assert_eq!(up.files, 4);
    let cache = Cache::new(Some(tmp.path().join("cache")), None);
    let first = remote::fetch(&url(&remote_dir), &cache).unwrap();
    assert!(first.report.downloaded);
    same_files(&src, &first.dir);
    let again = remote::fetch(&url(&remote_dir), &cache).unwrap();
    assert!(!again.report.downloaded);
    // Another dataset at the same URL: another seal, fetched, never the old copy.
    let other = dataset(tmp.path(), "b", 1);
    assert!(matches!(
        remote::upload(&other, &url(&remote_dir), false),
        Err(rankfeed::Error::Exists { .. })
    ));
    remote::upload(&other, &url(&remote_dir), true).unwrap();
    let third = remote::fetch(&url(&remote_dir), &cache).unwrap();
    assert!(third.report.downloaded);
    assert_ne!(third.report.seal, first.report.seal);
    same_files(&other, &third.dir);
}

#[test]
fn eight_openers_at_once_download_once() {
    let tmp = tempfile::tempdir().unwrap();
    let src = dataset(tmp.path(), "a", 2);
    let remote_dir = tmp.path().join("remote");
    remote::upload(&src, &url(&remote_dir), false).unwrap();
    let cache = Cache::new(Some(tmp.path().join("cache")), None);
    let barrier = Arc::new(Barrier::new(8));
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let (cache, barrier, u) = (cache.clone(), barrier.clone(), url(&remote_dir));
            std::thread::spawn(move || {
                barrier.wait();
                let (ds, report) = remote::open(&u, &cache).unwrap();
                assert_eq!(ds.len(), 3);
                report.report.downloaded
            })
        })
        .collect();
    let downloads: usize = handles
        .into_iter()
        .map(|h| h.join().unwrap() as usize)
        .sum();
    assert_eq!(downloads, 1);
}

/// Damage one thing of the remote copy at `dir`; returns what was done.
fn damage(dir: &Path, case: u64) -> String {
    let mut rng = KeyedRng::new(&[21, case]);
    let files = [
        "groups.arrow",
        "passages.arrow",
        "prompts.arrow",
        "manifest.json",
    ];
    let f = files[rng.below(files.len() as u64) as usize];
    let path = dir.join(f);
    let mut bytes = std::fs::read(&path).unwrap();
    let what = rng.below(5);
    let at = rng.below(bytes.len() as u64) as usize;
    match what {
        0 => {
            bytes[at] ^= 1 << rng.below(8);
            std::fs::write(&path, &bytes).unwrap();
            format!("flipped a bit of {f} at {at}")
        }
        1 => {
            bytes.truncate(at);
            std::fs::write(&path, &bytes).unwrap();
            format!("cut {f} at {at}")
        }
        2 => {
            bytes.extend_from_slice(b"more");
            std::fs::write(&path, &bytes).unwrap();
            format!("extended {f}")
        }
        3 => {
            std::fs::remove_file(&path).unwrap();
            format!("removed {f}")
        }
        _ => {
            std::fs::write(dir.join("rejects.jsonl"), b"{}\n").unwrap();
            "added rejects.jsonl".into()
        }
    }
}

#[test]
fn damaged_remote_files_give_the_sealed_dataset_or_a_clean_error_never_a_corrupt_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let src = dataset(tmp.path(), "a", 2);
    let cases = 60 * support::long();
    let (mut errors, mut fine) = (0, 0);
    for case in 0..cases {
        let remote_dir = tmp.path().join(format!("r{case}"));
        remote::upload(&src, &url(&remote_dir), false).unwrap();
        let what = damage(&remote_dir, case);
        let cache = Cache::new(Some(tmp.path().join(format!("c{case}"))), None);
        match remote::fetch(&url(&remote_dir), &cache) {
            Ok(f) => {
                // Only damage the dataset does not read may pass: an extra file beside it.
                assert_eq!(what, "added rejects.jsonl", "{what} was fetched");
                same_files(&src, &f.dir);
                fine += 1;
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(
                    msg.contains(&remote_dir.display().to_string()),
                    "{what}: {msg}"
                );
                errors += 1;
            }
        }
        for entry in entries(&cache.dir) {
            let ds = Dataset::open(&entry).unwrap_or_else(|e| panic!("{what}: {e}"));
            ds.validate().unwrap_or_else(|e| panic!("{what}: {e}"));
            same_files(&src, &entry);
        }
        let _ = std::fs::remove_dir_all(&remote_dir);
    }
    println!("{cases} damaged remote copies: {errors} clean errors, {fine} fetched exactly; 0 corrupt caches");
    assert!(errors > 0);
}

#[test]
fn a_corrupt_local_dataset_is_never_uploaded() {
    let tmp = tempfile::tempdir().unwrap();
    let src = dataset(tmp.path(), "a", 2);
    let p = src.join("passages.arrow");
    let mut b = std::fs::read(&p).unwrap();
    let n = b.len();
    b[n / 2] ^= 0x40;
    std::fs::write(&p, &b).unwrap();
    let remote_dir = tmp.path().join("remote");
    let e = remote::upload(&src, &url(&remote_dir), false).unwrap_err();
    assert!(e.is_corrupt(), "{e}");
    assert!(!remote_dir.join("manifest.json").exists());
}
