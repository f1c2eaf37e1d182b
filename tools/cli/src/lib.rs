//! The `rankfeed` command line, as a library: the `rankfeed` binary runs [`run`], and so does
//! the Python package's `rankfeed` console script (`pip install ./python` puts the command on
//! PATH without a second build).

mod batch;
mod npy;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rankfeed::convert::{self, ConvertOptions, OnError, TextOptions};
use rankfeed::remote::{self, Cache, Output, OutputKind};
use rankfeed::stats::{dataset_stats, Distribution};
use rankfeed::tokenizer::TextTokenizer;
use rankfeed::writer::WriterOptions;
use rankfeed::{Dataset, Manifest};

#[derive(Parser)]
#[command(
    name = "rankfeed",
    version,
    about = "Pre-tokenized, memory-mapped reranker training data"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Cache of datasets opened from URLs (s3://...); default $RANKFEED_CACHE, else
    /// ~/.cache/rankfeed/datasets. Also the scratch space of outputs written to URLs.
    #[arg(long, global = true)]
    cache_dir: Option<PathBuf>,
    /// Evict cached datasets, least recently used first, beyond this many bytes.
    #[arg(long, global = true)]
    cache_max_bytes: Option<u64>,
}

static CACHE: std::sync::OnceLock<Cache> = std::sync::OnceLock::new();

/// The cache of this run (from --cache-dir / --cache-max-bytes).
fn cache() -> &'static Cache {
    CACHE.get_or_init(|| Cache::new(None, None))
}

/// Open a dataset argument: a directory, or a URL fetched through the cache (what the fetch
/// did is said on stderr).
pub(crate) fn open_dataset(dir: &std::path::Path) -> Result<Dataset> {
    let arg = dir.to_string_lossy();
    if !remote::is_url(&arg) {
        return Ok(Dataset::open(dir)?);
    }
    let (ds, fetched) = remote::open(&arg, cache()).with_context(|| format!("opening {arg}"))?;
    say_fetched(&arg, &fetched.report);
    // Held to the end of the command: no eviction elsewhere removes the copy while it is read.
    std::mem::forget(fetched);
    Ok(ds)
}

fn say_fetched(url: &str, r: &remote::FetchReport) {
    if r.downloaded {
        eprintln!(
            "fetched {url}: {} files, {:.1} MB in {:.2} s ({:.0} MB/s), verified, cached as {}",
            r.files,
            r.bytes as f64 / 1e6,
            r.seconds,
            r.bytes as f64 / 1e6 / r.seconds.max(1e-9),
            r.seal
        );
    } else {
        eprintln!("opened {url} from the cache ({})", r.seal);
    }
}

fn say_uploaded(url: &str, r: Option<remote::UploadReport>) {
    if let Some(r) = r {
        eprintln!(
            "uploaded {url}: {} files, {:.1} MB in {:.2} s",
            r.files,
            r.bytes as f64 / 1e6,
            r.seconds
        );
    }
}

#[derive(Subcommand)]
enum Command {
    /// Convert FlagEmbedding JSON/JSONL (files or directories, optionally .gz/.zst) into a dataset.
    Convert(ConvertArgs),
    /// Show a dataset's counts, dedup ratio, per-source stats and length distributions.
    Inspect(InspectArgs),
    /// Audit a dataset: false negatives, duplicate and conflicting queries, score inversions,
    /// missing or constant scores, truncation at the loader settings, overlap with another dataset.
    Audit(AuditArgs),
    /// Mine hard negatives for every row (BM25 over token ids, or given embeddings) into a new dataset.
    Mine(MineArgs),
    /// Export the unique (query, passage) pairs as the model sees them to Parquet, to score
    /// them elsewhere (then `attach-scores`).
    #[command(mut_arg("batch_size", |a| a.default_value(score_batch_default())))]
    Pairs(PairsArgs),
    /// Attach teacher scores (a Parquet `pair`, `score` file, or rankfeed.score's logs) to every
    /// row's positives and negatives, into a new dataset.
    AttachScores(AttachScoresArgs),
    /// Show the exact ids the model will see for one group (decoded with --tokenizer).
    Show(batch::ShowArgs),
    /// Collate given selections into .npy arrays (for your own sampler, and parity tests).
    Collate(batch::CollateCmdArgs),
    /// Measure the loader: batches/s, real tokens/s, padding efficiency, output GB/s.
    Bench(batch::BenchArgs),
    /// Export a dataset to Parquet (flat: one row per query with tokens; tables: passages/groups/prompts).
    Export(ExportArgs),
    /// Import pre-tokenized Parquet (rankfeed's export, flat or tables, or ids made elsewhere) without tokenizing.
    Import(ImportArgs),
    /// Merge datasets (e.g. shards converted with --shard K/N) into one, without tokenizing again.
    Merge(MergeArgs),
}

#[derive(clap::Args)]
struct ExportArgs {
    /// Dataset directory.
    dir: PathBuf,
    /// Output directory of part-NNNNN.parquet files.
    #[arg(short, long)]
    output: PathBuf,
    /// flat or tables.
    #[arg(long, default_value = "flat")]
    layout: String,
    /// Rows per Parquet file.
    #[arg(long, default_value_t = 1_000_000)]
    rows_per_file: usize,
    /// Replace OUTPUT if it exists.
    #[arg(long)]
    overwrite: bool,
}

#[derive(clap::Args)]
struct ImportArgs {
    /// Parquet files or directories of them.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Output dataset directory.
    #[arg(short, long)]
    output: PathBuf,
    /// The tokenizer.json the ids were made with: needed when the Parquet carries no rankfeed
    /// metadata (Spark and Polars drop it); when it does, every carried tokenizer fact, the
    /// separator ids and the default prompts are checked against it (without it, only
    /// against themselves).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Replace OUTPUT if it exists.
    #[arg(long)]
    overwrite: bool,
}

#[derive(clap::Args)]
struct MergeArgs {
    /// Dataset directories, in order.
    #[arg(required = true)]
    shards: Vec<PathBuf>,
    /// Output dataset directory.
    #[arg(short, long)]
    output: PathBuf,
    /// Replace OUTPUT if it exists.
    #[arg(long)]
    overwrite: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Policy {
    /// Stop at the first bad row; write nothing.
    Fail,
    /// Skip bad rows, list them in DIR/rejects.jsonl and the manifest.
    Skip,
}

#[derive(clap::Args)]
struct ConvertArgs {
    /// Input files or directories.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// tokenizer.json (tokenizer_config.json beside it is read when present).
    #[arg(long)]
    tokenizer: PathBuf,
    /// Output dataset directory.
    #[arg(short, long)]
    output: PathBuf,
    /// query_instruction_for_rerank: queries become FORMAT(instruction, query).
    #[arg(long)]
    query_instruction: Option<String>,
    /// query_instruction_format (Python str.format; a literal \n becomes a newline).
    #[arg(long, default_value = rankfeed::format::DEFAULT_INSTRUCTION_FORMAT)]
    query_instruction_format: String,
    /// passage_instruction_for_rerank.
    #[arg(long)]
    passage_instruction: Option<String>,
    /// passage_instruction_format.
    #[arg(long, default_value = rankfeed::format::DEFAULT_INSTRUCTION_FORMAT)]
    passage_instruction_format: String,
    /// sep_token of the LLM modes (taken literally).
    #[arg(long, default_value = rankfeed::format::DEFAULT_SEP_TOKEN)]
    sep_token: String,
    /// Default prompt for rows without `prompt` (both LLM modes; each has its own built-in default).
    #[arg(long)]
    default_prompt: Option<String>,
    /// Which row fields give per-row instructions: reranker (query_prompt, passage_prompt) or
    /// embedder (prompt as the query instruction). Matters only with an instruction; the
    /// dataset then serves that kind of training.
    #[arg(long, default_value = "reranker")]
    convention: String,
    /// What to do with a bad row.
    #[arg(long, value_enum, default_value = "fail")]
    on_error: Policy,
    /// Replace DIR if it exists.
    #[arg(long)]
    overwrite: bool,
    /// Tokenizer threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Rows per Arrow record batch.
    #[arg(long, default_value_t = rankfeed::format::DEFAULT_ROWS_PER_BATCH)]
    rows_per_batch: usize,
    /// Convert only the K-th of N equal byte ranges of the inputs (K/N, from 0; line-aligned,
    /// so one large file shards evenly); `rankfeed merge` joins the shards into exactly the
    /// single conversion's dataset.
    #[arg(long, value_parser = parse_shard)]
    shard: Option<(usize, usize)>,
    /// Longest line (or JSON array element) read, in bytes; a longer one is a `line_too_long`
    /// row under --on-error, and never held in memory.
    #[arg(long, default_value_t = rankfeed::convert::source::DEFAULT_MAX_LINE_BYTES)]
    max_line_bytes: usize,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

fn parse_shard(s: &str) -> Result<(usize, usize), String> {
    let (k, n) = s.split_once('/').ok_or("expected K/N")?;
    let (k, n) = (
        k.parse::<usize>().map_err(|e| e.to_string())?,
        n.parse::<usize>().map_err(|e| e.to_string())?,
    );
    if k >= n {
        return Err(format!("need K < N, got {k}/{n}"));
    }
    Ok((k, n))
}

#[derive(clap::Args)]
struct AuditArgs {
    /// Dataset directory (or URL).
    dir: PathBuf,
    /// Another dataset (e.g. the evaluation set) to report exact query and passage overlap with.
    #[arg(long)]
    against: Option<PathBuf>,
    /// Rows listed per finding.
    #[arg(long, default_value_t = rankfeed::audit::DEFAULT_EXAMPLES)]
    examples: usize,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
    /// The loader settings truncation is measured at (mode, budgets, truncation rule; the rest
    /// does not change the audit).
    #[command(flatten)]
    options: rankfeed::options::Options,
}

#[derive(clap::Args)]
struct MineArgs {
    /// Dataset directory (or URL): the rows, and the passages mined from.
    dir: PathBuf,
    /// Output dataset directory (or URL).
    #[arg(short, long)]
    output: PathBuf,
    /// Mine from this corpus instead of the dataset's own passages: another dataset (directory
    /// or URL), or Parquet files / directories of passages (a `tokens` column of ids, or a
    /// `text` column tokenized with --tokenizer; ids: an `id` column, else the row order).
    #[arg(long, num_args = 1..)]
    corpus: Vec<PathBuf>,
    /// The dataset's tokenizer.json, to tokenize a `text` corpus.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Keep the BM25 index in this file: loaded when it indexes this corpus with these k1 and
    /// b, else built and saved (shards and later runs then skip building it).
    #[arg(long, conflicts_with = "query_embeddings")]
    index: Option<PathBuf>,
    /// Dense retrieval: query embeddings, one row per dataset row: a float32 .npy (rows x dim),
    /// or Parquet files / a directory with an `embedding` list column (and optionally `id`).
    #[arg(long, requires = "passage_embeddings")]
    query_embeddings: Option<PathBuf>,
    /// Dense retrieval: passage embeddings, one row per (corpus) passage id (.npy or Parquet, as
    /// --query-embeddings).
    #[arg(long, requires = "query_embeddings")]
    passage_embeddings: Option<PathBuf>,
    /// Mine rows K*n/N..(K+1)*n/N only (merge the N outputs with `rankfeed merge`).
    #[arg(long, value_parser = parse_shard)]
    shard: Option<(usize, usize)>,
    /// Replace OUTPUT if it exists.
    #[arg(long)]
    overwrite: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    options: rankfeed::mine::MineOptions,
}

/// `rankfeed pairs`' default --batch-size: the scoring default, not the training one (clap
/// keeps a default as `&'static str`; this runs once per process).
fn score_batch_default() -> &'static str {
    Box::leak(
        rankfeed::score::DEFAULT_BATCH_SIZE
            .to_string()
            .into_boxed_str(),
    )
}

#[derive(clap::Args)]
struct PairsArgs {
    /// Dataset directory (or URL).
    dir: PathBuf,
    /// Output directory of part-NNNNN.parquet files (or URL).
    #[arg(short, long)]
    output: PathBuf,
    /// The dataset's tokenizer.json: also write query_text, prompt_text and passage_text,
    /// decoded from the stored ids (for a teacher with its own tokenizer).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Replace OUTPUT if it exists.
    #[arg(long)]
    overwrite: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// The collation settings the pairs are built with (mode, lengths, truncation, ...),
    /// --batch-size / --max-tokens for the `batch` column, --rank / --world-size to write one
    /// rank's share; sampling settings are ignored.
    #[command(flatten)]
    options: rankfeed::options::Options,
}

#[derive(clap::Args)]
struct AttachScoresArgs {
    /// Dataset directory (or URL): the scores' dataset.
    dir: PathBuf,
    /// Output dataset directory (or URL).
    #[arg(short, long)]
    output: PathBuf,
    /// Parquet files or directories (or URLs) with an integer `pair` and a numeric `score`
    /// column: every pair id of the dataset scored exactly once.
    #[arg(long, num_args = 1.., required_unless_present = "logs", conflicts_with = "logs")]
    scores: Vec<PathBuf>,
    /// Or: the work directory of rankfeed.score, every rank's log complete.
    #[arg(long)]
    logs: Option<PathBuf>,
    /// Replace OUTPUT if it exists.
    #[arg(long)]
    overwrite: bool,
}

#[derive(clap::Args)]
struct InspectArgs {
    /// Dataset directory.
    dir: PathBuf,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
    /// Also check every row, id and checksum (linear in the data).
    #[arg(long)]
    verify: bool,
}

/// Run the command line on `args` (the program name first, as `std::env::args_os`); returns
/// the exit code. `--help`, `--version` and usage errors print as clap does.
pub fn run<I, T>(args: I) -> u8
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return e.exit_code().clamp(0, 255) as u8;
        }
    };
    let _ = CACHE.set(Cache::new(cli.cache_dir, cli.cache_max_bytes));
    let result = match cli.command {
        Command::Convert(a) => run_convert(a),
        Command::Inspect(a) => run_inspect(a),
        Command::Audit(a) => run_audit(a),
        Command::Mine(a) => run_mine(a),
        Command::Pairs(a) => run_pairs(a),
        Command::AttachScores(a) => run_attach_scores(a),
        Command::Show(a) => batch::run_show(a),
        Command::Collate(a) => batch::run_collate(a),
        Command::Bench(a) => batch::run_bench(a),
        Command::Export(a) => run_export(a),
        Command::Import(a) => run_import(a),
        Command::Merge(a) => run_merge(a),
    };
    match result {
        Ok(()) => 0,
        Err(e) if is_broken_pipe(&e) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            1
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn run_convert(a: ConvertArgs) -> Result<()> {
    if let Some(n) = a.threads {
        rankfeed::convert::configure_threads(n)
            .map_err(|e| anyhow::anyhow!("configuring {n} threads: {e}"))?;
    }
    let tokenizer = TextTokenizer::from_file(&a.tokenizer)?;
    let output = Output::new(
        &a.output.to_string_lossy(),
        OutputKind::Dataset,
        a.overwrite,
        cache(),
    )?;
    let inputs = remote::inputs(&strings(&a.inputs), cache(), a.shard)?;
    let options = ConvertOptions {
        text: TextOptions {
            query_instruction: a.query_instruction,
            query_instruction_format: a.query_instruction_format,
            passage_instruction: a.passage_instruction,
            passage_instruction_format: a.passage_instruction_format,
            sep_token: a.sep_token,
            default_prompt: a.default_prompt,
            convention: a.convention.parse()?,
        },
        on_error: match a.on_error {
            Policy::Fail => OnError::Fail,
            Policy::Skip => OnError::Skip,
        },
        writer: WriterOptions {
            rows_per_batch: a.rows_per_batch,
            overwrite: output.overwrite_local(),
        },
        shard: a.shard,
        max_line_bytes: a.max_line_bytes,
        input_names: inputs.names.clone(),
        ..ConvertOptions::default()
    };
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {msg}",
        )
        .expect("valid template"),
    );
    let report = convert::convert(
        &inputs.paths,
        &tokenizer,
        output.path(),
        &options,
        &mut |p| {
            bar.set_length(p.bytes_total);
            bar.set_position(p.bytes_read);
            let secs = p.elapsed.as_secs_f64().max(1e-9);
            bar.set_message(format!(
                "{} rows ({:.0}/s), {:.2}M tokens/s, {} rejected",
                p.rows,
                p.rows as f64 / secs,
                p.tokens as f64 / secs / 1e6,
                p.rejected
            ));
        },
    );
    bar.finish_and_clear();
    let report = report.with_context(|| format!("converting into {}", a.output.display()))?;
    let name = output.name();
    say_uploaded(&name, output.finish()?);
    report_cleaned(&report.cleaned);
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    let m = &report.manifest;
    let mut out = std::io::stdout().lock();
    if a.json {
        let v = serde_json::json!({
            "output": a.output,
            "seconds": report.elapsed.as_secs_f64(),
            "tokens_tokenized": report.tokens_tokenized,
            "texts_tokenized": report.texts_tokenized,
            "tokens_per_second": report.tokens_tokenized as f64 / report.elapsed.as_secs_f64(),
            "counts": m.counts,
            "dedup_ratio": m.counts.dedup_ratio(),
            "sources": m.sources,
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(());
    }
    let secs = report.elapsed.as_secs_f64();
    writeln!(out, "wrote {}", a.output.display())?;
    writeln!(
        out,
        "  {:.2} s, {} texts tokenized, {:.0} rows/s, {:.3}M tokens/s",
        secs,
        report.texts_tokenized,
        m.counts.groups as f64 / secs,
        report.tokens_tokenized as f64 / secs / 1e6
    )?;
    write_summary(&mut out, m)?;
    Ok(())
}

fn strings(paths: &[PathBuf]) -> Vec<String> {
    paths
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect()
}

/// Say which stale staging directories (left by killed runs) were removed.
fn report_cleaned(cleaned: &[PathBuf]) {
    for p in cleaned {
        eprintln!(
            "removed {}: the staging directory of an interrupted run",
            p.display()
        );
    }
}

fn write_summary(out: &mut impl Write, m: &Manifest) -> Result<()> {
    let c = &m.counts;
    if let Some(r) = m.shards {
        writeln!(
            out,
            "  holds {r} of a sharded conversion: merge it with the other shards before training"
        )?;
    }
    writeln!(
        out,
        "  groups {}  unique passages {}  passage refs {}  prompts {}",
        c.groups, c.passages, c.passage_refs, c.prompts
    )?;
    writeln!(
        out,
        "  dedup ratio {:.2} (refs per unique passage); {:.2}x fewer passage tokens stored",
        c.dedup_ratio(),
        if c.passage_tokens == 0 {
            1.0
        } else {
            c.passage_ref_tokens as f64 / c.passage_tokens as f64
        }
    )?;
    for s in &m.sources {
        writeln!(
            out,
            "  source {} {}: read {}, accepted {}, rejected {}{}{}",
            s.id,
            s.path,
            s.rows_read,
            s.rows_accepted,
            s.rows_rejected,
            if s.rows_empty_neg > 0 {
                format!(", {} with no negatives", s.rows_empty_neg)
            } else {
                String::new()
            },
            if s.unknown_fields.is_empty() {
                String::new()
            } else {
                format!(", unknown fields ignored: {:?}", s.unknown_fields)
            }
        )?;
        for (reason, n) in &s.rejected_by_reason {
            writeln!(out, "      rejected {reason}: {n}")?;
        }
    }
    Ok(())
}

fn run_export(a: ExportArgs) -> Result<()> {
    let ds = open_dataset(&a.dir)?;
    let output = Output::new(
        &a.output.to_string_lossy(),
        OutputKind::Tree,
        a.overwrite,
        cache(),
    )?;
    let options = rankfeed::export::ExportOptions {
        layout: a.layout.parse()?,
        rows_per_file: a.rows_per_file,
        overwrite: output.overwrite_local(),
        ..Default::default()
    };
    let r = rankfeed::export::export(&ds, output.path(), &options)?;
    let name = output.name();
    say_uploaded(&name, output.finish()?);
    report_cleaned(&r.cleaned);
    let secs = r.elapsed.as_secs_f64();
    let input: u64 = ds.manifest().files.values().map(|f| f.bytes).sum();
    println!(
        "exported {} rows into {} files under {} ({:.1} MB Parquet) in {:.2} s: {:.0} MB/s of dataset read",
        r.rows,
        r.files.len(),
        a.output.display(),
        r.bytes as f64 / 1e6,
        secs,
        input as f64 / 1e6 / secs
    );
    Ok(())
}

fn run_import(a: ImportArgs) -> Result<()> {
    let tokenizer = a
        .tokenizer
        .as_ref()
        .map(TextTokenizer::from_file)
        .transpose()?;
    let output = Output::new(
        &a.output.to_string_lossy(),
        OutputKind::Dataset,
        a.overwrite,
        cache(),
    )?;
    let inputs = remote::inputs(&strings(&a.inputs), cache(), None)?;
    let r = rankfeed::import::import(
        &inputs.paths,
        output.path(),
        tokenizer.as_ref(),
        WriterOptions {
            overwrite: output.overwrite_local(),
            ..WriterOptions::default()
        },
    )?;
    let name = output.name();
    say_uploaded(&name, output.finish()?);
    report_cleaned(&r.cleaned);
    for w in &r.warnings {
        eprintln!("warning: {w}");
    }
    let secs = r.elapsed.as_secs_f64();
    println!(
        "imported {} rows from {} Parquet files ({:.1} MB) in {:.2} s: {:.0} MB/s",
        r.rows,
        r.files,
        r.bytes as f64 / 1e6,
        secs,
        r.bytes as f64 / 1e6 / secs
    );
    write_summary(&mut std::io::stdout().lock(), &r.manifest)?;
    Ok(())
}

fn run_merge(a: MergeArgs) -> Result<()> {
    let output = Output::new(
        &a.output.to_string_lossy(),
        OutputKind::Dataset,
        a.overwrite,
        cache(),
    )?;
    let mut shards = Vec::new();
    let mut fetched = Vec::new();
    for s in strings(&a.shards) {
        let (path, f) = remote::resolve(&s, cache())?;
        if let Some(f) = f {
            say_fetched(&s, &f.report);
            fetched.push(f);
        }
        shards.push(path);
    }
    let m = rankfeed::merge::merge(
        &shards,
        output.path(),
        WriterOptions {
            overwrite: output.overwrite_local(),
            ..WriterOptions::default()
        },
    )?;
    drop(fetched);
    let name = output.name();
    say_uploaded(&name, output.finish()?);
    println!(
        "merged {} datasets into {}",
        a.shards.len(),
        a.output.display()
    );
    write_summary(&mut std::io::stdout().lock(), &m)?;
    Ok(())
}

fn run_mine(a: MineArgs) -> Result<()> {
    use rankfeed::mine::Retriever;
    let ds = open_dataset(&a.dir)?;
    let retriever = match (&a.query_embeddings, &a.passage_embeddings) {
        (Some(q), Some(p)) => {
            let read = |path: &PathBuf| -> Result<rankfeed::mine::Embeddings> {
                if path
                    .extension()
                    .is_some_and(|e| e.eq_ignore_ascii_case("npy"))
                {
                    npy::read_f32_2d(path)
                } else {
                    Ok(rankfeed::mine::read_embeddings(std::slice::from_ref(path))?)
                }
            };
            Retriever::Dense {
                queries: read(q)?,
                passages: read(p)?,
            }
        }
        _ => Retriever::Bm25 {
            index: a.index.clone(),
        },
    };
    use rankfeed::mine::{Corpus, Passages};
    let corpus_args = strings(&a.corpus);
    let dataset_corpus = rankfeed::mine::names_dataset(&corpus_args)
        .then(|| open_dataset(std::path::Path::new(&corpus_args[0])))
        .transpose()?;
    rankfeed::mine::check_corpus_tokenizer(
        a.tokenizer.is_some(),
        dataset_corpus.is_none() && !corpus_args.is_empty(),
    )?;
    let passages = if dataset_corpus.is_none() && !corpus_args.is_empty() {
        let tokenizer = a
            .tokenizer
            .as_ref()
            .map(TextTokenizer::from_file)
            .transpose()?;
        let inputs = remote::inputs(&corpus_args, cache(), None)?;
        Some(Passages::read_parquet(
            &inputs.paths,
            &ds,
            tokenizer.as_ref(),
        )?)
    } else {
        None
    };
    let corpus = match (&dataset_corpus, &passages) {
        (Some(d), _) => Corpus::Dataset(d),
        (None, Some(p)) => Corpus::Passages(p),
        (None, None) => Corpus::Own,
    };
    let out = a.output.to_string_lossy().into_owned();
    let output = Output::new(&out, OutputKind::Dataset, a.overwrite, cache())?;
    let report = rankfeed::mine::mine(
        &ds,
        corpus,
        &retriever,
        &a.options,
        a.shard.map(|(k, n)| (k as u64, n as u64)),
        output.path(),
        WriterOptions {
            overwrite: output.overwrite_local(),
            ..WriterOptions::default()
        },
    )?;
    let name = output.name();
    say_uploaded(&name, output.finish()?);
    let mut o = std::io::stdout().lock();
    if a.json {
        writeln!(o, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        writeln!(
            o,
            "mined {} rows: {} negatives, {} rows short of {} ({} with none), {} positives kept out; \
             {}, ranking {:.2} s -> {}",
            report.rows,
            report.negatives,
            report.rows_short,
            a.options.num_negatives,
            report.rows_without_negatives,
            report.positives_removed,
            if a.query_embeddings.is_some() {
                "dense (no index)".to_string()
            } else {
                format!(
                    "index {} {:.2} s ({:.1} MB)",
                    if report.index_loaded { "loaded" } else { "built" },
                    report.index_seconds,
                    report.index_bytes as f64 / 1e6
                )
            },
            report.search_seconds,
            out
        )?;
    }
    Ok(())
}

fn run_pairs(a: PairsArgs) -> Result<()> {
    let ds = std::sync::Arc::new(open_dataset(&a.dir)?);
    let tokenizer = a
        .tokenizer
        .as_ref()
        .map(TextTokenizer::from_file)
        .transpose()?;
    let plan = rankfeed::score::ScorePlan::new(ds, &a.options)?;
    let out = a.output.to_string_lossy().into_owned();
    let output = Output::new(&out, OutputKind::Tree, a.overwrite, cache())?;
    let r = rankfeed::score::export_pairs(
        &plan,
        output.path(),
        tokenizer.as_ref(),
        output.overwrite_local(),
    )?;
    let name = output.name();
    say_uploaded(&name, output.finish()?);
    report_cleaned(&r.cleaned);
    let p = &r.plan;
    let mut o = std::io::stdout().lock();
    if a.json {
        let v = serde_json::json!({
            "pairs": r.pairs,
            "files": r.files,
            "bytes": r.bytes,
            "seconds": r.elapsed.as_secs_f64(),
            "plan": p,
        });
        writeln!(o, "{}", serde_json::to_string_pretty(&v)?)?;
    } else {
        writeln!(
            o,
            "wrote {} unique pairs (of {} pairs in the rows: {:.1}% fewer to score) in {} batches \
             ({:.2}x padding) into {} files, {:.1} MB, in {:.2} s -> {}",
            r.pairs,
            p.total_pairs,
            if p.total_pairs == 0 {
                0.0
            } else {
                100.0 * (1.0 - p.unique_pairs as f64 / p.total_pairs as f64)
            },
            p.rank_batches,
            p.padded_tokens as f64 / p.tokens.max(1) as f64,
            r.files.len(),
            r.bytes as f64 / 1e6,
            r.elapsed.as_secs_f64(),
            out
        )?;
    }
    Ok(())
}

fn run_attach_scores(a: AttachScoresArgs) -> Result<()> {
    let t = std::time::Instant::now();
    let ds = open_dataset(&a.dir)?;
    let scores = match &a.logs {
        Some(dir) => rankfeed::score::collect(&ds, dir)?,
        None => {
            let inputs = remote::inputs(&strings(&a.scores), cache(), None)?;
            rankfeed::score::read_scores(&ds, &inputs.paths)?
        }
    };
    let out = a.output.to_string_lossy().into_owned();
    let output = Output::new(&out, OutputKind::Dataset, a.overwrite, cache())?;
    let m = rankfeed::score::attach(
        &ds,
        &scores,
        output.path(),
        WriterOptions {
            overwrite: output.overwrite_local(),
            ..WriterOptions::default()
        },
    )?;
    let name = output.name();
    say_uploaded(&name, output.finish()?);
    println!(
        "attached {} scores (one per unique pair) to {} rows in {:.2} s -> {out}",
        scores.len(),
        m.counts.groups,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn run_audit(a: AuditArgs) -> Result<()> {
    let ds = open_dataset(&a.dir)?;
    let other = a.against.as_deref().map(open_dataset).transpose()?;
    let t = std::time::Instant::now();
    let report = rankfeed::audit::audit(&ds, &a.options, other.as_ref(), a.examples)?;
    let mut out = std::io::stdout().lock();
    if a.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        write!(out, "{}", report.summary())?;
        writeln!(out, "  audited in {}", ms(t.elapsed()))?;
    }
    Ok(())
}

fn run_inspect(a: InspectArgs) -> Result<()> {
    let t = std::time::Instant::now();
    let ds = open_dataset(&a.dir)?;
    let open_time = t.elapsed();
    let verify_time = if a.verify {
        let t = std::time::Instant::now();
        ds.validate()?;
        Some(t.elapsed())
    } else {
        None
    };
    let stats = dataset_stats(&ds)?;
    let m = ds.manifest();
    let mut out = std::io::stdout().lock();
    if a.json {
        let v = serde_json::json!({
            "dir": a.dir,
            "format_version": m.format_version,
            "counts": m.counts,
            "dedup_ratio": m.counts.dedup_ratio(),
            "sources": m.sources,
            "shards": m.shards,
            "tokenizer": m.tokenizer,
            "text": m.text,
            "stats": stats,
            "open_ms": open_time.as_secs_f64() * 1e3,
            "verified": verify_time.is_some(),
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(());
    }
    writeln!(
        out,
        "{} (format v{}, written by rankfeed {})",
        a.dir.display(),
        m.format_version,
        m.tool_version
    )?;
    writeln!(out, "  opened in {}", ms(open_time))?;
    if let Some(v) = verify_time {
        writeln!(out, "  verified every row, id and checksum in {}", ms(v))?;
    }
    if let Some(t) = &m.tokenizer {
        writeln!(
            out,
            "  tokenizer {} ({}, vocab {}), pair specials {}, token_type_ids {}, bos {:?} eos {:?} pad {:?} unk {:?}",
            t.fingerprint,
            t.model,
            t.vocab_size,
            t.num_special_pair(),
            t.has_token_type_ids,
            t.bos_id,
            t.eos_id,
            t.pad_id,
            t.unk_id
        )?;
    }
    write_summary(&mut out, m)?;
    let width = if std::io::stdout().is_terminal() {
        40
    } else {
        30
    };
    for (title, d) in [
        ("query tokens", &stats.query_tokens),
        ("passage tokens (unique passages)", &stats.passage_tokens),
        ("positives per query", &stats.pos_per_query),
        ("negatives per query", &stats.neg_per_query),
    ] {
        draw(&mut out, title, d, width)?;
    }
    Ok(())
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn draw(out: &mut impl Write, title: &str, d: &Distribution, width: usize) -> Result<()> {
    writeln!(
        out,
        "\n{title}: n {}  min {}  p50 {}  mean {:.1}  p90 {}  p99 {}  max {}",
        d.count, d.min, d.p50, d.mean, d.p90, d.p99, d.max
    )?;
    let top = d.buckets.iter().map(|b| b.2).max().unwrap_or(0).max(1);
    for &(lo, hi, n) in &d.buckets {
        let label = if lo == hi {
            format!("{lo}")
        } else {
            format!("{lo}-{hi}")
        };
        let len = (n as f64 / top as f64 * width as f64).round() as usize;
        let bar = "█".repeat(len.max(usize::from(n > 0)));
        writeln!(out, "  {label:>13} | {bar:<width$} {n}")?;
    }
    Ok(())
}
