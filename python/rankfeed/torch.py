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

Elastic resume: a state taken with another world_size and/or batch_size continues the epoch
from the rows not yet trained on, when the batches are in the default (random) order (no
length_grouped, max_tokens, same_source or no_duplicates): the epoch's global order is cut
after the positions the earlier run consumed (every rank's batches so far), and the rest is sharded over this run's
ranks and cut into this run's batches (`Loader.load_state_dict` decides; the state's `offset`
is that cut). So every row of an epoch is trained once across 1 -> N -> M process resumes
(padding or dropping only at the end of the epoch, by shard_tail). Any other differing setting
(seed, dataset, group_size, a strategy, ...) is a ValueError naming it, and so is another
world_size or batch_size with the other strategies.

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
from ._rankfeed import _LOADER_POSITION

_META = ("rows", "pos", "neg", "overlong")
_STATE_KEYS = ("epoch", "next", "offset", "settings")
# Keys a state may lack (a state written before elastic resumption has no offset: 0).
_OPTIONAL_KEYS = ("offset",)
# Loader state keys that are a position, not a setting.
_POSITION = tuple(_LOADER_POSITION)


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

    The file holds `start` ([epoch, next, offset] where the next pass starts when `fresh`: set
    by the constructor, `set_epoch` and `load_state_dict`) and the last passes, each with the
    id its workers share, its epoch, first batch and offset, the workers that joined it and
    those that finished it. A new pass starts at `start` when fresh, else at the epoch after
    the last pass (offset 0)."""

    HISTORY = 64

    def __init__(self, epoch, nxt, offset=0):
        fd, self.path = tempfile.mkstemp(prefix="rankfeed-passes-", suffix=".json")
        os.close(fd)
        self._state = {"start": [epoch, nxt, offset], "fresh": True, "passes": []}
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

    def set(self, epoch, nxt, offset=0):
        with self._locked() as s:
            s["start"], s["fresh"] = [epoch, nxt, offset], True

    def open(self, ident, worker, workers, explicit=None):
        """The (epoch, next, offset) a pass starts at, for worker `worker` of `workers` of the
        pass `ident`: joins the pass when another of its workers opened it. `explicit`: this
        copy's own position (restored in a worker by a StatefulDataLoader), recorded as such."""
        with self._locked() as s:
            for p in reversed(s["passes"]):
                if p["id"] == ident and worker not in p["joined"]:
                    p["joined"].append(worker)
                    return (tuple(explicit) if explicit
                            else (p["epoch"], p["start"], p.get("offset", 0)))
            if explicit:
                epoch, start, offset = explicit
            elif s["fresh"] or not s["passes"]:
                epoch, start, offset = s["start"]
            else:
                epoch, start, offset = s["passes"][-1]["epoch"] + 1, 0, 0
            s["fresh"] = False
            s["passes"].append({"id": ident, "epoch": epoch, "start": start, "offset": offset,
                                "joined": [worker], "done": [], "workers": workers,
                                "pid": os.getpid()})
            del s["passes"][:-self.HISTORY]
            return epoch, start, offset

    def done(self, ident, worker):
        with self._locked() as s:
            for p in reversed(s["passes"]):
                if p["id"] == ident and worker in p["joined"] and worker not in p["done"]:
                    p["done"].append(worker)
                    return


def _complete(p):
    return len(p["done"]) >= p["workers"]


def _uint(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


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

    Resume: `state_dict()` / `load_state_dict()` hold the position (`epoch`, `next` batch,
    `offset`: where the epoch's batches were cut from its global order, 0 but after an elastic
    resume) and the settings it is valid for; restoring is O(1) (no batch is computed again).
    Elastic: a state taken with another world_size and/or batch_size continues the epoch from
    the positions of its global order not yet trained on, re-striped over this run's ranks, in
    the default (random) order; the pass of that epoch then has the batches left (`len()`), the
    next epoch is whole again. The rank may always differ (a state is a position of every
    rank). Every other setting must be the same (a ValueError names the first that differs,
    before anything is trained; so does another world or batch size with length_grouped,
    max_tokens, same_source or no_duplicates). A state without `offset` (an older one) has
    offset 0.

    torchdata's `StatefulDataLoader` calls `state_dict` / `load_state_dict` in each worker:
    there a state resumes only with the same world_size and batch_size (each worker holds its
    own position, not the epoch's); for an elastic resume with workers, load a state taken in
    the main process (`RankfeedIterable.state_dict()` without workers, or
    `rankfeed.hf.RankfeedDataLoader.state_dict()`, which counts the batches it hands out) into
    the iterable before the loop. In the main process, `state_dict()` during a pass run by
    DataLoader workers raises: the position is in the workers.

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
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {_described(epoch)}")
        self._probes = {}    # (rank, world) -> a Loader that counts batches (not pickled)
        self._facts = {}     # (rank, world) -> {"settings": ..., "steps": {(epoch, offset): n}}
        self._pos = None     # [epoch, next, offset] of the last pass run by this copy
        self._ident = None   # that pass's id
        self._loaded = None  # in a worker: the position load_state_dict gave this copy
        self._count = 0      # passes this copy opened (with the base seed: a pass's id)
        self._passes = _Passes(epoch, 0, 0)
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
                rank = 0 if rank is None else rank
                world = 1 if world is None else world
        return rank, world

    def _loader(self, rank, world, epoch, prefetch_threads=0):
        return Dataset(self.path).loader(rank=rank, world_size=world, shard_tail=self.shard_tail,
                                         epoch=epoch, prefetch_threads=prefetch_threads,
                                         **self.loader_kwargs)

    def _loader_at(self, rank, world, epoch, step, offset, prefetch_threads=0):
        """A Loader whose next batch is `step` of `epoch`, that epoch cut at `offset`."""
        # Made at another epoch than the state's, so that its len() / steps() count the batches
        # from `offset` (the Python Loader keeps its count when a state moves only the offset).
        loader = self._loader(rank, world, epoch + 1, prefetch_threads)
        loader.load_state_dict({**loader.state_dict(), "epoch": epoch, "step": step,
                                "offset": offset})
        return loader

    def _fact(self, rank, world):
        key = (rank, world)
        if key not in self._facts:
            probe = self._loader(rank, world, 0)
            self._probes[key] = probe
            settings = {k: v for k, v in probe.state_dict().items() if k not in _POSITION}
            self._facts[key] = {"settings": settings, "steps": {(0, 0): len(probe)}}
        return self._facts[key]

    def settings(self):
        """The settings a state of this iterable is valid for, at the current rank and world
        size (those of `Dataset.loader(...).state_dict()`)."""
        return dict(self._fact(*self._rank())["settings"])

    def _steps(self, rank, world, epoch, offset=0):
        fact = self._fact(rank, world)
        key = (epoch, offset)
        if key not in fact["steps"]:
            if offset:
                n = self._loader_at(rank, world, epoch, 0, offset).steps(epoch)
            else:
                probe = self._probes.get((rank, world)) or self._loader(rank, world, 0)
                self._probes[(rank, world)] = probe
                n = probe.steps(epoch)
            fact["steps"] = {**fact["steps"], key: n}
        return fact["steps"][key]

    def steps(self, epoch, offset=None):
        """Batches of this rank in `epoch` (epoch-dependent only with max_tokens), from its
        cut `offset` on (None: the offset of the pass in progress or of the next pass when it
        is of `epoch`, else 0)."""
        epoch = int(epoch)
        if offset is None:
            cur_epoch, cur_offset = self._current()
            offset = cur_offset if cur_epoch == epoch else 0
        return self._steps(*self._rank(), epoch, int(offset))

    def _current(self):
        """(epoch, offset) of the pass in progress, or of the next pass."""
        s = self._passes.read()
        if s["fresh"] or not s["passes"]:
            return s["start"][0], s["start"][2]
        last = s["passes"][-1]
        if _complete(last):
            return last["epoch"] + 1, 0
        return last["epoch"], last.get("offset", 0)

    @property
    def epoch(self):
        """The epoch of the pass in progress, or of the next pass."""
        return self._current()[0]

    def __len__(self):
        """Batches of this rank in `epoch` (the same on every rank with shard_tail "pad", and
        in every epoch except with max_tokens); after an elastic resume, those left in the
        resumed epoch."""
        epoch, offset = self._current()
        return self._steps(*self._rank(), epoch, offset)

    def set_epoch(self, epoch):
        """Start the next pass at the first batch of `epoch`."""
        self._start_at(int(epoch), 0)

    def _start_at(self, epoch, nxt, offset=0):
        self._loaded = None
        self._passes.set(epoch, nxt, offset)

    def _position(self):
        """[epoch, next, offset] for `state_dict`: this copy's pass when it is the last one
        (always in a worker), else where the next pass starts."""
        if get_worker_info() is not None:
            return self._pos if self._pos is not None else self._passes.read()["start"]
        s = self._passes.read()
        if s["fresh"] or not s["passes"]:
            return s["start"]
        last = s["passes"][-1]
        if _complete(last):
            return [last["epoch"] + 1, 0, 0]
        if self._pos is not None and last["id"] == self._ident and last["pid"] == os.getpid():
            return self._pos
        raise RuntimeError(
            "RankfeedIterable.state_dict(): the pass in progress runs in DataLoader workers, "
            "which hold its position; take the StatefulDataLoader's state_dict() (or use "
            "num_workers=0)")

    def state_dict(self):
        """The position (`epoch`, `next` batch, `offset` of the epoch's cut) and the settings
        it is valid for."""
        epoch, nxt, offset = self._position()
        return {"epoch": epoch, "next": nxt, "offset": offset, "settings": self.settings()}

    def _parse(self, state, what):
        """(epoch, next, offset, settings) of a state, checked for its keys and types."""
        if not isinstance(state, dict):
            raise ValueError(f"{what} must be a dict, got {_described(state)}")
        missing = [k for k in _STATE_KEYS if k not in state and k not in _OPTIONAL_KEYS]
        unknown = [k for k in state if k not in _STATE_KEYS]
        if missing or unknown:
            raise ValueError(f"{what}: missing keys {missing}, unknown keys {unknown}")
        if not isinstance(state["settings"], dict):
            raise ValueError(f"{what}: settings must be a dict, got {_described(state['settings'])}")
        epoch, nxt, offset = state["epoch"], state["next"], state.get("offset", 0)
        for name, v in (("epoch", epoch), ("next", nxt), ("offset", offset)):
            if not _uint(v):
                raise ValueError(f"{what}: {name} must be a non-negative int, got {_described(v)}")
        return epoch, nxt, offset, state["settings"]

    def _resolve(self, epoch, nxt, offset, settings, what):
        """Where this rank continues a state's position: (epoch, next, offset, how), `how`
        "exact" or "elastic" (another world_size and/or batch_size, see the class docs).
        Settings that must be the same are checked here; the Loader of this rank decides the
        rest (and raises, naming the setting, when it cannot continue)."""
        rank, world = self._rank()
        # The Loader checks the settings (keys, values and types; what may differ elastically).
        loader = self._loader(rank, world, epoch)
        try:
            how = loader.load_state_dict({**settings, "epoch": epoch, "step": nxt,
                                          "offset": offset})
        except ValueError as e:
            raise ValueError(f"{what}: {e}") from None
        st = loader.state_dict()
        epoch, nxt, offset = st["epoch"], st["step"], st["offset"]
        if nxt >= self._steps(rank, world, epoch, offset):
            epoch, nxt, offset = epoch + 1, 0, 0
        return epoch, nxt, offset, how

    def load_state_dict(self, state):
        """Resume at `state` (from `state_dict()`) at the next pass; strict: missing or
        unknown keys, or other settings (in value or type), are a ValueError naming them;
        another world_size or batch_size resumes elastically (see the class docs). Returns
        "exact" or "elastic"."""
        what = "RankfeedIterable state"
        epoch, nxt, offset, settings = self._parse(state, what)
        info = get_worker_info()
        if info is not None:
            # A StatefulDataLoader restoring this worker: its own position, for its next pass.
            check_settings(settings, self.settings(), what + " (in a DataLoader worker: "
                           "elastic resumption is for a state loaded in the main process)",
                           ignore=("rank",))
            self._loaded = (epoch, nxt, offset)
            self._pos = [epoch, nxt, offset]
            return "exact"
        epoch, nxt, offset, how = self._resolve(epoch, nxt, offset, settings, what)
        self._start_at(epoch, nxt, offset)
        return how

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
        epoch, start, offset = self._passes.open(ident, worker, workers, explicit=loaded)
        self._pos, self._ident = [epoch, start, offset], ident
        return self._batches(rank, world, epoch, start, offset, workers, worker, ident)

    def _batches(self, rank, world, epoch, start, offset, workers, worker, ident):
        steps = self._steps(rank, world, epoch, offset)
        if workers == 1:
            loader = self._loader_at(rank, world, epoch, min(start, steps), offset,
                                     self.prefetch_threads)
            for k, batch in enumerate(loader, start + 1):
                self._pos = [epoch, k, offset]
                yield self._tensors(batch)
        else:
            # Worker w: batches w, w+W, ... of the rank's sequence, computed directly (O(1)),
            # by a loader at this pass's offset. State: this worker resumes at `next + worker`
            # (see load_state_dict).
            loader = self._loader_at(rank, world, epoch, 0, offset)
            for k in range(start + worker, steps, workers):
                self._pos = [epoch, k + workers - worker, offset]
                yield self._tensors(loader.batch(epoch, k))
            self._pos = [epoch, steps, offset]
        self._passes.done(ident, worker)
