#!/usr/bin/env python3
"""Per-batch overhead of the Python iterator against the Rust-native loader, same process,
same dataset, same settings (B=4, G=16, q32/p192), interleaved rounds, best of each.

    python3 python/benches/bench_iterator.py [DATASET_DIR] [--workers]

`--workers` also measures torch DataLoaders over `RankfeedIterable` with 0, 1 and 2 worker
processes (tensors through shared memory), in the same run, and prints the ratio to in-process.

Default dataset: the quickstart's (bash tools/quickstart.sh)."""

import pathlib
import sys
import time

import rankfeed

ROOT = pathlib.Path(__file__).resolve().parents[2]


def bench_workers(path, kw, n=3000):
    from torch.utils.data import DataLoader
    from rankfeed.torch import RankfeedIterable

    rates = {}
    for workers in (0, 1, 2):
        best = float("inf")
        for _ in range(3):
            data = RankfeedIterable(path, **{**kw, "prefetch_threads": 1})
            loader = DataLoader(data, batch_size=None, num_workers=workers)
            t, done = None, 0
            while done < n:
                for batch in loader:
                    if t is None:  # workers started and produced their first batch
                        t = time.perf_counter()
                    done += 1
                    if done == n:
                        break
            best = min(best, (time.perf_counter() - t) / (n - 1))
        rates[workers] = 1 / best
    base = rates[0]
    print("torch DataLoader over RankfeedIterable: " + "; ".join(
        f"num_workers={w}: {r:,.0f} batches/s ({r / base:.2f}x)" for w, r in rates.items()))


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    path = args[0] if args else ROOT / "target/quickstart/wordnet-bert"
    ds = rankfeed.Dataset(path)
    kw = dict(batch_size=4, group_size=16, query_max_len=32, passage_max_len=192, prefetch_threads=0)
    n = 20000
    best_py, best_rs = float("inf"), float("inf")
    for _ in range(5):
        loader = ds.loader(**kw)
        best_rs = min(best_rs, loader._drain(n) / n)
        loader = ds.loader(**kw)
        t = time.perf_counter()
        done = 0
        while done < n:
            for batch in loader:
                done += 1
                if done == n:
                    break
        best_py = min(best_py, (time.perf_counter() - t) / n)
    overhead = (best_py - best_rs) / best_rs
    print(f"{path}: Rust-native {best_rs * 1e6:.2f} us/batch ({1 / best_rs:,.0f} batches/s); "
          f"Python iterator {best_py * 1e6:.2f} us/batch ({1 / best_py:,.0f} batches/s); "
          f"overhead {best_py * 1e6 - best_rs * 1e6:.2f} us = {100 * overhead:.1f}% (target <= 20%)")
    if "--workers" in sys.argv:
        bench_workers(path, kw)


if __name__ == "__main__":
    main()
