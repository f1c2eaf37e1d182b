#!/usr/bin/env python3
"""Object storage and Spark standalone figures for the README (issue 21), against a real S3 API
server (moto's) on 127.0.0.1 that this script starts and stops:

- cold open (download + verify into an empty cache) in MB/s vs boto3's `download_file` of the
  same files, interleaved rounds in one run, the ratio with its spread;
- warm open (cache hit: the manifest fetched and compared, the copy opened) vs a local open;
- the first batch of 8 processes opening at once, cold and warm;
- `rankfeed.spark.convert_sharded` on a Spark standalone cluster with 1 and 2 workers (inputs
  from and output to the server) vs one local `convert` of the same inputs, and the merge.

The corpus is the WordNet sample replicated with perturbed text (`--copies`, default 40:
about 120k rows, 121 MB of JSON lines; every copy's texts differ, so the dedup ratio stays
the sample's), written as 16 part files as Spark writes them.

    python3 tools/remote_bench.py [--copies 40] [--rounds 3] [--no-spark]
"""

import argparse
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "python"))

import rankfeed  # noqa: E402
from s3support import BUCKET, MotoServer  # noqa: E402

SAMPLE = os.path.join(ROOT, "data", "sample", "wordnet-nouns.jsonl.gz")
BERT = os.path.join(ROOT, "data", "sample", "bert", "tokenizer.json")

OPENER = textwrap.dedent("""
    import json, sys, time
    import rankfeed
    url, cache, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
    while time.time() < start:
        time.sleep(0.001)
    t = time.time()
    ds = rankfeed.Dataset(url, cache_dir=cache)
    b = next(iter(ds.loader(batch_size=4, group_size=16, mode="encoder", seed=3)))
    print(json.dumps({"first_batch": time.time() - t, "downloaded": ds.fetch_report["downloaded"]}))
""")


def corpus(path, copies, parts=16):
    rows = [json.loads(x) for x in gzip.open(SAMPLE, "rt")]
    os.makedirs(path)
    files = [open(os.path.join(path, f"part-{i:05d}.jsonl"), "w") for i in range(parts)]
    n = 0
    for c in range(copies):
        for r in rows:
            r2 = dict(r, query=f"{r['query']} #{c}", pos=[f"{p} #{c}" for p in r["pos"]],
                      neg=[f"{x} #{c}" for x in r["neg"]])
            files[n * parts // (len(rows) * copies)].write(json.dumps(r2) + "\n")
            n += 1
    for f in files:
        f.close()
    return n


def spread(xs):
    return f"{statistics.median(xs):.2f}x ({min(xs):.2f}-{max(xs):.2f})"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--copies", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-spark", action="store_true")
    a = p.parse_args()
    work = tempfile.mkdtemp(prefix="rankfeed-remote-bench-")
    s3 = MotoServer(work)
    os.environ.update(s3.env())
    try:
        src = os.path.join(work, "corpus")
        rows = corpus(src, a.copies)
        src_bytes = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src))
        local = os.path.join(work, "local")
        t = time.perf_counter()
        rankfeed.convert([src], BERT, local, progress=False)
        convert_s = time.perf_counter() - t
        files = sorted(os.listdir(local))
        size = sum(os.path.getsize(os.path.join(local, f)) for f in files)
        url = f"s3://{BUCKET}/bench/ds"
        rankfeed.upload(local, url)
        print(f"corpus: {rows} rows, {src_bytes / 1e6:.0f} MB of JSON lines in 16 files; dataset "
              f"{size / 1e6:.1f} MB in {len(files)} files; local convert {convert_s:.1f} s")

        # Cold open vs boto3, interleaved.
        import boto3
        from boto3.s3.transfer import TransferConfig
        client = boto3.client("s3", endpoint_url=s3.endpoint, region_name="us-east-1")
        cfg = TransferConfig()
        ours, theirs, ratios = [], [], []
        for r in range(a.rounds):
            cache = os.path.join(work, f"cold{r}")
            t = time.perf_counter()
            rep = rankfeed.fetch(url, cache_dir=cache)
            ds = rankfeed.Dataset(rep["path"])
            t_ours = time.perf_counter() - t
            del ds
            shutil.rmtree(cache)
            dest = os.path.join(work, f"boto{r}")
            os.makedirs(dest)
            t = time.perf_counter()
            for f in files:
                client.download_file(BUCKET, f"bench/ds/{f}", os.path.join(dest, f), Config=cfg)
            t_boto = time.perf_counter() - t
            shutil.rmtree(dest)
            ours.append(size / 1e6 / t_ours)
            theirs.append(size / 1e6 / t_boto)
            ratios.append(t_boto / t_ours)
        print(f"cold open (download + verify + open): rankfeed {statistics.median(ours):.0f} MB/s, "
              f"boto3 download_file {statistics.median(theirs):.0f} MB/s: {spread(ratios)} "
              f"(median of {a.rounds} interleaved rounds, min-max)")

        # Warm open vs local open.
        cache = os.path.join(work, "warm")
        rankfeed.fetch(url, cache_dir=cache)
        warm, loc = [], []
        for _ in range(30):
            t = time.perf_counter()
            rankfeed.Dataset(url, cache_dir=cache)
            warm.append(time.perf_counter() - t)
            t = time.perf_counter()
            rankfeed.Dataset(local)
            loc.append(time.perf_counter() - t)
        w, lo = statistics.median(warm) * 1e3, statistics.median(loc) * 1e3
        print(f"warm open (cache hit, manifest fetched and compared): {w:.2f} ms vs local open {lo:.2f} ms "
              f"({w / lo:.1f}x; median of 30, interleaved)")

        # 8 processes at once, cold then warm.
        cache = os.path.join(work, "eight")
        for label in ("cold", "warm"):
            start = time.time() + 2.0
            procs = [subprocess.Popen([sys.executable, "-c", OPENER, url, cache, str(start)],
                                      stdout=subprocess.PIPE, text=True) for _ in range(8)]
            res = [json.loads(pr.communicate()[0]) for pr in procs]
            fb = sorted(r["first_batch"] for r in res)
            print(f"8 processes opening at once, {label}: first batch median {statistics.median(fb):.3f} s, "
                  f"max {fb[-1]:.3f} s; downloads {sum(r['downloaded'] for r in res)}")

        if not a.no_spark:
            from spark_cluster import SparkCluster, run_driver
            for f in sorted(os.listdir(src)):
                client.upload_file(os.path.join(src, f), BUCKET, f"bench/in/{f}")
            inputs = [f"s3://{BUCKET}/bench/in/"]
            t = time.perf_counter()
            rankfeed.convert(inputs, BERT, os.path.join(work, "single"), progress=False,
                             cache_dir=os.path.join(work, "c"))
            single = time.perf_counter() - t
            # One thread, as one Spark task with 1 core has (a separate process: the thread
            # count is fixed once per process).
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", "import sys, rankfeed; rankfeed.convert([sys.argv[1]], "
                            "sys.argv[2], sys.argv[3], progress=False, threads=1, cache_dir=sys.argv[4])",
                            inputs[0], BERT, os.path.join(work, "single1"), os.path.join(work, "c1")], check=True)
            single1 = time.perf_counter() - t
            shards = [f"s3://{BUCKET}/bench/shards/s{k}" for k in range(8)]
            for k, s in enumerate(shards):
                rankfeed.convert(inputs, BERT, s, shard=(k, 8), progress=False, cache_dir=os.path.join(work, "c"))
            t = time.perf_counter()
            rankfeed.merge(shards, f"s3://{BUCKET}/bench/merged", cache_dir=os.path.join(work, "m"))
            merge_s = time.perf_counter() - t
            print(f"one local convert of the S3 inputs (download + convert, to a local directory): {single:.1f} s "
                  f"with 2 threads, {single1:.1f} s with 1; "
                  f"merge of 8 shards from S3 to S3 (download, verify, merge, upload): {merge_s:.1f} s")
            for workers in (1, 2):
                cluster = SparkCluster(os.path.join(work, f"spark{workers}"), workers=workers, env=s3.env())
                try:
                    r = run_driver(cluster, inputs, BERT, f"s3://{BUCKET}/bench/spark{workers}", shards=8,
                                   cores=workers, env=s3.env(), cache_dir=os.path.join(work, f"sc{workers}"),
                                   threads=1)
                finally:
                    cluster.stop()
                print(f"Spark standalone, {workers} worker(s) x 1 core (1 tokenizer thread a task), 8 shards, S3 to S3: "
                      f"{r['seconds']:.1f} s ({single1 / r['seconds']:.2f}x one local 1-thread convert, "
                      f"{single / r['seconds']:.2f}x the 2-thread one)")
    finally:
        s3.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
