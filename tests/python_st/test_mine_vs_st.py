"""Dense mining (issue 22) against sentence-transformers' `mine_hard_negatives` on the very same
embeddings: ST takes no precomputed embeddings, but it reads them back from its
`cache_folder` (files named by a hash of the model name, prompts and texts), so the test writes
rankfeed's embeddings there and ST ranks them without encoding anything. Same WordNet queries,
the same corpus (every passage, in rankfeed's passage id order), dot-product similarity, the
same window and top sampling: the negatives agree, and both run in this process, interleaved,
for the speed ratio (ST's exact torch path, `use_faiss=False`; faiss is not installed here)."""

import gzip
import hashlib
import json
import os
import statistics
import time

import numpy as np
import pytest

import rankfeed
from conftest import ROOT, SAMPLE, tiny_model_dir

st = pytest.importorskip("sentence_transformers")
datasets = pytest.importorskip("datasets")
from sentence_transformers.util import mine_hard_negatives  # noqa: E402

BERT = ROOT / "data/sample/bert/tokenizer.json"
REPORT = ROOT / "target" / "reports" / "mine_st.txt"
DIM, RANGE_MAX, K, ROUNDS = 64, 30, 5, 3


def test_dense_mining_equals_sentence_transformers(tmp_path):
    with gzip.open(SAMPLE, "rt") as f:
        rows = [json.loads(line) for line in f]
    out = tmp_path / "ds"
    rankfeed.convert([str(SAMPLE)], str(BERT), str(out), progress=False)
    ds = rankfeed.Dataset(str(out))
    assert len(ds) == len(rows)
    # The passages' texts in id order (first reference: row by row, positives then negatives).
    texts = list(dict.fromkeys(t for r in rows for t in r["pos"] + r["neg"]))
    assert len(texts) == ds.num_passages
    # ST embeds each distinct query once (first appearance order) and pools the positives of
    # its rows, as rankfeed shares them across rows with the same query: rows asking the same
    # question get the same embedding.
    queries = list(dict.fromkeys(r["query"] for r in rows))
    at = {t: i for i, t in enumerate(queries)}
    rng = np.random.default_rng(7)
    unit = lambda a: (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)
    q_unique = unit(rng.standard_normal((len(queries), DIM)))
    q = np.ascontiguousarray(q_unique[[at[r["query"]] for r in rows]])
    p = unit(rng.standard_normal((len(texts), DIM)))

    model = st.SentenceTransformer(tiny_model_dir("bert", tmp_path / "model"), device="cpu")
    model.similarity_fn_name = "dot"
    cache = tmp_path / "st-cache"
    cache.mkdir()
    name = model.model_card_data.base_model or ""
    digest = lambda texts: hashlib.sha256(repr((name, None, None, texts)).encode()).hexdigest()
    np.save(cache / f"query_embeddings_{digest(queries)}.npy", q_unique)
    np.save(cache / f"corpus_embeddings_{digest(texts)}.npy", p)
    pairs = datasets.Dataset.from_dict({
        "anchor": [r["query"] for r in rows for _ in r["pos"]],
        "positive": [t for r in rows for t in r["pos"]],
    })

    def run_st():
        return mine_hard_negatives(pairs, model, corpus=texts, range_min=0, range_max=RANGE_MAX,
                                   num_negatives=K, sampling_strategy="top",
                                   output_format="n-tuple", use_faiss=False, verbose=False,
                                   cache_folder=str(cache))

    def run_rankfeed(k):
        return rankfeed.mine(ds, tmp_path / f"mined-{k}", query_embeddings=q, passage_embeddings=p,
                             sampling="top", range_min=0, range_max=RANGE_MAX, num_negatives=K,
                             overwrite=True)

    times = {"rankfeed": [], "st": []}
    for k in range(ROUNDS):
        t = time.perf_counter(); mined_st = run_st(); times["st"].append(time.perf_counter() - t)
        t = time.perf_counter(); run_rankfeed(k); times["rankfeed"].append(time.perf_counter() - t)
    # ST's negatives per query, as passage ids.
    by_text = {t: i for i, t in enumerate(texts)}
    st_negs = {}
    for r in mined_st:
        st_negs[r["anchor"]] = [by_text[r[f"negative_{j + 1}"]] for j in range(K)]
    mined = rankfeed.Dataset(str(tmp_path / "mined-0"))
    by_tokens = {tuple(ds.passage(i).tolist()): i for i in range(ds.num_passages)}
    same = total = rows_same = 0
    for i, r in enumerate(rows):
        ours = [by_tokens[tuple(mined.passage(int(j)).tolist())] for j in mined.group(i)["neg"]]
        theirs = st_negs[r["query"]]
        same += sum(a == b for a, b in zip(ours, theirs))
        total += K
        rows_same += ours == theirs
    agreement = same / total
    ratio = [s / r for s, r in zip(times["st"], times["rankfeed"])]
    line = (f"dense mining vs sentence-transformers {st.__version__} mine_hard_negatives (same "
            f"{DIM}-d embeddings via its cache, {len(rows)} queries over {len(texts)} passages, "
            f"top {K} of ranks 0..{RANGE_MAX}, {ROUNDS} interleaved rounds): "
            f"{100 * agreement:.2f}% of negatives identical ({rows_same}/{len(rows)} rows "
            f"exactly); rankfeed.mine {statistics.median(times['rankfeed']):.3f} s (writing the "
            f"dataset included) vs mine_hard_negatives {statistics.median(times['st']):.3f} s: "
            f"{statistics.median(ratio):.1f}x (spread {min(ratio):.1f}-{max(ratio):.1f}x)")
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(line + "\n")
    print(line)
    assert agreement >= 0.999, line
