//! Length-grouped order (Hugging Face's `group_by_length` idea, counter-based): pure
//! functions of an epoch's group lengths.
//!
//! The epoch order (the rank's positions `0..n`) is cut into megabatches of `M * B`
//! positions. Each megabatch is sorted by group length, longest first (ties by position), and
//! cut into `M` batches of `B`. The megabatch holding the epoch's longest group (its first
//! position) trades places with megabatch 0, so the longest batch is batch 0 and
//! out-of-memory shows at the first step. Batch `k` needs only its megabatch: resuming at
//! any step is O(M * B) once the epoch's lengths are known.

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

    /// The megabatch (of `mb = M * B` positions) that batch `step` comes from.
    pub fn megabatch(&self, step: u64, mult: u64, mb: u64) -> u64 {
        let longest = self.longest / mb.max(1);
        match step / mult.max(1) {
            0 => longest,
            m if m == longest => 0,
            m => m,
        }
    }

    /// The positions of megabatch `m` sorted by length, longest first, ties by position.
    pub fn sorted(&self, m: u64, mb: u64) -> Vec<u64> {
        let end = ((m + 1) * mb).min(self.len());
        let mut positions: Vec<u64> = (m * mb..end).collect();
        positions.sort_by_key(|&i| (std::cmp::Reverse(self.lengths[i as usize]), i));
        positions
    }

    /// The positions of batch `step` (`b` groups; the last batch of an epoch may be short).
    pub fn batch(&self, step: u64, b: u64, mult: u64) -> Vec<u64> {
        let mb = mult * b;
        Self::batch_in(
            &self.sorted(self.megabatch(step, mult, mb), mb),
            step,
            b,
            mult,
        )
    }

    /// Batch `step`'s positions out of its megabatch already `sorted` (callers that cache
    /// sorted megabatches; [`LengthOrder::batch`] otherwise).
    pub fn batch_in(sorted: &[u64], step: u64, b: u64, mult: u64) -> Vec<u64> {
        let j = ((step % mult) * b) as usize;
        sorted.iter().skip(j).take(b as usize).copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn megabatches_are_sorted_and_the_longest_comes_first() {
        // 10 positions, B=2, M=2: megabatches [0..4), [4..8), [8..10).
        let o = LengthOrder::new(vec![3, 1, 4, 1, 5, 9, 2, 6, 5, 3]);
        let batches: Vec<Vec<u64>> = (0..5).map(|k| o.batch(k, 2, 2)).collect();
        // The longest (9 at position 5) is in megabatch 1, which comes first.
        assert_eq!(
            batches,
            vec![vec![5, 7], vec![4, 6], vec![2, 0], vec![1, 3], vec![8, 9]]
        );
        let mut all: Vec<u64> = batches.concat();
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<u64>>(), "every position once");
    }
}
