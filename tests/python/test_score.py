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


def test_cli_pairs_scored_elsewhere_attach_to_the_same_dataset(setup, rankfeed_bin):
    # The CLI path (pairs out, scores by another tool, attach-scores) gives rankfeed.score's
    # dataset byte for byte: the pairs file holds the sequences and batches rankfeed.score
    # feeds the model, and the same model on them returns the same scores.
    import subprocess
    import polars as pl
    tmp, _, ds_dir, tok, model = setup
    fn, _ = teacher(model)
    via_python = tmp / "via-python"
    rankfeed.score(str(ds_dir), fn, str(via_python), batch_size=16, **OPTS)

    def cli(*args):
        p = subprocess.run([rankfeed_bin, *map(str, args)], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        return p.stdout

    flags = ["--batch-size", 16, "--mode", "encoder", "--query-max-len", 64,
             "--passage-max-len", 192, "--truncation", "longest_first"]
    pairs_dir = tmp / "pairs"
    print(cli("pairs", ds_dir, "-o", pairs_dir, "--tokenizer", BERT_DIR / "tokenizer.json", *flags))
    pairs = pl.read_parquet(pairs_dir / "*.parquet")
    assert pairs["pair"].n_unique() == pairs.height
    # The texts re-encode to the very ids (this tokenizer round-trips the WordNet text).
    row = pairs.row(0, named=True)
    enc = tok(row["query_text"], row["passage_text"], truncation="longest_first", max_length=256)
    assert enc["input_ids"] == row["input_ids"]
    out = []
    with torch.no_grad():
        for (_,), b in pairs.group_by("batch", maintain_order=True):
            ids = b["input_ids"].to_list()
            types = b["token_type_ids"].to_list()
            n = max(map(len, ids))
            pad = lambda rows: torch.tensor([r + [0] * (n - len(r)) for r in rows])
            mask = torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in ids])
            logits = model(input_ids=pad(ids), attention_mask=mask, token_type_ids=pad(types)).logits
            out.append(pl.DataFrame({"pair": b["pair"], "score": logits[:, 0].numpy()}))
    scores = pl.concat(out).sample(fraction=1.0, shuffle=True, seed=3)  # any order
    (tmp / "scores").mkdir()
    half = scores.height // 2
    scores[:half].write_parquet(tmp / "scores" / "a.parquet")
    scores[half:].write_parquet(tmp / "scores" / "b.parquet")
    via_cli = tmp / "via-cli"
    cli("attach-scores", ds_dir, "--scores", tmp / "scores", "-o", via_cli)
    same_dataset(via_python, via_cli)
    # rankfeed.score's logs attach the same way.
    via_logs = tmp / "via-logs"
    cli("attach-scores", ds_dir, "--logs", str(via_python) + ".scoring", "-o", via_logs)
    same_dataset(via_python, via_logs)
    # Python reads the same files.
    via_py_files = tmp / "via-py-files"
    rankfeed.attach_scores(str(ds_dir), tmp / "scores", str(via_py_files))
    same_dataset(via_python, via_py_files)
    # Scores carrying `key`, attached to another dataset whose pair ids line up (one passage
    # text differs), are refused; without `key` nothing could tell.
    _, rows, _, _, _ = setup
    other_rows = [dict(r) for r in rows]
    other_rows[0] = dict(rows[0], pos=[rows[0]["pos"][0] + " (revised)"] + rows[0]["pos"][1:])
    other_src = tmp / "other.jsonl"
    other_src.write_text("".join(json.dumps(r) + "\n" for r in other_rows))
    other = tmp / "other-ds"
    rankfeed.convert([str(other_src)], str(BERT_DIR / "tokenizer.json"), str(other), progress=False)
    keyed = pairs.select("pair", "key").join(scores, on="pair")
    keyed.write_parquet(tmp / "keyed.parquet")
    rankfeed.attach_scores(str(ds_dir), tmp / "keyed.parquet", str(tmp / "keyed-ok"))
    with pytest.raises(ValueError, match="does not belong"):
        rankfeed.attach_scores(str(other), tmp / "keyed.parquet", str(tmp / "keyed-bad"))
    # A file missing a pair, or of another dataset's pairs, is refused.
    scores[1:].write_parquet(tmp / "short.parquet")
    p = subprocess.run([rankfeed_bin, "attach-scores", ds_dir, "--scores", tmp / "short.parquet",
                        "-o", tmp / "bad"], capture_output=True, text=True)
    assert p.returncode == 1 and "have no score" in p.stderr, p.stderr
    assert not (tmp / "bad").exists()


def test_the_readme_pairs_lines_run(tmp_path, rankfeed_bin):
    import re
    import shutil
    import subprocess
    text = (ROOT / "README.md").read_text()
    lines = [l for b in re.findall(r"```bash\n(.*?)```", text, re.S) for l in b.splitlines()
             if l.startswith(("rankfeed pairs", "rankfeed attach-scores"))]
    blocks = re.findall(r"```python scores\n(.*?)```", text, re.S)
    assert len(lines) == 2 and len(blocks) == 1, (lines, blocks)
    shutil.copy(BERT_DIR / "tokenizer.json", tmp_path / "tokenizer.json")
    rankfeed.convert([str(ROOT / "tests/fixtures/roundtrip.jsonl")], str(BERT_DIR / "tokenizer.json"),
                     str(tmp_path / "data/train"), progress=False)

    def run(line):
        cmd = line.replace("rankfeed ", f"{rankfeed_bin} ", 1)
        p = subprocess.run(cmd, shell=True, cwd=tmp_path, capture_output=True, text=True)
        assert p.returncode == 0, (line, p.stderr)

    run(lines[0])
    import os
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(blocks[0], "README.md python scores block", "exec"), {})
    finally:
        os.chdir(cwd)
    run(lines[1])
    # The same scores through rankfeed.score: the same dataset.
    rankfeed.score(str(tmp_path / "data/train"), lambda b: b["attention_mask"].sum(axis=1) / 100.0, str(tmp_path / "py"),
                   query_max_len=32, passage_max_len=128)
    same_dataset(tmp_path / "py", tmp_path / "data/train-scored-cli")
