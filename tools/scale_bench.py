#!/usr/bin/env python3
"""Scale figures (issue 23): how conversion, opening, the first batch and steady batches grow
with the corpus. The corpus is the bundled WordNet sample replicated with perturbed text (each
copy's query and passages get a ` #k` suffix, so the dedup ratio stays the sample's), written
as 16 JSONL part files, for each size asked. Per size it prints:

- convert: wall time, rows/s and peak RSS;
- open + first batch (random order, and `--length-grouped 50`), from `rankfeed bench`;
- warm batches/s from the CLI bench (random order, one thread, no prefetch) and from a Python
  loop over `Dataset.loader` (same settings), each after reading the dataset's files once, and
  the Python/Rust ratio;

then the ratios of each figure to the smallest size's (per row where the figure is per epoch).
Settings: BERT, encoder, B=4, G=16, q32/p192.

    python3 tools/scale_bench.py [--sizes 64000,1000000] [--batches 20000] [--keep DIR]

Sizes are rounded to whole copies of the sample (2,998 rows). 4M rows need ~4 GB of JSON and
~2 GB of dataset on disk; the default stops at 1M.
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

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from mine_scale import timed  # noqa: E402
from remote_bench import corpus  # noqa: E402

BIN = os.environ.get("RANKFEED_BIN", str(ROOT / "target/release/rankfeed"))
BERT = ROOT / "data/sample/bert/tokenizer.json"
SETTINGS = ["--mode", "encoder", "--batch-size", "4", "--group-size", "16", "--query-max-len", "32",
            "--passage-max-len", "192"]


def warm(ds):
    """Read the dataset's files once, so the warm figures are of a warm page cache (right
    after a conversion the files may be partly on disk only: this machine's page cache is
    smaller than its memory)."""
    for f in pathlib.Path(ds).iterdir():
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def bench(ds, batches, *extra):
    out = subprocess.run([BIN, "bench", ds, *SETTINGS, "--batches", str(batches), "--prefetch-threads",
                          "0", "--json", *extra], capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def python_rate(ds, batches):
    code = f"""
import time, rankfeed
ds = rankfeed.Dataset({str(ds)!r})
l = ds.loader(mode="encoder", batch_size=4, group_size=16, query_max_len=32, passage_max_len=192,
              prefetch_threads=0)
for _ in range(200):
    next(l)
t = time.perf_counter()
for _ in range({batches}):
    try:
        next(l)
    except StopIteration:
        l.set_epoch(l.epoch + 1)
print({batches} / (time.perf_counter() - t))
"""
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                check=True).stdout)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="64000,1000000")
    ap.add_argument("--batches", type=int, default=20_000)
    ap.add_argument("--keep", type=pathlib.Path)
    a = ap.parse_args()
    work = a.keep or pathlib.Path(tempfile.mkdtemp(prefix="rankfeed-scale-"))
    rows = {}
    try:
        for size in map(int, a.sizes.split(",")):
            copies = max(1, round(size / 2998))
            src = work / f"json-{copies}"
            if not src.exists():
                n = corpus(str(src), copies)
            else:
                n = copies * 2998
            ds = work / f"ds-{copies}"
            _, wall, rss = timed([BIN, "convert", src, "--tokenizer", BERT, "-o", ds, "--overwrite"])
            disk = sum(f.stat().st_size for f in ds.iterdir())
            warm(ds)
            rand = bench(ds, a.batches)
            grouped = bench(ds, 200, "--length-grouped", "50")
            warm(ds)
            py = python_rate(ds, a.batches)
            r = dict(rows=n, convert_s=wall, convert_rss=rss, disk=disk,
                     first=rand["open_plus_first_batch_ms"], first_grouped=grouped["open_plus_first_batch_ms"],
                     rust=rand["batches_per_second"], python=py)
            rows[size] = r
            print(f"{n:>10,} rows: convert {wall:.1f} s ({n / wall:,.0f} rows/s), peak RSS "
                  f"{rss / 2**20:.0f} MiB, dataset {disk / 1e6:.0f} MB; open + first batch "
                  f"{r['first']:.1f} ms random, {r['first_grouped']:.1f} ms length-grouped "
                  f"({1e3 * r['first_grouped'] / n:.2f} us a row); warm {r['rust']:,.0f} batches/s "
                  f"(CLI), {py:,.0f} (Python loop: {py / r['rust']:.2f}x)", flush=True)
        base = rows[min(rows)]
        for size, r in sorted(rows.items()):
            if r is base:
                continue
            k = r["rows"] / base["rows"]
            print(f"{r['rows']:,} vs {base['rows']:,} rows ({k:.1f}x): convert time {r['convert_s'] / base['convert_s']:.1f}x, "
                  f"peak RSS {r['convert_rss'] / base['convert_rss']:.2f}x; length-grouped first batch per row "
                  f"{(r['first_grouped'] / r['rows']) / (base['first_grouped'] / base['rows']):.2f}x; "
                  f"warm batches/s {r['rust'] / base['rust']:.2f}x (CLI), {r['python'] / base['python']:.2f}x (Python)")
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
