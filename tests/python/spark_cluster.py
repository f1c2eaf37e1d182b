"""A Spark *standalone* cluster on 127.0.0.1 from the pip `pyspark` distribution: a master and
N workers, each its own JVM (and its own Python workers), started and stopped by the caller."""

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request

import pyspark

from s3support import free_port, wait_port

SPARK_HOME = os.path.dirname(pyspark.__file__)


class SparkCluster:
    def __init__(self, workdir, workers=2, cores=1, memory="1g", env=None):
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.port, self.ui = free_port(), free_port()
        self.master_url = f"spark://127.0.0.1:{self.port}"
        self.env = {**os.environ, "SPARK_HOME": SPARK_HOME, "PYSPARK_PYTHON": sys.executable,
                    "SPARK_LOCAL_IP": "127.0.0.1", "SPARK_LOCAL_DIRS": os.path.join(workdir, "local"),
                    **(env or {})}
        self.procs = []
        self.logs = []
        self._start("master", "org.apache.spark.deploy.master.Master",
                    "--host", "127.0.0.1", "--port", str(self.port), "--webui-port", str(self.ui))
        wait_port(self.port, 90)
        for i in range(workers):
            wdir = os.path.join(workdir, f"worker{i}")
            os.makedirs(wdir, exist_ok=True)
            self._start(f"worker{i}", "org.apache.spark.deploy.worker.Worker", self.master_url,
                        "--host", "127.0.0.1", "--cores", str(cores), "--memory", memory,
                        "--webui-port", str(free_port()), "--work-dir", wdir)
        end = time.monotonic() + 120
        while self.alive_workers() < workers:
            if time.monotonic() > end:
                self.stop()
                raise RuntimeError(f"{workers} Spark workers did not register in 120 s; logs in {workdir}")
            time.sleep(0.5)

    def _start(self, name, cls, *args):
        log = open(os.path.join(self.workdir, f"{name}.log"), "wb")
        self.logs.append(log)
        self.procs.append(subprocess.Popen(
            [os.path.join(SPARK_HOME, "bin", "spark-class"), cls, *args],
            stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.workdir))

    def alive_workers(self):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ui}/json/", timeout=5) as r:
                return int(json.load(r).get("aliveworkers", 0))
        except OSError:
            return 0

    def stop(self):
        for p in reversed(self.procs):
            p.terminate()
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
        for log in self.logs:
            log.close()
        shutil.rmtree(os.path.join(self.workdir, "local"), ignore_errors=True)


DRIVER = r"""
import json, os, sys, time
from pyspark.sql import SparkSession
from rankfeed.spark import convert_sharded
master, inputs, tokenizer, out, shards, cores, cache, extra = sys.argv[1:9]
env = {k: v for k, v in os.environ.items() if k.startswith("AWS_") or k.startswith("RANKFEED_")}
b = (SparkSession.builder.master(master).appName("rankfeed-convert")
     .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
     .config("spark.executor.cores", "1").config("spark.cores.max", cores)
     .config("spark.executor.memory", "1g").config("spark.ui.enabled", "false")
     .config("spark.task.maxFailures", "1"))
for k, v in env.items():
    b = b.config(f"spark.executorEnv.{k}", v)
spark = b.getOrCreate()
sc = spark.sparkContext
# Wait for the executors (one per worker core) before timing.
end = time.time() + 120
while sc._jsc.sc().getExecutorMemoryStatus().size() - 1 < int(cores) and time.time() < end:
    time.sleep(0.2)
where = sorted(set(sc.parallelize(range(8), 8).map(lambda _: os.getcwd().split(os.sep)[-3]).collect()))
t = time.time()
summary = convert_sharded(spark, json.loads(inputs), tokenizer, out, num_shards=int(shards),
                          cache_dir=cache or None, overwrite=True, **json.loads(extra))
print(json.dumps({"seconds": time.time() - t, "workers": where, "counts": summary}))
spark.stop()
"""


def run_driver(cluster, inputs, tokenizer, out, *, shards, cores, env, cache_dir="", **convert_kwargs):
    """Run convert_sharded in a separate driver process on `cluster`; returns its summary
    (seconds, the worker directories tasks ran in, the merge counts)."""
    proc = subprocess.run([sys.executable, "-c", DRIVER, cluster.master_url, json.dumps(inputs),
                           str(tokenizer), out, str(shards), str(cores), str(cache_dir),
                           json.dumps(convert_kwargs)],
                          capture_output=True, text=True, env={**os.environ, **env, "SPARK_LOCAL_IP": "127.0.0.1",
                                                               "PYSPARK_PYTHON": sys.executable},
                          timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"Spark driver failed:\n{proc.stderr[-5000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
