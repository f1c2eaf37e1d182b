"""Sharded conversion as Spark tasks: each task converts one contiguous block of the input
files into its own shard (tokenizing in parallel across the cluster), then the driver merges
the shards in order into one dataset, without tokenizing again.

    from pyspark.sql import SparkSession
    from rankfeed.spark import convert_sharded

    spark = SparkSession.builder.getOrCreate()
    convert_sharded(spark, ["s3://corpus/train/"], "/models/bge/tokenizer.json",
                    "s3://datasets/train-rf", num_shards=64, query_instruction="...")

Inputs and output are local paths or URLs (s3://...). With URLs, each task downloads the
input objects its byte range touches into its executor's scratch space (the rankfeed cache,
`cache_dir` or $RANKFEED_CACHE), converts its shard and uploads it under `out + ".shards"`; the driver merges the shards from
there (reading them through its cache) and uploads the result, manifest last; the shards are
then removed unless keep_shards. Executors need `pip install rankfeed` and the AWS
environment (AWS_ENDPOINT_URL, keys or a role), e.g. through `spark.executorEnv.*`. With local
paths, every path must be visible to every executor (a shared file system); relative paths are
resolved against the driver's working directory. Shards are equal byte ranges of the inputs
(line-aligned JSON lines, Parquet row groups), so one large file spreads over all tasks;
compressed files are converted whole by one task. The merged dataset is the single
conversion's, byte for byte. pyspark is imported only by the caller.
"""

import os
import shutil

from . import convert, is_url, merge, remove_url


def _convert_one(args):
    k, n, inputs, tokenizer, shard_dir, cache_dir, kwargs = args
    out = f"{shard_dir}/shard-{k:05d}"
    convert(inputs, tokenizer, out, shard=(k, n), progress=False, overwrite=True, cache_dir=cache_dir,
            **kwargs)
    return out


def _absolute(p):
    p = str(p)
    return p if is_url(p) else os.path.abspath(p)


def convert_sharded(spark, inputs, tokenizer, out, *, num_shards, keep_shards=False, overwrite=False,
                    cache_dir=None, **convert_kwargs):
    """Convert `inputs` in `num_shards` Spark tasks, then merge into `out`; returns the merge
    summary (counts)."""
    # Executors do not share the driver's working directory: ship absolute paths.
    inputs = [_absolute(i) for i in ([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)]
    tokenizer, out = os.path.abspath(tokenizer), _absolute(out).rstrip("/")
    shard_dir = out + ".shards"
    tasks = [(k, num_shards, inputs, tokenizer, shard_dir, cache_dir, convert_kwargs) for k in range(num_shards)]
    shards = spark.sparkContext.parallelize(tasks, num_shards).map(_convert_one).collect()
    summary = merge(sorted(shards), out, overwrite=overwrite, cache_dir=cache_dir)
    if not keep_shards:
        if is_url(shard_dir):
            remove_url(shard_dir)
        else:
            shutil.rmtree(shard_dir, ignore_errors=True)
    return summary
