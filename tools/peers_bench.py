#!/usr/bin/env python3
"""rankfeed against its peers on one machine, in one script, interleaved (issue 23).

    python3 tools/peers_bench.py [--rounds 3] [--seconds 1.0]

Reranker training batches (encoder mode, BERT, B=4 G=16 q32/p192) on the bundled WordNet
sample, the same groups for every side (rows in a shuffled order, a random positive and 15
sampled negatives, as FlagEmbedding draws them):

- FlagEmbedding's dataset + collator (`tests/python/reference.py`: its `__getitem__` tokenizes
  the texts of each group, `prepare_for_model` builds the pairs, the collator pads them);
- the expert pipeline: the texts pre-tokenized once into Arrow list columns (what
  `datasets.Dataset.map(tokenize, batched=True)` stores) and a vectorized numpy collator over
  their flat buffers (query and passage truncation, [CLS] q [SEP] p [SEP] with only_second
  truncation, padding, mask and token types, all by array operations, no Python loop per pair);
- rankfeed from Python: `Loader.collate` of the same groups, and the loader's own iterator
  (`next(loader)`, its own sampling);
- `rankfeed bench` (the Rust loop, one thread, no prefetch);
- the bound: an in-cache copy of a batch's bytes (`np.copyto` of one buffer the size of the
  three int64 arrays of an average batch).

Before timing, the expert collator's arrays are checked equal to rankfeed's `Loader.collate`
on the first `--check` of the timed batches, and again with caps small enough that the sample's
queries and passages are truncated (q6/p12: every truncation rule runs); FlagEmbedding's
(`tests/python/reference.py`, the project's port of its dataset and collator, whose parity the
test suite proves) on 5 of each. `Loader.collate` and the two sides before it collate the same
2,000 drawn batches; `next(loader)` and `rankfeed bench` draw their own groups (the same
settings). Each round runs every side once, in turn; the figures are the median round, with
the spread (min-max) of the ratios over the rounds.
"""

import argparse
import gzip
import json
import os
import pathlib
import random
import statistics
import subprocess
import sys
import tempfile
import time

os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["RAYON_NUM_THREADS"] = "1"
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "python"))
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

BIN = os.environ.get("RANKFEED_BIN", str(ROOT / "target" / "release" / "rankfeed"))
BERT = ROOT / "data/sample/bert/tokenizer.json"
SAMPLE = ROOT / "data/sample/wordnet-nouns.jsonl.gz"
B, G, QM, PM = 4, 16, 32, 192


def draw_batches(rows, n, seed=0):
    """`n` batches of B selections, drawn as FlagEmbedding draws groups."""
    rng = random.Random(seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    out, i = [], 0
    for _ in range(n):
        sels = []
        for _ in range(B):
            row = order[i % len(order)]
            i += 1
            r = rows[row]
            k, m = G - 1, len(r["neg"])
            negs = rng.sample(range(m), k) if m >= k else rng.sample(list(range(m)) * -(-k // m), k)
            sels.append({"row": row, "pos": rng.randrange(len(r["pos"])), "neg": negs})
        out.append(sels)
    return out


class Expert:
    """Pre-tokenized Arrow columns and a vectorized numpy collator (BERT pair template)."""

    def __init__(self, rows, tokenizer_path, qm=QM, pm=PM):
        from tokenizers import Tokenizer

        self.qm, self.pm = qm, pm

        tok = Tokenizer.from_file(str(tokenizer_path))
        tok.no_truncation()
        tok.no_padding()
        t0 = time.perf_counter()

        def ids(texts):
            return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]

        q = ids([r["query"] for r in rows])
        pos = ids([p for r in rows for p in r["pos"]])
        neg = ids([p for r in rows for p in r["neg"]])
        nested = lambda flat, key: pa.ListArray.from_arrays(  # noqa: E731
            np.cumsum([0] + [len(r[key]) for r in rows]).astype(np.int32),
            pa.array(flat, type=pa.list_(pa.int32())))
        self.table = pa.table({"query_ids": pa.array(q, type=pa.list_(pa.int32())),
                               "pos_ids": nested(pos, "pos"), "neg_ids": nested(neg, "neg")})
        self.pretokenize_s = time.perf_counter() - t0
        self.cls, self.sep, self.pad = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]"), 0
        # The flat buffers of the columns, as numpy views (what an expert reads instead of
        # `dataset[i]`, which builds Python lists).
        qc = self.table.column("query_ids").combine_chunks()
        self.q_off, self.q_val = qc.offsets.to_numpy(), qc.values.to_numpy()
        for side in ("pos", "neg"):
            c = self.table.column(f"{side}_ids").combine_chunks()
            inner = c.values
            setattr(self, f"{side}_row", c.offsets.to_numpy())
            setattr(self, f"{side}_off", inner.offsets.to_numpy())
            setattr(self, f"{side}_val", inner.values.to_numpy())

    def collate(self, sels):
        rows = np.fromiter((s["row"] for s in sels), np.int64, len(sels))
        posk = np.fromiter((s["pos"] for s in sels), np.int64, len(sels))
        negk = np.array([s["neg"] for s in sels], dtype=np.int64)
        # Passage lists (flat index into the passage offsets), G a group, positive first.
        pos_i = self.pos_row[rows] + posk
        neg_i = self.neg_row[rows][:, None] + negk
        p_start = np.concatenate([self.pos_off[pos_i][:, None], self.neg_off[neg_i]], axis=1).ravel()
        p_len = np.concatenate([(self.pos_off[pos_i + 1] - self.pos_off[pos_i])[:, None],
                                self.neg_off[neg_i + 1] - self.neg_off[neg_i]], axis=1).ravel()
        q_start = np.repeat(self.q_off[rows], G)
        q_len = np.repeat(self.q_off[rows + 1] - self.q_off[rows], G)
        # FlagEmbedding: query to qm + pm // 4, passage to pm + qm // 2, then the pair to qm + pm
        # cutting the passage only (only_second).
        qm, pm = self.qm, self.pm
        q_len = np.minimum(q_len, qm + pm // 4)
        p_len = np.minimum(np.minimum(p_len, pm + qm // 2), np.maximum(qm + pm - 3 - q_len, 0))
        total = 3 + q_len + p_len
        n, width = len(total), int(total.max())
        ids = np.zeros((n, width), np.int64)
        ids[:, 0] = self.cls
        r = np.arange(n)
        ids[r, q_len + 1] = self.sep
        ids[r, total - 1] = self.sep
        for start, length, at, values in ((q_start, q_len, 1, self.q_val),
                                          (p_start, p_len, q_len + 2, None)):
            cnt = int(length.sum())
            row = np.repeat(r, length)
            within = np.arange(cnt) - np.repeat(np.cumsum(length) - length, length)
            col = within + (np.repeat(at, length) if isinstance(at, np.ndarray) else at)
            src = np.repeat(start, length) + within
            if values is None:  # passages: positives' and negatives' buffers
                is_pos = np.repeat(r % G == 0, length)
                ids[row, col] = np.where(is_pos, self.pos_val[np.where(is_pos, src, 0)],
                                         self.neg_val[np.where(is_pos, 0, src)])
            else:
                ids[row, col] = values[src]
        cols = np.arange(width)
        mask = (cols[None, :] < total[:, None]).astype(np.int64)
        types = ((cols[None, :] >= (q_len + 2)[:, None]) & (mask == 1)).astype(np.int64)
        return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def rate(fn, batches, seconds):
    """Batches per second of `fn(sels)` cycling over `batches` for `seconds`."""
    n, t0 = 0, time.perf_counter()
    while True:
        fn(batches[n % len(batches)])
        n += 1
        if n % 16 == 0 and time.perf_counter() - t0 >= seconds:
            return n / (time.perf_counter() - t0)


def loop_rate(loader, seconds):
    n, t0 = 0, time.perf_counter()
    while True:
        try:
            next(loader)
        except StopIteration:
            loader.set_epoch(loader.epoch + 1)
        n += 1
        if n % 64 == 0 and time.perf_counter() - t0 >= seconds:
            return n / (time.perf_counter() - t0)


def cli_rate(ds, batches):
    out = subprocess.run([BIN, "bench", str(ds), "--mode", "encoder", "--batch-size", str(B),
                          "--group-size", str(G), "--query-max-len", str(QM), "--passage-max-len",
                          str(PM), "--batches", str(batches), "--prefetch-threads", "0", "--json"],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)["batches_per_second"]


def copy_rate(nbytes, seconds):
    src = np.ones(nbytes, np.uint8)
    dst = np.empty_like(src)
    n, t0 = 0, time.perf_counter()
    while True:
        np.copyto(dst, src)
        n += 1
        if n % 256 == 0 and time.perf_counter() - t0 >= seconds:
            return n / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--check", type=int, default=200, help="batches checked equal to rankfeed's")
    a = ap.parse_args()
    if a.check < 1:
        ap.error("--check must be at least 1: the comparison is of the same output")
    import rankfeed
    from reference import Reference, load_tokenizer

    with gzip.open(SAMPLE, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    work = pathlib.Path(tempfile.mkdtemp(prefix="rankfeed-peers-"))
    ds_dir = work / "ds"
    subprocess.run([BIN, "convert", str(SAMPLE), "--tokenizer", str(BERT), "-o", str(ds_dir)],
                   check=True, capture_output=True)
    ds = rankfeed.Dataset(str(ds_dir))
    settings = dict(mode="encoder", batch_size=B, group_size=G, query_max_len=QM, passage_max_len=PM,
                    prefetch_threads=0)
    loader = ds.loader(**settings)
    collate_loader = ds.loader(**settings)
    ref = Reference(load_tokenizer("bert", BERT), "encoder", QM, PM, {}, padding_side="right")
    expert = Expert(rows, BERT)
    batches = draw_batches(rows, 2000)
    keys = ("input_ids", "attention_mask", "token_type_ids")
    # The same output: the expert collator equals rankfeed on the groups it is timed on, and
    # the reference on a few (its parity is the test suite's); then again with small caps, so
    # that truncation runs (the sample's texts fit the timed caps).
    for qm, pm in ((QM, PM), (6, 12)):
        theirs = expert if (qm, pm) == (QM, PM) else Expert(rows, BERT, qm, pm)
        ours_loader = ds.loader(**{**settings, "query_max_len": qm, "passage_max_len": pm})
        reference = Reference(load_tokenizer("bert", BERT), "encoder", qm, pm, {}, padding_side="right")
        truncated = 0
        for k, sels in enumerate(batches[: a.check]):
            ours = ours_loader.collate(sels)
            got = theirs.collate(sels)
            for key in keys:
                if not np.array_equal(ours[key], got[key]):
                    raise SystemExit(f"expert collator differs from rankfeed on batch {k} ({key}, q{qm}/p{pm})")
            # A pair at the pair cap had its passage cut (only_second).
            truncated += int((ours["attention_mask"].sum(axis=1) == qm + pm).any())
            if k < 5:
                r = reference.batch(rows, sels)
                for key in keys:
                    if not np.array_equal(ours[key], r[key]):
                        raise SystemExit(f"reference differs from rankfeed on batch {k} ({key}, q{qm}/p{pm})")
        if (qm, pm) != (QM, PM) and truncated == 0:
            raise SystemExit("the small caps truncated nothing: the truncation check checked nothing")
    nbytes = int(np.mean([sum(v.nbytes for k, v in collate_loader.collate(s).items() if k in keys)
                          for s in batches[:200]]))
    sides = {
        "FlagEmbedding dataset+collator": lambda: rate(lambda s: ref.batch(rows, s), batches, a.seconds),
        "expert Arrow+numpy collator": lambda: rate(expert.collate, batches, a.seconds),
        "rankfeed Loader.collate (Python)": lambda: rate(collate_loader.collate, batches, a.seconds),
        "rankfeed next(loader) (Python)": lambda: loop_rate(loader, a.seconds),
        "rankfeed bench (Rust)": lambda: cli_rate(ds_dir, 100_000),
        "in-cache copy of the batch bytes": lambda: copy_rate(nbytes, a.seconds),
    }
    runs = {name: [] for name in sides}
    for r in range(a.rounds):
        for name, run in sides.items():
            runs[name].append(run())
        print(f"round {r + 1}: " + ", ".join(f"{n.split(' ')[0]} {v[-1]:,.0f}" for n, v in runs.items()),
              flush=True)
    print(f"peers, encoder B={B} G={G} q{QM}/p{PM}, BERT, {len(rows):,} WordNet rows, {a.rounds} rounds "
          f"interleaved, one thread each; batch {nbytes:,} bytes; the expert's pre-tokenization "
          f"{expert.pretokenize_s:.2f} s once; the expert's arrays equal rankfeed's on {a.check} batches, "
          f"and on {a.check} truncated at q6/p12")
    base = runs["rankfeed bench (Rust)"]
    for name, v in runs.items():
        line = f"  {name:<34} {statistics.median(v):>12,.0f} batches/s"
        if name != "rankfeed bench (Rust)":
            ratios = [b / x for b, x in zip(base, v)]
            line += (f"   rankfeed bench is {statistics.median(ratios):,.2f}x "
                     f"(spread {min(ratios):,.2f}-{max(ratios):,.2f})")
        print(line)
    py = [x / y for x, y in zip(runs["rankfeed next(loader) (Python)"], base)]
    print(f"  the Python loop runs at {statistics.median(py):.2f}x the Rust bench "
          f"(spread {min(py):.2f}-{max(py):.2f}); rankfeed bench at "
          f"{statistics.median([b / c for b, c in zip(base, runs['in-cache copy of the batch bytes'])]):.0%} "
          f"of the in-cache copy bound")


if __name__ == "__main__":
    main()
