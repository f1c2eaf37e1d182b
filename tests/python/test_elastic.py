"""Elastic resumption of the torch and Hugging Face adapters (issue 18): a state taken on one
world size / batch size continues the epoch on another, from the rows not yet trained on, so
every row of the epoch is trained exactly once across 1 -> 2 -> 1 process resumes: in-process
(RankfeedIterable, with 0 and 2 DataLoader workers) and with real processes (torchrun, gloo,
RankfeedTrainer). Strategies that cannot re-stripe an epoch refuse, naming the setting."""

import json
import math
import os
import socket
import subprocess
import sys
import time

import pytest

import rankfeed
from conftest import ROOT

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from torch.utils.data import DataLoader  # noqa: E402

from rankfeed.hf import RankfeedDataLoader  # noqa: E402
from rankfeed.torch import RankfeedIterable  # noqa: E402

BERT = ROOT / "data" / "sample" / "bert" / "tokenizer.json"
FIXTURE = ROOT / "tests" / "fixtures" / "roundtrip.jsonl"
WORKER = ROOT / "tests" / "python" / "elastic_worker.py"
KW = dict(group_size=4, query_max_len=16, passage_max_len=32, seed=7)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("elastic") / "ds"
    rankfeed.convert(FIXTURE, BERT, out, progress=False)
    return out


def take(loader, k=None):
    """The rows of the first `k` batches of a pass (all with None)."""
    got = []
    for batch in loader:
        got.append(batch["rows"].tolist())
        if k is not None and len(got) == k:
            break
    return got


def roundtrip(state):
    return json.loads(json.dumps(state))


def flat(batches):
    return [r for b in batches for r in b]


def scenario(path, workers):
    """World 1 (batch 4) for 3 batches, world 2 (batch 3, both ranks) for 4 batches, world 1
    (batch 5) to the end of the epoch; then one more pass. The rows of each phase."""
    n = len(rankfeed.Dataset(path))
    d1 = RankfeedIterable(path, rank=0, world_size=1, with_meta=True, batch_size=4, **KW)
    if workers:
        dl = RankfeedDataLoader(d1, num_workers=workers)
        p1 = take(dl, 3)
        s1 = dl.state_dict()
    else:
        p1 = take(DataLoader(d1, batch_size=None, num_workers=0), 3)
        s1 = d1.state_dict()
    assert (s1["epoch"], s1["next"], s1["offset"]) == (0, 3, 0)
    assert s1["settings"]["world_size"] == 1 and s1["settings"]["batch_size"] == 4
    s1 = roundtrip(s1)

    p2, s2 = [], []
    for rank in range(2):
        d = RankfeedIterable(path, rank=rank, world_size=2, with_meta=True, batch_size=3, **KW)
        if workers:
            dl = RankfeedDataLoader(d, num_workers=workers)
            assert dl.load_state_dict(s1) == "elastic"
        else:
            assert d.load_state_dict(s1) == "elastic"
            dl = DataLoader(d, batch_size=None, num_workers=0)
        left = math.ceil(math.ceil((n - 12) / 2) / 3)
        assert len(d) == len(dl) == left, "the resumed epoch's batches left"
        p2.append(take(dl, 4))
        state = dl.state_dict() if workers else d.state_dict()
        assert (state["epoch"], state["next"], state["offset"]) == (0, 4, 12), state
        s2.append(roundtrip(state))
    same = {json.dumps({**s, "settings": {**s["settings"], "rank": 0}}) for s in s2}
    assert len(same) == 1, "both ranks' states are one position"

    d3 = RankfeedIterable(path, rank=0, world_size=1, with_meta=True, batch_size=5, **KW)
    assert d3.load_state_dict(s2[1]) == "elastic", "another rank's state"
    consumed = 12 + 2 * 4 * 3
    assert d3.state_dict()["offset"] == consumed and d3.state_dict()["next"] == 0
    left = math.ceil((n - consumed) / 5)
    assert len(d3) == left
    loader = DataLoader(d3, batch_size=None, num_workers=workers)
    p3 = take(loader)
    assert len(p3) == left, "the pass yields len() batches"
    assert d3.epoch == 1 and len(d3) == math.ceil(n / 5), "the next epoch is whole"
    after = take(loader)
    return n, p1, p2, p3, after


@pytest.mark.parametrize("workers", [0, 2])
def test_iterable_resumes_on_other_world_and_batch_sizes_with_each_row_once(small, workers):
    n, p1, p2, p3, after = scenario(small, workers)
    rows = flat(p1) + flat(p2[0]) + flat(p2[1]) + flat(p3)
    assert sorted(rows) == list(range(n)), "every row of the epoch exactly once"
    # Phases 1 and 2 trained on a prefix of the epoch's global order: phase 1's rows are the
    # first 12 of an uninterrupted world-1 epoch, and rank r of world 2 the order's positions
    # 12 + r, 12 + r + 2, ...
    whole = flat(take(rankfeed.Dataset(small).loader(batch_size=4, **KW)))
    assert flat(p1) == whole[:12]
    for rank in range(2):
        assert flat(p2[rank]) == whole[12 + rank:36:2]
    assert flat(p3) == whole[36:]
    # The pass after the resumed epoch is rankfeed's epoch 1 at batch size 5.
    assert after == take(rankfeed.Dataset(small).loader(batch_size=5, epoch=1, **KW))
    if workers:
        assert (p1, p2, p3, after) == scenario(small, 0)[1:], "the same with 0 workers"
    print(f"elastic (workers={workers}): {n} rows once: {len(p1)} batches at world 1, "
          f"2x{len(p2[0])} at world 2, {len(p3)} at world 1 (batch 4, 3, 5)")


def test_strategies_that_cannot_restripe_refuse_naming_the_setting(small):
    grouped = dict(KW, batch_size=4, length_grouped=2)
    d = RankfeedIterable(small, rank=0, world_size=1, with_meta=True, **grouped)
    take(DataLoader(d, batch_size=None), 2)
    state = roundtrip(d.state_dict())
    other = RankfeedIterable(small, rank=0, world_size=2, **grouped)
    with pytest.raises(ValueError, match=r"world_size = 1 \(int\), this loader has 2 \(int\): "
                                         r"only the default \(random\) order"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size = 4"):
        RankfeedIterable(small, **{**grouped, "batch_size": 2}).load_state_dict(state)
    # The same world and batch size resume exactly, from any rank's iterable.
    same = RankfeedIterable(small, rank=0, world_size=1, with_meta=True, **grouped)
    assert same.load_state_dict(state) == "exact"
    # Other settings stay refused in the default order too, and a state without offset (older)
    # is offset 0.
    plain = RankfeedIterable(small, rank=1, world_size=2, batch_size=4, **KW)
    base = roundtrip(RankfeedIterable(small, batch_size=4, **KW).state_dict())
    for key, value in (("seed", 8), ("group_size", 3), ("dataset", "0" * 16)):
        bad = {**base, "settings": {**base["settings"], key: value}}
        with pytest.raises(ValueError, match=f"taken with {key} = "):
            plain.load_state_dict(bad)
    old = {k: v for k, v in base.items() if k != "offset"}
    assert plain.load_state_dict({**old, "next": 5}) == "elastic"
    assert plain.state_dict()["offset"] == 20


# --- real processes: torchrun + RankfeedTrainer -------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_phase(small, out, phase, nproc, opts):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = [str(WORKER), str(small), str(out), phase, json.dumps(opts)]
    if nproc == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--nnodes", "1", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               *args]
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"phase {phase} failed:\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    records = []
    for rank in range(nproc):
        with open(out / f"rows-{phase}-{rank}.jsonl") as f:
            records += [json.loads(line) for line in f]
    summaries = [json.loads((out / f"summary-{phase}-{r}.json").read_text()) for r in range(nproc)]
    return records, summaries, time.perf_counter() - t


def test_trainer_resumes_on_two_processes_then_one_with_each_row_once(small, tmp_path):
    dist = torch.distributed
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    n = len(rankfeed.Dataset(small))
    out = tmp_path / "run"
    out.mkdir()
    data = dict(KW, batch_size=4)
    # 1 process: 3 steps (12 rows), checkpoint-3.
    r1, s1, t1 = run_phase(small, out, "1", 1, dict(data=data, max_steps=3, save_steps=1000,
                                                   resume=None))
    ckpt1 = out / "checkpoint-3"
    state1 = json.loads((ckpt1 / "rankfeed_state.json").read_text())
    assert (state1["epoch"], state1["next"], state1["offset"]) == (0, 3, 0)
    assert state1["settings"]["world_size"] == 1
    # 2 processes (gloo): 4 steps more, 2 x 4 x 4 rows, checkpoint-7.
    r2, s2, t2 = run_phase(small, out, "2", 2, dict(data=data, max_steps=7, save_steps=1000,
                                                   resume=str(ckpt1)))
    ckpt2 = out / "checkpoint-7"
    state2 = json.loads((ckpt2 / "rankfeed_state.json").read_text())
    assert (state2["epoch"], state2["next"], state2["offset"]) == (0, 4, 12), state2
    assert state2["settings"]["world_size"] == 2
    # 1 process, batch size 5: to the end of the epoch (num_train_epochs=1), and no further.
    data3 = dict(KW, batch_size=5)
    r3, s3, t3 = run_phase(small, out, "3", 1, dict(data=data3, max_steps=-1, save_steps=1000,
                                                   resume=str(ckpt2)))

    assert [r["step"] for r in r1] == [0, 1, 2] and all(r["world"] == 1 for r in r1)
    for rank in range(2):
        mine = [r for r in r2 if r["rank"] == rank]
        assert [r["step"] for r in mine] == [3, 4, 5, 6] and all(r["world"] == 2 for r in mine)
    left = math.ceil((n - 12 - 32) / 5)
    assert [r["step"] for r in r3] == list(range(7, 7 + left)), "the rest of the epoch, once"
    assert s3[0]["global_step"] == 7 + left == s3[0]["max_steps"]
    assert {r["epoch"] for r in r1 + r2 + r3} == {0}
    rows = [x for r in r1 + r2 + r3 for x in r["rows"]]
    assert sorted(rows) == list(range(n)), "every row of the epoch trained exactly once"
    print(f"torchrun elastic: {n} rows once; phase 1: 1 process x {len(r1)} steps ({t1:.1f} s), "
          f"phase 2: 2 processes x {len(r2) // 2} steps ({t2:.1f} s), phase 3: 1 process x "
          f"{len(r3)} steps, batch 5 ({t3:.1f} s); final global_step {s3[0]['global_step']}")
