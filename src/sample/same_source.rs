//! Same-source batches (FlagEmbedding's `same_dataset_within_batch`): every global batch (all
//! ranks together at one step) holds rows of one source only, with a batch size per source.
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
use crate::sample::{Permutation, Tail};

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

    /// Global batches of each source per epoch.
    pub fn counts(&self) -> &[u64] {
        &self.counts
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
