//! Merging datasets (shards converted with `--shard K/N`, e.g. by Spark tasks) into one without
//! tokenizing again. Groups keep shard order, then row order; passages and row prompts are
//! interned by the writer (first appearance, by token ids), exactly as a single conversion
//! does; rejects.jsonl files are concatenated in order. So merging shards `0..N-1` of one
//! conversion gives the single conversion's files byte for byte, in whatever order the shards
//! are given.
//!
//! **Nothing is trusted.** Every input is verified in full first (every file's checksum, every
//! row, every id and token id: [`Dataset::validate`]), and must come from the same tokenizer
//! facts, text settings and default prompts; a corrupt or mismatched input is an error naming
//! it, and nothing is written. A fresh checksum never certifies damaged data.
//!
//! **Sources and shards.** Shards of one conversion list the same sources (same paths and
//! sizes), each with its own counts, and record which shards they hold
//! ([`crate::format::ShardRange`]): the merged dataset lists the sources once with the counts
//! added up. The shards are joined in shard order; a shard given twice, overlapping shards, a
//! gap between shards, or a whole conversion given with shards of the same sources is refused
//! (each would repeat or silently drop rows). Merging only some shards (say 0..2 of 4) is
//! allowed and recorded in the output's manifest, so the rest can be merged in later. Datasets
//! with different sources are concatenated in the order given, their sources renumbered; each
//! must then be whole (merge a conversion's shards first).

use std::path::{Path, PathBuf};

use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::format::{self, ShardRange, SourceStats};
use crate::writer::{DatasetWriter, GroupRecord, ManifestInfo, WriterOptions};

/// Merge the datasets at `shards` into `out`.
pub fn merge(shards: &[PathBuf], out: &Path, options: WriterOptions) -> Result<crate::Manifest> {
    let mut opened = open_alike(shards)?;
    let first = opened[0].manifest();
    let same_sources = opened
        .iter()
        .all(|d| same_sources(&d.manifest().sources, &first.sources));
    let range = order_shards(&mut opened, same_sources)?;
    verify_all(&opened)?;
    let were_shards = opened.iter().all(|d| d.manifest().shards.is_some());
    if same_sources && were_shards && range.is_none() {
        // What a single conversion refuses, the merge of all its shards refuses too (a whole
        // dataset given alone, an import say, keeps the sources it lists).
        let sources = &opened[0].manifest().sources;
        if let Some(s) = (0..sources.len()).find(|&i| {
            opened
                .iter()
                .all(|d| d.manifest().sources[i].rows_read == 0)
        }) {
            return Err(Error::input(&sources[s].path, "no rows (empty input)"));
        }
    }
    let first = opened[0].manifest();
    // Shards of one derivation (e.g. `rankfeed mine --shard`) keep its record; shards derived
    // differently are not one dataset.
    let provenance = first.provenance.clone();
    if let Some(ds) = opened
        .iter()
        .find(|d| d.manifest().provenance != provenance)
    {
        if same_sources {
            return Err(Error::input(
                ds.dir(),
                format!(
                    "was derived differently from {} (manifest provenance): not shards of one run",
                    opened[0].dir().display()
                ),
            ));
        }
    }
    let keep = opened.iter().all(|d| d.manifest().provenance == provenance);
    let mut w = DatasetWriter::create(out, options)?;
    w.set_provenance(if keep { provenance } else { None });
    for id in DEFAULT_PROMPTS {
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
        shards: range,
    })
}

/// The prompts every dataset stores first.
const DEFAULT_PROMPTS: [u32; 2] = [
    format::PROMPT_ID_LLM_DEFAULT,
    format::PROMPT_ID_MATRYOSHKA_DEFAULT,
];

/// Open every dataset; they must share tokenizer facts, text settings and default prompts.
fn open_alike(shards: &[PathBuf]) -> Result<Vec<Dataset>> {
    if shards.is_empty() {
        return Err(Error::argument("shards", "no shards to merge"));
    }
    let opened = shards
        .iter()
        .map(Dataset::open)
        .collect::<Result<Vec<_>>>()?;
    let first = &opened[0];
    for ds in &opened[1..] {
        let (m, f) = (ds.manifest(), first.manifest());
        let differs = if m.tokenizer != f.tokenizer {
            Some("tokenizer facts")
        } else if m.text != f.text {
            Some("text settings")
        } else if DEFAULT_PROMPTS
            .iter()
            .any(|&id| ds.prompt_tokens(id).ok() != first.prompt_tokens(id).ok())
        {
            Some("default prompt tokens")
        } else {
            None
        };
        if let Some(what) = differs {
            return Err(Error::input(
                ds.dir(),
                format!(
                    "{what} differ from {}'s; datasets must be converted alike to be merged",
                    first.dir().display()
                ),
            ));
        }
    }
    Ok(opened)
}

/// Put the shards of one conversion in shard order and check that they are disjoint and
/// adjacent (each range is well formed: `Dataset::open` checks it); the shards the merged
/// dataset holds (see the module docs).
fn order_shards(opened: &mut [Dataset], same_sources: bool) -> Result<Option<ShardRange>> {
    if !same_sources || opened.len() == 1 {
        if let (false, Some(ds)) = (
            same_sources,
            opened.iter().find(|d| d.manifest().shards.is_some()),
        ) {
            return Err(Error::input(
                ds.dir(),
                format!(
                    "holds {} of a conversion, but the inputs list different sources, so they are \
                     concatenated as whole datasets: merge that conversion's shards into one first",
                    ds.manifest().shards.expect("found above")
                ),
            ));
        }
        return Ok(opened[0].manifest().shards);
    }
    if let Some(whole) = opened.iter().find(|d| d.manifest().shards.is_none()) {
        return Err(Error::input(
            whole.dir(),
            "is a whole conversion of the same sources as the other inputs: merging it with \
             them would repeat its rows",
        ));
    }
    let range = |d: &Dataset| d.manifest().shards.expect("every input is a shard");
    opened.sort_by_key(|d| range(d).start);
    for pair in opened.windows(2) {
        let (a, b) = (range(&pair[0]), range(&pair[1]));
        let (da, db) = (pair[0].dir().display(), pair[1].dir());
        if a.of != b.of {
            return Err(Error::input(
                db,
                format!("holds {b}, {da} holds {a}: shards of different conversions"),
            ));
        }
        if b.start < a.end {
            return Err(Error::input(
                db,
                format!(
                    "holds {b}, {da} holds {a}: shard {} would be merged twice",
                    b.start
                ),
            ));
        }
        if b.start > a.end {
            return Err(Error::input(
                db,
                format!(
                    "holds {b}, {da} holds {a}: shards {}..{} between them are missing",
                    a.end, b.start
                ),
            ));
        }
    }
    let (lo, hi) = (range(&opened[0]), range(&opened[opened.len() - 1]));
    Ok(ShardRange::partial(lo.start, hi.end, lo.of))
}

/// Verify every input in full (see [`Dataset::validate`]), the inputs spread over the cores.
fn verify_all(opened: &[Dataset]) -> Result<()> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, opened.len());
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    opened
                        .iter()
                        .skip(t)
                        .step_by(threads)
                        .try_for_each(Dataset::validate)
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| {
            w.join()
                .unwrap_or_else(|_| Err(Error::Internal("a verification thread panicked".into())))
        })
    })
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
    let mut scratch = (Vec::new(), Vec::new());
    for row in 0..ds.len() {
        let g = ds.group(row)?;
        let source = base + g.source.min(last_source);
        let scores = (g.pos_scores, g.neg_scores);
        write_group(ds, w, &g, g.neg, scores, source, &mut scratch)?;
    }
    Ok(())
}

/// Write group `g` of `ds` into `w` with `neg` (passage ids of `ds`) as its negatives: its
/// passages and row prompt interned in `w` (default prompts keep their ids), `scores` as its
/// teacher scores (positives', negatives'), under `source`. `scratch` holds the remapped id lists between calls.
pub(crate) fn write_group(
    ds: &Dataset,
    w: &mut DatasetWriter,
    g: &crate::Group<'_>,
    neg: &[i32],
    scores: (Option<&[f32]>, Option<&[f32]>),
    source: u32,
    scratch: &mut (Vec<i32>, Vec<i32>),
) -> Result<()> {
    let neg = neg
        .iter()
        .map(|&id| ds.referenced_passage(id))
        .collect::<Result<Vec<_>>>()?;
    write_group_with(ds, w, g, &neg, scores, source, scratch)
}

/// [`write_group`] with the negatives given as tokens (passages from outside `ds`).
pub(crate) fn write_group_with(
    ds: &Dataset,
    w: &mut DatasetWriter,
    g: &crate::Group<'_>,
    neg: &[&[i32]],
    scores: (Option<&[f32]>, Option<&[f32]>),
    source: u32,
    scratch: &mut (Vec<i32>, Vec<i32>),
) -> Result<()> {
    let (pos_out, neg_out) = scratch;
    pos_out.clear();
    for &id in g.pos {
        pos_out.push(w.intern_passage(ds.referenced_passage(id)?)? as i32);
    }
    neg_out.clear();
    for tokens in neg {
        neg_out.push(w.intern_passage(tokens)? as i32);
    }
    let prompt = match g.prompt {
        Some(p) if p > format::PROMPT_ID_MATRYOSHKA_DEFAULT => {
            Some(w.intern_prompt(ds.prompt_tokens(p)?)?)
        }
        other => other,
    };
    w.add_group(&GroupRecord {
        query: g.query,
        pos: pos_out,
        neg: neg_out,
        pos_scores: scores.0,
        neg_scores: scores.1,
        prompt,
        source,
    })
}

/// The lines of `ds`'s rejects.jsonl, appended to `w`'s.
pub(crate) fn copy_rejects(ds: &Dataset, w: &mut DatasetWriter) -> Result<()> {
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
