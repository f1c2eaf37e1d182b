"""Hugging Face `transformers.Trainer` integration (transformers is optional: imported only
when this module is).

    from rankfeed.hf import RankfeedTrainer
    from rankfeed.torch import RankfeedIterable

    data = RankfeedIterable("data/train", batch_size=4, group_size=16, mode="encoder")
    trainer = RankfeedTrainer(model=model, args=training_args, train_dataset=data)
    trainer.train()                                   # or train(resume_from_checkpoint=True)

What it does for you:
- the epoch advances (`set_epoch` at every epoch: new order and negatives each epoch);
- exact resume in O(1): each checkpoint holds `rankfeed_state.json` (epoch, next batch, the
  epoch's cut `offset`, and every setting the batches depend on: the dataset's seal, seed,
  batch and group sizes, world size, ...); a resumed run starts there without iterating over
  consumed batches again (the Trainer's own batch skipping is turned off), and trains on
  exactly the batches an uninterrupted run would;
- elastic resume: a checkpoint taken on another number of processes and/or with another
  batch_size continues its epoch from the rows not yet trained on, re-striped over this run's
  ranks (default random order only), so every row of the epoch is trained once across
  1 -> N -> M process resumes; the run still ends at the end of its last epoch (or at
  max_steps). A resume under other settings (seed, group size, dataset, ..., or another world
  or batch size with length_grouped / max_tokens / same_source / no_duplicates) is a
  ValueError naming the setting, before training starts;
- DDP: rank and world size come from the Trainer (`args.process_index`, `args.world_size`),
  every rank has the same number of batches (shard_tail "pad"); the DataLoader is not handed
  to accelerate, which would re-shard it;
- `len(train_dataloader)` is the number of batches per epoch, so `num_train_epochs` works
  without `max_steps`;
- the group-wise loss of FlagEmbedding's rerankers on `[B, G]` scores (`group_loss`), with
  knowledge distillation when batches carry `teacher_scores`.
"""

import json
import math
import os

import torch
import transformers
from torch.utils.data import DataLoader
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from .torch import RankfeedIterable, _META

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
    """A DataLoader over a `RankfeedIterable` with `set_epoch` (which Trainer calls), a length
    (the batches its next pass yields), the position of the next batch (`state_dict`), an O(1)
    `resume(epoch, next, offset)` and `load_state_dict` (elastic, as
    `RankfeedIterable.load_state_dict`: another world_size and/or batch_size continues the
    epoch from the rows not yet trained on). It counts the batches it hands out in the main
    process, so its `state_dict()` is exact with any number of workers."""

    def __init__(self, dataset, num_workers=0, pin_memory=False):
        super().__init__(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                         persistent_workers=False)
        try:  # where the iterable's next pass starts (a state loaded into it included)
            self._epoch, self._next, self._offset = dataset._position()
        except RuntimeError:  # a pass of other workers in progress
            (self._epoch, self._offset), self._next = dataset._current(), 0
        self._resume = None
        # set_epoch(t) names rankfeed epoch t + shift (RankfeedTrainer sets it after a resume
        # whose Trainer epochs and rankfeed epochs differ, see RankfeedTrainer).
        self._epoch_shift = 0

    def set_epoch(self, epoch):
        """Start `epoch` (+ the shift) at its first batch, or where `resume` said when it is
        that epoch."""
        self._epoch, self._next, self._offset = int(epoch) + self._epoch_shift, 0, 0
        if self._resume is not None:
            r_epoch, r_next, r_offset = self._resume
            if r_epoch != self._epoch:
                raise RuntimeError(f"rankfeed: the checkpoint is at epoch {r_epoch}, but training "
                                   f"resumed at epoch {self._epoch}")
            self._next, self._offset, self._resume = r_next, r_offset, None

    def resume(self, epoch, nxt, offset=0):
        """Continue at batch `nxt` of `epoch` cut at `offset` (what `state_dict()` returned, on
        this world size and batch size): O(1). The next `set_epoch` must name that epoch
        (Trainer's does)."""
        epoch, nxt, offset = int(epoch), int(nxt), int(offset)
        if nxt >= self._steps(epoch, offset):
            epoch, nxt, offset = epoch + 1, 0, 0
        self._epoch, self._next, self._offset = epoch, nxt, offset
        self._resume = (epoch, nxt, offset)
        self.dataset._start_at(epoch, nxt, offset)  # its len() and epoch say so too

    def load_state_dict(self, state):
        """Resume at a `state_dict()` (taken on any world size and batch size: see
        `RankfeedIterable.load_state_dict`); returns "exact" or "elastic"."""
        ds, what = self.dataset, "RankfeedDataLoader state"
        epoch, nxt, offset, how = ds._resolve(*ds._parse(state, what), what)
        self.resume(epoch, nxt, offset)
        return how

    def _steps(self, epoch, offset):
        return self.dataset._steps(*self.dataset._rank(), epoch, offset)

    def __len__(self):
        return self._steps(self._epoch, self._offset) - self._next

    def state_dict(self):
        """The position (epoch, next batch, offset of the epoch's cut) and the settings it is
        valid for (those of `RankfeedIterable.state_dict()`)."""
        return {"epoch": self._epoch, "next": self._next, "offset": self._offset,
                "settings": self.dataset.settings()}

    def __iter__(self):
        ds = self.dataset
        # The pass starts where this loader is (the workers' copies read it at their start):
        # it counts the batches it hands out, so it continues exactly after a break.
        ds._start_at(self._epoch, self._next, self._offset)
        for batch in super().__iter__():
            self._next += 1
            yield batch
        if self._next >= self._steps(self._epoch, self._offset):
            self._epoch, self._next, self._offset = self._epoch + 1, 0, 0


class RankfeedTrainerMixin:
    """What every rankfeed-fed `transformers.Trainer` shares (RankfeedTrainer here, the
    sentence-transformers trainers of `rankfeed.st`): the train DataLoader over a
    `RankfeedIterable` sharded by the Trainer's rank, epoch advance, exact and elastic resume
    through `rankfeed_state.json` in each checkpoint, and the Trainer's step plan after an
    elastic resume. Put it before the Trainer class in the bases and call `_rankfeed_init()`
    once `train_dataset` is set."""

    def _rankfeed_init(self):
        if not isinstance(self.train_dataset, RankfeedIterable):
            raise TypeError(f"{type(self).__name__} needs train_dataset=RankfeedIterable(...)")
        self._rankfeed_resume = None
        self._rankfeed_global_step = None
        self._rankfeed_loader = None

    def _shard(self):
        data = self.train_dataset
        if data.rank is None or data.world_size is None:
            data.shard(self.args.process_index, self.args.world_size)
        return data

    def get_train_dataloader(self):
        data = self._shard()
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
        self._rankfeed_resume = self._rankfeed_global_step = None
        if resume_from_checkpoint:
            path = os.path.join(resume_from_checkpoint, STATE_FILE)
            if not os.path.isfile(path):
                raise ValueError(f"{resume_from_checkpoint} has no {STATE_FILE}: it was not "
                                 "written by RankfeedTrainer")
            with open(path) as f:
                state = json.load(f)
            *position, how = self._check_resume(state, path)
            if how == "elastic" and not hasattr(transformers.Trainer,
                                                "set_initial_training_values"):
                raise RuntimeError("rankfeed: resuming on another world size or batch size needs "
                                   "a transformers whose Trainer has set_initial_training_values")
            self._rankfeed_resume = tuple(position)
            trainer_state = os.path.join(resume_from_checkpoint, TRAINER_STATE_NAME)
            global_step = 0
            if os.path.isfile(trainer_state):
                with open(trainer_state) as f:
                    global_step = int(json.load(f).get("global_step", 0))
            self._rankfeed_global_step = global_step
            # rankfeed positions the data itself; the Trainer must not skip batches again.
            self.args.ignore_data_skip = True
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _check_resume(self, state, path):
        """(epoch, next, offset, how) where this rank continues a checkpoint's state, after
        checking that it was taken with this run's settings (but the rank: rank 0 writes it for
        every rank; and world_size / batch_size, which resume elastically)."""
        data = self._shard()
        what = f"rankfeed: the checkpoint {path}"
        if not isinstance(state, dict) or "settings" not in state:
            raise ValueError(f"{what} holds no settings (written by an older rankfeed), so "
                             "rankfeed cannot check that it resumes on the same batches")
        unknown = sorted(set(state) - {"epoch", "next", "offset", "settings"})
        if unknown:
            raise ValueError(f"{what} has unknown keys {unknown}")
        return data._resolve(*data._parse(state, what), what)

    def _rankfeed_plan(self, args):
        """(num_train_epochs, num_update_steps_per_epoch, max_steps, epoch shift) for the
        Trainer's loop after a resume at global step G: the Trainer starts at epoch
        G // num_update_steps_per_epoch and stops at max_steps, which after a resume on another
        world size or batch size are not what its own arithmetic gives."""
        loader = self._rankfeed_loader
        data = loader.dataset
        rank, world = data._rank()
        epoch, nxt, offset = loader._resume
        g = self._rankfeed_global_step
        ga = max(args.gradient_accumulation_steps, 1)

        def updates(batches):
            return -(-batches // ga)

        def whole(e):
            return updates(data._steps(rank, world, e, 0))

        first = updates(data._steps(rank, world, epoch, offset) - nxt)
        if args.max_steps > 0:
            max_steps, last, total = args.max_steps, epoch, g + first
            while total < max_steps and last - epoch < 64:
                last += 1
                total += whole(last)
            if total < max_steps:  # more epochs: steps vary by epoch only with max_tokens
                last += -(-(max_steps - total) // max(whole(last), 1)) + 1
        else:
            epochs = math.ceil(args.num_train_epochs)
            fraction = args.num_train_epochs - (epochs - 1)
            max_steps, last = g + (first if epoch < epochs else 0), epochs - 1
            for e in range(epoch + 1, epochs):
                n = whole(e)
                max_steps += n if e < epochs - 1 or fraction >= 1 else math.ceil(fraction * n)
        # The Trainer's epochs: epochs_trained = G // per_epoch, and (transformers 5) each epoch
        # runs at most per_epoch updates, so per_epoch covers the rest of the resumed epoch and
        # every whole epoch; `shift` then maps the Trainer's epoch numbers to rankfeed's.
        per_epoch = max([first, 1] + [whole(e) for e in range(epoch, min(last, epoch + 64) + 1)])
        shift = epoch - g // per_epoch
        return last - shift + 1, per_epoch, max_steps, shift

    def set_initial_training_values(self, args, dataloader, *rest):
        # transformers 4.x passes total_train_batch_size too; both return num_train_epochs,
        # num_update_steps_per_epoch first and max_steps last.
        values = list(super().set_initial_training_values(args, dataloader, *rest))
        loader = self._rankfeed_loader
        if (self._rankfeed_global_step is not None and loader is dataloader
                and loader._resume is not None):
            epochs, per_epoch, max_steps, shift = self._rankfeed_plan(args)
            values[0], values[1], values[-1] = epochs, per_epoch, max_steps
            loader._epoch_shift = shift
        return tuple(values)

    def _run_epoch(self, *args, **kwargs):
        """transformers 5 runs every epoch on the batch count and update count it computed
        once, before training (those of the first epoch's pass): give each epoch its own (the
        rest of a resumed epoch, or a whole epoch, whose length varies with max_tokens), so
        gradient accumulation syncs at each epoch's last batch."""
        loader = self._rankfeed_loader
        if loader is not None and "epoch" in kwargs and "steps_in_epoch" in kwargs:
            epoch = int(kwargs["epoch"]) + loader._epoch_shift
            if loader._resume is not None and loader._resume[0] == epoch:
                _, nxt, offset = loader._resume
                batches = loader._steps(epoch, offset) - nxt
            else:
                batches = loader._steps(epoch, 0)
            ga = max(self.args.gradient_accumulation_steps, 1)
            kwargs["steps_in_epoch"] = batches
            kwargs["num_update_steps_per_epoch"] = max(-(-batches // ga), 1)
        return super()._run_epoch(*args, **kwargs)

    def _save_checkpoint(self, model, trial, *args, **kwargs):
        super()._save_checkpoint(model, trial, *args, **kwargs)
        folder = os.path.join(self._get_output_dir(trial=trial),
                              f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self._rankfeed_loader is not None and self.args.should_save and os.path.isdir(folder):
            with open(os.path.join(folder, STATE_FILE), "w") as f:
                json.dump(self._rankfeed_loader.state_dict(), f)

class RankfeedTrainer(RankfeedTrainerMixin, transformers.Trainer):
    """`transformers.Trainer` trained on a `RankfeedIterable` (`train_dataset`).

    `score_fn(model_outputs, inputs) -> [B*G]` scores: by default `outputs.logits` flattened
    (a sequence-classification head with one label, as cross-encoders); for an LLM reranker
    pass e.g. `yes_token_score(yes_id)` (the logit of "Yes" at the last position: left padding).

    Elastic resume: a checkpoint taken on another number of processes and/or with another
    batch_size continues its epoch from the rows not yet trained on (default random order; see
    `RankfeedIterable`). The Trainer's step count goes on from the checkpoint's `global_step`;
    rankfeed tells the Trainer how many update steps are left (the rest of the resumed epoch at
    this world size, then whole epochs up to `num_train_epochs`, or up to `max_steps`), so that
    the run ends at the end of the last epoch, and which of its epochs is the resumed one
    (`set_epoch` then names rankfeed's epochs; the Trainer's fractional `state.epoch` may differ
    from rankfeed's epoch after such a resume). Limitation: the learning-rate schedule is made
    again for the resumed run's total steps (its step count goes on from the checkpoint's)."""

    def __init__(self, *args, score_fn=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._rankfeed_init()
        self._custom_score_fn = score_fn is not None
        self.score_fn = score_fn or (lambda outputs, inputs: outputs.logits.reshape(-1))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        for k in _META:
            inputs.pop(k, None)
        teacher = inputs.pop("teacher_scores", None)
        if "cu_seqlens" in inputs:
            outputs, scores = None, self._packed_scores(model, inputs)
        else:
            outputs = model(**inputs)
            scores = self.score_fn(outputs, inputs)
        loss = group_loss(scores, self.train_dataset.group_size, teacher)
        return (loss, outputs) if return_outputs else loss

    def _packed_scores(self, model, inputs):
        """Packed batches (`packed=True`): each pair scored on its own through
        `rankfeed.packing` (block-diagonal attention, per-family positions, the score at each
        pair's first or last token). A model it does not know is a ValueError there."""
        from . import packing
        if self.args.world_size > 1:
            raise ValueError(
                "rankfeed: packed batches under DDP are not supported by RankfeedTrainer yet "
                "(rankfeed.packing runs the model's base and head separately, outside DDP's "
                "forward): use padded batches (length_grouped=M recovers most of the padding)")
        yes_id = getattr(self.score_fn, "yes_id", None)
        if self._custom_score_fn and yes_id is None:
            raise ValueError(
                "rankfeed: a custom score_fn does not apply to packed batches (their pairs are "
                "scored one by one by rankfeed.packing): pass score_fn=yes_token_score(yes_id) "
                "for LLM rerankers, nothing for cross-encoders, or use padded batches")
        return packing.packed_scores(model, inputs, yes_id=yes_id)


def yes_token_score(yes_id):
    """`score_fn` for LLM rerankers: the logit of the "Yes" token at the last position (left
    padding; with packed batches, at each pair's last token)."""
    def score(outputs, inputs):
        return outputs.logits[:, -1, yes_id]
    score.yes_id = yes_id
    return score
