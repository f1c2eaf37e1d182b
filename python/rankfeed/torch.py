"""PyTorch adapter: an IterableDataset whose batches are the same whatever the number of
DataLoader workers, that advances its epoch by itself, and that checkpoints and resumes in O(1)
(torchdata's `StatefulDataLoader` protocol: `state_dict()` / `load_state_dict()`).

    from torch.utils.data import DataLoader
    from rankfeed.torch import RankfeedIterable

    data = RankfeedIterable("data/train", batch_size=4, group_size=16, mode="encoder")
    loader = DataLoader(data, batch_size=None, num_workers=0)   # rankfeed batches already
    for epoch in range(3):
        for batch in loader: ...                                # epoch e+1 after epoch e

torch is imported only when this module is.
"""

import torch
from torch.utils.data import IterableDataset, get_worker_info

from . import Dataset

_META = ("rows", "pos", "neg", "overlong")
_STATE_KEYS = ("epoch", "next", "settings")


class RankfeedIterable(IterableDataset):
    """Batches of one rank of a rankfeed dataset, as dicts of tensors made without a copy.

    Sharding: the rank's loader (shard `rank` of `world_size`, `shard_tail` as torch's
    DistributedSampler: "pad" by default, so every rank has the same number of batches) defines
    one sequence of batches per epoch. DataLoader workers split that sequence by batch index
    (worker w computes batches w, w+W, ...), and the DataLoader returns them in order: the
    batches, and their order, are the same with 0, 1 or N workers, and each is made once.

    Epochs: each full pass advances the epoch, so a plain loop over a DataLoader sees new
    orders and negatives every epoch; `set_epoch(e)` chooses one. With workers the pass happens
    in the workers' copies, so call `set_epoch` (or use `rankfeed.hf.RankfeedDataLoader`, which
    does) before each epoch.

    Resume: `state_dict()` / `load_state_dict()` hold (epoch, next batch) and the settings they
    are valid for; restoring is O(1) (no batch is computed again). torchdata's
    `StatefulDataLoader` calls them in each worker.

    rank and world_size default to torch.distributed's when it is initialized. Keyword
    arguments go to `Dataset.loader`; `with_meta=True` also yields the groups' rows, positive
    and negative indices (`rows`, `pos`, `neg`) and `overlong`."""

    def __init__(self, path, *, rank=None, world_size=None, shard_tail="pad", with_meta=False,
                 prefetch_threads=1, **loader_kwargs):
        super().__init__()
        self.path = str(path)
        self.rank, self.world_size = rank, world_size
        self.shard_tail = shard_tail
        self.with_meta = with_meta
        self.prefetch_threads = prefetch_threads
        self.loader_kwargs = loader_kwargs
        self.epoch = loader_kwargs.pop("epoch", 0)
        self._next = 0  # the next batch of `epoch` (in workers: minus the worker's index)
        self.shard(rank, world_size)

    def shard(self, rank, world_size):
        """Set rank and world size (None: torch.distributed's, else 0 of 1) and check the
        settings now (a ValueError here, not in a worker)."""
        self.rank, self.world_size = rank, world_size
        probe = self._loader(*self._rank())
        self._settings = {k: v for k, v in probe.state_dict().items() if k not in ("epoch", "step")}
        self._steps = {self.epoch: len(probe)}
        self.group_size = self._settings["group_size"]
        self.batch_size = self._settings["batch_size"]

    def _rank(self):
        rank, world = self.rank, self.world_size
        if rank is None or world is None:
            dist = torch.distributed
            if dist.is_available() and dist.is_initialized():
                rank = dist.get_rank() if rank is None else rank
                world = dist.get_world_size() if world is None else world
            else:
                rank, world = rank or 0, world or 1
        return rank, world

    def _loader(self, rank, world, prefetch_threads=0):
        return Dataset(self.path).loader(rank=rank, world_size=world, shard_tail=self.shard_tail,
                                         epoch=self.epoch, prefetch_threads=prefetch_threads,
                                         **self.loader_kwargs)

    def _len(self, epoch):
        """Batches of this rank in `epoch` (epoch-dependent only with max_tokens)."""
        if epoch not in self._steps:
            self._steps = {epoch: self._loader(*self._rank()).steps(epoch)}
        return self._steps[epoch]

    def __len__(self):
        """Batches of this rank in the current epoch (the same on every rank with shard_tail
        "pad", and in every epoch except with max_tokens)."""
        return self._len(self.epoch)

    def set_epoch(self, epoch):
        """Start epoch `epoch` from its first batch at the next iteration."""
        self.epoch, self._next = int(epoch), 0

    def state_dict(self):
        """The position (epoch, next batch) and the settings it is valid for."""
        return {"epoch": self.epoch, "next": self._next, "settings": dict(self._settings)}

    def load_state_dict(self, state):
        """Resume at `state` (from `state_dict()`); strict: missing or unknown keys, or other
        settings, are a ValueError naming them."""
        missing = [k for k in _STATE_KEYS if k not in state]
        unknown = [k for k in state if k not in _STATE_KEYS]
        if missing or unknown:
            raise ValueError(f"RankfeedIterable state: missing keys {missing}, unknown keys {unknown}")
        got = state["settings"]
        if set(got) != set(self._settings):
            raise ValueError(f"RankfeedIterable state: settings keys {sorted(got)} differ from "
                             f"{sorted(self._settings)}")
        for k, want in self._settings.items():
            if got[k] != want:
                raise ValueError(f"RankfeedIterable state was taken with {k} = {got[k]!r}, "
                                 f"this one has {want!r}")
        epoch, nxt = state["epoch"], state["next"]
        for name, v in (("epoch", epoch), ("next", nxt)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"RankfeedIterable state: {name} must be a non-negative int, got {v!r}")
        if nxt > self._len(epoch):
            raise ValueError(f"RankfeedIterable state: next {nxt} is beyond the "
                             f"{self._len(epoch)} batches of epoch {epoch}")
        self.epoch, self._next = epoch, nxt

    def _tensors(self, batch):
        # Embedder batches with sub_batch_size hold lists of arrays (one per chunk).
        def tensor(v):
            return [torch.from_numpy(x) for x in v] if isinstance(v, list) else torch.from_numpy(v)
        return {k: tensor(v) for k, v in batch.items() if self.with_meta or k not in _META}

    def __iter__(self):
        rank, world = self._rank()
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        if self._next >= self._len(self.epoch):
            self.epoch, self._next = self.epoch + 1, 0
        epoch = self.epoch
        steps = self._len(epoch)
        if workers == 1:
            loader = self._loader(rank, world, self.prefetch_threads)
            loader.load_state_dict({**loader.state_dict(), "epoch": epoch, "step": self._next})
            for batch in loader:
                self._next += 1
                yield self._tensors(batch)
        else:
            # Worker w: batches w, w+W, ... of the rank's sequence, computed directly (O(1)).
            loader = self._loader(rank, world, 0)
            # State: this worker resumes at `next + worker` (see load_state_dict).
            for k in range(self._next + worker, steps, workers):
                self._next = k + workers - worker
                yield self._tensors(loader.batch(epoch, k))
            self._next = steps
        # A full pass: the next iteration is the next epoch (unless set_epoch says otherwise).
        if self.epoch == epoch and self._next >= steps:
            self.epoch, self._next = epoch + 1, 0
