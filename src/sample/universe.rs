//! The rows an epoch trains on, by source, before ordering.
//!
//! Each source (input file) holds a range of rows, or an explicit list when rows had to be
//! left out (rows without negatives). Each source contributes `take` rows to every epoch:
//!
//! - `take == n` (the default): every row once.
//! - `take < n` (`max_example_num_per_dataset`, or a small mixing weight): a seeded random
//!   subset, drawn anew each epoch from (seed, source, epoch).
//! - `take > n` (a large mixing weight): every row once per full copy (`take / n` copies), then
//!   a seeded random subset of `take % n` rows, drawn anew each epoch.
//!
//! Index `j` of the epoch's universe is row `k = j - start(s)` of its source `s`: copy `k / n`,
//! row `k % n`, through the source's epoch subset permutation for the partial copy. Everything
//! is a pure function of (seed, epoch, j); nothing is materialized per epoch.

use crate::error::{Error, Result};
use crate::sample::Permutation;

/// One source's rows.
#[derive(Debug, Clone, PartialEq)]
struct SourceRows {
    /// First row of a contiguous range, when `list` is `None`.
    first: u64,
    /// The rows, when some were left out.
    list: Option<Vec<u32>>,
    /// Rows available.
    n: u64,
    /// Rows this source contributes to each epoch.
    take: u64,
}

impl SourceRows {
    #[inline]
    fn row(&self, k: u64) -> u64 {
        match &self.list {
            Some(l) => l[k as usize] as u64,
            None => self.first + k,
        }
    }
}

/// The rows a run trains on; see the module docs.
#[derive(Debug, Clone, PartialEq)]
pub struct Universe {
    sources: Vec<SourceRows>,
    /// Prefix sums of `take`, for O(log sources) lookup.
    starts: Vec<u64>,
    seed: u64,
}

impl Universe {
    /// Every row of `0..n`, as one source.
    pub fn all(n: u64) -> Universe {
        Universe::sources(&[n], 0)
    }

    /// Sources of the given sizes laid out one after another, each contributing all its rows.
    /// `seed` keys the subsets that [`Universe::cap`] and [`Universe::weigh`] draw.
    pub fn sources(sizes: &[u64], seed: u64) -> Universe {
        let mut first = 0;
        let sources = sizes
            .iter()
            .map(|&n| {
                let s = SourceRows {
                    first,
                    list: None,
                    n,
                    take: n,
                };
                first += n;
                s
            })
            .collect();
        let mut u = Universe {
            sources,
            starts: Vec::new(),
            seed,
        };
        u.restart();
        u
    }

    fn restart(&mut self) {
        let mut at = 0;
        self.starts = self
            .sources
            .iter()
            .map(|s| {
                let st = at;
                at += s.take;
                st
            })
            .collect();
    }

    /// Keep only the rows for which `keep` holds (each source becomes a list of its rows;
    /// every source then contributes all its kept rows).
    pub fn filter(&self, mut keep: impl FnMut(u64) -> Result<bool>) -> Result<Universe> {
        let mut sources = Vec::with_capacity(self.sources.len());
        for s in &self.sources {
            let mut list = Vec::new();
            for k in 0..s.n {
                let r = s.row(k);
                if keep(r)? {
                    list.push(u32::try_from(r).map_err(|_| {
                        Error::Internal("more than 2^32 rows in a row list".into())
                    })?);
                }
            }
            let n = list.len() as u64;
            sources.push(SourceRows {
                first: 0,
                list: Some(list),
                n,
                take: n,
            });
        }
        let mut u = Universe {
            sources,
            starts: Vec::new(),
            seed: self.seed,
        };
        u.restart();
        Ok(u)
    }

    /// `max_example_num_per_dataset`: each source larger than `cap` contributes a seeded subset
    /// of `cap` rows, a new one each epoch.
    pub fn cap(mut self, cap: u64) -> Universe {
        for s in &mut self.sources {
            s.take = s.take.min(cap);
        }
        self.restart();
        self
    }

    /// Weighted mixing: the epoch keeps its length (the rows every source contributes now)
    /// and source `s` contributes `weights[s] / sum(weights)` of it, rounded by largest
    /// remainder so the counts add up exactly. One weight per source, finite and >= 0, not
    /// all 0; a source with a positive weight must have rows.
    pub fn weigh(mut self, weights: &[f64]) -> Result<Universe> {
        if weights.len() != self.sources.len() {
            return Err(Error::argument(
                "weights",
                format!(
                    "{} weights for {} sources (one per input file, in the manifest's order)",
                    weights.len(),
                    self.sources.len()
                ),
            ));
        }
        check_weights(weights)?;
        if let Some(s) = (0..weights.len()).find(|&s| weights[s] > 0.0 && self.sources[s].n == 0) {
            return Err(Error::argument(
                "weights",
                format!("source {s} has weight {} but no rows to draw", weights[s]),
            ));
        }
        let len = self.len();
        let takes = apportion(len, weights);
        for (s, t) in self.sources.iter_mut().zip(takes) {
            s.take = t;
        }
        self.restart();
        Ok(self)
    }

    /// Rows per epoch.
    pub fn len(&self) -> u64 {
        self.sources.iter().map(|s| s.take).sum()
    }

    /// Whether an epoch has no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The indices of source `s` in every epoch's universe.
    pub fn source_span(&self, s: usize) -> std::ops::Range<u64> {
        self.starts[s]..self.starts[s] + self.sources[s].take
    }

    /// Rows each source contributes to an epoch.
    pub fn takes(&self) -> Vec<u64> {
        self.sources.iter().map(|s| s.take).collect()
    }

    /// The universe of `epoch`: its subsets drawn. Without caps or weights (every source
    /// whole) nothing is drawn or allocated: the loader builds this for every batch.
    pub fn epoch(&self, epoch: u64) -> EpochRows<'_> {
        let partial = |src: &SourceRows| src.n > 0 && src.take % src.n != 0;
        let subsets = if self.sources.iter().any(partial) {
            self.sources
                .iter()
                .enumerate()
                .map(|(s, src)| {
                    partial(src)
                        .then(|| Permutation::new(src.n, &[self.seed, s as u64, epoch, 0x5ca1ab1e]))
                })
                .collect()
        } else {
            Vec::new()
        };
        EpochRows {
            universe: self,
            subsets,
        }
    }
}

/// The universe of one epoch: index -> row.
#[derive(Debug, Clone)]
pub struct EpochRows<'u> {
    universe: &'u Universe,
    /// Per source, the permutation whose first rows are the epoch's partial copy; empty when
    /// no source has a partial copy.
    subsets: Vec<Option<Permutation>>,
}

impl EpochRows<'_> {
    /// Rows per epoch.
    pub fn len(&self) -> u64 {
        self.universe.len()
    }

    /// Whether the epoch has no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The source of index `j` (< len).
    #[inline]
    pub fn source_of(&self, j: u64) -> usize {
        self.universe.starts.partition_point(|&st| st <= j) - 1
    }

    /// The row at index `j` (< len).
    #[inline]
    pub fn row(&self, j: u64) -> u64 {
        let u = self.universe;
        let s = if u.sources.len() == 1 {
            0
        } else {
            self.source_of(j)
        };
        let src = &u.sources[s];
        let k = j - u.starts[s];
        let (copy, i) = (k / src.n, k % src.n);
        let i = match self.subsets.get(s) {
            Some(Some(p)) if copy == src.take / src.n => p.apply(i),
            _ => i,
        };
        src.row(i)
    }
}

/// Mixing weights are finite numbers >= 0, not all 0: an [`Error::Argument`] naming `weights`
/// otherwise (checked with the loader's other settings, before anything is allocated).
pub fn check_weights(weights: &[f64]) -> Result<()> {
    if let Some((s, w)) = weights
        .iter()
        .enumerate()
        .find(|(_, w)| !w.is_finite() || **w < 0.0)
    {
        return Err(Error::argument(
            "weights",
            format!("weight {w} of source {s} is not a finite number >= 0"),
        ));
    }
    if weights.iter().all(|&w| w == 0.0) {
        return Err(Error::argument("weights", "all weights are 0"));
    }
    Ok(())
}

/// Split `total` into parts proportional to `weights` (finite, >= 0, sum > 0), rounding by
/// largest remainder (ties to the lower index), so the parts add up to `total` exactly.
/// Weights so large that their sum, or a part before rounding, overflows (`1e308`) are scaled
/// by the largest first: the same shares, each part at most `total`. Other weights are used
/// as given, so their parts do not change.
pub fn apportion(total: u64, weights: &[f64]) -> Vec<u64> {
    let overflows = !(weights.iter().sum::<f64>() * total.max(1) as f64).is_finite();
    let top = weights.iter().copied().fold(0.0, f64::max);
    let scaled: Vec<f64> = if overflows {
        weights.iter().map(|w| w / top).collect()
    } else {
        weights.to_vec()
    };
    let weights = &scaled[..];
    let sum: f64 = weights.iter().sum();
    let quotas: Vec<f64> = weights.iter().map(|w| total as f64 * w / sum).collect();
    let mut parts: Vec<u64> = quotas
        .iter()
        .map(|q| (q.floor() as u64).min(total))
        .collect();
    let given: u64 = parts.iter().sum();
    let mut order: Vec<usize> = (0..weights.len()).filter(|&s| weights[s] > 0.0).collect();
    order.sort_by(|&a, &b| {
        let (fa, fb) = (quotas[a] - quotas[a].floor(), quotas[b] - quotas[b].floor());
        fb.total_cmp(&fa).then(a.cmp(&b))
    });
    for &s in order
        .iter()
        .cycle()
        .take(total.saturating_sub(given) as usize)
    {
        parts[s] += 1;
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epoch_rows(u: &Universe, e: u64) -> Vec<u64> {
        let r = u.epoch(e);
        (0..r.len()).map(|j| r.row(j)).collect()
    }

    #[test]
    fn caps_draw_a_new_subset_each_epoch() {
        let u = Universe::sources(&[10, 3, 20], 9).cap(5);
        assert_eq!(u.len(), 5 + 3 + 5);
        let e0 = epoch_rows(&u, 0);
        assert!(e0[..5].iter().all(|&r| r < 10));
        assert_eq!(&e0[5..8], &[10, 11, 12]);
        assert!(e0[8..].iter().all(|&r| (13..33).contains(&r)));
        let mut d = e0.clone();
        d.sort();
        d.dedup();
        assert_eq!(d.len(), e0.len(), "no row twice in an epoch");
        assert_ne!(e0, epoch_rows(&u, 1), "a new subset each epoch");
    }

    #[test]
    fn weights_set_each_source_share() {
        let u = Universe::sources(&[10, 30], 1).weigh(&[3.0, 1.0]).unwrap();
        assert_eq!(u.takes(), vec![30, 10]);
        let rows = epoch_rows(&u, 2);
        // Source 0 (10 rows) three times over; source 1 a subset of 10 of its 30.
        for r in 0..10 {
            assert_eq!(rows[..30].iter().filter(|&&x| x == r).count(), 3);
        }
        let mut sub = rows[30..].to_vec();
        sub.sort();
        sub.dedup();
        assert_eq!(sub.len(), 10);
        assert!(sub.iter().all(|&r| (10..40).contains(&r)));
        // 2.5 copies: two full copies plus a subset of half the rows.
        let u = Universe::sources(&[4, 6], 1).weigh(&[1.0, 0.0]).unwrap();
        assert_eq!(u.takes(), vec![10, 0]);
        let rows = epoch_rows(&u, 0);
        assert_eq!(&rows[..8], &[0, 1, 2, 3, 0, 1, 2, 3]);
        let mut part = rows[8..].to_vec();
        part.sort();
        part.dedup();
        assert_eq!(part.len(), 2);
        assert!(Universe::sources(&[4, 0], 1).weigh(&[1.0, 1.0]).is_err());
        assert!(Universe::sources(&[4, 6], 1).weigh(&[1.0]).is_err());
        assert!(Universe::sources(&[4, 6], 1).weigh(&[0.0, 0.0]).is_err());
        assert!(Universe::sources(&[4, 6], 1)
            .weigh(&[f64::NAN, 1.0])
            .is_err());
    }

    #[test]
    fn apportion_adds_up() {
        assert_eq!(apportion(10, &[1.0, 1.0, 1.0]), vec![4, 3, 3]);
        assert_eq!(apportion(7, &[0.5, 0.25, 0.25]), vec![3, 2, 2]);
        assert_eq!(apportion(5, &[0.0, 1.0]), vec![0, 5]);
        for total in [0u64, 1, 99, 1000] {
            let p = apportion(total, &[0.2, 0.3, 0.5, 1e-9]);
            assert_eq!(p.iter().sum::<u64>(), total);
        }
    }

    /// Regression (issue 18, finding 5): `weights=[1e308, 1, 0]` overflowed a part to
    /// 2^64-1 rows (an epoch that never ends); such weights give their shares of the epoch.
    #[test]
    fn huge_weights_keep_the_epoch_length() {
        for (w, want) in [
            (vec![1e308, 1.0, 0.0], vec![1000, 0, 0]),
            (vec![1e308, 1e308, 0.0], vec![500, 500, 0]),
            (vec![f64::MAX, f64::MAX / 3.0], vec![750, 250]),
        ] {
            assert_eq!(apportion(1000, &w), want, "{w:?}");
            let sizes = &[600u64, 300, 100][..w.len()];
            let u = Universe::sources(sizes, 1).weigh(&w).unwrap();
            assert_eq!(u.len(), sizes.iter().sum::<u64>(), "{w:?}");
        }
        for bad in [vec![f64::INFINITY, 1.0], vec![-0.5, 1.0], vec![0.0, -0.0]] {
            assert!(check_weights(&bad).is_err(), "{bad:?}");
        }
    }
}
