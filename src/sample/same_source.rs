//! Same-source batches (FlagEmbedding's `same_dataset_within_batch`): every global batch (all
//! ranks together at one step) holds rows of one source only, with a batch size per source.
//!
//! A *batch source* ([`batch_sources`]) is one source, or the small sources of one directory
//! merged (FlagEmbedding's `small_threshold` / `drop_threshold`); its batches carry
//! `no_in_batch_neg` when a file or directory name ends with it. Below, "source" means batch
//! source.
//!
//! Pure functions of (seed, epoch, step):
//!
//! - Source `s` gives the epoch its universe rows (see [`crate::sample::universe`]), shuffled
//!   by a permutation keyed (seed, epoch, s), and cut into global batches of `W x b_s` rows
//!   (`b_s` per rank). Rank `r` takes rows `r*b_s .. (r+1)*b_s` of each global batch.
//! - A source's tail that does not fill a global batch is dropped (`Tail::Drop`, as
//!   FlagEmbedding does) or filled by repeating the source's epoch order from its start
//!   (`Tail::Pad`, the default: every row at least once).
//! - The epoch's global batches of all sources are shuffled together by a permutation keyed
//!   (seed, epoch); step `k` is the `k`-th of them, found in O(log sources).

use crate::error::{Error, Result};
use crate::format::SourceStats;
use crate::sample::{Permutation, Tail, Universe};

/// One batch size per source: `Err` naming `source_batch_sizes` otherwise.
pub fn check_sizes(sizes: usize, sources: usize) -> Result<()> {
    if sizes != sources {
        return Err(Error::argument(
            "source_batch_sizes",
            format!("{sizes} batch sizes for {sources} sources (one per input file, in the manifest's order)"),
        ));
    }
    Ok(())
}

/// The same-source batches of every epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceBatches {
    /// Rows each source gives an epoch.
    takes: Vec<u64>,
    /// Groups per rank in a batch of each source.
    sizes: Vec<u64>,
    world: u64,
    /// Global batches of each source per epoch, and their prefix sums.
    counts: Vec<u64>,
    starts: Vec<u64>,
}

impl SourceBatches {
    /// Batches for sources giving `takes` rows each epoch, `sizes[s]` groups per rank.
    pub fn new(takes: &[u64], sizes: &[u64], world: u64, tail: Tail) -> Result<SourceBatches> {
        check_sizes(sizes.len(), takes.len())?;
        if let Some(s) = sizes.iter().position(|&b| b == 0) {
            return Err(Error::argument(
                "source_batch_sizes",
                format!("source {s} has batch size 0"),
            ));
        }
        let counts: Vec<u64> = takes
            .iter()
            .zip(sizes)
            .map(|(&n, &b)| match tail {
                Tail::Drop => n / (world * b),
                _ => n.div_ceil(world * b),
            })
            .collect();
        if tail == Tail::Uneven {
            return Err(Error::argument(
                "shard_tail",
                "same-source batches need the pad or drop tail (every rank takes the same steps)",
            ));
        }
        let mut at = 0;
        let starts = counts
            .iter()
            .map(|&c| {
                let s = at;
                at += c;
                s
            })
            .collect();
        Ok(SourceBatches {
            takes: takes.to_vec(),
            sizes: sizes.to_vec(),
            world,
            counts,
            starts,
        })
    }

    /// Global batches per epoch.
    pub fn len(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Whether an epoch has no batches.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Batch `step` (< len) of `epoch` for `rank`: its source, and the indices of its rows
    /// within the source's epoch rows (`0..takes[s]`).
    pub fn batch(
        &self,
        seed: u64,
        epoch: u64,
        step: u64,
        rank: u64,
        shuffle: bool,
    ) -> (usize, Vec<u64>) {
        let t = if shuffle {
            Permutation::new(self.len(), &[seed, epoch, 0x5a3e_ba7c]).apply(step)
        } else {
            step
        };
        let s = self.starts.partition_point(|&st| st <= t) - 1;
        // Sources without batches share a start with the next one: take the last.
        let j = t - self.starts[s];
        let (n, b) = (self.takes[s], self.sizes[s]);
        let within = Permutation::new(n, &[seed, epoch, s as u64, 0x50_75c3]);
        let first = j * self.world * b + rank * b;
        let rows = (first..first + b)
            .map(|q| {
                let q = q % n;
                if shuffle {
                    within.apply(q)
                } else {
                    q
                }
            })
            .collect();
        (s, rows)
    }
}

/// The sources one same-source batch draws from: one, or a directory's small sources merged.
#[derive(Debug, Clone)]
pub struct BatchSource {
    members: Vec<usize>,
    /// Prefix sums of the members' rows per epoch.
    starts: Vec<u64>,
    /// Its batches carry `no_in_batch_neg`.
    pub no_in_batch_neg: bool,
}

impl BatchSource {
    /// The universe index of row `k` of this group's epoch rows.
    pub fn index(&self, universe: &Universe, k: u64) -> u64 {
        let m = self.starts.partition_point(|&st| st <= k) - 1;
        universe.source_span(self.members[m]).start + (k - self.starts[m])
    }
}

/// FlagEmbedding's `no_in_batch_neg` marker: a file whose name (before its extension) or
/// whose directory's name ends with it.
fn marked_no_in_batch_neg(path: &str) -> bool {
    let p = std::path::Path::new(path);
    let stem = p
        .file_name()
        .map(|f| f.to_string_lossy())
        .map(|f| f.split('.').next().unwrap_or("").to_string())
        .unwrap_or_default();
    let dir = p
        .parent()
        .and_then(|d| d.file_name())
        .map(|d| d.to_string_lossy().into_owned())
        .unwrap_or_default();
    stem.ends_with("no_in_batch_neg") || dir.ends_with("no_in_batch_neg")
}

/// How sources become batch sources: `sizes` per source (else each source's `batch_size`
/// field, else `default_size`), and the small and drop thresholds.
#[derive(Debug, Clone, Copy)]
pub struct Grouping<'a> {
    /// Batch size per source, if given.
    pub sizes: Option<&'a [usize]>,
    /// Batch size of sources without one.
    pub default_size: u64,
    /// Sources with fewer rows per epoch are merged per directory.
    pub small_threshold: u64,
    /// Merged groups with fewer rows are left out.
    pub drop_threshold: u64,
}

/// The batch sources of same-source batching over sources giving `takes` rows an epoch,
/// their rows per epoch, and their batch sizes. A source below the small threshold is merged
/// with the other small sources of its directory (batch size: the smallest of theirs), and a
/// merged group below the drop threshold is left out.
pub fn batch_sources(
    sources: &[SourceStats],
    takes: &[u64],
    g: Grouping<'_>,
) -> Result<(Vec<BatchSource>, Vec<u64>, Vec<u64>)> {
    let sizes: Vec<u64> = match g.sizes {
        Some(s) => s.iter().map(|&b| b as u64).collect(),
        None => (0..takes.len())
            .map(|s| match sources.get(s).and_then(|m| m.batch_size) {
                // The manifest may come from elsewhere: its sizes are bounded as the option.
                Some(b) if b == 0 || b > crate::limits::BATCH_SIZE as u64 => Err(Error::corrupt(
                    crate::format::MANIFEST_FILE,
                    format!(
                        "source {s} ({}): batch_size {b} is outside 1..={}",
                        sources[s].path,
                        crate::limits::BATCH_SIZE
                    ),
                )),
                Some(b) => Ok(b),
                None => Ok(g.default_size),
            })
            .collect::<Result<_>>()?,
    };
    check_sizes(sizes.len(), takes.len())?;
    let path = |s: usize| sources.get(s).map_or("", |m| m.path.as_str());
    let (mut groups, mut group_takes, mut group_sizes) = (Vec::new(), Vec::new(), Vec::new());
    // Small sources by directory, in order of first appearance.
    let mut small: Vec<(String, Vec<usize>)> = Vec::new();
    for s in 0..takes.len() {
        if takes[s] < g.small_threshold {
            let dir = std::path::Path::new(path(s))
                .parent()
                .map(|d| d.display().to_string())
                .unwrap_or_default();
            match small.iter_mut().find(|(d, _)| *d == dir) {
                Some((_, m)) => m.push(s),
                None => small.push((dir, vec![s])),
            }
            continue;
        }
        groups.push(BatchSource {
            members: vec![s],
            starts: vec![0],
            no_in_batch_neg: marked_no_in_batch_neg(path(s)),
        });
        group_takes.push(takes[s]);
        group_sizes.push(sizes[s]);
    }
    for (_, members) in small {
        let total: u64 = members.iter().map(|&s| takes[s]).sum();
        if total == 0 || total < g.drop_threshold {
            continue;
        }
        let mut at = 0;
        let starts = members
            .iter()
            .map(|&s| {
                let st = at;
                at += takes[s];
                st
            })
            .collect();
        groups.push(BatchSource {
            no_in_batch_neg: marked_no_in_batch_neg(path(members[0])),
            starts,
            members: members.clone(),
        });
        group_takes.push(total);
        group_sizes.push(members.iter().map(|&s| sizes[s]).min().unwrap_or(1));
    }
    Ok((groups, group_takes, group_sizes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_single_source_and_cover_each_source() {
        let takes = [10u64, 0, 7, 30];
        let sizes = [2u64, 3, 3, 4];
        for tail in [Tail::Drop, Tail::Pad] {
            for world in [1u64, 2] {
                let sb = SourceBatches::new(&takes, &sizes, world, tail).unwrap();
                let mut seen = vec![vec![0u32; 30]; 4];
                for k in 0..sb.len() {
                    let mut src = None;
                    for rank in 0..world {
                        let (s, rows) = sb.batch(7, 1, k, rank, true);
                        assert_eq!(*src.get_or_insert(s), s, "one source per global batch");
                        assert_eq!(rows.len() as u64, sizes[s]);
                        for r in rows {
                            seen[s][r as usize] += 1;
                        }
                    }
                }
                for s in 0..4 {
                    let n = takes[s] as usize;
                    let c = &seen[s][..n];
                    match tail {
                        Tail::Drop => assert!(c.iter().all(|&x| x <= 1)),
                        _ => assert!(c.iter().all(|&x| x >= 1)),
                    }
                }
            }
        }
        assert!(SourceBatches::new(&takes, &sizes, 1, Tail::Uneven).is_err());
        assert!(SourceBatches::new(&takes, &[1, 1], 1, Tail::Pad).is_err());
    }
}
