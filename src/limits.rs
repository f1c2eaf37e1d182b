//! Upper bounds on the numeric settings of the collator and the loader, checked before
//! anything is allocated: a setting beyond them is an [`Error::Argument`] naming it, never an
//! allocation that aborts the process (or the Python interpreter).

use crate::error::{Error, Result};

/// Largest `batch_size`.
pub const BATCH_SIZE: usize = 1 << 20;
/// Largest token id + 1 the BM25 index of `rankfeed mine` accepts (its per-term tables are
/// sized by it: 20 bytes a term, 320 MB at this bound).
pub const MINE_VOCAB: usize = 1 << 24;
/// Largest `range_max` of `rankfeed mine` (candidates ranked per row).
pub const MINE_RANGE: usize = 1 << 20;
/// Largest `group_size`.
pub const GROUP_SIZE: usize = 1 << 16;
/// Largest `query_max_len` and `passage_max_len`.
pub const MAX_LEN: usize = 1 << 20;
/// Largest `pad_to_multiple_of`.
pub const PAD_TO_MULTIPLE_OF: usize = 1 << 16;
/// Largest `world_size` (a padded epoch holds at least one row per rank).
pub const WORLD_SIZE: u64 = 1 << 20;
/// Largest `prefetch_threads`.
pub const PREFETCH_THREADS: usize = 256;
/// Largest length-grouping megabatch multiplier.
pub const MEGABATCH_MULT: usize = 1 << 16;
/// Largest `max_tokens`.
pub const MAX_TOKENS: usize = 1 << 40;
/// Largest epoch a loader starts or resumes at (far beyond any run; keeps `epoch + 1` from
/// wrapping around).
pub const EPOCH: u64 = 1 << 48;
/// Largest `prefetch_depth`.
pub const PREFETCH_DEPTH: usize = 4096;
/// Largest size of one batch's arrays (an upper estimate from the settings), in bytes.
pub const BATCH_BYTES: u64 = 8 << 30;
/// Largest size of the batches computed ahead (`prefetch_depth` batches), in bytes.
pub const PREFETCH_BYTES: u64 = 32 << 30;

/// `Ok` when `lo <= v <= hi`, else an [`Error::Argument`] naming the setting.
pub fn range(name: &'static str, v: usize, lo: usize, hi: usize) -> Result<()> {
    if v < lo || v > hi {
        Err(Error::argument(name, format!("{v} is outside {lo}..={hi}")))
    } else {
        Ok(())
    }
}
