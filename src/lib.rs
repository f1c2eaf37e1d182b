//! rankfeed: pre-tokenized, memory-mapped, deduplicated datasets for reranker and embedder
//! training, and bit-exact batch collation straight from the mapped buffers.
//!
//! The pipeline, one module per layer (arrows point down only):
//!
//! ```text
//!   convert  (JSON/JSONL/Parquet sources -> check rows -> format -> dedup -> tokenize)
//!   import / merge / export (Parquet in and out; shards joined)
//!      |
//!   writer   (token ids -> Arrow IPC files + sealed manifest)
//!   publish  (staging directory -> output path: atomic swap, fsync, stale cleanup)
//!      |
//!   loader (prefetch, resumable state) -> collate (pure compute) <- sample (pure functions)
//!      |
//!   dataset  (open + validate; typed zero-copy views of groups, passages, prompts)
//!      |
//!   format   (the on-disk layout and manifest; no I/O)      storage (mmap, prefetch; the only unsafe)
//!   remote   (feature `remote`: datasets in object storage, through a verified local cache)
//!   ipc      (Arrow IPC file layout parsed with every offset checked)
//! ```
//!
//! - [`convert::convert`] turns FlagEmbedding-style JSON lines into a dataset directory.
//! - [`Dataset::open`] maps it in time independent of its size and hands out `&[i32]` views.
//! - [`tokenizer::TextTokenizer`] loads a `tokenizer.json` and reads the special-token facts
//!   that pair building needs.
//! - [`loader::Loader`] yields [`collate::Batch`]es, bit-identical to FlagEmbedding's.
//! - [`export::export`], [`import::import`], [`merge::merge`]: Parquet and shards.
//! - [`score`]: teacher scores of every unique (query, passage) pair, attached to a new dataset.
//! - `remote::open` / `remote::upload` (feature `remote`): datasets at `s3://` URLs.

#![deny(missing_docs)]

pub mod audit;
pub mod collate;
pub mod convert;
pub mod dataset;
pub mod discover;
pub mod error;
pub mod export;
pub mod format;
pub mod import;
mod ipc;
pub mod limits;
pub mod loader;
pub mod merge;
pub mod mine;
pub mod options;
pub mod parquet_read;
pub mod publish;
#[cfg(feature = "remote")]
pub mod remote;
pub mod sample;
pub mod score;
pub mod stats;
pub mod storage;
pub mod tokenizer;
pub mod writer;

pub use dataset::{Dataset, Group, GroupIds};
pub use error::{Error, InputPosition, RejectReason, Result, RowError};
pub use format::Manifest;

/// The README's Rust blocks, run as doctests (`cargo test --doc`).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
