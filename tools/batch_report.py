#!/usr/bin/env python3
"""What is in a batch, for each batching strategy: the figures of the README's "Batches that
waste no GPU" table, from `rankfeed bench` on the real release binary.

Data: the bundled WordNet sample (short glosses) and the same groups stretched to MS MARCO-like
passage lengths (tools/make_longtail.py), converted with BERT (encoder mode) and Mistral (llm
mode, when the fetched assets hold its tokenizer). B=4 G=16 q32/p192, one core; speeds are the best of 3 runs.

    python3 tools/batch_report.py [--batches N] [--quick]
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "rankfeed")
OUT = os.path.join(ROOT, "target", "batch-report")
ASSETS = os.environ.get("RANKFEED_ASSETS", os.path.expanduser("~/.cache/rankfeed/assets"))
COMMON = ["--batch-size", "4", "--group-size", "16", "--query-max-len", "32",
          "--passage-max-len", "192", "--prefetch-threads", "0"]
STRATEGIES = [
    ("random order", []),
    ("length-grouped (M=50)", ["--length-grouped", "50"]),
    ("token budget 32k, grouped", ["--max-tokens", "32768", "--length-grouped", "50",
                                   "--batch-size", "256"]),
    ("packed", ["--packed"]),
    ("packed, budget 16k", ["--packed", "--max-tokens", "16384", "--length-grouped", "50",
                            "--batch-size", "256"]),
]


def run(args):
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def dataset(name, source, tokenizer):
    out = os.path.join(OUT, name)
    if not os.path.exists(os.path.join(out, "manifest.json")):
        run([BIN, "convert", source, "--tokenizer", tokenizer, "-o", out, "--overwrite"])
    return out


def bench(ds, mode, extra, batches, repeat=3):
    """`rankfeed bench` of one strategy, best speed of `repeat` runs (the other figures are
    the same in every run): one slow run is the machine's, not the strategy's."""
    args = [BIN, "bench", ds, "--mode", mode, "--json", "--batches", str(batches)] + COMMON + extra
    # A later --batch-size overrides the common one: drop the common one then.
    if extra.count("--batch-size"):
        i = args.index("--batch-size")
        del args[i:i + 2]
    runs = [json.loads(run(args)) for _ in range(repeat)]
    return max(runs, key=lambda r: r["batches_per_second"])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batches", type=int, default=20000)
    p.add_argument("--quick", action="store_true", help="5000 batches, for the test suite")
    a = p.parse_args()
    batches = 5000 if a.quick else a.batches
    os.makedirs(OUT, exist_ok=True)
    longtail = os.path.join(OUT, "longtail.jsonl")
    wordnet = os.path.join(ROOT, "data", "sample", "wordnet-nouns.jsonl.gz")
    if not os.path.exists(longtail):
        run([sys.executable, os.path.join(ROOT, "tools", "make_longtail.py"), wordnet, longtail])
    bert = os.path.join(ROOT, "data", "sample", "bert", "tokenizer.json")
    mistral = os.path.join(ASSETS, "mistral", "tokenizer.json")
    setups = [("WordNet", "encoder", dataset("wordnet-bert", wordnet, bert)),
              ("long-tail", "encoder", dataset("longtail-bert", longtail, bert))]
    if os.path.exists(mistral):
        setups += [("WordNet", "llm", dataset("wordnet-mistral", wordnet, mistral)),
                   ("long-tail", "llm", dataset("longtail-mistral", longtail, mistral))]
    else:
        print(f"(no {mistral}: llm rows skipped; tools/fetch_assets.sh fetches it)")
    print("| data | mode | strategy | real tokens | padded bound | groups/batch | budget fill "
          "| batches/s | groups/s vs random |")
    print("|---|---|---|---|---|---|---|---|---|")
    failures = []
    for data, mode, ds in setups:
        base = None
        for name, extra in STRATEGIES:
            r = bench(ds, mode, extra, batches)
            speed = r["batches_per_second"]
            groups = speed * r["groups_per_batch"]
            base = base or groups
            fill = r["budget_fill"]
            print(f"| {data} | {mode} | {name} | {100 * r['padding_efficiency']:.1f}% "
                  f"| {100 * r['padded_bound']:.1f}% | {r['groups_per_batch']:.1f} "
                  f"| {'' if fill is None else f'{100 * fill:.1f}%'} | {speed:,.0f} "
                  f"| {groups / base:.2f}x |")
            if name.startswith("length-grouped") and r["padding_efficiency"] < 0.95 * r["padded_bound"]:
                failures.append(f"{data} {mode}: length-grouped below 95% of the bound")
            if fill is not None and fill < 0.95:
                failures.append(f"{data} {mode} {name}: budget fill {fill:.3f} below 95%")
            if name == "packed" and r["padding_efficiency"] < 0.99:
                failures.append(f"{data} {mode}: packed below 99% real tokens")
    if failures:
        sys.exit("targets missed: " + "; ".join(failures))


if __name__ == "__main__":
    main()
