//! Where negatives are mined from: the dataset's own passages, another dataset's, or passages
//! given as token lists (read from Parquet: pre-tokenized ids, or text tokenized here).
//!
//! Whatever the corpus, a passage is its tokens: corpus passages with the same tokens count
//! once (the first by id is indexed, the others never ranked), and a corpus passage with the
//! tokens of one of the row's query's positives is that positive (never a negative). Ids in
//! rankings and ties are corpus ids (for Parquet: the `id` column, else the row order).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::tokenizer::TextTokenizer;

/// The corpus of a mining run.
#[derive(Debug, Clone, Copy)]
pub enum Corpus<'a> {
    /// The dataset's own passages.
    Own,
    /// Another dataset's passages (its tokenizer must be the dataset's).
    Dataset(&'a Dataset),
    /// Passages given as token lists ([`Passages`]).
    Passages(&'a Passages),
}

/// Passages as token lists, in id order.
#[derive(Debug, Clone, PartialEq)]
pub struct Passages {
    offsets: Vec<usize>,
    tokens: Vec<i32>,
    /// Where they came from (for the provenance).
    origin: String,
    /// The tokenizer (fingerprint) whose vocabulary every id was checked against as it was
    /// read, if any: [`Resolved::new`] need not check them again for that tokenizer's data.
    checked_for: Option<String>,
}

impl Passages {
    /// Passages from token lists (id = position).
    pub fn new<I: IntoIterator<Item = Vec<i32>>>(lists: I, origin: &str) -> Passages {
        let mut p = Passages {
            offsets: vec![0],
            tokens: Vec::new(),
            origin: origin.into(),
            checked_for: None,
        };
        for l in lists {
            p.tokens.extend_from_slice(&l);
            p.offsets.push(p.tokens.len());
        }
        p
    }

    /// Number of passages.
    pub fn len(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The tokens of passage `i`.
    pub fn get(&self, i: usize) -> &[i32] {
        &self.tokens[self.offsets[i]..self.offsets[i + 1]]
    }

    /// A digest of every passage's tokens.
    pub fn digest(&self) -> String {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        h.update(bytemuck::cast_slice(
            &self.offsets.iter().map(|&o| o as u64).collect::<Vec<_>>(),
        ));
        h.update(bytemuck::cast_slice(&self.tokens));
        format!("{:016x}", h.digest())
    }

    /// Passages from Parquet files or directories of them: a `tokens` column (list of int32 or
    /// int64 ids; e.g. `rankfeed export --layout tables`' `passages/`) or a `text` column
    /// (string; tokenized with `tokenizer`, which must be `ds`'s, formatted by `ds`'s passage
    /// settings as a conversion does). An `id` column, when present, gives each passage's id
    /// (the ids must be 0..n once each); otherwise ids follow the files' row order. A file
    /// carrying rankfeed's manifest metadata must name `ds`'s tokenizer.
    pub fn read_parquet(
        inputs: &[PathBuf],
        ds: &Dataset,
        tokenizer: Option<&TextTokenizer>,
    ) -> Result<Passages> {
        if let Some(t) = tokenizer {
            if ds.tokenizer_fingerprint() != Some(t.facts().fingerprint.as_str()) {
                return Err(Error::argument(
                    "tokenizer",
                    format!(
                        "{} is not the dataset's tokenizer (fingerprint {}): the corpus would \
                         be other ids than the dataset's",
                        t.path().display(),
                        t.facts().fingerprint
                    ),
                ));
            }
        }
        let formatter = crate::convert::text::Formatter::new(
            ds.manifest().text.passage_instruction.clone(),
            &ds.manifest().text.passage_instruction_format,
        )?;
        let files = crate::discover::parquet_files(inputs)?;
        let mut lists: Vec<Vec<i32>> = Vec::new();
        let open = |path: &Path, reader: &crate::parquet_read::Opened| -> Result<()> {
            if let Some(kv) = reader.metadata().file_metadata().key_value_metadata() {
                if let Some(json) = kv
                    .iter()
                    .find(|k| k.key == crate::format::PARQUET_MANIFEST_KEY)
                    .and_then(|k| k.value.as_deref())
                {
                    check_carried(path, json, ds)?;
                }
            }
            let has = |n: &str| reader.schema().fields().iter().any(|f| f.name() == n);
            if !has("tokens") && !has("text") {
                return Err(Error::input(
                    path,
                    "a corpus file needs a `tokens` (list of ids) or a `text` column",
                ));
            }
            if !has("tokens") && tokenizer.is_none() {
                return Err(Error::input(
                    path,
                    "a `text` corpus is tokenized here: give the dataset's tokenizer (--tokenizer)",
                ));
            }
            Ok(())
        };
        let rows = |batch: &arrow_array::RecordBatch,
                    at: &dyn Fn(usize, &str, String) -> Error|
         -> Result<()> {
            if let Some(col) = batch.column_by_name("tokens") {
                for i in 0..batch.num_rows() {
                    let list = crate::parquet_read::list_at(col.as_ref(), i)
                        .ok_or_else(|| at(i, "tokens", "not a list of ids (or null)".into()))?;
                    let v =
                        crate::parquet_read::ids(list.as_ref()).map_err(|m| at(i, "tokens", m))?;
                    if let Some(f) = &ds.manifest().tokenizer {
                        f.check_ids("token", &v).map_err(|m| at(i, "tokens", m))?;
                    }
                    lists.push(v);
                }
            } else {
                let col = batch.column_by_name("text").expect("checked");
                let texts: Vec<String> = crate::parquet_read::strings(col.as_ref())
                    .map_err(|m| at(0, "text", m))?
                    .into_iter()
                    .enumerate()
                    .map(|(i, t)| {
                        t.map(|t| formatter.apply(t, None).into_owned())
                            .ok_or_else(|| at(i, "text", "null text".into()))
                    })
                    .collect::<Result<_>>()?;
                let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
                lists.extend(tokenizer.expect("checked").encode_batch(&refs)?);
            }
            Ok(())
        };
        let slot_of = crate::parquet_read::read_rows(&files, "corpus", open, rows)?;
        let origin = files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(",");
        if let Some(slot_of) = slot_of {
            let mut slot: Vec<Vec<i32>> = vec![Vec::new(); lists.len()];
            for (list, s) in lists.into_iter().zip(slot_of) {
                slot[s] = list;
            }
            lists = slot;
        }
        // Every id was checked as read (tokens) or made by the dataset's tokenizer (text).
        let mut p = Passages::new(lists, &origin);
        p.checked_for = ds.tokenizer_fingerprint().map(String::from);
        Ok(p)
    }
}

/// The checks of a corpus file carrying rankfeed's manifest metadata (`json`): `ds`'s passage
/// formatting and tokenizer.
fn check_carried(path: &Path, json: &str, ds: &Dataset) -> Result<()> {
    let ours = ds.tokenizer_fingerprint();
    let carried = serde_json::from_str::<serde_json::Value>(json).ok();
    let theirs = carried
        .as_ref()
        .and_then(|v| v["tokenizer"]["fingerprint"].as_str());
    if let Some(text) = carried.as_ref().map(|v| &v["text"]) {
        let t = &ds.manifest().text;
        let same = text["passage_instruction"].as_str() == t.passage_instruction.as_deref()
            && text["passage_instruction_format"]
                .as_str()
                .is_none_or(|f| f == t.passage_instruction_format);
        if !text.is_null() && !same {
            return Err(Error::input(
                path,
                format!(
                    "these passages were formatted with passage instruction {} and the \
                     dataset's with {:?}: the same passage would be other tokens",
                    text["passage_instruction"], t.passage_instruction
                ),
            ));
        }
    }
    if theirs.is_some() && theirs != ours {
        return Err(Error::input(
            path,
            format!(
                "these passages were tokenized by {} and the dataset by {}: their ids are other \
                 words",
                theirs.unwrap_or_default(),
                ours.unwrap_or("an unrecorded tokenizer")
            ),
        ));
    }
    Ok(())
}

/// A corpus resolved against the dataset mined: what ranking and the positives check need.
pub(crate) struct Resolved<'a> {
    corpus: Corpus<'a>,
    ds: &'a Dataset,
    /// Passages in the corpus (duplicates included).
    pub n: usize,
    /// The corpus ids indexed and ranked (each distinct token list once, the first id);
    /// `None`: all of 0..n.
    pub canonical: Option<Vec<u32>>,
    /// Per corpus id: the dataset passage with the same tokens, or -1; `None`: the identity
    /// (the own corpus).
    pub to_ds: Option<Vec<i32>>,
    /// Dataset passage id -> the canonical corpus id with the same tokens.
    pub from_ds: Option<HashMap<i32, u32>>,
}

fn key(tokens: &[i32]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(bytemuck::cast_slice(tokens))
}

impl<'a> Resolved<'a> {
    pub(crate) fn new(ds: &'a Dataset, corpus: Corpus<'a>) -> Result<Resolved<'a>> {
        if let Corpus::Dataset(other) = corpus {
            let fp = |d: &'a Dataset| d.tokenizer_fingerprint();
            if fp(other) != fp(ds) {
                return Err(Error::argument(
                    "corpus",
                    format!(
                        "{} was tokenized by {} and the dataset by {}: its ids are other words",
                        other.dir().display(),
                        fp(other).unwrap_or("an unrecorded tokenizer"),
                        fp(ds).unwrap_or("an unrecorded tokenizer")
                    ),
                ));
            }
            let (a, b) = (&ds.manifest().text, &other.manifest().text);
            if (&a.passage_instruction, &a.passage_instruction_format)
                != (&b.passage_instruction, &b.passage_instruction_format)
            {
                return Err(Error::argument(
                    "corpus",
                    format!(
                        "{} formats passages with instruction {:?} (format {:?}) and the dataset \
                         with {:?} ({:?}): the same passage would be other tokens",
                        other.dir().display(),
                        b.passage_instruction,
                        b.passage_instruction_format,
                        a.passage_instruction,
                        a.passage_instruction_format
                    ),
                ));
            }
            other.validate_whole("mine from")?;
        }
        if let (Corpus::Passages(p), Some(f)) = (corpus, &ds.manifest().tokenizer) {
            if p.checked_for.as_deref() != Some(f.fingerprint.as_str()) {
                for c in 0..p.len() {
                    f.check_ids("token", p.get(c)).map_err(|m| {
                        Error::argument("corpus", format!("passage {c} ({}): {m}", p.origin))
                    })?;
                }
            }
        }
        let mut r = Resolved {
            corpus,
            ds,
            n: match corpus {
                Corpus::Own => ds.num_passages(),
                Corpus::Dataset(o) => o.num_passages(),
                Corpus::Passages(p) => p.len(),
            },
            canonical: None,
            to_ds: None,
            from_ds: None,
        };
        if r.n == 0 && !matches!(corpus, Corpus::Own) {
            return Err(Error::argument(
                "corpus",
                "the corpus holds no passages: every row would lose its negatives",
            ));
        }
        if matches!(corpus, Corpus::Own) {
            return Ok(r);
        }
        let mut ours: HashMap<u128, i32> = HashMap::with_capacity(ds.num_passages());
        for d in 0..ds.num_passages() {
            ours.entry(key(ds.passage(d as i32)?)).or_insert(d as i32);
        }
        let mut seen: HashMap<u128, u32> = HashMap::with_capacity(r.n);
        let (mut canonical, mut to_ds, mut from_ds) = (
            Vec::with_capacity(r.n),
            Vec::with_capacity(r.n),
            HashMap::new(),
        );
        for c in 0..r.n {
            let k = key(r.get(c)?);
            to_ds.push(ours.get(&k).copied().unwrap_or(-1));
            if let std::collections::hash_map::Entry::Vacant(e) = seen.entry(k) {
                e.insert(c as u32);
                canonical.push(c as u32);
                if let Some(&d) = ours.get(&k) {
                    from_ds.insert(d, c as u32);
                }
            }
        }
        r.canonical = (canonical.len() < r.n).then_some(canonical);
        r.to_ds = Some(to_ds);
        r.from_ds = Some(from_ds);
        Ok(r)
    }

    /// The tokens of corpus passage `c`.
    pub(crate) fn get(&self, c: usize) -> Result<&'a [i32]> {
        match self.corpus {
            Corpus::Own => self.ds.passage(c as i32),
            Corpus::Dataset(o) => o.passage(c as i32),
            Corpus::Passages(p) => Ok(p.get(c)),
        }
    }

    /// Ranked corpus passages: how many, and the corpus id of the k-th.
    pub(crate) fn ranked_len(&self) -> usize {
        self.canonical.as_ref().map_or(self.n, Vec::len)
    }

    /// The corpus id of the k-th ranked passage.
    pub(crate) fn ranked(&self, k: usize) -> u32 {
        self.canonical.as_ref().map_or(k as u32, |c| c[k])
    }

    /// The dataset passage with corpus passage `c`'s tokens, if any.
    pub(crate) fn in_dataset(&self, c: u32) -> Option<i32> {
        match &self.to_ds {
            None => Some(c as i32),
            Some(v) => Some(v[c as usize]).filter(|&d| d >= 0),
        }
    }

    /// The corpus passage with dataset passage `d`'s tokens, if any.
    pub(crate) fn in_corpus(&self, d: i32) -> Option<u32> {
        match &self.from_ds {
            None => Some(d as u32),
            Some(m) => m.get(&d).copied(),
        }
    }

    /// What identifies the corpus' passages: the seal of the dataset holding them, or the
    /// digest of the token lists.
    pub(crate) fn digest(&self) -> String {
        match self.corpus {
            Corpus::Own => self.ds.manifest().checksum.clone(),
            Corpus::Dataset(o) => o.manifest().checksum.clone(),
            Corpus::Passages(p) => format!("passages:{}", p.digest()),
        }
    }

    /// What the provenance records of the corpus.
    pub(crate) fn describe(&self) -> serde_json::Value {
        match self.corpus {
            Corpus::Own => serde_json::json!("own"),
            Corpus::Dataset(o) => serde_json::json!({"dataset": o.manifest().checksum}),
            Corpus::Passages(p) => serde_json::json!({"passages": {
                "count": p.len(),
                "tokens_xxh3_64": p.digest(),
                "origin": p.origin,
            }}),
        }
    }
}

/// Whether `path` is a dataset directory (rather than Parquet files).
pub fn is_dataset(path: &Path) -> bool {
    path.join(crate::format::MANIFEST_FILE).is_file()
}

/// Whether corpus arguments `args` name one dataset (a directory holding a manifest, or an
/// object-store URL that is not a `.parquet` file) rather than Parquet files or directories:
/// the one rule of the CLI's `--corpus` and Python's `corpus=`.
pub fn names_dataset(args: &[String]) -> bool {
    #[cfg(feature = "remote")]
    let url = |s: &str| crate::remote::is_url(s) && !s.ends_with(".parquet");
    #[cfg(not(feature = "remote"))]
    let url = |_: &str| false;
    match args {
        [one] => is_dataset(Path::new(one)) || url(one),
        _ => false,
    }
}

/// A tokenizer is given to tokenize a Parquet `text` corpus, and only then (a dataset corpus
/// is tokens already; without a corpus nothing is tokenized).
pub fn check_corpus_tokenizer(tokenizer: bool, parquet_corpus: bool) -> Result<()> {
    if tokenizer && !parquet_corpus {
        return Err(Error::argument(
            "tokenizer",
            "the tokenizer tokenizes a Parquet text corpus only: give Parquet corpus files (a \
             dataset corpus is already tokens)",
        ));
    }
    Ok(())
}
