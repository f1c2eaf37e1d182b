//! `rankfeed audit`: what is wrong with a dataset's rows before any batch is drawn.
//!
//! One linear pass over the groups (plus a pass over the queries that repeat), reading ids and
//! list lengths, never text. Passage identity is the dataset's dedup: two references to the
//! same formatted passage share an id, so "the same passage" below means the same id.
//!
//! Findings, each a count, the rows affected and the first `examples` of those rows:
//! - **false negatives**: a negative that is one of its own row's positives (the sampler's
//!   `exclude_false_negatives` never draws them); rows left with no true negative;
//! - **rows without negatives** (usable only with group size 1);
//! - **duplicate queries**: rows with the same query tokens and prompt; of those, rows that
//!   repeat an earlier row's positive and negative sets exactly, and queries whose rows carry
//!   different sets (conflicting);
//! - **positive elsewhere**: a (query, passage) pair where the passage is a positive of one
//!   row and a negative of another row with the same query;
//! - **score inversions**: a negative whose teacher score is >= the lowest positive score of
//!   its row (it outranks a positive);
//! - per source: rows with and without scores, non-finite scores, constant scores (every
//!   score of the source equal: a teacher that did not run), rows without negatives, and the
//!   distributions of query tokens, passage tokens (per reference), positives and negatives;
//! - **truncation** at the loader settings given (mode, `query_max_len`, `passage_max_len`,
//!   `truncation`): computed by the loader's own collator, so what is reported cut is what a
//!   batch would cut: queries (rows), unique passages and pairs cut, and the tokens lost;
//! - with `against`, the exact overlap with another dataset tokenized with the same tokenizer
//!   (train/eval contamination): queries (by their tokens) and passages shared.

use std::collections::HashMap;

use serde::Serialize;

use crate::collate::{Collator, Mode};
use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::options::Options;
use crate::stats::{Accumulator, Distribution};

/// Rows listed per finding by default.
pub const DEFAULT_EXAMPLES: usize = 5;

/// One kind of defect: how many, in how many rows, and the first rows.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Finding {
    /// How many of the thing the finding counts (its doc says what).
    pub count: u64,
    /// Rows affected.
    pub rows: u64,
    /// The first affected rows (row numbers of groups.arrow), ascending.
    pub examples: Vec<u64>,
}

impl Finding {
    fn hit(&mut self, row: u64, count: u64, limit: usize) {
        self.count += count;
        self.rows += 1;
        if self.examples.len() < limit {
            self.examples.push(row);
        }
    }
}

/// Rows that share a query.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DuplicateQueries {
    /// Distinct queries (tokens and prompt) that occur in more than one row.
    pub queries: u64,
    /// Rows holding such a query.
    pub rows: u64,
    /// Rows repeating an earlier row exactly (same query, positive set and negative set):
    /// count = rows.
    pub repeated_rows: Finding,
    /// Queries whose rows carry different positive or negative sets: count = queries, rows =
    /// their rows.
    pub conflicting: Finding,
}

/// Teacher scores of one source.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Scores {
    /// Rows with both score lists.
    pub rows_with_scores: u64,
    /// Rows missing one or both lists.
    pub rows_missing_scores: u64,
    /// Scores that are NaN or infinite (count = scores).
    pub non_finite: Finding,
    /// Whether the source has at least two scores and all are equal.
    pub constant: bool,
    /// Smallest finite score (None without scores).
    pub min: Option<f32>,
    /// Largest finite score.
    pub max: Option<f32>,
}

/// One source (input file).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SourceAudit {
    /// Source id.
    pub id: u32,
    /// Its path as converted.
    pub path: String,
    /// Rows.
    pub rows: u64,
    /// Share of the dataset's rows.
    pub share: f64,
    /// Rows without negatives (count = rows).
    pub rows_without_negatives: Finding,
    /// Teacher scores.
    pub scores: Scores,
    /// Query tokens per row.
    pub query_tokens: Distribution,
    /// Passage tokens per reference (each positive and negative of each row).
    pub passage_tokens: Distribution,
    /// Positives per row.
    pub positives: Distribution,
    /// Negatives per row.
    pub negatives: Distribution,
}

/// What truncation cuts of one kind of sequence.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Cut {
    /// Sequences that lose tokens.
    pub cut: u64,
    /// Sequences looked at.
    pub of: u64,
    /// `cut / of` (0 when there are none).
    pub share: f64,
    /// Tokens lost in total.
    pub tokens_lost: u64,
}

impl Cut {
    fn add(&mut self, lost: usize) {
        self.of += 1;
        if lost > 0 {
            self.cut += 1;
            self.tokens_lost += lost as u64;
        }
    }
    fn finish(&mut self) {
        self.share = if self.of == 0 {
            0.0
        } else {
            self.cut as f64 / self.of as f64
        };
    }
}

/// Truncation at the loader settings the audit was given.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Truncation {
    /// The mode, budgets and rule the figures are for.
    pub mode: String,
    /// Query budget.
    pub query_max_len: usize,
    /// Passage budget.
    pub passage_max_len: usize,
    /// Truncation rule.
    pub truncation: String,
    /// Rows whose query loses tokens (in any of its pairs; embedder: on its own); tokens lost
    /// counted once per row (in its worst pair).
    pub queries: Cut,
    /// Unique passages that lose tokens in any pair (embedder: on their own); tokens lost
    /// counted once per passage (worst case).
    pub passages: Cut,
    /// (query, passage) pairs, one per positive and negative of each row, that lose tokens,
    /// and the tokens they lose (pair modes; `None` in embedder mode).
    pub pairs: Option<Cut>,
}

/// Exact overlap with another dataset.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Overlap {
    /// The other dataset's directory.
    pub against: String,
    /// Distinct query token sequences found in the other dataset: count = distinct queries,
    /// rows = rows here holding one.
    pub queries: Finding,
    /// Unique passages found in the other dataset: count = passages, rows = rows here
    /// referencing one.
    pub passages: Finding,
}

/// Everything `rankfeed audit` reports (its `--json`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Audit {
    /// Rows (groups).
    pub rows: u64,
    /// Unique passages.
    pub passages: u64,
    /// Passage references (positives and negatives of every row).
    pub passage_refs: u64,
    /// Negatives that are one of their row's positives: count = negatives.
    pub false_negatives: Finding,
    /// Rows with negatives, every one of them also a positive of the row: count = rows.
    pub rows_without_true_negatives: Finding,
    /// Rows with no negatives: count = rows.
    pub rows_without_negatives: Finding,
    /// Rows sharing a query.
    pub duplicate_queries: DuplicateQueries,
    /// (query, passage) pairs with the passage a positive of one row and a negative of another
    /// row with the same query: count = pairs, rows = rows holding the negative.
    pub positive_elsewhere: Finding,
    /// Negatives scored >= the lowest positive score of their row: count = negatives.
    pub score_inversions: Finding,
    /// Truncation at the given settings.
    pub truncation: Truncation,
    /// Per source, in the manifest's order.
    pub sources: Vec<SourceAudit>,
    /// Overlap with `against`, when given.
    pub against: Option<Overlap>,
}

/// Per-source accumulators.
struct SourceAcc {
    rows: u64,
    without_neg: Finding,
    scores: Scores,
    first_score: Option<f32>,
    finite: u64,
    varied: bool,
    query: Accumulator,
    passage: Accumulator,
    pos: Accumulator,
    neg: Accumulator,
}

impl SourceAcc {
    fn new() -> Self {
        SourceAcc {
            rows: 0,
            without_neg: Finding::default(),
            scores: Scores::default(),
            first_score: None,
            finite: 0,
            varied: false,
            query: Accumulator::new(),
            passage: Accumulator::new(),
            pos: Accumulator::new(),
            neg: Accumulator::new(),
        }
    }

    /// The scores of one row (both lists): non-finite ones counted once per row.
    fn score(&mut self, row: u64, pos: &[f32], neg: &[f32], limit: usize) {
        let values = || pos.iter().chain(neg);
        let bad = values().filter(|v| !v.is_finite()).count() as u64;
        if bad > 0 {
            self.scores.non_finite.hit(row, bad, limit);
        }
        for &v in values().filter(|v| v.is_finite()) {
            self.finite += 1;
            let s = &mut self.scores;
            s.min = Some(s.min.map_or(v, |m| m.min(v)));
            s.max = Some(s.max.map_or(v, |m| m.max(v)));
            match self.first_score {
                None => self.first_score = Some(v),
                Some(f) if f != v => self.varied = true,
                Some(_) => {}
            }
        }
    }
}

/// A query's identity within a dataset: its tokens and its prompt.
pub(crate) fn query_key(query: &[i32], prompt: Option<u32>) -> u128 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(bytemuck::cast_slice(query));
    h.update(&prompt.map_or(u64::MAX, u64::from).to_le_bytes());
    h.digest128()
}

fn tokens_key(tokens: &[i32]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(bytemuck::cast_slice(tokens))
}

/// Audit `ds` at the loader settings `options` (only the mode, the budgets and the truncation
/// rule matter; the rest is ignored), listing up to `examples` rows per finding, and with
/// `against`, the overlap with that dataset. A corrupt row is an `Err` naming it.
pub fn audit(
    ds: &Dataset,
    options: &Options,
    against: Option<&Dataset>,
    examples: usize,
) -> Result<Audit> {
    let resolved = options.resolve(&ds.manifest().sources)?;
    let collator = Collator::new(ds, resolved.collate)?;
    let mode = options.mode;
    let n = ds.len();
    let n_sources = ds.manifest().sources.len().max(1);
    let mut src: Vec<SourceAcc> = (0..n_sources).map(|_| SourceAcc::new()).collect();
    let mut false_neg = Finding::default();
    let mut no_true_neg = Finding::default();
    let mut no_neg = Finding::default();
    let mut inversions = Finding::default();
    let mut tr = Truncation {
        mode: mode.to_string(),
        query_max_len: options.query_max_len,
        passage_max_len: options.passage_max_len,
        truncation: options.truncation.to_string(),
        pairs: (mode != Mode::Embedder).then(Cut::default),
        ..Truncation::default()
    };
    // Per passage: the most tokens any pair (or its single sequence) cuts; u32::MAX: unseen.
    let mut passage_lost = vec![u32::MAX; ds.num_passages()];
    let mut keys: Vec<u128> = Vec::with_capacity(n);
    let mut refs = 0u64;
    let mut pos_sorted: Vec<i32> = Vec::new();
    for row in 0..n {
        let g = ds.group(row)?;
        let r = row as u64;
        let s = &mut src[g.source as usize];
        s.rows += 1;
        s.query.add(g.query.len() as u64);
        s.pos.add(g.pos.len() as u64);
        s.neg.add(g.neg.len() as u64);
        refs += (g.pos.len() + g.neg.len()) as u64;
        keys.push(query_key(g.query, g.prompt));
        // False negatives: a negative id among the row's positive ids.
        pos_sorted.clear();
        pos_sorted.extend_from_slice(g.pos);
        pos_sorted.sort_unstable();
        let fneg = g
            .neg
            .iter()
            .filter(|id| pos_sorted.binary_search(id).is_ok())
            .count() as u64;
        if fneg > 0 {
            false_neg.hit(r, fneg, examples);
            if fneg == g.neg.len() as u64 {
                no_true_neg.hit(r, 1, examples);
            }
        }
        if g.neg.is_empty() {
            no_neg.hit(r, 1, examples);
            s.without_neg.hit(r, 1, examples);
        }
        // Scores.
        match (g.pos_scores, g.neg_scores) {
            (Some(ps), Some(ns)) => {
                s.scores.rows_with_scores += 1;
                s.score(r, ps, ns, examples);
                let lowest = ps.iter().copied().fold(f32::INFINITY, f32::min);
                let inv = ns.iter().filter(|&&v| v >= lowest).count() as u64;
                if inv > 0 {
                    inversions.hit(r, inv, examples);
                }
            }
            _ => s.scores.rows_missing_scores += 1,
        }
        // Lengths and truncation, by the loader's collator.
        let prompt = collator.prompt_of(ds, g.prompt)?;
        let mut query_lost = 0usize;
        if mode == Mode::Embedder {
            query_lost = g.query.len() - collator.single(g.query, options.query_max_len).kept().1;
        }
        for &id in g.pos.iter().chain(g.neg) {
            let p = ds.referenced_passage(id)?;
            s.passage.add(p.len() as u64);
            let (q_lost, p_lost) = if mode == Mode::Embedder {
                let kept = collator.single(p, options.passage_max_len).kept().1;
                (0, p.len() - kept)
            } else {
                let (qk, pk) = collator.pair(g.query, p, prompt).kept();
                let q_lost = g.query.len() - qk;
                let p_lost = p.len() - pk;
                if let Some(pairs) = tr.pairs.as_mut() {
                    pairs.add(q_lost + p_lost);
                }
                (q_lost, p_lost)
            };
            query_lost = query_lost.max(q_lost);
            let slot = &mut passage_lost[id as usize];
            if *slot == u32::MAX || (p_lost as u32) > *slot {
                *slot = p_lost as u32;
            }
        }
        tr.queries.add(query_lost);
    }
    for &lost in passage_lost.iter().filter(|&&l| l != u32::MAX) {
        tr.passages.add(lost as usize);
    }
    tr.queries.finish();
    tr.passages.finish();
    if let Some(p) = tr.pairs.as_mut() {
        p.finish();
    }
    let (duplicate_queries, positive_elsewhere) = duplicates(ds, &keys, examples)?;
    let against = against
        .map(|other| overlap(ds, other, examples))
        .transpose()?;
    let manifest = ds.manifest();
    let sources = src
        .into_iter()
        .enumerate()
        .map(|(i, mut a)| {
            a.scores.constant = a.finite >= 2 && !a.varied;
            SourceAudit {
                id: i as u32,
                path: manifest
                    .sources
                    .get(i)
                    .map(|s| s.path.clone())
                    .unwrap_or_default(),
                rows: a.rows,
                share: if n == 0 {
                    0.0
                } else {
                    a.rows as f64 / n as f64
                },
                rows_without_negatives: a.without_neg,
                scores: a.scores,
                query_tokens: a.query.finish(),
                passage_tokens: a.passage.finish(),
                positives: a.pos.finish(),
                negatives: a.neg.finish(),
            }
        })
        .collect();
    Ok(Audit {
        rows: n as u64,
        passages: ds.num_passages() as u64,
        passage_refs: refs,
        false_negatives: false_neg,
        rows_without_true_negatives: no_true_neg,
        rows_without_negatives: no_neg,
        duplicate_queries,
        positive_elsewhere,
        score_inversions: inversions,
        truncation: tr,
        sources,
        against,
    })
}

/// Duplicate queries and positives-elsewhere, from the query keys of every row.
fn duplicates(ds: &Dataset, keys: &[u128], examples: usize) -> Result<(DuplicateQueries, Finding)> {
    // Rows of each key that occurs more than once, in row order.
    let mut first: HashMap<u128, u32> = HashMap::with_capacity(keys.len());
    let mut groups: HashMap<u128, Vec<u32>> = HashMap::new();
    for (row, &k) in keys.iter().enumerate() {
        match first.get(&k) {
            None => {
                first.insert(k, row as u32);
            }
            Some(&f) => groups.entry(k).or_insert_with(|| vec![f]).push(row as u32),
        }
    }
    drop(first);
    let mut out = DuplicateQueries::default();
    let mut elsewhere_rows: Vec<u64> = Vec::new();
    let mut conflicting_rows: Vec<u64> = Vec::new();
    let mut repeated_rows: Vec<u64> = Vec::new();
    let mut conflicting = 0u64;
    let mut elsewhere_pairs = 0u64;
    let set = |ids: &[i32]| {
        let mut v = ids.to_vec();
        v.sort_unstable();
        v.dedup();
        v
    };
    for rows in groups.values() {
        // Exact token equality, not only the hash: split a hash group by the real query.
        let mut classes: Vec<(Vec<i32>, Option<u32>, Vec<u32>)> = Vec::new();
        for &r in rows {
            let g = ds.group_ids(r as usize)?;
            match classes
                .iter_mut()
                .find(|(q, p, _)| q.as_slice() == g.query && *p == g.prompt)
            {
                Some(c) => c.2.push(r),
                None => classes.push((g.query.to_vec(), g.prompt, vec![r])),
            }
        }
        for (_, _, rows) in classes.into_iter().filter(|c| c.2.len() > 1) {
            out.queries += 1;
            out.rows += rows.len() as u64;
            let mut sets: Vec<(Vec<i32>, Vec<i32>)> = Vec::with_capacity(rows.len());
            // The distinct (positive set, negative set) pairs seen: linear however many rows
            // share the query.
            let mut seen: std::collections::HashSet<(Vec<i32>, Vec<i32>)> =
                std::collections::HashSet::new();
            // How many rows of the query hold each passage as a positive.
            let mut pos_rows: HashMap<i32, u32> = HashMap::new();
            for &r in &rows {
                let g = ds.group_ids(r as usize)?;
                let (p, n) = (set(g.pos), set(g.neg));
                for &id in &p {
                    *pos_rows.entry(id).or_default() += 1;
                }
                if !seen.insert((p.clone(), n.clone())) {
                    repeated_rows.push(r as u64);
                }
                sets.push((p, n));
            }
            if sets.iter().any(|s| *s != sets[0]) {
                conflicting += 1;
                conflicting_rows.extend(rows.iter().map(|&r| r as u64));
            }
            let mut pairs: std::collections::HashSet<i32> = std::collections::HashSet::new();
            for (&r, (p, n)) in rows.iter().zip(&sets) {
                let mut hit = false;
                for id in n {
                    let own = p.binary_search(id).is_ok() as u32;
                    if pos_rows.get(id).copied().unwrap_or(0) > own {
                        hit = true;
                        pairs.insert(*id);
                    }
                }
                if hit {
                    elsewhere_rows.push(r as u64);
                }
            }
            elsewhere_pairs += pairs.len() as u64;
        }
    }
    let finding = |mut rows: Vec<u64>, count: u64| {
        rows.sort_unstable();
        Finding {
            count,
            rows: rows.len() as u64,
            examples: rows.into_iter().take(examples).collect(),
        }
    };
    out.repeated_rows = finding(repeated_rows.clone(), repeated_rows.len() as u64);
    out.conflicting = finding(conflicting_rows, conflicting);
    let elsewhere = finding(elsewhere_rows, elsewhere_pairs);
    Ok((out, elsewhere))
}

/// Exact overlap of `ds`'s queries and passages with `other`'s.
fn overlap(ds: &Dataset, other: &Dataset, examples: usize) -> Result<Overlap> {
    let fp = |d: &Dataset| d.tokenizer_fingerprint().map(String::from);
    if fp(ds) != fp(other) {
        return Err(Error::argument(
            "against",
            format!(
                "{} was tokenized with another tokenizer ({:?}, this dataset {:?}): their token \
                 ids cannot be compared",
                other.dir().display(),
                fp(other),
                fp(ds)
            ),
        ));
    }
    // The other's queries and passages by the hash of their tokens (tokens compared on a hit).
    let mut queries: HashMap<u128, u32> = HashMap::with_capacity(other.len());
    for row in 0..other.len() {
        let g = other.group_ids(row)?;
        queries.entry(tokens_key(g.query)).or_insert(row as u32);
    }
    let mut passages: HashMap<u128, i32> = HashMap::with_capacity(other.num_passages());
    for id in 0..other.num_passages() as i32 {
        passages.entry(tokens_key(other.passage(id)?)).or_insert(id);
    }
    let mut shared = vec![false; ds.num_passages()];
    let mut shared_count = 0u64;
    for id in 0..ds.num_passages() as i32 {
        let t = ds.passage(id)?;
        if let Some(&o) = passages.get(&tokens_key(t)) {
            if other.passage(o)? == t {
                shared[id as usize] = true;
                shared_count += 1;
            }
        }
    }
    let mut q = Finding::default();
    let mut p = Finding::default();
    let mut seen_queries: std::collections::HashSet<u128> = std::collections::HashSet::new();
    for row in 0..ds.len() {
        let g = ds.group_ids(row)?;
        let k = tokens_key(g.query);
        if let Some(&o) = queries.get(&k) {
            if other.group_ids(o as usize)?.query == g.query {
                let new = seen_queries.insert(k) as u64;
                q.hit(row as u64, new, examples);
            }
        }
        // Ids were checked by the main pass; a bad one here is still an error, not a panic.
        let mut refs_shared = false;
        for &id in g.pos.iter().chain(g.neg) {
            ds.referenced_passage(id)?;
            refs_shared |= shared[id as usize];
        }
        if refs_shared {
            p.hit(row as u64, 0, examples);
        }
    }
    p.count = shared_count;
    Ok(Overlap {
        against: other.dir().display().to_string(),
        queries: q,
        passages: p,
    })
}

impl Audit {
    /// The report as `rankfeed audit` prints it: one line per finding with its example rows,
    /// then per-source lines.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let mut o = String::new();
        let ex = |f: &Finding| {
            if f.examples.is_empty() {
                String::new()
            } else {
                let rows: Vec<String> = f.examples.iter().map(|r| r.to_string()).collect();
                format!(
                    " (rows {}{})",
                    rows.join(", "),
                    if f.rows as usize > f.examples.len() {
                        ", ..."
                    } else {
                        ""
                    }
                )
            }
        };
        let _ = writeln!(
            o,
            "{} rows, {} unique passages, {} passage references",
            self.rows, self.passages, self.passage_refs
        );
        let line = |o: &mut String, what: &str, f: &Finding, unit: &str| {
            let _ = writeln!(
                o,
                "  {what}: {} {unit} in {} rows{}",
                f.count,
                f.rows,
                ex(f)
            );
        };
        line(
            &mut o,
            "false negatives (a negative that is the row's own positive)",
            &self.false_negatives,
            "negatives",
        );
        line(
            &mut o,
            "rows whose every negative is a positive",
            &self.rows_without_true_negatives,
            "rows",
        );
        line(
            &mut o,
            "rows without negatives",
            &self.rows_without_negatives,
            "rows",
        );
        let d = &self.duplicate_queries;
        let _ = writeln!(
            o,
            "  duplicate queries: {} queries in {} rows",
            d.queries, d.rows
        );
        line(
            &mut o,
            "  rows repeating an earlier row exactly",
            &d.repeated_rows,
            "rows",
        );
        line(
            &mut o,
            "  queries with conflicting positives/negatives",
            &d.conflicting,
            "queries",
        );
        line(
            &mut o,
            "passages positive in one row, negative in another with the same query",
            &self.positive_elsewhere,
            "pairs",
        );
        line(
            &mut o,
            "negatives scored >= a positive of their row",
            &self.score_inversions,
            "negatives",
        );
        let t = &self.truncation;
        let cut = |c: &Cut| {
            format!(
                "{} of {} ({:.1}%), {} tokens lost",
                c.cut,
                c.of,
                100.0 * c.share,
                c.tokens_lost
            )
        };
        let _ = writeln!(
            o,
            "  truncation ({} mode, query_max_len {}, passage_max_len {}, {}):",
            t.mode, t.query_max_len, t.passage_max_len, t.truncation
        );
        let _ = writeln!(o, "    queries cut: {}", cut(&t.queries));
        let _ = writeln!(o, "    unique passages cut: {}", cut(&t.passages));
        if let Some(p) = &t.pairs {
            let _ = writeln!(o, "    pairs cut: {}", cut(p));
        }
        for s in &self.sources {
            let sc = &s.scores;
            let scores = if sc.rows_with_scores == 0 {
                "no scores".to_string()
            } else {
                format!(
                    "scores in {} rows ({} without), range {:?}..{:?}{}{}",
                    sc.rows_with_scores,
                    sc.rows_missing_scores,
                    sc.min.unwrap_or(f32::NAN),
                    sc.max.unwrap_or(f32::NAN),
                    if sc.constant { ", CONSTANT" } else { "" },
                    if sc.non_finite.count > 0 {
                        format!(", {} non-finite{}", sc.non_finite.count, ex(&sc.non_finite))
                    } else {
                        String::new()
                    }
                )
            };
            let _ = writeln!(
                o,
                "  source {} {}: {} rows ({:.1}%), {} without negatives, {}; query tokens p50 {} p99 {} max {}, passage tokens p50 {} p99 {} max {}",
                s.id,
                s.path,
                s.rows,
                100.0 * s.share,
                s.rows_without_negatives.rows,
                scores,
                s.query_tokens.p50,
                s.query_tokens.p99,
                s.query_tokens.max,
                s.passage_tokens.p50,
                s.passage_tokens.p99,
                s.passage_tokens.max
            );
        }
        if let Some(a) = &self.against {
            let _ = writeln!(o, "  against {}:", a.against);
            line(&mut o, "  queries also there", &a.queries, "queries");
            line(&mut o, "  passages also there", &a.passages, "passages");
        }
        o
    }
}
