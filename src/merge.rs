//! Merging datasets (shards converted with `--shard K/N`, e.g. by Spark tasks) into one without
//! tokenizing again. Groups keep shard order, then row order; passages and row prompts are
//! interned by the writer (first appearance, by token ids), exactly as a single conversion
//! does; rejects.jsonl files are concatenated in order. So merging shards `0..N-1` of one
//! conversion gives the single conversion's files byte for byte.
//!
//! Sources: shards of one conversion list the same sources (same paths and sizes), each with
//! its own counts: the merged dataset lists them once with the counts added up. Datasets with
//! different sources are concatenated: their sources are renumbered in order.
//! Every dataset must come from the same tokenizer and text settings.

use std::path::{Path, PathBuf};

use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::format::{self, SourceStats};
use crate::writer::{DatasetWriter, GroupRecord, ManifestInfo, WriterOptions};

/// Merge the datasets at `shards` into `out`.
pub fn merge(shards: &[PathBuf], out: &Path, options: WriterOptions) -> Result<crate::Manifest> {
    let opened = open_alike(shards)?;
    let first = opened[0].manifest();
    let same_sources = opened
        .iter()
        .all(|d| same_sources(&d.manifest().sources, &first.sources));
    let mut w = DatasetWriter::create(out, options)?;
    for id in [
        format::PROMPT_ID_LLM_DEFAULT,
        format::PROMPT_ID_MATRYOSHKA_DEFAULT,
    ] {
        w.add_prompt(opened[0].prompt_tokens(id)?)?;
    }
    let mut sources: Vec<SourceStats> = Vec::new();
    for ds in &opened {
        let base = if same_sources {
            0
        } else {
            sources.len() as u32
        };
        copy_groups(ds, &mut w, base)?;
        copy_rejects(ds, &mut w)?;
        add_sources(&mut sources, ds, same_sources);
    }
    for (i, s) in sources.iter_mut().enumerate() {
        s.id = i as u32;
    }
    w.finish(ManifestInfo {
        tokenizer: first.tokenizer.clone(),
        text: first.text.clone(),
        sources,
    })
}

/// Open every dataset; they must share tokenizer and text settings.
fn open_alike(shards: &[PathBuf]) -> Result<Vec<Dataset>> {
    if shards.is_empty() {
        return Err(Error::argument("shards", "no shards to merge"));
    }
    let opened = shards
        .iter()
        .map(Dataset::open)
        .collect::<Result<Vec<_>>>()?;
    let first = opened[0].manifest();
    let fp = |m: &crate::Manifest| m.tokenizer.as_ref().map(|t| t.fingerprint.clone());
    for (path, ds) in shards.iter().zip(&opened).skip(1) {
        let m = ds.manifest();
        if fp(m) != fp(first) || m.text != first.text {
            return Err(Error::input(
                path,
                format!(
                    "tokenizer or text settings differ from {}'s; shards must be converted alike",
                    shards[0].display()
                ),
            ));
        }
    }
    Ok(opened)
}

fn same_sources(a: &[SourceStats], b: &[SourceStats]) -> bool {
    a.len() == b.len()
        && !a.is_empty()
        && a.iter()
            .zip(b)
            .all(|(x, y)| (x.id, &x.path, x.bytes) == (y.id, &y.path, y.bytes))
}

/// The groups of `ds`, passages and prompts interned in `w`, sources offset by `base`.
fn copy_groups(ds: &Dataset, w: &mut DatasetWriter, base: u32) -> Result<()> {
    let last_source = ds.manifest().sources.len().max(1) as u32 - 1;
    let (mut pos, mut neg) = (Vec::new(), Vec::new());
    for row in 0..ds.len() {
        let g = ds.group(row)?;
        for (ids, out) in [(g.pos, &mut pos), (g.neg, &mut neg)] {
            out.clear();
            for &id in ids {
                out.push(w.intern_passage(ds.referenced_passage(id)?)? as i32);
            }
        }
        let prompt = match g.prompt {
            Some(p) if p > format::PROMPT_ID_MATRYOSHKA_DEFAULT => {
                Some(w.intern_prompt(ds.prompt_tokens(p)?)?)
            }
            other => other,
        };
        w.add_group(&GroupRecord {
            query: g.query,
            pos: &pos,
            neg: &neg,
            pos_scores: g.pos_scores,
            neg_scores: g.neg_scores,
            prompt,
            source: base + g.source.min(last_source),
        })?;
    }
    Ok(())
}

/// The lines of `ds`'s rejects.jsonl, appended to `w`'s.
fn copy_rejects(ds: &Dataset, w: &mut DatasetWriter) -> Result<()> {
    if !ds.manifest().files.contains_key(format::REJECTS_FILE) {
        return Ok(());
    }
    let path = ds.dir().join(format::REJECTS_FILE);
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    for line in bytes.split_inclusive(|&b| b == b'\n') {
        w.add_reject_line(line)?;
    }
    Ok(())
}

/// Add `ds`'s sources: counts added to the same sources, or appended.
fn add_sources(sources: &mut Vec<SourceStats>, ds: &Dataset, same: bool) {
    let theirs = &ds.manifest().sources;
    if theirs.is_empty() {
        sources.push(SourceStats {
            rows_read: ds.len() as u64,
            rows_accepted: ds.len() as u64,
            path: ds.dir().display().to_string(),
            ..SourceStats::default()
        });
    } else if !same || sources.is_empty() {
        sources.extend(theirs.iter().cloned());
    } else {
        for (s, t) in sources.iter_mut().zip(theirs) {
            s.rows_read += t.rows_read;
            s.rows_accepted += t.rows_accepted;
            s.rows_rejected += t.rows_rejected;
            s.rows_empty_neg += t.rows_empty_neg;
            s.blank_lines += t.blank_lines;
            // Shards come in input order: the first one carrying a batch size holds the
            // source's first such row.
            s.batch_size = s.batch_size.or(t.batch_size);
            for (k, v) in &t.rejected_by_reason {
                *s.rejected_by_reason.entry(k.clone()).or_default() += v;
            }
            for (k, v) in &t.unknown_fields {
                *s.unknown_fields.entry(k.clone()).or_default() += v;
            }
        }
    }
}
