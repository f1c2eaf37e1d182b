//! The collator: selections -> padded, contiguous arrays, straight from the mapped token slices.
//! Pure compute: a [`Dataset`] to read from, options, selections in; a [`Batch`] out.
//!
//! Bit-identical to FlagEmbedding (the semantics are stated here and in the README), per pair:
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

pub mod embedder;
pub mod packed;
mod padded;
mod scores;
use crate::dataset::{Dataset, GroupIds};
use crate::error::{Error, Result};
use crate::format::{self, TemplatePiece};
use crate::sample::Selection;
use crate::storage;
pub use embedder::{EmbedderArrays, Padded};
use scores::push_scores;

/// Which pair layout to build. Spelled in lower case (`"encoder"`, ...) by every front-end and
/// checkpoint (serde, `FromStr`, `Display`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Cross-encoders (BERT, XLM-R, ...): the tokenizer's pair template.
    Encoder,
    /// Decoder rerankers (gemma, mistral, minicpm): bos + Q + sep + P + sep + prompt.
    Llm,
    /// The Matryoshka reranker: the LLM layout with length bookkeeping.
    Matryoshka,
    /// Bi-encoder embedders (see [`embedder`]): queries and passages each on their own, with
    /// the tokenizer's single-sequence template, padded separately.
    Embedder,
}
crate::options::named!(Mode, "mode");

/// Where padding goes (`"left"` or `"right"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// Pad after the tokens.
    Right,
    /// Pad before the tokens.
    Left,
}
crate::options::named!(Side, "padding_side");

/// How a pair is cut to its token budget (encoder mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Truncation {
    /// FlagEmbedding's rerankers: the query cut to `query_max_len + passage_max_len / 4`, the
    /// passage to `passage_max_len + query_max_len / 2`, then the pair's passage (only) cut so
    /// the pair holds `query_max_len + passage_max_len` tokens.
    #[default]
    FlagEmbedding,
    /// Hugging Face tokenizers' `truncation="longest_first"` with
    /// `max_length = query_max_len + passage_max_len` (special tokens included), what
    /// sentence-transformers' CrossEncoder does: no separate query cut; when the pair is too
    /// long, the longer of query and passage is cut first, both to about half the budget when
    /// both are long.
    LongestFirst,
}
crate::options::named!(Truncation, "truncation");

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
    /// How encoder pairs are cut (the other modes follow FlagEmbedding's layouts).
    pub truncation: Truncation,
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
    /// Padding-free packed batches (see [`packed`]): every pair concatenated, no pad token.
    pub packed: bool,
    /// Embedder mode: cut queries and passages into chunks of this many rows, each padded to
    /// its own longest (FlagEmbedding's `sub_batch_size`); `None`: one chunk each (0 is an
    /// error).
    pub sub_batch_size: Option<usize>,
    /// Embedder mode: append the eos token to every sequence (FlagEmbedding's decoder
    /// embedders load their tokenizer with `add_eos_token=True`). Default: on for tokenizers
    /// whose single-sequence template does not already end with eos (decoders).
    pub add_eos: Option<bool>,
    /// Matryoshka mode: teacher scores by index (as the other modes) instead of the seed
    /// code's rule (the score of the first passage with the same text; 1 without scores;
    /// always present).
    pub matryoshka_scores_by_index: bool,
}

impl CollateOptions {
    /// Check the numeric settings against [`crate::limits`] (before anything is
    /// allocated): an [`Error::Argument`] names the first one outside its range.
    pub fn check(&self) -> Result<()> {
        use crate::limits::{self, range};
        range("group_size", self.group_size, 1, limits::GROUP_SIZE)?;
        range("query_max_len", self.query_max_len, 0, limits::MAX_LEN)?;
        range("passage_max_len", self.passage_max_len, 0, limits::MAX_LEN)?;
        if let Some(m) = self.pad_to_multiple_of {
            range("pad_to_multiple_of", m, 1, limits::PAD_TO_MULTIPLE_OF)?;
        }
        if let Some(p) = self.pad_id.filter(|&p| p < 0) {
            return Err(crate::error::Error::argument(
                "pad_id",
                format!("must be non-negative (a token id), got {p}"),
            ));
        }
        if let Some(k) = self.sub_batch_size {
            // 0 is refused, not taken as "off" (None is off): a chunk holds at least a row.
            range(
                "sub_batch_size",
                k,
                1,
                limits::BATCH_SIZE * limits::GROUP_SIZE,
            )?;
        }
        if self.truncation != Truncation::FlagEmbedding && self.mode != Mode::Encoder {
            return Err(Error::argument(
                "truncation",
                format!(
                    "\"{}\" applies to encoder pairs; {} mode follows FlagEmbedding's layout",
                    self.truncation, self.mode
                ),
            ));
        }
        if self.packed && self.mode == Mode::Embedder {
            return Err(Error::argument(
                "packed",
                "packed batches are for the pair modes, not embedder",
            ));
        }
        Ok(())
    }

    /// Whether batches carry teacher scores: with knowledge distillation, and always in
    /// Matryoshka mode with the seed's scores.
    pub fn teacher_scores(&self) -> bool {
        self.knowledge_distillation || self.seed_scores()
    }

    /// Matryoshka mode with the seed code's score rule.
    pub fn seed_scores(&self) -> bool {
        self.mode == Mode::Matryoshka && !self.matryoshka_scores_by_index
    }
}

impl Default for CollateOptions {
    fn default() -> Self {
        CollateOptions {
            mode: Mode::Encoder,
            query_max_len: 32,
            passage_max_len: 128,
            truncation: Truncation::FlagEmbedding,
            group_size: 8,
            pad_to_multiple_of: None,
            padding_side: None,
            pad_id: None,
            id_type: IdType::I64,
            attention_mask: true,
            knowledge_distillation: false,
            packed: false,
            sub_batch_size: None,
            add_eos: None,
            matryoshka_scores_by_index: false,
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
    /// Packed batches only: `[T]` position of each token in its pair, from 0.
    pub position_ids: Option<Ids>,
    /// Packed batches only: `[rows + 1]` start of each pair in the `[T]` arrays, then `T`.
    pub cu_seqlens: Option<Vec<i32>>,
    /// Embedder batches only: the query and passage arrays (`input_ids` is then empty).
    pub embedder: Option<EmbedderArrays>,
    /// Same-source batches of a source marked `no_in_batch_neg` (embedder training: no
    /// in-batch negatives for this batch).
    pub no_in_batch_neg: bool,
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
            + self.embedder.as_ref().map_or(0, EmbedderArrays::nbytes)
    }

    /// Tokens in the tensors the model receives: every cell of the padded arrays, every token
    /// of a packed batch.
    pub fn cells(&self) -> usize {
        match (&self.embedder, &self.cu_seqlens) {
            (Some(e), _) => e.cells(),
            (None, Some(_)) => self.len,
            (None, None) => self.rows * self.len,
        }
    }
}

/// One piece of the pair layout: the encoder's pair template, or bos/Q/S/P/S/R.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    /// Fixed ids (special tokens, bos, the closing sep) and their type id.
    Fixed(Vec<i32>, u8),
    /// The query (cut), with its type id.
    Query(u8),
    /// The passage (cut), with its type id.
    Passage(u8),
    /// What truncation left of the sep before the passage (LLM modes).
    SepKept,
    /// The prompt (LLM modes).
    Prompt,
}

/// One pair as the model sees it before padding: the pieces of the layout, cut.
#[derive(Debug, Clone, Copy)]
pub struct Pair<'a> {
    layout: &'a [Piece],
    sep: &'a [i32],
    query: &'a [i32],
    passage: &'a [i32],
    prompt: &'a [i32],
    sep_kept: usize,
    len: usize,
    /// Matryoshka bookkeeping.
    pub query_length: usize,
    /// Matryoshka bookkeeping.
    pub prompt_length: usize,
    /// The query alone exceeded the budget: nothing was truncated.
    pub overlong: bool,
}

/// What a pair keeps of its parts, in tokens ([`Collator::cut`]).
#[derive(Debug, Clone, Copy, Default)]
struct Cut {
    query: usize,
    passage: usize,
    /// Whether the prompt is part of the pair (LLM modes), whole.
    prompt: bool,
    sep_kept: usize,
    len: usize,
    query_length: usize,
    prompt_length: usize,
    overlong: bool,
}

impl<'a> Pair<'a> {
    /// Call `f` with each segment (ids, token type id) in order.
    #[inline(always)]
    fn for_each_segment(&self, mut f: impl FnMut(&'a [i32], u8)) {
        for piece in self.layout {
            match piece {
                Piece::Fixed(ids, t) => f(ids, *t),
                Piece::Query(t) => f(self.query, *t),
                Piece::Passage(t) => f(self.passage, *t),
                Piece::SepKept => f(&self.sep[..self.sep_kept], 0),
                Piece::Prompt => f(self.prompt, 0),
            }
        }
    }

    /// Number of ids.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the pair is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Query and passage tokens kept after truncation (a single sequence, as the embedder
    /// mode builds them, holds its tokens on the passage side).
    pub fn kept(&self) -> (usize, usize) {
        (self.query.len(), self.passage.len())
    }

    /// The ids, concatenated.
    pub fn ids(&self) -> Vec<i32> {
        let mut out = Vec::with_capacity(self.len);
        self.for_each_segment(|s, _| out.extend_from_slice(s));
        out
    }

    /// The token type ids, concatenated.
    pub fn type_ids(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len);
        self.for_each_segment(|s, t| out.resize(out.len() + s.len(), t));
        out
    }
}

/// The lengths Hugging Face tokenizers' `longest_first` truncation keeps of a pair of `a`
/// and `b` tokens when `budget` tokens (special tokens excluded) fit: nothing is cut when the
/// pair fits; else the shorter is kept whole when the longer can take the rest (and is at
/// least as long), else both are cut to half the budget (the second gets the odd token).
/// The rule of `tokenizers`' `truncate_encodings` (0.19-0.22), which transformers' fast
/// tokenizers and sentence-transformers' CrossEncoder apply.
pub fn longest_first(a: usize, b: usize, budget: usize) -> (usize, usize) {
    if a + b <= budget {
        return (a, b);
    }
    if budget == 0 {
        return (0, 0);
    }
    let swap = a > b;
    let mut n1 = a.min(b);
    let mut n2 = if n1 > budget { n1 } else { n1.max(budget - n1) };
    if n1 + n2 > budget {
        n1 = budget / 2;
        n2 = n1 + budget % 2;
    }
    if swap {
        std::mem::swap(&mut n1, &mut n2);
    }
    (a.min(n1), b.min(n2))
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
    /// Whether the LLM layout starts with a bos.
    bos: bool,
    /// The pieces of a pair, in order.
    layout: Vec<Piece>,
    /// Ids of the fixed pieces: in encoder mode the pair template's special tokens
    /// (`num_special_tokens_to_add(pair=True)`, the truncation budget's share).
    fixed_len: usize,
    token_type_ids: bool,
    sep: Vec<i32>,
    default_prompt: u32,
}

impl Collator {
    /// A collator for `ds` with `options`; checks the options against the dataset.
    pub fn new(ds: &Dataset, options: CollateOptions) -> Result<Collator> {
        let facts = ds.manifest().tokenizer.as_ref();
        options.check()?;
        let tokenizer_pad = facts.and_then(|f| f.pad_id.or(f.unk_id).or(f.eos_id));
        let eos = facts.and_then(|f| f.eos_id);
        // A decoder tokenizer: it has an eos its single-sequence template does not end with.
        let decoder = eos.is_some() && !facts.is_some_and(embedder::ends_with_eos);
        let add_eos = options.mode == Mode::Embedder && options.add_eos.unwrap_or(decoder);
        if add_eos && eos.is_none() {
            return Err(Error::argument("add_eos", "the tokenizer has no eos token"));
        }
        let pad = options.pad_id.or(tokenizer_pad).ok_or_else(|| {
            Error::argument(
                "pad_id",
                "the tokenizer has no pad, unk or eos token: give a pad id",
            )
        })?;
        let side = options.padding_side.unwrap_or(match options.mode {
            Mode::Encoder => match facts.map(|f| f.padding_side.as_str()) {
                Some("left") => Side::Left,
                _ => Side::Right,
            },
            Mode::Llm => Side::Left,
            Mode::Matryoshka => Side::Right,
            Mode::Embedder if add_eos => Side::Left,
            Mode::Embedder => match facts.map(|f| f.padding_side.as_str()) {
                Some("left") => Side::Left,
                _ => Side::Right,
            },
        });
        let bos = facts
            .and_then(|f| f.bos_id)
            .filter(|&b| Some(b) != tokenizer_pad);
        let text = &ds.manifest().text;
        check_convention(text, options.mode)?;
        let layout: Vec<Piece> = match options.mode {
            Mode::Encoder => {
                let template = facts.map_or(&[][..], |f| f.pair_template.as_slice());
                if template.is_empty() {
                    vec![Piece::Query(0), Piece::Passage(0)]
                } else {
                    template
                        .iter()
                        .map(|p| match p {
                            TemplatePiece::Special { ids, type_id } => {
                                Piece::Fixed(ids.clone(), *type_id as u8)
                            }
                            TemplatePiece::Sequence { id, type_id } if id == "A" => {
                                Piece::Query(*type_id as u8)
                            }
                            TemplatePiece::Sequence { type_id, .. } => {
                                Piece::Passage(*type_id as u8)
                            }
                        })
                        .collect()
                }
            }
            Mode::Embedder => embedder::layout(facts, add_eos.then_some(eos).flatten()),
            Mode::Llm | Mode::Matryoshka => {
                let mut l: Vec<Piece> = bos.map(|b| Piece::Fixed(vec![b], 0)).into_iter().collect();
                l.extend([
                    Piece::Query(0),
                    Piece::SepKept,
                    Piece::Passage(0),
                    Piece::Fixed(text.sep_ids.clone(), 0),
                    Piece::Prompt,
                ]);
                l
            }
        };
        let fixed_len = layout
            .iter()
            .map(|p| match p {
                Piece::Fixed(ids, _) => ids.len(),
                _ => 0,
            })
            .sum();
        let budget = options.query_max_len + options.passage_max_len;
        if options.truncation == Truncation::LongestFirst && budget < fixed_len {
            return Err(Error::argument(
                "truncation",
                format!(
                    "longest_first cuts pairs to query_max_len + passage_max_len = {budget} \
                     tokens, fewer than the pair template's {fixed_len} special tokens"
                ),
            ));
        }
        Ok(Collator {
            // Decoders take no token_type_ids (their pair template may still type B as 1).
            token_type_ids: (options.mode == Mode::Encoder
                || options.mode == Mode::Embedder && !decoder)
                && facts.is_some_and(|f| f.has_token_type_ids),
            sep: text.sep_ids.clone(),
            default_prompt: match options.mode {
                Mode::Matryoshka => format::PROMPT_ID_MATRYOSHKA_DEFAULT,
                _ => format::PROMPT_ID_LLM_DEFAULT,
            },
            options,
            side,
            pad,
            bos: bos.is_some(),
            layout,
            fixed_len,
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
        if self.options.mode == Mode::Embedder {
            // A passage on its own (what length grouping measures in embedder mode).
            return self.single(passage, self.options.passage_max_len);
        }
        let c = self.cut(query.len(), passage.len(), prompt.len());
        Pair {
            layout: &self.layout,
            sep: &self.sep,
            query: &query[..c.query],
            passage: &passage[..c.passage],
            prompt: if c.prompt { prompt } else { &[] },
            sep_kept: c.sep_kept,
            len: c.len,
            query_length: c.query_length,
            prompt_length: c.prompt_length,
            overlong: c.overlong,
        }
    }

    /// The length of [`Collator::pair`] of a query, a passage and a prompt of these lengths
    /// (what length-grouped and token-budget plans measure, from lengths alone).
    pub fn pair_len(&self, query: usize, passage: usize, prompt: usize) -> usize {
        self.cut(query, passage, prompt).len
    }

    /// What the pair of a query, a passage and a prompt of these lengths keeps: the
    /// truncation rules of each mode, on lengths (so [`Collator::pair`] and
    /// [`Collator::pair_len`] cannot disagree).
    fn cut(&self, query: usize, passage: usize, prompt: usize) -> Cut {
        let (qm, pm) = (self.options.query_max_len, self.options.passage_max_len);
        let mut c = Cut {
            query: query.min(self.query_cap()),
            passage: passage.min(self.passage_cap()),
            ..Cut::default()
        };
        match self.options.mode {
            Mode::Embedder => {
                c.query = 0;
                c.passage = self.single_kept(passage, pm);
                c.len = self.fixed_len + c.passage;
            }
            Mode::Encoder if self.options.truncation == Truncation::LongestFirst => {
                let (a, b) =
                    longest_first(query, passage, (qm + pm).saturating_sub(self.fixed_len));
                (c.query, c.passage) = (a, b);
                c.len = self.fixed_len + a + b;
            }
            Mode::Encoder => {
                let total = c.query + c.passage + self.fixed_len;
                if total > qm + pm {
                    let r = total - (qm + pm);
                    if c.passage > r {
                        c.passage -= r;
                    } else {
                        c.overlong = true;
                    }
                }
                c.len = self.fixed_len + c.query + c.passage;
            }
            Mode::Llm | Mode::Matryoshka => {
                let s = self.sep.len();
                let a_len = self.bos as usize + c.query;
                let b_len = s + c.passage;
                let budget = (qm + pm) as i64 - prompt as i64 - s as i64;
                let mut keep_b = b_len;
                if (a_len + b_len) as i64 > budget {
                    let r = ((a_len + b_len) as i64 - budget) as usize;
                    if b_len > r {
                        keep_b = b_len - r;
                    } else {
                        c.overlong = true;
                    }
                }
                c.sep_kept = keep_b.min(s);
                c.passage = keep_b.saturating_sub(s);
                c.prompt = true;
                c.len = a_len + keep_b + s + prompt;
                c.query_length = a_len + s;
                c.prompt_length = s + prompt;
            }
        }
        c
    }

    /// The prompt tokens of a row (its own or the mode's default); empty in encoder mode.
    pub fn prompt_of<'d>(&self, ds: &'d Dataset, prompt: Option<u32>) -> Result<&'d [i32]> {
        if matches!(self.options.mode, Mode::Encoder | Mode::Embedder) {
            return Ok(&[]);
        }
        ds.prompt_tokens(prompt.unwrap_or(self.default_prompt))
    }

    /// The length the collator pads a group to on its own: its longest drawn pair (after
    /// truncation). Reads list lengths only (offsets), never tokens: cheap enough to compute
    /// for every group of a megabatch when batches are grouped by length.
    pub fn group_len(&self, ds: &Dataset, sel: &Selection) -> Result<usize> {
        Ok(self.group_tokens(ds, sel)?.0)
    }

    /// A selection's longest pair and the total tokens of its pairs (what token-budget batches
    /// count), from lengths only.
    pub fn group_tokens(&self, ds: &Dataset, sel: &Selection) -> Result<(usize, usize)> {
        let g = ds.group_ids(sel.row as usize)?;
        let mut ids = Vec::with_capacity(1 + sel.neg.len());
        self.drawn_tokens(ds, &g, sel.row, sel.pos, &sel.neg, &mut ids)
    }

    /// [`Collator::group_tokens`] of group `g` (row `row`) already read, for the positive
    /// `pos` and negatives `neg` drawn from it, with `ids` as scratch space for their passage
    /// ids: the plans call this once per row of an epoch (no allocation once `ids` has room).
    /// From lengths alone: each pair's is [`Collator::pair_len`].
    pub fn drawn_tokens(
        &self,
        ds: &Dataset,
        g: &GroupIds<'_>,
        row: u64,
        pos: u32,
        neg: &[u32],
        ids: &mut Vec<i32>,
    ) -> Result<(usize, usize)> {
        let prompt = self.prompt_of(ds, g.prompt)?.len();
        ids.clear();
        ids.push(pick(g.pos, pos, row, "positive")?);
        for &j in neg {
            ids.push(pick(g.neg, j, row, "negative")?);
        }
        let (mut longest, mut total) = (0, 0);
        for &id in ids.iter() {
            let l = self.pair_len(g.query.len(), ds.referenced_passage(id)?.len(), prompt);
            longest = longest.max(l);
            total += l;
        }
        Ok((longest, total))
    }

    /// The pairs of one selection (positive first), as the model sees them before padding.
    pub fn pairs<'a>(&'a self, ds: &'a Dataset, sel: &Selection) -> Result<Vec<Pair<'a>>> {
        let r = self.resolve(ds, std::slice::from_ref(sel), false)?;
        Ok(self.build_pairs(&r, std::slice::from_ref(sel)))
    }

    /// Teacher scores of one selection: `[pos_scores[p]] + [neg_scores[j] for j in negs]`.
    pub fn scores(&self, ds: &Dataset, sel: &Selection) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(1 + sel.neg.len());
        push_scores(
            &ds.group(sel.row as usize)?,
            sel,
            self.options.seed_scores(),
            &mut out,
        )?;
        Ok(out)
    }

    /// Longest passage prefix a pair can use.
    fn passage_cap(&self) -> usize {
        let (qm, pm) = (self.options.query_max_len, self.options.passage_max_len);
        match self.options.truncation {
            Truncation::LongestFirst => usize::MAX, // see query_cap
            Truncation::FlagEmbedding => pm + qm / 2,
        }
    }

    /// Longest query prefix a pair can use (the rest is cut in every mode).
    fn query_cap(&self) -> usize {
        let (qm, pm) = (self.options.query_max_len, self.options.passage_max_len);
        if self.options.truncation == Truncation::LongestFirst {
            // The rule compares the whole lengths: no cap before it.
            return usize::MAX;
        }
        match self.options.mode {
            Mode::Matryoshka | Mode::Embedder => qm,
            _ => qm + pm / 4,
        }
    }

    /// Everything the pairs of `selections` read, located in two stages of independent loads
    /// with prefetching in between, so the cache misses of a batch's scattered reads overlap:
    /// 1. each group (its passage ids, query, prompt, and scores when `scores`), prefetching
    ///    the list offsets of every passage it selects and the query tokens;
    /// 2. each passage's token slice (its offsets now cached; the tokens themselves are
    ///    prefetched a few pairs ahead of the copy, in `grids`).
    fn resolve<'d>(
        &self,
        ds: &'d Dataset,
        selections: &[Selection],
        scores: bool,
    ) -> Result<Resolved<'d>> {
        let n: usize = selections.iter().map(|s| 1 + s.neg.len()).sum();
        let mut ids = Vec::with_capacity(n);
        let mut queries = Vec::with_capacity(selections.len());
        let mut out_scores = scores.then(|| Vec::with_capacity(n));
        let q_cap = self.query_cap();
        // What a query prefetches: at most the pair budget (uncapped under longest_first).
        let q_prefetch = self.options.query_max_len + self.options.passage_max_len;
        for sel in selections {
            let row = sel.row as usize;
            let group = match out_scores.as_mut() {
                Some(out) => {
                    let g = ds.group(row)?;
                    push_scores(&g, sel, self.options.seed_scores(), out)?;
                    GroupIds {
                        query: g.query,
                        pos: g.pos,
                        neg: g.neg,
                        prompt: g.prompt,
                    }
                }
                None => ds.group_ids(row)?,
            };
            let first = ids.len();
            push_ids(&group, sel, &mut ids)?;
            for &id in &ids[first..] {
                ds.prefetch_passage(id);
            }
            let query = &group.query[..group.query.len().min(q_cap)];
            storage::prefetch(&query[..query.len().min(q_prefetch)]);
            queries.push((query, self.prompt_of(ds, group.prompt)?));
        }
        let passages = ids
            .iter()
            .map(|&id| ds.referenced_passage(id))
            .collect::<Result<Vec<_>>>()?;
        Ok(Resolved {
            queries,
            passages,
            scores: out_scores,
        })
    }

    /// The pairs of resolved `selections`, in batch order.
    fn build_pairs<'a>(&'a self, r: &Resolved<'a>, selections: &[Selection]) -> Vec<Pair<'a>> {
        let mut pairs = Vec::with_capacity(r.passages.len());
        let mut passages = r.passages.iter();
        for (sel, &(query, prompt)) in selections.iter().zip(&r.queries) {
            for p in passages.by_ref().take(1 + sel.neg.len()) {
                pairs.push(self.pair(query, p, prompt));
            }
        }
        pairs
    }

    /// Collate `selections` (each with exactly group_size - 1 negatives) from `ds`.
    pub fn collate(&self, ds: &Dataset, selections: Vec<Selection>) -> Result<Batch> {
        let g = self.options.group_size;
        let rows = selections.len() * g;
        if let Some(sel) = selections.iter().find(|s| s.neg.len() + 1 != g) {
            return Err(Error::argument(
                "selections",
                format!(
                    "row {}: a selection needs {} negatives, got {}",
                    sel.row,
                    g - 1,
                    sel.neg.len()
                ),
            ));
        }
        let resolved = self.resolve(ds, &selections, self.options.teacher_scores())?;
        if self.options.mode == Mode::Embedder {
            return Ok(self.collate_embedder(resolved, selections));
        }
        let pairs = self.build_pairs(&resolved, &selections);
        debug_assert_eq!(pairs.len(), rows);
        let mut batch = self.collate_pairs(&pairs);
        batch.teacher_scores = resolved.scores;
        batch.selections = selections;
        Ok(batch)
    }

    /// Padded (or, with `packed`, packed) arrays of `pairs` as they are, one row each: what
    /// [`Collator::collate`] returns without the groups' bookkeeping (no selections, no
    /// teacher scores). Teacher scoring ([`crate::score`]) collates unique pairs with it.
    pub fn collate_pairs(&self, pairs: &[Pair<'_>]) -> Batch {
        let longest = pairs.iter().map(Pair::len).max().unwrap_or(0);
        let len = match self.options.pad_to_multiple_of {
            Some(m) => longest.div_ceil(m) * m,
            None => longest,
        };
        let matryoshka = self.options.mode == Mode::Matryoshka;
        let lengths = |f: fn(&Pair<'_>) -> usize| self.ids_from(pairs.iter().map(|p| f(p) as i64));
        if self.options.packed {
            let mut batch = self.pack(pairs);
            batch.query_lengths = matryoshka.then(|| lengths(|p| p.query_length));
            batch.prompt_lengths = matryoshka.then(|| lengths(|p| p.prompt_length));
            return batch;
        }
        let (input_ids, attention_mask, token_type_ids) = self.padded_arrays(pairs, len);
        Batch {
            rows: pairs.len(),
            len,
            input_ids,
            attention_mask,
            token_type_ids,
            teacher_scores: None,
            query_lengths: matryoshka.then(|| lengths(|p| p.query_length)),
            prompt_lengths: matryoshka.then(|| lengths(|p| p.prompt_length)),
            real_tokens: pairs.iter().map(|p| p.len as u64).sum(),
            overlong: pairs.iter().filter(|p| p.overlong).count() as u32,
            selections: Vec::new(),
            position_ids: None,
            cu_seqlens: None,
            embedder: None,
            no_in_batch_neg: false,
        }
    }

    fn ids_from(&self, values: impl Iterator<Item = i64>) -> Ids {
        match self.options.id_type {
            IdType::I64 => Ids::I64(values.collect()),
            IdType::I32 => Ids::I32(values.map(|v| v as i32).collect()),
        }
    }
}

/// Instructions are baked into the ids at conversion, from the row fields of one kind of
/// training ([`format::Convention`]): with an instruction configured, a dataset serves only
/// that kind.
fn check_convention(text: &format::TextSettings, mode: Mode) -> Result<()> {
    let wants = match mode {
        Mode::Embedder => format::Convention::Embedder,
        _ => format::Convention::Reranker,
    };
    let instructed = text.query_instruction.is_some() || text.passage_instruction.is_some();
    if instructed && text.convention != wants {
        let name = |c: format::Convention| match c {
            format::Convention::Reranker => "reranker",
            format::Convention::Embedder => "embedder",
        };
        return Err(Error::argument(
            "mode",
            format!(
                "this dataset was converted with an instruction and the {} row fields for \
                 per-row instructions; {mode:?} mode reads the {} fields (rerankers: \
                 query_prompt/passage_prompt; embedders: prompt). Convert again with \
                 --convention {} (Python: convention=\"{}\"); without instructions one \
                 dataset serves both",
                name(text.convention),
                name(wants),
                name(wants),
                name(wants)
            ),
        ));
    }
    Ok(())
}

/// What the pairs of some selections read, located (see [`Collator::resolve`]).
struct Resolved<'d> {
    /// Per selection: the query (cut to the longest prefix a pair uses) and the prompt.
    queries: Vec<(&'d [i32], &'d [i32])>,
    /// Per pair, in batch order: the passage (whole; [`Collator::pair`] cuts it).
    passages: Vec<&'d [i32]>,
    /// Per pair: the teacher score, when asked.
    scores: Option<Vec<f32>>,
}

/// Append the passage ids `sel` picks from its `group`, positive first.
#[inline]
fn push_ids(group: &GroupIds<'_>, sel: &Selection, ids: &mut Vec<i32>) -> Result<()> {
    ids.push(pick(group.pos, sel.pos, sel.row, "positive")?);
    for &j in &sel.neg {
        ids.push(pick(group.neg, j, sel.row, "negative")?);
    }
    Ok(())
}

/// `list[i]`, or an error naming the row.
fn pick(list: &[i32], i: u32, row: u64, what: &str) -> Result<i32> {
    list.get(i as usize).copied().ok_or_else(|| {
        Error::argument(
            "selections",
            format!(
                "row {row}: {what} index {i} out of range (the row has {})",
                list.len()
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::longest_first;
    use crate::sample::KeyedRng;
    use tokenizers::utils::truncation::{
        truncate_encodings, TruncationDirection, TruncationParams, TruncationStrategy,
    };
    use tokenizers::{Encoding, Token};

    fn encoding(n: usize) -> Encoding {
        let tokens = (0..n)
            .map(|i| Token::new(i as u32, String::new(), (0, 0)))
            .collect();
        Encoding::from_tokens(tokens, 0)
    }

    /// `longest_first` is the `tokenizers` crate's own rule: a seeded generator over the two
    /// lengths and the budget (small values, where the cases meet, and large ones).
    #[test]
    fn longest_first_is_the_tokenizers_rule() {
        let long: u64 = std::env::var("RANKFEED_LONG")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1);
        let cases = 20_000 * long.max(1);
        let mut rng = KeyedRng::new(&[0x10f1]);
        for i in 0..cases {
            let scale = [4u64, 16, 64, 600][(i % 4) as usize];
            let (a, b, budget) = (
                rng.below(scale) as usize,
                rng.below(scale) as usize,
                rng.below(scale) as usize,
            );
            let params = TruncationParams {
                max_length: budget,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            };
            let (x, y) = truncate_encodings(encoding(a), Some(encoding(b)), &params).unwrap();
            let want = (x.get_ids().len(), y.unwrap().get_ids().len());
            assert_eq!(
                longest_first(a, b, budget),
                want,
                "a={a} b={b} budget={budget}"
            );
        }
    }
}
