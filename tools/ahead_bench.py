"""How long the next epoch's first batch waits (issue 23): a loader serves one batch of epoch 0,
"trains" for --train-seconds (the next epoch's plan is computed meanwhile, on a background
thread), moves to epoch 1 and takes its first batch; against a loader made at epoch 1 in a new
process (loaders of one process share their plans), which plans it on demand. Length-grouped
batches (M=50), encoder, B=4 G=16 q32/p192, one thread. Exits non-zero if the two first
batches differ.

    python3 tools/ahead_bench.py DATASET_DIR [--rounds 3] [--train-seconds 4]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time

import numpy as np
import rankfeed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dataset")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--train-seconds", type=float, default=4.0)
    a = ap.parse_args()
    ds = rankfeed.Dataset(a.dataset)
    kw = dict(mode="encoder", batch_size=4, group_size=16, query_max_len=32, passage_max_len=192,
              length_grouped=50, prefetch_threads=0)
    out = tempfile.mkdtemp(prefix="rankfeed-ahead-") + "/batch.npz"
    on_demand = f"""
import time, numpy as np, rankfeed
l = rankfeed.Dataset({a.dataset!r}).loader(epoch=1, **{json.dumps(kw)})
t = time.perf_counter()
b = next(l)
print((time.perf_counter() - t) * 1e3)
np.savez({out!r}, **b)
"""
    for _ in range(a.rounds):
        ahead = ds.loader(**kw)
        next(ahead)
        time.sleep(a.train_seconds)
        ahead.set_epoch(1)
        t = time.perf_counter()
        planned = next(ahead)
        planned_ms = (time.perf_counter() - t) * 1e3
        demand_ms = float(subprocess.run([sys.executable, "-c", on_demand], check=True,
                                         capture_output=True, text=True).stdout)
        demand = dict(np.load(out))
        if planned.keys() != demand.keys() or any(
                not np.array_equal(planned[k], demand[k]) for k in planned):
            raise SystemExit("the first batch of epoch 1 planned ahead differs from on demand")
        print(f"{len(ds):,} rows: epoch 1's first batch planned ahead {planned_ms:.2f} ms, "
              f"on demand {demand_ms:.1f} ms")


if __name__ == "__main__":
    main()
