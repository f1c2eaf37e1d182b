#!/usr/bin/env python3
"""Build FlagEmbedding-style reranker training rows from WordNet noun glosses.

Each synset becomes a query ("what is a <lemma>" and similar), its gloss the positive, and the
glosses of its co-hyponyms (synsets sharing a hypernym) the hard negatives: real text with
natural near-misses, and passages that repeat across groups (as mined negatives do).
Teacher scores are a lexical overlap (Jaccard of word sets) with the positive gloss: real
numbers computed from the text, not a neural teacher.

Source: Debian's wordnet-base (/usr/share/wordnet/data.noun), WordNet 3.0 license
(see data/sample/README.md).

    python3 tools/make_sample.py --rows 3000 --out data/sample/wordnet-nouns.jsonl.gz
"""

import argparse
import gzip
import json
import random
import re
import sys

TEMPLATES = ["what is {}", "what is a {}", "define {}", "{}", "meaning of {}", "{} definition"]
PROMPTS = [
    "Given a word A and a gloss B, decide whether B defines A with 'Yes' or 'No'.",
    "Does passage B define the term in query A? Answer 'Yes' or 'No'.",
]


def read_nouns(path):
    synsets = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("  "):
                continue  # license header
            head, _, gloss = line.partition(" | ")
            parts = head.split()
            offset, w_cnt = parts[0], int(parts[3], 16)
            words = [parts[4 + 2 * i].replace("_", " ") for i in range(w_cnt)]
            i = 4 + 2 * w_cnt
            p_cnt = int(parts[i])
            ptrs = parts[i + 1 : i + 1 + 4 * p_cnt]
            hypernyms = [ptrs[j + 1] for j in range(0, len(ptrs), 4) if ptrs[j] in ("@", "@i")]
            synsets[offset] = (words, hypernyms, gloss.strip())
    return synsets


def words_of(text):
    return set(re.findall(r"[a-z]+", text.lower()))


def jaccard(a, b):
    return len(a & b) / max(1, len(a | b))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--wordnet", default="/usr/share/wordnet/data.noun")
    ap.add_argument("--rows", type=int, default=3000, help="0 = every usable synset")
    ap.add_argument("--max-neg", type=int, default=15)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--paragraphs", action="store_true",
                    help="passages of paragraph length: a synset's gloss followed by the glosses of "
                         "its hypernym chain (up to ~120 words), as long as retrieval corpora's passages")
    ap.add_argument("--paragraph-words", type=int, default=120, help="word budget of a paragraph passage")
    ap.add_argument("--out", required=True, help=".jsonl or .jsonl.gz")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    synsets = read_nouns(a.wordnet)
    children = {}
    for off, (_, hypers, _) in synsets.items():
        for h in hypers:
            children.setdefault(h, []).append(off)
    usable = []
    for off, (words, hypers, gloss) in synsets.items():
        sibs = sorted({s for h in hypers for s in children.get(h, []) if s != off})
        if sibs:
            usable.append((off, sibs))
    rng.shuffle(usable)

    def passage(off):
        gloss = synsets[off][2]
        if not a.paragraphs:
            return gloss
        words = len(gloss.split())
        parts = [gloss]
        up = synsets[off][1]
        while up and up[0] in synsets:
            g = synsets[up[0]][2]
            if words + len(g.split()) > a.paragraph_words:
                break
            parts.append(g)
            words += len(g.split())
            up = synsets[up[0]][1]
        return ". ".join(parts)

    if a.rows:
        usable = usable[: a.rows]
    opener = gzip.open if a.out.endswith(".gz") else open
    n = 0
    with opener(a.out, "wt", encoding="utf-8") as out:
        for off, sibs in usable:
            words, _, _ = synsets[off]
            gloss = passage(off)
            negs = [passage(s) for s in rng.sample(sibs, min(len(sibs), a.max_neg))]
            negs = [g for g in negs if g != gloss]
            if not negs:
                continue
            pw = words_of(gloss)
            row = {
                "query": rng.choice(TEMPLATES).format(rng.choice(words)),
                "pos": [gloss],
                "neg": negs,
                "pos_scores": [1.0],
                "neg_scores": [round(jaccard(pw, words_of(g)), 4) for g in negs],
            }
            if n % 10 == 3:
                row["prompt"] = PROMPTS[n % 20 // 10]
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    print(f"wrote {n} rows to {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
