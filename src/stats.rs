//! Distributions over a dataset for `rankfeed inspect`: token lengths of queries and passages,
//! positives and negatives per query. One linear pass over the groups and passages.

use serde::Serialize;

use crate::dataset::Dataset;
use crate::error::Result;

/// A distribution of non-negative integers, with power-of-two buckets.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Distribution {
    /// Number of values.
    pub count: u64,
    /// Smallest value.
    pub min: u64,
    /// Largest value.
    pub max: u64,
    /// Mean.
    pub mean: f64,
    /// Median, 90th and 99th percentile.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// `(lo, hi, count)`: values in `lo..=hi`. One bucket per value when all are <= 32,
    /// else 0, 1, 2-3, 4-7, 8-15, ...
    pub buckets: Vec<(u64, u64, u64)>,
}

/// Accumulates a [`Distribution`] with exact counts up to 65535 and buckets above.
#[derive(Debug, Clone)]
pub(crate) struct Accumulator {
    exact: Vec<u64>,
    big: Vec<u64>,
    count: u64,
    sum: u128,
    min: u64,
    max: u64,
}

const EXACT: u64 = 1 << 16;
/// Distributions whose values are all below this get one bucket per value.
const EXACT_BUCKETS_BELOW: u64 = 33;

impl Accumulator {
    pub(crate) fn new() -> Self {
        Accumulator {
            // Grown to the largest exact value seen: cheap to keep one per source.
            exact: Vec::new(),
            big: vec![0; 64],
            count: 0,
            sum: 0,
            min: u64::MAX,
            max: 0,
        }
    }

    #[inline]
    pub(crate) fn add(&mut self, v: u64) {
        if v < EXACT {
            if v as usize >= self.exact.len() {
                self.exact.resize(v as usize + 1, 0);
            }
            self.exact[v as usize] += 1;
        } else {
            self.big[bucket_of(v)] += 1;
        }
        self.count += 1;
        self.sum += v as u128;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
    }

    pub(crate) fn finish(&self) -> Distribution {
        if self.count == 0 {
            return Distribution::default();
        }
        let quantile = |q: f64| -> u64 {
            let target = ((self.count as f64) * q).ceil().max(1.0) as u64;
            let mut seen = 0;
            for (v, &c) in self.exact.iter().enumerate() {
                seen += c;
                if seen >= target {
                    return v as u64;
                }
            }
            for (b, &c) in self.big.iter().enumerate() {
                seen += c;
                if seen >= target {
                    return bucket_range(b).1.min(self.max);
                }
            }
            self.max
        };
        let mut counts = vec![0u64; 64];
        for (v, &c) in self.exact.iter().enumerate() {
            counts[bucket_of(v as u64)] += c;
        }
        for (b, &c) in self.big.iter().enumerate() {
            counts[b] += c;
        }
        let buckets = if self.max < EXACT_BUCKETS_BELOW {
            (self.min..=self.max)
                .map(|v| (v, v, self.exact[v as usize]))
                .collect()
        } else {
            (bucket_of(self.min)..=bucket_of(self.max))
                .map(|b| {
                    let (lo, hi) = bucket_range(b);
                    (lo, hi, counts[b])
                })
                .collect()
        };
        Distribution {
            count: self.count,
            min: self.min,
            max: self.max,
            mean: self.sum as f64 / self.count as f64,
            p50: quantile(0.5),
            p90: quantile(0.9),
            p99: quantile(0.99),
            buckets,
        }
    }
}

/// Bucket 0 holds 0; bucket k >= 1 holds 2^(k-1) ..= 2^k - 1.
fn bucket_of(v: u64) -> usize {
    (64 - v.leading_zeros()) as usize
}

fn bucket_range(b: usize) -> (u64, u64) {
    if b == 0 {
        (0, 0)
    } else {
        (1u64 << (b - 1), (1u64 << (b - 1)).saturating_mul(2) - 1)
    }
}

/// Distributions over a dataset.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DatasetStats {
    /// Query token lengths (formatted, no special tokens).
    pub query_tokens: Distribution,
    /// Token lengths of the unique passages.
    pub passage_tokens: Distribution,
    /// Positives per query.
    pub pos_per_query: Distribution,
    /// Negatives per query.
    pub neg_per_query: Distribution,
}

/// Compute [`DatasetStats`]; errors on a corrupt row.
pub fn dataset_stats(ds: &Dataset) -> Result<DatasetStats> {
    let (mut q, mut p, mut pos, mut neg) = (
        Accumulator::new(),
        Accumulator::new(),
        Accumulator::new(),
        Accumulator::new(),
    );
    for row in 0..ds.len() {
        let g = ds.group(row)?;
        q.add(g.query.len() as u64);
        pos.add(g.pos.len() as u64);
        neg.add(g.neg.len() as u64);
    }
    for id in 0..ds.num_passages() {
        p.add(ds.passage(id as i32)?.len() as u64);
    }
    Ok(DatasetStats {
        query_tokens: q.finish(),
        passage_tokens: p.finish(),
        pos_per_query: pos.finish(),
        neg_per_query: neg.finish(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_and_quantiles() {
        let mut a = Accumulator::new();
        let mut small = Accumulator::new();
        for v in [2, 2, 5] {
            small.add(v);
        }
        assert_eq!(
            small.finish().buckets,
            vec![(2, 2, 2), (3, 3, 0), (4, 4, 0), (5, 5, 1)]
        );
        for v in [0, 1, 2, 3, 4, 100, 70000] {
            a.add(v);
        }
        let d = a.finish();
        assert_eq!((d.count, d.min, d.max), (7, 0, 70000));
        assert_eq!(d.p50, 3);
        assert_eq!(d.buckets[0], (0, 0, 1));
        assert_eq!(d.buckets[1], (1, 1, 1));
        assert_eq!(d.buckets[2], (2, 3, 2));
        assert_eq!(d.buckets.iter().map(|b| b.2).sum::<u64>(), 7);
        assert_eq!(d.buckets.last().unwrap().0, 65536);
    }
}
