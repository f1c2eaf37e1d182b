#!/usr/bin/env python3
"""CPU training-step time of a tiny BERT cross-encoder on padded, length-grouped and packed batches.

The bundled WordNet sample (data/sample/wordnet-nouns.jsonl.gz, built by tools/make_sample.py) is
converted with the bundled BERT tokenizer; a random-weight BertForSequenceClassification (4
layers, hidden 256) takes forward + group loss + backward + AdamW step on each batch. The three
loaders run in the same process, interleaved (a round of each per repetition, in rotating order),
so drift in the machine hits all three alike. Packed batches go through rankfeed.packing
(block-diagonal [1, T, T] mask, the way eager/SDPA can take them on CPU).

    python3 tools/packed_step_bench.py [--reps 5 --steps 8 --batch-size 4 --group-size 8]

Prints a markdown table: median step time (median over repetitions of each repetition's median),
its spread (min-max of the repetition medians), tokens per batch and the ratio to padded.
"""

import argparse
import importlib.util
import pathlib
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_packing():
    try:
        from rankfeed import packing
    except ImportError:  # an installed wheel older than packing.py
        spec = importlib.util.spec_from_file_location(
            "rankfeed.packing", ROOT / "python" / "rankfeed" / "packing.py")
        packing = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(packing)
    return packing


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per loader and repetition")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--query-max-len", type=int, default=32)
    ap.add_argument("--passage-max-len", type=int, default=128)
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: least disturbed by other load; 0: torch's default)")
    ap.add_argument("--dataset", help="an already converted dataset (default: convert the sample)")
    args = ap.parse_args()

    import torch
    import transformers

    import rankfeed

    packing = load_packing()
    if args.threads:
        torch.set_num_threads(args.threads)
    ds = args.dataset
    if ds is None:
        ds = pathlib.Path(tempfile.mkdtemp(prefix="packed_bench_")) / "wordnet-bert"
        rankfeed.convert(ROOT / "data/sample/wordnet-nouns.jsonl.gz",
                         ROOT / "data/sample/bert/tokenizer.json", ds, progress=False)
    data = rankfeed.Dataset(ds)
    B, G = args.batch_size, args.group_size
    kw = dict(batch_size=B, group_size=G, query_max_len=args.query_max_len,
              passage_max_len=args.passage_max_len, mode="encoder")
    variants = {
        "padded": dict(),
        "length_grouped=50": dict(length_grouped=50),
        "packed": dict(packed=True),
    }

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=1024, max_position_embeddings=512, num_labels=1,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation=args.attn)
    model = transformers.BertForSequenceClassification(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    target = torch.zeros(B, dtype=torch.long)

    def step(batch, packed):
        if packed:
            scores = packing.packed_scores(model, batch)
        else:
            scores = packing.padded_scores(model, batch)
        loss = torch.nn.functional.cross_entropy(scores.view(-1, G), target[: scores.numel() // G])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t = time.perf_counter()
        opt.step()
        return t

    def tokens(batch, packed):
        if packed:
            return int(batch["cu_seqlens"][-1]), int(batch["cu_seqlens"][-1])
        return int(batch["input_ids"].size), int(batch["attention_mask"].sum())

    iters = {name: iter(data.loader(**kw, **opt_)) for name, opt_ in variants.items()}

    def take(name):
        try:
            return next(iters[name])
        except StopIteration:  # next epoch
            iters[name] = iter(data.loader(**kw, **variants[name], epoch=1))
            return next(iters[name])

    for name in variants:  # warm up every path (allocator, kernels)
        for _ in range(args.warmup):
            step(take(name), name == "packed")

    rep_medians = {name: [] for name in variants}
    fb_medians = {name: [] for name in variants}
    cpu_medians = {name: [] for name in variants}
    shapes = {name: [] for name in variants}
    names = list(variants)
    for rep in range(args.reps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            times, fb, cpu = [], [], []
            for _ in range(args.steps):
                batch = take(name)
                shapes[name].append(tokens(batch, name == "packed"))
                c0, t0 = time.process_time(), time.perf_counter()
                t_opt = step(batch, name == "packed")
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
                fb.append(t_opt - t0)
            rep_medians[name].append(statistics.median(times))
            fb_medians[name].append(statistics.median(fb))
            cpu_medians[name].append(statistics.median(cpu))
        print(f"rep {rep + 1}/{args.reps}: " + ", ".join(
            f"{n} {rep_medians[n][-1] * 1e3:.1f} ms" for n in names), file=sys.stderr)

    base = rep_medians["padded"]
    print(f"\nCPU step (forward + loss + backward + AdamW) of BertForSequenceClassification "
          f"(4 layers, hidden 256, {args.attn}), B={B}, G={G}, query/passage max len "
          f"{args.query_max_len}/{args.passage_max_len}, WordNet sample; {args.reps} reps x "
          f"{args.steps} steps, interleaved; torch {torch.__version__} ({torch.get_num_threads()} "
          f"threads), transformers {transformers.__version__}, {platform.processor() or platform.machine()}\n")
    print("| batches | median step (ms) | spread of rep medians (ms) | tokens/batch fed (real) "
          "| vs padded (median, min-max of per-rep ratios) | forward+backward only (ms) | fwd+bwd vs padded "
          "| process CPU time per step (ms) | CPU time vs padded |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in names:
        med = statistics.median(rep_medians[name])
        lo, hi = min(rep_medians[name]), max(rep_medians[name])
        fed = np.mean([s[0] for s in shapes[name]])
        real = np.mean([s[1] for s in shapes[name]])
        ratios = [a / b for a, b in zip(rep_medians[name], base)]
        cpu_ratios = [a / b for a, b in zip(cpu_medians[name], cpu_medians["padded"])]
        fb_ratios = [a / b for a, b in zip(fb_medians[name], fb_medians["padded"])]
        print(f"| {name} | {med * 1e3:.1f} | {lo * 1e3:.1f}-{hi * 1e3:.1f} | {fed:.0f} ({real:.0f}) "
              f"| {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) "
              f"| {statistics.median(fb_medians[name]) * 1e3:.1f} "
              f"| {statistics.median(fb_ratios):.2f}x ({min(fb_ratios):.2f}-{max(fb_ratios):.2f}) "
              f"| {statistics.median(cpu_medians[name]) * 1e3:.1f} | {statistics.median(cpu_ratios):.2f}x "
              f"({min(cpu_ratios):.2f}-{max(cpu_ratios):.2f}) |")


if __name__ == "__main__":
    main()
