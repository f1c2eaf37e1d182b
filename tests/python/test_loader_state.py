"""Checkpoints of `Dataset.loader` (issue 18): a state names every argument that decides the
batches, with stable values, and `load_state_dict` accepts a state only when the batches from
it would be the same, comparing values and types."""

import inspect
import os
import random

import numpy as np
import pytest

import rankfeed
from conftest import ROOT

BERT = ROOT / "data" / "sample" / "bert" / "tokenizer.json"
FIXTURE = ROOT / "tests" / "fixtures" / "roundtrip.jsonl"
LONG = int(os.environ.get("RANKFEED_LONG", "1"))
# The arguments that change when batches are computed, never what they hold, and the start.
NOT_SETTINGS = {"epoch", "prefetch_threads", "prefetch_depth"}
# Keys of a state that are no argument: the position and what the arguments imply.
DERIVED = {"epoch", "step", "offset", "dataset", "rows_per_epoch", "steps_per_epoch"}
# A state is a position of every rank: the rank may differ.
RANK = {"rank"}
# Settings an elastic resumption may change, in the default (random) order.
ELASTIC = {"world_size", "batch_size"}
# For each loader argument, values to draw from (the first is the default).
VALUES = {
    "batch_size": [None, 2, 3, 5],
    "group_size": [None, 2, 3],
    "mode": ["encoder", "llm", "matryoshka", "embedder"],
    "query_max_len": [None, 8],
    "passage_max_len": [None, 24],
    "truncation": ["flag_embedding", "longest_first"],
    "seed": [None, 1, 2],
    "epoch": [None, 1],
    "rank": [None, 1],
    "world_size": [None, 2],
    "shard_tail": ["pad", "drop", "uneven"],
    "shuffle": [True, False],
    "drop_last": [False, True],
    "pad_to_multiple_of": [None, 8],
    "padding_side": [None, "left", "right"],
    "pad_id": [None, 5],
    "int32": [False, True],
    "attention_mask": [True, False],
    "knowledge_distillation": [False, True],
    "max_example_num_per_dataset": [None, 30],
    "skip_rows_without_negatives": [False, True],
    "exclude_false_negatives": [False, True],
    "prefetch_threads": [None, 0, 2],
    "sub_batch_size": [None, 2],
    "add_eos": [None, True, False],
    "matryoshka_scores_by_index": [False, True],
    "prefetch_depth": [None, 1],
    "packed": [False, True],
    "length_grouped": [None, 3],
    "max_tokens": [None, 500],
    "weights": [None, [1.0, 2.0, 1.0]],
    "same_source": [False, True],
    "no_duplicates": [False, True],
    "source_batch_sizes": [None, [2, 3, 4]],
    "small_threshold": [None, 60],
    "drop_threshold": [None, 10],
}


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """The round-trip fixture as three sources (for weights, caps and same-source batches)."""
    root = tmp_path_factory.mktemp("three")
    rows = FIXTURE.read_text().splitlines(keepends=True)
    third = len(rows) // 3
    for i in range(3):
        (root / f"s{i}.jsonl").write_text("".join(rows[i * third:(i + 1) * third]))
    rankfeed.convert(sorted(root.glob("s*.jsonl")), BERT, root / "ds", progress=False)
    return rankfeed.Dataset(root / "ds")


def loader_args():
    return list(inspect.signature(rankfeed.Dataset.loader).parameters)[1:]


def test_every_batch_argument_is_a_checkpoint_setting(three):
    # Regression: pad_to_multiple_of, padding_side, pad_id, int32 and attention_mask were not
    # in the state, so a state taken with other padding was accepted.
    args = loader_args()
    assert set(VALUES) == set(args), "VALUES lists every loader argument"
    state = three.loader().state_dict()
    assert set(state) - DERIVED == set(args) - NOT_SETTINGS
    print(f"settings: {len(set(state) - DERIVED)} of {len(args)} arguments "
          f"(not: {sorted(NOT_SETTINGS)})")


def test_a_state_from_before_exclude_false_negatives_was_taken_without_it(three):
    # States written before the option existed drew every negative: they resume without it.
    state = three.loader().state_dict()
    del state["exclude_false_negatives"]
    assert three.loader().load_state_dict({**state, "step": 1}) == "exact"
    with pytest.raises(ValueError, match="exclude_false_negatives"):
        three.loader(exclude_false_negatives=True).load_state_dict(state)


def test_a_state_from_before_no_duplicates_was_taken_without_it(three):
    # States written before the option existed were in random order: they resume in it.
    state = three.loader().state_dict()
    del state["no_duplicates"]
    assert three.loader().load_state_dict({**state, "step": 1}) == "exact"
    with pytest.raises(ValueError, match="no_duplicates"):
        three.loader(no_duplicates=True).load_state_dict(state)


def test_a_state_from_before_the_truncation_option_was_taken_with_its_default(three):
    # States written before `truncation` existed lack the key: they were taken with
    # FlagEmbedding's truncation, resume with it, and are refused with longest_first.
    state = three.loader().state_dict()
    del state["truncation"]
    assert three.loader().load_state_dict({**state, "step": 1}) == "exact"
    with pytest.raises(ValueError, match="taken with truncation = "):
        three.loader(truncation="longest_first").load_state_dict(state)


def test_other_padding_is_refused_even_when_the_steps_match(three):
    a = three.loader(max_tokens=2000, batch_size=8, group_size=2)
    b = three.loader(max_tokens=2000, batch_size=8, group_size=2, pad_to_multiple_of=8)
    c = three.loader(max_tokens=2000, batch_size=8, group_size=2, pad_to_multiple_of=2)
    assert len(a) == len(c), "the case the finding describes: same steps, other padding"
    for other in (b, c):
        with pytest.raises(ValueError, match="taken with pad_to_multiple_of = None"):
            other.load_state_dict(a.state_dict())


def test_state_values_are_stable_names(three):
    # Regression: mode and shard_tail were Debug output ("Encoder", "Pad"): renaming a Rust
    # variant would have invalidated every checkpoint.
    for mode in VALUES["mode"]:
        assert three.loader(mode=mode).state_dict()["mode"] == mode
    for tail in VALUES["shard_tail"]:
        assert three.loader(shard_tail=tail).state_dict()["shard_tail"] == tail
    for side in VALUES["padding_side"]:
        assert three.loader(padding_side=side).state_dict()["padding_side"] == side


def test_load_state_dict_compares_types(three):
    # Regression: batch_size="2" said "taken with batch_size = 2, this loader has 2", and
    # shuffle=1 or batch_size=2.0 were accepted as True and 2.
    l = three.loader(batch_size=2)
    state = l.state_dict()
    with pytest.raises(ValueError, match=r"batch_size = '2' \(str\), this loader has 2 \(int\)"):
        l.load_state_dict({**state, "batch_size": "2"})
    for key, value in (("batch_size", 2.0), ("shuffle", 1), ("seed", True)):
        with pytest.raises(ValueError, match=f"taken with {key} = "):
            l.load_state_dict({**state, key: value})
    l.load_state_dict(state)


def equal_batches(a, b):
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        xs, ys = (x, y) if isinstance(x, list) else ([x], [y])
        if len(xs) != len(ys) or any(
                p.dtype != q.dtype or p.shape != q.shape or not np.array_equal(p, q)
                for p, q in zip(xs, ys)):
            return False
    return True


def draw(rng, base):
    """`base` with 1-3 arguments drawn again."""
    out = dict(base)
    for name in rng.sample(sorted(VALUES), rng.randint(1, 3)):
        out[name] = rng.choice(VALUES[name])
    return out


def make(ds, args):
    try:
        return ds.loader(**{k: v for k, v in args.items() if v is not None})
    except ValueError:
        return None


def random_order(args):
    return (args["length_grouped"] is None and args["max_tokens"] is None and not args["same_source"]
            and not args["no_duplicates"])


def test_a_state_is_accepted_only_for_the_same_batches(three):
    """Seeded pairs of argument sets A, B (B: A with 1-3 arguments drawn again): B accepts A's
    state iff they differ only in NOT_SETTINGS and the rank, or also in world_size and
    batch_size with both in the default order (elastic); a refusal names an argument that
    differs, and a state accepted with only NOT_SETTINGS changed gives B exactly A's next
    batches."""
    rng = random.Random(18)
    pairs, refused, accepted, elastic, invalid = 0, 0, 0, 0, 0
    while pairs < 150 * LONG:
        a_args = draw(rng, {k: v[0] for k, v in VALUES.items()})
        b_args = draw(rng, a_args)
        a, b = make(three, a_args), make(three, b_args)
        if a is None or b is None or len(a) == 0:
            invalid += 1
            continue
        pairs += 1
        changed = {k for k in VALUES if a_args[k] != b_args[k]}
        step = rng.randrange(len(a))
        state = {**a.state_dict(), "step": step}
        a.load_state_dict(state)
        may = NOT_SETTINGS | RANK
        if random_order(a_args) and random_order(b_args):
            may = may | ELASTIC
        try:
            how = b.load_state_dict(state)
        except ValueError as e:
            refused += 1
            named = str(e).split(" = ")[0].rsplit(" ", 1)[-1]
            assert named in changed - NOT_SETTINGS - RANK, (str(e), changed)
            continue
        accepted += 1
        assert not changed - may, f"accepted although {changed} changed"
        if changed & ELASTIC:
            elastic += 1
            assert how == "elastic" and b.state_dict()["step"] == 0, (how, b.state_dict())
            continue
        assert how == "exact"
        if changed - NOT_SETTINGS:
            continue  # another rank: its own batches
        for _ in range(min(3, len(a) - step)):
            assert equal_batches(next(a), next(b)), (a_args, b_args)
    print(f"state pairs: {pairs} ({accepted} accepted, {elastic} of them elastic; {refused} refused "
          f"naming a changed argument; {invalid} invalid draws skipped)")
    assert refused and accepted and elastic


def test_hostile_states_and_options_are_refused_by_name(three):
    # Regressions (review of issue 18): a tampered rank, an elastic world or batch size beyond
    # the limits, an epoch that would wrap, per-source errors without the option's shape,
    # numpy arrays as weights, a negative pad id, world_size 0 named as rank.
    import numpy as np
    l = three.loader(batch_size=2)
    state = l.state_dict()
    for key, value, match in (("rank", "x", "rank must be a rank"),
                              ("rank", -1, "rank must be a rank"),
                              ("world_size", 2**63, "taken with world_size"),
                              ("batch_size", 2**62, "taken with batch_size"),
                              ("epoch", 2**64 - 1, "epoch is beyond")):
        with pytest.raises(ValueError, match=match):
            l.load_state_dict({**state, key: value})
    with pytest.raises(ValueError, match="epoch .* is beyond"):
        three.loader(epoch=2**63)
    with pytest.raises(ValueError, match="source_batch_sizes: .* must be a list"):
        three.loader(same_source=True, source_batch_sizes=[-1, 2, 2])
    with pytest.raises(ValueError, match="weights: .* must be a list"):
        three.loader(weights=[1, "a", 1])
    assert three.loader(weights=np.array([1.0, 2.0, 1.0])).state_dict()["weights"] == [1.0, 2.0, 1.0]
    with pytest.raises(ValueError, match="pad_id: must be non-negative"):
        three.loader(pad_id=-5)
    with pytest.raises(ValueError, match="world_size: 0 ranks"):
        three.loader(world_size=0)
