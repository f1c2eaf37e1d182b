//! The collator: selections -> padded, contiguous arrays, straight from the mapped token slices.
//! Pure compute: a [`Dataset`] to read from, options, selections in; a [`Batch`] out.
//!
//! Bit-identical to FlagEmbedding (see shared/reference/flagembedding.md), per pair:
//! - `encoder`: `Q = q[:qm + pm//4]`, `P = p[:pm + qm//2]`; if `|Q| + |P| + ns > qm + pm`
//!   (ns = special tokens of the pair template), cut the excess `r` from the end of P when
//!   `|P| > r`, else cut nothing (the pair stays over length; counted in [`Batch::overlong`]).
//!   Layout and token_type_ids from the tokenizer's pair template (`[CLS] Q [SEP] P [SEP]`,
//!   `<s> Q </s></s> P </s>`, ...).
//! - `llm`: `A = [bos] + Q` (when the tokenizer has a bos different from its pad), `B = S + P`
//!   (S = sep ids), truncated only_second against `qm + pm - |R| - |S|` (R = prompt ids), then
//!   `A + B' + S + R`.
//! - `matryoshka`: as `llm` with `Q = q[:qm]`, plus `query_lengths = |A| + |S|` and
//!   `prompt_lengths = |S| + |R|`.
//!
//! Rows of a batch are `b * G + g`: g = 0 the positive, then the negatives in drawn order. The
//! batch is padded to its longest row, rounded up to `pad_to_multiple_of`.

use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::format::{self, TemplatePiece};
use crate::sample::Selection;

/// Which pair layout to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Cross-encoders (BERT, XLM-R, ...): the tokenizer's pair template.
    Encoder,
    /// Decoder rerankers (gemma, mistral, minicpm): bos + Q + sep + P + sep + prompt.
    Llm,
    /// The Matryoshka reranker: the LLM layout with length bookkeeping.
    Matryoshka,
}

impl std::str::FromStr for Mode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Mode> {
        match s {
            "encoder" => Ok(Mode::Encoder),
            "llm" => Ok(Mode::Llm),
            "matryoshka" => Ok(Mode::Matryoshka),
            _ => Err(Error::Config(format!(
                "mode {s:?}: expected encoder, llm or matryoshka"
            ))),
        }
    }
}

/// Where padding goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Pad after the tokens.
    Right,
    /// Pad before the tokens.
    Left,
}

impl std::str::FromStr for Side {
    type Err = Error;
    fn from_str(s: &str) -> Result<Side> {
        match s {
            "right" => Ok(Side::Right),
            "left" => Ok(Side::Left),
            _ => Err(Error::Config(format!(
                "padding side {s:?}: expected left or right"
            ))),
        }
    }
}

/// Integer type of the id arrays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IdType {
    /// int64, as the reference (torch.long).
    #[default]
    I64,
    /// int32: half the bytes.
    I32,
}

/// Collation settings, named after FlagEmbedding's arguments.
#[derive(Debug, Clone, PartialEq)]
pub struct CollateOptions {
    /// Pair layout.
    pub mode: Mode,
    /// `query_max_len`.
    pub query_max_len: usize,
    /// `passage_max_len`.
    pub passage_max_len: usize,
    /// `train_group_size`: 1 positive + G-1 negatives per query.
    pub group_size: usize,
    /// Round the padded length up to a multiple of this.
    pub pad_to_multiple_of: Option<usize>,
    /// Padding side; default: the tokenizer's for `encoder`, left for `llm`, right for
    /// `matryoshka` (its layer compression requires right padding).
    pub padding_side: Option<Side>,
    /// Pad id; default the tokenizer's pad, else unk, else eos.
    pub pad_id: Option<i32>,
    /// int64 (default) or int32 arrays.
    pub id_type: IdType,
    /// Produce attention_mask.
    pub attention_mask: bool,
    /// Gather teacher scores (`knowledge_distillation`).
    pub knowledge_distillation: bool,
}

impl Default for CollateOptions {
    fn default() -> Self {
        CollateOptions {
            mode: Mode::Encoder,
            query_max_len: 32,
            passage_max_len: 128,
            group_size: 8,
            pad_to_multiple_of: None,
            padding_side: None,
            pad_id: None,
            id_type: IdType::I64,
            attention_mask: true,
            knowledge_distillation: false,
        }
    }
}

/// An array of ids in the chosen integer type, row-major `[rows, len]` (or flat `[rows]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ids {
    /// int64 values.
    I64(Vec<i64>),
    /// int32 values.
    I32(Vec<i32>),
}

impl Ids {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Ids::I64(v) => v.len(),
            Ids::I32(v) => v.len(),
        }
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i` widened to i64.
    pub fn get(&self, i: usize) -> i64 {
        match self {
            Ids::I64(v) => v[i],
            Ids::I32(v) => v[i] as i64,
        }
    }

    /// Size in bytes.
    pub fn nbytes(&self) -> usize {
        match self {
            Ids::I64(v) => v.len() * 8,
            Ids::I32(v) => v.len() * 4,
        }
    }
}

/// A collated batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Number of rows (batch size x group size).
    pub rows: usize,
    /// Padded length.
    pub len: usize,
    /// `[rows, len]`.
    pub input_ids: Ids,
    /// `[rows, len]`, 1 on tokens, 0 on padding.
    pub attention_mask: Option<Ids>,
    /// `[rows, len]`, encoder mode with tokenizers that have them.
    pub token_type_ids: Option<Ids>,
    /// `[rows]`, with knowledge distillation.
    pub teacher_scores: Option<Vec<f32>>,
    /// `[rows]`, Matryoshka mode: |A| + |S|.
    pub query_lengths: Option<Ids>,
    /// `[rows]`, Matryoshka mode: |S| + |R|.
    pub prompt_lengths: Option<Ids>,
    /// The groups this batch holds.
    pub selections: Vec<Selection>,
    /// Non-padding tokens.
    pub real_tokens: u64,
    /// Pairs left over length because the query alone exceeds the budget (reference behaviour).
    pub overlong: u32,
}

impl Batch {
    /// Bytes of all output arrays.
    pub fn nbytes(&self) -> usize {
        self.input_ids.nbytes()
            + self.attention_mask.as_ref().map_or(0, Ids::nbytes)
            + self.token_type_ids.as_ref().map_or(0, Ids::nbytes)
            + self.teacher_scores.as_ref().map_or(0, |s| s.len() * 4)
            + self.query_lengths.as_ref().map_or(0, Ids::nbytes)
            + self.prompt_lengths.as_ref().map_or(0, Ids::nbytes)
    }
}

/// Up to this many segments make one pair (template pieces or bos/Q/S/P/S/R).
const MAX_SEGMENTS: usize = 8;

/// One pair as slices to concatenate, with their token type ids.
#[derive(Debug, Clone, Copy)]
pub struct Pair<'a> {
    segments: [(&'a [i32], u8); MAX_SEGMENTS],
    count: usize,
    len: usize,
    /// Matryoshka bookkeeping.
    pub query_length: usize,
    /// Matryoshka bookkeeping.
    pub prompt_length: usize,
    /// The query alone exceeded the budget: nothing was truncated.
    pub overlong: bool,
}

impl<'a> Pair<'a> {
    fn new() -> Self {
        Pair {
            segments: [(&[], 0); MAX_SEGMENTS],
            count: 0,
            len: 0,
            query_length: 0,
            prompt_length: 0,
            overlong: false,
        }
    }

    fn push(&mut self, ids: &'a [i32], type_id: u8) {
        self.segments[self.count] = (ids, type_id);
        self.count += 1;
        self.len += ids.len();
    }

    /// Number of ids.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the pair is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The ids, concatenated.
    pub fn ids(&self) -> Vec<i32> {
        self.segments[..self.count]
            .iter()
            .flat_map(|s| s.0.iter().copied())
            .collect()
    }

    /// The token type ids, concatenated.
    pub fn type_ids(&self) -> Vec<u8> {
        self.segments[..self.count]
            .iter()
            .flat_map(|s| std::iter::repeat_n(s.1, s.0.len()))
            .collect()
    }
}

/// Element types of the id arrays.
trait IdElem: Copy + Default {
    fn from_i32(v: i32) -> Self;
}

impl IdElem for i64 {
    #[inline]
    fn from_i32(v: i32) -> Self {
        v as i64
    }
}

impl IdElem for i32 {
    #[inline]
    fn from_i32(v: i32) -> Self {
        v
    }
}

/// A collator bound to a dataset's tokenizer facts.
#[derive(Debug, Clone)]
pub struct Collator {
    options: CollateOptions,
    side: Side,
    pad: i32,
    /// bos, when the LLM layout prepends one.
    bos: Option<[i32; 1]>,
    /// (special ids or sequence A/B, type id) of the encoder pair template.
    template: Vec<(TemplateSlot, u8)>,
    num_special: usize,
    token_type_ids: bool,
    sep: Vec<i32>,
    default_prompt: u32,
}

#[derive(Debug, Clone)]
enum TemplateSlot {
    Special(Vec<i32>),
    A,
    B,
}

impl Collator {
    /// A collator for `ds` with `options`; checks the options against the dataset.
    pub fn new(ds: &Dataset, options: CollateOptions) -> Result<Collator> {
        let facts = ds.manifest().tokenizer.as_ref();
        if options.group_size == 0 {
            return Err(Error::Config("group_size must be at least 1".into()));
        }
        if options.pad_to_multiple_of == Some(0) {
            return Err(Error::Config("pad_to_multiple_of must be positive".into()));
        }
        let tokenizer_pad = facts.and_then(|f| f.pad_id.or(f.unk_id).or(f.eos_id));
        let pad = options.pad_id.or(tokenizer_pad).ok_or_else(|| {
            Error::Config("the tokenizer has no pad, unk or eos token: give a pad id".into())
        })?;
        let side = options.padding_side.unwrap_or(match options.mode {
            Mode::Encoder => match facts.map(|f| f.padding_side.as_str()) {
                Some("left") => Side::Left,
                _ => Side::Right,
            },
            Mode::Llm => Side::Left,
            Mode::Matryoshka => Side::Right,
        });
        let bos = facts
            .and_then(|f| f.bos_id)
            .filter(|&b| Some(b) != tokenizer_pad)
            .map(|b| [b]);
        let template: Vec<(TemplateSlot, u8)> = facts
            .map(|f| f.pair_template.as_slice())
            .unwrap_or(&[])
            .iter()
            .map(|p| match p {
                TemplatePiece::Special { ids, type_id } => {
                    (TemplateSlot::Special(ids.clone()), *type_id as u8)
                }
                TemplatePiece::Sequence { id, type_id } if id == "A" => {
                    (TemplateSlot::A, *type_id as u8)
                }
                TemplatePiece::Sequence { type_id, .. } => (TemplateSlot::B, *type_id as u8),
            })
            .collect();
        if options.mode == Mode::Encoder && template.len() > MAX_SEGMENTS {
            return Err(Error::Config("pair template has too many pieces".into()));
        }
        let template = if template.is_empty() {
            vec![(TemplateSlot::A, 0), (TemplateSlot::B, 0)]
        } else {
            template
        };
        let text = &ds.manifest().text;
        Ok(Collator {
            num_special: facts.map_or(0, |f| f.num_special_pair()),
            token_type_ids: options.mode == Mode::Encoder
                && facts.is_some_and(|f| f.has_token_type_ids),
            sep: text.sep_ids.clone(),
            default_prompt: match options.mode {
                Mode::Matryoshka => format::PROMPT_ID_MATRYOSHKA_DEFAULT,
                _ => format::PROMPT_ID_LLM_DEFAULT,
            },
            options,
            side,
            pad,
            bos,
            template,
        })
    }

    /// The options.
    pub fn options(&self) -> &CollateOptions {
        &self.options
    }

    /// The padding side in use.
    pub fn side(&self) -> Side {
        self.side
    }

    /// The pad id in use.
    pub fn pad_id(&self) -> i32 {
        self.pad
    }

    /// Whether batches carry token_type_ids.
    pub fn has_token_type_ids(&self) -> bool {
        self.token_type_ids
    }

    /// The pair of `query` (with `prompt`, LLM modes) and `passage`, as the model sees it.
    pub fn pair<'a>(&'a self, query: &'a [i32], passage: &'a [i32], prompt: &'a [i32]) -> Pair<'a> {
        let (qm, pm) = (self.options.query_max_len, self.options.passage_max_len);
        let mut pair = Pair::new();
        let p_cap = pm + qm / 2;
        let mut p = &passage[..passage.len().min(p_cap)];
        match self.options.mode {
            Mode::Encoder => {
                let q = &query[..query.len().min(qm + pm / 4)];
                let total = q.len() + p.len() + self.num_special;
                if total > qm + pm {
                    let r = total - (qm + pm);
                    if p.len() > r {
                        p = &p[..p.len() - r];
                    } else {
                        pair.overlong = true;
                    }
                }
                for (slot, type_id) in &self.template {
                    match slot {
                        TemplateSlot::Special(ids) => pair.push(ids, *type_id),
                        TemplateSlot::A => pair.push(q, *type_id),
                        TemplateSlot::B => pair.push(p, *type_id),
                    }
                }
            }
            Mode::Llm | Mode::Matryoshka => {
                let q_cap = if self.options.mode == Mode::Matryoshka {
                    qm
                } else {
                    qm + pm / 4
                };
                let q = &query[..query.len().min(q_cap)];
                let s = self.sep.as_slice();
                let bos: &[i32] = self.bos.as_ref().map_or(&[], |b| b.as_slice());
                let a_len = bos.len() + q.len();
                let b_len = s.len() + p.len();
                let budget = (qm + pm) as i64 - prompt.len() as i64 - s.len() as i64;
                let mut keep_b = b_len;
                if (a_len + b_len) as i64 > budget {
                    let r = ((a_len + b_len) as i64 - budget) as usize;
                    if b_len > r {
                        keep_b = b_len - r;
                    } else {
                        pair.overlong = true;
                    }
                }
                pair.push(bos, 0);
                pair.push(q, 0);
                pair.push(&s[..keep_b.min(s.len())], 0);
                pair.push(&p[..keep_b.saturating_sub(s.len())], 0);
                pair.push(s, 0);
                pair.push(prompt, 0);
                pair.query_length = a_len + s.len();
                pair.prompt_length = s.len() + prompt.len();
            }
        }
        pair
    }

    /// The prompt tokens of a row (its own or the mode's default); empty in encoder mode.
    pub fn prompt_of<'d>(&self, ds: &'d Dataset, prompt: Option<u32>) -> Result<&'d [i32]> {
        if self.options.mode == Mode::Encoder {
            return Ok(&[]);
        }
        ds.prompt_tokens(prompt.unwrap_or(self.default_prompt))
    }

    /// The pairs of one selection (positive first), as the model sees them before padding.
    pub fn pairs<'a>(&'a self, ds: &'a Dataset, sel: &Selection) -> Result<Vec<Pair<'a>>> {
        let mut out = Vec::with_capacity(1 + sel.neg.len());
        self.push_pairs(ds, sel, &mut out)?;
        Ok(out)
    }

    fn push_pairs<'a>(
        &'a self,
        ds: &'a Dataset,
        sel: &Selection,
        out: &mut Vec<Pair<'a>>,
    ) -> Result<()> {
        let group = ds.group_ids(sel.row as usize)?;
        let prompt = self.prompt_of(ds, group.prompt)?;
        // Resolve every passage of the group first, in a tight loop of independent loads (the
        // processor overlaps their cache misses), then build the pairs.
        let mut passages: Vec<&[i32]> = Vec::with_capacity(1 + sel.neg.len());
        passages.push(ds.passage(pick(group.pos, sel.pos, sel.row, "positive")?)?);
        for &j in &sel.neg {
            passages.push(ds.passage(pick(group.neg, j, sel.row, "negative")?)?);
        }
        out.extend(passages.iter().map(|p| self.pair(group.query, p, prompt)));
        Ok(())
    }

    /// Teacher scores of one selection: `[pos_scores[p]] + [neg_scores[j] for j in negs]`.
    pub fn scores(&self, ds: &Dataset, sel: &Selection) -> Result<Vec<f32>> {
        let group = ds.group(sel.row as usize)?;
        let missing = |what: &str| {
            Error::Config(format!(
                "row {}: knowledge distillation needs {what}, the row has none",
                sel.row
            ))
        };
        let ps = group.pos_scores.ok_or_else(|| missing("pos_scores"))?;
        pick(group.pos, sel.pos, sel.row, "positive")?;
        let mut out = vec![ps[sel.pos as usize]];
        if !sel.neg.is_empty() {
            let ns = group.neg_scores.ok_or_else(|| missing("neg_scores"))?;
            for &j in &sel.neg {
                pick(group.neg, j, sel.row, "negative")?;
                out.push(ns[j as usize]);
            }
        }
        Ok(out)
    }

    /// Collate `selections` (each with exactly group_size - 1 negatives) from `ds`.
    pub fn collate(&self, ds: &Dataset, selections: Vec<Selection>) -> Result<Batch> {
        let g = self.options.group_size;
        let rows = selections.len() * g;
        let mut pairs: Vec<Pair<'_>> = Vec::with_capacity(rows);
        let mut scores = self
            .options
            .knowledge_distillation
            .then(|| Vec::with_capacity(rows));
        for sel in &selections {
            if sel.neg.len() + 1 != g {
                return Err(Error::Config(format!(
                    "row {}: a selection needs {} negatives, got {}",
                    sel.row,
                    g - 1,
                    sel.neg.len()
                )));
            }
            self.push_pairs(ds, sel, &mut pairs)?;
            if let Some(out) = scores.as_mut() {
                out.extend(self.scores(ds, sel)?);
            }
        }
        touch(&pairs);
        let longest = pairs.iter().map(Pair::len).max().unwrap_or(0);
        let len = match self.options.pad_to_multiple_of {
            Some(m) => longest.div_ceil(m) * m,
            None => longest,
        };
        let matryoshka = self.options.mode == Mode::Matryoshka;
        let lengths = |f: fn(&Pair<'_>) -> usize| self.ids_from(pairs.iter().map(|p| f(p) as i64));
        let (input_ids, attention_mask, token_type_ids) = match self.options.id_type {
            IdType::I64 => {
                let (i, m, t) = self.grids::<i64>(&pairs, len);
                (Ids::I64(i), m.map(Ids::I64), t.map(Ids::I64))
            }
            IdType::I32 => {
                let (i, m, t) = self.grids::<i32>(&pairs, len);
                (Ids::I32(i), m.map(Ids::I32), t.map(Ids::I32))
            }
        };
        Ok(Batch {
            rows,
            len,
            input_ids,
            attention_mask,
            token_type_ids,
            teacher_scores: scores,
            query_lengths: matryoshka.then(|| lengths(|p| p.query_length)),
            prompt_lengths: matryoshka.then(|| lengths(|p| p.prompt_length)),
            real_tokens: pairs.iter().map(|p| p.len as u64).sum(),
            overlong: pairs.iter().filter(|p| p.overlong).count() as u32,
            selections,
        })
    }

    fn ids_from(&self, values: impl Iterator<Item = i64>) -> Ids {
        match self.options.id_type {
            IdType::I64 => Ids::I64(values.collect()),
            IdType::I32 => Ids::I32(values.map(|v| v as i32).collect()),
        }
    }

    /// input_ids, attention_mask and token_type_ids (as asked), `[rows, len]` each, in one
    /// pass over the pairs; every element is written exactly once.
    #[allow(clippy::type_complexity)]
    fn grids<T: IdElem>(
        &self,
        pairs: &[Pair<'_>],
        len: usize,
    ) -> (Vec<T>, Option<Vec<T>>, Option<Vec<T>>) {
        let cells = pairs.len() * len;
        let mut ids: Vec<T> = Vec::with_capacity(cells);
        let mut mask: Option<Vec<T>> = self
            .options
            .attention_mask
            .then(|| Vec::with_capacity(cells));
        let mut types: Option<Vec<T>> = self.token_type_ids.then(|| Vec::with_capacity(cells));
        let (pad, zero, one) = (T::from_i32(self.pad), T::from_i32(0), T::from_i32(1));
        let pad_to =
            |ids: &mut Vec<T>, mask: &mut Option<Vec<T>>, types: &mut Option<Vec<T>>, n: usize| {
                ids.resize(ids.len() + n, pad);
                if let Some(m) = mask.as_mut() {
                    m.resize(m.len() + n, zero);
                }
                if let Some(t) = types.as_mut() {
                    t.resize(t.len() + n, zero);
                }
            };
        for pair in pairs {
            let padding = len - pair.len;
            if self.side == Side::Left {
                pad_to(&mut ids, &mut mask, &mut types, padding);
            }
            for &(seg, type_id) in &pair.segments[..pair.count] {
                ids.extend(seg.iter().map(|&v| T::from_i32(v)));
                if let Some(m) = mask.as_mut() {
                    m.resize(m.len() + seg.len(), one);
                }
                if let Some(t) = types.as_mut() {
                    t.resize(t.len() + seg.len(), T::from_i32(type_id as i32));
                }
            }
            if self.side == Side::Right {
                pad_to(&mut ids, &mut mask, &mut types, padding);
            }
        }
        (ids, mask, types)
    }
}

/// Read one value per cache line of every segment before copying: these loads are independent,
/// so the processor overlaps their cache misses (passages are scattered across the map), where
/// the copy loop would meet them one at a time.
fn touch(pairs: &[Pair<'_>]) {
    const PER_LINE: usize = 64 / std::mem::size_of::<i32>();
    let mut acc = 0i32;
    for pair in pairs {
        for &(seg, _) in &pair.segments[..pair.count] {
            for v in seg.iter().step_by(PER_LINE) {
                acc ^= *v;
            }
            if let Some(v) = seg.last() {
                acc ^= *v;
            }
        }
    }
    std::hint::black_box(acc);
}

/// `list[i]`, or an error naming the row.
fn pick(list: &[i32], i: u32, row: u64, what: &str) -> Result<i32> {
    list.get(i as usize).copied().ok_or_else(|| {
        Error::Config(format!(
            "row {row}: {what} index {i} out of range (the row has {})",
            list.len()
        ))
    })
}
