"""Datasets in object storage, against a real S3 API server (moto's) on 127.0.0.1 that these
tests start and stop: open through the verified cache, write with the manifest last, many
processes and one download, faults and kill -9 (issue 21)."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import rankfeed
from conftest import ROOT, run_rankfeed
from s3support import BUCKET, FAULTS, FaultProxy, MotoServer

SAMPLE = ROOT / "data" / "sample" / "wordnet-nouns.jsonl.gz"
BERT = ROOT / "data" / "sample" / "bert" / "tokenizer.json"
LONG = int(os.environ.get("RANKFEED_LONG", "1"))
DATA_FILES = ("groups.arrow", "passages.arrow", "prompts.arrow")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = MotoServer(str(tmp_path_factory.mktemp("moto")))
    yield server
    server.stop()


@pytest.fixture
def env(s3, monkeypatch):
    """Point rankfeed (in this process and in children) at the server."""
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    return s3.env()


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "ds"
    rankfeed.convert([SAMPLE], BERT, out, progress=False)
    return out


_n = [0]


def url(name):
    _n[0] += 1
    return f"s3://{BUCKET}/t{os.getpid()}-{_n[0]}/{name}"


def batches(ds, n=6, **kw):
    opts = dict(batch_size=4, group_size=8, mode="encoder", seed=3, query_max_len=32, passage_max_len=64)
    opts.update(kw)
    out = []
    for i, b in enumerate(ds.loader(**opts)):
        if i == n:
            break
        out.append({k: np.array(v) for k, v in b.items()})
    return out


def same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def data_gets(s3, prefix):
    """GET requests the server answered with data, per file under `prefix` (key path)."""
    counts = {}
    for method, path, status in s3.requests():
        if method == "GET" and status in (200, 206) and path.startswith(f"/{BUCKET}/{prefix}/"):
            name = path.rsplit("/", 1)[1]
            counts[name] = counts.get(name, 0) + 1
    return counts


def report(line):
    """Print `line` and keep it in target/reports/remote.txt, which tools/test prints after
    the suite (pytest hides a passing test's output)."""
    print("\n" + line)
    path = ROOT / "target" / "reports" / "remote.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(line + "\n")


def entries(cache):
    return sorted(p for p in os.listdir(cache) if len(p) == 16 and os.path.isdir(os.path.join(cache, p)))


def test_open_from_s3_gives_the_local_batches_and_a_second_open_hits_the_cache(env, s3, local, tmp_path):
    u = url("ds")
    r = rankfeed.upload(local, u)
    assert r["files"] == 4
    cache = tmp_path / "cache"
    ds = rankfeed.Dataset(u, cache_dir=cache)
    rep = ds.fetch_report
    assert rep["downloaded"] and rep["files"] == 3 and rep["retries"] == 0
    assert ds.url == u and ds.manifest == rankfeed.Dataset(local).manifest
    same_batches(batches(ds), batches(rankfeed.Dataset(local)))
    again = rankfeed.Dataset(u, cache_dir=cache)
    assert not again.fetch_report["downloaded"]
    assert again.path == ds.path
    # One GET per data file (parts of 8 MiB: the sample's files are one part each).
    prefix = u.split(f"{BUCKET}/", 1)[1]
    assert data_gets(s3, prefix) == {"manifest.json": 2, **{f: 1 for f in DATA_FILES}}
    # The copy is exactly the uploaded bytes.
    for f in DATA_FILES + ("manifest.json",):
        assert (local / f).read_bytes() == open(os.path.join(ds.path, f), "rb").read()
    # A dataset opened from a URL pickles as its URL.
    import pickle
    back = pickle.loads(pickle.dumps(ds))
    assert back.url == u and back.path == ds.path


def test_many_small_parts_stream_in_order(env, local, tmp_path, monkeypatch):
    # 64 KiB parts: dozens of ranged GETs per file, 8 in flight, hashed and written in order.
    monkeypatch.setenv("RANKFEED_REMOTE_PART_BYTES", str(64 << 10))
    u = url("ds")
    rankfeed.upload(local, u)
    ds = rankfeed.Dataset(u, cache_dir=tmp_path / "c")
    size = sum((local / f).stat().st_size for f in DATA_FILES)
    assert ds.fetch_report["requests"] >= size // (64 << 10)
    ds.validate()
    same_batches(batches(ds), batches(rankfeed.Dataset(local)))


def test_a_replaced_dataset_is_fetched_again_and_the_old_copy_never_used(env, local, tmp_path):
    u = url("ds")
    rankfeed.upload(local, u)
    cache = tmp_path / "cache"
    first = rankfeed.Dataset(u, cache_dir=cache)
    other = tmp_path / "other"
    rankfeed.convert([SAMPLE], BERT, other, progress=False, rows_per_batch=1024)
    with pytest.raises(FileExistsError):
        rankfeed.upload(other, u)
    rankfeed.upload(other, u, overwrite=True)
    second = rankfeed.Dataset(u, cache_dir=cache)
    assert second.fetch_report["downloaded"]
    assert second.fetch_report["seal"] != first.fetch_report["seal"]
    assert second.manifest == rankfeed.Dataset(other).manifest
    assert len(entries(cache)) == 2
    import pickle
    with pytest.raises(rankfeed.CorruptDatasetError, match="replaced meanwhile"):
        pickle.loads(pickle.dumps(first))  # pinned to its seal, not to the URL
    assert pickle.loads(pickle.dumps(second)).path == second.path


def test_a_changed_cache_copy_is_downloaded_again(env, local, tmp_path):
    u = url("ds")
    rankfeed.upload(local, u)
    cache = tmp_path / "cache"
    ds = rankfeed.Dataset(u, cache_dir=cache)
    path = os.path.join(ds.path, "groups.arrow")
    del ds
    with open(path, "ab") as f:
        f.write(b"x")  # another size than the manifest's: the open's own check fails
    again = rankfeed.Dataset(u, cache_dir=cache)
    assert again.fetch_report["downloaded"]
    again.validate()


def test_the_cache_evicts_whole_datasets_least_recently_used(env, local, tmp_path):
    cache = tmp_path / "cache"
    size = sum((local / f).stat().st_size for f in DATA_FILES + ("manifest.json",))
    urls = []
    for i in range(3):
        u = url("ds")
        d = tmp_path / f"d{i}"
        rankfeed.convert([SAMPLE], BERT, d, progress=False, rows_per_batch=512 * (i + 1))
        rankfeed.upload(d, u)
        urls.append(u)
    seals = [rankfeed.fetch(u, cache_dir=cache)["seal"] for u in urls[:2]]
    time.sleep(0.05)
    rankfeed.fetch(urls[0], cache_dir=cache)  # d0 used after d1: d1 is the least recent
    time.sleep(0.05)
    r = rankfeed.fetch(urls[2], cache_dir=cache, cache_max_bytes=int(size * 2.5))
    assert r["evicted"] == [seals[1]]
    assert set(entries(cache)) == {seals[0], r["seal"]}
    # The entry just opened stays even when it alone is over the limit.
    r = rankfeed.fetch(urls[1], cache_dir=cache, cache_max_bytes=1)
    assert r["downloaded"] and entries(cache) == [r["seal"]]
    # An entry a live Dataset holds (its shared lock) is never evicted.
    held = rankfeed.Dataset(urls[1], cache_dir=cache)
    r0 = rankfeed.fetch(urls[0], cache_dir=cache, cache_max_bytes=1)
    assert r0["evicted"] == [] and set(entries(cache)) == {held.fetch_report["seal"], r0["seal"]}
    del held
    r0 = rankfeed.fetch(urls[0], cache_dir=cache, cache_max_bytes=1)
    assert r0["evicted"] == [r["seal"]]


def test_permanent_errors_name_the_object(env, local, tmp_path):
    with pytest.raises(OSError, match=rf"s3://{BUCKET}/nothing-here/ds/manifest.json: no such object"):
        rankfeed.Dataset(f"s3://{BUCKET}/nothing-here/ds", cache_dir=tmp_path)
    with pytest.raises(OSError, match="no-such-bucket"):
        rankfeed.Dataset("s3://no-such-bucket/ds", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="not supported"):
        rankfeed.Dataset("ftp://host/ds", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="needs a prefix below the bucket"):
        rankfeed.remove_url(f"s3://{BUCKET}")
    # A file the manifest lists but the store lacks.
    u = url("ds")
    rankfeed.upload(local, u)
    key = u.split(f"{BUCKET}/", 1)[1] + "/passages.arrow"
    env_client = MotoClient()
    env_client.delete_object(Bucket=BUCKET, Key=key)
    with pytest.raises(OSError, match=r"passages.arrow: no such object"):
        rankfeed.Dataset(u, cache_dir=tmp_path / "c")
    assert entries(tmp_path / "c") == []


def MotoClient():
    import boto3
    return boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")


def test_an_object_that_is_not_the_sealed_one_is_refused(env, local, tmp_path):
    u = url("ds")
    rankfeed.upload(local, u)
    key = u.split(f"{BUCKET}/", 1)[1] + "/groups.arrow"
    body = bytearray((local / "groups.arrow").read_bytes())
    body[len(body) // 2] ^= 1  # same size, another checksum
    MotoClient().put_object(Bucket=BUCKET, Key=key, Body=bytes(body))
    with pytest.raises(rankfeed.CorruptDatasetError, match=r"groups.arrow: xxh3-64 .* differs"):
        rankfeed.Dataset(u, cache_dir=tmp_path / "c")
    MotoClient().put_object(Bucket=BUCKET, Key=key, Body=bytes(body[:-3]))
    with pytest.raises(rankfeed.CorruptDatasetError, match=r"groups.arrow: the object is \d+ bytes, \d+ were expected"):
        rankfeed.Dataset(u, cache_dir=tmp_path / "c")
    assert entries(tmp_path / "c") == []


def test_upload_refuses_a_corrupt_dataset_and_seals_nothing(env, local, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(local, bad)
    b = bytearray((bad / "passages.arrow").read_bytes())
    b[100] ^= 0xFF
    (bad / "passages.arrow").write_bytes(bytes(b))
    u = url("ds")
    with pytest.raises(rankfeed.CorruptDatasetError, match="passages.arrow"):
        rankfeed.upload(bad, u)
    with pytest.raises(OSError, match="manifest.json: no such object"):
        rankfeed.fetch(u, cache_dir=tmp_path / "c")


def test_convert_merge_import_export_write_to_s3(env, local, tmp_path, rankfeed_bin):
    cache = tmp_path / "cache"
    src = url("in") + "/wordnet.jsonl.gz"
    MotoClient().upload_file(str(SAMPLE), BUCKET, src.split(f"{BUCKET}/", 1)[1])
    # convert: input and output URLs; the source is recorded under its URL.
    out = url("conv")
    rankfeed.convert([src], BERT, out, progress=False, cache_dir=cache)
    ds = rankfeed.Dataset(out, cache_dir=cache)
    assert [s["path"] for s in ds.manifest["sources"]] == [src]
    assert ds.manifest["counts"] == rankfeed.Dataset(local).manifest["counts"]
    same_batches(batches(ds), batches(rankfeed.Dataset(local)))
    # A prefix is read as a directory.
    out_dir = url("conv")
    rankfeed.convert([src.rsplit("/", 1)[0] + "/"], BERT, out_dir, progress=False, cache_dir=cache)
    assert rankfeed.Dataset(out_dir, cache_dir=cache).manifest["sources"][0]["path"] == src
    # Sharded conversion to URLs, merged from URLs to a URL: the single conversion's bytes.
    shards = []
    for k in range(3):
        s = url(f"shard{k}")
        rankfeed.convert([src], BERT, s, shard=(k, 3), progress=False, cache_dir=cache)
        shards.append(s)
    merged = url("merged")
    rankfeed.merge(shards, merged, cache_dir=cache)
    m = rankfeed.Dataset(merged, cache_dir=cache)
    for f in DATA_FILES + ("manifest.json",):
        assert open(os.path.join(m.path, f), "rb").read() == open(os.path.join(ds.path, f), "rb").read(), f
    # export to a URL (the marker last), import from it to a URL.
    exp = url("export")
    rankfeed.export(merged, exp, cache_dir=cache)
    keys = [o["Key"] for o in MotoClient().list_objects_v2(
        Bucket=BUCKET, Prefix=exp.split(f"{BUCKET}/", 1)[1] + "/")["Contents"]]
    assert any(k.endswith("_SUCCESS") for k in keys) and any(k.endswith(".parquet") for k in keys)
    imp = url("import")
    rankfeed.import_parquet([exp + "/"], imp, cache_dir=cache)
    same_batches(batches(rankfeed.Dataset(imp, cache_dir=cache)), batches(ds))
    with pytest.raises(FileExistsError):
        rankfeed.export(merged, exp, cache_dir=cache)
    # The CLI: inspect/show/bench read URLs; convert/merge write them.
    cli_env = {**os.environ}
    proc = subprocess.run([str(rankfeed_bin), "inspect", merged, "--json", "--cache-dir", str(cache)],
                          capture_output=True, text=True, env=cli_env, check=True)
    assert json.loads(proc.stdout)["counts"] == ds.manifest["counts"]
    proc = subprocess.run([str(rankfeed_bin), "show", merged, "--row", "0", "--cache-dir", str(cache)],
                          capture_output=True, text=True, env=cli_env)
    assert proc.returncode == 0, proc.stderr
    cli_out = url("cli")
    subprocess.run([str(rankfeed_bin), "merge", *shards, "-o", cli_out, "--cache-dir", str(cache)],
                   capture_output=True, text=True, env=cli_env, check=True)
    proc = subprocess.run([str(rankfeed_bin), "merge", *shards, "-o", cli_out, "--cache-dir", str(cache)],
                          capture_output=True, text=True, env=cli_env)
    assert proc.returncode == 1 and "already exists" in proc.stderr
    assert rankfeed.fetch(cli_out, cache_dir=cache)["seal"] == m.fetch_report["seal"]
    rankfeed.remove_url(cli_out)
    with pytest.raises(OSError, match="no such object"):
        rankfeed.fetch(cli_out, cache_dir=tmp_path / "c2")


def test_a_large_dataset_uploads_in_parts_and_downloads_in_parts(env, tmp_path):
    # passages.arrow above 8 MiB: a multipart upload, and ranged parts on the way down.
    rng = random.Random(5)
    words = [f"w{i}" for i in range(5000)]
    src = tmp_path / "big.jsonl"
    with open(src, "w") as f:
        for i in range(6000):
            f.write(json.dumps({"query": f"q{i}", "pos": [" ".join(rng.choices(words, k=120))],
                                "neg": [" ".join(rng.choices(words, k=120)) for _ in range(3)]}) + "\n")
    d = tmp_path / "big"
    rankfeed.convert([src], BERT, d, progress=False)
    assert (d / "passages.arrow").stat().st_size > 8 << 20
    u = url("big")
    rankfeed.upload(d, u)
    ds = rankfeed.Dataset(u, cache_dir=tmp_path / "c")
    assert ds.fetch_report["requests"] >= 3
    for f in DATA_FILES:
        assert (d / f).read_bytes() == open(os.path.join(ds.path, f), "rb").read()


OPENER = textwrap.dedent("""
    import json, sys, time
    import rankfeed
    url, cache, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
    while time.time() < start:
        time.sleep(0.001)
    t = time.time()
    ds = rankfeed.Dataset(url, cache_dir=cache)
    b = next(iter(ds.loader(batch_size=4, group_size=8, mode="encoder", seed=3)))
    print(json.dumps({"first_batch": time.time() - t, "report": ds.fetch_report,
                      "ids": int(b["input_ids"].sum())}))
""")


def open_at_once(u, cache, n, env):
    start = time.time() + 1.5
    procs = [subprocess.Popen([sys.executable, "-c", OPENER, u, str(cache), str(start)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, **env}) for _ in range(n)]
    out = []
    for p in procs:
        o, e = p.communicate(timeout=120)
        assert p.returncode == 0, e
        out.append(json.loads(o))
    return out


def test_eight_processes_opening_at_once_download_each_file_once(env, s3, local, tmp_path):
    u = url("ds")
    rankfeed.upload(local, u)
    cache = tmp_path / "cache"
    cold = open_at_once(u, cache, 8, env)
    assert sum(r["report"]["downloaded"] for r in cold) == 1
    assert len({r["ids"] for r in cold}) == 1
    prefix = u.split(f"{BUCKET}/", 1)[1]
    gets = data_gets(s3, prefix)
    assert {f: gets[f] for f in DATA_FILES} == {f: 1 for f in DATA_FILES}, gets
    assert gets["manifest.json"] == 8
    warm = open_at_once(u, cache, 8, env)
    assert not any(r["report"]["downloaded"] for r in warm)
    assert data_gets(s3, prefix)["manifest.json"] == 16
    report(f"8 processes opening at once: 1 download, each data file fetched once; first batch: cold max {max(r['first_batch'] for r in cold):.3f} s, "
          f"warm max {max(r['first_batch'] for r in warm):.3f} s")


def check_cache(cache, local):
    """Every published entry of `cache` holds exactly a dataset's sealed bytes: returns the
    number of entries that do not (corrupt caches)."""
    bad = 0
    for e in entries(cache):
        try:
            ds = rankfeed.Dataset(os.path.join(cache, e))
            ds.validate()
            for f in DATA_FILES:
                if open(os.path.join(cache, e, f), "rb").read() != (local / f).read_bytes():
                    bad += 1
                    break
        except Exception:
            bad += 1
    return bad


def test_faults_are_retried_or_a_clean_error_and_never_a_corrupt_cache(env, s3, local, tmp_path, monkeypatch):
    u = url("ds")
    rankfeed.upload(local, u)
    monkeypatch.setenv("RANKFEED_REMOTE_PART_BYTES", str(256 << 10))  # ~10 parts per open
    expected = batches(rankfeed.Dataset(local), n=2)
    totals = {"opens": 0, "ok": 0, "clean_errors": 0, "corrupt_caches": 0, "retries": 0}
    injected = {f: 0 for f in FAULTS}
    for seed in range(6 * LONG):
        proxy = FaultProxy(s3.port, rate=0.25, seed=seed)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        cache = tmp_path / f"cache{seed}"
        for _ in range(3):
            totals["opens"] += 1
            try:
                ds = rankfeed.Dataset(u, cache_dir=cache)
                totals["retries"] += ds.fetch_report["retries"]
                same_batches(batches(ds, n=2), expected)
                totals["ok"] += 1
            except (OSError, ValueError) as e:
                assert u.split("/")[2] in str(e), e  # names the object
                totals["clean_errors"] += 1
        totals["corrupt_caches"] += check_cache(cache, local)
        for f, n in proxy.counts.items():
            injected[f] += n
        proxy.stop()
    # A byte flipped on every GET of one file: downloaded 4 times, then a clean error.
    proxy = FaultProxy(s3.port, rate=1.0, faults=("flip",), only=r"passages\.arrow$")
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    cache = tmp_path / "always"
    totals["opens"] += 1
    with pytest.raises(rankfeed.CorruptDatasetError, match=r"passages.arrow: xxh3-64 .* 4 times downloaded"):
        rankfeed.Dataset(u, cache_dir=cache)
    totals["clean_errors"] += 1
    totals["corrupt_caches"] += check_cache(cache, local)
    assert entries(cache) == []
    injected["flip"] += proxy.counts["flip"]
    proxy.stop()
    report(f"fault proxy: faults injected {injected} (total {sum(injected.values())}); opens {totals['opens']}, "
           f"exact {totals['ok']}, clean errors {totals['clean_errors']}, rankfeed-level retries "
           f"{totals['retries']} (object_store retries within requests too), corrupt caches {totals['corrupt_caches']}")
    assert totals["corrupt_caches"] == 0
    assert all(n > 0 for n in injected.values()), injected
    assert totals["ok"] >= totals["opens"] // 2, totals


def test_kill_9_of_the_downloader_leaves_nothing_trusted(env, s3, local, tmp_path, monkeypatch):
    u = url("ds")
    rankfeed.upload(local, u)
    proxy = FaultProxy(s3.port, slow=0.02)  # ~2.2 MB at 64 KiB per 20 ms: about 0.7 s
    rng = random.Random(11)
    killed = hits = 0
    for i in range(5 * LONG):
        cache = tmp_path / f"cache{i}"
        p = subprocess.Popen([sys.executable, "-c", OPENER, u, str(cache), "0"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={**os.environ, "AWS_ENDPOINT_URL": proxy.endpoint})
        time.sleep(rng.uniform(0.3, 1.5))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            killed += 1
        p.wait()
        assert check_cache(cache, local) == 0
        ds = rankfeed.Dataset(u, cache_dir=cache)  # straight to the server
        hits += not ds.fetch_report["downloaded"]
        ds.validate()
        same_batches(batches(ds, n=2), batches(rankfeed.Dataset(local), n=2))
        leftovers = [n for n in os.listdir(cache) if "rankfeed-tmp" in n]
        assert leftovers == [], leftovers  # the killed download's staging directory is gone
    proxy.stop()
    report(f"kill -9: {killed} of {5 * LONG} downloaders killed at random moments; the next open found a "
           f"complete copy {hits} times and downloaded it otherwise; 0 corrupt caches, 0 staging leftovers")
    assert killed >= 1


def test_an_interrupted_replacement_leaves_no_dataset_or_the_new_one_never_a_mix(env, s3, local, tmp_path):
    other = tmp_path / "other"
    rankfeed.convert([SAMPLE], BERT, other, progress=False, rows_per_batch=1024)
    outcomes = {"none": 0, "old": 0, "new": 0}
    rng = random.Random(3)
    uploader = textwrap.dedent("""
        import sys, rankfeed
        rankfeed.upload(sys.argv[1], sys.argv[2], overwrite=True)
    """)
    for i in range(4 * LONG):
        u = url("ds")
        rankfeed.upload(local, u)
        p = subprocess.Popen([sys.executable, "-c", uploader, str(other), u], env={**os.environ})
        time.sleep(rng.uniform(0.0, 0.6))
        p.send_signal(signal.SIGKILL)
        p.wait()
        try:
            ds = rankfeed.Dataset(u, cache_dir=tmp_path / f"c{i}")
        except OSError as e:
            assert "manifest.json: no such object" in str(e), e
            outcomes["none"] += 1
            continue
        ds.validate()
        new, old = rankfeed.Dataset(other).manifest, rankfeed.Dataset(local).manifest
        assert ds.manifest in (new, old)
        outcomes["new" if ds.manifest == new else "old"] += 1
    report(f"kill -9 of an uploader replacing a dataset, {sum(outcomes.values())} times: URL left with "
           f"no dataset {outcomes['none']}, the old {outcomes['old']}, the new {outcomes['new']}; a mix 0")


def test_a_shard_downloads_only_the_input_objects_it_reads(env, s3, tmp_path):
    import gzip
    lines = gzip.open(SAMPLE, "rt").read().splitlines(keepends=True)
    client = MotoClient()
    prefix = url("parts").split(f"{BUCKET}/", 1)[1]
    for i in range(6):
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/part-{i:05d}.jsonl", Body="".join(lines[i::6]).encode())
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/_SUCCESS", Body=b"")
    src = f"s3://{BUCKET}/{prefix}/"
    cache = tmp_path / "c"
    single = url("single")
    rankfeed.convert([src], BERT, single, progress=False, cache_dir=cache)
    before = data_gets(s3, prefix)
    assert before == {"_SUCCESS": 1, **{f"part-{i:05d}.jsonl": 1 for i in range(6)}}
    shards = []
    for k in range(3):
        s = url(f"shard{k}")
        rankfeed.convert([src], BERT, s, shard=(k, 3), progress=False, cache_dir=cache)
        shards.append(s)
    gets = data_gets(s3, prefix)
    fetched_by_shards = sum(gets.values()) - sum(before.values())
    assert fetched_by_shards <= 6 + 2, gets  # each file once, plus at most the 2 cut at a boundary
    merged = url("merged")
    rankfeed.merge(shards, merged, cache_dir=cache)
    a = rankfeed.Dataset(single, cache_dir=cache)
    b = rankfeed.Dataset(merged, cache_dir=cache)
    for f in DATA_FILES + ("manifest.json",):
        assert open(os.path.join(a.path, f), "rb").read() == open(os.path.join(b.path, f), "rb").read(), f


def test_object_names_that_need_encoding_are_read_as_they_are(env, local, tmp_path):
    # Regression (review): keys from a listing were percent-encoded a second time.
    import gzip
    prefix = url("odd names").split(f"{BUCKET}/", 1)[1]
    body = gzip.open(SAMPLE, "rb").read()
    MotoClient().put_object(Bucket=BUCKET, Key=f"{prefix}/a b~1.jsonl", Body=body)
    out = url("ds")
    base = f"s3://{BUCKET}/" + prefix.replace(" ", "%20")
    rankfeed.convert([base + "/"], BERT, out, progress=False, cache_dir=tmp_path)
    assert rankfeed.Dataset(out, cache_dir=tmp_path).manifest["counts"] == rankfeed.Dataset(local).manifest["counts"]
    rankfeed.convert([base + "/a%20b~1.jsonl"], BERT, out, progress=False, cache_dir=tmp_path, overwrite=True)
    assert rankfeed.Dataset(out, cache_dir=tmp_path).manifest["counts"] == rankfeed.Dataset(local).manifest["counts"]
