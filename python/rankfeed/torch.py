"""PyTorch adapter: an IterableDataset whose batches are the same whatever the number of
DataLoader workers, that advances its epoch by itself, and that checkpoints and resumes in O(1)
(torchdata's `StatefulDataLoader` protocol: `state_dict()` / `load_state_dict()`).

    from torch.utils.data import DataLoader
    from rankfeed.torch import RankfeedIterable

    data = RankfeedIterable("data/train", batch_size=4, group_size=16, mode="encoder")
    loader = DataLoader(data, batch_size=None, num_workers=0)   # rankfeed batches already
    for epoch in range(3):
        for batch in loader: ...                                # epoch e+1 after epoch e

Passes and epochs: each pass over the iterable (each `iter(DataLoader)`, each `for` loop) is
one epoch, and the next pass is the next epoch, with 0, 1 or N workers, with a plain DataLoader
or a `StatefulDataLoader`. A `break` ends its pass: the next loop starts the next epoch (the
rest of the interrupted epoch is not trained on). That is the only rule that can hold with
workers: a DataLoader hands batches out in the main process without calling the dataset, so
no copy of it can know how far the consumer got (a worker's batches are computed ahead). To
continue an interrupted epoch exactly, `load_state_dict(state)` (or a StatefulDataLoader's)
before the next loop; `set_epoch(e)` starts the next pass at epoch e.

Where each pass starts is kept in a small locked file that the iterable and its copies in the
workers share (any start method: fork, spawn, forkserver); a pass's workers recognise each
other by the DataLoader iterator's base seed. The file is removed with the iterable.

torch is imported only when this module is.
"""

import fcntl
import json
import os
import tempfile
import uuid
import weakref
from contextlib import contextmanager

import torch
from torch.utils.data import IterableDataset, get_worker_info

from . import Dataset

_META = ("rows", "pos", "neg", "overlong")
_STATE_KEYS = ("epoch", "next", "settings")
# Loader state keys that are a position, not a setting.
_POSITION = ("epoch", "step")


def _remove(path, pid):
    if os.getpid() == pid:
        try:
            os.unlink(path)
        except OSError:
            pass


def _described(v):
    return f"{v!r} ({type(v).__name__})"


def _same(a, b):
    """Equal in value and type (2, 2.0, "2" and True all differ), as JSON tells them apart."""
    try:
        return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    except (TypeError, ValueError):
        return False


def check_settings(got, want, what, ignore=()):
    """Raise a ValueError naming the first setting of `got` (a state's) that differs from
    `want` (this run's), in value or type, or a key only one of them has."""
    if not isinstance(got, dict):
        raise ValueError(f"{what}: settings must be a dict, got {_described(got)}")
    keys = [k for k in want if k not in ignore]
    missing = [k for k in keys if k not in got]
    unknown = [k for k in got if k not in want and k not in ignore]
    if missing or unknown:
        raise ValueError(f"{what}: settings lack {missing} and have unknown {unknown}")
    for k in keys:
        if not _same(got[k], want[k]):
            raise ValueError(f"{what} was taken with {k} = {_described(got[k])}, "
                             f"this one has {_described(want[k])}")


class _Passes:
    """Where passes start, shared by an iterable and its copies (see the module docs).

    The file holds `start` (where the next pass starts when `fresh`: set by the constructor,
    `set_epoch` and `load_state_dict`) and the last passes, each with the id its workers share,
    its epoch, the workers that joined it and those that finished it. A new pass starts at
    `start` when fresh, else at the epoch after the last pass."""

    HISTORY = 64

    def __init__(self, epoch, nxt):
        fd, self.path = tempfile.mkstemp(prefix="rankfeed-passes-", suffix=".json")
        os.close(fd)
        self._state = {"start": [epoch, nxt], "fresh": True, "passes": []}
        with self._locked():
            pass
        weakref.finalize(self, _remove, self.path, os.getpid())

    def __getstate__(self):
        return {"path": self.path, "_state": self._state}

    @contextmanager
    def _locked(self):
        """The state under an exclusive lock, written back afterwards. A missing file (a copy
        on another machine) starts again from the last state this copy saw."""
        with open(self.path, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.seek(0)
            text = f.read()
            if text:
                self._state = json.loads(text)
            before = json.dumps(self._state)
            yield self._state
            after = json.dumps(self._state)
            if after != before or not text:
                f.seek(0)
                f.truncate()
                f.write(after)
                f.flush()

    def read(self):
        with self._locked() as s:
            return json.loads(json.dumps(s))

    def set(self, epoch, nxt):
        with self._locked() as s:
            s["start"], s["fresh"] = [epoch, nxt], True

    def open(self, ident, worker, workers, explicit=None):
        """The (epoch, next) a pass starts at, for worker `worker` of `workers` of the pass
        `ident`: joins the pass when another of its workers opened it. `explicit`: this copy's
        own position (restored in a worker by a StatefulDataLoader), recorded as such."""
        with self._locked() as s:
            for p in reversed(s["passes"]):
                if p["id"] == ident and worker not in p["joined"]:
                    p["joined"].append(worker)
                    return tuple(explicit) if explicit else (p["epoch"], p["start"])
            if explicit:
                epoch, start = explicit
            elif s["fresh"] or not s["passes"]:
                epoch, start = s["start"]
            else:
                epoch, start = s["passes"][-1]["epoch"] + 1, 0
            s["fresh"] = False
            s["passes"].append({"id": ident, "epoch": epoch, "start": start, "joined": [worker],
                                "done": [], "workers": workers, "pid": os.getpid()})
            del s["passes"][:-self.HISTORY]
            return epoch, start

    def done(self, ident, worker):
        with self._locked() as s:
            for p in reversed(s["passes"]):
                if p["id"] == ident and worker in p["joined"] and worker not in p["done"]:
                    p["done"].append(worker)
                    return


def _complete(p):
    return len(p["done"]) >= p["workers"]


class RankfeedIterable(IterableDataset):
    """Batches of one rank of a rankfeed dataset, as dicts of tensors made without a copy.

    Sharding: the rank's loader (shard `rank` of `world_size`, `shard_tail` as torch's
    DistributedSampler: "pad" by default, so every rank has the same number of batches) defines
    one sequence of batches per epoch. DataLoader workers split that sequence by batch index
    (worker w computes batches w, w+W, ...), and the DataLoader returns them in order: the
    batches, and their order, are the same with 0, 1 or N workers, and each is made once.

    Epochs: each pass is the next epoch (see the module docs: a `break` ends the pass, with any
    number of workers); `set_epoch(e)` starts the next pass at epoch e. `epoch` is the epoch of
    the pass in progress, or of the next one once a pass is complete.

    Resume: `state_dict()` / `load_state_dict()` hold (epoch, next batch) and the settings they
    are valid for; restoring is O(1) (no batch is computed again). torchdata's
    `StatefulDataLoader` calls them in each worker. In the main process, `state_dict()` during
    a pass run by DataLoader workers raises: the position is in the workers (take the
    StatefulDataLoader's state_dict instead).

    rank and world_size default to torch.distributed's when it is initialized, read each time
    they are needed (a pass, `len()`, `state_dict()`), so an iterable made before
    `init_process_group` shards by the group's. Keyword arguments go to `Dataset.loader`;
    `with_meta=True` also yields the groups' rows, positive and negative indices (`rows`,
    `pos`, `neg`) and `overlong`."""

    def __init__(self, path, *, rank=None, world_size=None, shard_tail="pad", with_meta=False,
                 prefetch_threads=1, **loader_kwargs):
        super().__init__()
        self.path = str(path)
        self.shard_tail = shard_tail
        self.with_meta = with_meta
        self.prefetch_threads = prefetch_threads
        self.loader_kwargs = loader_kwargs
        epoch = loader_kwargs.pop("epoch", 0)
        self._probes = {}    # (rank, world) -> a Loader that counts batches (not pickled)
        self._facts = {}     # (rank, world) -> {"settings": ..., "steps": {epoch: n}}
        self._pos = None     # [epoch, next] of the last pass run by this copy
        self._ident = None   # that pass's id
        self._loaded = None  # in a worker: the position load_state_dict gave this copy
        self._count = 0      # passes this copy opened (with the base seed: a pass's id)
        self._passes = _Passes(int(epoch), 0)
        self.shard(rank, world_size)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_probes"] = {}
        return state

    def shard(self, rank, world_size):
        """Set rank and world size (None: torch.distributed's when it is initialized, else 0 of
        1) and check the settings now (a ValueError here, not in a worker)."""
        self.rank, self.world_size = rank, world_size
        settings = self.settings()
        self.group_size = settings["group_size"]
        self.batch_size = settings["batch_size"]

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

    def _loader(self, rank, world, epoch, prefetch_threads=0):
        return Dataset(self.path).loader(rank=rank, world_size=world, shard_tail=self.shard_tail,
                                         epoch=epoch, prefetch_threads=prefetch_threads,
                                         **self.loader_kwargs)

    def _fact(self, rank, world):
        key = (rank, world)
        if key not in self._facts:
            probe = self._loader(rank, world, 0)
            self._probes[key] = probe
            settings = {k: v for k, v in probe.state_dict().items() if k not in _POSITION}
            self._facts[key] = {"settings": settings, "steps": {0: len(probe)}}
        return self._facts[key]

    def settings(self):
        """The settings a state of this iterable is valid for, at the current rank and world
        size (those of `Dataset.loader(...).state_dict()`)."""
        return dict(self._fact(*self._rank())["settings"])

    def _steps(self, rank, world, epoch):
        fact = self._fact(rank, world)
        if epoch not in fact["steps"]:
            probe = self._probes.get((rank, world)) or self._loader(rank, world, 0)
            self._probes[(rank, world)] = probe
            fact["steps"] = {**fact["steps"], epoch: probe.steps(epoch)}
        return fact["steps"][epoch]

    def steps(self, epoch):
        """Batches of this rank in `epoch` (epoch-dependent only with max_tokens)."""
        return self._steps(*self._rank(), int(epoch))

    @property
    def epoch(self):
        """The epoch of the pass in progress, or of the next pass."""
        s = self._passes.read()
        if s["fresh"] or not s["passes"]:
            return s["start"][0]
        last = s["passes"][-1]
        return last["epoch"] + 1 if _complete(last) else last["epoch"]

    def __len__(self):
        """Batches of this rank in `epoch` (the same on every rank with shard_tail "pad", and
        in every epoch except with max_tokens)."""
        return self.steps(self.epoch)

    def set_epoch(self, epoch):
        """Start the next pass at the first batch of `epoch`."""
        self._start_at(int(epoch), 0)

    def _start_at(self, epoch, nxt):
        self._loaded = None
        self._passes.set(epoch, nxt)

    def _position(self):
        """(epoch, next) for `state_dict`: this copy's pass when it is the last one (always in
        a worker), else where the next pass starts."""
        if get_worker_info() is not None:
            return self._pos if self._pos is not None else self._passes.read()["start"]
        s = self._passes.read()
        if s["fresh"] or not s["passes"]:
            return s["start"]
        last = s["passes"][-1]
        if _complete(last):
            return [last["epoch"] + 1, 0]
        if self._pos is not None and last["id"] == self._ident and last["pid"] == os.getpid():
            return self._pos
        raise RuntimeError(
            "RankfeedIterable.state_dict(): the pass in progress runs in DataLoader workers, "
            "which hold its position; take the StatefulDataLoader's state_dict() (or use "
            "num_workers=0)")

    def state_dict(self):
        """The position (epoch, next batch) and the settings it is valid for."""
        epoch, nxt = self._position()
        return {"epoch": epoch, "next": nxt, "settings": self.settings()}

    def load_state_dict(self, state):
        """Resume at `state` (from `state_dict()`) at the next pass; strict: missing or
        unknown keys, or other settings (in value or type), are a ValueError naming them."""
        if not isinstance(state, dict):
            raise ValueError(f"RankfeedIterable state must be a dict, got {_described(state)}")
        missing = [k for k in _STATE_KEYS if k not in state]
        unknown = [k for k in state if k not in _STATE_KEYS]
        if missing or unknown:
            raise ValueError(f"RankfeedIterable state: missing keys {missing}, unknown keys {unknown}")
        check_settings(state["settings"], self.settings(), "RankfeedIterable state")
        epoch, nxt = state["epoch"], state["next"]
        for name, v in (("epoch", epoch), ("next", nxt)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"RankfeedIterable state: {name} must be a non-negative int, "
                                 f"got {_described(v)}")
        info = get_worker_info()
        if info is not None:
            # A StatefulDataLoader restoring this worker: its own position, for its next pass.
            self._loaded = (epoch, nxt)
            self._pos = [epoch, nxt]
            return
        steps = self.steps(epoch)
        if nxt > steps:
            raise ValueError(f"RankfeedIterable state: next {nxt} is beyond the "
                             f"{steps} batches of epoch {epoch}")
        self._start_at(*((epoch + 1, 0) if nxt == steps else (epoch, nxt)))

    def _tensors(self, batch):
        # Embedder batches with sub_batch_size hold lists of arrays (one per chunk).
        def tensor(v):
            return [torch.from_numpy(x) for x in v] if isinstance(v, list) else torch.from_numpy(v)
        return {k: tensor(v) for k, v in batch.items() if self.with_meta or k not in _META}

    def __iter__(self):
        # Not a generator: the pass opens now, when the DataLoader makes its iterator (in the
        # main process without workers, in each worker at its start), consumed or not.
        rank, world = self._rank()
        info = get_worker_info()
        self._count += 1
        if info is None:
            workers, worker, ident = 1, 0, uuid.uuid4().hex
        else:
            # Every worker of one DataLoader iterator has seed base + id, and has opened as
            # many passes as the others.
            workers, worker, ident = info.num_workers, info.id, [info.seed - info.id, self._count]
        loaded, self._loaded = self._loaded, None
        epoch, start = self._passes.open(ident, worker, workers, explicit=loaded)
        self._pos, self._ident = [epoch, start], ident
        return self._batches(rank, world, epoch, start, workers, worker, ident)

    def _batches(self, rank, world, epoch, start, workers, worker, ident):
        steps = self._steps(rank, world, epoch)
        if workers == 1:
            loader = self._loader(rank, world, epoch, self.prefetch_threads)
            loader.load_state_dict({**loader.state_dict(), "epoch": epoch,
                                    "step": min(start, steps)})
            for k, batch in enumerate(loader, start + 1):
                self._pos = [epoch, k]
                yield self._tensors(batch)
        else:
            # Worker w: batches w, w+W, ... of the rank's sequence, computed directly (O(1)).
            # State: this worker resumes at `next + worker` (see load_state_dict).
            loader = self._loader(rank, world, epoch, 0)
            for k in range(start + worker, steps, workers):
                self._pos = [epoch, k + workers - worker]
                yield self._tensors(loader.batch(epoch, k))
            self._pos = [epoch, steps]
        self._passes.done(ident, worker)
