"""Parity: rankfeed's batches equal the reference pipeline's (transformers<5, FlagEmbedding's
algorithm, re-tokenizing text on every access), array for array: values, dtype, shape.

Real tokenizers: BERT WordPiece and XLM-R for `encoder`; Mistral SentencePiece-BPE for `llm` and
`matryoshka`. >= 200 random selections per combination, covering instructions, per-row prompts,
pad_to_multiple_of 8, left and right padding, queries longer than the budget, fewer negatives
than G-1, and teacher scores."""

import json
import math
import random
import zlib

import numpy as np
import pytest

from conftest import ROOT, read_jsonl, run_rankfeed, tokenizer_path
from reference import Reference, load_tokenizer

FIXTURE = ROOT / "tests" / "fixtures" / "roundtrip.jsonl"
ROWS = read_jsonl(FIXTURE)

TEXT = {
    "plain": {},
    "instructions": {
        "query_instruction": "Represent this query for reranking: ",
        "query_instruction_format": "<instruct>{}\\n<query>{}",
        "passage_instruction": "Passage: ",
        "passage_instruction_format": "{}{}",
    },
    "matryoshka": {"query_instruction": "A: ", "passage_instruction": "B: "},
}

# (tokenizer, mode, text settings, qm, pm, G, pad_to_multiple_of, padding side, distillation)
COMBOS = [
    ("bert", "encoder", "plain", 32, 64, 8, None, None, False),  # default: the tokenizer's (right)
    ("bert", "encoder", "instructions", 16, 2, 8, 8, "left", False),
    ("bert", "encoder", "plain", 32, 128, 16, 8, "right", True),
    ("xlmr", "encoder", "plain", 32, 64, 8, None, "right", False),
    ("xlmr", "encoder", "instructions", 16, 3, 8, 8, "left", True),
    ("mistral", "llm", "plain", 32, 64, 8, None, None, False),  # default side: left
    ("mistral", "llm", "instructions", 8, 16, 8, 8, "right", False),
    ("mistral", "llm", "plain", 32, 192, 16, 8, "left", True),
    ("mistral", "matryoshka", "matryoshka", 32, 192, 16, 8, None, True),  # default side: right
    ("mistral", "matryoshka", "matryoshka", 16, 32, 8, None, "left", False),
]
BATCH = 4
SELECTIONS = 200


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, rankfeed_bin):
    cache = {}

    def get(tok_name, text_name):
        key = (tok_name, text_name)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"{tok_name}-{text_name}") / "ds"
            args = ["convert", FIXTURE, "--tokenizer", tokenizer_path(tok_name), "-o", out]
            for k, v in TEXT[text_name].items():
                args += ["--" + k.replace("_", "-"), v]
            run_rankfeed(rankfeed_bin, *args)
            cache[key] = out
        return cache[key]

    return get


def draw(rng, n_neg, k):
    """FlagEmbedding's negative sampling, so selections look like training's."""
    if n_neg >= k:
        return rng.sample(range(n_neg), k)
    return rng.sample(list(range(n_neg)) * math.ceil(k / n_neg), k)


def selections_for(seed, group_size, kd):
    rng = random.Random(seed)
    usable = [i for i, r in enumerate(ROWS) if r["neg"] and (not kd or "pos_scores" in r and "neg_scores" in r)]
    sels = []
    for _ in range(SELECTIONS):
        i = rng.choice(usable)
        r = ROWS[i]
        sels.append({"row": i, "pos": rng.randrange(len(r["pos"])), "neg": draw(rng, len(r["neg"]), group_size - 1)})
    return [sels[b:b + BATCH] for b in range(0, len(sels), BATCH)]


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(str(x) for x in c))
def test_batches_equal_reference(tmp_path, rankfeed_bin, datasets, combo):
    tok_name, mode, text_name, qm, pm, g, multiple, side, kd = combo
    ds = datasets(tok_name, text_name)
    batches = selections_for(zlib.crc32(repr(combo).encode()), g, kd)
    assert sum(len(b) for b in batches) >= 200
    sel_file = tmp_path / "selections.json"
    sel_file.write_text(json.dumps(batches))
    out = tmp_path / "out"
    args = ["collate", ds, "--selections", sel_file, "-o", out, "--mode", mode,
            "--query-max-len", qm, "--passage-max-len", pm, "--group-size", g]
    if side:
        args += ["--padding-side", side]
    if multiple:
        args += ["--pad-to-multiple-of", multiple]
    if kd:
        args += ["--knowledge-distillation"]
    run_rankfeed(rankfeed_bin, *args)

    default_side = {"encoder": "right", "llm": "left", "matryoshka": "right"}[mode]
    ref = Reference(load_tokenizer(tok_name, tokenizer_path(tok_name)), mode, qm, pm, TEXT[text_name],
                    pad_to_multiple_of=multiple, padding_side=side or default_side, knowledge_distillation=kd)
    overlong = 0
    for k, sels in enumerate(batches):
        expected = ref.batch(ROWS, sels)
        got = {p.stem: np.load(p) for p in (out / str(k)).glob("*.npy")}
        assert sorted(got) == sorted(expected), f"batch {k}: arrays differ"
        for name, want in expected.items():
            have = got[name]
            assert have.dtype == want.dtype, f"batch {k} {name}: dtype {have.dtype} != {want.dtype}"
            assert have.shape == want.shape, f"batch {k} {name}: shape {have.shape} != {want.shape}"
            assert np.array_equal(have, want), f"batch {k} {name}: values differ\n{have}\n{want}"
        overlong += int((out / str(k) / "overlong.txt").read_text())
    if (qm, pm) in ((16, 2), (16, 3), (8, 16)):
        assert overlong > 0, "this combination must exercise queries longer than the budget"
