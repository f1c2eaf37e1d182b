#!/usr/bin/env python3
"""Stretch the bundled WordNet sample to a long-tail passage length distribution.

Real reranker corpora have long-tail passages: MS MARCO's run to a median of about 60 tokens
and a 99th percentile of about 250, where WordNet glosses are short and narrow (median ~15).
This keeps the sample's queries, groups and hard negatives, and extends each distinct passage
with further glosses (real text) until it reaches a length drawn from a log-normal with that
median and 99th percentile (in words; BERT makes ~1.3 tokens of a word). The length is a
function of the passage text, so a passage repeated across groups stays one passage.

    python3 tools/make_longtail.py data/sample/wordnet-nouns.jsonl.gz target/longtail.jsonl
"""

import gzip
import hashlib
import json
import math
import random
import sys

MEDIAN_TOKENS, P99_TOKENS, TOKENS_PER_WORD = 60, 250, 1.3


def main(src, dst):
    with gzip.open(src, "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    glosses = sorted({p for r in rows for p in r["pos"] + r["neg"]})
    mu = math.log(MEDIAN_TOKENS / TOKENS_PER_WORD)
    sigma = math.log(P99_TOKENS / MEDIAN_TOKENS) / 2.326
    cache = {}

    def stretch(text):
        if text not in cache:
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
            rng = random.Random(seed)
            target = max(3, round(rng.lognormvariate(mu, sigma)))
            words = text.split()
            while len(words) < target:
                words += rng.choice(glosses).split()
            cache[text] = " ".join(words[:target])
        return cache[text]

    with open(dst, "w") as out:
        for r in rows:
            r = dict(r, pos=[stretch(p) for p in r["pos"]], neg=[stretch(p) for p in r["neg"]])
            out.write(json.dumps(r) + "\n")
    words = sorted(len(t.split()) for t in cache.values())
    print(f"{len(rows)} rows, {len(words)} passages: median {words[len(words) // 2]} words, "
          f"p99 {words[int(len(words) * 0.99)]} words -> {dst}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
