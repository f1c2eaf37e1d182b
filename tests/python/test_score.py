"""Teacher scores (issue 22): `rankfeed.score` with a tiny random-weight BERT cross-encoder
equals scoring every (query, passage) of every row directly with transformers (the pair
tokenized by the Hugging Face tokenizer, one at a time); each unique pair is scored once (the
saving is reported); a run killed mid-way and called again, and two ranks, give the
uninterrupted run's dataset byte for byte."""

import filecmp
import gzip
import json
import pathlib
import random
import time

import numpy as np
import pytest

import rankfeed
from conftest import ROOT

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SAMPLE = ROOT / "data/sample/wordnet-nouns.jsonl.gz"
BERT_DIR = ROOT / "data/sample/bert"
REPORT = ROOT / "target" / "reports" / "score.txt"
OPTS = dict(mode="encoder", query_max_len=64, passage_max_len=192, truncation="longest_first")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("score")
    with gzip.open(SAMPLE, "rt") as f:
        rows = [json.loads(line) for _, line in zip(range(120), f)]
    # Rows asking an earlier row's question again with some of its passages: shared pairs.
    rng = random.Random(5)
    for r in rng.sample(rows, 40):
        passages = r["pos"] + r["neg"]
        rows.append({"query": r["query"], "pos": [rng.choice(passages)],
                     "neg": rng.sample(passages, min(3, len(passages)))})
    for r in rows:
        r.pop("pos_scores", None), r.pop("neg_scores", None)
    src = tmp / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds_dir = tmp / "ds"
    rankfeed.convert([str(src)], str(BERT_DIR / "tokenizer.json"), str(ds_dir), progress=False)
    tok = transformers.AutoTokenizer.from_pretrained(str(BERT_DIR))
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, num_labels=1,
                                     max_position_embeddings=512)
    model = transformers.BertForSequenceClassification(config).eval()
    return tmp, rows, ds_dir, tok, model


def teacher(model):
    calls = []

    @torch.no_grad()
    def fn(batch):
        calls.append(len(batch["pairs"]))
        kw = {k: torch.from_numpy(batch[k]) for k in ("input_ids", "attention_mask", "token_type_ids")}
        return model(**kw).logits[:, 0]
    return fn, calls


def report(line):
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    with REPORT.open("a") as f:
        f.write(line + "\n")
    print(line)


def test_scores_equal_direct_transformers_scoring(setup):
    tmp, rows, ds_dir, tok, model = setup
    fn, calls = teacher(model)
    t = time.perf_counter()
    r = rankfeed.score(str(ds_dir), fn, str(tmp / "scored"), batch_size=16, **OPTS)
    t_rankfeed = time.perf_counter() - t
    assert r["attached"] == "attached"
    assert sum(calls) == r["unique_pairs"] < r["total_pairs"]
    scored = rankfeed.Dataset(str(tmp / "scored"))
    t = time.perf_counter()
    worst, n = 0.0, 0
    with torch.no_grad():
        for i, row in enumerate(rows):
            g = scored.group(i)
            for texts, got in ((row["pos"], g["pos_scores"]), (row["neg"], g["neg_scores"])):
                for text, s in zip(texts, got):
                    enc = tok(row["query"], text, truncation="longest_first", max_length=256,
                              return_tensors="pt")
                    want = model(**enc).logits[0, 0].item()
                    worst = max(worst, abs(want - float(s)))
                    n += 1
    t_direct = time.perf_counter() - t
    assert n == r["total_pairs"]
    assert worst < 1e-5, worst
    pad = r["padded_tokens"] / r["tokens"]
    report(f"score: {r['unique_pairs']} unique of {r['total_pairs']} pairs "
           f"({100 * (1 - r['unique_pairs'] / r['total_pairs']):.1f}% fewer model calls), "
           f"{r['batches']} length-sorted batches, padded/real tokens {pad:.3f}; "
           f"max |rankfeed - direct transformers| {worst:.1e} over {n} pairs; "
           f"rankfeed.score {t_rankfeed:.2f} s vs direct pair-by-pair {t_direct:.2f} s")
    assert pad < 1.2


def files(d):
    return sorted(p.name for p in pathlib.Path(d).iterdir())


def same_dataset(a, b):
    assert files(a) == files(b)
    for name in files(a):
        assert filecmp.cmp(pathlib.Path(a) / name, pathlib.Path(b) / name, shallow=False), name


def test_killed_and_sharded_runs_give_the_same_dataset(setup):
    tmp, _, ds_dir, _, model = setup
    fn, _ = teacher(model)
    whole = tmp / "whole"
    rankfeed.score(str(ds_dir), fn, str(whole), batch_size=8, **OPTS)

    # Killed at batch 5, then called again: resumes at batch 5.
    class Killed(Exception):
        pass

    def dying(batch, seen=[0]):
        seen[0] += 1
        if seen[0] > 5:
            raise Killed
        return fn(batch)
    resumed = tmp / "resumed"
    with pytest.raises(Killed):
        rankfeed.score(str(ds_dir), dying, str(resumed), batch_size=8, **OPTS)
    assert not resumed.exists()
    fn2, calls = teacher(model)
    r = rankfeed.score(str(ds_dir), fn2, str(resumed), batch_size=8, **OPTS)
    assert len(calls) == r["batches"] - 5 and r["attached"] == "attached"
    same_dataset(whole, resumed)

    # Two ranks sharing a work dir: the last to finish attaches.
    work, out = tmp / "work2", tmp / "sharded"
    r1 = rankfeed.score(str(ds_dir), fn, str(out), work_dir=str(work), batch_size=8,
                        rank=1, world_size=2, **OPTS)
    assert r1["attached"] == "pending" and not out.exists()
    r0 = rankfeed.score(str(ds_dir), fn, str(out), work_dir=str(work), batch_size=8,
                        rank=0, world_size=2, **OPTS)
    assert r0["attached"] == "attached"
    assert r0["rank_batches"] + r1["rank_batches"] == r0["batches"]
    same_dataset(whole, out)
    # Called again: nothing to score, the output is already there.
    again = rankfeed.score(str(ds_dir), fn, str(out), work_dir=str(work), batch_size=8,
                           rank=1, world_size=2, **OPTS)
    assert again["attached"] == "present"

    # Other settings in the same work dir are refused.
    with pytest.raises(ValueError, match="other scoring settings"):
        rankfeed.score(str(ds_dir), fn, str(out), work_dir=str(work), batch_size=4,
                       rank=0, world_size=2, **OPTS)


def test_bad_scores_are_errors(setup):
    tmp, _, ds_dir, _, _ = setup
    with pytest.raises(ValueError, match="one score per pair"):
        rankfeed.score(str(ds_dir), lambda b: np.zeros(3), str(tmp / "bad1"), batch_size=8, **OPTS)
    with pytest.raises(ValueError, match="finite"):
        rankfeed.score(str(ds_dir), lambda b: np.full(len(b["pairs"]), np.nan),
                       str(tmp / "bad2"), batch_size=8, **OPTS)
    with pytest.raises(ValueError, match="pair mode"):
        rankfeed.score(str(ds_dir), lambda b: 0, str(tmp / "bad3"), mode="embedder")
    ds = rankfeed.Dataset(str(ds_dir))
    with pytest.raises(ValueError, match="unique pairs"):
        rankfeed.attach_scores(ds, np.zeros(2, np.float32), str(tmp / "bad4"))
