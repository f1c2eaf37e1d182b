"""Passes of a RankfeedIterable (issue 18): epochs and interrupted loops advance the same with
0, 1 or N DataLoader workers, with a plain DataLoader and with torchdata's StatefulDataLoader;
an iterable made before `init_process_group` shards by the group's rank and world size."""

import json
import os
import subprocess
import sys

import pytest

import rankfeed
from conftest import ROOT

torch = pytest.importorskip("torch")
from torch.utils.data import DataLoader  # noqa: E402

from rankfeed.torch import RankfeedIterable  # noqa: E402

BERT = ROOT / "data" / "sample" / "bert" / "tokenizer.json"
FIXTURE = ROOT / "tests" / "fixtures" / "roundtrip.jsonl"
KW = dict(batch_size=2, group_size=3, query_max_len=16, passage_max_len=32, seed=11)
LONG = int(os.environ.get("RANKFEED_LONG", "1"))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("passes") / "ds"
    rankfeed.convert(FIXTURE, BERT, out, progress=False)
    return out


def ids(batch):
    return (batch["rows"].tolist(), batch["neg"].tolist())


def reference(path, epoch, **kw):
    """Epoch `epoch` of the rank's loader, straight from rankfeed."""
    return [ids(b) for b in rankfeed.Dataset(path).loader(epoch=epoch, **{**KW, **kw})]


def make_loader(kind, data, workers, **dl):
    if kind == "stateful":
        sd = pytest.importorskip("torchdata.stateful_dataloader")
        return sd.StatefulDataLoader(data, batch_size=None, num_workers=workers, **dl)
    return DataLoader(data, batch_size=None, num_workers=workers, **dl)


def run_loops(path, kind, workers, cut, seeded=False, **dl):
    """Two whole passes, a pass cut after `cut` batches, one more whole pass."""
    data = RankfeedIterable(path, with_meta=True, **KW)
    loader = make_loader(kind, data, workers, **dl)
    passes = []
    for p in range(4):
        if seeded:  # every DataLoader iterator then gets the same base seed
            torch.manual_seed(0)
        got = []
        for batch in loader:
            got.append(ids(batch))
            if p == 2 and len(got) == cut:
                break
        passes.append(got)
    return passes, data


CASES = [("plain", 0), ("plain", 1), ("plain", 2), ("stateful", 0), ("stateful", 1),
         ("stateful", 2)]


def test_passes_advance_the_same_with_any_worker_count_and_loader(small):
    # Regression: with workers, every loop repeated epoch 0, and a loop after a break replayed
    # batch 0 onward (the main process's iterable never moved; the workers' copies did).
    expect = [reference(small, e) for e in range(4)]
    steps = len(expect[0])
    assert expect[0] != expect[1], "epochs differ"
    cut = steps // 2
    want = [expect[0], expect[1], expect[2][:cut], expect[3]]
    checked = 0
    for kind, workers in CASES:
        passes, data = run_loops(small, kind, workers, cut)
        assert passes == want, (kind, workers)
        assert data.epoch == 4 and len(data) == steps
        checked += 1
    for extra in (dict(persistent_workers=True), dict(seeded=True)):
        for kind in ("plain", "stateful"):
            passes, _ = run_loops(small, kind, 2, cut, **extra)
            assert passes == want, (kind, extra)
            checked += 1
    print(f"passes: {checked} loaders x 4 passes ({steps} batches an epoch), all as rankfeed's "
          f"epochs 0, 1, 2[:{cut}], 3")


def test_set_epoch_and_load_state_dict_choose_the_next_pass(small):
    expect = {e: reference(small, e) for e in (0, 5, 6)}
    for workers in (0, 2):
        data = RankfeedIterable(small, with_meta=True, **KW)
        loader = DataLoader(data, batch_size=None, num_workers=workers)
        data.set_epoch(5)
        assert [ids(b) for b in loader] == expect[5]
        assert data.state_dict()["epoch"] == 6 and data.state_dict()["next"] == 0
        state = {**data.state_dict(), "epoch": 0, "next": 3}
        data.load_state_dict(state)
        assert [ids(b) for b in loader] == expect[0][3:], workers
        # A whole pass after a resumed one: the epoch after it.
        assert [ids(b) for b in loader] == reference(small, 1)


def test_state_dict_during_a_worker_pass_says_where_the_position_is(small):
    data = RankfeedIterable(small, **KW)
    it = iter(DataLoader(data, batch_size=None, num_workers=2))
    next(it)
    with pytest.raises(RuntimeError, match="StatefulDataLoader"):
        data.state_dict()
    for _ in it:
        pass
    assert data.state_dict()["epoch"] == 1 and data.state_dict()["next"] == 0


def test_stateful_resume_of_a_cut_pass_with_workers(small, tmp_path):
    # The exact way to continue an interrupted epoch: the StatefulDataLoader's state.
    sd = pytest.importorskip("torchdata.stateful_dataloader")
    whole = reference(small, 0)
    for workers in (0, 2):
        for cut in sorted({1, len(whole) // 3, len(whole) - 1})[: 2 + LONG]:
            data = RankfeedIterable(small, with_meta=True, **KW)
            dl = sd.StatefulDataLoader(data, batch_size=None, num_workers=workers)
            it = iter(dl)
            head = [ids(next(it)) for _ in range(cut)]
            state = dl.state_dict()
            del it
            data2 = RankfeedIterable(small, with_meta=True, **KW)
            dl2 = sd.StatefulDataLoader(data2, batch_size=None, num_workers=workers)
            dl2.load_state_dict(state)
            tail = [ids(b) for b in dl2]
            assert head + tail == whole, (workers, cut)
            # The pass after the resumed one is the next epoch.
            assert [ids(b) for b in dl2] == reference(small, 1), (workers, cut)


RANK_SCRIPT = r"""
import json, sys
import torch, torch.distributed as dist
from torch.utils.data import DataLoader
from rankfeed.torch import RankfeedIterable
path, init, rank, kw = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
data = RankfeedIterable(path, with_meta=True, **kw)    # before the process group exists
before = len(data)
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
out = {"before": before, "len": len(data), "settings": data.state_dict()["settings"], "epochs": []}
loader = DataLoader(data, batch_size=None, num_workers=0)
for epoch in range(3):
    out["epochs"].append([b["rows"].tolist() for b in loader])
    out.setdefault("lens", []).append(len(data))
dist.barrier()
dist.destroy_process_group()
print(json.dumps(out))
"""


def test_iterable_made_before_init_process_group_shards_every_epoch(small, tmp_path):
    # Regression: len() kept the one-process count, and every epoch after the first yielded
    # no batch, without an error.
    init = f"file://{tmp_path / 'init'}"
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(small), init, str(r),
                               json.dumps(KW)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for r in range(2)]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    n = len(rankfeed.Dataset(small))
    per_rank = [len(list(rankfeed.Dataset(small).loader(rank=r, world_size=2, **KW)))
                for r in range(2)]
    one = len(list(rankfeed.Dataset(small).loader(**KW)))
    assert per_rank[0] < one
    for r, out in enumerate(outs):
        assert out["before"] == one
        assert out["len"] == per_rank[r] and out["lens"] == [per_rank[r]] * 3
        assert out["settings"]["world_size"] == 2 and out["settings"]["rank"] == r
        assert [len(e) for e in out["epochs"]] == [per_rank[r]] * 3, "every epoch has batches"
        assert out["epochs"][0] != out["epochs"][1]
    for e in range(3):
        rows = [x for out in outs for b in out["epochs"][e] for x in b]
        assert set(rows) == set(range(n)), f"epoch {e} covers every row"
