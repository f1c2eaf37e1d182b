//! `rankfeed show`, `rankfeed collate` and `rankfeed bench`: what the model sees, and how fast.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rankfeed::collate::{CollateOptions, Collator, Mode};
use rankfeed::loader::{Loader, LoaderOptions};
use rankfeed::options::Options;
use rankfeed::sample::Selection;
use rankfeed::tokenizer::TextTokenizer;
use rankfeed::Dataset;

use crate::npy;

/// The loader's options as the CLI takes them: every field of `rankfeed::options::Options`
/// (flattened from its one definition), resolved against the dataset's sources.
fn loader_options(ds: &Dataset, o: &Options) -> Result<LoaderOptions> {
    Ok(o.resolve(&ds.manifest().sources)?)
}

/// The collation part of the options, for commands that collate given selections: a sampling
/// option set to anything but its default is an error (it would be ignored).
fn collate_options(ds: &Dataset, o: &Options) -> Result<CollateOptions> {
    let lo = loader_options(ds, o)?;
    let sampling = |l: &LoaderOptions| LoaderOptions {
        collate: CollateOptions::default(),
        prefetch_threads: 0,
        prefetch_depth: 0,
        ..l.clone()
    };
    let default = Options::default().resolve(&ds.manifest().sources)?;
    if sampling(&lo) != sampling(&default) {
        bail!(
            "sampling options (--batch-size, --seed, --world-size, --length-grouped, ...) do not \
             apply here: the selections say which groups to collate"
        );
    }
    Ok(lo.collate)
}

#[derive(clap::Args)]
pub struct ShowArgs {
    /// Dataset directory.
    dir: PathBuf,
    /// Row (query) to show.
    #[arg(long, required_unless_present = "step", conflicts_with = "step")]
    row: Option<u64>,
    /// Show batch K of --epoch instead: its groups as the loader draws them with the
    /// sampling options (--batch-size, --length-grouped, --max-tokens, --weights, ...).
    #[arg(long)]
    step: Option<u64>,
    /// Index of the positive (default: drawn by the sampler, as training would).
    #[arg(long)]
    pos: Option<u32>,
    /// Comma-separated negative indices (default: drawn by the sampler).
    #[arg(long, value_delimiter = ',')]
    neg: Option<Vec<u32>>,
    /// Epoch of the sampler draw.
    #[arg(long, default_value_t = 0)]
    epoch: u64,
    /// tokenizer.json to decode the ids to text.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    options: Options,
}

pub fn run_show(a: ShowArgs) -> Result<()> {
    let Some(row) = a.row else {
        return show_step(&a);
    };
    let ds = crate::open_dataset(&a.dir)?;
    let lopts = loader_options(&ds, &a.options)?;
    let opts = lopts.collate.clone();
    let collator = Collator::new(&ds, opts.clone())?;
    let group = ds.group(row as usize)?;
    let sel = match (a.pos, &a.neg) {
        (Some(pos), Some(neg)) => Selection {
            row,
            pos,
            neg: neg.clone(),
        },
        (pos, neg) => {
            // The loader's own draw (exclude_false_negatives included).
            let mut drawn = Vec::new();
            let ids = ds.group_ids(row as usize)?;
            let p = rankfeed::loader::draw_group(&lopts, a.epoch, row, &ids, &mut drawn)?;
            Selection {
                row,
                pos: pos.unwrap_or(p),
                neg: neg.clone().unwrap_or(drawn),
            }
        }
    };
    let tok = a
        .tokenizer
        .as_ref()
        .map(TextTokenizer::from_file)
        .transpose()?;
    let pairs = collator.pairs(&ds, &sel)?;
    let scores = if group.pos_scores.is_some() && (sel.neg.is_empty() || group.neg_scores.is_some())
    {
        Some(collator.scores(&ds, &sel)?)
    } else {
        None
    };
    let mut items = Vec::new();
    for (k, pair) in pairs.iter().enumerate() {
        let (role, index, passage) = if k == 0 {
            ("pos", sel.pos, group.pos[sel.pos as usize])
        } else {
            ("neg", sel.neg[k - 1], group.neg[sel.neg[k - 1] as usize])
        };
        let ids = pair.ids();
        let mut v = serde_json::json!({
            "role": role,
            "index": index,
            "passage_id": passage,
            "length": ids.len(),
            "overlong": pair.overlong,
            "input_ids": ids,
        });
        if collator.has_token_type_ids() {
            v["token_type_ids"] = pair.type_ids().into();
        }
        if opts.mode == Mode::Matryoshka {
            v["query_length"] = pair.query_length.into();
            v["prompt_length"] = pair.prompt_length.into();
        }
        if let Some(s) = &scores {
            // The f32 as written (0.707), not its f64 widening (0.7070000171661377).
            v["teacher_score"] = s[k]
                .to_string()
                .parse::<f64>()
                .map_or(serde_json::Value::Null, Into::into);
        }
        if let Some(t) = &tok {
            v["text"] = t.decode(&ids)?.into();
        }
        items.push(v);
    }
    if opts.mode == Mode::Embedder {
        // Embedder mode: the query is a sequence of its own, and each "pair" is a passage.
        let q = collator.single(group.query, opts.query_max_len);
        let ids = q.ids();
        let mut v = serde_json::json!({
            "role": "query", "index": 0, "passage_id": null, "length": ids.len(),
            "overlong": false, "input_ids": ids,
        });
        if collator.has_token_type_ids() {
            v["token_type_ids"] = q.type_ids().into();
        }
        if let Some(t) = &tok {
            v["text"] = t.decode(&q.ids())?.into();
        }
        items.insert(0, v);
    }
    let mut out = std::io::stdout().lock();
    if a.json {
        let v = serde_json::json!({
            "row": sel.row,
            "mode": opts.mode.to_string(),
            "pad_id": collator.pad_id(),
            "padding_side": collator.side().to_string(),
            "pairs": items,
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(());
    }
    writeln!(
        out,
        "row {} ({:?} mode, q {} / p {}): {} positives, {} negatives, prompt {:?}, source {}",
        sel.row,
        opts.mode,
        opts.query_max_len,
        opts.passage_max_len,
        group.pos.len(),
        group.neg.len(),
        group.prompt,
        group.source
    )?;
    for v in &items {
        let what = match v["passage_id"].as_i64() {
            Some(p) => format!(
                "{} {} (passage {p})",
                v["role"].as_str().unwrap_or(""),
                v["index"]
            ),
            None => "query".to_string(), // embedder mode: the query on its own
        };
        writeln!(
            out,
            "\n{what}: {} ids{}{}",
            v["length"],
            if v["overlong"].as_bool() == Some(true) {
                ", OVER LENGTH: the query alone exceeds the budget"
            } else {
                ""
            },
            v.get("teacher_score")
                .map_or(String::new(), |s| format!(", teacher score {s}"))
        )?;
        writeln!(out, "  ids: {}", v["input_ids"])?;
        if let Some(t) = v.get("token_type_ids") {
            writeln!(out, "  token_type_ids: {t}")?;
        }
        if let Some(t) = v.get("text").and_then(|t| t.as_str()) {
            writeln!(out, "  text: {t:?}")?;
        }
    }
    Ok(())
}

/// `show --step K`: the groups of batch K as the loader draws them.
fn show_step(a: &ShowArgs) -> Result<()> {
    let ds = Arc::new(crate::open_dataset(&a.dir)?);
    let options = LoaderOptions {
        prefetch_threads: 0,
        ..loader_options(&ds, &a.options)?
    };
    let loader = Loader::new(ds.clone(), options)?;
    for note in loader.notes()? {
        eprintln!("note: {note}");
    }
    let step = a.step.context("--row or --step")?;
    let steps = loader.steps(a.epoch)?;
    let b = loader.batch(a.epoch, step)?;
    let collator = loader.collator();
    let mut groups = Vec::new();
    for sel in &b.selections {
        let (longest, tokens) = collator.group_tokens(&ds, sel)?;
        groups.push(serde_json::json!({
            "row": sel.row,
            "source": ds.group(sel.row as usize)?.source,
            "pos": sel.pos,
            "neg": sel.neg,
            "longest_pair": longest,
            "tokens": tokens,
        }));
    }
    let cells = if b.cu_seqlens.is_some() {
        b.len
    } else {
        b.rows * b.len
    };
    let v = serde_json::json!({
        "epoch": a.epoch,
        "step": step,
        "steps": steps,
        "rows": b.rows,
        "length": b.len,
        "real_tokens": b.real_tokens,
        "tokens": cells,
        "groups": groups,
    });
    let mut out = std::io::stdout().lock();
    if a.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(());
    }
    writeln!(
        out,
        "epoch {} step {step} of {steps}: {} groups, {} pairs of length {} ({} tokens, {} real: {:.1}%)",
        a.epoch,
        b.selections.len(),
        b.rows,
        b.len,
        cells,
        b.real_tokens,
        100.0 * b.real_tokens as f64 / cells.max(1) as f64
    )?;
    for g in &groups {
        writeln!(
            out,
            "  row {} (source {}): positive {}, negatives {}, longest pair {}, {} tokens",
            g["row"], g["source"], g["pos"], g["neg"], g["longest_pair"], g["tokens"]
        )?;
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct CollateCmdArgs {
    /// Dataset directory.
    dir: PathBuf,
    /// JSON file: a list of batches, each a list of {"row", "pos", "neg": [...]}.
    #[arg(long)]
    selections: PathBuf,
    /// Output directory: one folder per batch (0, 1, ...) of .npy arrays.
    #[arg(short, long)]
    output: PathBuf,
    /// Collation options (the sampling ones do not apply: the selections are given).
    #[command(flatten)]
    options: Options,
}

pub fn run_collate(a: CollateCmdArgs) -> Result<()> {
    let ds = crate::open_dataset(&a.dir)?;
    let collator = Collator::new(&ds, collate_options(&ds, &a.options)?)?;
    let text = std::fs::read(&a.selections)
        .with_context(|| format!("reading {}", a.selections.display()))?;
    let batches: Vec<Vec<serde_json::Value>> =
        serde_json::from_slice(&text).context("selections: expected a list of lists")?;
    for (k, batch) in batches.iter().enumerate() {
        let sels = batch
            .iter()
            .map(|s| {
                let row = s["row"].as_u64().context("selection without row")?;
                let pos = s["pos"].as_u64().context("selection without pos")? as u32;
                let neg = s["neg"]
                    .as_array()
                    .context("selection without neg")?
                    .iter()
                    .map(|n| n.as_u64().map(|n| n as u32).context("bad neg index"))
                    .collect::<Result<Vec<_>>>()?;
                Ok(Selection { row, pos, neg })
            })
            .collect::<Result<Vec<_>>>()?;
        let b = collator.collate(&ds, sels)?;
        let dir = a.output.join(k.to_string());
        std::fs::create_dir_all(&dir)?;
        if let Some(e) = &b.embedder {
            write_embedder(&dir, e)?;
            if let Some(s) = &b.teacher_scores {
                npy::write_f32(&dir.join("teacher_scores.npy"), s)?;
            }
            continue;
        }
        // Packed batches are [T] arrays (plus position_ids and cu_seqlens), padded ones [rows, len].
        let shape: Vec<usize> = if b.cu_seqlens.is_some() {
            vec![b.len]
        } else {
            vec![b.rows, b.len]
        };
        npy::write_ids(&dir.join("input_ids.npy"), &b.input_ids, &shape)?;
        if let (Some(p), Some(cu)) = (&b.position_ids, &b.cu_seqlens) {
            npy::write_ids(&dir.join("position_ids.npy"), p, &shape)?;
            let cu = rankfeed::collate::Ids::I32(cu.clone());
            npy::write_ids(&dir.join("cu_seqlens.npy"), &cu, &[b.rows + 1])?;
        }
        if let Some(m) = &b.attention_mask {
            npy::write_ids(&dir.join("attention_mask.npy"), m, &shape)?;
        }
        if let Some(t) = &b.token_type_ids {
            npy::write_ids(&dir.join("token_type_ids.npy"), t, &shape)?;
        }
        if let Some(s) = &b.teacher_scores {
            npy::write_f32(&dir.join("teacher_scores.npy"), s)?;
        }
        if let Some(q) = &b.query_lengths {
            npy::write_ids(&dir.join("query_lengths.npy"), q, &[b.rows])?;
        }
        if let Some(p) = &b.prompt_lengths {
            npy::write_ids(&dir.join("prompt_lengths.npy"), p, &[b.rows])?;
        }
        std::fs::write(dir.join("overlong.txt"), b.overlong.to_string())?;
    }
    Ok(())
}

/// Embedder arrays as `query_input_ids.npy`, ... (with sub-batches `query_input_ids.0.npy`,
/// `query_input_ids.1.npy`, ...: one per chunk).
fn write_embedder(dir: &std::path::Path, e: &rankfeed::collate::EmbedderArrays) -> Result<()> {
    for (side, chunks) in [("query", &e.queries), ("passage", &e.passages)] {
        for (i, c) in chunks.iter().enumerate() {
            let arrays = [
                ("input_ids", Some(&c.input_ids)),
                ("attention_mask", c.attention_mask.as_ref()),
                ("token_type_ids", c.token_type_ids.as_ref()),
            ];
            for (name, ids) in arrays {
                let Some(ids) = ids else { continue };
                let file = if e.sub_batched {
                    format!("{side}_{name}.{i}.npy")
                } else {
                    format!("{side}_{name}.npy")
                };
                npy::write_ids(&dir.join(file), ids, &[c.rows, c.len])?;
            }
        }
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Dataset directory.
    dir: PathBuf,
    /// Batches to time (they wrap into following epochs).
    #[arg(long, default_value_t = 20000)]
    batches: u64,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// The loader's options (--prefetch-threads 0: everything on the calling thread, i.e.
    /// one core).
    #[command(flatten)]
    options: Options,
}

/// The real-token fraction no padded layout can beat: every group padded only to its own
/// longest pair (the G pairs of a group always share a batch), over the first `n` batches of
/// epoch 0. Lengths only: no tokens are read.
fn padded_bound(loader: &Loader, n: u64) -> Result<f64> {
    let (ds, collator) = (loader.dataset(), loader.collator());
    let g = loader.options().collate.group_size;
    let (mut real, mut cells) = (0u64, 0u64);
    for step in 0..n {
        for sel in loader.selections(0, step)? {
            let (longest, tokens) = collator.group_tokens(ds, &sel)?;
            real += tokens as u64;
            cells += (g * longest) as u64;
        }
    }
    Ok(real as f64 / cells.max(1) as f64)
}

pub fn run_bench(a: BenchArgs) -> Result<()> {
    let t_open = Instant::now();
    let ds = Arc::new(crate::open_dataset(&a.dir)?);
    let mut loader = Loader::new(ds.clone(), loader_options(&ds, &a.options)?)?;
    for note in loader.notes()? {
        eprintln!("note: {note}");
    }
    let first = loader.next().context("empty dataset")??;
    let open_first = t_open.elapsed();
    if loader.steps_per_epoch()? == 0 {
        bail!("no batches");
    }
    loader.set_epoch(0);
    let (mut n, mut real, mut cells, mut bytes, mut overlong) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut groups = 0u64;
    let t = Instant::now();
    while n < a.batches {
        let b = match loader.next() {
            Some(b) => b?,
            None => continue, // next epoch
        };
        n += 1;
        real += b.real_tokens;
        // Tokens in the tensors the model receives: every cell of a padded batch, every
        // token of a packed one.
        cells += b.cells() as u64;
        bytes += b.nbytes() as u64;
        overlong += b.overlong as u64;
        groups += b.selections.len() as u64;
        std::hint::black_box(&b);
    }
    let secs = t.elapsed().as_secs_f64();
    let bound = padded_bound(&loader, n.min(loader.steps(0)?))?;
    let mix = epoch_mix(&loader)?;
    let budget_fill = a
        .options
        .max_tokens
        .map(|t| cells as f64 / n.max(1) as f64 / t as f64);
    let v = serde_json::json!({
        "batches": n,
        "seconds": secs,
        "batches_per_second": n as f64 / secs,
        "real_tokens_per_second": real as f64 / secs,
        "padding_efficiency": real as f64 / cells.max(1) as f64,
        "padded_bound": bound,
        "output_gb_per_second": bytes as f64 / secs / 1e9,
        "bytes_per_batch": bytes as f64 / n.max(1) as f64,
        "overlong_pairs": overlong,
        "open_plus_first_batch_ms": open_first.as_secs_f64() * 1e3,
        "first_batch_shape": [first.rows, first.len],
        "threads": a.options.prefetch_threads,
        "groups_per_batch": groups as f64 / n.max(1) as f64,
        "budget_fill": budget_fill,
        "source_share": mix.share,
        "source_weight": mix.weight,
        "single_source_batches": mix.single_source,
    });
    let mut out = std::io::stdout().lock();
    if a.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
    } else {
        writeln!(
            out,
            "{n} batches of {} x {} in {secs:.3} s: {:.0} batches/s, {:.2} M real tokens/s, padding efficiency {:.1}% (padded bound {:.1}%), output {:.2} GB/s ({:.0} KB/batch), {} over-length pairs; open + first batch {:.2} ms",
            a.options.batch_size,
            a.options.group_size,
            n as f64 / secs,
            real as f64 / secs / 1e6,
            100.0 * real as f64 / cells.max(1) as f64,
            100.0 * bound,
            bytes as f64 / secs / 1e9,
            bytes as f64 / n.max(1) as f64 / 1e3,
            overlong,
            open_first.as_secs_f64() * 1e3
        )?;
        if let Some(fill) = budget_fill {
            writeln!(
                out,
                "token budget: {:.1}% of --max-tokens filled on average",
                100.0 * fill
            )?;
        }
        writeln!(
            out,
            "{:.1} groups per batch: {:.0} groups/s",
            groups as f64 / n.max(1) as f64,
            groups as f64 / secs
        )?;
        if mix.share.len() > 1 {
            let pct = |v: &[f64]| {
                v.iter()
                    .map(|x| format!("{:.2}%", 100.0 * x))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            writeln!(
                out,
                "epoch 0 by source: groups {} (weights {}); {:.1}% of batches single-source",
                pct(&mix.share),
                pct(&mix.weight),
                100.0 * mix.single_source
            )?;
        }
    }
    Ok(())
}

/// Who epoch 0 draws from: each source's share of the groups, the share its weight asks
/// for, and the fraction of this rank's batches holding one source only.
struct Mix {
    share: Vec<f64>,
    weight: Vec<f64>,
    single_source: f64,
}

fn epoch_mix(loader: &Loader) -> Result<Mix> {
    let ds = loader.dataset();
    let sources = ds.manifest().sources.len().max(1);
    let mut count = vec![0u64; sources];
    let steps = loader.steps(0)?;
    let mut single = 0u64;
    for k in 0..steps {
        let mut of = Vec::new();
        for sel in loader.selections(0, k)? {
            let s = ds.group(sel.row as usize)?.source as usize;
            count[s.min(sources - 1)] += 1;
            of.push(s);
        }
        single += of.windows(2).all(|w| w[0] == w[1]) as u64;
    }
    let total = count.iter().sum::<u64>().max(1) as f64;
    let o = loader.options();
    let weight = match &o.weights {
        Some(w) => {
            let sum: f64 = w.iter().sum();
            w.iter().map(|x| x / sum).collect()
        }
        None => ds
            .manifest()
            .sources
            .iter()
            .map(|s| s.rows_accepted as f64 / ds.len().max(1) as f64)
            .collect(),
    };
    Ok(Mix {
        share: count.iter().map(|&c| c as f64 / total).collect(),
        weight,
        single_source: single as f64 / steps.max(1) as f64,
    })
}
