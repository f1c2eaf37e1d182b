"""Training integration (issue 10): HF Trainer epochs and exact resume, StatefulDataLoader with
workers, thread safety, argument validation, callback exceptions, numpy-only batches, batches
independent of the worker count."""

import json
import os
import pathlib
import pickle
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import rankfeed
from conftest import ROOT

torch = pytest.importorskip("torch")
from rankfeed.torch import RankfeedIterable  # noqa: E402

BERT = ROOT / "data" / "sample" / "bert" / "tokenizer.json"
FIXTURE = ROOT / "tests" / "fixtures" / "roundtrip.jsonl"
SAMPLE = ROOT / "data" / "sample" / "wordnet-nouns.jsonl.gz"
KW = dict(batch_size=4, group_size=4, query_max_len=16, passage_max_len=32)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "ds"
    rankfeed.convert(FIXTURE, BERT, out, progress=False)
    return out


def rows_of(batches):
    return [(b["rows"].tolist(), b["pos"].tolist(), b["neg"].tolist()) for b in batches]


# --- observation 1 and 2: HF Trainer ---------------------------------------------------------

transformers = pytest.importorskip("transformers")


def tiny_bert():
    config = transformers.BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32, num_labels=1,
                                     max_position_embeddings=128)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def trainer_run(small, out, *, epochs=2, stop_at=None, resume=None, save_steps=None, seen=None,
                **data_kw):
    from rankfeed.hf import RankfeedTrainer

    seen = [] if seen is None else seen

    class Recording(RankfeedTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            seen.append((inputs["rows"].tolist(), inputs["pos"].tolist(), inputs["neg"].tolist()))
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    class Stop(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if stop_at is not None and state.global_step >= stop_at:
                control.should_save = True
                control.should_training_stop = True

    args = transformers.TrainingArguments(
        output_dir=str(out), num_train_epochs=epochs, learning_rate=1e-3, report_to=[],
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        logging_strategy="no", use_cpu=True, seed=1, dataloader_num_workers=0,
        disable_tqdm=True)
    data = RankfeedIterable(small, with_meta=True, **{**KW, **data_kw})
    trainer = Recording(model=tiny_bert(), args=args, train_dataset=data,
                        callbacks=[Stop()])
    trainer.train(resume_from_checkpoint=resume)
    return seen, len(data)


def test_trainer_epochs_differ_and_have_a_length(small, tmp_path):
    # Regression: the README recipe replayed epoch 1 in epoch 2, and needed max_steps.
    seen, steps = trainer_run(small, tmp_path / "run")
    assert len(seen) == 2 * steps
    first, second = seen[:steps], seen[steps:]
    rows = lambda part: [r for b in part for r in b[0]]
    assert sorted(rows(first)) == sorted(rows(second)) == list(range(len(rankfeed.Dataset(small))))
    assert rows(first) != rows(second)
    assert [b[2] for b in first] != [b[2] for b in second]


def test_trainer_resume_trains_on_exactly_the_same_batches(small, tmp_path):
    # Regression: resuming re-iterated (or restarted) the epoch.
    full, steps = trainer_run(small, tmp_path / "full")
    for n in (steps // 2, steps + steps // 3):
        out = tmp_path / f"stop{n}"
        head, _ = trainer_run(small, out, stop_at=n, save_steps=n)
        assert head == full[:n]
        ckpt = out / f"checkpoint-{n}"
        assert json.loads((ckpt / "rankfeed_state.json").read_text())["next"] == n % steps
        t = time.perf_counter()
        tail, _ = trainer_run(small, out, resume=str(ckpt))
        assert head + tail == full, f"resume at step {n}"


def test_trainer_refuses_a_resume_under_other_settings(small, tmp_path):
    # Regression: rankfeed_state.json held only (epoch, next), so a resume on 2 processes, or
    # with another seed or batch size, trained on other batches (some rows twice, some never).
    # Another world or batch size now resumes elastically (tests/python/test_elastic.py); the
    # settings that change the epoch's order or its groups are refused.
    out = tmp_path / "run"
    trainer_run(small, out, stop_at=3, save_steps=3)
    ckpt = out / "checkpoint-3"
    state = json.loads((ckpt / "rankfeed_state.json").read_text())
    assert state["settings"]["world_size"] == 1 and state["settings"]["dataset"]
    changes = [("seed", dict(seed=99)), ("group_size", dict(group_size=3)),
               ("pad_to_multiple_of", dict(pad_to_multiple_of=8)),
               ("shuffle", dict(shuffle=False))]
    for name, change in changes:
        seen = []
        with pytest.raises(ValueError, match=f"taken with {name} = "):
            trainer_run(small, out, resume=str(ckpt), seen=seen, **change)
        assert seen == [], f"{name}: refused before training"
    # The same settings resume; an old checkpoint without settings is refused.
    tail, _ = trainer_run(small, out, resume=str(ckpt), epochs=1)
    assert tail
    (ckpt / "rankfeed_state.json").write_text(json.dumps({"epoch": 0, "next": 3}))
    with pytest.raises(ValueError, match="holds no settings"):
        trainer_run(small, out, resume=str(ckpt))


def test_group_loss_matches_the_reference_formula():
    from rankfeed.hf import group_loss

    torch.manual_seed(0)
    scores, teacher = torch.randn(12), torch.randn(12)
    g = scores.view(3, 4)
    ce = torch.nn.functional.cross_entropy(g, torch.zeros(3, dtype=torch.long))
    kd = -torch.mean(torch.sum(torch.log_softmax(g, -1) * torch.softmax(teacher.view(3, 4), -1), -1))
    assert torch.allclose(group_loss(scores, 4), ce)
    assert torch.allclose(group_loss(scores, 4, teacher), ce + kd)


# --- observation 2: StatefulDataLoader with workers ----------------------------------------

def _resume_in_new_process(small, state_path, out_path, workers):
    code = f"""
import pickle, sys
sys.path.insert(0, {str(ROOT / 'tests' / 'python')!r})
from torchdata.stateful_dataloader import StatefulDataLoader
from rankfeed.torch import RankfeedIterable
data = RankfeedIterable({str(small)!r}, with_meta=True, **{KW!r})
dl = StatefulDataLoader(data, batch_size=None, num_workers={workers})
dl.load_state_dict(pickle.load(open({str(state_path)!r}, "rb")))
out = [(b["rows"].tolist(), b["pos"].tolist(), b["neg"].tolist()) for b in dl]
pickle.dump(out, open({str(out_path)!r}, "wb"))
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    return pickle.load(open(out_path, "rb"))


def test_stateful_dataloader_resumes_exactly_with_two_workers(small, tmp_path):
    sd = pytest.importorskip("torchdata.stateful_dataloader")
    data = RankfeedIterable(small, with_meta=True, **KW)
    full = rows_of(sd.StatefulDataLoader(data, batch_size=None, num_workers=2))
    assert len(full) == len(data)
    data = RankfeedIterable(small, with_meta=True, **KW)
    dl = sd.StatefulDataLoader(data, batch_size=None, num_workers=2)
    it = iter(dl)
    head = [next(it) for _ in range(7)]
    state = dl.state_dict()
    pickle.dump(state, open(tmp_path / "state.pkl", "wb"))
    del it, dl
    tail = _resume_in_new_process(small, tmp_path / "state.pkl", tmp_path / "out.pkl", 2)
    assert rows_of(head) + tail == full


def test_state_validation_is_strict(small):
    data = RankfeedIterable(small, **KW)
    good = data.state_dict()
    with pytest.raises(ValueError, match="missing keys \\['settings'\\]"):
        data.load_state_dict({"epoch": 0, "next": 5})
    with pytest.raises(ValueError, match="unknown keys \\['extra'\\]"):
        data.load_state_dict({**good, "extra": 1})
    other = RankfeedIterable(small, **{**KW, "group_size": 3}).state_dict()
    with pytest.raises(ValueError, match="group_size = 3"):
        data.load_state_dict(other)
    # Another batch size resumes elastically (the rest of the epoch, re-cut).
    data.load_state_dict(RankfeedIterable(small, **{**KW, "batch_size": 8}).state_dict())
    loader = rankfeed.Dataset(small).loader(**KW)
    with pytest.raises(ValueError, match='state_dict has no "dataset"'):
        loader.load_state_dict({"epoch": 0, "step": 5})
    state = loader.state_dict()
    with pytest.raises(ValueError, match='unknown key "bogus"'):
        loader.load_state_dict({**state, "bogus": 1})
    with pytest.raises(ValueError, match="group_size"):
        loader.load_state_dict({**state, "group_size": 2})


# --- observation 7: batches independent of the worker count ---------------------------------

def test_batches_are_the_same_with_any_number_of_workers(small):
    from torch.utils.data import DataLoader

    data = RankfeedIterable(small, with_meta=True, **KW)
    inproc = list(DataLoader(data, batch_size=None, num_workers=0))
    for workers in (1, 2, 3):
        data = RankfeedIterable(small, with_meta=True, **KW)
        got = list(DataLoader(data, batch_size=None, num_workers=workers))
        assert rows_of(got) == rows_of(inproc), workers
        assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(got, inproc))


def test_ranks_have_equal_batch_counts_and_cover_every_row(small):
    seen, counts = [], []
    for rank in range(3):
        data = RankfeedIterable(small, rank=rank, world_size=3, with_meta=True, **KW)
        batches = list(data)
        counts.append(len(batches))
        assert len(batches) == len(data)
        seen += [r for b in batches for r in b["rows"].tolist()]
    assert len(set(counts)) == 1
    assert set(seen) == set(range(len(rankfeed.Dataset(small))))


# --- observation 3: threads -------------------------------------------------------------------

def test_threads_never_deadlock(small):
    loader = rankfeed.Dataset(small).loader(prefetch_threads=1, **KW)
    stop, errors, reads = threading.Event(), [], [0]

    def reader():
        while not stop.is_set():
            try:
                loader.step, loader.epoch, len(loader), loader.rows_per_epoch
                loader.state_dict()
                reads[0] += 1
            except Exception as e:  # noqa: BLE001
                errors.append(e)

    def other_iterator():
        for _ in range(300):
            try:
                next(loader)
            except StopIteration:
                pass

    threads = [threading.Thread(target=reader) for _ in range(3)] + [threading.Thread(target=other_iterator)]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    n = 0
    while n < 10_000:
        for _ in loader:
            n += 1
            if n >= 10_000:
                break
    stop.set()
    for t in threads:
        t.join(timeout=30)
        assert not t.is_alive(), "a thread hung"
    assert time.monotonic() - t0 < 60
    assert not errors and reads[0] > 0


# --- observation 4: arguments -----------------------------------------------------------------

@pytest.mark.parametrize("arg,value,match", [
    ("pad_to_multiple_of", 2**40, "pad_to_multiple_of"),
    ("prefetch_depth", 2**40, "prefetch_depth"),
    ("passage_max_len", -1, "passage_max_len: must be non-negative"),
    ("batch_size", -4, "batch_size: must be non-negative"),
    ("batch_size", 0, "batch_size"),
    ("group_size", 2**70, "group_size: must be below 2\\*\\*64"),
    ("batch_size", 1.5, "batch_size: must be an integer"),
    ("batch_size", 100_000, "batch_size"),
    ("seed", -1, "seed: must be non-negative"),
    ("batch_size", "4", "batch_size: \"4\": invalid type: string"),
    ("no_such_option", 1, "unknown option \"no_such_option\""),
])
def test_bad_numbers_are_value_errors_naming_the_argument(small, arg, value, match):
    # Regression: 2**40 aborted the interpreter; -1 was an OverflowError.
    with pytest.raises(ValueError, match=match):
        rankfeed.Dataset(small).loader(**{**KW, arg: value})


def test_cli_refuses_huge_numbers(small, rankfeed_bin):
    p = subprocess.run([rankfeed_bin, "bench", small, "--pad-to-multiple-of", "1099511627776"],
                       capture_output=True, text=True)
    assert p.returncode == 1 and "pad_to_multiple_of" in p.stderr, p.stderr


# --- observation 5: callback exceptions ---------------------------------------------------------

def test_callback_exceptions_stop_the_conversion(tmp_path):
    calls = []

    def progress(*a):
        calls.append(a)
        raise KeyboardInterrupt

    many = tmp_path / "many.jsonl"
    with open(many, "w") as f:
        for _ in range(20):
            f.write(FIXTURE.read_text())
    t = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        rankfeed.convert(many, BERT, tmp_path / "out", progress=progress)
    assert len(calls) == 1 and time.monotonic() - t < 10
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if "rankfeed-tmp" in p.name]


# --- observation 6: numpy-only batches ----------------------------------------------------------

def test_batches_hold_only_numpy_arrays(small):
    batch = next(iter(rankfeed.Dataset(small).loader(**KW)))
    assert all(isinstance(v, np.ndarray) for v in batch.values()), {k: type(v) for k, v in batch.items()}
    tensors = {k: torch.from_numpy(v) for k, v in batch.items()}
    assert tensors["overlong"].shape == ()


# --- issue 12: padding-free packed batches ------------------------------------------------------

def test_packed_batches_give_the_padded_outputs(small):
    kw = dict(batch_size=2, group_size=4, query_max_len=16, passage_max_len=32, seed=5)
    ds = rankfeed.Dataset(small)
    padded = ds.loader(padding_side="right", **kw).batch(0, 3)
    packed = ds.loader(packed=True, **kw).batch(0, 3)
    assert all(isinstance(v, np.ndarray) for v in packed.values())
    # The packed ids are the padded batch's rows without their padding, exactly.
    mask = padded["attention_mask"].astype(bool)
    assert np.array_equal(packed["input_ids"], padded["input_ids"][mask])
    assert np.array_equal(packed["token_type_ids"], padded["token_type_ids"][mask])
    cu = packed["cu_seqlens"]
    assert cu.dtype == np.int32 and len(cu) == 2 * 4 + 1 and cu[0] == 0 and cu[-1] == mask.sum()
    assert int(packed["max_seqlen"]) == mask.sum(1).max()
    assert np.array_equal(packed["position_ids"], np.concatenate([np.arange(n) for n in mask.sum(1)]))
    # A tiny encoder on CPU: block-diagonal attention over the packed sequence gives each pair's
    # outputs of the padded batch.
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=128, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    t = {k: torch.from_numpy(v) for k, v in padded.items()}
    p = {k: torch.from_numpy(v) for k, v in packed.items()}
    n = int(cu[-1])
    block = torch.zeros(n, n, dtype=torch.long)
    for a, b in zip(cu[:-1], cu[1:]):
        block[a:b, a:b] = 1
    with torch.no_grad():
        out_pad = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"],
                        token_type_ids=t["token_type_ids"]).last_hidden_state
        out_pack = model(input_ids=p["input_ids"][None], attention_mask=block[None],
                         token_type_ids=p["token_type_ids"][None],
                         position_ids=p["position_ids"][None]).last_hidden_state[0]
    for r, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
        assert torch.allclose(out_pack[a:b], out_pad[r, :b - a], atol=1e-5), r


def test_packed_iterable_yields_tensors(small):
    data = RankfeedIterable(small, packed=True, **KW)
    batch = next(iter(data))
    assert batch["input_ids"].dim() == 1 and batch["cu_seqlens"].dtype == torch.int32
    assert "attention_mask" not in batch


def test_length_grouped_loader_from_python(small):
    ds = rankfeed.Dataset(small)
    kw = dict(KW, seed=3)
    random, grouped = ds.loader(**kw), ds.loader(length_grouped=5, **kw)
    assert len(random) == len(grouped)
    rows = lambda l: sorted(r for b in l for r in b["rows"].tolist())  # noqa: E731
    assert rows(grouped) == rows(random) == list(range(len(ds)))
    cells = lambda l: sum(b["input_ids"].size for b in l)  # noqa: E731
    assert cells(ds.loader(length_grouped=5, **kw)) < cells(ds.loader(**kw))
    assert grouped.state_dict()["length_grouped"] == 5
    with pytest.raises(ValueError, match="length_grouped"):
        ds.loader(length_grouped=0, **kw)


# --- issue 19: packed batches through the Trainer -------------------------------------------

def packed_trainer_losses(small, out, *, model, packed, steps, score_fn=None, **data_kw):
    """The loss of each of the first `steps` training steps of a RankfeedTrainer."""
    from rankfeed.hf import RankfeedTrainer
    losses = []

    class Recording(RankfeedTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            losses.append(float(loss))
            return loss

    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=steps, learning_rate=1e-3, report_to=[],
        save_strategy="no", logging_strategy="no", use_cpu=True, seed=1, disable_tqdm=True)
    data = RankfeedIterable(small, packed=packed, **{**KW, **data_kw})
    Recording(model=model, args=args, train_dataset=data, score_fn=score_fn).train()
    return losses


def tiny_llama():
    config = transformers.LlamaConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1,
                                      intermediate_size=32, max_position_embeddings=128)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def test_trainer_trains_packed_batches_as_padded_ones(small, tmp_path):
    # Regression (issue 19): RankfeedTrainer on packed batches raised TypeError (cu_seqlens)
    # for cross-encoders and IndexError for LLM rerankers with yes_token_score. Now each pair
    # is scored on its own: every step's loss equals the padded batches' (same model, same
    # groups), so the weights follow the same path.
    from rankfeed.hf import yes_token_score
    def bert_without_dropout():  # dropout draws other masks for other tensor shapes
        config = transformers.BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=32, num_labels=1,
                                         max_position_embeddings=128, hidden_dropout_prob=0.0,
                                         attention_probs_dropout_prob=0.0)
        torch.manual_seed(0)
        return transformers.BertForSequenceClassification(config)

    cases = [("encoder", bert_without_dropout, None), ("llm", tiny_llama, yes_token_score(9))]
    for mode, make, score_fn in cases:
        got = {packed: packed_trainer_losses(small, tmp_path / f"{mode}-{packed}", model=make(),
                                             packed=packed, steps=8, score_fn=score_fn, mode=mode)
               for packed in (False, True)}
        assert len(got[True]) == 8
        assert np.allclose(got[True], got[False], atol=1e-5), (mode, got)
        print(f"packed trainer ({mode}): 8 steps, losses equal the padded run's "
              f"(max diff {max(abs(a - b) for a, b in zip(got[True], got[False])):.1e})")


def test_trainer_packed_resume_is_exact(small, tmp_path):
    # 50 steps on packed batches, interrupted at 25 and resumed: the same batches.
    full, _ = trainer_run(small, tmp_path / "full", stop_at=50, packed=True)
    assert len(full) == 50
    out = tmp_path / "cut"
    head, _ = trainer_run(small, out, stop_at=25, save_steps=25, packed=True)
    tail, _ = trainer_run(small, out, stop_at=50, resume=str(out / "checkpoint-25"), packed=True)
    assert head + tail == full


def test_trainer_refuses_a_custom_score_fn_on_packed_batches(small, tmp_path):
    with pytest.raises(ValueError, match="custom score_fn does not apply to packed batches"):
        packed_trainer_losses(small, tmp_path / "x", model=tiny_bert(), packed=True, steps=1,
                              score_fn=lambda outputs, inputs: outputs.logits.reshape(-1))
