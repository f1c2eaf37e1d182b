"""`rankfeed mine` (issue 22) against the references, on the bundled WordNet sample (BERT ids):
BM25 top-10 per query against `bm25s` (same token ids, Lucene variant, k1=1.5, b=0.75), dense
exact top-10 against a numpy brute force on random embeddings; speed against both in the same
run, interleaved; the CLI with .npy embeddings equals the Python call; a mined dataset audits
clean of false negatives."""

import json
import pathlib
import statistics
import subprocess
import time

import numpy as np
import pytest

import rankfeed
from conftest import ROOT

bm25s = pytest.importorskip("bm25s")
SAMPLE = ROOT / "data/sample/wordnet-nouns.jsonl.gz"
BERT = ROOT / "data/sample/bert/tokenizer.json"
K = 10
REPORT = ROOT / "target" / "reports" / "mine.txt"


@pytest.fixture(scope="module")
def wordnet(tmp_path_factory):
    out = tmp_path_factory.mktemp("mine") / "wordnet"
    rankfeed.convert([str(SAMPLE)], str(BERT), str(out))
    ds = rankfeed.Dataset(str(out))
    passages = [ds.passage(i).tolist() for i in range(ds.num_passages)]
    rows = [ds.group(r) for r in range(len(ds))]
    return out, ds, passages, rows


def mined_ids(out, passages):
    """Each row's negatives as passage ids of the input (the output re-interns passages)."""
    by_tokens = {tuple(p): i for i, p in enumerate(passages)}
    m = rankfeed.Dataset(str(out))
    return [[by_tokens[tuple(m.passage(int(j)).tolist())] for j in m.group(r)["neg"]]
            for r in range(len(m))]


def report(line):
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    with REPORT.open("a") as f:
        f.write(line + "\n")
    print(line)


def test_bm25_top10_agrees_with_bm25s(wordnet, tmp_path):
    out, ds, passages, rows = wordnet
    corpus = [[str(t) for t in p] for p in passages]
    queries = [[str(t) for t in g["query"].tolist()] for g in rows]
    most_pos = max(len(g["pos"]) for g in rows)

    def reference():
        r = bm25s.BM25(k1=1.5, b=0.75, method="lucene")
        r.index(corpus, show_progress=False)
        vocab = r.vocab_dict
        known = [[t for t in q if t in vocab] or [next(iter(vocab))] for q in queries]
        docs, scores = r.retrieve(known, k=K + most_pos, show_progress=False)
        return r, docs, scores

    def ours():
        return rankfeed.mine(ds, tmp_path / "bm25", sampling="top", range_min=0, range_max=K,
                             num_negatives=K, overwrite=True)

    times = {"rankfeed": [], "bm25s": []}
    for _ in range(3):  # interleaved rounds
        t = time.perf_counter(); rep = ours(); times["rankfeed"].append(time.perf_counter() - t)
        t = time.perf_counter(); ref, docs, scores = reference(); times["bm25s"].append(time.perf_counter() - t)
    got = mined_ids(tmp_path / "bm25", passages)
    same = ties = total = 0
    # rankfeed leaves out the positives of every row with the same query (WordNet has 5 such).
    by_query = {}
    for g in rows:
        by_query.setdefault(tuple(g["query"].tolist()), set()).update(g["pos"].tolist())
    for r, g in enumerate(rows):
        pos = by_query[tuple(g["query"].tolist())]
        if not any(t in ref.vocab_dict for t in queries[r]):
            want = []  # no query token occurs in any passage (bm25s was given a stand-in)
        else:
            want = [(int(d), float(s)) for d, s in zip(docs[r], scores[r])
                    if int(d) not in pos and s > 0][:K]
        score_of = dict(want)
        ref_all = None
        for i, (d, s) in enumerate(want):
            total += 1
            if i < len(got[r]) and got[r][i] == d:
                same += 1
            elif i < len(got[r]):
                # A tie: the other passage has the same reference score at this rank.
                if ref_all is None:
                    q = [t for t in queries[r] if t in ref.vocab_dict]
                    ref_all = ref.get_scores(q) if q else np.zeros(len(passages))
                if abs(ref_all[got[r][i]] - s) <= 1e-4 * max(1.0, abs(s)):
                    ties += 1
        assert len(got[r]) == len(want), (r, got[r], want)
    agree = (same + ties) / total
    ratio = [b / a for a, b in zip(times["rankfeed"], times["bm25s"])]
    report(f"BM25 top-{K} vs bm25s 0.2.14 on WordNet ({len(rows)} queries, {len(passages)} passages): "
           f"{same}/{total} ranks identical ({100 * same / total:.2f}%), {ties} more are ties "
           f"({100 * agree:.2f}% ties aside); rankfeed mine {statistics.median(times['rankfeed']):.3f} s "
           f"(index {rep['index_seconds']:.3f} s, ranking {rep['search_seconds']:.3f} s, written as a dataset) "
           f"vs bm25s index+retrieve {statistics.median(times['bm25s']):.3f} s: "
           f"{statistics.median(ratio):.1f}x ({min(ratio):.1f}-{max(ratio):.1f}), 3 interleaved rounds")
    assert agree >= 0.99


def test_dense_top10_equals_numpy_brute_force(wordnet, tmp_path, rankfeed_bin):
    out, ds, passages, rows = wordnet
    rng = np.random.default_rng(0)
    q = rng.standard_normal((len(rows), 64), dtype=np.float32)
    by_query = {}
    for g in rows:
        by_query.setdefault(tuple(g["query"].tolist()), set()).update(g["pos"].tolist())
    p = rng.standard_normal((len(passages), 64), dtype=np.float32)

    def reference():
        s = q @ p.T
        for r, g in enumerate(rows):
            s[r, sorted(by_query[tuple(g["query"].tolist())])] = -np.inf
        top = np.argpartition(-s, K, axis=1)[:, :K]
        order = np.take_along_axis(s, top, 1).argsort(axis=1)[:, ::-1]
        return np.take_along_axis(top, order, 1), s

    times = {"rankfeed": [], "numpy": []}
    for _ in range(3):
        t = time.perf_counter()
        rankfeed.mine(ds, tmp_path / "dense", query_embeddings=q, passage_embeddings=p, sampling="top",
                      range_min=0, range_max=K, num_negatives=K, overwrite=True)
        times["rankfeed"].append(time.perf_counter() - t)
        t = time.perf_counter(); want, s = reference(); times["numpy"].append(time.perf_counter() - t)
    got = np.array(mined_ids(tmp_path / "dense", passages))
    same = (got == want).mean()
    # Where the ids differ the scores tie to float32 rounding (summation order).
    diff = np.abs(np.take_along_axis(s, got, 1) - np.take_along_axis(s, want, 1))
    assert same >= 0.99 and diff.max() <= 1e-4, (same, diff.max())
    ratio = [b / a for a, b in zip(times["rankfeed"], times["numpy"])]
    report(f"dense top-{K} (dim 64, random) vs numpy q@p.T + argpartition: {100 * same:.2f}% ids identical, "
           f"max score gap {diff.max():.1e}; rankfeed {statistics.median(times['rankfeed']):.3f} s vs numpy "
           f"{statistics.median(times['numpy']):.3f} s: {statistics.median(ratio):.2f}x "
           f"({min(ratio):.2f}-{max(ratio):.2f}); rankfeed's time includes writing the dataset")
    # The CLI reads the same embeddings from .npy files and writes the same dataset.
    np.save(tmp_path / "q.npy", q)
    np.save(tmp_path / "p.npy", p)
    cli = subprocess.run([rankfeed_bin, "mine", out, "-o", tmp_path / "cli", "--query-embeddings",
                          tmp_path / "q.npy", "--passage-embeddings", tmp_path / "p.npy", "--sampling", "top",
                          "--range-min", "0", "--range-max", str(K), "--num-negatives", str(K), "--json"],
                         capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["negatives"] == got.size
    for f in ("groups.arrow", "passages.arrow"):
        assert (tmp_path / "cli" / f).read_bytes() == (tmp_path / "dense" / f).read_bytes()
    np.save(tmp_path / "bad.npy", q.astype(np.float64))
    bad = subprocess.run([rankfeed_bin, "mine", out, "-o", tmp_path / "x", "--query-embeddings",
                          tmp_path / "bad.npy", "--passage-embeddings", tmp_path / "p.npy"],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "float32" in bad.stderr, bad.stderr
    # A header spelling a key inside a value is read by its real keys (here: float64).
    raw = (tmp_path / "bad.npy").read_bytes()
    n = int.from_bytes(raw[8:10], "little")
    spoof = "{'x': \"'descr': '<f4'\", 'descr': '<f8', 'fortran_order': False, 'shape': (%d, 64), }" % len(q)
    spoof = spoof.ljust(n - 1) + "\n"
    assert len(spoof) == n
    (tmp_path / "spoof.npy").write_bytes(raw[:10] + spoof.encode() + raw[10 + n:])
    bad = subprocess.run([rankfeed_bin, "mine", out, "-o", tmp_path / "x", "--query-embeddings",
                          tmp_path / "spoof.npy", "--passage-embeddings", tmp_path / "p.npy"],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "'<f8'" in bad.stderr, bad.stderr
    # Parquet embeddings (as Spark or Polars write them): a fixed-size list of float32 for the
    # queries; the passages as doubles in shuffled part files with an `id` column. The same
    # dataset as from .npy.
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"embedding": pa.FixedSizeListArray.from_arrays(pa.array(q.ravel()), 64)}),
                   tmp_path / "q.parquet")
    order = np.random.default_rng(1).permutation(len(p))
    (tmp_path / "p-parts").mkdir()
    for k, part in enumerate(np.array_split(order, 3)):
        pq.write_table(pa.table({"id": pa.array(part, pa.int64()),
                                 "embedding": pa.array(list(p[part].astype(np.float64)),
                                                       pa.list_(pa.float64()))}),
                       tmp_path / "p-parts" / f"part-{k}.parquet")
    cli = subprocess.run([rankfeed_bin, "mine", out, "-o", tmp_path / "cli-parquet", "--query-embeddings",
                          tmp_path / "q.parquet", "--passage-embeddings", tmp_path / "p-parts",
                          "--sampling", "top", "--range-min", "0", "--range-max", str(K),
                          "--num-negatives", str(K)], capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    for f in ("groups.arrow", "passages.arrow"):
        assert (tmp_path / "cli-parquet" / f).read_bytes() == (tmp_path / "dense" / f).read_bytes()
    # Rows of another dimension, and ids given twice, are errors naming the row.
    ragged = list(q[:3]) + [q[3][:10]]
    pq.write_table(pa.table({"embedding": pa.array(ragged, pa.list_(pa.float32()))}), tmp_path / "r.parquet")
    bad = subprocess.run([rankfeed_bin, "mine", out, "-o", tmp_path / "x", "--query-embeddings",
                          tmp_path / "r.parquet", "--passage-embeddings", tmp_path / "p-parts"],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "row 3" in bad.stderr and "first row has 64" in bad.stderr, bad.stderr
    pq.write_table(pa.table({"id": [0, 0], "embedding": pa.array(list(q[:2]), pa.list_(pa.float32()))}),
                   tmp_path / "twice.parquet")
    bad = subprocess.run([rankfeed_bin, "mine", out, "-o", tmp_path / "x", "--query-embeddings",
                          tmp_path / "twice.parquet", "--passage-embeddings", tmp_path / "p-parts"],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "given twice" in bad.stderr, bad.stderr


def test_a_mined_dataset_has_no_false_negatives_and_records_how(wordnet, tmp_path):
    out, ds, _, _ = wordnet
    rep = rankfeed.mine(ds, tmp_path / "m", range_min=0, range_max=50, num_negatives=7, seed=3)
    m = rankfeed.Dataset(str(tmp_path / "m"))
    a = m.audit()
    assert a["false_negatives"]["count"] == 0 and a["rows"] == len(ds)
    assert rep["negatives"] == sum(len(m.group(r)["neg"]) for r in range(len(m)))
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["provenance"]["mined"]["options"]["num_negatives"] == 7
    with pytest.raises(ValueError, match="range_min"):
        rankfeed.mine(ds, tmp_path / "e", range_min=5, range_max=5)
    with pytest.raises(ValueError, match="unknown field"):
        rankfeed.mine(ds, tmp_path / "e", num_negative=5)
    # The input is never modified.
    assert rankfeed.Dataset(str(out)).audit()["rows"] == len(ds)


def test_any_corpus_holding_the_same_passages_mines_the_same(wordnet, tmp_path, rankfeed_bin):
    # The dataset's own passages, its `export --layout tables` passages (tokens), their text
    # tokenized at mining time, and another dataset converted from the same rows are one
    # corpus: the mined rows are byte for byte the same, and only the provenance says which.
    import gzip
    import pyarrow as pa
    import pyarrow.parquet as pq
    out, ds, passages, _ = wordnet
    opts = dict(range_min=0, range_max=40, num_negatives=5, seed=9)
    rankfeed.mine(ds, tmp_path / "own", **opts)
    rankfeed.export(out, tmp_path / "tables", layout="tables")
    rankfeed.mine(ds, tmp_path / "tokens", corpus=tmp_path / "tables" / "passages", **opts)
    # The texts in first-reference order (the conversion's passage ids).
    texts, seen = [], set()
    with gzip.open(SAMPLE, "rt") as f:
        for line in f:
            r = json.loads(line)
            for t in r["pos"] + r["neg"]:
                if t not in seen:
                    seen.add(t), texts.append(t)
    assert len(texts) == ds.num_passages
    order = np.random.default_rng(0).permutation(len(texts))  # any file order, with ids
    pq.write_table(pa.table({"id": pa.array(order, pa.int32()),
                             "text": [texts[i] for i in order]}), tmp_path / "text.parquet")
    rankfeed.mine(ds, tmp_path / "text", corpus=tmp_path / "text.parquet", tokenizer=BERT, **opts)
    rankfeed.convert([str(SAMPLE)], str(BERT), str(tmp_path / "other"))
    p = subprocess.run([rankfeed_bin, "mine", out, "-o", tmp_path / "dataset", "--corpus",
                        tmp_path / "other", "--range-min", "0", "--range-max", "40",
                        "--num-negatives", "5", "--seed", "9"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    corpora = set()
    for name in ("tokens", "text", "dataset"):
        for f in ("groups.arrow", "passages.arrow", "prompts.arrow"):
            assert (tmp_path / name / f).read_bytes() == (tmp_path / "own" / f).read_bytes(), (name, f)
        m = json.loads((tmp_path / name / "manifest.json").read_text())
        corpora.add(json.dumps(m["provenance"]["mined"]["corpus"], sort_keys=True))
    assert len(corpora) == 3
    # A text corpus needs the dataset's tokenizer; another tokenizer's ids are refused.
    with pytest.raises(ValueError, match="tokenizer"):
        rankfeed.mine(ds, tmp_path / "e1", corpus=tmp_path / "text.parquet", **opts)
    xlmr_dir = tmp_path / "x"
    from conftest import tokenizer_path
    rankfeed.convert([str(SAMPLE)], tokenizer_path("xlmr"), str(xlmr_dir))
    with pytest.raises(ValueError, match="other words"):
        rankfeed.mine(ds, tmp_path / "e2", corpus=xlmr_dir, **opts)
    # The tokenizer is for a Parquet text corpus only (one rule with the CLI's --tokenizer).
    with pytest.raises(ValueError, match="Parquet text corpus only"):
        rankfeed.mine(ds, tmp_path / "e4", corpus=tmp_path / "other", tokenizer=BERT, **opts)
    p = subprocess.run([rankfeed_bin, "mine", out, "-o", tmp_path / "e5", "--corpus", tmp_path / "other",
                        "--tokenizer", BERT], capture_output=True, text=True)
    assert p.returncode == 1 and "Parquet text corpus only" in p.stderr, p.stderr
    # Ids outside the vocabulary are refused as read, naming the file and row.
    pq.write_table(pa.table({"tokens": pa.array([[2054], [99_999, 2003]], pa.list_(pa.int32()))}),
                   tmp_path / "oov.parquet")
    with pytest.raises(ValueError, match=r"oov.parquet.*row 1.*vocabulary"):
        rankfeed.mine(ds, tmp_path / "e3", corpus=tmp_path / "oov.parquet", **opts)


def test_a_kept_index_is_built_once_and_loaded_after(wordnet, tmp_path):
    _, ds, _, _ = wordnet
    opts = dict(range_min=0, range_max=30, num_negatives=4)
    index = tmp_path / "bm25.index"
    a = rankfeed.mine(ds, tmp_path / "a", index=index, shard=(0, 2), **opts)
    b = rankfeed.mine(ds, tmp_path / "b", index=index, shard=(1, 2), **opts)
    assert (a["index_loaded"], b["index_loaded"]) == (False, True)
    rankfeed.mine(ds, tmp_path / "whole", **opts)
    rankfeed.merge([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "merged"))
    for f in ("groups.arrow", "passages.arrow", "manifest.json"):
        assert (tmp_path / "merged" / f).read_bytes() == (tmp_path / "whole" / f).read_bytes(), f
    with pytest.raises(ValueError, match="k1"):
        rankfeed.mine(ds, tmp_path / "c", index=index, k1=1.2, **opts)
    # Threads of one process building the same index at once (regression: they shared one
    # temporary file name and some failed).
    from concurrent.futures import ThreadPoolExecutor
    shared = tmp_path / "shared.index"
    with ThreadPoolExecutor(4) as pool:
        reports = list(pool.map(lambda k: rankfeed.mine(ds, tmp_path / f"t{k}", index=shared,
                                                        shard=(k, 4), **opts), range(4)))
    assert len(reports) == 4 and shared.is_file()
    with pytest.raises(ValueError, match="dense mining has no index"):
        q = np.zeros((len(ds), 4), np.float32)
        rankfeed.mine(ds, tmp_path / "d", index=index, query_embeddings=q,
                      passage_embeddings=np.zeros((ds.num_passages, 4), np.float32), **opts)
