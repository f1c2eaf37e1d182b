//! The writer and the zero-copy reader: round trips, and corrupt files that must be errors.

use std::path::Path;

use rankfeed::sample::KeyedRng;
use rankfeed::writer::{DatasetWriter, GroupRecord, ManifestInfo, WriterOptions};
use rankfeed::{Dataset, Error};

/// query, pos, neg, pos_scores, neg_scores, prompt, source
type GroupRow = (
    Vec<i32>,
    Vec<i32>,
    Vec<i32>,
    Option<Vec<f32>>,
    Option<Vec<f32>>,
    Option<u32>,
    u32,
);

struct Expected {
    passages: Vec<Vec<i32>>,
    groups: Vec<GroupRow>,
}

fn write_random(
    out: &Path,
    seed: u64,
    groups: usize,
    passages: usize,
    rows_per_batch: usize,
) -> Expected {
    let mut rng = KeyedRng::new(&[seed]);
    let mut w = DatasetWriter::create(
        out,
        WriterOptions {
            rows_per_batch,
            overwrite: true,
        },
    )
    .unwrap();
    let mut exp = Expected {
        passages: Vec::new(),
        groups: Vec::new(),
    };
    for _ in 0..3 {
        let t: Vec<i32> = (0..rng.below(5)).map(|_| rng.below(30000) as i32).collect();
        w.add_prompt(&t).unwrap();
    }
    for i in 0..passages {
        let t: Vec<i32> = (0..rng.below(40))
            .map(|_| rng.below(30000) as i32)
            .collect();
        assert_eq!(w.add_passage(&t).unwrap() as usize, i);
        exp.passages.push(t);
    }
    for _ in 0..groups {
        let q: Vec<i32> = (0..rng.below(20))
            .map(|_| rng.below(30000) as i32)
            .collect();
        let pos: Vec<i32> = (0..1 + rng.below(3))
            .map(|_| rng.below(passages as u64) as i32)
            .collect();
        let neg: Vec<i32> = (0..rng.below(9))
            .map(|_| rng.below(passages as u64) as i32)
            .collect();
        let ps = (rng.below(2) == 0).then(|| {
            pos.iter()
                .map(|_| rng.below(1000) as f32 / 7.0)
                .collect::<Vec<_>>()
        });
        let ns = (rng.below(2) == 0).then(|| {
            neg.iter()
                .map(|_| rng.below(1000) as f32 / 7.0)
                .collect::<Vec<_>>()
        });
        let prompt = (rng.below(3) == 0).then(|| rng.below(3) as u32);
        w.add_group(&GroupRecord {
            query: &q,
            pos: &pos,
            neg: &neg,
            pos_scores: ps.as_deref(),
            neg_scores: ns.as_deref(),
            prompt,
            source: 0,
        })
        .unwrap();
        exp.groups.push((q, pos, neg, ps, ns, prompt, 0));
    }
    w.finish(ManifestInfo {
        sources: vec![Default::default()],
        ..Default::default()
    })
    .unwrap();
    exp
}

#[test]
fn round_trip_across_many_batches() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ds");
    let exp = write_random(&out, 42, 1000, 300, 64);
    let ds = Dataset::open(&out).unwrap();
    ds.validate().unwrap();
    assert_eq!(
        (ds.len(), ds.num_passages(), ds.num_prompts()),
        (1000, 300, 3)
    );
    for (i, p) in exp.passages.iter().enumerate() {
        assert_eq!(ds.passage(i as i32).unwrap(), p.as_slice());
    }
    for (row, (q, pos, neg, ps, ns, prompt, source)) in exp.groups.iter().enumerate() {
        let g = ds.group(row).unwrap();
        assert_eq!(g.query, q.as_slice());
        assert_eq!(g.pos, pos.as_slice());
        assert_eq!(g.neg, neg.as_slice());
        assert_eq!(g.pos_scores, ps.as_deref());
        assert_eq!(g.neg_scores, ns.as_deref());
        assert_eq!(g.prompt, *prompt);
        assert_eq!(g.source, *source);
    }
    assert!(matches!(ds.group(1000), Err(Error::OutOfRange { .. })));
    assert!(matches!(ds.passage(300), Err(Error::OutOfRange { .. })));
    assert!(matches!(ds.passage(-1), Err(Error::OutOfRange { .. })));
    let m = ds.manifest();
    assert_eq!(m.counts.groups, 1000);
    assert_eq!(
        m.counts.passage_refs,
        exp.groups
            .iter()
            .map(|g| (g.1.len() + g.2.len()) as u64)
            .sum::<u64>()
    );
}

#[test]
fn an_unfinished_writer_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ds");
    {
        let mut w = DatasetWriter::create(&out, WriterOptions::default()).unwrap();
        w.add_passage(&[1, 2, 3]).unwrap();
    }
    assert!(!out.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Open, then read every row: all that a corrupt file may cause is an `Err`.
fn open_and_read_all(dir: &Path) -> Result<(), Error> {
    let ds = Dataset::open(dir)?;
    for row in 0..ds.len() {
        let g = ds.group(row)?;
        for &id in g.pos.iter().chain(g.neg) {
            ds.passage(id)?;
        }
        if let Some(p) = g.prompt {
            ds.prompt_tokens(p)?;
        }
    }
    ds.validate()
}

#[test]
fn truncated_files_are_errors_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good");
    write_random(&good, 7, 300, 100, 32);
    for name in ["groups.arrow", "passages.arrow", "prompts.arrow"] {
        for keep in [0usize, 7, 100, 1000] {
            let bad = dir.path().join(format!("t-{name}-{keep}"));
            copy_dir(&good, &bad);
            let bytes = std::fs::read(good.join(name)).unwrap();
            std::fs::write(bad.join(name), &bytes[..keep.min(bytes.len() - 1)]).unwrap();
            let err = Dataset::open(&bad).unwrap_err();
            assert!(
                matches!(err, Error::Corrupt { .. }),
                "{name} cut to {keep}: {err}"
            );
            assert!(err.to_string().contains(name), "{err}");
        }
    }
}

#[test]
fn flipped_bytes_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good");
    write_random(&good, 9, 200, 80, 16);
    let mut rng = KeyedRng::new(&[12345]);
    let mut errors = 0;
    for name in ["groups.arrow", "passages.arrow", "prompts.arrow"] {
        let bytes = std::fs::read(good.join(name)).unwrap();
        for trial in 0..150 {
            let bad = dir.path().join(format!("f-{name}-{trial}"));
            copy_dir(&good, &bad);
            let mut b = bytes.clone();
            for _ in 0..1 + rng.below(4) {
                let at = rng.below(b.len() as u64) as usize;
                b[at] ^= 1 << rng.below(8);
            }
            std::fs::write(bad.join(name), &b).unwrap();
            // Without the checksum check some flips are harmless (padding); with it, none is.
            if open_and_read_all(&bad).is_err() {
                errors += 1;
            }
            std::fs::remove_dir_all(&bad).unwrap();
        }
    }
    assert_eq!(
        errors, 450,
        "validate() catches every flipped bit through the checksum"
    );
}

#[test]
fn flipped_bytes_with_a_matching_checksum_never_panic() {
    // The checksum is only checked by validate(); here it is forged, so everything rests on
    // the structural checks at open and per access. Any result is fine but a panic.
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good");
    write_random(&good, 11, 200, 80, 16);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(good.join("manifest.json")).unwrap()).unwrap();
    let mut rng = KeyedRng::new(&[777]);
    let (mut ok, mut failed) = (0, 0);
    for name in ["groups.arrow", "passages.arrow", "prompts.arrow"] {
        let bytes = std::fs::read(good.join(name)).unwrap();
        for trial in 0..300 {
            let bad = dir.path().join(format!("g-{name}-{trial}"));
            copy_dir(&good, &bad);
            let mut b = bytes.clone();
            for _ in 0..1 + rng.below(3) {
                let at = rng.below(b.len() as u64) as usize;
                b[at] = rng.below(256) as u8;
            }
            std::fs::write(bad.join(name), &b).unwrap();
            let mut m = manifest.clone();
            m["files"][name]["xxh3_64"] = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&b)).into();
            write_resealed(&bad, &m);
            match std::panic::catch_unwind(|| open_and_read_all(&bad)) {
                Ok(Ok(())) => ok += 1,
                Ok(Err(_)) => failed += 1,
                Err(_) => panic!("{name} trial {trial}: a corrupt file made the reader panic"),
            }
            std::fs::remove_dir_all(&bad).unwrap();
        }
    }
    assert!(failed > 0 && ok + failed == 900, "ok {ok} failed {failed}");
}

/// Write `m` as the manifest of `dir` with a valid seal (what a forger would do).
fn write_resealed(dir: &Path, m: &serde_json::Value) {
    let mut bytes = serde_json::to_vec_pretty(m).unwrap();
    rankfeed::format::reseal(&mut bytes).unwrap();
    std::fs::write(dir.join("manifest.json"), bytes).unwrap();
}

#[test]
fn manifest_problems_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good");
    write_random(&good, 3, 10, 10, 4);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(good.join("manifest.json")).unwrap()).unwrap();
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "version",
            Box::new(|m| m["format_version"] = 99.into()),
            "version 99 is not supported",
        ),
        (
            "format",
            Box::new(|m| m["format"] = "other".into()),
            "not a rankfeed manifest",
        ),
        (
            "count",
            Box::new(|m| m["counts"]["groups"] = 11.into()),
            "the manifest says 11",
        ),
        (
            "batch",
            Box::new(|m| m["rows_per_batch"] = 3.into()),
            "every batch but the last",
        ),
        (
            "size",
            Box::new(|m| m["files"]["passages.arrow"]["bytes"] = 5.into()),
            "truncated or replaced",
        ),
    ];
    for (name, edit, expect) in cases {
        let bad = dir.path().join(name);
        copy_dir(&good, &bad);
        let mut m = manifest.clone();
        edit(&mut m);
        // Edited as is: the seal catches it.
        std::fs::write(
            bad.join("manifest.json"),
            serde_json::to_vec_pretty(&m).unwrap(),
        )
        .unwrap();
        let err = Dataset::open(&bad).unwrap_err();
        assert!(err.is_corrupt(), "{name}: {err}");
        // Edited and resealed: the check behind the seal catches it too.
        write_resealed(&bad, &m);
        let err = Dataset::open(&bad).unwrap_err();
        assert!(err.to_string().contains(expect), "{name}: {err}");
    }
    let bad = dir.path().join("garbage");
    copy_dir(&good, &bad);
    std::fs::write(bad.join("manifest.json"), b"{not json").unwrap();
    assert!(matches!(Dataset::open(&bad), Err(Error::Corrupt { .. })));
    std::fs::remove_file(bad.join("manifest.json")).unwrap();
    assert!(matches!(Dataset::open(&bad), Err(Error::Io { .. })));
}
