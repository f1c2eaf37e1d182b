"""Real training with rankfeed.st's trainers on the bundled WordNet sample: the loss decreases
over 50 steps (on the sample's first 32 rows, which a tiny random-weight model learns in that
many steps; on all 2,998 it stays near ln G for hundreds); a run stopped at a checkpoint and resumed trains on exactly the batches of the
uninterrupted run (also across an epoch boundary); two processes (torchrun, gloo, CPU) train
on disjoint rows with the same number of steps."""

import gzip
import json
import os
import subprocess
import sys

import pytest

import rankfeed

from conftest import ROOT, SAMPLE, hf_tokenizer, tiny_model_dir
from st_runs import run

HERE = os.path.dirname(os.path.abspath(__file__))
KINDS = ["ce", "bi"]


@pytest.fixture(scope="module")
def wordnet(tmp_path_factory):
    out = tmp_path_factory.mktemp("wn") / "ds"
    rankfeed.convert([str(SAMPLE)], str(hf_tokenizer("bert")[1]), str(out))
    return str(out)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir("bert", tmp_path_factory.mktemp("m") / "bert")


def head_of_sample(tmp_path, n):
    src = tmp_path / f"head{n}.jsonl"
    with open(src, "w") as f, gzip.open(SAMPLE, "rt") as g:
        for _, line in zip(range(n), g):
            f.write(line)
    data = tmp_path / f"head{n}"
    rankfeed.convert([str(src)], str(hf_tokenizer("bert")[1]), str(data))
    return data


@pytest.mark.parametrize("kind", KINDS)
def test_training_decreases_the_loss(model_dir, tmp_path, kind):
    _, losses = run(kind, model_dir, head_of_sample(tmp_path, 32), tmp_path / "run",
                    max_steps=50)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    print(f"\n{kind}: loss {first:.4f} (steps 1-10) -> {last:.4f} (steps 41-50)")
    assert last < first * 0.5, (first, last)


@pytest.mark.parametrize("kind", KINDS)
def test_a_resumed_run_trains_on_the_uninterrupted_runs_batches(wordnet, model_dir, tmp_path,
                                                                kind):
    full, _ = run(kind, model_dir, wordnet, tmp_path / "full", max_steps=50)
    assert len(full) == 50
    rows = [r for b in full for r in b[0]]
    assert len(set(rows)) == len(rows), "50 batches of 8 stay within the first epoch"
    out = tmp_path / "stopped"
    head, _ = run(kind, model_dir, wordnet, out, max_steps=50, stop_at=20, save_steps=20)
    assert head == full[:20]
    ckpt = out / "checkpoint-20"
    state = json.loads((ckpt / "rankfeed_state.json").read_text())
    assert (state["epoch"], state["next"]) == (0, 20)
    tail, _ = run(kind, model_dir, wordnet, out, max_steps=50, resume=str(ckpt))
    assert head + tail == full


@pytest.mark.parametrize("kind", KINDS)
def test_resume_across_an_epoch_boundary(tmp_path, model_dir, kind):
    # A small dataset (90 rows: 12 batches of 8, the last padded) and 30 steps: 2.5 epochs.
    data = head_of_sample(tmp_path, 90)
    full, _ = run(kind, model_dir, data, tmp_path / "full", max_steps=30)
    epoch = 12
    assert sorted(r for b in full[:epoch] for r in b[0])[:90] == list(range(90))
    assert full[:epoch] != full[epoch:2 * epoch], "epochs differ"
    out = tmp_path / "stopped"
    head, _ = run(kind, model_dir, data, out, max_steps=30, stop_at=17, save_steps=17)
    tail, _ = run(kind, model_dir, data, out, max_steps=30, resume=str(out / "checkpoint-17"))
    assert head + tail == full


def test_resume_with_gradient_accumulation(tmp_path, model_dir):
    # Regression (transformers 5): every epoch ran on the batch count of the first pass, so
    # after a mid-epoch resume the optimizer stepped after other batches, and the run ended
    # early. 90 rows: 12 batches an epoch, 5 per update (3 updates an epoch, the last of 2).
    data = head_of_sample(tmp_path, 90)
    full, _ = run("ce", model_dir, data, tmp_path / "full", max_steps=8, ga=5)
    assert len(full) == 12 + 12 + 10
    out = tmp_path / "stopped"
    head, _ = run("ce", model_dir, data, out, max_steps=8, ga=5, stop_at=2, save_steps=2)
    tail, _ = run("ce", model_dir, data, out, max_steps=8, ga=5, resume=str(out / "checkpoint-2"))
    assert head + tail == full, "the same batches in the same optimizer steps"


@pytest.mark.parametrize("kind", KINDS)
def test_two_processes_train_disjoint_rows_with_equal_steps(wordnet, model_dir, tmp_path, kind):
    result = tmp_path / "result"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": HERE}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(29600 + KINDS.index(kind)),
           os.path.join(HERE, "st_runs.py"), kind, model_dir, wordnet, str(tmp_path / "out"),
           str(result), "20"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"result.{r}").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert len(ranks[0]["seen"]) == len(ranks[1]["seen"]) == 20
    rows = [set(r for b in rk["seen"] for r in b[0]) for rk in ranks]
    assert not rows[0] & rows[1], "ranks train on disjoint rows"
    assert len(rows[0]) == len(rows[1]) == 20 * 8
