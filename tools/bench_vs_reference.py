#!/usr/bin/env python3
"""rankfeed's loader against the Python reference loop, same rows, same settings, one run.

    python3 tools/bench_vs_reference.py [--seconds S] [--only reranker|embedder]

Embedder training (`--only embedder`): FlagEmbedding's `AbsEmbedderTrainDataset` +
`AbsEmbedderCollator` algorithm (tests/python/reference.py's EmbedderReference: format, sample,
tokenize queries and passages with special tokens and truncation, pad each) against
`rankfeed bench --mode embedder`, B=8 G=8 q32/p128, on the WordNet glosses, with BERT (bge-style
encoder) and Mistral (decoder embedder: eos appended, left padding).

Data: WordNet noun groups (tools/make_sample.py; all 76k when Debian's wordnet-base is
installed, else the bundled 3k sample), three times: passages that are single glosses (~15
tokens), short paragraphs (a gloss and its hypernyms' glosses up to 45 words, ~50 tokens, like
MS MARCO passages) and paragraphs (up to 120 words, ~130 tokens, like Wikipedia chunks). Settings: B=4, G=16, query_max_len 32,
passage_max_len 192. Encoder mode with the BERT tokenizer, llm mode with the Mistral tokenizer
(tools/fetch_assets.sh). Both sides run on one core: the reference in this process
(tokenize, prepare_for_model, pad, exactly as tests/python/reference.py), rankfeed through
`rankfeed bench --prefetch-threads 0` (sampling + collation on the calling thread).
"""

import argparse
import json
import os
import pathlib
import random
import subprocess
import sys
import time

# One core for the reference too: the tokenizers library would encode a batch on all cores.
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["RAYON_NUM_THREADS"] = "1"
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "python"))
from reference import EmbedderReference, Reference, load_tokenizer  # noqa: E402

ASSETS = pathlib.Path(os.environ.get("RANKFEED_ASSETS", pathlib.Path.home() / ".cache/rankfeed/assets"))
BIN = ROOT / "target" / "release" / "rankfeed"
B, G, QM, PM = 4, 16, 32, 192


def data_file(work, words):
    """words: None for single glosses, else the word budget of paragraph passages."""
    wordnet = pathlib.Path("/usr/share/wordnet/data.noun")
    if not wordnet.exists():
        return None if words else ROOT / "data/sample/wordnet-nouns.jsonl.gz"
    name = f"wordnet-paragraphs-{words}.jsonl" if words else "wordnet-all.jsonl"
    out = work / name
    if not out.exists():
        extra = ["--paragraphs", "--paragraph-words", str(words)] if words else []
        subprocess.run([sys.executable, ROOT / "tools/make_sample.py", "--rows", "0", *extra, "--out", out],
                       check=True)
    return out


def read_rows(path):
    import gzip
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def rate(ref, rows, seconds, b, g):
    """Batches per second of `ref.batch` on groups drawn as FlagEmbedding draws them (rows in a
    shuffled order, a positive, g-1 negatives)."""
    rng = random.Random(0)
    order = list(range(len(rows)))
    rng.shuffle(order)
    n, i, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        sels = []
        for _ in range(b):
            row = order[i % len(order)]
            i += 1
            r = rows[row]
            sels.append({"row": row, "pos": rng.randrange(len(r["pos"])), "neg": draw(rng, r, g - 1)})
        ref.batch(rows, sels)
        n += 1
    return n / (time.perf_counter() - t0)


def reference_rate(tok_kind, tok_path, mode, rows, seconds):
    ref = Reference(load_tokenizer(tok_kind, tok_path), mode, QM, PM, {},
                    padding_side="right" if mode == "encoder" else "left")
    return rate(ref, rows, seconds, B, G)


def tokenizer_for(kind):
    """The fetched tokenizer.json of `kind` (BERT falls back to the bundled one), or None."""
    path = ASSETS / kind / "tokenizer.json"
    if kind == "bert" and not path.exists():
        path = ROOT / "data/sample/bert/tokenizer.json"
    if not path.exists():
        print(f"  {kind}: {path} missing (run tools/fetch_assets.sh); skipped")
        return None
    return path


def draw(rng, r, k):
    n = len(r["neg"])
    return rng.sample(range(n), k) if n >= k else rng.sample(list(range(n)) * -(-k // n), k)


def embedder_reference_rate(tok_kind, tok_path, rows, seconds, b, g, qm, pm):
    decoder = tok_kind == "mistral"
    tok = load_tokenizer(tok_kind, tok_path, add_eos_token=decoder)
    ref = EmbedderReference(tok, qm, pm, {}, padding_side="left" if decoder else tok.padding_side)
    return rate(ref, rows, seconds, b, g)


def embedder(a, work):
    b, g, qm, pm = 8, 8, 32, 128
    data = ROOT / "data/sample/wordnet-nouns.jsonl.gz"
    rows = read_rows(data)
    print(f"embedder: {data} ({len(rows)} groups, real glosses); B={b} G={g} q{qm}/p{pm}; one core each side")
    for tok_kind in ("bert", "mistral"):
        tok_path = tokenizer_for(tok_kind)
        if tok_path is None:
            continue
        ds = work / f"vs-ref-embedder-{tok_kind}"
        subprocess.run([BIN, "convert", data, "--tokenizer", tok_path, "-o", ds, "--overwrite"],
                       check=True, stdout=subprocess.DEVNULL)
        ref = embedder_reference_rate(tok_kind, tok_path, rows, a.seconds, b, g, qm, pm)
        out = subprocess.run([BIN, "bench", ds, "--mode", "embedder", "--batch-size", str(b),
                              "--group-size", str(g), "--query-max-len", str(qm),
                              "--passage-max-len", str(pm), "--prefetch-threads", "0",
                              "--batches", str(a.batches), "--json"],
                             check=True, capture_output=True, text=True)
        r = json.loads(out.stdout)
        print(f"  embedder ({tok_kind}): reference {ref:7.1f} batches/s | rankfeed "
              f"{r['batches_per_second']:7.0f} batches/s | ratio "
              f"{r['batches_per_second'] / ref:5.0f}x (target >= 300x)", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10.0, help="time for each reference run")
    ap.add_argument("--batches", type=int, default=100000, help="batches for each rankfeed run")
    ap.add_argument("--only", choices=("reranker", "embedder"))
    a = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "rankfeed-cli"], cwd=ROOT, check=True)
    work = ROOT / "target" / "bench-data"
    work.mkdir(parents=True, exist_ok=True)
    if a.only != "reranker":
        embedder(a, work)
    if a.only == "embedder":
        return
    for name, words in (("glosses", None), ("short-paragraphs", 45), ("paragraphs", 120)):
        data = data_file(work, words)
        if data is None:
            print(f"{name}: needs Debian's wordnet-base; skipped")
            continue
        rows = read_rows(data)
        print(f"data: {name}, {data} ({len(rows)} groups); B={B} G={G} q{QM}/p{PM}; one core each side")
        for tok_kind, mode in (("bert", "encoder"), ("mistral", "llm")):
            tok_path = tokenizer_for(tok_kind)
            if tok_path is None:
                continue
            ds = work / f"vs-ref-{name}-{tok_kind}"
            subprocess.run([BIN, "convert", data, "--tokenizer", tok_path, "-o", ds, "--overwrite"],
                           check=True, stdout=subprocess.DEVNULL)
            ref = reference_rate(tok_kind, tok_path, mode, rows, a.seconds)
            out = subprocess.run([BIN, "bench", ds, "--mode", mode, "--batch-size", str(B), "--group-size", str(G),
                                  "--query-max-len", str(QM), "--passage-max-len", str(PM), "--prefetch-threads", "0",
                                  "--batches", str(a.batches), "--json"], check=True, capture_output=True, text=True)
            r = json.loads(out.stdout)
            print(f"  {mode:8s} ({tok_kind}): reference {ref:7.1f} batches/s | rankfeed {r['batches_per_second']:7.0f} "
                  f"batches/s, {r['output_gb_per_second']:.2f} GB/s out, {r['bytes_per_batch'] / 1e3:.0f} KB/batch, "
                  f"padding efficiency {100 * r['padding_efficiency']:.0f}% | ratio "
                  f"{r['batches_per_second'] / ref:5.0f}x (target >= 1000x)", flush=True)


if __name__ == "__main__":
    main()
