"""sentence-transformers training fed by its own data path vs by rankfeed, in one run.

For each trainer (cross-encoder: GroupCrossEntropyLoss over groups of G; bi-encoder:
MultipleNegativesRankingLoss over anchor, positive and G-1 negatives), the same tiny
random-weight BERT (2 layers, hidden 32) trains `--steps` steps on the bundled WordNet sample
(B=8 queries, G=4), on one core (torch.set_num_threads(1), no DataLoader workers):
- sentence-transformers: a `datasets.Dataset` of the texts (each row's positive and first G-1
  negatives), its own collator and batch sampler; the cross-encoder's loss tokenizes in forward;
- rankfeed: `rankfeed.st`'s trainer on the converted dataset (ids read from the map).
The two alternate, `--rounds` times. Printed: steps/s (median, min-max) and the ratio
rankfeed / sentence-transformers per round; time to the first step from the JSONL (text side:
read + Dataset + trainer; rankfeed: open the converted dataset + trainer; convert time printed
on its own).

Run in the sentence-transformers environment: target/venv-st/bin/python tools/st_bench.py
"""

import argparse
import gzip
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import transformers

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests", "python_st"))

import rankfeed  # noqa: E402
from rankfeed import st  # noqa: E402
from conftest import SAMPLE, hf_tokenizer, tiny_model_dir  # noqa: E402


class FirstStep(transformers.TrainerCallback):
    def __init__(self):
        self.at = None

    def on_step_end(self, args, state, control, **kw):
        if self.at is None:
            self.at = time.perf_counter()


def texts(rows, group):
    out = []
    for r in rows:
        if len(r["neg"]) < group - 1:
            continue
        out.append((r["query"], [r["pos"][0], *r["neg"][: group - 1]]))
    return out


def trainer(kind, side, model_dir, data, out, steps, batch, group, cb):
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers.cross_encoder import CrossEncoder, CrossEncoderTrainer
    from sentence_transformers.cross_encoder.training_args import CrossEncoderTrainingArguments
    from sentence_transformers.sentence_transformer import losses
    from sentence_transformers.sentence_transformer.training_args import (
        SentenceTransformerTrainingArguments)

    torch.manual_seed(0)
    common = dict(output_dir=out, max_steps=steps, report_to=[], save_strategy="no",
                  logging_strategy="no", use_cpu=True, seed=1, dataloader_num_workers=0,
                  disable_tqdm=True, per_device_train_batch_size=batch)
    if kind == "ce":
        model = CrossEncoder(model_dir, device="cpu")
        model.max_seq_length = 96
        args, loss = CrossEncoderTrainingArguments(**common), st.GroupCrossEntropyLoss(model)
        if side == "st":
            ds = Dataset.from_dict({"query": [q for q, _ in data],
                                    **{f"passage_{g}": [p[g] for _, p in data]
                                       for g in range(group)}})
            return CrossEncoderTrainer(model=model, args=args, train_dataset=ds, loss=loss,
                                       callbacks=[cb])
        return st.RankfeedCrossEncoderTrainer(model=model, args=args, train_dataset=data,
                                              group_size=group, loss=loss, callbacks=[cb])
    model = SentenceTransformer(model_dir, device="cpu")
    model.max_seq_length = 64
    args = SentenceTransformerTrainingArguments(**common)
    loss = losses.MultipleNegativesRankingLoss(model)
    if side == "st":
        names = ["positive"] + [f"negative_{g}" for g in range(1, group)]
        ds = Dataset.from_dict({"anchor": [q for q, _ in data],
                                **{n: [p[g] for _, p in data] for g, n in enumerate(names)}})
        return SentenceTransformerTrainer(model=model, args=args, train_dataset=ds, loss=loss,
                                          callbacks=[cb])
    return st.RankfeedSentenceTransformerTrainer(model=model, args=args, train_dataset=data,
                                                 group_size=group, loss=loss, callbacks=[cb])


def one(kind, side, model_dir, dataset, out, steps, batch, group):
    """(steps/s after the first step, seconds from the start to the end of the first step)."""
    cb = FirstStep()
    start = time.perf_counter()
    if side == "st":
        with gzip.open(SAMPLE, "rt", encoding="utf-8") as f:
            data = texts([json.loads(line) for line in f], group)
    else:
        data = dataset
    t = trainer(kind, side, model_dir, data, out, steps, batch, group, cb)
    t.train()
    end = time.perf_counter()
    return (steps - 1) / (end - cb.at), cb.at - start


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=4)
    a = ap.parse_args()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    tmp = tempfile.mkdtemp(prefix="st-bench-")
    model_dir = tiny_model_dir("bert", os.path.join(tmp, "bert"))
    dataset = os.path.join(tmp, "wordnet")
    t0 = time.perf_counter()
    rankfeed.convert([str(SAMPLE)], str(hf_tokenizer("bert")[1]), dataset)
    convert = time.perf_counter() - t0
    print(f"WordNet sample (2,998 rows), B={a.batch_size} G={a.group_size}, tiny BERT (2 layers, "
          f"hidden 32), one core, {a.steps} steps x {a.rounds} rounds, interleaved; rankfeed "
          f"convert once: {convert:.2f} s")
    print("| trainer | sentence-transformers steps/s | rankfeed steps/s | rankfeed / ST (min-max) "
          "| first step: ST | first step: rankfeed |")
    print("|---|---|---|---|---|---|")
    for kind, name in (("ce", "CrossEncoderTrainer"), ("bi", "SentenceTransformerTrainer")):
        res = {"st": [], "rf": []}
        for r in range(a.rounds):
            for side in ("st", "rf") if r % 2 == 0 else ("rf", "st"):
                res[side].append(one(kind, side, model_dir, dataset,
                                     os.path.join(tmp, f"out-{kind}-{side}"), a.steps,
                                     a.batch_size, a.group_size))
        ratios = [f / s for (f, _), (s, _) in zip(res["rf"], res["st"])]
        med = lambda xs: statistics.median(xs)  # noqa: E731
        print(f"| {name} | {med([x for x, _ in res['st']]):.1f} | "
              f"{med([x for x, _ in res['rf']]):.1f} | {med(ratios):.2f}x "
              f"({min(ratios):.2f}-{max(ratios):.2f}) | "
              f"{med([y for _, y in res['st']]):.2f} s | {med([y for _, y in res['rf']]):.2f} s |")


if __name__ == "__main__":
    main()
