//! Merging shards (datasets converted separately, e.g. by Spark tasks) into one dataset without
//! tokenizing again. Groups keep shard order, then row order; passages are deduplicated across
//! shards by their token ids; prompts likewise; source ids are renumbered in order and their
//! statistics carried over. Every shard must come from the same tokenizer and text settings.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::format::{self, SourceStats};
use crate::writer::{DatasetWriter, GroupRecord, ManifestInfo, WriterOptions};

/// Merge the datasets at `shards` into `out`.
pub fn merge(shards: &[PathBuf], out: &Path, options: WriterOptions) -> Result<crate::Manifest> {
    if shards.is_empty() {
        return Err(Error::argument("shards", "no shards to merge"));
    }
    let opened = shards
        .iter()
        .map(Dataset::open)
        .collect::<Result<Vec<_>>>()?;
    let first = opened[0].manifest();
    for (path, ds) in shards.iter().zip(&opened).skip(1) {
        let m = ds.manifest();
        let fp = |m: &crate::Manifest| m.tokenizer.as_ref().map(|t| t.fingerprint.clone());
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
    let mut w = DatasetWriter::create(out, options)?;
    for id in [
        format::PROMPT_ID_LLM_DEFAULT,
        format::PROMPT_ID_MATRYOSHKA_DEFAULT,
    ] {
        w.add_prompt(opened[0].prompt_tokens(id)?)?;
    }
    let mut passages: HashMap<u128, u32> = HashMap::new();
    let mut prompts: HashMap<Vec<i32>, u32> = HashMap::new();
    let mut sources: Vec<SourceStats> = Vec::new();
    for ds in &opened {
        let source_base = sources.len() as u32;
        let shard_sources = ds.manifest().sources.len().max(1) as u32;
        // Passage ids of this shard -> merged ids, filled on first use.
        let mut remap: Vec<i32> = vec![-1; ds.num_passages()];
        let mut prompt_remap: Vec<Option<u32>> = vec![None; ds.num_prompts()];
        let (mut pos, mut neg) = (Vec::new(), Vec::new());
        for row in 0..ds.len() {
            let g = ds.group(row)?;
            for (ids, out) in [(g.pos, &mut pos), (g.neg, &mut neg)] {
                out.clear();
                for &id in ids {
                    let slot = remap.get_mut(id as usize).ok_or(Error::OutOfRange {
                        what: "passage id",
                        index: id as u64,
                        len: ds.num_passages() as u64,
                    })?;
                    if *slot < 0 {
                        let tokens = ds.referenced_passage(id)?;
                        let key = xxhash_rust::xxh3::xxh3_128(bytemuck::cast_slice(tokens));
                        *slot = match passages.get(&key) {
                            Some(&m) => m as i32,
                            None => {
                                let m = w.add_passage(tokens)?;
                                passages.insert(key, m);
                                m as i32
                            }
                        };
                    }
                    out.push(*slot);
                }
            }
            let prompt = match g.prompt {
                None => None,
                Some(p)
                    if p == format::PROMPT_ID_LLM_DEFAULT
                        || p == format::PROMPT_ID_MATRYOSHKA_DEFAULT =>
                {
                    Some(p)
                }
                Some(p) => Some(match prompt_remap[p as usize] {
                    Some(m) => m,
                    None => {
                        let tokens = ds.prompt_tokens(p)?.to_vec();
                        let m = match prompts.get(&tokens) {
                            Some(&m) => m,
                            None => {
                                let m = w.add_prompt(&tokens)?;
                                prompts.insert(tokens, m);
                                m
                            }
                        };
                        prompt_remap[p as usize] = Some(m);
                        m
                    }
                }),
            };
            w.add_group(&GroupRecord {
                query: g.query,
                pos: &pos,
                neg: &neg,
                pos_scores: g.pos_scores,
                neg_scores: g.neg_scores,
                prompt,
                source: source_base + g.source.min(shard_sources - 1),
            })?;
        }
        if ds.manifest().sources.is_empty() {
            sources.push(SourceStats {
                rows_read: ds.len() as u64,
                rows_accepted: ds.len() as u64,
                path: ds.dir().display().to_string(),
                ..SourceStats::default()
            });
        } else {
            sources.extend(ds.manifest().sources.iter().cloned());
        }
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
