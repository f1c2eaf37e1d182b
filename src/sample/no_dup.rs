//! No-duplicates batches (sentence-transformers' `NoDuplicatesBatchSampler`, over the global
//! batch): no two groups of one global batch (all ranks at one step) share a query or a drawn
//! passage, so an embedder's in-batch negatives are never another group's positive, and no
//! query meets its own positive as another group's negative.
//!
//! A row's *keys* are its query (tokens and prompt) and the passage ids it draws in the epoch:
//! its positive and its sampled negatives, as the loader draws them (so with
//! `exclude_false_negatives` the keys are the negatives it trains on). Keys repeated within one
//! row (a positive that is also a drawn negative, negatives drawn twice from a short list) are
//! the row's own business: the check is between groups.
//!
//! Pure functions of one epoch's global order (all ranks) and the rows' keys:
//!
//! 1. **First fit** in the epoch order: each row joins the first global batch (by index) that
//!    has room (`world_size x batch_size` groups) and holds none of its keys; a new batch
//!    when none does. This is exactly sentence-transformers' loop (fill a batch with the next
//!    rows that collide with nothing in it, the rows that collide wait, in their order, for
//!    the following batches), computed in one pass: a row costs its keys' hash lookups for
//!    each open batch it collides with, and few batches stay open unless a key is in a large
//!    share of the rows (then the data needs that many batches). Without collisions, global
//!    batch `k` is positions `k*W*B .. (k+1)*W*B` of the order: random order's batches.
//! 2. **Tails**, per global batch of `m` rows, so that every rank's share is equal:
//!    - `pad` (the default): `m` is topped up to a multiple of `world_size` with the first rows
//!      of the epoch order (among its first [`FILL_WINDOW`] positions, and at least
//!      `8 x world_size x batch_size`) that collide with nothing in the batch, as the pad tail
//!      repeats rows from the start; a batch they cannot fill is cut as with `drop`;
//!    - `drop`: the batch's last `m % world_size` rows are dropped;
//!    - `uneven`: neither; a rank whose share of a batch is empty skips that step.
//!
//!    Rank `r` takes the batch's rows `r, r+W, r+2W, ...` (random order's striping).
//!    With `drop_last`, a share of fewer than `batch_size` groups is dropped (with pad and
//!    drop every rank's share is the same size, so the whole global batch goes: each
//!    incomplete global batch, wherever first fit left it).
//! 3. Batches keep their index order; the plan is computed once per epoch, so any step, and a
//!    resumption at any step, costs nothing more.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

use crate::error::Result;
use crate::sample::{mix64, Tail};

/// A pad filler is looked for among at most this many first positions of the epoch order (and
/// at least `8 x world_size x batch_size`): bounded work per partial batch.
pub const FILL_WINDOW: u64 = 1024;

/// Something a global batch holds at most once: a query (its key, see the audit) or a passage
/// id. The two kinds never compare equal (the top bit tells them apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(u128);

impl Key {
    /// A query, from its identity hash (tokens and prompt).
    pub fn query(hash: u128) -> Key {
        Key(hash & !(1u128 << 127))
    }

    /// A passage, by id.
    pub fn passage(id: i32) -> Key {
        Key((1u128 << 127) | u128::from(id as u32))
    }
}

/// The keys are hashes or small ids already: one mix, no random state.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.0 = mix64(self.0 ^ u64::from_le_bytes(b));
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = mix64(self.0 ^ (v as u64) ^ mix64((v >> 64) as u64));
    }
}

type KeyBuild = BuildHasherDefault<KeyHasher>;

/// Settings of a no-duplicates plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoDup {
    /// Ranks.
    pub world: u64,
    /// This process's rank.
    pub rank: u64,
    /// Groups per rank in a full batch.
    pub batch: u64,
    /// Tail policy of each global batch.
    pub tail: Tail,
    /// Drop shares of fewer than `batch` groups.
    pub drop_last: bool,
}

/// One epoch's no-duplicates batches, for one rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoDupPlan {
    /// Global positions, global batch after global batch (pad fillers included).
    order: Vec<u64>,
    /// This rank's steps: (first index into `order`, rows of that global batch).
    steps: Vec<(u64, u64)>,
    world: u64,
    rank: u64,
    /// Global batches of the epoch (every rank's, after the tail policy and drop_last).
    pub global_batches: u64,
}

impl NoDupPlan {
    /// The plan for an epoch of `n` positions; `keys(p, out)` appends the keys of the row at
    /// global position `p` (< n) to `out`.
    pub fn new(
        n: u64,
        s: NoDup,
        keys: &mut dyn FnMut(u64, &mut Vec<Key>) -> Result<()>,
    ) -> Result<NoDupPlan> {
        let w = s.world.max(1);
        let cap = (w * s.batch.max(1)) as usize;
        // First fit. Open batches keep their keys; `in_open` counts the open batches holding
        // each key (a key that every open batch holds sends the row to a new batch at once).
        let mut members: Vec<Vec<u64>> = Vec::new();
        let mut open_keys: Vec<Option<HashSet<Key, KeyBuild>>> = Vec::new();
        let mut open: BTreeSet<usize> = BTreeSet::new();
        let mut in_open: HashMap<Key, usize, KeyBuild> = HashMap::default();
        let mut ks = Vec::new();
        for p in 0..n {
            ks.clear();
            keys(p, &mut ks)?;
            ks.sort_unstable();
            ks.dedup();
            let everywhere = ks
                .iter()
                .any(|k| in_open.get(k).is_some_and(|&c| c == open.len()));
            let fit = if everywhere {
                None
            } else {
                open.iter().copied().find(|&j| {
                    let held = open_keys[j].as_ref().expect("open batches keep their keys");
                    !ks.iter().any(|k| held.contains(k))
                })
            };
            let j = fit.unwrap_or_else(|| {
                members.push(Vec::new());
                open_keys.push(Some(HashSet::default()));
                open.insert(members.len() - 1);
                members.len() - 1
            });
            members[j].push(p);
            if members[j].len() == cap {
                open.remove(&j);
                for k in open_keys[j].take().into_iter().flatten() {
                    if let Some(c) = in_open.get_mut(&k) {
                        *c -= 1;
                        if *c == 0 {
                            in_open.remove(&k);
                        }
                    }
                }
            } else {
                let held = open_keys[j].as_mut().expect("open");
                for &k in &ks {
                    held.insert(k);
                    *in_open.entry(k).or_default() += 1;
                }
            }
        }
        drop(in_open);
        // Tails.
        let window = n.min(FILL_WINDOW.max(8 * cap as u64));
        let mut window_keys: Option<Vec<Vec<Key>>> = None;
        let mut order = Vec::with_capacity(n as usize);
        let mut steps = Vec::new();
        let mut global_batches = 0;
        for (j, mut rows) in members.into_iter().enumerate() {
            let m = rows.len() as u64;
            match s.tail {
                Tail::Pad if m % w != 0 => {
                    let need = (w - m % w) as usize;
                    if window_keys.is_none() {
                        let mut all = Vec::with_capacity(window as usize);
                        for q in 0..window {
                            let mut v = Vec::new();
                            keys(q, &mut v)?;
                            v.sort_unstable();
                            v.dedup();
                            all.push(v);
                        }
                        window_keys = Some(all);
                    }
                    let held = open_keys[j].as_mut().expect("a partial batch stays open");
                    let mut fillers = Vec::with_capacity(need);
                    for (q, v) in window_keys.iter().flatten().enumerate() {
                        if fillers.len() == need {
                            break;
                        }
                        if !v.iter().any(|k| held.contains(k)) {
                            held.extend(v.iter().copied());
                            fillers.push(q as u64);
                        }
                    }
                    if fillers.len() == need {
                        rows.extend(fillers);
                    } else {
                        rows.truncate((m / w * w) as usize);
                    }
                }
                Tail::Drop => rows.truncate((m / w * w) as usize),
                _ => {}
            }
            open_keys[j] = None;
            let len = rows.len() as u64;
            let share = |r: u64| len.saturating_sub(r).div_ceil(w);
            let kept = |r: u64| share(r) > 0 && !(s.drop_last && share(r) < s.batch);
            if (0..w).any(kept) {
                global_batches += 1;
            }
            if kept(s.rank) {
                steps.push((order.len() as u64, len));
            }
            if (0..w).any(kept) {
                order.extend(rows);
            }
        }
        Ok(NoDupPlan {
            order,
            steps,
            world: w,
            rank: s.rank,
            global_batches,
        })
    }

    /// This rank's batches in the epoch.
    pub fn len(&self) -> u64 {
        self.steps.len() as u64
    }

    /// Whether this rank has no batch.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Global positions of this rank's groups in its batch `k` (< len).
    pub fn batch(&self, k: u64) -> Vec<u64> {
        let (start, len) = self.steps[k as usize];
        (self.rank..len)
            .step_by(self.world as usize)
            .map(|i| self.order[(start + i) as usize])
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// sentence-transformers' loop, literally (quadratic): the batches as sets of positions.
    fn reference(keys: &[Vec<Key>], cap: usize) -> Vec<Vec<u64>> {
        let mut remaining: Vec<u64> = (0..keys.len() as u64).collect();
        let mut out = Vec::new();
        while !remaining.is_empty() {
            let mut held: Vec<Key> = Vec::new();
            let mut batch = Vec::new();
            for &p in &remaining {
                let ks = &keys[p as usize];
                if ks.iter().any(|k| held.contains(k)) {
                    continue;
                }
                batch.push(p);
                held.extend(ks);
                if batch.len() == cap {
                    break;
                }
            }
            remaining.retain(|p| !batch.contains(p));
            out.push(batch);
        }
        out
    }

    #[test]
    fn first_fit_is_the_sentence_transformers_loop() {
        let mut rng = crate::sample::KeyedRng::new(&[0x0d0b]);
        for case in 0..300 {
            let n = 1 + rng.below(80);
            let pool = 1 + rng.below(40) as i32;
            let queries = 1 + rng.below(30) as u128;
            let keys: Vec<Vec<Key>> = (0..n)
                .map(|_| {
                    let mut v = vec![Key::query(rng.below(queries as u64) as u128)];
                    for _ in 0..1 + rng.below(4) {
                        v.push(Key::passage(rng.below(pool as u64) as i32));
                    }
                    v.sort_unstable();
                    v.dedup();
                    v
                })
                .collect();
            let batch = 1 + rng.below(5);
            let s = NoDup {
                world: 1,
                rank: 0,
                batch,
                tail: Tail::Uneven,
                drop_last: false,
            };
            let plan = NoDupPlan::new(n, s, &mut |p, out| {
                out.extend(&keys[p as usize]);
                Ok(())
            })
            .unwrap();
            let got: Vec<Vec<u64>> = (0..plan.len()).map(|k| plan.batch(k)).collect();
            assert_eq!(got, reference(&keys, batch as usize), "case {case}");
        }
    }

    #[test]
    fn query_and_passage_keys_differ() {
        assert_ne!(Key::query(5), Key::passage(5));
        assert_ne!(Key::query(u128::MAX), Key::passage(-1));
    }
}
