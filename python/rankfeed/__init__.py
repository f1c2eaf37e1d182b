"""rankfeed: pre-tokenized, memory-mapped reranker training data, with batches that are
bit-identical to FlagEmbedding's, as numpy arrays torch takes without a copy.

    import rankfeed
    rankfeed.convert(["train.jsonl"], "tokenizer.json", "data/train")
    ds = rankfeed.Dataset("data/train")
    for batch in ds.loader(batch_size=4, group_size=16, mode="encoder"):
        batch["input_ids"]        # numpy int64 [B*G, L]; row b*G+g, g = 0 the positive
"""

import inspect
import os
import sys
import textwrap
import time

from ._rankfeed import CorruptDatasetError, Loader, __version__
from ._rankfeed import Dataset as _Dataset
from ._rankfeed import convert as _convert
from ._rankfeed import export as _export
from ._rankfeed import fetch as _fetch
from ._rankfeed import is_url
from ._rankfeed import remove_url
from ._rankfeed import upload as _upload
from ._rankfeed import import_parquet as _import_parquet
from ._rankfeed import loader_options as _loader_options
from ._rankfeed import _mine, _scorer, _attach_scores, _read_scores, _SCORE_BATCH_SIZE
from ._rankfeed import merge as _merge

__all__ = ["convert", "export", "import_parquet", "merge", "mine", "score", "attach_scores", "fetch", "upload", "remove_url", "is_url",
           "Dataset", "Loader", "CorruptDatasetError",
           "LOADER_OPTIONS",
           "__version__"]


def _paths(p):
    if isinstance(p, (str, bytes)) or hasattr(p, "__fspath__"):
        return [str(p)]
    return [str(x) for x in p]


def _dir(p):
    return None if p is None else str(p)


def export(dataset, out, *, layout="flat", rows_per_file=1_000_000, overwrite=False, cache_dir=None):
    """Export a dataset directory to Parquet under `out`: layout "flat" (one row per query with
    token lists) or "tables" (passages/, groups/, prompts/). Spark and Polars read it as is.
    `dataset` and `out` may be URLs (s3://...): an export uploaded there ends with a `_SUCCESS`
    marker, written last."""
    return _export(str(dataset), str(out), layout=layout, rows_per_file=rows_per_file, overwrite=overwrite,
                   cache_dir=_dir(cache_dir))


def import_parquet(inputs, out, *, tokenizer=None, overwrite=False, cache_dir=None):
    """Import pre-tokenized Parquet into a dataset at `out`, without tokenizing: flat files or
    directories (list or large_list, int32 or int64 ids), or a `tables` export directory.
    Rows follow the `row` column when there is one. `tokenizer` (a tokenizer.json) supplies the
    tokenizer facts when the files carry no rankfeed metadata (Spark and Polars drop it): the
    import refuses without either. Inputs and `out` may be URLs (s3://...)."""
    return _import_parquet(_paths(inputs), str(out), overwrite=overwrite,
                           tokenizer=str(tokenizer) if tokenizer is not None else None,
                           cache_dir=_dir(cache_dir))


def merge(shards, out, *, overwrite=False, cache_dir=None):
    """Merge dataset directories (e.g. shards from `convert(..., shard=(k, n))`) into one.
    Shards and `out` may be URLs (s3://...)."""
    return _merge(_paths(shards), str(out), overwrite=overwrite, cache_dir=_dir(cache_dir))


def mine(dataset, out, *, corpus=None, tokenizer=None, index=None, query_embeddings=None,
         passage_embeddings=None, shard=None, overwrite=False, cache_dir=None, **options):
    """Mine hard negatives for every row of `dataset` (a Dataset or a path) into a new dataset
    at `out` (see `rankfeed mine --help` for the options: num_negatives, range_min, range_max,
    min_score, max_score, margin, relative_margin, sampling, seed, k1, b). BM25 over the token
    ids, or exact inner products of `query_embeddings` (one row per dataset row) and
    `passage_embeddings` (one row per corpus passage id), float32 2-D arrays. `corpus`: where
    negatives come from: None (the dataset's own passages), another Dataset (or its path), or
    Parquet files / directories of passages (a `tokens` column of ids, or a `text` column
    tokenized with `tokenizer`, the dataset's tokenizer.json). `index`: a file keeping the
    BM25 index (loaded when it indexes this corpus with these k1/b, else built and saved there).
    `shard=(k, n)` mines rows
    k*len/n..(k+1)*len/n (merge the outputs). Returns the report."""
    if not isinstance(dataset, _Dataset):
        dataset = Dataset(str(dataset))
    np = __import__("numpy")
    as32 = lambda a: None if a is None else np.ascontiguousarray(a, dtype=np.float32)
    corpus_dataset = corpus_files = None
    if isinstance(corpus, _Dataset):
        corpus_dataset = corpus
    elif corpus is not None:  # a dataset path, or Parquet paths (the extension tells which)
        corpus_files = [str(corpus)] if isinstance(corpus, (str, os.PathLike)) else [str(c) for c in corpus]
    return _mine(dataset, str(out), corpus_dataset=corpus_dataset, corpus_files=corpus_files,
                 tokenizer=None if tokenizer is None else str(tokenizer),
                 index=None if index is None else str(index),
                 query_embeddings=as32(query_embeddings),
                 passage_embeddings=as32(passage_embeddings),
                 shard=None if shard is None else tuple(shard), overwrite=overwrite,
                 cache_dir=_dir(cache_dir), **options)


def _scores_of(values, n, index):
    """What a scoring function returned, as float32 [n] (a torch tensor, numpy array or list;
    [n] or [n, 1])."""
    np = __import__("numpy")
    if hasattr(values, "detach"):  # a torch tensor, on any device
        values = values.detach().float().cpu().numpy()
    a = np.asarray(values, dtype=np.float32)
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.shape != (n,):
        raise ValueError(f"batch {index}: the scoring function returned shape {a.shape} for "
                         f"{n} pairs (one score per pair: [n] or [n, 1])")
    return np.ascontiguousarray(a)


def score(dataset, fn, out=None, *, work_dir=None, batch_size=_SCORE_BATCH_SIZE, overwrite=False,
          cache_dir=None, progress=None, **options):
    """Teacher scores: call `fn` on every *unique* (query, passage) pair of `dataset` once and
    write a new dataset at `out` with every row's `pos_scores`/`neg_scores` filled (the input
    is never modified). Pairs are shared by rows with the same query (tokens and prompt) and
    passage.

    `fn(batch)` gets a dict of numpy arrays of pairs laid out as the loader lays them out under
    `options` (the collation options of `Dataset.loader`: mode, query_max_len,
    passage_max_len, truncation, packed, ...; sampling options are ignored): `input_ids`,
    `attention_mask`, `token_type_ids` (or the packed arrays), one pair a row, plus `pairs`
    (the pair ids). It returns one score per row (numpy, torch or a list). Batches are sorted
    by length, longest first, at most `batch_size` pairs, or as many as fit `max_tokens`.

    Sharded: `rank`/`world_size` (options) score batch b on rank b % world_size; every rank
    appends its scores to its log in `work_dir` (shared by the ranks; default `out` +
    ".scoring"), so a killed run called again resumes at the next batch. The rank that finds
    every log complete attaches them to `out` (once). Returns the plan's figures and
    `attached`: "attached", "present" (already done) or "pending" (other ranks still
    scoring)."""
    if not isinstance(dataset, _Dataset):
        dataset = Dataset(str(dataset))
    if work_dir is None:
        if out is None or is_url(str(out)):
            raise ValueError("score: give work_dir (a local directory the ranks share) when out "
                             "is None or a URL")
        work_dir = str(out) + ".scoring"
    scorer = _scorer(dataset, str(work_dir), batch_size=batch_size, **options)
    total, first = len(scorer), scorer.next
    started = time.monotonic()
    for index in range(first, total):
        batch = scorer.batch(index)
        scorer.record(index, _scores_of(fn(batch), len(batch["pairs"]), index))
        if progress or (progress is None and sys.stderr.isatty()):
            rate = (index + 1 - first) / max(time.monotonic() - started, 1e-9)
            sys.stderr.write(f"\rrankfeed score: batch {index + 1}/{total} ({rate:,.1f}/s) ")
            sys.stderr.flush()
    report = scorer.report()
    report["attached"] = None if out is None else scorer.attach(
        str(out), overwrite=overwrite, cache_dir=_dir(cache_dir))
    report["work_dir"] = str(work_dir)
    return report


def attach_scores(dataset, scores, out, *, overwrite=False, cache_dir=None):
    """Write `dataset` with teacher `scores` into a new dataset at `out`. `scores`: one per
    unique pair, indexed by pair id (`scores[pair]`: the `pair` column of `rankfeed pairs`, whose
    rows are in length order, not pair-id order), or Parquet paths (a file, a directory, or a
    list of them) with `pair` and `score` columns, as `rankfeed attach-scores` reads them."""
    if not isinstance(dataset, _Dataset):
        dataset = Dataset(str(dataset))
    np = __import__("numpy")
    if isinstance(scores, (str, os.PathLike)):
        scores = [scores]
    if isinstance(scores, (list, tuple)) and scores and all(isinstance(s, (str, os.PathLike)) for s in scores):
        scores = _read_scores(dataset, [str(s) for s in scores])
    _attach_scores(dataset, np.ascontiguousarray(scores, dtype=np.float32), str(out),
                   overwrite=overwrite, cache_dir=_dir(cache_dir))


def fetch(url, *, cache_dir=None, cache_max_bytes=None):
    """Fetch the dataset at `url` (s3://bucket/prefix) into the local cache, verified file by
    file against its sealed manifest as it streams in (a no-op when the cache holds it).
    Returns a dict: `path` of the local copy, `seal`, `downloaded`, `files`, `bytes`,
    `requests`, `retries`, `waited_seconds` (for another process's download), `seconds`,
    `evicted`. The cache is `cache_dir`, else $RANKFEED_CACHE, else ~/.cache/rankfeed/datasets;
    `cache_max_bytes` evicts whole datasets, least recently used first."""
    return _fetch(str(url), cache_dir=_dir(cache_dir), cache_max_bytes=cache_max_bytes)


def upload(dataset, url, *, overwrite=False):
    """Upload the dataset directory `dataset` to `url`, every file checked against the manifest
    as it is read and the manifest last (a reader never sees a partial dataset). Replacing a
    dataset deletes its manifest first: an interrupted upload leaves no dataset, never a mix."""
    return _upload(str(dataset), str(url), overwrite=overwrite)


class _Progress:
    """A one-line progress report on stderr (only when stderr is a terminal)."""

    def __init__(self):
        self.last = 0.0

    def __call__(self, bytes_read, bytes_total, rows, rejected, tokens, seconds):
        now = time.monotonic()
        if now - self.last < 0.2:
            return
        self.last = now
        pct = 100.0 * bytes_read / bytes_total if bytes_total else 100.0
        rate = rows / seconds if seconds else 0.0
        tps = tokens / seconds / 1e6 if seconds else 0.0
        sys.stderr.write(f"\rrankfeed convert: {pct:5.1f}%  {rows} rows ({rate:,.0f}/s)  "
                         f"{tps:.2f}M tokens/s  {rejected} rejected ")
        sys.stderr.flush()


def convert(inputs, tokenizer, out, *, query_instruction=None, query_instruction_format=None,
            passage_instruction=None, passage_instruction_format=None, sep_token=None,
            default_prompt=None, on_error="fail", overwrite=False, threads=None,
            rows_per_batch=None, progress=None, shard=None, max_line_bytes=None,
            convention="reranker", cache_dir=None):
    """Convert FlagEmbedding-style JSON/JSONL (files or directories, optionally .gz/.zst) into a
    dataset directory at `out`; returns a summary dict (counts, dedup ratio, per-source stats).

    Text is formatted as FlagEmbedding does (`query_instruction_format.format(prompt, query)`
    when `query_instruction` is set; likewise for passages; formats default to "{}{}" and
    sep_token to "\\n" when left None). `on_error="fail"` stops at the
    first bad row (ValueError naming file, line, field and reason) and writes nothing;
    `"skip"` records rejected rows in `out/rejects.jsonl` and the manifest. `progress`: None
    shows a progress line when stderr is a terminal; True/False force it; a callable receives
    (bytes_read, bytes_total, rows, rejected, tokens, seconds). `shard=(k, n)` converts only
    the k-th of n equal byte ranges of the inputs (line-aligned; one large file shards evenly);
    join the shards with `merge`, which gives exactly the single conversion's dataset. The
    summary's `warnings` names files a shard had to convert whole (compressed, JSON arrays).
    `max_line_bytes` (default 64 MiB): a longer line is a `line_too_long` row under `on_error`.
    The summary's `cleaned` lists staging directories of interrupted runs that were removed.
    `convention` names the row fields that give per-row instructions when an instruction is
    set: "reranker" (`query_prompt`, `passage_prompt`) or "embedder" (`prompt` as the query
    instruction, as FlagEmbedding's embedder datasets); the dataset then serves that kind of
    training. Without instructions one dataset serves both. Inputs may be URLs (s3://bucket/key
    or a prefix read as a directory; downloaded first and recorded under their URLs) and so may
    `out` (written locally, then uploaded with the manifest last); `cache_dir` holds the scratch
    copies."""
    inputs = _paths(inputs)
    if progress is None:
        progress = sys.stderr.isatty()
    callback = _Progress() if progress is True else (progress or None)
    try:
        return _convert(inputs, str(tokenizer), str(out),
                        query_instruction=query_instruction,
                        query_instruction_format=query_instruction_format,
                        passage_instruction=passage_instruction,
                        passage_instruction_format=passage_instruction_format, sep_token=sep_token,
                        default_prompt=default_prompt, on_error=on_error, overwrite=overwrite,
                        threads=threads, rows_per_batch=rows_per_batch, progress=callback,
                        shard=tuple(shard) if shard is not None else None,
                        max_line_bytes=max_line_bytes, convention=convention,
                        cache_dir=_dir(cache_dir))
    finally:
        if isinstance(callback, _Progress) and callback.last:
            sys.stderr.write("\n")


class Dataset(_Dataset):
    """A converted dataset, memory-mapped. `len(ds)` groups; `ds.group(i)`, `ds.passage(id)`,
    `ds.prompt(id)` return int32 numpy arrays; `ds.manifest`, `ds.stats()`, `ds.validate()`.

    `ds.loader(...)` returns a `Loader` of batches; `help(rankfeed.Dataset.loader)` lists its
    arguments (batch shape, modes "encoder", "llm", "matryoshka" and "embedder" and their
    options, sharding, token budgets, mixing, same-source batches, prefetch), in one place.

    Batches are dicts of numpy arrays and nothing else: input_ids, attention_mask,
    token_type_ids (only for tokenizers that have them, encoder mode: XLM-R has none),
    teacher_scores, query_lengths and prompt_lengths (matryoshka), query_* and passage_* keys
    and no_in_batch_neg (embedder), plus rows [B], pos [B], neg [B, G-1] (the groups it holds)
    and overlong (a 0-d array: rows longer than the reference's maximum because its
    truncation could not cut them).

    A loader may be used from several threads: each call works or raises; `len()`, `step`,
    `epoch` and `state_dict()` never wait for the loader, and the calls that do wait, with the
    GIL released, in the order they asked.

    `path` may be a URL (s3://bucket/prefix): the dataset is fetched into the local cache
    (`cache_dir`, else $RANKFEED_CACHE, else ~/.cache/rankfeed/datasets), verified as it
    streams in, then mapped; `ds.url` and `ds.fetch_report` say what happened, and
    `cache_max_bytes` evicts whole datasets, least recently used first."""

    def __reduce__(self):
        # A dataset opened from a URL travels as its URL and seal: another machine fetches it
        # into its own cache, this one finds it cached, and a URL replaced meanwhile is
        # refused rather than read as other rows.
        if self.url is not None:
            return (_open_url, (self.url, self.cache_dir, self.fetch_report["seal"]))
        return (Dataset, (self.path,))

    def loader(self, *, epoch=None, **options):
        return _Dataset.loader(self, epoch=epoch, **options)


#: Every loader option, documented: name, CLI flag, help, default, and whether a checkpoint
#: stores it. Defined once, in Rust (`rankfeed::options::Options`); the signature and the
#: documentation of `Dataset.loader` below, the CLI's flags and the README's table derive
#: from it.
def _open_url(url, cache_dir, seal=None):
    ds = Dataset(url, cache_dir=cache_dir)
    if seal is not None and ds.fetch_report["seal"] != seal:
        raise CorruptDatasetError(
            f"{url} holds another dataset (seal {ds.fetch_report['seal']}) than the one pickled "
            f"(seal {seal}): it was replaced meanwhile")
    return ds


LOADER_OPTIONS = tuple(_loader_options())


def _loader_doc():
    lines = [
        "A `Loader` of batches (dicts of numpy arrays). Every option is a keyword; one left out or",
        "None takes its default. `epoch`: the epoch to start at.",
        "",
        "An epoch that has rows but would yield no batch (more ranks than rows with the drop",
        "tail, fewer rows per rank than batch_size with drop_last, no source filling a global",
        "batch with same_source) is a ValueError naming the option, never an empty epoch.",
        "Numeric options are checked before anything is allocated: a negative or non-integer",
        "value, or one beyond rankfeed's limits (batches of at most 8 GiB), is a ValueError",
        "naming it. `state_dict()` holds every option but prefetch_threads and prefetch_depth",
        "(they decide when batches are computed, never what they hold).",
        "",
        "Options:",
    ]
    for o in LOADER_OPTIONS:
        default = "" if o["default"] is None else f" (default {o['default']})"
        head = f"- {o['name']}{default}: "
        body = " ".join(o["help"].split())
        lines += textwrap.wrap(head + body, 96, subsequent_indent="    ")
    return "\n".join(lines)


Dataset.loader.__doc__ = _loader_doc()
Dataset.loader.__signature__ = inspect.Signature(
    [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
     inspect.Parameter("epoch", inspect.Parameter.KEYWORD_ONLY, default=None)]
    + [inspect.Parameter(o["name"], inspect.Parameter.KEYWORD_ONLY, default=None)
       for o in LOADER_OPTIONS])


def __getattr__(name):
    if name in ("torch", "hf"):
        import importlib
        return importlib.import_module("." + name, __name__)
    raise AttributeError(name)
