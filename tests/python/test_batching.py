"""Batches that waste no GPU (issue 12) from Python: token budgets, weighted mixing,
same-source batches and per-epoch subsets through `Dataset.loader` and the torch adapter."""

import gzip
import json

import numpy as np
import pytest

import rankfeed
from conftest import ROOT

BERT = ROOT / "data" / "sample" / "bert" / "tokenizer.json"
SAMPLE = ROOT / "data" / "sample" / "wordnet-nouns.jsonl.gz"
KW = dict(batch_size=4, group_size=4, query_max_len=16, passage_max_len=48, seed=7)
SIZES = {"big.jsonl": 600, "mid.jsonl": 300, "small.jsonl": 100}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Three sources of 600, 300 and 100 WordNet rows."""
    src = tmp_path_factory.mktemp("sources")
    with gzip.open(SAMPLE, "rt") as f:
        rows = [line for line in f if line.strip()]
    at = 0
    for name, n in SIZES.items():
        (src / name).write_text("".join(rows[at:at + n]))
        at += n
    out = src.parent / "mixed"
    rankfeed.convert(sorted(src.iterdir()), BERT, out, progress=False)
    return rankfeed.Dataset(out)


def source_of(ds):
    names = [s["path"].rsplit("/", 1)[-1] for s in ds.manifest["sources"]]
    starts = np.cumsum([0] + [s["rows_accepted"] for s in ds.manifest["sources"]])
    return lambda row: names[int(np.searchsorted(starts, row, side="right")) - 1]


def epoch_rows(loader):
    return [b["rows"].tolist() for b in loader]


def test_weights_set_each_source_share(mixed):
    of = source_of(mixed)
    weights = {"big.jsonl": 1, "mid.jsonl": 1, "small.jsonl": 2}
    l = mixed.loader(weights=weights, shard_tail="uneven", **KW)
    rows = [r for b in epoch_rows(l) for r in b]
    share = {n: sum(of(r) == n for r in rows) / len(rows) for n in SIZES}
    assert len(rows) == 1000, "the epoch keeps its length"
    for n, w in weights.items():
        assert abs(share[n] - w / 4) < 0.01, share
    # "small" gives 500 rows from 100: five copies of each row.
    small = [r for r in rows if of(r) == "small.jsonl"]
    assert all(small.count(r) == 5 for r in set(small))
    # The list form in manifest order is the same setting.
    order = [s["path"].rsplit("/", 1)[-1] for s in mixed.manifest["sources"]]
    as_list = mixed.loader(weights=[weights[n] for n in order], shard_tail="uneven", **KW)
    assert epoch_rows(as_list) == epoch_rows(mixed.loader(weights=weights, shard_tail="uneven", **KW))
    with pytest.raises(ValueError, match="not a source"):
        mixed.loader(weights={"nope.jsonl": 1, **weights}, **KW)
    with pytest.raises(ValueError, match="no value for source"):
        mixed.loader(weights={"big.jsonl": 1}, **KW)
    with pytest.raises(ValueError, match="weights"):
        mixed.loader(weights=[1, 2], **KW)


def test_caps_draw_a_new_subset_each_epoch(mixed):
    of = source_of(mixed)
    subsets = []
    for epoch in (0, 1):
        l = mixed.loader(max_example_num_per_dataset=200, epoch=epoch, shard_tail="uneven", **KW)
        rows = [r for b in epoch_rows(l) for r in b]
        assert len(rows) == len(set(rows)) == 200 + 200 + 100
        subsets.append(sorted(r for r in rows if of(r) == "big.jsonl"))
    assert subsets[0] != subsets[1]


def test_same_source_batches(mixed):
    of = source_of(mixed)
    sizes = {"big.jsonl": 8, "mid.jsonl": 4, "small.jsonl": 2}
    for world in (1, 2):
        steps = []
        for rank in range(world):
            l = mixed.loader(same_source=True, source_batch_sizes=sizes, rank=rank,
                             world_size=world, shard_tail="drop", **KW)
            steps.append(epoch_rows(l))
        assert len({len(s) for s in steps}) == 1, "every rank takes the same steps"
        seen = []
        for k in range(len(steps[0])):
            global_batch = [r for s in steps for r in s[k]]
            names = {of(r) for r in global_batch}
            assert len(names) == 1, "one source per global batch"
            name = names.pop()
            assert all(len(s[k]) == sizes[name] for s in steps)
            seen += global_batch
        assert len(seen) == len(set(seen)), "at most once per epoch with the drop tail"


def test_token_budget_batches(mixed):
    l = mixed.loader(max_tokens=2048, length_grouped=20, **dict(KW, batch_size=64))
    batches = list(l)
    assert len(batches) == l.steps(0) and len(l) == l.steps(1)
    assert sorted(r for b in batches for r in b["rows"].tolist()) == list(range(len(mixed)))
    for b in batches:
        assert b["input_ids"].size <= 2048 or len(b["rows"]) == 1
    fill = np.mean([b["input_ids"].size / 2048 for b in batches])
    assert fill > 0.9, fill
    assert len({len(b["rows"]) for b in batches}) > 1, "the batch size varies"
    state = l.state_dict()
    assert state["max_tokens"] == 2048
    with pytest.raises(ValueError, match="max_tokens"):
        mixed.loader(max_tokens=0, **KW)


def test_token_budget_through_the_torch_adapter(mixed):
    torch = pytest.importorskip("torch")
    from rankfeed.torch import RankfeedIterable

    kw = dict(KW, batch_size=64, max_tokens=2048, length_grouped=20, with_meta=True)
    data = RankfeedIterable(mixed.path, **kw)
    n = len(data)
    whole = [b["rows"].tolist() for b in torch.utils.data.DataLoader(data, batch_size=None)]
    assert len(whole) == n
    two = RankfeedIterable(mixed.path, **kw)
    workers = torch.utils.data.DataLoader(two, batch_size=None, num_workers=2)
    assert [b["rows"].tolist() for b in workers] == whole
    # Resume mid-epoch from a state dict.
    again = RankfeedIterable(mixed.path, **kw)
    it = iter(again)
    first = [next(it)["rows"].tolist() for _ in range(3)]
    state = again.state_dict()
    resumed = RankfeedIterable(mixed.path, **kw)
    resumed.load_state_dict(state)
    assert first + [b["rows"].tolist() for b in resumed] == whole


@pytest.fixture(scope="module")
def same_dataset(tmp_path_factory):
    """FlagEmbedding-style same-dataset inputs: a file with its own `batch_size` field, a file
    marked `no_in_batch_neg`, and a directory of small files."""
    root = tmp_path_factory.mktemp("same")
    with gzip.open(SAMPLE, "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    def write(path, chunk, **extra):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(dict(r, **extra)) + "\n" for r in chunk))
    write(root / "in" / "a.jsonl", rows[:400], batch_size=6)
    write(root / "in" / "b_no_in_batch_neg.jsonl", rows[400:700])
    write(root / "in" / "small" / "s1.jsonl", rows[700:730], batch_size=5)
    write(root / "in" / "small" / "s2.jsonl", rows[730:750], batch_size=3)
    write(root / "in" / "tiny" / "t1.jsonl", rows[750:755])
    inputs = [root / "in" / "a.jsonl", root / "in" / "b_no_in_batch_neg.jsonl",
              root / "in" / "small", root / "in" / "tiny"]
    rankfeed.convert(inputs, BERT, root / "ds", progress=False)
    return rankfeed.Dataset(root / "ds")


def test_same_dataset_embedder_batches(same_dataset):
    ds = same_dataset
    names = [s["path"].rsplit("/", 1)[-1] for s in ds.manifest["sources"]]
    assert [s.get("batch_size") for s in ds.manifest["sources"]] == [6, None, 5, 3, None]
    of = source_of(ds)
    kw = dict(mode="embedder", same_source=True, batch_size=4, group_size=4, query_max_len=16,
              passage_max_len=32, small_threshold=50, drop_threshold=10, seed=3,
              shard_tail="drop")
    for world in (1, 2):
        loaders = [ds.loader(rank=r, world_size=world, **kw) for r in range(world)]
        steps = {len(l) for l in loaders}
        assert len(steps) == 1
        seen = []
        for k in range(steps.pop()):
            parts = [l.batch(0, k) for l in loaders]
            files = {of(r) for p in parts for r in p["rows"].tolist()}
            # One file, or the merged small files of one directory.
            assert len(files) == 1 or files <= {"s1.jsonl", "s2.jsonl"}, files
            name = files.pop() if len(files) == 1 else "s1.jsonl"
            want = {"a.jsonl": 6, "b_no_in_batch_neg.jsonl": 4, "s1.jsonl": 3, "s2.jsonl": 3}[name]
            for p in parts:
                assert len(p["rows"]) == want, (name, len(p["rows"]))
                assert p["query_input_ids"].shape[0] == want
                assert p["passage_input_ids"].shape[0] == want * 4
                assert bool(p["no_in_batch_neg"]) == name.startswith("b_no_in_batch_neg")
            seen += [r for p in parts for r in p["rows"].tolist()]
        assert len(seen) == len(set(seen)), "each row at most once per epoch"
        assert "t1.jsonl" not in {of(r) for r in seen}, "merged tiny files below drop_threshold"
    # Resume at any step gives the same batches.
    l = ds.loader(**kw)
    whole = [b["rows"].tolist() for b in l]
    for start in (1, len(whole) // 2, len(whole) - 1):
        r = ds.loader(**kw)
        r.load_state_dict({**r.state_dict(), "step": start})
        assert [b["rows"].tolist() for b in r] == whole[start:]
    assert names[:2] == ["a.jsonl", "b_no_in_batch_neg.jsonl"]


def test_embedder_sub_batches_through_the_torch_adapter(same_dataset):
    torch = pytest.importorskip("torch")
    from rankfeed.torch import RankfeedIterable

    data = RankfeedIterable(same_dataset.path, mode="embedder", batch_size=4, group_size=4,
                            query_max_len=16, passage_max_len=32, sub_batch_size=3)
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=None)))
    assert isinstance(batch["passage_input_ids"], list) and len(batch["passage_input_ids"]) == 6
    assert all(isinstance(t, torch.Tensor) for t in batch["passage_input_ids"])
    assert batch["no_in_batch_neg"].dtype == torch.bool
