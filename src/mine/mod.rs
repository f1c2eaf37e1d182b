//! `rankfeed mine`: hard negatives for every row, from the dataset's own deduplicated passages,
//! written as a new dataset (the input is never modified).
//!
//! **Retrieval.** BM25 over token ids ([`Bm25Index`]): an inverted index over the unique
//! passages, each posting holding its precomputed weight, Lucene's variant (as `bm25s`'s default
//! `method="lucene"`): `idf(t) = ln(1 + (N - df + 0.5) / (df + 0.5))`, a term's weight in a
//! passage `idf * tf / (tf + k1 * (1 - b + b * len / avg_len))`, a query's score the sum over its
//! tokens (a repeated token counts each time). Or **dense**: exact inner products of query and
//! passage embeddings the caller supplies. Either way a query's ranking is by score, then by
//! passage id (ties are broken the same way on every run and thread count).
//!
//! **Selection**, as sentence-transformers' `mine_hard_negatives` and FlagEmbedding's
//! `hn_mine.py` do it, with their traps closed:
//! - the positives of the row's query (its own, and those of every other row with the same
//!   query tokens and prompt; the same passage is one id) are removed from the ranking first,
//!   so they never become negatives and never shift the window;
//! - the window is ranks `range_min..range_max` of what is left (0 is the best);
//! - candidates outside `[min_score, max_score]` are dropped, and, with margins, those scored
//!   above `pos - margin` (absolute) or `pos - |pos| * relative_margin` (relative, NV-Retriever's
//!   TopK-PercPos: `pos * (1 - relative_margin)` for positive scores), `pos` being the lowest
//!   score of the row's positives;
//! - `num_negatives` are taken from the candidates left: the best ranked (`top`), or a seeded
//!   sample keyed by (seed, row) (`random`), kept in rank order;
//! - a row with fewer candidates keeps the ones it has: nothing tops it up from outside the
//!   window (FlagEmbedding's random top-up from the whole corpus can pick a positive); the
//!   report counts such rows.
//!
//! **Output.** The rows in order with their mined negatives, their query, positives, prompt and
//! source unchanged; teacher scores are dropped (they scored the old negatives). Passages are
//! interned in first-reference order, as a conversion does, so `--shard K/N` outputs (rows
//! `K*n/N..(K+1)*n/N`) merge into the whole run's files byte for byte. The manifest records the
//! mining settings (`provenance`). The input is verified in full first.

mod corpus;
mod embeddings;

pub use corpus::{check_corpus_tokenizer, is_dataset, names_dataset, Corpus, Passages};
pub use embeddings::read_embeddings;

use serde::{Deserialize, Serialize};

use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::format::{self, ShardRange, SourceStats};
use crate::sample::KeyedRng;
use crate::writer::{DatasetWriter, ManifestInfo, WriterOptions};

/// BM25 parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Bm25Params {
    /// Term frequency saturation.
    pub k1: f32,
    /// Length normalisation.
    pub b: f32,
}

impl Default for Bm25Params {
    fn default() -> Self {
        Bm25Params { k1: 1.5, b: 0.75 }
    }
}

/// An inverted index over token ids: for each term, the passages holding it and the term's
/// BM25 weight in each.
#[derive(Debug, Clone)]
pub struct Bm25Index {
    params: Bm25Params,
    n_docs: usize,
    avg_len: f32,
    /// Per term: ln(1 + (N - df + 0.5) / (df + 0.5)).
    idf: Vec<f32>,
    /// Postings of term t: `offsets[t]..offsets[t + 1]` of `docs` / `weights`.
    offsets: Vec<u64>,
    docs: Vec<u32>,
    weights: Vec<f32>,
}

/// Sorted (term, tf) runs of a token list.
fn term_counts(tokens: &[i32], scratch: &mut Vec<i32>, out: &mut Vec<(u32, u32)>) {
    scratch.clear();
    scratch.extend_from_slice(tokens);
    scratch.sort_unstable();
    out.clear();
    for &t in scratch.iter() {
        match out.last_mut() {
            Some((last, n)) if *last == t as u32 => *n += 1,
            _ => out.push((t as u32, 1)),
        }
    }
}

impl Bm25Index {
    /// The index of `passages` (token ids, each >= 0).
    pub fn build<'a>(
        passages: impl Fn(usize) -> Result<&'a [i32]>,
        n_docs: usize,
        params: Bm25Params,
    ) -> Result<Bm25Index> {
        let (mut scratch, mut counts) = (Vec::new(), Vec::new());
        let mut df: Vec<u64> = Vec::new();
        let mut total_len = 0u64;
        for d in 0..n_docs {
            let p = passages(d)?;
            if let Some(&bad) = p
                .iter()
                .find(|&&t| t < 0 || t as usize >= crate::limits::MINE_VOCAB)
            {
                return Err(Error::argument(
                    "passages",
                    format!(
                        "passage {d} holds token id {bad}: BM25 indexes ids 0..{}",
                        crate::limits::MINE_VOCAB
                    ),
                ));
            }
            total_len += p.len() as u64;
            term_counts(p, &mut scratch, &mut counts);
            for &(t, _) in &counts {
                if t as usize >= df.len() {
                    df.resize(t as usize + 1, 0);
                }
                df[t as usize] += 1;
            }
        }
        // (1 when every passage is empty: no weight is computed then, but no NaN either.)
        let avg_len = if total_len == 0 {
            1.0
        } else {
            (total_len as f64 / n_docs as f64) as f32
        };
        let n = n_docs as f64;
        let idf: Vec<f32> = df
            .iter()
            .map(|&d| (1.0 + (n - d as f64 + 0.5) / (d as f64 + 0.5)).ln() as f32)
            .collect();
        let mut offsets = Vec::with_capacity(df.len() + 1);
        offsets.push(0u64);
        for &d in &df {
            offsets.push(offsets.last().unwrap() + d);
        }
        let total = *offsets.last().unwrap() as usize;
        let (mut docs, mut weights) = (vec![0u32; total], vec![0f32; total]);
        let mut fill: Vec<u64> = offsets[..df.len()].to_vec();
        for d in 0..n_docs {
            let p = passages(d)?;
            term_counts(p, &mut scratch, &mut counts);
            let norm = params.k1 * (1.0 - params.b + params.b * p.len() as f32 / avg_len);
            for &(t, tf) in &counts {
                let i = fill[t as usize] as usize;
                fill[t as usize] += 1;
                docs[i] = d as u32;
                weights[i] = idf[t as usize] * tf as f32 / (tf as f32 + norm);
            }
        }
        Ok(Bm25Index {
            params,
            n_docs,
            avg_len,
            idf,
            offsets,
            docs,
            weights,
        })
    }

    /// Number of passages indexed.
    pub fn len(&self) -> usize {
        self.n_docs
    }

    /// Whether nothing is indexed.
    pub fn is_empty(&self) -> bool {
        self.n_docs == 0
    }

    /// Bytes the index holds.
    pub fn nbytes(&self) -> usize {
        self.idf.len() * 4 + self.offsets.len() * 8 + self.docs.len() * 8
    }

    /// The BM25 score of `query` for a passage of tokens `doc` (indexed or not), by the index's
    /// statistics.
    pub fn score(&self, query: &[i32], doc: &[i32]) -> f32 {
        let norm = self.params.k1
            * (1.0 - self.params.b + self.params.b * doc.len() as f32 / self.avg_len);
        let mut s = 0f32;
        for &q in query {
            let Some(&idf) = usize::try_from(q).ok().and_then(|q| self.idf.get(q)) else {
                continue;
            };
            let tf = doc.iter().filter(|&&t| t == q).count() as f32;
            if tf > 0.0 {
                s += idf * tf / (tf + norm);
            }
        }
        s
    }

    /// The `k` best passages for `query`: (passage, score), best first, ties by passage id.
    /// Passages sharing no token with the query score 0 and are not returned.
    pub fn search(&self, query: &[i32], k: usize, scratch: &mut SearchScratch) -> Vec<(u32, f32)> {
        scratch.scores.resize(self.n_docs, 0.0);
        scratch.touched.clear();
        for &q in query {
            let Some(t) = usize::try_from(q).ok().filter(|&t| t < self.idf.len()) else {
                continue;
            };
            let (a, b) = (self.offsets[t] as usize, self.offsets[t + 1] as usize);
            for (&d, &w) in self.docs[a..b].iter().zip(&self.weights[a..b]) {
                let s = &mut scratch.scores[d as usize];
                if *s == 0.0 {
                    scratch.touched.push(d);
                }
                *s += w;
            }
        }
        let mut hits: Vec<(u32, f32)> = scratch
            .touched
            .iter()
            .map(|&d| (d, scratch.scores[d as usize]))
            .filter(|&(_, s)| s > 0.0)
            .collect();
        for &d in &scratch.touched {
            scratch.scores[d as usize] = 0.0;
        }
        top_k(&mut hits, k);
        hits
    }
}

/// The header line of a BM25 index file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct IndexHeader {
    format: String,
    version: u32,
    /// What was indexed ([`corpus::Resolved::digest`]).
    corpus: String,
    params: Bm25Params,
    n_docs: u64,
    avg_len: f32,
    terms: u64,
    postings: u64,
    /// xxh3-64 of the payload.
    payload_xxh3_64: String,
}

const INDEX_FORMAT: &str = "rankfeed-bm25";

/// The checksum of an index file starts with every header field it is read by (the payload
/// follows): an edited `avg_len` or count is damage like a flipped payload byte.
fn header_hash(
    corpus: &str,
    params: Bm25Params,
    n_docs: u64,
    avg_len: f32,
    t: u64,
    p: u64,
) -> xxhash_rust::xxh3::Xxh3 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(corpus.as_bytes());
    h.update(&[0]);
    for v in [params.k1, params.b, avg_len] {
        h.update(&v.to_le_bytes());
    }
    for v in [n_docs, t, p] {
        h.update(&v.to_le_bytes());
    }
    h
}
const INDEX_VERSION: u32 = 1;

// The index file holds the arrays as they are in memory: little-endian.
#[cfg(not(target_endian = "little"))]
compile_error!("the BM25 index file is little-endian: a big-endian build needs byte swapping");

impl Bm25Index {
    /// Save to `path` (atomically: a temporary file beside it, renamed), with `corpus` (what
    /// was indexed) in its header: a JSON line, then idf (f32 x terms), offsets (u64 x
    /// terms + 1), passages (u32 x postings), weights (f32 x postings), little-endian, the
    /// payload checksummed.
    pub fn save(&self, path: &std::path::Path, corpus: &str) -> Result<()> {
        use std::io::Write;
        // Little-endian, as [`Bm25Index::load`] reads it (the arrays as they are in memory).
        let parts: [&[u8]; 4] = [
            bytemuck::cast_slice(&self.idf),
            bytemuck::cast_slice(&self.offsets),
            bytemuck::cast_slice(&self.docs),
            bytemuck::cast_slice(&self.weights),
        ];
        let mut hash = header_hash(
            corpus,
            self.params,
            self.n_docs as u64,
            self.avg_len,
            self.idf.len() as u64,
            self.docs.len() as u64,
        );
        for part in parts {
            hash.update(part);
        }
        let header = IndexHeader {
            format: INDEX_FORMAT.into(),
            version: INDEX_VERSION,
            corpus: corpus.into(),
            params: self.params,
            n_docs: self.n_docs as u64,
            avg_len: self.avg_len,
            terms: self.idf.len() as u64,
            postings: self.docs.len() as u64,
            payload_xxh3_64: format!("{:016x}", hash.digest()),
        };
        let name = path
            .file_name()
            .ok_or_else(|| {
                Error::argument("index", format!("{}: not a file path", path.display()))
            })?
            .to_string_lossy();
        // (Unique per process and call: threads of one process may save the same index.)
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = path.with_file_name(format!(".{name}.tmp-{}-{seq}", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(serde_json::to_string(&header).expect("plain").as_bytes())?;
            f.write_all(b"\n")?;
            for part in parts {
                f.write_all(part)?;
            }
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::io(path, e)
        })
    }

    /// The index saved at `path` if it indexes `corpus` under `params` (`n_docs` passages);
    /// `None` when no file is there. A file of another corpus or other parameters, or one
    /// damaged, is an error (remove it to rebuild): never a silent rebuild over a file the
    /// user named, never a wrong index.
    pub fn load(
        path: &std::path::Path,
        corpus: &str,
        params: Bm25Params,
        n_docs: usize,
    ) -> Result<Option<Bm25Index>> {
        use std::io::{BufRead, Read};
        match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(path, e)),
            Ok(m) if !m.is_file() => {
                return Err(Error::input(
                    path,
                    "the BM25 index path is not a regular file",
                ))
            }
            Ok(_) => {}
        }
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let size = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let bad = |m: String| Error::input(path, format!("{m} (remove the file to rebuild it)"));
        let mut r = std::io::BufReader::new(file);
        let mut line = Vec::new();
        r.by_ref()
            .take(1 << 16)
            .read_until(b'\n', &mut line)
            .map_err(|e| Error::io(path, e))?;
        if line.pop() != Some(b'\n') {
            return Err(bad("not a rankfeed BM25 index".into()));
        }
        let h: IndexHeader = serde_json::from_slice(&line)
            .map_err(|e| bad(format!("not a rankfeed BM25 index: {e}")))?;
        if h.format != INDEX_FORMAT || h.version != INDEX_VERSION {
            return Err(bad(format!("format {} version {}", h.format, h.version)));
        }
        if h.corpus != corpus || h.n_docs != n_docs as u64 {
            return Err(bad(format!(
                "an index of another corpus ({}, {} passages), not of this one ({corpus}, \
                 {n_docs} passages)",
                h.corpus, h.n_docs
            )));
        }
        if h.params != params {
            return Err(bad(format!(
                "an index built with k1 {} b {}, not k1 {} b {}",
                h.params.k1, h.params.b, params.k1, params.b
            )));
        }
        let (t, p) = (h.terms, h.postings);
        let want = t
            .checked_mul(4)
            .and_then(|a| a.checked_add((t.checked_add(1)?).checked_mul(8)?))
            .and_then(|a| a.checked_add(p.checked_mul(8)?));
        let payload = size - line.len() as u64 - 1;
        if want != Some(payload) {
            return Err(bad(format!(
                "{payload} payload bytes for {t} terms and {p} postings: truncated or damaged"
            )));
        }
        if !(h.avg_len.is_finite() && h.avg_len > 0.0) {
            return Err(bad(format!(
                "average passage length {}: damaged",
                h.avg_len
            )));
        }
        // Read straight into the arrays (little-endian, as saved), hashing as they come.
        let mut hash = header_hash(corpus, params, h.n_docs, h.avg_len, h.terms, h.postings);
        let mut fill = |bytes: &mut [u8]| -> Result<()> {
            r.read_exact(bytes).map_err(|e| Error::io(path, e))?;
            hash.update(bytes);
            Ok(())
        };
        let (t, p) = (t as usize, p as usize);
        let mut idf = vec![0f32; t];
        let mut offsets = vec![0u64; t + 1];
        let mut docs = vec![0u32; p];
        let mut weights = vec![0f32; p];
        fill(bytemuck::cast_slice_mut(&mut idf))?;
        fill(bytemuck::cast_slice_mut(&mut offsets))?;
        fill(bytemuck::cast_slice_mut(&mut docs))?;
        fill(bytemuck::cast_slice_mut(&mut weights))?;
        if format!("{:016x}", hash.digest()) != h.payload_xxh3_64 {
            return Err(bad(
                "the payload does not match its checksum: damaged".into()
            ));
        }
        // (A checksum proves the bytes are the ones saved; the structure is checked anyway.)
        if offsets.first() != Some(&0)
            || offsets.last() != Some(&(p as u64))
            || offsets.windows(2).any(|w| w[0] > w[1])
            || docs.iter().any(|&d| d as usize >= n_docs)
            || !idf.iter().chain(&weights).all(|v| v.is_finite())
        {
            return Err(bad("inconsistent postings".into()));
        }
        Ok(Some(Bm25Index {
            params,
            n_docs,
            avg_len: h.avg_len,
            idf,
            offsets,
            docs,
            weights,
        }))
    }
}

/// The ranking order of hits (passage, score): score descending, then passage id ascending.
fn rank_order(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    // `+ 0.0` makes -0.0 equal to 0.0 (an inner product can give either).
    (b.1 + 0.0).total_cmp(&(a.1 + 0.0)).then(a.0.cmp(&b.0))
}

/// Keep the `k` best of `hits` (score descending, then id ascending), sorted.
fn top_k(hits: &mut Vec<(u32, f32)>, k: usize) {
    let order = rank_order;
    if hits.len() > k && k > 0 {
        hits.select_nth_unstable_by(k - 1, order);
        hits.truncate(k);
    } else if k == 0 {
        hits.clear();
    }
    hits.sort_unstable_by(order);
}

/// Scratch space of [`Bm25Index::search`] (one per thread).
#[derive(Debug, Default)]
pub struct SearchScratch {
    scores: Vec<f32>,
    touched: Vec<u32>,
}

/// Row-major f32 embeddings: `rows x dim`.
#[derive(Debug, Clone, PartialEq)]
pub struct Embeddings {
    /// The values, row after row.
    pub values: Vec<f32>,
    /// Values per row.
    pub dim: usize,
}

impl Embeddings {
    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.values.len().checked_div(self.dim).unwrap_or(0)
    }

    fn row(&self, i: usize) -> &[f32] {
        &self.values[i * self.dim..(i + 1) * self.dim]
    }
}

/// How candidates are ranked.
#[derive(Debug, Clone)]
pub enum Retriever {
    /// BM25 over the token ids (`k1` and `b` from the [`MineOptions`]); with `index`, the
    /// index is kept in that file: loaded when it holds this corpus' index under these
    /// parameters, else built and saved there ([`Bm25Index::save`]).
    Bm25 {
        /// The index file.
        index: Option<std::path::PathBuf>,
    },
    /// Inner products of `queries` (one row per dataset row) and `passages` (one row per
    /// passage id).
    Dense {
        /// Query embeddings.
        queries: Embeddings,
        /// Passage embeddings.
        passages: Embeddings,
    },
}

/// How negatives are taken from the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Sampling {
    /// A seeded sample keyed by (seed, row), kept in rank order (FlagEmbedding's rule).
    #[default]
    Random,
    /// The best ranked.
    Top,
}

crate::options::named!(Sampling, "sampling");

/// Mining settings (recorded in the output's manifest).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
#[serde(default, deny_unknown_fields)]
pub struct MineOptions {
    /// Negatives per row.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = MineOptions::DEFAULT.num_negatives))]
    pub num_negatives: usize,
    /// First rank of the window (0: the best non-positive).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = MineOptions::DEFAULT.range_min))]
    pub range_min: usize,
    /// One past the last rank of the window.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = MineOptions::DEFAULT.range_max))]
    pub range_max: usize,
    /// Drop candidates scored below this.
    #[cfg_attr(feature = "cli", arg(long))]
    pub min_score: Option<f32>,
    /// Drop candidates scored above this.
    #[cfg_attr(feature = "cli", arg(long))]
    pub max_score: Option<f32>,
    /// Drop candidates scored above (lowest positive score - margin), margin >= 0.
    #[cfg_attr(feature = "cli", arg(long))]
    pub margin: Option<f32>,
    /// Drop candidates scored above (lowest positive score - |lowest positive score| x
    /// relative_margin): x (1 - relative_margin) for positive scores, in [0, 1).
    #[cfg_attr(feature = "cli", arg(long))]
    pub relative_margin: Option<f32>,
    /// "random" (a seeded sample of the window, in rank order) or "top" (the best ranked).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = MineOptions::DEFAULT.sampling))]
    pub sampling: Sampling,
    /// Seed of the random sampling.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = MineOptions::DEFAULT.seed))]
    pub seed: u64,
    /// BM25 k1.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = MineOptions::DEFAULT.k1))]
    pub k1: f32,
    /// BM25 b.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = MineOptions::DEFAULT.b))]
    pub b: f32,
}

impl Default for MineOptions {
    fn default() -> Self {
        MineOptions::DEFAULT
    }
}

impl MineOptions {
    /// The default of every setting (FlagEmbedding's `hn_mine.py`: 15 negatives sampled from
    /// ranks 10..210; `bm25s`'s k1 and b).
    pub const DEFAULT: MineOptions = MineOptions {
        num_negatives: 15,
        range_min: 10,
        range_max: 210,
        min_score: None,
        max_score: None,
        margin: None,
        relative_margin: None,
        sampling: Sampling::Random,
        seed: 42,
        k1: 1.5,
        b: 0.75,
    };

    /// The BM25 parameters of these settings.
    pub fn bm25(&self) -> Bm25Params {
        Bm25Params {
            k1: self.k1,
            b: self.b,
        }
    }

    fn check(&self) -> Result<()> {
        if self.num_negatives == 0 {
            return Err(Error::argument("num_negatives", "must be at least 1"));
        }
        if self.range_min >= self.range_max {
            return Err(Error::argument(
                "range_min",
                format!(
                    "the window {}..{} is empty (range_min must be below range_max)",
                    self.range_min, self.range_max
                ),
            ));
        }
        if self.range_max > crate::limits::MINE_RANGE {
            return Err(Error::argument(
                "range_max",
                format!("{} is beyond {}", self.range_max, crate::limits::MINE_RANGE),
            ));
        }
        for (name, v) in [
            ("min_score", self.min_score),
            ("max_score", self.max_score),
            ("margin", self.margin),
            ("relative_margin", self.relative_margin),
            ("k1", Some(self.k1)),
            ("b", Some(self.b)),
        ] {
            if v.is_some_and(|v| !v.is_finite()) {
                return Err(Error::argument(name, "must be finite"));
            }
        }
        if !(0.0..=1.0).contains(&self.b) {
            return Err(Error::argument("b", "BM25 needs 0 <= b <= 1"));
        }
        if !(0.0..=1000.0).contains(&self.k1) {
            return Err(Error::argument("k1", "BM25 needs 0 <= k1 <= 1000"));
        }
        if self.margin.is_some_and(|m| m < 0.0) {
            return Err(Error::argument("margin", "must be >= 0"));
        }
        if self
            .relative_margin
            .is_some_and(|m| !(0.0..1.0).contains(&m))
        {
            return Err(Error::argument("relative_margin", "must be in [0, 1)"));
        }
        Ok(())
    }
}

/// What a mining run did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct MineReport {
    /// Rows mined (of this shard).
    pub rows: u64,
    /// Negatives written.
    pub negatives: u64,
    /// Rows that got fewer than `num_negatives` (the window had too few candidates).
    pub rows_short: u64,
    /// Rows that got none.
    pub rows_without_negatives: u64,
    /// Candidates removed for being a positive of the row's query (counted among those ranked
    /// above the window's end).
    pub positives_removed: u64,
    /// Seconds building the index (BM25).
    pub index_seconds: f64,
    /// Seconds ranking and selecting.
    pub search_seconds: f64,
    /// Bytes of the index (BM25).
    pub index_bytes: u64,
    /// The index was loaded from its file (not built).
    pub index_loaded: bool,
}

/// The rows `shard` = (k, n) holds of `rows`: `k*rows/n .. (k+1)*rows/n`.
pub fn shard_rows(rows: usize, shard: Option<(u64, u64)>) -> std::ops::Range<usize> {
    match shard {
        None => 0..rows,
        Some((k, n)) => {
            let at = |i: u64| (rows as u128 * i as u128 / n as u128) as usize;
            at(k)..at(k + 1)
        }
    }
}

/// The negatives mined for each row of `rows` of `ds` from `corpus` (corpus passage ids; for
/// [`Corpus::Own`], passage ids of `ds`).
pub fn mine_negatives(
    ds: &Dataset,
    corpus: Corpus<'_>,
    retriever: &Retriever,
    options: &MineOptions,
    rows: std::ops::Range<usize>,
    report: &mut MineReport,
) -> Result<Vec<Vec<i32>>> {
    let corpus = corpus::Resolved::new(ds, corpus)?;
    mine_resolved(ds, &corpus, retriever, options, rows, report)
}

fn mine_resolved(
    ds: &Dataset,
    corpus: &corpus::Resolved<'_>,
    retriever: &Retriever,
    options: &MineOptions,
    rows: std::ops::Range<usize>,
    report: &mut MineReport,
) -> Result<Vec<Vec<i32>>> {
    use rayon::prelude::*;
    options.check()?;
    let t = std::time::Instant::now();
    let index = match retriever {
        Retriever::Bm25 { index } => {
            let build = || {
                Bm25Index::build(
                    |k| corpus.get(corpus.ranked(k) as usize),
                    corpus.ranked_len(),
                    options.bm25(),
                )
            };
            Some(match index {
                None => build()?,
                Some(path) => {
                    let key = corpus.digest();
                    match Bm25Index::load(path, &key, options.bm25(), corpus.ranked_len())? {
                        Some(i) => {
                            report.index_loaded = true;
                            i
                        }
                        None => {
                            let i = build()?;
                            i.save(path, &key)?;
                            i
                        }
                    }
                }
            })
        }
        Retriever::Dense { queries, passages } => {
            if passages.rows() != corpus.n || queries.rows() != ds.len() {
                return Err(Error::argument(
                    "embeddings",
                    format!(
                        "{} query and {} passage embeddings for a dataset of {} rows and a \
                         corpus of {} passages (one per row, one per corpus passage id, in order)",
                        queries.rows(),
                        passages.rows(),
                        ds.len(),
                        corpus.n
                    ),
                ));
            }
            if queries.dim != passages.dim || queries.dim == 0 {
                return Err(Error::argument(
                    "embeddings",
                    format!(
                        "query embeddings have {} dimensions, passage embeddings {}",
                        queries.dim, passages.dim
                    ),
                ));
            }
            if let Some(i) = queries
                .values
                .iter()
                .chain(&passages.values)
                .position(|v| !v.is_finite())
            {
                return Err(Error::argument(
                    "embeddings",
                    format!("value {i} (counting query values first) is not finite"),
                ));
            }
            None
        }
    };
    // The positives of each query that several rows share: none of them is a negative of any
    // of those rows.
    let shared = shared_positives(ds)?;
    report.index_seconds = t.elapsed().as_secs_f64();
    report.index_bytes = index.as_ref().map_or(0, |i| i.nbytes() as u64);
    let t = std::time::Instant::now();
    let margins = options.margin.is_some() || options.relative_margin.is_some();
    // Rows in fixed blocks (dense: one matrix product per block and passage chunk). A row's
    // result depends on the row alone, never on its block: any split (threads, shards) agrees.
    let blocks: Vec<std::ops::Range<usize>> = rows
        .clone()
        .step_by(DENSE_BLOCK)
        .map(|s| s..(s + DENSE_BLOCK).min(rows.end))
        .collect();
    let per_block: Vec<Result<Vec<Mined>>> = blocks
        .into_par_iter()
        .map_init(
            || (SearchScratch::default(), Vec::new(), Vec::new()),
            |(scratch, tile, gathered), block| {
                let mut positives = Vec::with_capacity(block.len());
                for row in block.clone() {
                    let g = ds.group_ids(row)?;
                    let mut pos: Vec<i32> = g.pos.to_vec();
                    if let Some(all) = shared.get(&crate::audit::query_key(g.query, g.prompt)) {
                        pos.extend_from_slice(all);
                    }
                    pos.sort_unstable();
                    pos.dedup();
                    positives.push((g, pos));
                }
                let wants: Vec<usize> = positives
                    .iter()
                    .map(|(_, pos)| options.range_max + pos.len())
                    .collect();
                let mut dense = match (&index, retriever) {
                    (None, Retriever::Dense { queries, passages }) => Some(dense_top(
                        queries,
                        passages,
                        corpus,
                        block.clone(),
                        &wants,
                        (tile, gathered),
                    )?),
                    _ => None,
                };
                let mut out = Vec::with_capacity(block.len());
                for (k, (row, (g, pos))) in block.clone().zip(positives).enumerate() {
                    let (ranked, pos_score) = match (&index, retriever) {
                        (Some(index), _) => {
                            let ranked: Vec<(u32, f32)> = index
                                .search(g.query, wants[k], scratch)
                                .into_iter()
                                .map(|(k, s)| (corpus.ranked(k as usize), s))
                                .collect();
                            let mut lowest = f32::INFINITY;
                            for &p in g.pos {
                                lowest =
                                    lowest.min(index.score(g.query, ds.referenced_passage(p)?));
                            }
                            (ranked, lowest)
                        }
                        (None, Retriever::Dense { queries, passages }) => {
                            let q = queries.row(row);
                            let mut lowest = f32::INFINITY;
                            for &p in g.pos {
                                ds.referenced_passage(p)?;
                                match corpus.in_corpus(p) {
                                    Some(c) => {
                                        lowest = lowest.min(dot(q, passages.row(c as usize)))
                                    }
                                    None if margins => {
                                        return Err(Error::argument(
                                            "margin",
                                            format!(
                                                "row {row}'s positive (passage {p}) is not in the \
                                                 corpus: dense margins need its embedding (mine \
                                                 from a corpus holding the positives, or drop the \
                                                 margins)"
                                            ),
                                        ))
                                    }
                                    None => {}
                                }
                            }
                            let ranked = std::mem::take(&mut dense.as_mut().expect("dense")[k]);
                            (ranked, lowest)
                        }
                        (None, Retriever::Bm25 { .. }) => {
                            unreachable!("the BM25 index is built above")
                        }
                    };
                    let mut removed = 0u64;
                    let candidates: Vec<(i32, f32)> = ranked
                        .into_iter()
                        .map(|(d, s)| (d as i32, s))
                        .filter(|&(d, _)| {
                            let p = corpus
                                .in_dataset(d as u32)
                                .is_some_and(|id| pos.binary_search(&id).is_ok());
                            removed += p as u64;
                            !p
                        })
                        .skip(options.range_min)
                        .take(options.range_max - options.range_min)
                        .filter(|&(_, s)| {
                            options.min_score.is_none_or(|m| s >= m)
                                && options.max_score.is_none_or(|m| s <= m)
                                && options.margin.is_none_or(|m| s <= pos_score - m)
                                && options
                                    .relative_margin
                                    .is_none_or(|m| s <= pos_score - pos_score.abs() * m)
                        })
                        .collect();
                    out.push((choose(&candidates, options, row as u64), removed));
                }
                Ok(out)
            },
        )
        .collect();
    let mut per_row = Vec::with_capacity(rows.len());
    for b in per_block {
        per_row.extend(b?.into_iter().map(Ok::<_, Error>));
    }
    report.search_seconds = t.elapsed().as_secs_f64();
    let mut out = Vec::with_capacity(per_row.len());
    for r in per_row {
        let (neg, removed) = r?;
        report.rows += 1;
        report.negatives += neg.len() as u64;
        report.positives_removed += removed;
        if neg.len() < options.num_negatives {
            report.rows_short += 1;
        }
        if neg.is_empty() {
            report.rows_without_negatives += 1;
        }
        out.push(neg);
    }
    Ok(out)
}

/// For each query (tokens and prompt) held by more than one row: the union of those rows'
/// positives.
fn shared_positives(ds: &Dataset) -> Result<std::collections::HashMap<u128, Vec<i32>>> {
    use std::collections::HashMap;
    let mut first: HashMap<u128, u32> = HashMap::with_capacity(ds.len());
    let mut shared: HashMap<u128, Vec<i32>> = HashMap::new();
    for row in 0..ds.len() {
        let g = ds.group_ids(row)?;
        let k = crate::audit::query_key(g.query, g.prompt);
        match first.get(&k) {
            None => {
                first.insert(k, row as u32);
            }
            Some(&f) => {
                let all = shared.entry(k).or_insert_with(|| {
                    ds.group_ids(f as usize)
                        .map(|g| g.pos.to_vec())
                        .unwrap_or_default()
                });
                all.extend_from_slice(g.pos);
            }
        }
    }
    for v in shared.values_mut() {
        v.sort_unstable();
        v.dedup();
    }
    Ok(shared)
}

/// `num_negatives` of the ranked candidates, by the sampling rule, in rank order.
fn choose(candidates: &[(i32, f32)], options: &MineOptions, row: u64) -> Vec<i32> {
    let k = options.num_negatives;
    if candidates.len() <= k || options.sampling == Sampling::Top {
        return candidates.iter().take(k).map(|c| c.0).collect();
    }
    let mut rng = KeyedRng::new(&[options.seed, row, 0x6d696e65]);
    let mut idx: Vec<usize> = (0..candidates.len()).collect();
    for i in 0..k {
        let j = i + rng.below((idx.len() - i) as u64) as usize;
        idx.swap(i, j);
    }
    let mut picked = idx[..k].to_vec();
    picked.sort_unstable();
    picked.into_iter().map(|i| candidates[i].0).collect()
}

/// A row's mined negatives and how many positives were kept out of its ranking.
type Mined = (Vec<i32>, u64);

/// Queries per dense block (one matrix product per block and passage chunk).
const DENSE_BLOCK: usize = 32;
/// Passages per dense chunk (a block's scores of one chunk: 32 x 4096 floats, 512 KB).
const DENSE_CHUNK: usize = 4096;

/// The `wants[i]` best ranked corpus passages (corpus id, inner product) of each row of
/// `rows`, best first (ties by id): a matrix product per chunk of passages, the best kept
/// as it goes. Each score is the product of one query row and one passage row, computed alike
/// whatever the block: the result of a row does not depend on the rows beside it.
fn dense_top(
    queries: &Embeddings,
    passages: &Embeddings,
    corpus: &corpus::Resolved<'_>,
    rows: std::ops::Range<usize>,
    wants: &[usize],
    (tile, gathered): (&mut Vec<f32>, &mut Vec<f32>),
) -> Result<Vec<Vec<(u32, f32)>>> {
    let dim = queries.dim;
    let m = rows.len();
    let a = &queries.values[rows.start * dim..rows.end * dim];
    let n = corpus.ranked_len();
    let mut tops: Vec<Vec<(u32, f32)>> = vec![Vec::new(); m];
    tile.resize(m * DENSE_CHUNK, 0.0);
    for start in (0..n).step_by(DENSE_CHUNK) {
        let end = (start + DENSE_CHUNK).min(n);
        let w = end - start;
        // The chunk's passage rows, contiguous (gathered when duplicates are skipped).
        let b: &[f32] = match &corpus.canonical {
            None => &passages.values[start * dim..end * dim],
            Some(_) => {
                gathered.clear();
                for k in start..end {
                    gathered.extend_from_slice(passages.row(corpus.ranked(k) as usize));
                }
                gathered
            }
        };
        debug_assert!(a.len() == m * dim && b.len() == w * dim && tile.len() >= m * w);
        // SAFETY: `a` holds m x dim floats (row stride dim), `b` w x dim (read as its
        // transpose: row stride 1, column stride dim), `tile` at least m x w (row stride w);
        // every index the product touches is within those slices, and `tile` is not aliased.
        unsafe {
            matrixmultiply::sgemm(
                m,
                dim,
                w,
                1.0,
                a.as_ptr(),
                dim as isize,
                1,
                b.as_ptr(),
                1,
                dim as isize,
                0.0,
                tile.as_mut_ptr(),
                w as isize,
                1,
            );
        }
        for (i, top) in tops.iter_mut().enumerate() {
            let scores = &tile[i * w..(i + 1) * w];
            if let Some(j) = scores.iter().position(|s| !s.is_finite()) {
                return Err(Error::argument(
                    "embeddings",
                    format!(
                        "the inner product of query {} and passage {} is {}",
                        rows.start + i,
                        corpus.ranked(start + j),
                        scores[j]
                    ),
                ));
            }
            let want = wants[i];
            // Only what can still be among the best: above the current want-th score.
            let floor = (top.len() >= want && want > 0).then(|| top[want - 1]);
            for (j, &s) in scores.iter().enumerate() {
                let hit = (corpus.ranked(start + j), s);
                if floor.is_none_or(|f| rank_order(&hit, &f).is_lt()) {
                    top.push(hit);
                }
            }
            top_k(top, want);
        }
    }
    Ok(tops)
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent sums: the compiler vectorizes them.
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Mine `ds` into a new dataset at `out` (see the module docs): verifies `ds` in full, ranks,
/// selects, writes. `shard` = (k, n) mines rows `k*len/n..(k+1)*len/n` only.
pub fn mine(
    ds: &Dataset,
    corpus: Corpus<'_>,
    retriever: &Retriever,
    options: &MineOptions,
    shard: Option<(u64, u64)>,
    out: &std::path::Path,
    writer: WriterOptions,
) -> Result<MineReport> {
    options.check()?;
    if let Some((k, n)) = shard {
        if n == 0 || k >= n {
            return Err(Error::argument(
                "shard",
                format!("{k}/{n}: K must be below N"),
            ));
        }
    }
    if !writer.overwrite && out.symlink_metadata().is_ok() {
        // Refused before any work (the writer would refuse it only after the ranking).
        return Err(Error::Exists {
            path: out.to_path_buf(),
        });
    }
    ds.validate_whole("mine")?;
    let rows = shard_rows(ds.len(), shard);
    let mut report = MineReport::default();
    let corpus = corpus::Resolved::new(ds, corpus)?;
    let negatives = mine_resolved(ds, &corpus, retriever, options, rows.clone(), &mut report)?;
    let mut w = DatasetWriter::create(out, writer)?;
    for id in [
        format::PROMPT_ID_LLM_DEFAULT,
        format::PROMPT_ID_MATRYOSHKA_DEFAULT,
    ] {
        w.add_prompt(ds.prompt_tokens(id)?)?;
    }
    let m = ds.manifest();
    let mut sources: Vec<SourceStats> = m.sources.clone();
    // (By shard number: the first shard's rows may be none, and the next start at row 0.)
    let first = shard.is_none_or(|(k, _)| k == 0);
    for s in sources.iter_mut() {
        // This output's rows; what the conversion read but did not keep stays with the first
        // shard, so the shards' counts add up to the input's.
        let not_kept = s.rows_read.saturating_sub(s.rows_accepted);
        s.rows_accepted = 0;
        s.rows_empty_neg = 0;
        s.rows_read = if first { not_kept } else { 0 };
        if !first {
            s.rows_rejected = 0;
            s.rejected_by_reason.clear();
            s.blank_lines = 0;
            s.unknown_fields.clear();
        }
    }
    let mut scratch = (Vec::new(), Vec::new());
    for (row, mined) in rows.clone().zip(&negatives) {
        let g = ds.group(row)?;
        // Teacher scores dropped: they scored the old negatives.
        let tokens = mined
            .iter()
            .map(|&c| corpus.get(c as usize))
            .collect::<Result<Vec<_>>>()?;
        crate::merge::write_group_with(
            ds,
            &mut w,
            &g,
            &tokens,
            (None, None),
            g.source,
            &mut scratch,
        )?;
        if let Some(s) = sources.get_mut(g.source as usize) {
            s.rows_accepted += 1;
            s.rows_read += 1;
            s.rows_empty_neg += mined.is_empty() as u64;
        }
    }
    if first {
        crate::merge::copy_rejects(ds, &mut w)?;
    }
    let shards = shard.and_then(|(k, n)| ShardRange::partial(k, k + 1, n));
    w.set_provenance(Some(provenance(retriever, options, ds, &corpus)));
    w.finish(ManifestInfo {
        tokenizer: m.tokenizer.clone(),
        text: m.text.clone(),
        sources,
        shards,
    })?;
    Ok(report)
}

/// What the manifest records of a mining run.
fn provenance(
    retriever: &Retriever,
    options: &MineOptions,
    ds: &Dataset,
    corpus: &corpus::Resolved<'_>,
) -> serde_json::Value {
    let method = match retriever {
        Retriever::Bm25 { .. } => serde_json::json!({"bm25": options.bm25()}),
        Retriever::Dense { queries, passages } => {
            // The embeddings themselves: shards mined with other vectors are another run.
            let digest = |e: &Embeddings| {
                format!(
                    "{:016x}",
                    xxhash_rust::xxh3::xxh3_64(bytemuck::cast_slice(&e.values))
                )
            };
            serde_json::json!({"dense": {
                "dim": queries.dim,
                "queries_xxh3_64": digest(queries),
                "passages_xxh3_64": digest(passages),
            }})
        }
    };
    serde_json::json!({
        "mined": {
            "from_seal": ds.manifest().checksum,
            "corpus": corpus.describe(),
            "retriever": method,
            "options": options,
        }
    })
}
