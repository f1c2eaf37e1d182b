//! Every loader setting, defined once: [`Options`].
//!
//! [`Options`] is the flat form every front-end speaks: the keywords of Python's
//! `Dataset.loader(**options)`, the CLI's `--flags` (with the `cli` feature, clap derives them
//! from this struct and its doc comments), and the settings a checkpoint stores (serde,
//! snake_case names, stable value spellings such as `"encoder"` or `"pad"`). Nothing else
//! lists the settings: Python's signature, docstring and stubs, the CLI's help and the
//! README's table are derived from it or checked against it by tests.
//!
//! [`Options::resolve`] turns it into the typed [`LoaderOptions`] the library runs on (one
//! [`Strategy`] enum instead of flags that exclude each other, per-source values in the
//! manifest's order); [`LoaderOptions::options`] is the inverse, so a checkpoint written from
//! a loader names exactly what a user would pass to get the same batches.
//!
//! `prefetch_threads` and `prefetch_depth` decide when batches are computed, never what they
//! hold: they are options, but not settings (a checkpoint leaves them out).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::collate::{CollateOptions, IdType, Mode, Side, Truncation};
use crate::error::{Error, Result};
use crate::format::SourceStats;
use crate::loader::{LoaderOptions, Strategy};
use crate::sample::{Shard, Tail};

/// A value per source: a list in the manifest's source order, or a map keyed by a source's path
/// as converted or its file name (CLI: `1,2,3` or `a.jsonl=1,b.jsonl=2`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerSource<T> {
    /// One value per source, in the manifest's order.
    List(Vec<T>),
    /// Values by source path or file name; every source needs one.
    Map(BTreeMap<String, T>),
}

impl<T: std::str::FromStr> std::str::FromStr for PerSource<T>
where
    T::Err: std::fmt::Display,
{
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let item = |v: &str| v.trim().parse::<T>().map_err(|e| format!("{v:?}: {e}"));
        if s.contains('=') {
            let mut map = BTreeMap::new();
            for kv in s.split(',') {
                let (k, v) = kv
                    .split_once('=')
                    .ok_or_else(|| format!("{kv:?}: expected source=value"))?;
                if map.insert(k.trim().to_string(), item(v)?).is_some() {
                    return Err(format!("{:?} is given twice", k.trim()));
                }
            }
            Ok(PerSource::Map(map))
        } else {
            s.split(',')
                .map(item)
                .collect::<std::result::Result<_, _>>()
                .map(PerSource::List)
        }
    }
}

impl<T: Clone> PerSource<T> {
    /// One value per source of `sources`, in their order; `name` is the setting, for errors.
    pub fn resolve(&self, name: &'static str, sources: &[SourceStats]) -> Result<Vec<T>> {
        let map = match self {
            PerSource::List(v) => return Ok(v.clone()),
            PerSource::Map(m) => m,
        };
        let file_name = |p: &str| {
            std::path::Path::new(p)
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
        };
        let known: Vec<&str> = sources.iter().map(|s| s.path.as_str()).collect();
        let mut out: Vec<Option<T>> = vec![None; sources.len()];
        let mut by: Vec<Option<&str>> = vec![None; sources.len()];
        for (k, v) in map {
            let i = match sources.iter().position(|s| &s.path == k) {
                Some(i) => i,
                None => {
                    // A file name must name one source.
                    let hits: Vec<usize> = (0..sources.len())
                        .filter(|&i| file_name(&sources[i].path).as_deref() == Some(k))
                        .collect();
                    match hits[..] {
                        [i] => i,
                        [] => {
                            return Err(Error::argument(
                                name,
                                format!(
                                    "{k:?} is not a source of this dataset (sources: {known:?})"
                                ),
                            ))
                        }
                        _ => {
                            let which: Vec<&str> = hits.iter().map(|&i| known[i]).collect();
                            return Err(Error::argument(
                                name,
                                format!("{k:?} is the file name of several sources ({which:?}): key them by path"),
                            ));
                        }
                    }
                }
            };
            if let Some(first) = by[i] {
                return Err(Error::argument(
                    name,
                    format!(
                        "{first:?} and {k:?} both name the source {:?}: give it one value",
                        known[i]
                    ),
                ));
            }
            by[i] = Some(k);
            out[i] = Some(v.clone());
        }
        out.into_iter()
            .zip(sources)
            .map(|(v, s)| {
                v.ok_or_else(|| Error::argument(name, format!("no value for source {:?}", s.path)))
            })
            .collect()
    }
}

/// Every loader option, flat (see the module docs). `Options::default()` is the library's
/// default for each; a front-end that leaves an option out gets it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
#[serde(default, deny_unknown_fields)]
pub struct Options {
    /// Queries (groups) per batch and rank; with max_tokens, at most this many.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = Options::DEFAULT.batch_size))]
    pub batch_size: usize,
    /// Pairs per group: 1 positive and group_size-1 negatives (FlagEmbedding's train_group_size).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = Options::DEFAULT.group_size))]
    pub group_size: usize,
    /// Pair layout: "encoder" (cross-encoders: the tokenizer's pair template), "llm" (decoder
    /// rerankers), "matryoshka" (the Matryoshka reranker's layout, with query_lengths and
    /// prompt_lengths) or "embedder" (bi-encoders: queries and passages each on their own, keys
    /// query_* and passage_*, plus no_in_batch_neg).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = Options::DEFAULT.mode))]
    pub mode: Mode,
    /// Token budget of a query (truncated as FlagEmbedding).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = Options::DEFAULT.query_max_len))]
    pub query_max_len: usize,
    /// Token budget of a passage (truncated as FlagEmbedding).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = Options::DEFAULT.passage_max_len))]
    pub passage_max_len: usize,
    /// How encoder pairs are cut to query_max_len + passage_max_len tokens: "flag_embedding"
    /// (the query to its own budget first, then the passage: FlagEmbedding's rerankers) or
    /// "longest_first" (Hugging Face tokenizers' rule: the longer side first; what
    /// sentence-transformers' CrossEncoder does).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = Options::DEFAULT.truncation))]
    pub truncation: Truncation,
    /// Round the padded length up to a multiple of this (at most 65536).
    #[cfg_attr(feature = "cli", arg(long))]
    pub pad_to_multiple_of: Option<usize>,
    /// "left" or "right" (default: the tokenizer's for encoder and embedder, left for llm and
    /// for embedders that append eos, right for matryoshka).
    #[cfg_attr(feature = "cli", arg(long))]
    pub padding_side: Option<Side>,
    /// Pad id (default: the tokenizer's pad, else unk, else eos).
    #[cfg_attr(feature = "cli", arg(long))]
    pub pad_id: Option<i32>,
    /// int32 id arrays instead of int64 (half the bytes).
    #[cfg_attr(feature = "cli", arg(long))]
    pub int32: bool,
    /// Produce attention_mask (false: leave it out).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = true, action = clap::ArgAction::Set))]
    pub attention_mask: bool,
    /// Gather teacher scores into teacher_scores (every row needs pos_scores and neg_scores).
    #[cfg_attr(feature = "cli", arg(long))]
    pub knowledge_distillation: bool,
    /// Matryoshka mode: teacher scores by index as the other modes, instead of the seed code's
    /// rule (the score of the first passage with the same text).
    #[cfg_attr(feature = "cli", arg(long))]
    pub matryoshka_scores_by_index: bool,
    /// Padding-free batches for the pair modes: input_ids [T], position_ids [T],
    /// token_type_ids [T], cu_seqlens [B*G+1] int32, max_seqlen; no attention_mask
    /// (flash-attn varlen's layout).
    #[cfg_attr(feature = "cli", arg(long))]
    pub packed: bool,
    /// Embedder mode: each id and mask key a list of arrays, one per chunk of this many rows,
    /// each padded to its own longest (0 is refused; unset: one chunk).
    #[cfg_attr(feature = "cli", arg(long))]
    pub sub_batch_size: Option<usize>,
    /// Embedder mode: append eos to every sequence (default: on for tokenizers whose single
    /// template does not end with eos: decoders).
    #[cfg_attr(feature = "cli", arg(long))]
    pub add_eos: Option<bool>,
    /// Seed of every random choice (order, negatives, subsets).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = Options::DEFAULT.seed))]
    pub seed: u64,
    /// This process's rank (0-based).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = Options::DEFAULT.rank))]
    pub rank: u64,
    /// Number of ranks sharing each epoch.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = Options::DEFAULT.world_size))]
    pub world_size: u64,
    /// Rows that do not divide among the ranks: "pad" (repeat rows from the start, as torch's
    /// DistributedSampler), "drop", or "uneven" (every row exactly once; for DataLoader
    /// workers, not DDP ranks).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = Options::DEFAULT.shard_tail))]
    pub shard_tail: Tail,
    /// Shuffle rows each epoch (false: the stored order).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = true, action = clap::ArgAction::Set))]
    pub shuffle: bool,
    /// Drop each epoch's last incomplete batch (same_source: each source's last partial global
    /// batch; refused with max_tokens, whose batches vary by design).
    #[cfg_attr(feature = "cli", arg(long))]
    pub drop_last: bool,
    /// Rows each larger source gives an epoch: a new seeded subset each epoch.
    #[cfg_attr(feature = "cli", arg(long))]
    pub max_example_num_per_dataset: Option<u64>,
    /// Leave out rows with no negatives (otherwise an error when group_size >= 2).
    #[cfg_attr(feature = "cli", arg(long, alias = "skip-empty-neg"))]
    pub skip_rows_without_negatives: bool,
    /// Never draw a negative that is one of the row's positives (the same passage after dedup;
    /// `rankfeed audit` counts them): negatives come from the row's others. Rows left with none
    /// count as rows without negatives.
    #[cfg_attr(feature = "cli", arg(long))]
    pub exclude_false_negatives: bool,
    /// Mixing weights, one per source (a list in the manifest's source order, or keyed by a
    /// source's path or file name): an epoch keeps its length and source s gives
    /// weights[s]/sum of it (fewer rows than it has: a new seeded subset each epoch; more:
    /// whole copies plus a subset). Finite, >= 0, not all 0.
    #[cfg_attr(feature = "cli", arg(long))]
    pub weights: Option<PerSource<f64>>,
    /// Length-grouped batches: megabatches of M*batch_size groups sorted by the length the
    /// collator pads each to, the batch with the epoch's longest group first.
    #[cfg_attr(feature = "cli", arg(long))]
    pub length_grouped: Option<usize>,
    /// Token-budget batches: as many groups (at most batch_size) as fit this many tokens
    /// (padded: groups x group_size x padded length; packed: real tokens). Every rank takes
    /// the same number of steps, which varies by epoch.
    #[cfg_attr(feature = "cli", arg(long))]
    pub max_tokens: Option<usize>,
    /// Every global batch (all ranks at one step) from one source.
    #[cfg_attr(feature = "cli", arg(long))]
    pub same_source: bool,
    /// No two groups of a global batch (all ranks at one step) share a query or a drawn
    /// passage, so in-batch negatives are never false (sentence-transformers'
    /// NoDuplicatesBatchSampler): rows that collide wait for later batches. With the pad or
    /// drop tail every rank takes the same number of steps, which varies by epoch.
    #[cfg_attr(feature = "cli", arg(long))]
    pub no_duplicates: bool,
    /// With same_source: each source's batch size (a list or keyed, as weights; default: its
    /// rows' batch_size field, else batch_size).
    #[cfg_attr(feature = "cli", arg(long))]
    pub source_batch_sizes: Option<PerSource<usize>>,
    /// With same_source: sources with fewer rows per epoch are merged with the other small
    /// sources of their directory (FlagEmbedding's small_threshold; 0: none).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 0))]
    pub small_threshold: u64,
    /// With same_source: a merged group of small sources with fewer rows is left out
    /// (FlagEmbedding's drop_threshold).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 0))]
    pub drop_threshold: u64,
    /// Threads computing batches ahead (0: computed in the caller). Not a setting: never
    /// changes what a batch holds.
    #[serde(skip_serializing)]
    #[cfg_attr(feature = "cli", arg(long, alias = "threads", default_value_t = Options::DEFAULT.prefetch_threads))]
    pub prefetch_threads: usize,
    /// Batches computed ahead, in total. Not a setting: never changes what a batch holds.
    #[serde(skip_serializing)]
    #[cfg_attr(feature = "cli", arg(long, default_value_t = Options::DEFAULT.prefetch_depth))]
    pub prefetch_depth: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options::DEFAULT
    }
}

impl Options {
    /// The default of every option.
    pub const DEFAULT: Options = Options {
        batch_size: 4,
        group_size: 8,
        mode: Mode::Encoder,
        query_max_len: 32,
        passage_max_len: 128,
        truncation: Truncation::FlagEmbedding,
        pad_to_multiple_of: None,
        padding_side: None,
        pad_id: None,
        int32: false,
        attention_mask: true,
        knowledge_distillation: false,
        matryoshka_scores_by_index: false,
        packed: false,
        sub_batch_size: None,
        add_eos: None,
        seed: 42,
        rank: 0,
        world_size: 1,
        shard_tail: Tail::Pad,
        shuffle: true,
        drop_last: false,
        max_example_num_per_dataset: None,
        skip_rows_without_negatives: false,
        exclude_false_negatives: false,
        weights: None,
        length_grouped: None,
        max_tokens: None,
        same_source: false,
        no_duplicates: false,
        source_batch_sizes: None,
        small_threshold: 0,
        drop_threshold: 0,
        prefetch_threads: 1,
        prefetch_depth: 8,
    };

    /// The names of every option, in declaration order (serde's own list of the fields).
    pub fn names() -> &'static [&'static str] {
        field_names::<Options>()
    }

    /// Options from a JSON object of some of them (the rest default; a null value is the
    /// default too). An unknown name, or a value of the wrong type or out of its type's range,
    /// is an [`Error::Argument`] naming it.
    pub fn from_json(map: &serde_json::Map<String, serde_json::Value>) -> Result<Options> {
        let names = Options::names();
        let mut given = serde_json::Map::new();
        for (k, v) in map {
            let Some(&name) = names.iter().find(|n| **n == k) else {
                return Err(Error::argument(
                    "options",
                    format!("unknown option {k:?} (options: {})", names.join(", ")),
                ));
            };
            if v.is_null() {
                continue;
            }
            // One at a time, so that an error names its option.
            let one = serde_json::Map::from_iter([(k.clone(), v.clone())]);
            if let Err(e) = serde_json::from_value::<Options>(one.into()) {
                let e = e.to_string();
                let unsigned = e.contains("expected u");
                let integer = unsigned || e.contains("expected i");
                let message = if unsigned && v.as_i64().is_some_and(|n| n < 0) {
                    format!("must be non-negative, got {v}")
                } else if integer && v.is_f64() {
                    format!("must be an integer, got {v}")
                } else if e.contains("untagged enum PerSource") {
                    let item = if name == "weights" {
                        "a finite number >= 0"
                    } else {
                        "a positive integer"
                    };
                    format!(
                        "{v}: must be a list (one value per source, in the manifest's order) or a \
                         dict keyed by source path or file name, each value {item}"
                    )
                } else {
                    format!("{v}: {e}")
                };
                return Err(Error::argument(name, message));
            }
            given.insert(k.clone(), v.clone());
        }
        serde_json::from_value(given.into()).map_err(|e| Error::argument("options", e.to_string()))
    }

    /// Settings added after checkpoints existed, each with the value every state written
    /// before it was taken with (its default): a state without the key has that value.
    pub fn added_later() -> [(&'static str, serde_json::Value); 3] {
        [
            ("truncation", serde_json::json!("flag_embedding")),
            ("exclude_false_negatives", serde_json::json!(false)),
            ("no_duplicates", serde_json::json!(false)),
        ]
    }

    /// The settings a checkpoint stores: every option but the prefetch ones, by name.
    pub fn settings(&self) -> serde_json::Map<String, serde_json::Value> {
        match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => unreachable!("Options serializes to a JSON object"),
        }
    }

    /// The typed loader options, with per-source values resolved against `sources` (the
    /// manifest's). Options that exclude each other are an error naming one of them.
    pub fn resolve(&self, sources: &[SourceStats]) -> Result<LoaderOptions> {
        // Destructured without `..`: a new option does not compile until it is mapped here.
        let Options {
            batch_size,
            group_size,
            mode,
            query_max_len,
            passage_max_len,
            truncation,
            pad_to_multiple_of,
            padding_side,
            pad_id,
            int32,
            attention_mask,
            knowledge_distillation,
            matryoshka_scores_by_index,
            packed,
            sub_batch_size,
            add_eos,
            seed,
            rank,
            world_size,
            shard_tail,
            shuffle,
            drop_last,
            max_example_num_per_dataset,
            skip_rows_without_negatives,
            exclude_false_negatives,
            weights,
            length_grouped,
            max_tokens,
            same_source,
            no_duplicates,
            source_batch_sizes,
            small_threshold,
            drop_threshold,
            prefetch_threads,
            prefetch_depth,
        } = self.clone();
        let conflict =
            |a: &'static str, b: &str| Error::argument(a, format!("{a} does not combine with {b}"));
        let strategy = if no_duplicates {
            for (other, set) in [
                ("same_source", same_source),
                ("length_grouped", length_grouped.is_some()),
                ("max_tokens", max_tokens.is_some()),
            ] {
                if set {
                    return Err(conflict("no_duplicates", other));
                }
            }
            same_source_only(
                source_batch_sizes.is_some(),
                small_threshold,
                drop_threshold,
            )?;
            Strategy::NoDuplicates
        } else if same_source {
            if length_grouped.is_some() {
                return Err(conflict("same_source", "length_grouped"));
            }
            if max_tokens.is_some() {
                return Err(conflict("same_source", "max_tokens"));
            }
            Strategy::SameSource {
                batch_sizes: source_batch_sizes
                    .map(|b| b.resolve("source_batch_sizes", sources))
                    .transpose()?,
                small_threshold,
                drop_threshold,
            }
        } else {
            same_source_only(
                source_batch_sizes.is_some(),
                small_threshold,
                drop_threshold,
            )?;
            match (max_tokens, length_grouped) {
                (Some(max_tokens), megabatch) => Strategy::TokenBudget {
                    max_tokens,
                    megabatch,
                },
                (None, Some(megabatch)) => Strategy::LengthGrouped { megabatch },
                (None, None) => Strategy::Random,
            }
        };
        Ok(LoaderOptions {
            batch_size,
            seed,
            shard: Shard {
                rank,
                world_size,
                tail: shard_tail,
            },
            shuffle,
            drop_last,
            max_example_num_per_dataset,
            skip_rows_without_negatives,
            exclude_false_negatives,
            prefetch_threads,
            prefetch_depth,
            strategy,
            weights: weights.map(|w| w.resolve("weights", sources)).transpose()?,
            collate: CollateOptions {
                mode,
                query_max_len,
                passage_max_len,
                truncation,
                group_size,
                pad_to_multiple_of,
                padding_side,
                pad_id,
                id_type: if int32 { IdType::I32 } else { IdType::I64 },
                attention_mask,
                knowledge_distillation,
                packed,
                sub_batch_size,
                add_eos,
                matryoshka_scores_by_index,
            },
        })
    }
}

/// The same-source settings, refused without same_source.
fn same_source_only(sizes: bool, small_threshold: u64, drop_threshold: u64) -> Result<()> {
    for (name, set) in [
        ("source_batch_sizes", sizes),
        ("small_threshold", small_threshold > 0),
        ("drop_threshold", drop_threshold > 0),
    ] {
        if set {
            return Err(Error::argument(name, "only applies with same_source"));
        }
    }
    Ok(())
}

impl LoaderOptions {
    /// The flat options that [`Options::resolve`] turns into these (per-source values as
    /// lists): what a checkpoint stores.
    pub fn options(&self) -> Options {
        let LoaderOptions {
            batch_size,
            seed,
            shard:
                Shard {
                    rank,
                    world_size,
                    tail,
                },
            shuffle,
            drop_last,
            max_example_num_per_dataset,
            skip_rows_without_negatives,
            exclude_false_negatives,
            prefetch_threads,
            prefetch_depth,
            strategy,
            weights,
            collate:
                CollateOptions {
                    mode,
                    query_max_len,
                    passage_max_len,
                    truncation,
                    group_size,
                    pad_to_multiple_of,
                    padding_side,
                    pad_id,
                    id_type,
                    attention_mask,
                    knowledge_distillation,
                    packed,
                    sub_batch_size,
                    add_eos,
                    matryoshka_scores_by_index,
                },
        } = self.clone();
        let mut o = Options {
            batch_size,
            group_size,
            mode,
            query_max_len,
            passage_max_len,
            truncation,
            pad_to_multiple_of,
            padding_side,
            pad_id,
            int32: id_type == IdType::I32,
            attention_mask,
            knowledge_distillation,
            matryoshka_scores_by_index,
            packed,
            sub_batch_size,
            add_eos,
            seed,
            rank,
            world_size,
            shard_tail: tail,
            shuffle,
            drop_last,
            max_example_num_per_dataset,
            skip_rows_without_negatives,
            exclude_false_negatives,
            weights: weights.map(PerSource::List),
            prefetch_threads,
            prefetch_depth,
            ..Options::DEFAULT
        };
        match strategy {
            Strategy::Random => {}
            Strategy::LengthGrouped { megabatch } => o.length_grouped = Some(megabatch),
            Strategy::TokenBudget {
                max_tokens,
                megabatch,
            } => {
                o.max_tokens = Some(max_tokens);
                o.length_grouped = megabatch;
            }
            Strategy::NoDuplicates => o.no_duplicates = true,
            Strategy::SameSource {
                batch_sizes,
                small_threshold,
                drop_threshold,
            } => {
                o.same_source = true;
                o.source_batch_sizes = batch_sizes.map(PerSource::List);
                o.small_threshold = small_threshold;
                o.drop_threshold = drop_threshold;
            }
        }
        o
    }
}

/// One option as a front-end documents it (from the CLI definition: the `cli` feature).
#[cfg(feature = "cli")]
#[derive(Debug, Clone, Serialize)]
pub struct OptionDoc {
    /// The name (Python keyword, checkpoint key; the CLI flag is `--name-with-dashes`).
    pub name: &'static str,
    /// The CLI flag.
    pub flag: String,
    /// What it does (the doc comment).
    pub help: String,
    /// The default, as the CLI spells it (None: unset).
    pub default: Option<String>,
    /// Whether a checkpoint stores it (false for the prefetch options).
    pub setting: bool,
}

/// Every option, documented, in declaration order.
#[cfg(feature = "cli")]
pub fn docs() -> Vec<OptionDoc> {
    use clap::Args;
    let cmd = Options::augment_args(clap::Command::new("options"));
    let settings = Options::DEFAULT.settings();
    Options::names()
        .iter()
        .map(|&name| {
            let arg = cmd
                .get_arguments()
                .find(|a| a.get_id() == name)
                .expect("every field is a CLI argument");
            let help = arg
                .get_long_help()
                .or(arg.get_help())
                .map(|h| h.to_string())
                .unwrap_or_default();
            // The library's default (false for the flags clap gives none), else clap's.
            let default = match settings.get(name) {
                Some(serde_json::Value::Null) => None,
                Some(serde_json::Value::String(v)) => Some(v.clone()),
                Some(v) => Some(v.to_string()),
                None => arg
                    .get_default_values()
                    .first()
                    .map(|d| d.to_string_lossy().into_owned()),
            };
            OptionDoc {
                name,
                flag: format!("--{}", arg.get_long().unwrap_or(name)),
                help,
                default,
                setting: settings.contains_key(name),
            }
        })
        .collect()
}

/// The field names of a struct, as its derived `Deserialize` declares them.
fn field_names<T: serde::de::DeserializeOwned>() -> &'static [&'static str] {
    struct Fields(Option<&'static [&'static str]>);
    #[derive(Debug)]
    struct Stop;
    impl std::fmt::Display for Stop {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("stop")
        }
    }
    impl std::error::Error for Stop {}
    impl serde::de::Error for Stop {
        fn custom<M: std::fmt::Display>(_: M) -> Self {
            Stop
        }
    }
    impl<'de> serde::Deserializer<'de> for &mut Fields {
        type Error = Stop;
        fn deserialize_any<V: serde::de::Visitor<'de>>(
            self,
            _: V,
        ) -> std::result::Result<V::Value, Stop> {
            Err(Stop)
        }
        fn deserialize_struct<V: serde::de::Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> std::result::Result<V::Value, Stop> {
            self.0 = Some(fields);
            Err(Stop)
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }
    let mut f = Fields(None);
    let _ = T::deserialize(&mut f);
    f.0.unwrap_or(&[])
}

/// `FromStr` and `Display` for a unit enum from its serde names (one spelling for the CLI,
/// Python and checkpoints); `$option` names the option in errors.
macro_rules! named {
    ($ty:ty, $option:literal) => {
        impl std::str::FromStr for $ty {
            type Err = $crate::error::Error;
            fn from_str(s: &str) -> $crate::error::Result<$ty> {
                serde_json::from_value(serde_json::Value::String(s.to_string()))
                    .map_err(|e| $crate::error::Error::argument($option, format!("{s:?}: {e}")))
            }
        }
        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                match serde_json::to_value(self) {
                    Ok(serde_json::Value::String(s)) => f.write_str(&s),
                    _ => Err(std::fmt::Error),
                }
            }
        }
    };
}
pub(crate) use named;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_fields_and_settings_leave_out_prefetch() {
        let names = Options::names();
        assert_eq!(names.len(), 35);
        assert_eq!(names[0], "batch_size");
        let s = Options::DEFAULT.settings();
        let left_out: Vec<_> = names.iter().filter(|n| !s.contains_key(**n)).collect();
        assert_eq!(left_out, [&"prefetch_threads", &"prefetch_depth"]);
        // A setting added later has its value for the states written before it.
        for (k, v) in Options::added_later() {
            assert_eq!(s[k], v, "{k}");
        }
    }

    #[test]
    fn resolve_and_options_are_inverse() {
        let sources: Vec<SourceStats> = Vec::new();
        for o in [
            Options::DEFAULT,
            Options {
                max_tokens: Some(100),
                length_grouped: Some(3),
                weights: Some(PerSource::List(vec![1.0, 2.0])),
                shard_tail: Tail::Drop,
                int32: true,
                ..Options::DEFAULT
            },
            Options {
                same_source: true,
                source_batch_sizes: Some(PerSource::List(vec![2, 3])),
                small_threshold: 5,
                ..Options::DEFAULT
            },
            Options {
                no_duplicates: true,
                exclude_false_negatives: true,
                shard_tail: Tail::Drop,
                ..Options::DEFAULT
            },
        ] {
            assert_eq!(o.resolve(&sources).unwrap().options(), o);
        }
    }

    #[test]
    fn no_duplicates_refuses_the_strategies_it_does_not_combine_with() {
        let no_dup = Options {
            no_duplicates: true,
            ..Options::DEFAULT
        };
        for (o, other) in [
            (
                Options {
                    same_source: true,
                    ..no_dup.clone()
                },
                "same_source",
            ),
            (
                Options {
                    length_grouped: Some(2),
                    ..no_dup.clone()
                },
                "length_grouped",
            ),
            (
                Options {
                    max_tokens: Some(100),
                    ..no_dup.clone()
                },
                "max_tokens",
            ),
            (
                Options {
                    small_threshold: 3,
                    ..no_dup.clone()
                },
                "same_source",
            ),
        ] {
            let e = o.resolve(&[]).unwrap_err().to_string();
            assert!(e.contains(other), "{e}");
        }
        assert_eq!(
            no_dup.resolve(&[]).unwrap().strategy,
            Strategy::NoDuplicates
        );
    }

    #[test]
    fn from_json_names_the_bad_option() {
        let parse = |s: &str| Options::from_json(serde_json::from_str(s).as_ref().unwrap());
        let name = |s: &str| match parse(s) {
            Err(Error::Argument { name, message }) => (name, message),
            other => panic!("{other:?}"),
        };
        assert_eq!(name(r#"{"batch_size": "2"}"#).0, "batch_size");
        assert_eq!(name(r#"{"batch_size": 2.0}"#).0, "batch_size");
        assert_eq!(name(r#"{"shuffle": 1}"#).0, "shuffle");
        assert_eq!(name(r#"{"mode": "Encoder"}"#).0, "mode");
        assert!(name(r#"{"batchsize": 2}"#).1.contains("batchsize"));
        let o = parse(r#"{"batch_size": 3, "pad_id": null, "weights": {"a": 1}}"#).unwrap();
        assert_eq!(o.batch_size, 3);
        assert_eq!(
            o.weights,
            Some(PerSource::Map(BTreeMap::from([("a".into(), 1.0)])))
        );
    }

    /// Regression (review of issue 18): two keys naming one source, or a file name shared by
    /// several sources, were resolved silently (the key sorting last won).
    #[test]
    fn per_source_keys_name_each_source_once() {
        let sources: Vec<SourceStats> = ["a/p.jsonl", "b/q.jsonl", "c/x.jsonl", "d/x.jsonl"]
            .iter()
            .map(|p| SourceStats {
                path: p.to_string(),
                ..SourceStats::default()
            })
            .collect();
        let map = |kv: &[(&str, f64)]| {
            PerSource::Map(kv.iter().map(|(k, v)| (k.to_string(), *v)).collect())
        };
        let err = |p: PerSource<f64>| p.resolve("weights", &sources).unwrap_err().to_string();
        let all = [
            ("a/p.jsonl", 1.0),
            ("q.jsonl", 1.0),
            ("c/x.jsonl", 1.0),
            ("d/x.jsonl", 2.0),
        ];
        assert_eq!(
            map(&all).resolve("weights", &sources).unwrap(),
            vec![1.0, 1.0, 1.0, 2.0]
        );
        let twice = [&all[..], &[("p.jsonl", 0.0)]].concat();
        assert!(
            err(map(&twice)).contains("both name the source"),
            "{}",
            err(map(&twice))
        );
        let ambiguous = [("a/p.jsonl", 1.0), ("q.jsonl", 1.0), ("x.jsonl", 1.0)];
        assert!(err(map(&ambiguous)).contains("several sources"));
        assert!("p.jsonl=1,p.jsonl=0".parse::<PerSource<f64>>().is_err());
    }

    #[test]
    fn per_source_parses_lists_and_maps() {
        let l: PerSource<usize> = "1,2,3".parse().unwrap();
        assert_eq!(l, PerSource::List(vec![1, 2, 3]));
        let m: PerSource<f64> = "a.jsonl=1,b.jsonl=0.5".parse().unwrap();
        assert!(matches!(m, PerSource::Map(m) if m.len() == 2));
        assert!("1,x".parse::<PerSource<usize>>().is_err());
    }
}
