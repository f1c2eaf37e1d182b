"""rankfeed.spark.convert_sharded on a real Spark standalone cluster (a master and two workers,
each its own JVM, on 127.0.0.1), reading its inputs from and writing its shards and the merged
dataset to a real S3 API server: byte-identical to one local conversion (issue 21)."""

import gzip
import os

import pytest

import rankfeed
from conftest import ROOT
from s3support import BUCKET, MotoServer

SAMPLE = ROOT / "data" / "sample" / "wordnet-nouns.jsonl.gz"
BERT = ROOT / "data" / "sample" / "bert" / "tokenizer.json"


def test_cluster_conversion_from_and_to_s3_is_the_single_conversion(tmp_path, monkeypatch):
    from spark_cluster import SparkCluster, run_driver
    s3 = MotoServer(str(tmp_path))
    try:
        for k, v in s3.env().items():
            monkeypatch.setenv(k, v)
        # Two plain JSONL inputs under one prefix (plain text shards by byte ranges).
        lines = gzip.open(SAMPLE, "rt").read().splitlines(keepends=True)
        client = s3.client()
        for i, part in enumerate((lines[: len(lines) // 3], lines[len(lines) // 3:])):
            client.put_object(Bucket=BUCKET, Key=f"spark/in/part-{i}.jsonl", Body="".join(part).encode())
        inputs = [f"s3://{BUCKET}/spark/in/"]
        out = f"s3://{BUCKET}/spark/out/ds"
        cluster = SparkCluster(str(tmp_path / "spark"), workers=2, env=s3.env())
        try:
            r = run_driver(cluster, inputs, BERT, out, shards=5, cores=2, env=s3.env(),
                           cache_dir=str(tmp_path / "executor-cache"))
        finally:
            cluster.stop()
        print(f"\nSpark standalone (2 workers): {r['seconds']:.1f} s, tasks ran in {r['workers']}")
        assert r["workers"] == ["worker0", "worker1"]
        single = tmp_path / "single"
        rankfeed.convert(inputs, BERT, single, progress=False, cache_dir=tmp_path / "c")
        got = rankfeed.Dataset(out, cache_dir=tmp_path / "c")
        names = sorted(os.listdir(single))
        assert names == sorted(os.listdir(got.path))
        for f in names:
            assert (single / f).read_bytes() == open(os.path.join(got.path, f), "rb").read(), f
        assert [s["path"] for s in got.manifest["sources"]] == [
            f"s3://{BUCKET}/spark/in/part-0.jsonl", f"s3://{BUCKET}/spark/in/part-1.jsonl"]
        # The shards were removed from the store after the merge.
        listed = client.list_objects_v2(Bucket=BUCKET, Prefix="spark/out/ds.shards/")
        assert listed.get("KeyCount", 0) == 0
    finally:
        s3.stop()
