//! The group sampler: pure functions of (seed, epoch, position). No hidden state, no I/O.
//!
//! - **Universe** ([`universe`]): the rows an epoch trains on, by source (input file):
//!   `max_example_num_per_dataset` and mixing `weights` set how many rows each source gives an
//!   epoch, drawing a new seeded subset each epoch where a source gives fewer than it has.
//!   Rows without negatives can be left out when the group size needs them.
//! - **Epoch order**: a pseudo-random permutation of the universe keyed by (seed, epoch),
//!   computed per position in O(1) (a Feistel network with cycle walking), so step k of epoch e
//!   is found without replaying steps 0..k-1 and without materializing anything.
//! - **Sharding** as torch's `DistributedSampler`: rank r takes positions r, r+W, r+2W, ...;
//!   the tail is either padded by repeating from the start of the order, or dropped.
//! - **Groups** as FlagEmbedding: one positive uniformly; G-1 negatives without replacement in
//!   draw order; when there are fewer than G-1 negatives, G-1 draws without replacement from the
//!   negatives repeated `ceil((G-1)/len)` times. The randomness is keyed by (seed, epoch, row),
//!   so a row's group in an epoch does not depend on threads, processes, ranks or batch size.

pub mod budget;
pub mod length;
pub mod no_dup;
pub mod same_source;
pub mod universe;
use crate::error::{Error, Result};
pub use universe::{EpochRows, Universe};

/// SplitMix64 finalizer: a strong 64-bit mixer.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A small counter-based generator: SplitMix64 started from a hash of its key.
#[derive(Debug, Clone)]
pub struct KeyedRng {
    state: u64,
}

impl KeyedRng {
    /// A generator for `key` (e.g. `[seed, epoch, row, stream]`).
    pub fn new(key: &[u64]) -> Self {
        let mut h = 0x6A09_E667_F3BC_C909u64;
        for &k in key {
            h = mix64(h ^ k.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        }
        KeyedRng { state: h }
    }

    /// Next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.state)
    }

    /// Uniform in `0..n` (n > 0), unbiased (Lemire's multiply-and-reject). The rejection
    /// threshold `2^64 mod n` is below `n`, so it is computed (a division) only when the low
    /// half falls below `n`: rarely, and with the same draws and results as always computing it.
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        let mut m = (self.next_u64() as u128) * (n as u128);
        if (m as u64) < n {
            let threshold = n.wrapping_neg() % n;
            while (m as u64) < threshold {
                m = (self.next_u64() as u128) * (n as u128);
            }
        }
        (m >> 64) as u64
    }
}

/// A pseudo-random permutation of `0..n`, evaluated per index in O(1) expected time.
#[derive(Debug, Clone, Copy)]
pub struct Permutation {
    n: u64,
    half_bits: u32,
    keys: [u64; 6],
}

impl Permutation {
    /// The permutation of `0..n` for `key`.
    pub fn new(n: u64, key: &[u64]) -> Self {
        let bits = 64 - n.saturating_sub(1).leading_zeros();
        let half_bits = bits.div_ceil(2).max(1);
        let mut rng = KeyedRng::new(key);
        let keys = [0; 6].map(|_| rng.next_u64());
        Permutation { n, half_bits, keys }
    }

    /// The image of `i` (< n).
    #[inline]
    pub fn apply(&self, i: u64) -> u64 {
        debug_assert!(i < self.n);
        let mask = (1u64 << self.half_bits) - 1;
        let mut x = i;
        loop {
            let (mut l, mut r) = (x >> self.half_bits, x & mask);
            for k in self.keys {
                let f = mix64(r ^ k) & mask;
                (l, r) = (r, l ^ f);
            }
            x = (l << self.half_bits) | r;
            // Cycle walking: the domain is 4^half_bits >= n, re-encrypt until inside.
            if x < self.n {
                return x;
            }
        }
    }

    /// The size of the domain.
    pub fn len(&self) -> u64 {
        self.n
    }

    /// Whether the domain is empty.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }
}

/// What to do with the rows that do not divide evenly among the ranks (`"pad"`, `"drop"`,
/// `"uneven"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tail {
    /// Pad by repeating rows from the start of the epoch order, so every rank gets the same
    /// count (torch `DistributedSampler(drop_last=False)`, the default).
    #[default]
    Pad,
    /// Drop the tail so every rank gets the same count (torch `drop_last=True`).
    Drop,
    /// Neither: the first `n % world_size` ranks get one row more. Every row exactly once per
    /// epoch; for splitting work among DataLoader workers, not for DDP ranks.
    Uneven,
}

crate::options::named!(Tail, "shard_tail");

/// Distributed sharding of an epoch, as torch's `DistributedSampler`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This process's rank.
    pub rank: u64,
    /// Number of ranks.
    pub world_size: u64,
    /// The rows that do not divide evenly.
    pub tail: Tail,
}

impl Default for Shard {
    fn default() -> Self {
        Shard {
            rank: 0,
            world_size: 1,
            tail: Tail::Pad,
        }
    }
}

impl Shard {
    /// Check 1 <= world_size <= [`crate::limits::WORLD_SIZE`] and rank < world_size.
    pub fn check(&self) -> Result<()> {
        if self.world_size > crate::limits::WORLD_SIZE {
            return Err(Error::argument(
                "world_size",
                format!(
                    "{} is outside 1..={}",
                    self.world_size,
                    crate::limits::WORLD_SIZE
                ),
            ));
        }
        if self.world_size == 0 {
            return Err(Error::argument(
                "world_size",
                "0 ranks: world_size is at least 1",
            ));
        }
        if self.rank >= self.world_size {
            return Err(Error::argument(
                "rank",
                format!(
                    "rank {} must be below world_size {}",
                    self.rank, self.world_size
                ),
            ));
        }
        Ok(())
    }

    /// Rows per rank per epoch for a universe of `n` rows.
    pub fn samples_per_rank(&self, n: u64) -> u64 {
        match self.tail {
            Tail::Pad => n.div_ceil(self.world_size),
            Tail::Drop => n / self.world_size,
            Tail::Uneven => n.saturating_sub(self.rank).div_ceil(self.world_size),
        }
    }
}

/// The order of one epoch for one rank.
#[derive(Debug, Clone)]
pub struct EpochOrder<'u> {
    rows: EpochRows<'u>,
    perm: Permutation,
    shard: Shard,
    shuffle: bool,
    offset: u64,
}

impl<'u> EpochOrder<'u> {
    /// The order of `epoch` (shuffled with `seed` unless `shuffle` is false).
    pub fn new(universe: &'u Universe, seed: u64, epoch: u64, shard: Shard, shuffle: bool) -> Self {
        EpochOrder {
            rows: universe.epoch(epoch),
            perm: Permutation::new(universe.len(), &[seed, epoch, 0xe90c4]),
            shard,
            shuffle,
            offset: 0,
        }
    }

    /// The rest of the epoch after its first `offset` positions (consumed by a run with
    /// another world size or batch size): the remaining rows, in the same order, sharded
    /// and padded or cut as a whole epoch is (elastic resumption).
    pub fn after(mut self, offset: u64) -> Self {
        self.offset = offset.min(self.rows.len());
        self
    }

    /// Rows of the epoch from the offset on.
    fn remaining(&self) -> u64 {
        self.rows.len() - self.offset
    }

    /// Number of rows this rank sees in the epoch.
    pub fn len(&self) -> u64 {
        self.shard.samples_per_rank(self.remaining())
    }

    /// Whether this rank sees no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The row at position `i` (< len) of this rank's order.
    #[inline]
    pub fn row(&self, i: u64) -> u64 {
        self.global_row(self.shard.rank + i * self.shard.world_size)
    }

    /// Positions of the global order (all ranks: rank r holds positions r, r+W, ...):
    /// the universe padded to a multiple of the world size, or cut to one, by the tail policy
    /// (`Uneven` keeps it as is).
    pub fn global_len(&self) -> u64 {
        let (n, w) = (self.remaining(), self.shard.world_size);
        match self.shard.tail {
            Tail::Pad => n.div_ceil(w) * w,
            Tail::Drop => n / w * w,
            Tail::Uneven => n,
        }
    }

    /// The row at position `p` of the global order (padding repeats from its start).
    #[inline]
    pub fn global_row(&self, p: u64) -> u64 {
        let p = self.offset + p % self.remaining();
        let j = if self.shuffle { self.perm.apply(p) } else { p };
        self.rows.row(j)
    }

    /// The epoch's universe (index -> row, before shuffling).
    pub fn rows(&self) -> &EpochRows<'u> {
        &self.rows
    }
}

/// One group: the row, its positive index, its negative indices (G-1 of them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    /// Row of groups.arrow.
    pub row: u64,
    /// Index into the row's `pos`.
    pub pos: u32,
    /// Indices into the row's `neg`, in draw order.
    pub neg: Vec<u32>,
}

/// Draw a group for a row with `n_pos` positives and `n_neg` negatives, keyed by
/// (seed, epoch, row). Needs `n_pos >= 1`, and `n_neg >= 1` when `group_size >= 2`.
pub fn sample_group(
    seed: u64,
    epoch: u64,
    row: u64,
    n_pos: usize,
    n_neg: usize,
    group_size: usize,
    out_neg: &mut Vec<u32>,
) -> Result<u32> {
    if n_pos == 0 {
        return Err(Error::corrupt(
            crate::format::GROUPS_FILE,
            format!("row {row} has no positive"),
        ));
    }
    let k = group_size.saturating_sub(1);
    out_neg.clear();
    if k > 0 && n_neg == 0 {
        return Err(Error::argument(
            "group_size",
            format!("row {row} has no negatives but group_size is {group_size}"),
        ));
    }
    let mut rng = KeyedRng::new(&[seed, epoch, row, 0x6e6567]);
    let pos = rng.below(n_pos as u64) as u32;
    if k == 0 {
        return Ok(pos);
    }
    if n_neg >= k {
        if 2 * k <= n_neg {
            // Rejection: uniform over ordered k-tuples of distinct indices, like random.sample.
            while out_neg.len() < k {
                let c = rng.below(n_neg as u64) as u32;
                if !out_neg.contains(&c) {
                    out_neg.push(c);
                }
            }
        } else {
            partial_shuffle(&mut rng, n_neg, k, 1, out_neg);
        }
    } else {
        // The pool is range(n_neg) repeated ceil(k / n_neg) times; draw k without replacement.
        partial_shuffle(&mut rng, n_neg, k, k.div_ceil(n_neg), out_neg);
    }
    Ok(pos)
}

/// The first `k` of a uniformly shuffled pool `0..n` repeated `reps` times, mapped back to
/// `0..n`, into `out` (empty). The pool is built in `out` itself and cut to its first `k`
/// (what a Fisher-Yates pass stopped after `k` swaps leaves there): no allocation once `out`
/// has held a pool, where epoch passes call this for every row.
fn partial_shuffle(rng: &mut KeyedRng, n: usize, k: usize, reps: usize, out: &mut Vec<u32>) {
    for _ in 0..reps {
        out.extend(0..n as u32);
    }
    for i in 0..k {
        let j = i + rng.below((out.len() - i) as u64) as usize;
        out.swap(i, j);
    }
    out.truncate(k);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_draws_as_the_always_dividing_form() {
        fn reference(rng: &mut KeyedRng, n: u64) -> u64 {
            let threshold = n.wrapping_neg() % n;
            loop {
                let m = (rng.next_u64() as u128) * (n as u128);
                if (m as u64) >= threshold {
                    return (m >> 64) as u64;
                }
            }
        }
        for n in [1u64, 2, 3, 7, 10, 1000, (1 << 63) + 1, u64::MAX] {
            let (mut a, mut b) = (KeyedRng::new(&[n]), KeyedRng::new(&[n]));
            for _ in 0..2000 {
                assert_eq!(a.below(n), reference(&mut b, n));
            }
        }
    }

    #[test]
    fn permutations_are_bijections() {
        for n in [1u64, 2, 3, 7, 64, 1000, 4097] {
            let p = Permutation::new(n, &[1, 2]);
            let mut seen = vec![false; n as usize];
            for i in 0..n {
                let j = p.apply(i) as usize;
                assert!(!seen[j]);
                seen[j] = true;
            }
        }
        let a = Permutation::new(1000, &[1, 2]);
        let b = Permutation::new(1000, &[1, 3]);
        assert!((0..1000).filter(|&i| a.apply(i) != b.apply(i)).count() > 900);
    }

    #[test]
    fn shards_cover_the_epoch() {
        let u = Universe::all(10);
        for (tail, per_rank) in [
            (Tail::Pad, [4, 4, 4]),
            (Tail::Drop, [3, 3, 3]),
            (Tail::Uneven, [4, 3, 3]),
        ] {
            let mut seen = Vec::new();
            for rank in 0..3 {
                let o = EpochOrder::new(
                    &u,
                    1,
                    0,
                    Shard {
                        rank,
                        world_size: 3,
                        tail,
                    },
                    true,
                );
                assert_eq!(o.len(), per_rank[rank as usize]);
                seen.extend((0..o.len()).map(|i| o.row(i)));
            }
            let mut distinct = seen.clone();
            distinct.sort();
            distinct.dedup();
            let (want_distinct, want_seen) = match tail {
                Tail::Pad => (10, 12),
                Tail::Drop => (9, 9),
                Tail::Uneven => (10, 10),
            };
            assert_eq!(distinct.len(), want_distinct);
            assert_eq!(seen.len(), want_seen);
        }
    }

    #[test]
    fn groups_follow_the_reference_rules() {
        let mut neg = Vec::new();
        for row in 0..200 {
            let p = sample_group(3, 1, row, 2, 20, 8, &mut neg).unwrap();
            assert!(p < 2);
            assert_eq!(neg.len(), 7);
            let mut d = neg.clone();
            d.sort();
            d.dedup();
            assert_eq!(d.len(), 7, "distinct when enough negatives");
            // Fewer negatives than G-1: each index at most ceil(k/n) times.
            sample_group(3, 1, row, 1, 3, 8, &mut neg).unwrap();
            assert_eq!(neg.len(), 7);
            for i in 0..3 {
                assert!(neg.iter().filter(|&&x| x == i).count() <= 3);
            }
        }
        assert!(sample_group(0, 0, 0, 1, 0, 2, &mut neg).is_err());
        assert_eq!(sample_group(0, 0, 0, 1, 0, 1, &mut neg).unwrap(), 0);
    }
}
