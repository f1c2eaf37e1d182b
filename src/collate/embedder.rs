//! Embedder batches (bi-encoders: bge, e5, decoder embedders), as FlagEmbedding's
//! `AbsEmbedderTrainDataset` + `AbsEmbedderCollator` make them.
//!
//! - Each query and each passage is one sequence: its ids cut to `max_len - specials` (the
//!   query's `query_max_len`, the passage's `passage_max_len`; `specials` the single-sequence
//!   template's special tokens), then the tokenizer's single-sequence template around them
//!   (BERT `[CLS] x [SEP]` with token_type_ids 0, XLM-R `<s> x </s>`). Decoder embedders append
//!   eos as well (`add_eos_token=True`): `<s> x </s>`, padded on the left with the pad token,
//!   else unk, else eos.
//! - Queries `[B, Lq]` and passages `[B*G, Lp]` (row `b*G + g`, g = 0 the positive) are padded
//!   separately, each to its own longest sequence rounded up to `pad_to_multiple_of`.
//! - With `sub_batch_size = k > 0` each is cut into chunks of `k` consecutive rows, and each
//!   chunk is padded to its own longest sequence.
//! - Teacher scores (knowledge distillation) by index, flat `[B*G]`.

use super::{Batch, Collator, Ids, Pair, Piece, Resolved};
use crate::format::{TemplatePiece, TokenizerFacts};
use crate::sample::Selection;

/// Padded sequences: `[rows, len]` arrays.
#[derive(Debug, Clone, PartialEq)]
pub struct Padded {
    /// Sequences.
    pub rows: usize,
    /// Padded length.
    pub len: usize,
    /// `[rows, len]`.
    pub input_ids: Ids,
    /// `[rows, len]`, when asked for.
    pub attention_mask: Option<Ids>,
    /// `[rows, len]`, for tokenizers that have them.
    pub token_type_ids: Option<Ids>,
}

impl Padded {
    fn nbytes(&self) -> usize {
        self.input_ids.nbytes()
            + self.attention_mask.as_ref().map_or(0, Ids::nbytes)
            + self.token_type_ids.as_ref().map_or(0, Ids::nbytes)
    }
}

/// The arrays of an embedder batch.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbedderArrays {
    /// The queries: one chunk, or one per `sub_batch_size` rows.
    pub queries: Vec<Padded>,
    /// The passages, row `b*G + g`: one chunk, or one per `sub_batch_size` rows.
    pub passages: Vec<Padded>,
    /// Whether the batch is cut into sub-batches (each key then holds a list of arrays).
    pub sub_batched: bool,
}

impl EmbedderArrays {
    /// Bytes of all arrays.
    pub fn nbytes(&self) -> usize {
        self.queries
            .iter()
            .chain(&self.passages)
            .map(Padded::nbytes)
            .sum()
    }

    /// Cells of all arrays (real tokens and padding).
    pub fn cells(&self) -> usize {
        self.queries
            .iter()
            .chain(&self.passages)
            .map(|p| p.rows * p.len)
            .sum()
    }
}

/// Whether the tokenizer's single-sequence template already ends with its eos token (BERT
/// has no eos, XLM-R ends with `</s>`; Llama/Mistral-style decoders do not).
pub fn ends_with_eos(facts: &TokenizerFacts) -> bool {
    match (facts.single_template.last(), facts.eos_id) {
        (Some(TemplatePiece::Special { ids, .. }), Some(eos)) => ids.last() == Some(&eos),
        _ => false,
    }
}

/// The single-sequence layout: the template's pieces, then eos when given.
pub(super) fn layout(facts: Option<&TokenizerFacts>, eos: Option<i32>) -> Vec<Piece> {
    let template = facts.map_or(&[][..], |f| f.single_template.as_slice());
    let mut l: Vec<Piece> = if template.is_empty() {
        vec![Piece::Passage(0)]
    } else {
        template
            .iter()
            .map(|p| match p {
                TemplatePiece::Special { ids, type_id } => {
                    Piece::Fixed(ids.clone(), *type_id as u8)
                }
                // The sequence sits in the `passage` slot, which the grids prefetch.
                TemplatePiece::Sequence { type_id, .. } => Piece::Passage(*type_id as u8),
            })
            .collect()
    };
    if let Some(eos) = eos {
        l.push(Piece::Fixed(vec![eos], 0));
    }
    l
}

impl Collator {
    /// The tokens a sequence of `n` keeps in [`Collator::single`] of `max_len`.
    pub(super) fn single_kept(&self, n: usize, max_len: usize) -> usize {
        n.min(max_len.saturating_sub(self.fixed_len))
    }

    /// One sequence on its own: `ids` cut to `max_len` minus the special tokens, in the
    /// single-sequence layout.
    pub fn single<'a>(&'a self, ids: &'a [i32], max_len: usize) -> Pair<'a> {
        let content = &ids[..self.single_kept(ids.len(), max_len)];
        Pair {
            layout: &self.layout,
            sep: &[],
            query: &[],
            passage: content,
            prompt: &[],
            sep_kept: 0,
            len: self.fixed_len + content.len(),
            query_length: 0,
            prompt_length: 0,
            overlong: false,
        }
    }

    /// The embedder batch of resolved `selections`.
    pub(super) fn collate_embedder(&self, r: Resolved<'_>, selections: Vec<Selection>) -> Batch {
        let (qm, pm) = (self.options.query_max_len, self.options.passage_max_len);
        let queries: Vec<Pair<'_>> = r.queries.iter().map(|&(q, _)| self.single(q, qm)).collect();
        let passages: Vec<Pair<'_>> = r.passages.iter().map(|p| self.single(p, pm)).collect();
        let k = self.options.sub_batch_size.filter(|&k| k > 0);
        let chunks = |seqs: &[Pair<'_>]| -> Vec<Padded> {
            if seqs.is_empty() {
                return vec![self.padded(seqs)];
            }
            seqs.chunks(k.unwrap_or(seqs.len()))
                .map(|c| self.padded(c))
                .collect()
        };
        let real: usize = queries.iter().chain(&passages).map(Pair::len).sum();
        let arrays = EmbedderArrays {
            queries: chunks(&queries),
            passages: chunks(&passages),
            sub_batched: k.is_some(),
        };
        Batch {
            rows: passages.len(),
            len: arrays.passages.iter().map(|p| p.len).max().unwrap_or(0),
            input_ids: self.ids_from(std::iter::empty()),
            attention_mask: None,
            token_type_ids: None,
            teacher_scores: r.scores,
            query_lengths: None,
            prompt_lengths: None,
            selections,
            real_tokens: real as u64,
            overlong: 0,
            position_ids: None,
            cu_seqlens: None,
            embedder: Some(arrays),
            no_in_batch_neg: false,
        }
    }

    /// `seqs` padded to their longest, rounded up to `pad_to_multiple_of`.
    fn padded(&self, seqs: &[Pair<'_>]) -> Padded {
        let longest = seqs.iter().map(Pair::len).max().unwrap_or(0);
        let len = match self.options.pad_to_multiple_of {
            Some(m) => longest.div_ceil(m) * m,
            None => longest,
        };
        let (input_ids, attention_mask, token_type_ids) = self.padded_arrays(seqs, len);
        Padded {
            rows: seqs.len(),
            len,
            input_ids,
            attention_mask,
            token_type_ids,
        }
    }
}
