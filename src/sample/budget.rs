//! Token-budget batches: a variable number of groups per batch, as many as fit
//! `max_tokens`, with every rank taking the same number of steps.
//!
//! Pure functions of one epoch's group costs by position of the global order (all ranks: rank
//! `r` holds slots `r, r+W, r+2W, ...` of each batch):
//!
//! 1. With a megabatch multiplier `M`, each run of `M * W * batch_size` positions is sorted by
//!    length, longest first (ties by position); without one the order stays random.
//! 2. Batches are cut greedily in that order, `W` positions (one per rank) at a time, while
//!    every rank's batch stays within the budget and below `batch_size` groups:
//!    - padded layout: `groups x group_size x (its longest pair, rounded up to
//!      pad_to_multiple_of) <= max_tokens`;
//!    - packed layout: the real tokens of its groups `<= max_tokens`.
//!
//!    A batch always takes at least one group per rank, so a group above the budget alone
//!    still trains (as a batch of one). Packed and sorted, a batch that cannot take the next
//!    (longer) group is topped up with the megabatch's shortest groups: order inside a
//!    megabatch costs a packed batch nothing.
//! 3. The batch holding the epoch's longest group trades places with batch 0, so
//!    out-of-memory shows at the first step.
//!
//! A batch never spans two megabatches. The plan is computed once per epoch from the group
//! lengths (no tokens are read); resuming at any step then costs nothing more.

/// How a batch's tokens are counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cost {
    /// Padded layout: groups x `group_size` x longest pair rounded up to `multiple`; a
    /// position's cost is its group's longest pair.
    Padded {
        /// Pairs per group.
        group_size: u64,
        /// `pad_to_multiple_of` (1 when unset).
        multiple: u64,
    },
    /// Packed layout: the sum of the groups' real tokens; a position's cost is its group's.
    Packed,
}

/// Budget settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Most tokens in one rank's batch.
    pub max_tokens: u64,
    /// Most groups in one rank's batch (`batch_size`).
    pub max_groups: u64,
    /// Number of ranks.
    pub world: u64,
    /// Megabatch multiplier (sorting by length), if any.
    pub mult: Option<u64>,
    /// How tokens are counted.
    pub cost: Cost,
}

/// One epoch's batches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetPlan {
    /// Global positions in batch order.
    order: Vec<u32>,
    /// Per batch: (first index into `order`, groups per rank).
    batches: Vec<(u32, u32)>,
    world: u64,
}

impl BudgetPlan {
    /// The plan for the global order's group `sizes` (longest pair for a padded cost, real
    /// tokens for a packed one) and `longest` pairs (for the longest-first rule); both have
    /// a multiple of `budget.world` entries.
    pub fn new(sizes: &[u32], longest: &[u32], budget: Budget) -> BudgetPlan {
        let w = budget.world.max(1) as usize;
        let n = sizes.len() / w * w;
        let mb = budget.mult.map_or(n.max(1), |m| {
            (m * budget.world * budget.max_groups) as usize
        });
        let mut order: Vec<u32> = (0..n as u32).collect();
        if budget.mult.is_some() {
            for chunk in order.chunks_mut(mb.max(1)) {
                chunk.sort_by_key(|&p| (std::cmp::Reverse(longest[p as usize]), p));
            }
        }
        // Cut each megabatch into batches of whole W-position rows (one position per rank).
        // Packed and sorted: a batch that cannot take the next (longer) row is topped up with
        // the megabatch's shortest rows, from its end; the order is rewritten so each batch is
        // contiguous.
        let top_up = budget.mult.is_some() && budget.cost == Cost::Packed;
        let (mut cut, mut batches) = (Vec::with_capacity(n), Vec::new());
        for m in (0..n).step_by(mb.max(1)) {
            let rows: Vec<&[u32]> = order[m..(m + mb).min(n)].chunks(w).collect();
            let (mut lo, mut hi) = (0, rows.len());
            while lo < hi {
                let start = cut.len();
                let mut fill = Fill::new(w, budget);
                while lo < hi && fill.try_add(rows[lo], sizes) {
                    cut.extend_from_slice(rows[lo]);
                    lo += 1;
                }
                while top_up && lo < hi && fill.try_add(rows[hi - 1], sizes) {
                    cut.extend_from_slice(rows[hi - 1]);
                    hi -= 1;
                }
                batches.push((start as u32, fill.groups as u32));
            }
        }
        let order = cut;
        // The batch holding the longest group first.
        let top = |&(start, b): &(u32, u32)| {
            order[start as usize..start as usize + b as usize * w]
                .iter()
                .map(|&p| longest[p as usize])
                .max()
                .unwrap_or(0)
        };
        if let Some(k) =
            (0..batches.len()).max_by_key(|&k| (top(&batches[k]), std::cmp::Reverse(k)))
        {
            batches.swap(0, k);
        }
        BudgetPlan {
            order,
            batches,
            world: budget.world.max(1),
        }
    }

    /// Batches in the epoch.
    pub fn len(&self) -> u64 {
        self.batches.len() as u64
    }

    /// Whether the epoch has no batches.
    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    /// Global positions of `rank`'s groups in batch `k` (< len).
    pub fn batch(&self, k: u64, rank: u64) -> Vec<u64> {
        let (start, b) = self.batches[k as usize];
        (0..b as u64)
            .map(|i| self.order[(start as u64 + i * self.world + rank) as usize] as u64)
            .collect()
    }
}

/// One batch being filled: per rank, its longest group and its total tokens.
struct Fill {
    longest: Vec<u64>,
    total: Vec<u64>,
    groups: u64,
    budget: Budget,
}

impl Fill {
    fn new(w: usize, budget: Budget) -> Fill {
        Fill {
            longest: vec![0; w],
            total: vec![0; w],
            groups: 0,
            budget,
        }
    }

    /// Add one row (a group per rank) if the batch is empty, or if it stays within the
    /// budget and below `max_groups` on every rank.
    fn try_add(&mut self, row: &[u32], sizes: &[u32]) -> bool {
        if self.groups >= self.budget.max_groups {
            return false;
        }
        let fits = row.iter().enumerate().all(|(r, &p)| {
            let size = sizes[p as usize] as u64;
            match self.budget.cost {
                Cost::Padded {
                    group_size,
                    multiple,
                } => {
                    let l = self.longest[r].max(size).div_ceil(multiple) * multiple;
                    (self.groups + 1) * group_size * l <= self.budget.max_tokens
                }
                Cost::Packed => self.total[r] + size <= self.budget.max_tokens,
            }
        });
        if self.groups > 0 && !fits {
            return false;
        }
        for (r, &p) in row.iter().enumerate() {
            self.longest[r] = self.longest[r].max(sizes[p as usize] as u64);
            self.total[r] += sizes[p as usize] as u64;
        }
        self.groups += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_fill_the_budget_and_cover_every_position() {
        let sizes: Vec<u32> = (0..120).map(|i| 5 + (i * 37 % 60)).collect();
        for (world, mult) in [(1u64, Some(4u64)), (2, Some(2)), (3, None)] {
            let budget = Budget {
                max_tokens: 600,
                max_groups: 8,
                world,
                mult,
                cost: Cost::Padded {
                    group_size: 2,
                    multiple: 8,
                },
            };
            let plan = BudgetPlan::new(&sizes, &sizes, budget);
            let mut seen = vec![0; sizes.len()];
            for k in 0..plan.len() {
                for rank in 0..world {
                    let ps = plan.batch(k, rank);
                    let l = ps.iter().map(|&p| sizes[p as usize] as u64).max().unwrap();
                    let tokens = ps.len() as u64 * 2 * l.div_ceil(8) * 8;
                    assert!(tokens <= 600 || ps.len() == 1, "{tokens}");
                    assert!(ps.len() <= 8);
                    for p in ps {
                        seen[p as usize] += 1;
                    }
                }
            }
            assert!(seen.iter().all(|&c| c == 1), "every position once");
            let first_max = (0..world)
                .flat_map(|r| plan.batch(0, r))
                .map(|p| sizes[p as usize])
                .max();
            assert_eq!(first_max, sizes.iter().copied().max(), "longest first");
        }
        // Packed: real tokens add up to at most the budget.
        let plan = BudgetPlan::new(
            &sizes,
            &sizes,
            Budget {
                max_tokens: 200,
                max_groups: 100,
                world: 1,
                mult: Some(10),
                cost: Cost::Packed,
            },
        );
        for k in 0..plan.len() {
            let t: u32 = plan.batch(k, 0).iter().map(|&p| sizes[p as usize]).sum();
            assert!(t <= 200);
        }
    }
}
