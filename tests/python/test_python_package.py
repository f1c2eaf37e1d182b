"""The Python package: convert -> Dataset -> loader, byte-for-byte equal to the Rust loader;
resume; errors; fork safety; zero-copy and flat memory."""

import json
import multiprocessing as mp
import os
import pathlib
import re
import shutil
import sys
import time

import numpy as np
import pytest

import rankfeed
from conftest import ROOT, run_rankfeed

SAMPLE = ROOT / "data" / "sample" / "wordnet-nouns.jsonl.gz"
BERT = ROOT / "data" / "sample" / "bert" / "tokenizer.json"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("py") / "ds"
    summary = rankfeed.convert(SAMPLE, BERT, out, progress=False)
    assert summary["counts"]["groups"] == 2998
    assert summary["sources"][0]["rows_accepted"] == 2998
    return out


def test_convert_matches_the_cli(tmp_path, rankfeed_bin, dataset):
    out = tmp_path / "cli"
    run_rankfeed(rankfeed_bin, "convert", SAMPLE, "--tokenizer", BERT, "-o", out)
    for name in ("groups.arrow", "passages.arrow", "prompts.arrow"):
        assert (out / name).read_bytes() == (dataset / name).read_bytes(), name


def test_batches_equal_the_rust_loader_byte_for_byte(tmp_path, rankfeed_bin, dataset):
    ds = rankfeed.Dataset(dataset)
    assert len(ds) == 2998
    kw = dict(batch_size=4, group_size=8, mode="encoder", query_max_len=32, passage_max_len=64,
              pad_to_multiple_of=8, knowledge_distillation=True)
    batches = [b for _, b in zip(range(20), ds.loader(**kw))]
    selections = [[{"row": int(r), "pos": int(p), "neg": [int(x) for x in n]}
                   for r, p, n in zip(b["rows"], b["pos"], b["neg"])] for b in batches]
    sel = tmp_path / "sel.json"
    sel.write_text(json.dumps(selections))
    run_rankfeed(rankfeed_bin, "collate", dataset, "--selections", sel, "-o", tmp_path / "out",
                 "--mode", "encoder", "--group-size", "8", "--query-max-len", "32", "--passage-max-len", "64",
                 "--pad-to-multiple-of", "8", "--knowledge-distillation")
    for k, b in enumerate(batches):
        d = tmp_path / "out" / str(k)
        for name in ("input_ids", "attention_mask", "token_type_ids", "teacher_scores"):
            want = np.load(d / f"{name}.npy")
            assert b[name].dtype == want.dtype and b[name].shape == want.shape, name
            assert b[name].tobytes() == want.tobytes(), f"batch {k} {name}"
    # The loader's own collate() agrees with its iterator.
    again = ds.loader(**kw).collate([(s["row"], s["pos"], s["neg"]) for s in selections[3]])
    assert again["input_ids"].tobytes() == batches[3]["input_ids"].tobytes()


def test_state_dict_resume(dataset):
    ds = rankfeed.Dataset(dataset)
    kw = dict(batch_size=8, group_size=4, seed=3, prefetch_threads=2)
    full = [b["input_ids"].tobytes() for b in ds.loader(**kw)]
    assert len(full) == len(ds.loader(**kw)) == 375
    loader = ds.loader(**kw)
    for _ in range(100):
        next(loader)
    state = loader.state_dict()
    assert (state["epoch"], state["step"]) == (0, 100)
    resumed = ds.loader(**kw)
    resumed.load_state_dict(state)
    rest = [b["input_ids"].tobytes() for b in resumed]
    assert rest == full[100:]
    assert resumed.epoch == 1 and resumed.step == 0, "after an epoch the loader moves on"
    with pytest.raises(ValueError, match="seed"):
        ds.loader(batch_size=8, group_size=4, seed=4).load_state_dict(state)
    e1 = ds.loader(**kw)
    e1.set_epoch(1)
    assert next(e1)["input_ids"].tobytes() != full[0]
    assert ds.loader(**kw).batch(0, 7)["input_ids"].tobytes() == full[7]


def test_error_classes(tmp_path, dataset):
    # I/O
    with pytest.raises(OSError):
        rankfeed.Dataset(tmp_path / "missing")
    # Corrupt files: a truncated column file.
    bad = tmp_path / "bad"
    shutil.copytree(dataset, bad)
    data = (bad / "groups.arrow").read_bytes()
    (bad / "groups.arrow").write_bytes(data[: len(data) // 2])
    with pytest.raises(rankfeed.CorruptDatasetError, match="groups.arrow"):
        rankfeed.Dataset(bad)
    assert issubclass(rankfeed.CorruptDatasetError, OSError)
    # Bad arguments.
    ds = rankfeed.Dataset(dataset)
    with pytest.raises(ValueError, match="mode"):
        ds.loader(mode="bogus")
    with pytest.raises(ValueError, match="shard_tail"):
        ds.loader(shard_tail="sideways")
    with pytest.raises(ValueError, match="rank"):
        ds.loader(rank=2, world_size=2)
    with pytest.raises(ValueError, match="negatives"):
        ds.loader(group_size=4).collate([(0, 0, [0])])
    with pytest.raises(IndexError):
        ds.group(len(ds))
    # Bad input rows, with file and line.
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"query": "q", "pos": ["a"], "neg": ["b"]}\n{"query": "q", "pos": [], "neg": []}\n')
    with pytest.raises(ValueError, match=r"rows.jsonl:2.*pos.*empty_pos"):
        rankfeed.convert(rows, BERT, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    summary = rankfeed.convert(rows, BERT, tmp_path / "out", on_error="skip", progress=False)
    assert summary["sources"][0]["rows_rejected"] == 1
    with pytest.raises(ValueError, match="tokenizer"):
        bad_tok = tmp_path / "tokenizer.json"
        bad_tok.write_text("{}")
        rankfeed.convert(rows, bad_tok, tmp_path / "out2", progress=False)
    with pytest.raises(ValueError, match="on_error"):
        rankfeed.convert(rows, BERT, tmp_path / "out3", on_error="ignore")


def _child_rows(path, rank, world, queue):
    ds = rankfeed.Dataset(path)
    rows = []
    for b in ds.loader(batch_size=5, group_size=4, rank=rank, world_size=world, shard_tail="uneven",
                       prefetch_threads=2):
        rows.extend(int(r) for r in b["rows"])
    queue.put((rank, rows))


def _child_continue(loader, queue):
    # The parent's loader had prefetch threads running at the fork: they did not come along.
    n = sum(1 for _ in loader)
    queue.put(n)


def test_fork_four_processes_cover_each_row_once(dataset):
    ctx = mp.get_context("fork")
    ds = rankfeed.Dataset(dataset)
    warm = ds.loader(batch_size=4, group_size=4, prefetch_threads=2)
    for _ in range(3):
        next(warm)  # prefetch threads are running in the parent now
    queue = ctx.Queue()
    procs = [ctx.Process(target=_child_rows, args=(str(dataset), r, 4, queue)) for r in range(4)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    rows = sorted(r for rs in results.values() for r in rs)
    assert rows == list(range(len(ds))), "each row exactly once per epoch across the 4 processes"
    child = ctx.Process(target=_child_continue, args=(warm, queue))
    child.start()
    remaining = queue.get(timeout=120)
    child.join(timeout=60)
    assert child.exitcode == 0 and remaining == len(warm) - 3


def _child_first_rows(loader, queue):
    queue.put([int(r) for r in next(loader)["rows"]])


def test_a_forked_child_runs_the_threaded_epoch_pass(tmp_path):
    # From 65,536 rows the length pass splits across threads: in a forked child (a DataLoader
    # worker) it must run too (scoped threads, not a pool made before the fork), and give the
    # parent's batches.
    import pyarrow as pa
    import pyarrow.parquet as pq
    n, rng = 70_000, np.random.default_rng(3)
    tables = tmp_path / "tables"
    for sub in ("passages", "groups", "prompts"):
        (tables / sub).mkdir(parents=True)
    lens = rng.integers(1, 60, 400)
    pq.write_table(pa.table({"id": pa.array(np.arange(400), pa.int32()),
                             "tokens": [list(rng.integers(1000, 2000, l)) for l in lens]}),
                   tables / "passages" / "part-0.parquet")
    pq.write_table(pa.table({"row": np.arange(n), "query": [[1500, 1501]] * n,
                             "pos": [[int(p)] for p in rng.integers(0, 400, n)],
                             "neg": [list(map(int, rng.integers(0, 400, 3))) for _ in range(n)],
                             "source": pa.array(np.zeros(n), pa.int32())}),
                   tables / "groups" / "part-0.parquet")
    pq.write_table(pa.table({"id": pa.array([], pa.int32()), "tokens": pa.array([], pa.list_(pa.int32()))}),
                   tables / "prompts" / "part-0.parquet")
    rankfeed.import_parquet([str(tables)], str(tmp_path / "ds"), tokenizer=str(BERT))
    ds = rankfeed.Dataset(str(tmp_path / "ds"))
    opts = dict(batch_size=8, group_size=4, length_grouped=50, prefetch_threads=0)
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_first_rows, args=(ds.loader(**opts), queue))
    child.start()
    got = queue.get(timeout=120)
    child.join(timeout=60)
    assert child.exitcode == 0
    assert got == [int(r) for r in next(ds.loader(**opts))["rows"]]


def _child_next_epoch_rows(loader, epoch, queue):
    loader.set_epoch(epoch)
    queue.put([int(r) for r in next(loader)["rows"]])


@pytest.mark.parametrize("plan", [{"length_grouped": 5}, {"max_tokens": 512},
                                  {"no_duplicates": True}])
def test_a_child_forked_while_the_next_epoch_is_planned_ahead_plans_it_itself(dataset, plan):
    # After its first batch a loader plans the next epoch on a background thread. A child
    # forked at any moment of that pass (the parent's plan caches possibly locked by it) uses
    # fresh caches of its own: it never hangs, and its next epoch is the parent's.
    ds = rankfeed.Dataset(dataset)
    opts = dict(batch_size=4, group_size=4, prefetch_threads=2, **plan)
    ctx = mp.get_context("fork")
    want = [int(r) for r in next(ds.loader(epoch=1, **opts))["rows"]]
    for delay in (0.0, 0.001, 0.005):
        parent = ds.loader(**opts)
        next(parent)
        time.sleep(delay)
        queue = ctx.Queue()
        child = ctx.Process(target=_child_next_epoch_rows, args=(parent, 1, queue))
        child.start()
        got = queue.get(timeout=120)
        child.join(timeout=60)
        assert child.exitcode == 0 and got == want, delay
        parent.set_epoch(1)
        assert [int(r) for r in next(parent)["rows"]] == want


def test_torch_dataloader_workers(dataset):
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    from rankfeed.torch import RankfeedIterable

    data = RankfeedIterable(dataset, batch_size=4, group_size=4, with_meta=True)
    rows = []
    for batch in DataLoader(data, batch_size=None, num_workers=3):
        assert batch["input_ids"].dtype == torch.int64
        rows.extend(batch["rows"].tolist())
    assert sorted(rows) == list(range(2998))


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_zero_copy_and_flat_memory(dataset):
    ds = rankfeed.Dataset(dataset)
    loader = ds.loader(batch_size=4, group_size=16, query_max_len=32, passage_max_len=192, prefetch_threads=1)
    b = next(loader)
    for name in ("input_ids", "attention_mask", "token_type_ids"):
        arr = b[name]
        assert not arr.flags.owndata, "the array does not own a copy"
        assert type(arr.base).__name__ == "PySliceContainer", "its memory belongs to the Rust buffer"
        assert arr.flags.c_contiguous and arr.flags.writeable
    # torch.from_numpy would share this memory; numpy views do too.
    view = b["input_ids"].reshape(-1)
    assert np.shares_memory(view, b["input_ids"])
    seen = 0
    for _ in range(10_000):
        next(loader) if loader.step < len(loader) else loader.set_epoch(loader.epoch + 1)
        seen += 1
    before = _rss_bytes()
    for _ in range(100_000):
        if loader.step >= len(loader):
            loader.set_epoch(loader.epoch + 1)
        batch = next(loader)
        seen += 1
    del batch
    grown = _rss_bytes() - before
    assert seen == 110_000
    assert grown < 16 << 20, f"RSS grew by {grown / 2**20:.1f} MiB over 100k batches"


def test_pip_install_puts_the_rankfeed_command_on_path(rankfeed_bin, dataset):
    # Regression (issue 19): every `rankfeed ...` line of the README failed with "command not
    # found" after `pip install ./python`; the package now installs a `rankfeed` console script
    # running the same CLI code as target/release/rankfeed.
    import subprocess
    import sysconfig
    script = pathlib.Path(sysconfig.get_path("scripts")) / "rankfeed"
    assert script.exists(), f"no console script at {script}"
    for args in (["--version"], ["inspect", str(dataset)], ["show", str(dataset), "--row", "3"]):
        via_pip = subprocess.run([script, *args], capture_output=True, text=True)
        native = subprocess.run([rankfeed_bin, *args], capture_output=True, text=True)
        assert via_pip.returncode == native.returncode == 0, via_pip.stderr
        timing = re.compile(r"[\d.]+ ms")  # inspect prints how long opening took
        assert timing.sub("ms", via_pip.stdout) == timing.sub("ms", native.stdout), args
    bad = subprocess.run([script, "bench", str(dataset), "--batch-size", "0"],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "batch_size" in bad.stderr, bad.stderr
    usage = subprocess.run([script, "no-such-command"], capture_output=True, text=True)
    assert usage.returncode == 2 and "Usage" in usage.stderr


def test_first_hour_messages(tmp_path, rankfeed_bin, dataset):
    # Regressions (issue 19, 7 and 8): each message below cost a new user time.
    import subprocess
    import warnings

    def run(*args):
        return subprocess.run([rankfeed_bin, *map(str, args)], capture_output=True, text=True)

    # The overwrite hint names the flag; a model directory stands for its tokenizer.json, and
    # a directory without one says what to pass.
    again = run("convert", SAMPLE, "--tokenizer", BERT, "-o", dataset)
    assert again.returncode == 1 and "--overwrite" in again.stderr, again.stderr
    via_dir = run("convert", SAMPLE, "--tokenizer", BERT.parent, "-o", tmp_path / "d")
    assert via_dir.returncode == 0, via_dir.stderr
    no_tok = run("convert", SAMPLE, "--tokenizer", tmp_path, "-o", tmp_path / "e")
    assert no_tok.returncode == 1 and "without a tokenizer.json" in no_tok.stderr
    # max_tokens capped by batch_size: a note (CLI) and a UserWarning (Python).
    capped = run("show", dataset, "--step", "0", "--max-tokens", "16384", "--length-grouped", "50")
    assert capped.returncode == 0 and "max_tokens 16384 is not reached" in capped.stderr
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        rankfeed.Dataset(dataset).loader(max_tokens=16384)
    assert any("raise it to fill the token budget" in str(x.message) for x in w)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rankfeed.Dataset(dataset).loader(max_tokens=16384, batch_size=256)
    # Teacher scores as written (0.707, not 0.7070000171661377); the embedder query labelled.
    fixture = ROOT / "tests" / "fixtures" / "roundtrip.jsonl"
    scored = tmp_path / "scored"
    assert run("convert", fixture, "--tokenizer", BERT, "-o", scored).returncode == 0
    shown = run("show", scored, "--row", "0", "--group-size", "2")
    scores = re.findall(r"teacher score (\S+)", shown.stdout)
    assert scores and all(len(s.split(".")[-1]) <= 8 for s in scores), shown.stdout
    emb = run("show", scored, "--row", "0", "--mode", "embedder", "--group-size", "2")
    assert "\nquery: " in emb.stdout and "null" not in emb.stdout, emb.stdout


@pytest.mark.parametrize("order", ["rankfeed, torch", "torch, rankfeed"])
def test_the_extension_loads_beside_torch_in_either_order(order):
    # Regression: the dense-mining sgemm's avx512 thread-local buffer (1 KB) grew the
    # extension's static TLS until glibc refused to load torch's libgomp after it ("cannot
    # allocate memory in static TLS block"), and the extension after torch.
    import subprocess
    pytest.importorskip("torch")
    p = subprocess.run([sys.executable, "-c", f"import {order}"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
