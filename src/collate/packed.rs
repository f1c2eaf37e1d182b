//! Padding-free packed batches: the layout flash-attn's varlen kernels and Hugging Face's
//! `DataCollatorWithFlattening` consume. The pairs of a batch, each exactly as the padded
//! layout would hold it without its padding, are concatenated:
//!
//! - `input_ids [T]`: all pairs, pair `b*G + g` is sequence `b*G + g` (scores still reshape to
//!   `[B, G]`, the positive in column 0);
//! - `cu_seqlens [B*G + 1]` (int32): where each pair starts, then `T` (`cu_seqlens_q ==
//!   cu_seqlens_k` for flash-attn);
//! - `position_ids [T]`: restart at 0 in each pair;
//! - `token_type_ids [T]`: when the tokenizer has them;
//! - no `attention_mask` and no pad token: every element is a real token (attention must stay
//!   within a pair: a block-diagonal mask, or the varlen kernels given `cu_seqlens`).
//!
//! `max_seqlen` is the longest pair: `max(cu_seqlens[i+1] - cu_seqlens[i])`.

use super::{Batch, Collator, IdElem, IdType, Ids, Pair};

impl Collator {
    /// The packed batch of `pairs` (scores, lengths and selections are set by the caller).
    pub(super) fn pack(&self, pairs: &[Pair<'_>]) -> Batch {
        let (input_ids, position_ids, token_type_ids) = match self.options.id_type {
            IdType::I64 => {
                let (i, p, t) = self.flat::<i64>(pairs);
                (Ids::I64(i), Ids::I64(p), t.map(Ids::I64))
            }
            IdType::I32 => {
                let (i, p, t) = self.flat::<i32>(pairs);
                (Ids::I32(i), Ids::I32(p), t.map(Ids::I32))
            }
        };
        let mut cu_seqlens = Vec::with_capacity(pairs.len() + 1);
        cu_seqlens.push(0i32);
        let mut total = 0usize;
        for p in pairs {
            total += p.len();
            cu_seqlens.push(total as i32);
        }
        Batch {
            rows: pairs.len(),
            len: total,
            input_ids,
            attention_mask: None,
            token_type_ids,
            teacher_scores: None,
            query_lengths: None,
            prompt_lengths: None,
            selections: Vec::new(),
            real_tokens: total as u64,
            overlong: pairs.iter().filter(|p| p.overlong).count() as u32,
            position_ids: Some(position_ids),
            cu_seqlens: Some(cu_seqlens),
            embedder: None,
            no_in_batch_neg: false,
        }
    }

    /// input_ids, position_ids and (as asked) token_type_ids, `[T]` each.
    #[allow(clippy::type_complexity)]
    fn flat<T: IdElem>(&self, pairs: &[Pair<'_>]) -> (Vec<T>, Vec<T>, Option<Vec<T>>) {
        let total: usize = pairs.iter().map(Pair::len).sum();
        let mut ids: Vec<T> = Vec::with_capacity(total);
        let mut positions: Vec<T> = Vec::with_capacity(total);
        let mut types: Option<Vec<T>> = self.token_type_ids.then(|| Vec::with_capacity(total));
        let longest = pairs.iter().map(Pair::len).max().unwrap_or(0);
        let counting: Vec<T> = (0..longest as i32).map(T::from_i32).collect();
        for pair in pairs {
            pair.for_each_segment(|seg, type_id| {
                ids.extend(seg.iter().map(|&v| T::from_i32(v)));
                if let Some(t) = types.as_mut() {
                    t.resize(t.len() + seg.len(), T::from_i32(type_id as i32));
                }
            });
            positions.extend_from_slice(&counting[..pair.len()]);
        }
        (ids, positions, types)
    }
}

impl Batch {
    /// The longest pair of a packed batch (`max_seqlen`); the padded length otherwise.
    pub fn max_seqlen(&self) -> usize {
        match &self.cu_seqlens {
            Some(cu) => cu
                .windows(2)
                .map(|w| (w[1] - w[0]) as usize)
                .max()
                .unwrap_or(0),
            None => self.len,
        }
    }
}
