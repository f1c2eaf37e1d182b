#!/usr/bin/env python3
"""BM25 mining at scale (issue 22): the index over 1M passages, its build time, size and the
peak memory of `rankfeed mine`, the kept index loaded instead of built, and the search rate.

The corpus is synthetic and pre-tokenized (no tokenizer run): `--passages` distinct passages of
20-80 token ids drawn from a Zipf law over a 29k vocabulary (BERT-like ids: a few very frequent
terms, a long tail), and `--rows` queries of 4-12 tokens taken from their positive passage, each
row with 1 positive and 7 negatives. It is written as rankfeed's `tables` Parquet and imported,
then mined with `--shard 0/S` (the index is always over every passage; the shard bounds how many
queries are searched), its peak RSS measured, twice: building the index into a file, then
loading it.

    python3 tools/mine_scale.py [--passages 1000000] [--rows 200000] [--shards 100] [--keep DIR]
"""

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = pathlib.Path(__file__).resolve().parent.parent
BIN = os.environ.get("RANKFEED_BIN", str(ROOT / "target/release/rankfeed"))
BERT = ROOT / "data/sample/bert/tokenizer.json"


def lists(values, offsets):
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, pa.int32()))


def build(out, n_passages, n_rows, seed=0):
    rng = np.random.default_rng(seed)
    lens = rng.integers(20, 81, n_passages)
    offsets = np.concatenate([[0], np.cumsum(lens)])
    # Zipf over ranks 1..29k, mapped to ids 1000..29999 (rank 1 = the most frequent term).
    ranks = rng.zipf(1.1, int(offsets[-1]))
    ranks = np.where(ranks > 29_000, rng.integers(1, 29_001, ranks.size), ranks)
    tokens = (999 + ranks).astype(np.int32)
    (out / "passages").mkdir(parents=True)
    (out / "groups").mkdir()
    (out / "prompts").mkdir()
    step = 250_000
    for k, a in enumerate(range(0, n_passages, step)):
        b = min(a + step, n_passages)
        t = pa.table({"id": pa.array(np.arange(a, b), pa.int32()),
                      "tokens": lists(tokens[offsets[a]:offsets[b]], offsets[a:b + 1] - offsets[a])})
        pq.write_table(t, out / "passages" / f"part-{k:05d}.parquet")
    pos = rng.integers(0, n_passages, n_rows)
    neg = rng.integers(0, n_passages, (n_rows, 7))
    q_len = rng.integers(4, 13, n_rows)
    q_off = np.concatenate([[0], np.cumsum(q_len)])
    q = np.empty(q_off[-1], np.int32)
    for r in range(n_rows):
        p = pos[r]
        src = tokens[offsets[p]:offsets[p + 1]]
        q[q_off[r]:q_off[r + 1]] = rng.choice(src, q_len[r])
    groups = pa.table({
        "row": pa.array(np.arange(n_rows), pa.int64()),
        "query": lists(q, q_off),
        "pos": lists(pos.astype(np.int32), np.arange(n_rows + 1)),
        "neg": lists(neg.astype(np.int32).ravel(), np.arange(n_rows + 1) * 7),
        "source": pa.array(np.zeros(n_rows), pa.int32()),
    })
    pq.write_table(groups, out / "groups" / "part-00000.parquet")
    pq.write_table(pa.table({"id": pa.array([], pa.int32()),
                             "tokens": pa.array([], pa.list_(pa.int32()))}),
                   out / "prompts" / "part-00000.parquet")
    return int(offsets[-1])


def timed(cmd):
    """Run `cmd`: (stdout, wall seconds, peak RSS bytes). The peak is the child's own, read by a
    small Python parent from getrusage (no /usr/bin/time needed)."""
    wrapper = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
               "sys.exit(p.returncode)")
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", wrapper, *map(str, cmd)], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        sys.exit(f"{cmd[0]} failed:\n{p.stderr}")
    rss = int(p.stderr.strip().splitlines()[-1]) * 1024
    return p.stdout, wall, rss


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--passages", type=int, default=1_000_000)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--shards", type=int, default=100)
    ap.add_argument("--keep", type=pathlib.Path)
    a = ap.parse_args()
    work = a.keep or pathlib.Path(tempfile.mkdtemp(prefix="rankfeed-mine-scale-"))
    try:
        t = time.perf_counter()
        total = build(work / "tables", a.passages, a.rows)
        print(f"corpus: {a.passages:,} passages, {total:,} tokens; {a.rows:,} rows "
              f"(written in {time.perf_counter() - t:.1f} s)", flush=True)
        _, wall, rss = timed([BIN, "import", work / "tables", "--tokenizer", BERT,
                              "-o", work / "ds", "--overwrite"])
        print(f"import: {wall:.1f} s, peak RSS {rss / 2**20:.0f} MiB", flush=True)
        index = work / "bm25.index"
        index.unlink(missing_ok=True)
        results = []
        for what in ("built", "loaded"):
            out, wall, rss = timed([BIN, "mine", work / "ds", "-o", work / f"mined-{what}",
                                    "--shard", f"0/{a.shards}", "--range-min", "0",
                                    "--range-max", "50", "--num-negatives", "7",
                                    "--index", index, "--json", "--overwrite"])
            r = json.loads(out)
            assert r["index_loaded"] == (what == "loaded"), r
            results.append(r)
            print(f"mine ({what} index): {r['rows']:,} queries over {a.passages:,} passages; "
                  f"index {r['index_seconds']:.2f} s, {r['index_bytes'] / 2**20:.0f} MiB "
                  f"({r['index_bytes'] / a.passages:.0f} B a passage); ranking "
                  f"{r['search_seconds']:.2f} s ({r['rows'] / r['search_seconds']:,.0f} queries/s); "
                  f"wall {wall:.1f} s, peak RSS {rss / 2**20:.0f} MiB", flush=True)
        same = all((work / "mined-built" / f).read_bytes() == (work / "mined-loaded" / f).read_bytes()
                   for f in ("groups.arrow", "passages.arrow"))
        print(f"index file {index.stat().st_size / 2**20:.0f} MiB; built and loaded runs "
              f"{'byte-identical' if same else 'DIFFER'}; load {results[1]['index_seconds']:.2f} s "
              f"vs build {results[0]['index_seconds']:.2f} s")
        if not same:
            sys.exit(1)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
