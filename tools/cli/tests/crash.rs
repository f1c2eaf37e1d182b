//! Crash safety of publishing, with the real `rankfeed` binary:
//! - the process aborted at each step of publishing (`RANKFEED_CRASH_AT`), to a new output
//!   path and over an old dataset with `--overwrite`;
//! - `kill -9` at random moments of a real conversion over an old dataset (20 trials);
//!
//! After each, the output path is either absent (a new path, crash before the rename) or a
//! dataset that opens and verifies as the old one or the new one, never anything else; the
//! next run to the same path removes the staging directory left behind, and says so.
//! Export publishes the same way (checked at each step too).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use rankfeed::publish::CRASH_POINTS;
use rankfeed::sample::KeyedRng;
use rankfeed::Dataset;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_rankfeed"))
}

fn tokenizer() -> PathBuf {
    root().join("data/sample/bert/tokenizer.json")
}

fn convert(inputs: &[PathBuf], out: &Path, crash_at: Option<&str>) -> Output {
    let mut c = bin();
    c.arg("convert")
        .args(inputs)
        .arg("--tokenizer")
        .arg(tokenizer())
        .arg("-o")
        .arg(out)
        .arg("--overwrite")
        .args(["--threads", "1"]);
    if let Some(step) = crash_at {
        c.env("RANKFEED_CRASH_AT", step);
    }
    c.output().unwrap()
}

/// The number of groups of the dataset at `out` after a full verify, or None when absent.
fn state(out: &Path) -> Option<usize> {
    if !out.exists() {
        return None;
    }
    let ds = Dataset::open(out).unwrap_or_else(|e| panic!("{}: {e}", out.display()));
    ds.validate()
        .unwrap_or_else(|e| panic!("{} does not verify: {e}", out.display()));
    Some(ds.len())
}

fn staging_dirs(parent: &Path) -> Vec<String> {
    std::fs::read_dir(parent)
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            n.contains(".rankfeed-tmp-").then_some(n)
        })
        .collect()
}

struct Inputs {
    small: Vec<PathBuf>,
    large: Vec<PathBuf>,
}

fn inputs(dir: &Path) -> Inputs {
    let small = root().join("tests/fixtures/roundtrip.jsonl");
    let sample = root().join("data/sample/wordnet-nouns.jsonl.gz");
    let large = (0..4)
        .map(|i| {
            let p = dir.join(format!("part{i}.jsonl.gz"));
            std::fs::copy(&sample, &p).unwrap();
            p
        })
        .collect();
    Inputs {
        small: vec![small],
        large,
    }
}

/// Rerun without a crash: succeeds, reports and removes every staging directory.
fn rerun_cleans(parent: &Path, inputs: &[PathBuf], out: &Path) {
    let left = staging_dirs(parent);
    let o = convert(inputs, out, None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stderr = String::from_utf8_lossy(&o.stderr);
    for d in &left {
        assert!(stderr.contains(d.as_str()), "{d} not reported: {stderr}");
    }
    assert_eq!(staging_dirs(parent), Vec::<String>::new());
}

#[test]
fn a_crash_at_each_publish_step_leaves_old_or_new() {
    let tmp = tempfile::tempdir().unwrap();
    let inp = inputs(tmp.path());
    let parent = tmp.path().join("out");
    std::fs::create_dir(&parent).unwrap();
    let out = parent.join("ds");
    let old_groups = {
        assert!(convert(&inp.small, &out, None).status.success());
        state(&out).unwrap()
    };
    for (i, step) in CRASH_POINTS.iter().enumerate() {
        // Over an old dataset.
        let o = convert(&inp.large, &out, Some(step));
        assert!(!o.status.success(), "{step}: did not crash");
        let now = state(&out).expect("the output path always names a dataset");
        let renamed = i >= 2;
        assert_eq!(now == old_groups, !renamed, "{step}: {now} groups");
        rerun_cleans(&parent, &inp.small, &out);
        assert_eq!(state(&out), Some(old_groups));
        // To a new path.
        let fresh = parent.join(format!("fresh{i}"));
        let o = convert(&inp.small, &fresh, Some(step));
        assert!(!o.status.success());
        assert_eq!(state(&fresh), renamed.then_some(old_groups), "{step}");
        let _ = std::fs::remove_dir_all(&fresh);
        rerun_cleans(&parent, &inp.small, &fresh);
    }
    eprintln!(
        "crash points: {} steps x (overwrite, new path): output always old or new, staging removed by the next run",
        CRASH_POINTS.len()
    );
}

#[test]
fn export_crash_at_each_step_leaves_old_or_new() {
    let tmp = tempfile::tempdir().unwrap();
    let inp = inputs(tmp.path());
    let ds = tmp.path().join("ds");
    assert!(convert(&inp.small, &ds, None).status.success());
    let out = tmp.path().join("pq");
    let export = |layout: &str, crash: Option<&str>| {
        let mut c = bin();
        c.args(["export", "--overwrite", "--layout", layout])
            .arg(&ds)
            .arg("-o")
            .arg(&out);
        if let Some(s) = crash {
            c.env("RANKFEED_CRASH_AT", s);
        }
        c.output().unwrap()
    };
    assert!(export("flat", None).status.success());
    for (i, step) in CRASH_POINTS.iter().enumerate() {
        assert!(!export("tables", Some(step)).status.success());
        // flat has part files at the top; tables has subdirectories.
        let tables = out.join("groups").is_dir();
        assert_eq!(tables, i >= 2, "{step}");
        assert_eq!(out.join("part-00000.parquet").is_file(), i < 2, "{step}");
        let o = export("flat", None);
        assert!(o.status.success());
        assert_eq!(staging_dirs(tmp.path()), Vec::<String>::new());
    }
}

#[test]
fn kill_9_at_random_moments_leaves_old_or_new() {
    let tmp = tempfile::tempdir().unwrap();
    let inp = inputs(tmp.path());
    let parent = tmp.path().join("out");
    std::fs::create_dir(&parent).unwrap();
    let out = parent.join("ds");
    assert!(convert(&inp.small, &out, None).status.success());
    let old_groups = state(&out).unwrap();
    // How long one large conversion takes here, to spread the kills over it.
    let t = Instant::now();
    assert!(convert(&inp.large, &out, None).status.success());
    let full = t.elapsed();
    let new_groups = state(&out).unwrap();
    assert_ne!(old_groups, new_groups);
    let mut rng = KeyedRng::new(&[0x9]);
    let (mut saw_old, mut saw_new) = (0, 0);
    assert!(convert(&inp.small, &out, None).status.success());
    for trial in 0..20 {
        // The old dataset is the small one (put back by the previous trial's rerun).
        let before = state(&out).unwrap();
        // Even trials anywhere in the run; odd ones around its end, where publishing happens.
        let us = full.as_micros() as u64;
        let delay = Duration::from_micros(if trial % 2 == 0 {
            rng.below(us * 11 / 10 + 1)
        } else {
            us * 8 / 10 + rng.below(us * 3 / 10 + 1)
        });
        let mut child = {
            let mut c = bin();
            c.arg("convert")
                .args(&inp.large)
                .arg("--tokenizer")
                .arg(tokenizer())
                .arg("-o")
                .arg(&out)
                .args(["--overwrite", "--threads", "1"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
            c.spawn().unwrap()
        };
        std::thread::sleep(delay);
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        let now = state(&out).expect("the output path always names a dataset");
        assert!(
            now == before || now == new_groups,
            "trial {trial}: {now} groups, expected {before} or {new_groups}"
        );
        if now == before && before != new_groups {
            saw_old += 1;
        } else {
            saw_new += 1;
        }
        rerun_cleans(&parent, &inp.small, &out);
    }
    eprintln!(
        "kill -9: 20 trials over a {:.2} s conversion: {saw_old} left the old dataset, {saw_new} the new one, 0 anything else; staging removed by the next run",
        full.as_secs_f64()
    );
}
