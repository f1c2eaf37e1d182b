//! Length-grouped order (Hugging Face's `group_by_length` idea, counter-based): pure
//! functions of an epoch's group lengths.
//!
//! The epoch order (the rank's positions `0..n`) is cut into megabatches of `M * B`
//! positions. Each megabatch is sorted by group length, longest first (ties by position), and
//! cut into `M` batches of `B` (the last megabatch may be partial, and its last batch short).
//! The batch holding the epoch's longest group (the first batch of its megabatch) then trades
//! places with batch 0, so the longest batch is batch 0 and out-of-memory shows at the first
//! step. Only the two batches trade places, as the token-budget plan does
//! ([`crate::sample::budget`]): trading whole megabatches would put a partial megabatch's few
//! batches where `M` are served, leaving batches empty and rows untrained. Batch `k` needs only
//! its megabatch: resuming at any step is O(M * B) once the epoch's lengths are known.

/// The group lengths of one epoch by position, and where the longest is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LengthOrder {
    lengths: Vec<u32>,
    longest: u64,
}

impl LengthOrder {
    /// From the length of the group at each position of the epoch order.
    pub fn new(lengths: Vec<u32>) -> LengthOrder {
        let top = lengths.iter().copied().max().unwrap_or(0);
        let longest = lengths.iter().position(|&l| l == top).unwrap_or(0) as u64;
        LengthOrder { lengths, longest }
    }

    /// Positions in the epoch order.
    pub fn len(&self) -> u64 {
        self.lengths.len() as u64
    }

    /// Whether the epoch is empty.
    pub fn is_empty(&self) -> bool {
        self.lengths.is_empty()
    }

    /// The batch of the order before the longest batch trades places (megabatches in epoch
    /// order, each sorted and cut into `mult` batches of `b`) that step `step` serves: batch
    /// 0 and the batch holding the longest group trade places, the others stay. Its megabatch
    /// is `source / mult`.
    pub fn source_batch(&self, step: u64, b: u64, mult: u64) -> u64 {
        let mult = mult.max(1);
        let top = self.longest / (mult * b).max(1) * mult;
        match step {
            0 => top,
            s if s == top => 0,
            s => s,
        }
    }

    /// The positions of megabatch `m` sorted by length, longest first, ties by position.
    pub fn sorted(&self, m: u64, mb: u64) -> Vec<u64> {
        let end = ((m + 1) * mb).min(self.len());
        let mut positions: Vec<u64> = (m * mb..end).collect();
        positions.sort_by_key(|&i| (std::cmp::Reverse(self.lengths[i as usize]), i));
        positions
    }

    /// The positions of batch `step` (`b` groups; one batch of an epoch may be short).
    pub fn batch(&self, step: u64, b: u64, mult: u64) -> Vec<u64> {
        let source = self.source_batch(step, b, mult);
        Self::batch_in(&self.sorted(source / mult, mult * b), source, b, mult)
    }

    /// The positions of batch `source` of the order before the trade
    /// ([`LengthOrder::source_batch`]) out of its megabatch already `sorted` (callers that
    /// cache sorted megabatches; [`LengthOrder::batch`] otherwise).
    pub fn batch_in(sorted: &[u64], source: u64, b: u64, mult: u64) -> Vec<u64> {
        let j = ((source % mult) * b) as usize;
        sorted.iter().skip(j).take(b as usize).copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every batch of the epoch.
    fn batches(o: &LengthOrder, b: u64, mult: u64) -> Vec<Vec<u64>> {
        (0..o.len().div_ceil(b))
            .map(|k| o.batch(k, b, mult))
            .collect()
    }

    #[test]
    fn megabatches_are_sorted_and_the_longest_comes_first() {
        // 10 positions, B=2, M=2: megabatches [0..4), [4..8), [8..10).
        let o = LengthOrder::new(vec![3, 1, 4, 1, 5, 9, 2, 6, 5, 3]);
        // The longest (9 at position 5) is in megabatch 1: its first batch trades places
        // with batch 0.
        assert_eq!(
            batches(&o, 2, 2),
            vec![vec![5, 7], vec![1, 3], vec![2, 0], vec![4, 6], vec![8, 9]]
        );
    }

    /// Regression (issue 18, finding 1): with the longest group in the last, partial
    /// megabatch, whole megabatches traded places, so its few batches were served where `M`
    /// were (batches [[2], [], [0]] for 3 positions, B=1, M=2: position 1 never trained).
    #[test]
    fn the_longest_group_in_a_partial_megabatch_leaves_no_batch_empty() {
        for lengths in [
            vec![1, 2, 3],
            vec![5, 1, 1, 1, 1, 9],
            vec![2, 2, 2, 2, 2, 2, 2, 7],
        ] {
            let o = LengthOrder::new(lengths.clone());
            for b in 1..=4u64 {
                for mult in 1..=4u64 {
                    let all = batches(&o, b, mult);
                    assert!(all.iter().all(|x| !x.is_empty()), "{lengths:?} {b} {mult}");
                    let mut flat = all.concat();
                    flat.sort();
                    assert_eq!(
                        flat,
                        (0..o.len()).collect::<Vec<_>>(),
                        "every position once"
                    );
                    let top = *lengths.iter().max().unwrap();
                    assert!(all[0].iter().any(|&p| lengths[p as usize] == top));
                }
            }
        }
    }
}
