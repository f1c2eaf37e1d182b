"""Training runs of rankfeed.st's two trainers, shared by the tests, the torchrun worker and
tools/st_bench.py: a tiny random-weight BERT on a rankfeed dataset, recording what each step
trained on (rows, positive, negatives) and its loss."""

import json
import sys

import torch
import transformers

from rankfeed import st


def make_trainer(kind, model_dir, data, out, *, max_steps=50, save_steps=None, stop_at=None,
                 batch_size=8, group_size=4, seen=None, losses=None, loss=None, ga=1, **options):
    """A RankfeedCrossEncoderTrainer (kind "ce") or RankfeedSentenceTransformerTrainer ("bi")
    on `data` (a dataset path) writing checkpoints to `out`."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.cross_encoder import CrossEncoder
    from sentence_transformers.cross_encoder.training_args import CrossEncoderTrainingArguments
    from sentence_transformers.sentence_transformer import losses as bi_losses
    from sentence_transformers.sentence_transformer.training_args import (
        SentenceTransformerTrainingArguments)

    seen = [] if seen is None else seen
    losses = [] if losses is None else losses
    torch.manual_seed(0)
    common = dict(output_dir=str(out), max_steps=max_steps, learning_rate=3e-3 if kind == "ce" else 5e-4, report_to=[],
                  save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
                  logging_strategy="no", use_cpu=True, seed=1, dataloader_num_workers=0,
                  disable_tqdm=True, per_device_train_batch_size=batch_size, warmup_steps=0,
                  lr_scheduler_type="constant", gradient_accumulation_steps=ga)
    if kind == "ce":
        model = CrossEncoder(model_dir, device="cpu")
        model.max_seq_length = 96
        args = CrossEncoderTrainingArguments(**common)
        base = st.RankfeedCrossEncoderTrainer
        loss = loss or st.GroupCrossEntropyLoss(model)
    else:
        model = SentenceTransformer(model_dir, device="cpu")
        model.max_seq_length = 64
        args = SentenceTransformerTrainingArguments(**common)
        base = st.RankfeedSentenceTransformerTrainer
        loss = loss or bi_losses.MultipleNegativesRankingLoss(model)

    class Recording(base):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # What trained, and in which optimizer step (the Trainer's global_step before it).
            seen.append((inputs["rows"].tolist(), inputs["pos"].tolist(), inputs["neg"].tolist(),
                         self.state.global_step))
            value = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            losses.append(float((value[0] if return_outputs else value).detach()))
            return value

    class Stop(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if stop_at is not None and state.global_step >= stop_at:
                control.should_save = True
                control.should_training_stop = True

    trainer = Recording(model=model, args=args, train_dataset=str(data), group_size=group_size,
                        loss=loss, loader_options={"with_meta": True, **options},
                        callbacks=[Stop()])
    return trainer, seen, losses


def run(kind, model_dir, data, out, resume=None, **kw):
    trainer, seen, losses = make_trainer(kind, model_dir, data, out, **kw)
    trainer.train(resume_from_checkpoint=resume)
    return seen, losses


if __name__ == "__main__":
    # torchrun worker: python st_runs.py KIND MODEL_DIR DATA OUT RESULT_JSON STEPS
    kind, model_dir, data, out, result, steps = sys.argv[1:7]
    seen, losses = run(kind, model_dir, data, out, max_steps=int(steps))
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    with open(f"{result}.{rank}", "w") as f:
        json.dump({"rank": rank, "world": world, "seen": seen, "losses": losses}, f)
