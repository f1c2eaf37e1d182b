"""No-duplicates batches (issue 22) from Python: `Dataset.loader(no_duplicates=True)` never
puts a query or a drawn passage twice in a global batch (all ranks at one step), in embedder
mode and the pair modes; its state_dict resumes exactly; the strategies it excludes, and a
state taken without it, are refused by name."""

import json
import random

import pytest

import rankfeed
from conftest import ROOT

BERT = ROOT / "data" / "sample" / "bert" / "tokenizer.json"
KW = dict(batch_size=4, group_size=4, query_max_len=16, passage_max_len=32, seed=5,
          no_duplicates=True)


@pytest.fixture(scope="module")
def crowded(tmp_path_factory):
    """300 rows whose queries come from 40 and passages from 80: collisions everywhere."""
    rng = random.Random(22)
    root = tmp_path_factory.mktemp("crowded")
    passages = [f"passage number {i} about {rng.choice(['cats', 'dogs', 'rain'])}" for i in range(80)]
    queries = [f"what is thing {i}" for i in range(40)]
    with open(root / "train.jsonl", "w") as f:
        for _ in range(300):
            f.write(json.dumps({"query": rng.choice(queries), "pos": rng.sample(passages, 1),
                                "neg": rng.sample(passages, rng.randint(1, 6))}) + "\n")
    rankfeed.convert([root / "train.jsonl"], BERT, root / "ds", progress=False)
    return rankfeed.Dataset(root / "ds")


def keys(ds, batch):
    """The query and drawn passage ids of each group of a batch."""
    out = []
    for row, pos, neg in zip(batch["rows"].tolist(), batch["pos"].tolist(), batch["neg"].tolist()):
        g = ds.group(row)
        drawn = {int(g["pos"][pos])} | {int(g["neg"][j]) for j in neg}
        out.append((("q", tuple(g["query"].tolist()), g["prompt"]), drawn))
    return out


@pytest.mark.parametrize("mode", ["embedder", "encoder"])
@pytest.mark.parametrize("world,tail", [(1, "pad"), (2, "pad"), (3, "drop"), (2, "uneven")])
def test_no_global_batch_repeats_a_query_or_a_passage(crowded, mode, world, tail):
    loaders = [crowded.loader(mode=mode, rank=r, world_size=world, shard_tail=tail, **KW)
               for r in range(world)]
    if tail != "uneven":
        assert len({len(l) for l in loaders}) == 1, "every rank takes the same steps"
    steps = max(len(l) for l in loaders)
    seen, deferred = [], 0
    for k in range(steps):
        parts = [l.batch(0, k) for l in loaders if k < len(l)]
        if tail != "uneven":
            assert len({len(p["rows"]) for p in parts}) == 1, "equal shares"
        groups = [g for p in parts for g in keys(crowded, p)]
        queries = [q for q, _ in groups]
        assert len(queries) == len(set(queries)), f"step {k}: a query twice"
        drawn = [i for _, d in groups for i in d]
        assert len(drawn) == len(set(drawn)), f"step {k}: a passage twice"
        deferred += len(groups) < world * KW["batch_size"]
        seen += [r for p in parts for r in p["rows"].tolist()]
    assert deferred > 1, "the data collides: incomplete batches before the last"
    if tail == "uneven":
        assert sorted(seen) == list(range(len(crowded))), "every row exactly once"
    else:
        assert len(set(seen)) >= len(crowded) - steps * (world - 1)
    print(f"no_duplicates {mode} world {world} {tail}: {steps} steps for {len(crowded)} rows "
          f"({deferred} incomplete global batches)")


def test_state_dict_resumes_exactly(crowded):
    l = crowded.loader(mode="embedder", **KW)
    whole = [b["rows"].tolist() for b in l]
    assert l.state_dict()["no_duplicates"] is True
    l.set_epoch(0)
    for _ in range(7):
        next(l)
    state = l.state_dict()
    r = crowded.loader(mode="embedder", **KW)
    assert r.load_state_dict(state) == "exact"
    assert [b["rows"].tolist() for b in r] == whole[7:]
    # Without the option, or on another world size (no elastic resume), the state is refused.
    with pytest.raises(ValueError, match="no_duplicates"):
        crowded.loader(mode="embedder", **{**KW, "no_duplicates": False}).load_state_dict(state)
    with pytest.raises(ValueError, match="world_size"):
        crowded.loader(mode="embedder", world_size=2, **KW).load_state_dict(state)


def test_excluded_strategies_are_refused_by_name(crowded):
    for other in (dict(max_tokens=500), dict(length_grouped=2), dict(same_source=True)):
        name = next(iter(other))
        with pytest.raises(ValueError, match=f"no_duplicates does not combine with {name}"):
            crowded.loader(**KW, **other)
