"""The scale tools the README quotes run as written, at a small size: `tools/mine_scale.py`
(BM25 index built, kept, loaded: byte-identical output), `tools/scale_bench.py` (convert,
first batches, warm batches/s from the CLI and Python at two sizes, and their ratios) and
`tools/peers_bench.py` (FlagEmbedding, the expert numpy pipeline and rankfeed on the same groups)."""

import os
import subprocess
import sys

from conftest import ROOT


def run(*args, env=None):
    p = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                       env={**os.environ, **(env or {})}, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def test_mine_scale_runs_and_the_kept_index_changes_nothing(rankfeed_bin):
    out = run(ROOT / "tools/mine_scale.py", "--passages", "20000", "--rows", "4000", "--shards", "4",
              env={"RANKFEED_BIN": rankfeed_bin})
    assert "mine (built index)" in out and "mine (loaded index)" in out, out
    assert "byte-identical" in out, out


def test_scale_bench_runs_at_two_sizes(rankfeed_bin):
    # RANKFEED_SCALE=1 runs it at the README's sizes, 64k and 1M rows (about 5 minutes here).
    full = os.environ.get("RANKFEED_SCALE") == "1"
    sizes, batches = ("64000,1000000", "20000") if full else ("3000,9000", "2000")
    out = run(ROOT / "tools/scale_bench.py", "--sizes", sizes, "--batches", batches,
              env={"RANKFEED_BIN": rankfeed_bin})
    print(out)
    lines = out.strip().splitlines()
    assert len(lines) == 3, out
    small, large = ("62,958", "1,001,332") if full else ("2,998", "8,994")
    assert f"{small} rows: convert" in lines[0] and f"{large} rows: convert" in lines[1], out
    assert lines[2].startswith(f"{large} vs {small} rows"), out


def test_peers_bench_runs_and_every_side_makes_the_same_batches(rankfeed_bin):
    # The script exits non-zero if the expert collator or the reference differ from rankfeed
    # on the batches it checks; here every ratio line is printed.
    out = run(ROOT / "tools/peers_bench.py", "--rounds", "1", "--seconds", "0.2", "--check", "100",
              env={"RANKFEED_BIN": rankfeed_bin})
    for side in ("FlagEmbedding dataset+collator", "expert Arrow+numpy collator",
                 "rankfeed Loader.collate (Python)", "rankfeed next(loader) (Python)",
                 "rankfeed bench (Rust)", "in-cache copy of the batch bytes"):
        assert side in out, out
    assert "the expert's arrays equal rankfeed's on 100 batches, and on 100 truncated" in out, out
    assert "of the in-cache copy bound" in out, out


def test_ahead_bench_runs_and_the_planned_batch_is_the_batch_on_demand(rankfeed_bin, tmp_path):
    # The script exits non-zero if epoch 1's first batch planned ahead differs from a loader's
    # made at epoch 1.
    ds = tmp_path / "ds"
    subprocess.run([rankfeed_bin, "convert", ROOT / "data/sample/wordnet-nouns.jsonl.gz",
                    "--tokenizer", ROOT / "data/sample/bert/tokenizer.json", "-o", ds],
                   check=True, capture_output=True)
    out = run(ROOT / "tools/ahead_bench.py", ds, "--rounds", "2", "--train-seconds", "0.3")
    lines = out.strip().splitlines()
    assert len(lines) == 2 and all("rows: epoch 1's first batch planned ahead" in l for l in lines), out
