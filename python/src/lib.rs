//! Python bindings: `rankfeed._rankfeed`, wrapped by the pure-Python package `rankfeed`.
//!
//! - Batches are numpy arrays that own the Rust buffers they were written into (no copy);
//!   `torch.from_numpy` takes them without a copy either.
//! - The GIL is released while sampling, collating and converting; prefetch runs in Rust threads
//!   that restart after a fork.
//! - Errors become Python exceptions carrying the Rust context; a panic is caught at the
//!   boundary and becomes a RuntimeError, never a crash.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, TryLockError};
use std::time::Duration;

use numpy::ndarray::{Array1, Array2};
use numpy::{PyArray1, PyArray2};
use pyo3::exceptions::{PyFileExistsError, PyIndexError, PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};
use rankfeed::collate::{Batch, Ids};
use rankfeed::convert::{ConvertOptions, OnError, TextOptions};
use rankfeed::loader::{Loader, LoaderState, Resumed};
use rankfeed::options::Options;
use rankfeed::remote::{Cache, Output, OutputKind};
use rankfeed::sample::Selection;
use rankfeed::writer::WriterOptions;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

pyo3::create_exception!(
    _rankfeed,
    CorruptDatasetError,
    PyOSError,
    "A dataset file is corrupt, truncated, inconsistent or of an unsupported version."
);

/// A rankfeed error as the matching Python exception.
fn to_py(e: rankfeed::Error) -> PyErr {
    use rankfeed::Error as E;
    let msg = error_chain(&e);
    if e.is_corrupt() {
        return CorruptDatasetError::new_err(msg);
    }
    match e {
        E::Io { .. } | E::Arrow(_) | E::Parquet { .. } | E::Remote { .. } => {
            PyOSError::new_err(msg)
        }
        E::Exists { .. } => PyFileExistsError::new_err(msg),
        E::OutOfRange { .. } => PyIndexError::new_err(msg),
        E::Internal(_) => PyRuntimeError::new_err(msg),
        // Row, Input, Tokenizer, Argument, and variants added later.
        _ => PyValueError::new_err(msg),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

/// Run `f`, turning a panic into a RuntimeError: no panic crosses into Python.
fn guard<T>(f: impl FnOnce() -> PyResult<T>) -> PyResult<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(PyRuntimeError::new_err(format!(
                "rankfeed internal error (please report it): {what}"
            )))
        }
    }
}

/// Rust errors inside `py.detach` closures: carried out as `rankfeed::Error` and converted
/// after the GIL is back.
fn detached<T: Send>(
    py: Python<'_>,
    f: impl FnOnce() -> rankfeed::Result<T> + Send,
) -> PyResult<T> {
    guard(|| py.detach(f).map_err(to_py))
}

fn json_to_py<'py>(py: Python<'py>, v: &impl serde::Serialize) -> PyResult<Bound<'py, PyAny>> {
    let s = serde_json::to_string(v).map_err(|e| PyValueError::new_err(e.to_string()))?;
    py.import("json")?.call_method1("loads", (s,))
}

fn ids_2d<'py>(py: Python<'py>, ids: Ids, rows: usize, len: usize) -> PyResult<Bound<'py, PyAny>> {
    let shape_err = |e: numpy::ndarray::ShapeError| PyRuntimeError::new_err(e.to_string());
    Ok(match ids {
        Ids::I64(v) => PyArray2::from_owned_array(
            py,
            Array2::from_shape_vec((rows, len), v).map_err(shape_err)?,
        )
        .into_any(),
        Ids::I32(v) => PyArray2::from_owned_array(
            py,
            Array2::from_shape_vec((rows, len), v).map_err(shape_err)?,
        )
        .into_any(),
    })
}

fn ids_1d<'py>(py: Python<'py>, ids: Ids) -> Bound<'py, PyAny> {
    match ids {
        Ids::I64(v) => PyArray1::from_owned_array(py, Array1::from_vec(v)).into_any(),
        Ids::I32(v) => PyArray1::from_owned_array(py, Array1::from_vec(v)).into_any(),
    }
}

/// A batch as a dict of numpy arrays that own the Rust buffers (no copy). Padded batches hold
/// `[rows, len]` arrays; packed ones `[T]` arrays with position_ids, cu_seqlens, max_seqlen.
fn batch_to_py<'py>(py: Python<'py>, b: Batch, group_size: usize) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    let (rows, len) = (b.rows, b.len);
    let max_seqlen = b.max_seqlen();
    let mut b = b;
    if let Some(e) = b.embedder.take() {
        embedder_to_py(py, &d, e)?;
        d.set_item(
            "no_in_batch_neg",
            numpy::PyArray::from_owned_array(py, numpy::ndarray::arr0(b.no_in_batch_neg)),
        )?;
        if let Some(s) = b.teacher_scores.take() {
            d.set_item(
                "teacher_scores",
                PyArray1::from_owned_array(py, Array1::from_vec(s)),
            )?;
        }
        meta_to_py(py, &d, &b.selections, b.overlong, group_size)?;
        return Ok(d);
    }
    let grid = |ids: Ids| -> PyResult<Bound<'py, PyAny>> {
        if b.cu_seqlens.is_some() {
            Ok(ids_1d(py, ids))
        } else {
            ids_2d(py, ids, rows, len)
        }
    };
    d.set_item("input_ids", grid(b.input_ids)?)?;
    if let Some(m) = b.attention_mask {
        d.set_item("attention_mask", grid(m)?)?;
    }
    if let Some(t) = b.token_type_ids {
        d.set_item("token_type_ids", grid(t)?)?;
    }
    if let (Some(p), Some(cu)) = (b.position_ids, b.cu_seqlens) {
        d.set_item("position_ids", ids_1d(py, p))?;
        d.set_item(
            "cu_seqlens",
            PyArray1::from_owned_array(py, Array1::from_vec(cu)),
        )?;
        d.set_item(
            "max_seqlen",
            numpy::PyArray::from_owned_array(py, numpy::ndarray::arr0(max_seqlen as i64)),
        )?;
    }
    if let Some(s) = b.teacher_scores {
        d.set_item(
            "teacher_scores",
            PyArray1::from_owned_array(py, Array1::from_vec(s)),
        )?;
    }
    if let Some(q) = b.query_lengths {
        d.set_item("query_lengths", ids_1d(py, q))?;
    }
    if let Some(p) = b.prompt_lengths.take() {
        d.set_item("prompt_lengths", ids_1d(py, p))?;
    }
    meta_to_py(py, &d, &b.selections, b.overlong, group_size)?;
    Ok(d)
}

/// The embedder arrays: `query_*` and `passage_*` keys, each one array, or a list of arrays
/// (one per chunk) with `sub_batch_size`.
fn embedder_to_py<'py>(
    py: Python<'py>,
    d: &Bound<'py, PyDict>,
    e: rankfeed::collate::EmbedderArrays,
) -> PyResult<()> {
    for (side, chunks) in [("query", e.queries), ("passage", e.passages)] {
        let mut keys: Vec<(&str, Vec<Bound<'py, PyAny>>)> = vec![
            ("input_ids", Vec::new()),
            ("attention_mask", Vec::new()),
            ("token_type_ids", Vec::new()),
        ];
        for c in chunks {
            let (rows, len) = (c.rows, c.len);
            for (k, ids) in [Some(c.input_ids), c.attention_mask, c.token_type_ids]
                .into_iter()
                .enumerate()
            {
                if let Some(ids) = ids {
                    keys[k].1.push(ids_2d(py, ids, rows, len)?);
                }
            }
        }
        for (name, arrays) in keys {
            if arrays.is_empty() {
                continue;
            }
            let key = format!("{side}_{name}");
            if e.sub_batched {
                d.set_item(key, PyList::new(py, arrays)?)?;
            } else {
                d.set_item(key, arrays.into_iter().next())?;
            }
        }
    }
    Ok(())
}

/// The groups a batch holds (`rows`, `pos`, `neg`) and `overlong`.
fn meta_to_py<'py>(
    py: Python<'py>,
    d: &Bound<'py, PyDict>,
    selections: &[Selection],
    overlong: u32,
    group_size: usize,
) -> PyResult<()> {
    let n = selections.len();
    let negs = group_size.saturating_sub(1);
    let row_ids: Vec<i64> = selections.iter().map(|s| s.row as i64).collect();
    let pos: Vec<i32> = selections.iter().map(|s| s.pos as i32).collect();
    let neg: Vec<i32> = selections
        .iter()
        .flat_map(|s| s.neg.iter().map(|&j| j as i32))
        .collect();
    d.set_item(
        "rows",
        PyArray1::from_owned_array(py, Array1::from_vec(row_ids)),
    )?;
    d.set_item("pos", PyArray1::from_owned_array(py, Array1::from_vec(pos)))?;
    let neg = Array2::from_shape_vec((n, negs), neg)
        .map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
    d.set_item("neg", PyArray2::from_owned_array(py, neg))?;
    // A 0-d array, so that every value of a batch is a numpy array.
    d.set_item(
        "overlong",
        numpy::PyArray::from_owned_array(py, numpy::ndarray::arr0(overlong as i64)),
    )?;
    Ok(())
}

/// A non-negative integer argument, or `default` when it is None: a negative value, a value
/// beyond u64 or a non-integer is a ValueError naming the argument (not an OverflowError).
fn uint(name: &str, v: Option<&Bound<'_, PyAny>>, default: u64) -> PyResult<u64> {
    let Some(v) = v else { return Ok(default) };
    let bad = |why: &str| PyValueError::new_err(format!("{name} must be {why}, got {v}"));
    if v.is_instance_of::<pyo3::types::PyBool>() {
        return Err(bad("an integer"));
    }
    let n: i128 = v.extract().map_err(|_| bad("an integer"))?;
    u64::try_from(n).map_err(|_| {
        if n < 0 {
            bad("non-negative")
        } else {
            bad("below 2**64")
        }
    })
}

fn parse<T: std::str::FromStr<Err = rankfeed::Error>>(s: &str) -> PyResult<T> {
    s.parse().map_err(to_py)
}

/// Convert JSON/JSONL inputs into a dataset directory. See `rankfeed.convert`.
#[pyfunction]
#[pyo3(signature = (inputs, tokenizer, out, *, query_instruction=None, query_instruction_format=None,
    passage_instruction=None, passage_instruction_format=None, sep_token=None,
    default_prompt=None, on_error="fail", overwrite=false, threads=None, rows_per_batch=None, progress=None,
    shard=None, max_line_bytes=None, convention="reranker", cache_dir=None))]
#[allow(clippy::too_many_arguments)]
fn convert<'py>(
    py: Python<'py>,
    inputs: Vec<String>,
    tokenizer: PathBuf,
    out: String,
    query_instruction: Option<String>,
    query_instruction_format: Option<String>,
    passage_instruction: Option<String>,
    passage_instruction_format: Option<String>,
    sep_token: Option<String>,
    default_prompt: Option<String>,
    on_error: &str,
    overwrite: bool,
    threads: Option<usize>,
    rows_per_batch: Option<usize>,
    progress: Option<Py<PyAny>>,
    shard: Option<(usize, usize)>,
    max_line_bytes: Option<usize>,
    convention: &str,
    cache_dir: Option<PathBuf>,
) -> PyResult<Bound<'py, PyAny>> {
    let cache = Cache::new(cache_dir, None);
    let output = detached(py, || {
        Output::new(&out, OutputKind::Dataset, overwrite, &cache)
    })?;
    let inputs = detached(py, || rankfeed::remote::inputs(&inputs, &cache, shard))?;
    let on_error = match on_error {
        "fail" => OnError::Fail,
        "skip" => OnError::Skip,
        other => {
            return Err(PyValueError::new_err(format!(
                "on_error {other:?}: expected 'fail' or 'skip'"
            )))
        }
    };
    if let Some(n) = threads {
        // Only the first configuration of the global pool takes effect.
        let _ = rankfeed::convert::configure_threads(n);
    }
    // None: the library's defaults (defined once, in `TextOptions::default`).
    let d = TextOptions::default();
    let options = ConvertOptions {
        text: TextOptions {
            query_instruction,
            query_instruction_format: query_instruction_format
                .unwrap_or(d.query_instruction_format),
            passage_instruction,
            passage_instruction_format: passage_instruction_format
                .unwrap_or(d.passage_instruction_format),
            sep_token: sep_token.unwrap_or(d.sep_token),
            default_prompt,
            convention: parse(convention)?,
        },
        on_error,
        writer: WriterOptions {
            rows_per_batch: rows_per_batch.unwrap_or(rankfeed::format::DEFAULT_ROWS_PER_BATCH),
            overwrite: output.overwrite_local(),
        },
        input_names: inputs.names.clone(),
        shard,
        max_line_bytes: max_line_bytes.unwrap_or(rankfeed::convert::source::DEFAULT_MAX_LINE_BYTES),
        cancel: Some(Arc::new(AtomicBool::new(false))),
        ..ConvertOptions::default()
    };
    let cancel = options.cancel.clone();
    // The first exception raised by the callback or by a signal handler (Ctrl-C): it stops
    // the conversion and is raised again once the conversion has cleaned up.
    let raised: Mutex<Option<PyErr>> = Mutex::new(None);
    let tok = detached(py, || {
        rankfeed::tokenizer::TextTokenizer::from_file(&tokenizer)
    })?;
    let report = detached(py, || {
        rankfeed::convert::convert(&inputs.paths, &tok, output.path(), &options, &mut |p| {
            let result = Python::attach(|py| {
                py.check_signals()?;
                if let Some(cb) = &progress {
                    cb.call1(
                        py,
                        (
                            p.bytes_read,
                            p.bytes_total,
                            p.rows,
                            p.rejected,
                            p.tokens,
                            p.elapsed.as_secs_f64(),
                        ),
                    )?;
                }
                Ok::<(), PyErr>(())
            });
            if let Err(e) = result {
                if let Ok(mut slot) = raised.lock() {
                    slot.get_or_insert(e);
                }
                if let Some(c) = &cancel {
                    c.store(true, Ordering::Relaxed);
                }
            }
        })
    });
    if let Some(e) = raised.into_inner().ok().flatten() {
        return Err(e);
    }
    let report = report?;
    let uploaded = detached(py, || output.finish())?;
    let summary = serde_json::json!({
        "uploaded": uploaded.map(upload_json),
        "output": out,
        "seconds": report.elapsed.as_secs_f64(),
        "texts_tokenized": report.texts_tokenized,
        "tokens_tokenized": report.tokens_tokenized,
        "dedup_ratio": report.manifest.counts.dedup_ratio(),
        "counts": report.manifest.counts,
        "sources": report.manifest.sources,
        "cleaned": report.cleaned,
        "warnings": report.warnings,
    });
    json_to_py(py, &summary)
}

/// Export a dataset to Parquet (`layout` "flat" or "tables"); returns a summary dict.
#[pyfunction]
#[pyo3(signature = (dataset, out, *, layout="flat", rows_per_file=1_000_000, overwrite=false, cache_dir=None))]
fn export<'py>(
    py: Python<'py>,
    dataset: String,
    out: String,
    layout: &str,
    rows_per_file: usize,
    overwrite: bool,
    cache_dir: Option<PathBuf>,
) -> PyResult<Bound<'py, PyAny>> {
    let cache = Cache::new(cache_dir, None);
    let layout = parse(layout)?;
    let (r, uploaded) = detached(py, move || {
        let output = Output::new(&out, OutputKind::Tree, overwrite, &cache)?;
        let options = rankfeed::export::ExportOptions {
            layout,
            rows_per_file,
            overwrite: output.overwrite_local(),
            ..Default::default()
        };
        let (dir, _fetched) = rankfeed::remote::resolve(&dataset, &cache)?;
        let ds = rankfeed::Dataset::open(&dir)?;
        let r = rankfeed::export::export(&ds, output.path(), &options)?;
        Ok::<_, rankfeed::Error>((r, output.finish()?))
    })?;
    json_to_py(
        py,
        &serde_json::json!({
            "uploaded": uploaded.map(upload_json),
            "files": r.files,
            "bytes": r.bytes,
            "rows": r.rows,
            "seconds": r.elapsed.as_secs_f64(),
        }),
    )
}

/// Import pre-tokenized Parquet (flat files or directories, or a tables directory) into a
/// dataset; `tokenizer` supplies the tokenizer facts when the files carry no rankfeed metadata.
#[pyfunction]
#[pyo3(signature = (inputs, out, *, tokenizer=None, overwrite=false, cache_dir=None))]
fn import_parquet<'py>(
    py: Python<'py>,
    inputs: Vec<String>,
    out: String,
    tokenizer: Option<PathBuf>,
    overwrite: bool,
    cache_dir: Option<PathBuf>,
) -> PyResult<Bound<'py, PyAny>> {
    let cache = Cache::new(cache_dir, None);
    let (r, uploaded) = detached(py, move || {
        let tok = tokenizer
            .map(rankfeed::tokenizer::TextTokenizer::from_file)
            .transpose()?;
        let output = Output::new(&out, OutputKind::Dataset, overwrite, &cache)?;
        let inputs = rankfeed::remote::inputs(&inputs, &cache, None)?;
        let r = rankfeed::import::import(
            &inputs.paths,
            output.path(),
            tok.as_ref(),
            WriterOptions {
                overwrite: output.overwrite_local(),
                ..WriterOptions::default()
            },
        )?;
        Ok::<_, rankfeed::Error>((r, output.finish()?))
    })?;
    json_to_py(
        py,
        &serde_json::json!({
            "uploaded": uploaded.map(upload_json),
            "rows": r.rows,
            "files": r.files,
            "bytes": r.bytes,
            "seconds": r.elapsed.as_secs_f64(),
            "counts": r.manifest.counts,
            "warnings": r.warnings,
        }),
    )
}

/// Merge datasets (shards of one conversion, joined in shard order; or whole datasets,
/// concatenated in order) into one, without tokenizing again. Every input is verified first.
#[pyfunction]
#[pyo3(signature = (shards, out, *, overwrite=false, cache_dir=None))]
fn merge<'py>(
    py: Python<'py>,
    shards: Vec<String>,
    out: String,
    overwrite: bool,
    cache_dir: Option<PathBuf>,
) -> PyResult<Bound<'py, PyAny>> {
    let cache = Cache::new(cache_dir, None);
    let m = detached(py, move || {
        let output = Output::new(&out, OutputKind::Dataset, overwrite, &cache)?;
        let mut paths = Vec::new();
        let mut fetched = Vec::new();
        for s in &shards {
            let (p, f) = rankfeed::remote::resolve(s, &cache)?;
            paths.push(p);
            fetched.extend(f);
        }
        let m = rankfeed::merge::merge(
            &paths,
            output.path(),
            WriterOptions {
                overwrite: output.overwrite_local(),
                ..WriterOptions::default()
            },
        )?;
        drop(fetched);
        output.finish()?;
        Ok::<_, rankfeed::Error>(m)
    })?;
    json_to_py(py, &m.counts)
}

/// Mine hard negatives for every row of `dataset` into a new dataset at `out` (see
/// `rankfeed.mine`); returns the report.
#[pyfunction]
#[pyo3(signature = (dataset, out, *, corpus_dataset=None, corpus_files=None, tokenizer=None, index=None, query_embeddings=None, passage_embeddings=None, shard=None, overwrite=false, cache_dir=None, **options))]
#[allow(clippy::too_many_arguments)]
fn _mine<'py>(
    py: Python<'py>,
    dataset: PyRef<'_, PyDataset>,
    out: String,
    corpus_dataset: Option<PyRef<'_, PyDataset>>,
    corpus_files: Option<Vec<PathBuf>>,
    tokenizer: Option<PathBuf>,
    index: Option<PathBuf>,
    query_embeddings: Option<numpy::PyReadonlyArray2<'py, f32>>,
    passage_embeddings: Option<numpy::PyReadonlyArray2<'py, f32>>,
    shard: Option<(u64, u64)>,
    overwrite: bool,
    cache_dir: Option<PathBuf>,
    options: Option<Bound<'_, PyDict>>,
) -> PyResult<Bound<'py, PyAny>> {
    use rankfeed::mine::{Embeddings, MineOptions, Retriever};
    let map = kwargs_json(options.as_ref())?;
    let options: MineOptions = serde_json::from_value(map.into())
        .map_err(|e| PyValueError::new_err(format!("mine: {e}")))?;
    let emb = |a: numpy::PyReadonlyArray2<'py, f32>| {
        let a = a.as_array();
        Embeddings {
            values: a.iter().copied().collect(),
            dim: a.ncols(),
        }
    };
    if index.is_some() && (query_embeddings.is_some() || passage_embeddings.is_some()) {
        return Err(PyValueError::new_err(
            "index: the BM25 index file is for BM25 mining; dense mining has no index",
        ));
    }
    let retriever = match (query_embeddings, passage_embeddings) {
        (Some(q), Some(p)) => Retriever::Dense {
            queries: emb(q),
            passages: emb(p),
        },
        (None, None) => Retriever::Bm25 { index },
        _ => {
            return Err(PyValueError::new_err(
                "query_embeddings and passage_embeddings go together",
            ))
        }
    };
    let ds = dataset.inner.clone();
    let other = corpus_dataset.map(|d| d.inner.clone());
    let cache = Cache::new(cache_dir, None);
    let report = detached(py, move || {
        use rankfeed::mine::{Corpus, Passages};
        let tokenizer = tokenizer
            .map(rankfeed::tokenizer::TextTokenizer::from_file)
            .transpose()?;
        // A path naming a dataset opens it; other paths are Parquet passages.
        let names: Vec<String> = corpus_files
            .iter()
            .flatten()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        let (other, corpus_files) = match other {
            Some(o) => (Some(o), None),
            None if rankfeed::mine::names_dataset(&names) => {
                let opened = if rankfeed::remote::is_url(&names[0]) {
                    let (d, fetched) = rankfeed::remote::open(&names[0], &cache)?;
                    // Held to the end of the call: no eviction removes the copy while it is read.
                    std::mem::forget(fetched);
                    d
                } else {
                    rankfeed::Dataset::open(&names[0])?
                };
                (Some(Arc::new(opened)), None)
            }
            None => (None, corpus_files),
        };
        rankfeed::mine::check_corpus_tokenizer(tokenizer.is_some(), corpus_files.is_some())?;
        let passages = corpus_files
            .map(|f| Passages::read_parquet(&f, &ds, tokenizer.as_ref()))
            .transpose()?;
        let corpus = match (&other, &passages) {
            (Some(o), _) => Corpus::Dataset(o),
            (None, Some(p)) => Corpus::Passages(p),
            (None, None) => Corpus::Own,
        };
        let output = Output::new(&out, OutputKind::Dataset, overwrite, &cache)?;
        let r = rankfeed::mine::mine(
            &ds,
            corpus,
            &retriever,
            &options,
            shard,
            output.path(),
            WriterOptions {
                overwrite: output.overwrite_local(),
                ..WriterOptions::default()
            },
        )?;
        output.finish()?;
        Ok::<_, rankfeed::Error>(r)
    })?;
    json_to_py(py, &report)
}

/// Teacher scoring of one rank (see `rankfeed.score`): the plan of `dataset`'s unique pairs
/// under `options`, and its log in `work_dir`.
#[pyclass(name = "Scorer", module = "rankfeed._rankfeed")]
struct PyScorer {
    plan: Arc<rankfeed::score::ScorePlan>,
    log: Arc<Mutex<rankfeed::score::ScoreLog>>,
    work_dir: PathBuf,
}

/// The scorer of rank `rank` (an option) of `dataset` with its log in `work_dir` (resumed when
/// it holds this plan's log).
#[pyfunction]
#[pyo3(signature = (dataset, work_dir, **options))]
fn _scorer(
    py: Python<'_>,
    dataset: PyRef<'_, PyDataset>,
    work_dir: PathBuf,
    options: Option<Bound<'_, PyDict>>,
) -> PyResult<PyScorer> {
    let map = kwargs_json(options.as_ref())?;
    let ds = dataset.inner.clone();
    let dir = work_dir.clone();
    let (plan, log) = detached(py, move || {
        let options = Options::from_json(&map)?;
        let plan = rankfeed::score::ScorePlan::new(ds, &options)?;
        let log = rankfeed::score::ScoreLog::open(&dir, &plan)?;
        Ok((plan, log))
    })?;
    Ok(PyScorer {
        plan: Arc::new(plan),
        log: Arc::new(Mutex::new(log)),
        work_dir,
    })
}

impl PyScorer {
    fn log(&self) -> MutexGuard<'_, rankfeed::score::ScoreLog> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[pymethods]
impl PyScorer {
    /// Batches of this rank.
    fn __len__(&self) -> usize {
        self.plan.len() as usize
    }

    /// The next batch to score (the ones before it are in the log).
    #[getter]
    fn next(&self) -> u64 {
        self.log().next()
    }

    /// Whether every batch of this rank is scored.
    #[getter]
    fn complete(&self) -> bool {
        self.log().is_complete()
    }

    /// The work dir holding the logs.
    #[getter]
    fn work_dir(&self) -> String {
        self.work_dir.display().to_string()
    }

    /// The plan's figures: unique_pairs, total_pairs, batches, rank_batches, rank_pairs,
    /// tokens, padded_tokens, over_budget; and resumed_at, dropped_bytes of the log.
    fn report<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let plan = self.plan.clone();
        let r = detached(py, move || plan.report())?;
        let mut v = serde_json::to_value(r).map_err(|e| PyValueError::new_err(e.to_string()))?;
        let log = self.log();
        v["next"] = serde_json::json!(log.next());
        v["dropped_bytes"] = serde_json::json!(log.dropped_bytes());
        json_to_py(py, &v)
    }

    /// Batch `index` of this rank: the arrays of `Dataset.loader` for one pair a row
    /// (input_ids, attention_mask, token_type_ids; packed: position_ids, cu_seqlens,
    /// max_seqlen), and `pairs`, the pair id of each row.
    fn batch<'py>(&self, py: Python<'py>, index: u64) -> PyResult<Bound<'py, PyDict>> {
        let plan = self.plan.clone();
        let b = detached(py, move || plan.batch(index))?;
        let d = batch_to_py(py, b.batch, 1)?;
        for k in ["rows", "pos", "neg"] {
            d.del_item(k)?;
        }
        let pairs: Vec<i64> = b.pairs.iter().map(|&p| p as i64).collect();
        d.set_item(
            "pairs",
            PyArray1::from_owned_array(py, Array1::from_vec(pairs)),
        )?;
        Ok(d)
    }

    /// Record the scores of batch `index` (the next one): one finite float32 per pair.
    fn record(
        &self,
        py: Python<'_>,
        index: u64,
        scores: numpy::PyReadonlyArray1<'_, f32>,
    ) -> PyResult<()> {
        let scores: Vec<f32> = scores.as_array().iter().copied().collect();
        let plan = self.plan.clone();
        let log = self.log.clone();
        detached(py, move || {
            let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
            log.append(&plan, index, &scores)
        })
    }

    /// Ranks of the work dir's logs that have not finished.
    fn pending(&self, py: Python<'_>) -> PyResult<Vec<u64>> {
        let plan = self.plan.clone();
        let dir = self.work_dir.clone();
        detached(py, move || {
            Ok(rankfeed::score::pending(plan.dataset(), &dir)?.0)
        })
    }

    /// Once every rank has finished, attach the scores into a new dataset at `out` (once: a
    /// rank finding `out` holding them already leaves it). Returns "attached", "present", or
    /// "pending" (other ranks have not finished).
    #[pyo3(signature = (out, *, overwrite=false, cache_dir=None))]
    fn attach(
        &self,
        py: Python<'_>,
        out: String,
        overwrite: bool,
        cache_dir: Option<PathBuf>,
    ) -> PyResult<&'static str> {
        let plan = self.plan.clone();
        let dir = self.work_dir.clone();
        let cache = Cache::new(cache_dir, None);
        let done = detached(py, move || {
            let ds = plan.dataset();
            rankfeed::score::finish(ds, &dir, Path::new(&out), |scores| {
                write_scored(ds, scores, &out, overwrite, &cache)
            })
        })?;
        Ok(match done {
            rankfeed::score::Finished::Pending(..) => "pending",
            rankfeed::score::Finished::Attached => "attached",
            rankfeed::score::Finished::Present => "present",
        })
    }
}

/// Write `ds` with `scores` (one per unique pair) at `out` (a path or URL).
fn write_scored(
    ds: &rankfeed::Dataset,
    scores: &[f32],
    out: &str,
    overwrite: bool,
    cache: &Cache,
) -> rankfeed::Result<()> {
    let output = Output::new(out, OutputKind::Dataset, overwrite, cache)?;
    rankfeed::score::attach(
        ds,
        scores,
        output.path(),
        WriterOptions {
            overwrite: output.overwrite_local(),
            ..WriterOptions::default()
        },
    )?;
    output.finish().map(|_| ())
}

/// Attach `scores` (float32, one per unique pair in pair-id order) to `dataset` as a new
/// dataset at `out`; returns its counts.
#[pyfunction]
#[pyo3(signature = (dataset, scores, out, *, overwrite=false, cache_dir=None))]
fn _attach_scores<'py>(
    py: Python<'py>,
    dataset: PyRef<'_, PyDataset>,
    scores: numpy::PyReadonlyArray1<'py, f32>,
    out: String,
    overwrite: bool,
    cache_dir: Option<PathBuf>,
) -> PyResult<()> {
    let scores: Vec<f32> = scores.as_array().iter().copied().collect();
    let ds = dataset.inner.clone();
    let cache = Cache::new(cache_dir, None);
    detached(py, move || {
        write_scored(&ds, &scores, &out, overwrite, &cache)
    })
}

/// The scores Parquet files `paths` give `dataset`'s unique pairs, in pair-id order (every
/// pair exactly once; see `rankfeed attach-scores`).
#[pyfunction]
fn _read_scores<'py>(
    py: Python<'py>,
    dataset: PyRef<'_, PyDataset>,
    paths: Vec<PathBuf>,
) -> PyResult<Bound<'py, numpy::PyArray1<f32>>> {
    let ds = dataset.inner.clone();
    let scores = detached(py, move || rankfeed::score::read_scores(&ds, &paths))?;
    Ok(numpy::PyArray1::from_vec(py, scores))
}

fn upload_json(r: rankfeed::remote::UploadReport) -> serde_json::Value {
    serde_json::json!({"files": r.files, "bytes": r.bytes, "deleted": r.deleted, "seconds": r.seconds})
}

fn fetch_json(r: &rankfeed::remote::FetchReport) -> serde_json::Value {
    serde_json::json!({
        "seal": r.seal, "downloaded": r.downloaded, "files": r.files, "bytes": r.bytes,
        "requests": r.requests, "retries": r.retries, "waited_seconds": r.waited_seconds,
        "seconds": r.seconds, "evicted": r.evicted,
    })
}

/// Fetch the dataset at `url` into the cache (a no-op on a hit); returns the local copy's
/// path and what the fetch did.
#[pyfunction]
#[pyo3(signature = (url, *, cache_dir=None, cache_max_bytes=None))]
fn fetch<'py>(
    py: Python<'py>,
    url: String,
    cache_dir: Option<PathBuf>,
    cache_max_bytes: Option<u64>,
) -> PyResult<Bound<'py, PyAny>> {
    let cache = Cache::new(cache_dir, cache_max_bytes);
    let f = detached(py, || rankfeed::remote::fetch(&url, &cache))?;
    let mut v = fetch_json(&f.report);
    v["path"] = serde_json::json!(f.dir);
    json_to_py(py, &v)
}

/// Delete every object under `url` (a dataset's manifest first); returns the count.
#[pyfunction]
fn remove_url(py: Python<'_>, url: String) -> PyResult<u64> {
    detached(py, || rankfeed::remote::remove_tree(&url))
}

/// Whether `s` is an object-store URL rather than a local path.
#[pyfunction]
fn is_url(s: &str) -> bool {
    rankfeed::remote::is_url(s)
}

/// Upload the dataset directory `dataset` to `url`, the manifest last.
#[pyfunction]
#[pyo3(signature = (dataset, url, *, overwrite=false))]
fn upload<'py>(
    py: Python<'py>,
    dataset: PathBuf,
    url: String,
    overwrite: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let r = detached(py, || rankfeed::remote::upload(&dataset, &url, overwrite))?;
    json_to_py(py, &upload_json(r))
}

/// A converted dataset, memory-mapped.
#[pyclass(name = "Dataset", module = "rankfeed._rankfeed", frozen, subclass)]
struct PyDataset {
    inner: Arc<rankfeed::Dataset>,
    /// The URL it was opened from, and what the fetch did.
    /// The fetch holds the cache entry's shared lock while the dataset lives (no eviction
    /// elsewhere removes the copy).
    remote: Option<(String, Option<PathBuf>, rankfeed::remote::Fetched)>,
}

#[pymethods]
impl PyDataset {
    #[new]
    #[pyo3(signature = (path, *, cache_dir=None, cache_max_bytes=None))]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        cache_dir: Option<PathBuf>,
        cache_max_bytes: Option<u64>,
    ) -> PyResult<Self> {
        let arg = path.to_string_lossy().into_owned();
        if rankfeed::remote::is_url(&arg) {
            let cache = Cache::new(cache_dir.clone(), cache_max_bytes);
            let (inner, fetched) = detached(py, || rankfeed::remote::open(&arg, &cache))?;
            return Ok(PyDataset {
                inner: Arc::new(inner),
                remote: Some((arg, cache_dir, fetched)),
            });
        }
        let inner = detached(py, || rankfeed::Dataset::open(&path))?;
        Ok(PyDataset {
            inner: Arc::new(inner),
            remote: None,
        })
    }

    /// The URL the dataset was opened from (None for a local directory).
    #[getter]
    fn url(&self) -> Option<String> {
        self.remote.as_ref().map(|r| r.0.clone())
    }

    /// The cache directory given for a URL (None: the default one).
    #[getter]
    fn cache_dir(&self) -> Option<PathBuf> {
        self.remote.as_ref().and_then(|r| r.1.clone())
    }

    /// What opening a URL did (downloaded or a cache hit, files, bytes, requests, retries,
    /// seconds); None for a local directory.
    #[getter]
    fn fetch_report<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        self.remote
            .as_ref()
            .map(|r| json_to_py(py, &fetch_json(&r.2.report)))
            .transpose()
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    fn __repr__(&self) -> String {
        format!(
            "rankfeed.Dataset({:?}, groups={}, passages={})",
            self.inner.dir().display().to_string(),
            self.inner.len(),
            self.inner.num_passages()
        )
    }

    /// The dataset directory.
    #[getter]
    fn path(&self) -> String {
        self.inner.dir().display().to_string()
    }

    /// Number of unique passages.
    #[getter]
    fn num_passages(&self) -> usize {
        self.inner.num_passages()
    }

    /// Number of stored prompts.
    #[getter]
    fn num_prompts(&self) -> usize {
        self.inner.num_prompts()
    }

    /// The manifest, as a dict.
    #[getter]
    fn manifest<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        json_to_py(py, self.inner.manifest())
    }

    /// One group: query ids, positive/negative passage ids, scores, prompt id, source id.
    fn group<'py>(&self, py: Python<'py>, row: usize) -> PyResult<Bound<'py, PyDict>> {
        guard(|| {
            let g = self.inner.group(row).map_err(to_py)?;
            let d = PyDict::new(py);
            d.set_item("query", PyArray1::from_slice(py, g.query))?;
            d.set_item("pos", PyArray1::from_slice(py, g.pos))?;
            d.set_item("neg", PyArray1::from_slice(py, g.neg))?;
            d.set_item(
                "pos_scores",
                g.pos_scores.map(|s| PyArray1::from_slice(py, s)),
            )?;
            d.set_item(
                "neg_scores",
                g.neg_scores.map(|s| PyArray1::from_slice(py, s)),
            )?;
            d.set_item("prompt", g.prompt)?;
            d.set_item("source", g.source)?;
            Ok(d)
        })
    }

    /// Token ids of a passage (int32).
    fn passage<'py>(&self, py: Python<'py>, id: i32) -> PyResult<Bound<'py, PyArray1<i32>>> {
        guard(|| {
            Ok(PyArray1::from_slice(
                py,
                self.inner.passage(id).map_err(to_py)?,
            ))
        })
    }

    /// Token ids of a prompt (int32).
    fn prompt<'py>(&self, py: Python<'py>, id: u32) -> PyResult<Bound<'py, PyArray1<i32>>> {
        guard(|| {
            Ok(PyArray1::from_slice(
                py,
                self.inner.prompt_tokens(id).map_err(to_py)?,
            ))
        })
    }

    /// Length distributions (one pass over the data).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let ds = self.inner.clone();
        let s = detached(py, move || rankfeed::stats::dataset_stats(&ds))?;
        json_to_py(py, &s)
    }

    /// Check every row, id and checksum (linear in the data); raises CorruptDatasetError.
    fn validate(&self, py: Python<'_>) -> PyResult<()> {
        let ds = self.inner.clone();
        detached(py, move || ds.validate())
    }

    /// The audit of `rankfeed audit` as a dict (see `rankfeed.Dataset.audit`): findings with
    /// counts and example rows, truncation at the loader `options` given, and with `against`
    /// (another Dataset) the exact overlap with it.
    #[pyo3(signature = (*, against=None, examples=rankfeed::audit::DEFAULT_EXAMPLES, **options))]
    fn audit<'py>(
        &self,
        py: Python<'py>,
        against: Option<PyRef<'_, PyDataset>>,
        examples: usize,
        options: Option<Bound<'_, PyDict>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let map = kwargs_json(options.as_ref())?;
        let ds = self.inner.clone();
        let other = against.map(|o| o.inner.clone());
        let report = detached(py, move || {
            let options = Options::from_json(&map)?;
            rankfeed::audit::audit(&ds, &options, other.as_deref(), examples)
        })?;
        json_to_py(py, &report)
    }

    /// A `Loader` of batches (dicts of numpy arrays) with `options` (see
    /// `rankfeed.Dataset.loader`, whose signature and documentation are derived from
    /// `rankfeed::options::Options`); `epoch` is the epoch to start at.
    #[pyo3(signature = (*, epoch=None, **options))]
    fn loader(
        &self,
        py: Python<'_>,
        epoch: Option<Bound<'_, PyAny>>,
        options: Option<Bound<'_, PyDict>>,
    ) -> PyResult<PyLoader> {
        let epoch = uint("epoch", epoch.as_ref(), 0)?;
        check_epoch(epoch)?;
        let map = kwargs_json(options.as_ref())?;
        let ds = self.inner.clone();
        let mut loader = detached(py, move || {
            let options = Options::from_json(&map)?.resolve(&ds.manifest().sources)?;
            Loader::new(ds, options)
        })?;
        loader.set_epoch(epoch);
        PyLoader::new(py, loader)
    }
}

/// Run the `rankfeed` command line on `argv` (the program name first) with the GIL released;
/// returns the exit code. The package's `rankfeed` console script calls it.
#[pyfunction]
fn _cli(py: Python<'_>, argv: Vec<std::ffi::OsString>) -> PyResult<u8> {
    guard(|| Ok(py.detach(move || rankfeed_cli::run(argv))))
}

/// The loader's options, documented (`rankfeed::options::docs`): what Python derives
/// `Dataset.loader`'s signature and docstring from, and the tests check the stubs against.
#[pyfunction]
fn loader_options<'py>(py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
    json_to_py(py, &rankfeed::options::docs())
}

/// An epoch to start at: at most [`rankfeed::limits::EPOCH`].
fn check_epoch(epoch: u64) -> PyResult<()> {
    if epoch > rankfeed::limits::EPOCH {
        return Err(PyValueError::new_err(format!(
            "epoch {epoch} is beyond {}",
            rankfeed::limits::EPOCH
        )));
    }
    Ok(())
}

/// The `**options` of a call as a JSON object (none given: empty).
fn kwargs_json(
    options: Option<&Bound<'_, PyDict>>,
) -> PyResult<serde_json::Map<String, serde_json::Value>> {
    match options {
        Some(d) => match py_to_json(d.as_any())? {
            serde_json::Value::Object(m) => Ok(m),
            _ => Ok(serde_json::Map::new()),
        },
        None => Ok(serde_json::Map::new()),
    }
}

/// A Python value as JSON, keeping its type: None, bool, int (any integer type, numpy's too),
/// float, str, list/tuple and dict with str keys; anything else is a ValueError. So 2, 2.0,
/// "2" and True stay apart, and numpy scalars are taken as the numbers they are.
fn py_to_json(v: &Bound<'_, PyAny>) -> PyResult<serde_json::Value> {
    use pyo3::types::{PyBool, PyFloat, PyString};
    use serde_json::Value as V;
    if v.is_none() {
        return Ok(V::Null);
    }
    // numpy arrays (and anything array-like with tolist, e.g. weights=np.array([...])): their
    // Python values.
    if v.hasattr("__array__")? && v.hasattr("tolist")? && v.hasattr("ndim")? {
        let ndim: usize = v.getattr("ndim")?.extract()?;
        if ndim > 0 {
            return py_to_json(&v.call_method0("tolist")?);
        }
    }
    if let Ok(b) = v.cast::<PyBool>() {
        return Ok(V::Bool(b.is_true()));
    }
    if let Ok(s) = v.cast::<PyString>() {
        return Ok(V::String(s.extract::<String>()?));
    }
    let is_numpy_bool = v
        .get_type()
        .name()
        .is_ok_and(|n| n == "bool_" || n == "bool");
    if is_numpy_bool {
        return Ok(V::Bool(v.is_truthy()?));
    }
    if v.hasattr("__index__")? {
        let n: i128 = v.call_method0("__index__")?.extract()?;
        return Ok(if let Ok(u) = u64::try_from(n) {
            V::from(u)
        } else if let Ok(i) = i64::try_from(n) {
            V::from(i)
        } else {
            return Err(PyValueError::new_err(format!(
                "must be below 2**64 (a 64-bit integer), got {n}"
            )));
        });
    }
    if v.cast::<PyFloat>().is_ok() || v.hasattr("__float__")? {
        let f: f64 = v.call_method0("__float__")?.extract()?;
        return serde_json::Number::from_f64(f)
            .map(V::Number)
            .ok_or_else(|| PyValueError::new_err(format!("{f} is not a finite number")));
    }
    if let Ok(d) = v.cast::<PyDict>() {
        let mut m = serde_json::Map::new();
        for (k, val) in d.iter() {
            let k: String = k
                .extract()
                .map_err(|_| PyValueError::new_err(format!("a dict key {k} is not a str")))?;
            let v = py_to_json(&val)
                .map_err(|e| PyValueError::new_err(format!("{k}: {}", e.value(val.py()))))?;
            m.insert(k, v);
        }
        return Ok(V::Object(m));
    }
    if v.cast::<PyList>().is_ok() || v.cast::<PyTuple>().is_ok() {
        let items: Vec<Bound<'_, PyAny>> = v.extract()?;
        return Ok(V::Array(
            items.iter().map(py_to_json).collect::<PyResult<_>>()?,
        ));
    }
    Err(PyValueError::new_err(format!(
        "{} is not a number, string, bool, None, list or dict",
        described(v)
    )))
}

/// `repr(v) (type)`, for messages.
fn described(v: &Bound<'_, PyAny>) -> String {
    let repr = v.repr().map_or_else(|_| "?".into(), |r| r.to_string());
    let ty = v
        .get_type()
        .name()
        .map_or_else(|_| "?".into(), |n| n.to_string());
    format!("{repr} ({ty})")
}

/// A mutex that waiting threads get in the order they asked for it (a ticket lock): a thread
/// that waits is served after the threads that asked before it, however fast the others ask
/// again (`std::sync::Mutex` promises no order, and a thread that releases and retakes it in
/// a loop can keep it from another forever).
struct FairLock<T> {
    tickets: Mutex<Tickets>,
    turn: Condvar,
    value: Mutex<T>,
}

#[derive(Default)]
struct Tickets {
    /// The next ticket to hand out.
    next: u64,
    /// The ticket whose holder may take the value.
    serving: u64,
}

/// The value of a [`FairLock`]; dropping it serves the next ticket.
struct FairGuard<'a, T> {
    lock: &'a FairLock<T>,
    value: Option<MutexGuard<'a, T>>,
}

impl<T> FairLock<T> {
    fn new(value: T) -> Self {
        FairLock {
            tickets: Mutex::new(Tickets::default()),
            turn: Condvar::new(),
            value: Mutex::new(value),
        }
    }

    /// The counters (plain integers: a panic elsewhere cannot leave them inconsistent).
    fn tickets(&self) -> MutexGuard<'_, Tickets> {
        self.tickets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A ticket, and whether it is served at once.
    fn ticket(&self) -> (u64, bool) {
        let mut t = self.tickets();
        let n = t.next;
        t.next += 1;
        (n, t.serving == n)
    }

    /// Block until `ticket` is served.
    fn wait(&self, ticket: u64) {
        let mut t = self.tickets();
        while t.serving != ticket {
            t = self.turn.wait(t).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The value, once our ticket is served (nobody else can hold it then).
    fn take(&self) -> PyResult<FairGuard<'_, T>> {
        // Built first, so that its drop serves the next ticket on every path.
        let mut g = FairGuard {
            lock: self,
            value: None,
        };
        match self.value.try_lock() {
            Ok(v) => g.value = Some(v),
            Err(TryLockError::Poisoned(_)) => {
                return Err(PyRuntimeError::new_err(
                    "the loader was poisoned by an earlier internal error",
                ))
            }
            Err(TryLockError::WouldBlock) => return Err(PyRuntimeError::new_err(
                "rankfeed internal error (please report it): a served ticket found the loader held",
            )),
        }
        Ok(g)
    }
}

impl<T> Drop for FairGuard<'_, T> {
    fn drop(&mut self) {
        self.value.take();
        let mut t = self.lock.tickets();
        t.serving += 1;
        let waiting = t.next > t.serving;
        drop(t);
        if waiting {
            self.lock.turn.notify_all();
        }
    }
}

impl<T> std::ops::Deref for FairGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.value.as_ref().expect("set by FairLock::take")
    }
}

impl<T> std::ops::DerefMut for FairGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        self.value.as_mut().expect("set by FairLock::take")
    }
}

/// What the getters read: the loader's position and the batch count of its epoch.
#[derive(Debug, Clone, Copy)]
struct Mirror {
    state: LoaderState,
    /// Batches in `state.epoch`; None when counting them failed (`__len__` then asks the
    /// loader, which raises the error).
    steps: Option<u64>,
}

/// An iterator of batches (dicts of numpy arrays); one pass is one epoch.
///
/// Thread safety: `len()`, `step`, `epoch`, `rows_per_epoch` and `state_dict()` never wait for
/// the loader: they read a mirror of (epoch, step, batches in the epoch) that every call moving
/// the loader updates, and settings fixed at construction. The calls that use the loader
/// (`next`, `batch`, `collate`, `steps`, `set_epoch`, `load_state_dict`) wait for it, with
/// the GIL released, on a [`FairLock`]: in the order they asked, so a thread calling in a loop
/// cannot starve another. No lock is held while waiting for the GIL, so calls from several
/// threads each either work or raise, and never deadlock.
///
/// The GIL: a thread that has its batch and waits for the GIL to return it says so
/// (`returning`), and the getters step aside for it (release the GIL until it has it, at most
/// [`GIVE_WAY`]). Without that, a thread polling `len(loader)` in a loop keeps the GIL until
/// CPython's switch interval (5 ms) forces it out, once per batch: 20% of the batches.
#[pyclass(name = "Loader", module = "rankfeed._rankfeed")]
struct PyLoader {
    inner: FairLock<Loader>,
    /// Updated while `inner` is held; locked only to copy it, never across a GIL release.
    mirror: Mutex<Mirror>,
    rows_per_epoch: u64,
    /// What a checkpoint is valid for ([`Loader::settings`]), as a Python dict copied by
    /// `state_dict`.
    settings_py: Py<PyDict>,
    /// Threads done with the loader that wait for the GIL (see the type's docs).
    returning: AtomicUsize,
}

/// The longest a getter steps aside for a thread returning a batch.
const GIVE_WAY: Duration = Duration::from_millis(2);

impl PyLoader {
    fn new(py: Python<'_>, mut loader: Loader) -> PyResult<PyLoader> {
        // Token budgets plan the first epoch here: its step count is a setting a checkpoint
        // must match, and a data error shows now rather than at the first batch.
        let l = &mut loader;
        let (settings, steps, notes) = detached(py, move || {
            // Epoch 0 first (the settings count its batches, the notes read its plan), then
            // the starting epoch: a token-budget plan is computed once each.
            let (settings, notes) = (l.settings()?, l.notes()?);
            Ok((settings, l.steps_per_epoch()?, notes))
        })?;
        for note in notes {
            // A UserWarning: the settings work, but not as they seem to.
            let category = py.get_type::<pyo3::exceptions::PyUserWarning>();
            PyErr::warn(py, &category, &std::ffi::CString::new(note)?, 1)?;
        }
        let settings_py = json_to_py(py, &settings)?.cast_into::<PyDict>()?;
        Ok(PyLoader {
            mirror: Mutex::new(Mirror {
                state: loader.state(),
                steps: Some(steps),
            }),
            rows_per_epoch: loader.rows_per_epoch(),
            settings_py: settings_py.unbind(),
            inner: FairLock::new(loader),
            returning: AtomicUsize::new(0),
        })
    }

    /// Run `f` with the GIL released; a getter called while this thread waits for the GIL
    /// back releases it (see the type's docs).
    fn detach<T: Send>(&self, py: Python<'_>, f: impl FnOnce() -> T + Send) -> T {
        let r = py.detach(|| {
            let r = f();
            self.returning.fetch_add(1, Ordering::SeqCst);
            r
        });
        self.returning.fetch_sub(1, Ordering::SeqCst);
        r
    }

    /// Let a thread that waits for the GIL to return a batch have it first (at most
    /// [`GIVE_WAY`]).
    fn give_way(&self, py: Python<'_>) {
        if self.returning.load(Ordering::SeqCst) == 0 {
            return;
        }
        py.detach(|| {
            let t = std::time::Instant::now();
            while self.returning.load(Ordering::SeqCst) > 0 && t.elapsed() < GIVE_WAY {
                std::thread::yield_now();
            }
        });
    }

    /// The loader, waited for with the GIL released when another thread has it or waits for
    /// it (so the thread holding it can take the GIL back when it needs it).
    fn lock(&self, py: Python<'_>) -> PyResult<FairGuard<'_, Loader>> {
        let (ticket, now) = self.inner.ticket();
        if !now {
            self.detach(py, || self.inner.wait(ticket));
        }
        let mut loader = self.inner.take()?;
        // In a forked DataLoader worker: the parent's plan caches are never touched.
        loader.after_fork();
        Ok(loader)
    }

    fn mirror(&self) -> Mirror {
        *self.mirror.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Update the mirror after `loader` moved (called with the loader held, the GIL released:
    /// a new epoch's batches are counted here, which plans it with max_tokens).
    fn publish(&self, loader: &Loader) {
        let old = self.mirror();
        let state = loader.state();
        let same_segment = old.state.epoch == state.epoch && old.state.offset == state.offset;
        let steps = if same_segment && old.steps.is_some() {
            old.steps
        } else {
            loader.steps(state.epoch).ok()
        };
        *self.mirror.lock().unwrap_or_else(|p| p.into_inner()) = Mirror { state, steps };
    }
}

#[pymethods]
impl PyLoader {
    /// Batches in `epoch` for this rank: the same every epoch, except with max_tokens (the
    /// epoch's plan is computed once, with the GIL released).
    fn steps(&self, py: Python<'_>, epoch: u64) -> PyResult<u64> {
        let m = self.mirror();
        if let (true, Some(steps)) = (m.state.epoch == epoch, m.steps) {
            return Ok(steps);
        }
        let mut l = self.lock(py)?;
        let l: &mut Loader = &mut l;
        detached(py, move || l.steps(epoch))
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let mut loader = self.lock(py)?;
        let g = loader.options().collate.group_size;
        let l: &mut Loader = &mut loader;
        let next = guard(|| {
            Ok(self.detach(py, || {
                let next = l.next();
                self.publish(l);
                next
            }))
        })?;
        drop(loader);
        match next {
            None => Ok(None),
            Some(b) => Ok(Some(batch_to_py(py, b.map_err(to_py)?, g)?)),
        }
    }

    /// Benchmark helper: compute the next `n` batches in Rust without making Python objects
    /// (wrapping into following epochs); returns the seconds taken. The Rust-native baseline
    /// that the Python iterator's overhead is measured against.
    fn _drain(&self, py: Python<'_>, n: u64) -> PyResult<f64> {
        let mut loader = self.lock(py)?;
        let l: &mut Loader = &mut loader;
        detached(py, move || {
            let t = std::time::Instant::now();
            let mut done = 0;
            let r = (|| {
                while done < n {
                    match l.next() {
                        Some(b) => {
                            std::hint::black_box(b?);
                            done += 1;
                        }
                        None if l.steps_per_epoch()? == 0 => break,
                        None => {}
                    }
                }
                Ok(t.elapsed().as_secs_f64())
            })();
            self.publish(l);
            r
        })
    }

    /// Batches in the current epoch for this rank (the same every epoch, except with
    /// max_tokens). Never waits for the loader.
    fn __len__(&self, py: Python<'_>) -> PyResult<usize> {
        self.give_way(py);
        let m = self.mirror();
        let steps = match m.steps {
            Some(s) => s,
            None => self.steps(py, m.state.epoch)?,
        };
        usize::try_from(steps).map_err(|_| PyValueError::new_err("too many batches"))
    }

    /// Rows trained on per epoch, all ranks together, before padding.
    #[getter]
    fn rows_per_epoch(&self, py: Python<'_>) -> u64 {
        self.give_way(py);
        self.rows_per_epoch
    }

    /// The current epoch.
    #[getter]
    fn epoch(&self, py: Python<'_>) -> u64 {
        self.give_way(py);
        self.mirror().state.epoch
    }

    /// Batches of the current epoch already yielded.
    #[getter]
    fn step(&self, py: Python<'_>) -> u64 {
        self.give_way(py);
        self.mirror().state.step
    }

    /// Start `epoch` from its first batch.
    fn set_epoch(&self, py: Python<'_>, epoch: &Bound<'_, PyAny>) -> PyResult<()> {
        let epoch = uint("epoch", Some(epoch), 0)?;
        check_epoch(epoch)?;
        let mut l = self.lock(py)?;
        let l: &mut Loader = &mut l;
        py.detach(|| {
            l.set_epoch(epoch);
            self.publish(l);
        });
        Ok(())
    }

    /// The state to checkpoint: `epoch` and `step` (the next batch), and every setting the
    /// batches depend on (`load_state_dict` refuses a state taken with other settings).
    /// Never waits for the loader.
    fn state_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        self.give_way(py);
        let state = self.mirror().state;
        let d = PyDict::new(py);
        d.set_item("epoch", state.epoch)?;
        d.set_item("step", state.step)?;
        d.set_item("offset", state.offset)?;
        d.update(self.settings_py.bind(py).as_mapping())?;
        Ok(d)
    }

    /// Resume from `state_dict()`. Strict: a missing or unknown key, or a setting that differs
    /// from this loader's (in value or in type: 2, 2.0, "2" and True differ), is a ValueError
    /// that names it; the rank may differ. A state taken with another world_size or
    /// batch_size continues the epoch from the rows not yet trained on, re-striped over this
    /// loader's ranks (default order only; the other strategies refuse it). Returns "exact"
    /// or "elastic".
    fn load_state_dict(&self, py: Python<'_>, state: &Bound<'_, PyDict>) -> PyResult<&'static str> {
        let state = match py_to_json(state.as_any())? {
            serde_json::Value::Object(m) => m,
            _ => return Err(PyValueError::new_err("a state is a dict")),
        };
        let mut l = self.lock(py)?;
        let l: &mut Loader = &mut l;
        detached(py, || {
            let r = l.restore(&state);
            self.publish(l);
            r
        })
        .map(|r| match r {
            Resumed::Exact => "exact",
            Resumed::Elastic { .. } => "elastic",
        })
    }

    /// Batch `step` of `epoch`, without moving the loader (of the current epoch's batches: after
    /// an elastic `load_state_dict` they are cut from the rest of the epoch).
    fn batch<'py>(&self, py: Python<'py>, epoch: u64, step: u64) -> PyResult<Bound<'py, PyDict>> {
        let mut guard_ = self.lock(py)?;
        let l: &mut Loader = &mut guard_;
        let g = l.options().collate.group_size;
        let b = detached(py, move || l.batch(epoch, step))?;
        drop(guard_);
        batch_to_py(py, b, g)
    }

    /// Collate your own selections: a list of (row, pos, [neg, ...]) tuples or of dicts with
    /// keys row, pos, neg. Each needs group_size - 1 negatives.
    fn collate<'py>(
        &self,
        py: Python<'py>,
        selections: &Bound<'py, PyList>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let mut sels = Vec::with_capacity(selections.len());
        for item in selections.iter() {
            let (row, pos, neg): (u64, u32, Vec<u32>) = if let Ok(d) = item.cast::<PyDict>() {
                let get = |k: &str| {
                    d.get_item(k)?
                        .ok_or_else(|| PyValueError::new_err(format!("selection without {k:?}")))
                };
                (
                    get("row")?.extract()?,
                    get("pos")?.extract()?,
                    get("neg")?.extract()?,
                )
            } else if let Ok(t) = item.cast::<PyTuple>() {
                t.extract()?
            } else {
                return Err(PyValueError::new_err(
                    "a selection is a (row, pos, negs) tuple or a dict",
                ));
            };
            sels.push(Selection { row, pos, neg });
        }
        let mut guard_ = self.lock(py)?;
        let l: &mut Loader = &mut guard_;
        let g = l.options().collate.group_size;
        let b = detached(py, move || l.collate(sels))?;
        drop(guard_);
        batch_to_py(py, b, g)
    }
}

#[pymodule]
fn _rankfeed(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyDataset>()?;
    m.add_class::<PyLoader>()?;
    m.add_function(wrap_pyfunction!(convert, m)?)?;
    m.add_function(wrap_pyfunction!(export, m)?)?;
    m.add_function(wrap_pyfunction!(import_parquet, m)?)?;
    m.add_function(wrap_pyfunction!(merge, m)?)?;
    m.add_function(wrap_pyfunction!(_mine, m)?)?;
    m.add_function(wrap_pyfunction!(_scorer, m)?)?;
    m.add_function(wrap_pyfunction!(_attach_scores, m)?)?;
    m.add_function(wrap_pyfunction!(_read_scores, m)?)?;
    m.add_class::<PyScorer>()?;
    m.add_function(wrap_pyfunction!(fetch, m)?)?;
    m.add_function(wrap_pyfunction!(upload, m)?)?;
    m.add_function(wrap_pyfunction!(remove_url, m)?)?;
    m.add_function(wrap_pyfunction!(is_url, m)?)?;
    m.add_function(wrap_pyfunction!(loader_options, m)?)?;
    m.add_function(wrap_pyfunction!(_cli, m)?)?;
    m.add("_LOADER_POSITION", rankfeed::loader::POSITION.to_vec())?;
    m.add("_SCORE_BATCH_SIZE", rankfeed::score::DEFAULT_BATCH_SIZE)?;
    m.add(
        "CorruptDatasetError",
        m.py().get_type::<CorruptDatasetError>(),
    )?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
