"""Sharded conversion as Spark tasks: each task converts one contiguous block of the input
files into its own shard directory (tokenizing in parallel across the cluster), then the
driver merges the shards in order into one dataset, without tokenizing again.

    from pyspark.sql import SparkSession
    from rankfeed.spark import convert_sharded

    spark = SparkSession.builder.getOrCreate()
    convert_sharded(spark, ["/data/train/"], "/models/bge/tokenizer.json", "/data/train-rf",
                    num_shards=64, query_instruction="...")

The shard directories go to `out + ".shards"` (removed after the merge unless keep_shards).
Relative paths are resolved against the driver's working directory. Every path must be
visible to every executor (a shared file system), and each executor needs `pip install
rankfeed`. Shards are equal byte ranges of the inputs (line-aligned JSON lines, Parquet row
groups), so one large file spreads over all tasks; compressed files are converted whole by one
task. The merged dataset is the single conversion's, byte for byte. pyspark is imported only
by the caller.
"""

import os
import shutil

from . import convert, merge


def _convert_one(args):
    k, n, inputs, tokenizer, shard_dir, kwargs = args
    out = os.path.join(shard_dir, f"shard-{k:05d}")
    convert(inputs, tokenizer, out, shard=(k, n), progress=False, overwrite=True, **kwargs)
    return out


def convert_sharded(spark, inputs, tokenizer, out, *, num_shards, keep_shards=False, overwrite=False,
                    **convert_kwargs):
    """Convert `inputs` in `num_shards` Spark tasks, then merge into `out`; returns the merge
    summary (counts)."""
    # Executors do not share the driver's working directory: ship absolute paths.
    inputs = [os.path.abspath(i) for i in ([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)]
    tokenizer, out = os.path.abspath(tokenizer), os.path.abspath(out)
    shard_dir = out + ".shards"
    tasks = [(k, num_shards, inputs, tokenizer, shard_dir, convert_kwargs) for k in range(num_shards)]
    shards = spark.sparkContext.parallelize(tasks, num_shards).map(_convert_one).collect()
    summary = merge(sorted(shards), out, overwrite=overwrite)
    if not keep_shards:
        shutil.rmtree(shard_dir, ignore_errors=True)
    return summary
