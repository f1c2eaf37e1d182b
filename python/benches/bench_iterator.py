#!/usr/bin/env python3
"""Per-batch overhead of the Python iterator against the Rust-native loader, same process,
same dataset, same settings (B=4, G=16, q32/p192), interleaved rounds, best of each.

    python3 python/benches/bench_iterator.py [DATASET_DIR]

Default dataset: the quickstart's (bash tools/quickstart.sh)."""

import pathlib
import sys
import time

import rankfeed

ROOT = pathlib.Path(__file__).resolve().parents[2]


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else ROOT / "target/quickstart/wordnet-bert"
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


if __name__ == "__main__":
    main()
