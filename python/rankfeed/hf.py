"""Hugging Face `transformers.Trainer` integration (transformers is optional: imported only
when this module is).

    from rankfeed.hf import RankfeedTrainer
    from rankfeed.torch import RankfeedIterable

    data = RankfeedIterable("data/train", batch_size=4, group_size=16, mode="encoder")
    trainer = RankfeedTrainer(model=model, args=training_args, train_dataset=data)
    trainer.train()                                   # or train(resume_from_checkpoint=True)

What it does for you:
- the epoch advances (`set_epoch` at every epoch: new order and negatives each epoch);
- exact resume in O(1): each checkpoint holds `rankfeed_state.json` (epoch, next batch, and
  every setting the batches depend on: the dataset's seal, seed, batch and group sizes,
  world size, ...); a resumed run starts there without iterating over consumed batches again
  (the Trainer's own batch skipping is turned off), and trains on exactly the batches an
  uninterrupted run would. A resume under other settings (another world size, seed, batch
  size, dataset, ...) is a ValueError naming the setting, before training starts;
- DDP: rank and world size come from the Trainer (`args.process_index`, `args.world_size`),
  every rank has the same number of batches (shard_tail "pad"); the DataLoader is not handed
  to accelerate, which would re-shard it;
- `len(train_dataloader)` is the number of batches per epoch, so `num_train_epochs` works
  without `max_steps`;
- the group-wise loss of FlagEmbedding's rerankers on `[B, G]` scores (`group_loss`), with
  knowledge distillation when batches carry `teacher_scores`.
"""

import json
import os

import torch
import transformers
from torch.utils.data import DataLoader
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from .torch import RankfeedIterable, _META, check_settings

STATE_FILE = "rankfeed_state.json"


def group_loss(scores, group_size, teacher_scores=None):
    """FlagEmbedding's reranker loss on scores of `B*G` pairs (row b*G+g; g = 0 the positive):
    cross-entropy with the positive as the target over each group, plus, with teacher scores,
    `-mean(sum(log_softmax(student) * softmax(teacher)))` over each group."""
    grouped = scores.reshape(-1, group_size).float()
    target = torch.zeros(grouped.shape[0], dtype=torch.long, device=grouped.device)
    loss = torch.nn.functional.cross_entropy(grouped, target)
    if teacher_scores is not None:
        teacher = torch.softmax(teacher_scores.reshape(-1, group_size).float().detach(), dim=-1)
        student = torch.log_softmax(grouped, dim=-1)
        loss = loss - torch.mean(torch.sum(student * teacher, dim=-1))
    return loss


class RankfeedDataLoader(DataLoader):
    """A DataLoader over a `RankfeedIterable` with `set_epoch` (which Trainer calls), a length,
    the position of the next batch (`state_dict`) and an O(1) `resume(epoch, next)`."""

    def __init__(self, dataset, num_workers=0, pin_memory=False):
        super().__init__(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                         persistent_workers=False)
        self._epoch, self._next = dataset.epoch, 0
        self._resume = None

    def set_epoch(self, epoch):
        """Start `epoch` at its first batch, or where `resume` said when it is that epoch."""
        self._epoch, self._next = int(epoch), 0
        if self._resume is not None:
            r_epoch, r_next = self._resume
            if r_epoch != self._epoch:
                raise RuntimeError(f"rankfeed: the checkpoint is at epoch {r_epoch}, but training "
                                   f"resumed at epoch {self._epoch}")
            self._next, self._resume = r_next, None

    def resume(self, epoch, nxt):
        """Continue at batch `nxt` of `epoch` (what `state_dict()` returned): O(1). The next
        `set_epoch` must name that epoch (Trainer's does)."""
        epoch, nxt = int(epoch), int(nxt)
        if nxt >= self.dataset.steps(epoch):
            epoch, nxt = epoch + 1, 0
        self._epoch, self._next = epoch, nxt
        self._resume = (epoch, nxt)

    def __len__(self):
        return self.dataset.steps(self._epoch)

    def state_dict(self):
        """The position (epoch, next batch) and the settings it is valid for (those of
        `RankfeedIterable.state_dict()`)."""
        return {"epoch": self._epoch, "next": self._next, "settings": self.dataset.settings()}

    def __iter__(self):
        ds = self.dataset
        # The pass starts where this loader is (the workers' copies read it at their start):
        # it counts the batches it hands out, so it continues exactly after a break.
        ds._start_at(self._epoch, self._next)
        for batch in super().__iter__():
            self._next += 1
            yield batch
        if self._next >= ds.steps(self._epoch):
            self._epoch, self._next = self._epoch + 1, 0


class RankfeedTrainer(transformers.Trainer):
    """`transformers.Trainer` trained on a `RankfeedIterable` (`train_dataset`).

    `score_fn(model_outputs, inputs) -> [B*G]` scores: by default `outputs.logits` flattened
    (a sequence-classification head with one label, as cross-encoders); for an LLM reranker
    pass e.g. `yes_token_score(yes_id)` (the logit of "Yes" at the last position: left padding)."""

    def __init__(self, *args, score_fn=None, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.train_dataset, RankfeedIterable):
            raise TypeError("RankfeedTrainer needs train_dataset=RankfeedIterable(...)")
        self.score_fn = score_fn or (lambda outputs, inputs: outputs.logits.reshape(-1))
        self._rankfeed_resume = None
        self._rankfeed_loader = None

    def get_train_dataloader(self):
        data = self.train_dataset
        if data.rank is None or data.world_size is None:
            data.shard(self.args.process_index, self.args.world_size)
        loader = RankfeedDataLoader(data, num_workers=self.args.dataloader_num_workers,
                                    pin_memory=self.args.dataloader_pin_memory)
        if self._rankfeed_resume is not None:
            loader.resume(*self._rankfeed_resume)
        self._rankfeed_loader = loader
        return loader

    def train(self, resume_from_checkpoint=None, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no checkpoint found in {self.args.output_dir}")
        self._rankfeed_resume = None
        if resume_from_checkpoint:
            path = os.path.join(resume_from_checkpoint, STATE_FILE)
            if not os.path.isfile(path):
                raise ValueError(f"{resume_from_checkpoint} has no {STATE_FILE}: it was not "
                                 "written by RankfeedTrainer")
            with open(path) as f:
                state = json.load(f)
            self._rankfeed_resume = self._check_resume(state, path)
            # rankfeed positions the data itself; the Trainer must not skip batches again.
            self.args.ignore_data_skip = True
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _check_resume(self, state, path):
        """(epoch, next) of a checkpoint's state, after checking that it was taken with this
        run's settings (all but the rank: rank 0 writes it for every rank)."""
        data = self.train_dataset
        if data.rank is None or data.world_size is None:
            data.shard(self.args.process_index, self.args.world_size)
        what = f"rankfeed: the checkpoint {path}"
        if not isinstance(state, dict) or "settings" not in state:
            raise ValueError(f"{what} holds no settings (written by an older rankfeed), so "
                             "rankfeed cannot check that it resumes on the same batches")
        unknown = sorted(set(state) - {"epoch", "next", "settings"})
        if unknown:
            raise ValueError(f"{what} has unknown keys {unknown}")
        check_settings(state["settings"], data.settings(), what, ignore=("rank",))
        epoch, nxt = state.get("epoch"), state.get("next")
        for name, v in (("epoch", epoch), ("next", nxt)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{what}: {name} must be a non-negative int, got {v!r}")
        return epoch, nxt

    def _save_checkpoint(self, model, trial, *args, **kwargs):
        super()._save_checkpoint(model, trial, *args, **kwargs)
        folder = os.path.join(self._get_output_dir(trial=trial),
                              f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self._rankfeed_loader is not None and self.args.should_save and os.path.isdir(folder):
            with open(os.path.join(folder, STATE_FILE), "w") as f:
                json.dump(self._rankfeed_loader.state_dict(), f)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        for k in _META:
            inputs.pop(k, None)
        teacher = inputs.pop("teacher_scores", None)
        outputs = model(**inputs)
        scores = self.score_fn(outputs, inputs)
        loss = group_loss(scores, self.train_dataset.group_size, teacher)
        return (loss, outputs) if return_outputs else loss


def yes_token_score(yes_id):
    """`score_fn` for LLM rerankers: the logit of the "Yes" token at the last position."""
    return lambda outputs, inputs: outputs.logits[:, -1, yes_id]
