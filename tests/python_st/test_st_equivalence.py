"""rankfeed.st feeds sentence-transformers exactly what its own text pipeline builds: for the
same selection (rows, positive, negatives), every feature key and value equals what
sentence-transformers tokenizes from the texts (the model's tokenizer, max_seq_length,
longest_first pair truncation), and every supported loss on the first batch equals the loss
sentence-transformers computes from the texts (atol 1e-6), for a tiny random-weight BERT and
XLM-R built from configs.

A seeded generator over the input (random texts of 1-40 words, so pairs are cut in every way;
the WordNet sample) and options (batch and group sizes, max lengths from 8 to 512, seeds).
RANKFEED_LONG=<factor> runs more cases."""

import os
import random
import warnings

import pytest
import torch
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
from sentence_transformers.sentence_transformer import losses as bi_losses
from sentence_transformers.cross_encoder import CrossEncoder, CrossEncoderTrainer
from sentence_transformers.cross_encoder import losses as ce_losses
from sentence_transformers.cross_encoder.training_args import CrossEncoderTrainingArguments
from sentence_transformers.sentence_transformer.training_args import (
    SentenceTransformerTrainingArguments)

import rankfeed
from rankfeed import st
from rankfeed.torch import RankfeedIterable

from conftest import hf_tokenizer, random_rows, sample_rows, tiny_model_dir, write_jsonl

LONG = max(1, int(os.environ.get("RANKFEED_LONG", "1")))
CASES = 5 * LONG
FAMILIES = ["bert", "xlmr"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {f: tiny_model_dir(f, root / f) for f in FAMILIES}


def case_data(tmp_path, family, case):
    """(rows, dataset dir) of generator case `case`: the WordNet sample's first rows for case
    0, random texts otherwise."""
    rows = sample_rows(200) if case == 0 else random_rows(1000 + case, 60)
    src = write_jsonl(rows, tmp_path / f"rows-{family}-{case}.jsonl")
    out = tmp_path / f"ds-{family}-{case}"
    rankfeed.convert([src], str(hf_tokenizer(family)[1]), str(out), overwrite=True)
    return rows, str(out)


def selection(rows, batch, group):
    """[(query, passage)] texts of the batch's B*G pairs, and the teacher scores, from the
    JSON rows and the batch's rows / pos / neg."""
    pairs, scores = [], []
    for b, r in enumerate(batch["rows"].tolist()):
        row = rows[r]
        p = int(batch["pos"][b])
        pairs.append((row["query"], row["pos"][p]))
        scores.append(row["pos_scores"][p])
        for j in batch["neg"][b].tolist()[: group - 1]:
            pairs.append((row["query"], row["neg"][j]))
            scores.append(row["neg_scores"][j])
    return pairs, torch.tensor(scores, dtype=torch.float32)


def features_equal(got, want, what):
    assert set(got) == set(want), (what, sorted(got), sorted(want))
    for k in want:
        if isinstance(want[k], torch.Tensor):
            assert got[k].dtype == want[k].dtype, (what, k, got[k].dtype, want[k].dtype)
            assert torch.equal(got[k], want[k]), (what, k, got[k], want[k])
        else:
            assert got[k] == want[k], (what, k)


def ce_losses_for(model):
    return [
        st.GroupCrossEntropyLoss(model),
        ce_losses.BinaryCrossEntropyLoss(model),
        ce_losses.MSELoss(model),
        ce_losses.MarginMSELoss(model),
        ce_losses.ListNetLoss(model),
        ce_losses.PListMLELoss(model),
        ce_losses.LambdaLoss(model),
        ce_losses.RankNetLoss(model),
    ]


def ce_text_inputs(loss, pairs, teacher, batch_size, group):
    """What CrossEncoderTrainer's collator gives `loss` for a text dataset of these pairs in
    the loss's documented format: {column: texts} and the label column."""
    queries = [pairs[b * group][0] for b in range(batch_size)]
    docs = [[pairs[b * group + g][1] for g in range(group)] for b in range(batch_size)]
    relevance = torch.zeros(batch_size, group)
    relevance[:, 0] = 1
    grid = teacher.reshape(batch_size, group)
    fmt = st.LOSS_INPUTS[type(loss).__name__]
    name = type(loss).__name__
    if fmt == "columns":
        cols = {"query": queries, **{f"passage_{g}": [d[g] for d in docs] for g in range(group)}}
        label = grid if name in st.TEACHER_LOSSES or name == "GroupCrossEntropyLoss" else None
    elif fmt == "pairs":
        cols = {"query": [q for q, _ in pairs], "passage": [p for _, p in pairs]}
        label = (grid if name in st.TEACHER_LOSSES else relevance).reshape(-1)
    else:
        cols = {"query": queries, "docs": docs}
        label = list(grid)  # the batch carries teacher scores: lists train on them
    return cols, label


@pytest.mark.parametrize("family", FAMILIES)
def test_cross_encoder_features_and_losses_equal_sentence_transformers(tmp_path, models, family):
    checked = {"pairs": 0, "cut": 0, "losses": 0}
    tok = hf_tokenizer(family)[0]
    for case in range(CASES):
        rng = random.Random(case)
        rows, path = case_data(tmp_path, family, case)
        max_length = rng.choice([8, 12, 16, 24, 48, 512])
        group, batch_size = rng.randint(2, 5), rng.randint(1, 4)
        model = CrossEncoder(models[family], device="cpu")
        model.max_seq_length = max_length
        model.eval()
        data = RankfeedIterable(path, batch_size=batch_size, group_size=group, mode="encoder",
                                truncation="longest_first", query_max_len=max_length // 2,
                                passage_max_len=max_length - max_length // 2, seed=case,
                                knowledge_distillation=True, with_meta=True)
        batch = next(iter(data))
        pairs, teacher = selection(rows, batch, group)
        assert torch.allclose(batch["teacher_scores"], teacher)
        for q, p in pairs:
            full = len(tok(q, p)["input_ids"])
            checked["cut"] += full > max_length
        checked["pairs"] += len(pairs)
        features = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask",
                                                              "token_type_ids")}
        args = CrossEncoderTrainingArguments(output_dir=str(tmp_path / "out"), report_to=[],
                                             per_device_train_batch_size=batch_size)
        for loss in ce_losses_for(model):
            trainer = st.RankfeedCrossEncoderTrainer(model=model, args=args, train_dataset=data,
                                                     loss=loss)
            # Features: the whole batch, and each column (the pairs of passage g of each group).
            shim = st._Pretokenized(loss, features, group, trainer._extra_features())
            q = [st._Text("query", b) for b in range(batch_size)]
            ref = [st._Text("pair", r) for r in range(batch_size * group)]
            with shim:
                got = model.preprocess([(q[r // group], ref[r]) for r in range(len(ref))])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                features_equal(got, model.preprocess(pairs), (family, case, "batch"))
            for g in range(group):
                rows_g = [b * group + g for b in range(batch_size)]
                with shim:
                    got = model.preprocess([(q[r // group], ref[r]) for r in rows_g])
                features_equal(got, model.preprocess([pairs[r] for r in rows_g]),
                               (family, case, "column", g))
            # Loss: sentence-transformers' own path on the texts vs rankfeed's on the ids.
            cols, label = ce_text_inputs(loss, pairs, teacher, batch_size, group)
            text_inputs = dict(cols)
            if label is not None:
                text_inputs["label"] = label
            want = CrossEncoderTrainer.compute_loss(trainer, model, text_inputs)
            got = trainer.compute_loss(model, {k: v.clone() for k, v in batch.items()})
            assert torch.allclose(got, want, atol=1e-6, rtol=0), (
                family, case, type(loss).__name__, float(got), float(want))
            checked["losses"] += 1
    print(f"\ncross-encoder {family}: {checked['pairs']} pairs ({checked['cut']} cut by "
          f"longest_first) equal feature by feature; {checked['losses']} losses equal")
    assert checked["cut"] > 0 and checked["cut"] < checked["pairs"]


def bi_losses_for(model):
    return [
        bi_losses.MultipleNegativesRankingLoss(model),
        bi_losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=2),
        bi_losses.MarginMSELoss(model),
        bi_losses.DistillKLDivLoss(model),
    ]


@pytest.mark.parametrize("family", FAMILIES)
def test_bi_encoder_features_and_losses_equal_sentence_transformers(tmp_path, models, family):
    checked = {"texts": 0, "cut": 0, "losses": 0}
    tok = hf_tokenizer(family)[0]
    for case in range(CASES):
        rng = random.Random(100 + case)
        rows, path = case_data(tmp_path, family, case)
        max_length = rng.choice([6, 8, 12, 24, 512])
        group, batch_size = rng.randint(2, 5), rng.randint(1, 4)
        model = SentenceTransformer(models[family], device="cpu")
        model.max_seq_length = max_length
        model.eval()
        data = RankfeedIterable(path, batch_size=batch_size, group_size=group, mode="embedder",
                                query_max_len=max_length, passage_max_len=max_length,
                                seed=case, knowledge_distillation=True, with_meta=True)
        batch = next(iter(data))
        pairs, teacher = selection(rows, batch, group)
        names = ["anchor", "positive"] + [f"negative_{g}" for g in range(1, group)]
        examples = []
        for b in range(batch_size):
            ex = {"anchor": pairs[b * group][0]}
            for g in range(group):
                ex[names[g + 1]] = pairs[b * group + g][1]
            ex["label"] = teacher[b * group:(b + 1) * group].tolist()
            examples.append(ex)
        for ex in examples:
            for k in names:
                checked["texts"] += 1
                checked["cut"] += len(tok(ex[k])["input_ids"]) > max_length
        args = SentenceTransformerTrainingArguments(output_dir=str(tmp_path / "out"),
                                                    report_to=[],
                                                    per_device_train_batch_size=batch_size)
        for loss in bi_losses_for(model):
            trainer = st.RankfeedSentenceTransformerTrainer(model=model, args=args,
                                                            train_dataset=data, loss=loss)
            want_features = trainer.data_collator(examples)
            clean = {k: v.clone() for k, v in batch.items()
                     if k not in ("rows", "pos", "neg", "overlong", "no_in_batch_neg",
                                  "teacher_scores")}
            got_features = trainer.rankfeed_features(clean, batch["teacher_scores"].clone())
            features_equal({**got_features, "label": got_features["label"].float()},
                           {**want_features, "label": want_features["label"].float()},
                           (family, case))
            want = SentenceTransformerTrainer.compute_loss(trainer, model, dict(want_features))
            got = trainer.compute_loss(model, {k: v.clone() for k, v in batch.items()})
            assert torch.allclose(got, want, atol=1e-6, rtol=0), (
                family, case, type(loss).__name__, float(got), float(want))
            checked["losses"] += 1
    print(f"\nbi-encoder {family}: {checked['texts']} texts ({checked['cut']} cut) equal "
          f"feature by feature; {checked['losses']} losses equal")
    assert checked["cut"] > 0 and checked["cut"] < checked["texts"]


def test_pairs_outside_the_batch_and_unknown_losses_are_refused(tmp_path, models):
    rows, path = case_data(tmp_path, "bert", 1)
    model = CrossEncoder(models["bert"], device="cpu")
    model.max_seq_length = 32
    args = CrossEncoderTrainingArguments(output_dir=str(tmp_path / "out"), report_to=[],
                                         per_device_train_batch_size=3)
    trainer = st.RankfeedCrossEncoderTrainer(
        model=model, args=args, train_dataset=path, group_size=3,
        loss=ce_losses.MultipleNegativesRankingLoss(model))
    batch = next(iter(trainer.train_dataset))
    with pytest.raises(ValueError, match="in-batch negatives"):
        trainer.compute_loss(model, batch)

    class Custom(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

    with pytest.raises(ValueError, match="backward pass"):
        st.RankfeedCrossEncoderTrainer(model=model, args=args, train_dataset=path, group_size=3,
                                       loss=ce_losses.CachedMultipleNegativesRankingLoss(model))
    with pytest.raises(ValueError, match="loss_inputs"):
        st.RankfeedCrossEncoderTrainer(model=model, args=args, train_dataset=path,
                                       group_size=3, loss=Custom(model))
    with pytest.raises(ValueError, match="teacher scores"):
        trainer = st.RankfeedCrossEncoderTrainer(
            model=model, args=args, train_dataset=path, group_size=3,
            loader_options={"knowledge_distillation": False}, loss=ce_losses.MSELoss(model))
        trainer.compute_loss(model, next(iter(trainer.train_dataset)))
    for bad in ({"prompts": "query: "}, {"batch_sampler": "no_duplicates"}):
        a = CrossEncoderTrainingArguments(output_dir=str(tmp_path / "o2"), report_to=[], **bad)
        with pytest.raises(ValueError, match=next(iter(bad))):
            st.RankfeedCrossEncoderTrainer(model=model, args=a, train_dataset=path,
                                           loss=st.GroupCrossEntropyLoss(model))


def test_evaluate_on_a_text_eval_dataset_takes_sentence_transformers_path(tmp_path, models):
    # Regression: compute_loss took every batch for a rankfeed one, so evaluate() with a
    # datasets.Dataset eval set failed (KeyError) at the first evaluation.
    from datasets import Dataset
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    rows, path = case_data(tmp_path, "bert", 2)
    ce = CrossEncoder(models["bert"], device="cpu")
    ce.max_seq_length = 32
    evalset = Dataset.from_dict({"query": [r["query"] for r in rows[:6]],
                                 "passage": [r["pos"][0] for r in rows[:6]],
                                 "label": [1.0] * 6})
    args = CrossEncoderTrainingArguments(output_dir=str(tmp_path / "ce"), report_to=[],
                                         per_device_train_batch_size=2)
    trainer = st.RankfeedCrossEncoderTrainer(model=ce, args=args, train_dataset=path,
                                             group_size=2, eval_dataset=evalset,
                                             loss=ce_losses.BinaryCrossEntropyLoss(ce))
    assert trainer.evaluate()["eval_loss"] > 0
    bi = SentenceTransformer(models["bert"], device="cpu")
    evalset = Dataset.from_dict({"anchor": [r["query"] for r in rows[:6]],
                                 "positive": [r["pos"][0] for r in rows[:6]]})
    args = SentenceTransformerTrainingArguments(output_dir=str(tmp_path / "bi"), report_to=[],
                                                per_device_train_batch_size=2)
    trainer = st.RankfeedSentenceTransformerTrainer(model=bi, args=args, train_dataset=path,
                                                    group_size=2, eval_dataset=evalset,
                                                    loss=MultipleNegativesRankingLoss(bi))
    assert trainer.evaluate()["eval_loss"] > 0
