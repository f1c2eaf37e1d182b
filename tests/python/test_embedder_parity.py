"""Embedder parity (issue 13): rankfeed's embedder batches equal FlagEmbedding 1.4.2's
(`AbsEmbedderTrainDataset` + `AbsEmbedderCollator`, re-tokenizing text with transformers<5
on every access), array for array: values, dtype, shape; lists of arrays with sub-batches.

Real tokenizers: BERT WordPiece (token_type_ids), XLM-R, and Mistral as a decoder embedder
(`add_eos_token=True`, left padding, pad = unk). Per-row `prompt`s are the query instruction;
selections include fewer negatives than G-1 (repeated draws)."""

import json
import math
import random
import zlib

import numpy as np
import pytest

import rankfeed
from conftest import ROOT, read_jsonl, tokenizer_path
from reference import EmbedderReference, load_tokenizer

FIXTURE = ROOT / "tests" / "fixtures" / "roundtrip.jsonl"
ALL_ROWS = read_jsonl(FIXTURE)
# Knowledge distillation needs scores on every row a loader may draw: those rows alone.
SCORED = [r for r in ALL_ROWS if "pos_scores" in r and "neg_scores" in r]
TEXT = {
    "plain": {},
    "instructions": {
        "query_instruction": "Represent this sentence for searching relevant passages: ",
        "query_instruction_format": "<instruct>{}\\n<query>{}",
        "passage_instruction": "passage: ",
    },
}
# (tokenizer, text, qm, pm, G, pad_to_multiple_of, sub_batch_size, distillation)
COMBOS = [
    ("bert", "plain", 32, 64, 8, 8, None, True),
    ("bert", "instructions", 8, 16, 4, None, 3, False),
    ("xlmr", "instructions", 16, 48, 8, None, 4, False),
    ("xlmr", "plain", 32, 64, 4, 8, None, True),
    ("mistral", "plain", 32, 64, 8, None, None, False),
    ("mistral", "instructions", 24, 40, 4, 8, 4, True),
]
BATCH = 8
SELECTIONS = 200


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    cache = {}

    def get(tok_name, text_name, kd):
        key = (tok_name, text_name, kd)
        if key not in cache:
            tmp = tmp_path_factory.mktemp(f"emb-{tok_name}-{text_name}-{kd}")
            src = FIXTURE
            if kd:
                src = tmp / "scored.jsonl"
                src.write_text("".join(json.dumps(r) + "\n" for r in SCORED))
            rankfeed.convert(src, tokenizer_path(tok_name), tmp / "ds", progress=False,
                             convention="embedder", **TEXT[text_name])
            cache[key] = rankfeed.Dataset(tmp / "ds")
        return cache[key]

    return get


def selections_for(rows, seed, group_size):
    rng = random.Random(seed)
    usable = [i for i, r in enumerate(rows) if r["neg"]]
    sels = []
    for _ in range(SELECTIONS):
        i = rng.choice(usable)
        r = rows[i]
        n, k = len(r["neg"]), group_size - 1
        neg = rng.sample(range(n), k) if n >= k else rng.sample(list(range(n)) * math.ceil(k / n), k)
        sels.append({"row": i, "pos": rng.randrange(len(r["pos"])), "neg": neg})
    return [sels[b:b + BATCH] for b in range(0, len(sels), BATCH)]


def assert_same(k, name, have, want):
    assert have.dtype == want.dtype, f"batch {k} {name}: dtype {have.dtype} != {want.dtype}"
    assert have.shape == want.shape, f"batch {k} {name}: shape {have.shape} != {want.shape}"
    assert np.array_equal(have, want), f"batch {k} {name}: values differ\n{have}\n{want}"


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(str(x) for x in c))
def test_embedder_batches_equal_reference(datasets, combo):
    tok_name, text_name, qm, pm, g, multiple, sub, kd = combo
    ds = datasets(tok_name, text_name, kd)
    rows = SCORED if kd else ALL_ROWS
    decoder = tok_name == "mistral"
    loader = ds.loader(mode="embedder", batch_size=BATCH, group_size=g, query_max_len=qm,
                       passage_max_len=pm, pad_to_multiple_of=multiple, sub_batch_size=sub,
                       knowledge_distillation=kd)
    tok = load_tokenizer(tok_name, tokenizer_path(tok_name), add_eos_token=decoder)
    side = "left" if decoder else tok.padding_side
    ref = EmbedderReference(tok, qm, pm, TEXT[text_name], pad_to_multiple_of=multiple,
                            padding_side=side, knowledge_distillation=kd,
                            sub_batch_size=sub or -1)
    batches = selections_for(rows, zlib.crc32(repr(combo).encode()), g)
    fewer = sum(len(rows[s["row"]]["neg"]) < g - 1 for b in batches for s in b)
    assert fewer > 0 or g <= 4, "fewer negatives than G-1 must occur"
    with_prompt = 0
    for k, sels in enumerate(batches):
        want = ref.batch(rows, sels)
        got = loader.collate(sels)
        with_prompt += sum("prompt" in rows[s["row"]] for s in sels)
        meta = {"rows", "pos", "neg", "overlong"}
        assert sorted(set(got) - meta) == sorted(want), f"batch {k}: keys differ"
        for name, w in want.items():
            h = got[name]
            if isinstance(w, list):
                assert isinstance(h, list) and len(h) == len(w), f"batch {k} {name}: chunks"
                for i, (hc, wc) in enumerate(zip(h, w)):
                    assert_same(k, f"{name}[{i}]", hc, wc)
            else:
                assert_same(k, name, h, w)
        if decoder:
            ids = got["passage_input_ids"]
            first = ids[0] if isinstance(ids, list) else ids
            assert (first[:, -1] == tok.eos_token_id).all(), "eos last, left padding"
    assert with_prompt > 0, "per-row prompts must be exercised"


def test_reranker_datasets_with_instructions_refuse_embedder_mode(tmp_path):
    out = tmp_path / "ds"
    rankfeed.convert(FIXTURE, tokenizer_path("bert"), out, progress=False,
                     query_instruction="Q: ")
    ds = rankfeed.Dataset(out)
    with pytest.raises(ValueError, match="convention"):
        ds.loader(mode="embedder")
    ds.loader(mode="encoder")  # the convention it was converted with
    plain = tmp_path / "plain"
    rankfeed.convert(FIXTURE, tokenizer_path("bert"), plain, progress=False)
    both = rankfeed.Dataset(plain)
    both.loader(mode="embedder"), both.loader(mode="encoder")  # no instruction: serves both


def test_matryoshka_scores_follow_the_seed_with_duplicated_negatives(tmp_path):
    """Duplicated negative texts with different scores: the seed code's teacher score is the
    first occurrence's, and every array equals the reference's."""
    from reference import Reference

    rows = [
        {"query": "what is a cat", "pos": ["a small feline", "a small feline"],
         "neg": ["a dog", "a bird", "a dog", "a fish", "a bird"],
         "pos_scores": [0.9, 0.4], "neg_scores": [0.1, 0.2, 0.3, 0.4, 0.5]},
        {"query": "what is a tree", "pos": ["a woody plant"], "neg": ["a rock", "a rock"]},
    ]
    src = tmp_path / "dup.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok_path = tokenizer_path("mistral")
    text = {"query_instruction": "A: ", "passage_instruction": "B: "}
    rankfeed.convert(src, tok_path, tmp_path / "ds", progress=False, **text)
    ds = rankfeed.Dataset(tmp_path / "ds")
    loader = ds.loader(mode="matryoshka", batch_size=2, group_size=4, query_max_len=16,
                       passage_max_len=32)
    sels = [{"row": 0, "pos": 1, "neg": [2, 4, 0]}, {"row": 1, "pos": 0, "neg": [1, 0, 1]}]
    got = loader.collate(sels)
    ref = Reference(load_tokenizer("mistral", tok_path), "matryoshka", 16, 32, text,
                    padding_side="right")
    want = ref.batch(rows, sels)
    # By text: pos index 1 -> index 0's 0.9; neg 2 ("a dog") -> 0.1; neg 4 ("a bird") -> 0.2.
    assert got["teacher_scores"].tolist() == pytest.approx([0.9, 0.1, 0.2, 0.1, 1, 1, 1, 1])
    for name, w in want.items():
        assert_same(0, name, got[name], w)
    by_index = ds.loader(mode="matryoshka", batch_size=2, group_size=4, query_max_len=16,
                         passage_max_len=32, matryoshka_scores_by_index=True)
    assert "teacher_scores" not in by_index.collate(sels)
