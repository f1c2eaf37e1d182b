"""PyTorch adapter: an IterableDataset that splits the epoch across DataLoader workers and
distributed ranks with no duplicates, and yields dicts of tensors made without a copy.

    from torch.utils.data import DataLoader
    from rankfeed.torch import RankfeedIterable

    data = RankfeedIterable("data/train", batch_size=4, group_size=16, mode="encoder")
    loader = DataLoader(data, batch_size=None, num_workers=2)   # rankfeed batches already
    for epoch in range(3):
        data.set_epoch(epoch)
        for batch in loader: ...

torch is imported only when this module is.
"""

import torch
from torch.utils.data import IterableDataset, get_worker_info

from . import Dataset

_META = ("rows", "pos", "neg", "overlong")


class RankfeedIterable(IterableDataset):
    """Each (rank, worker) pair takes its own shard of the epoch: shard index
    `rank * num_workers + worker`, shard count `world_size * num_workers`. rank and world_size
    default to torch.distributed's when it is initialized. With the default shard_tail="uneven"
    every row is yielded exactly once per epoch; use "pad" or "drop" when every rank must see
    the same number of batches (DDP).

    Keyword arguments go to `Dataset.loader`. `with_meta=True` also yields the groups' rows,
    positive and negative indices."""

    def __init__(self, path, *, rank=None, world_size=None, shard_tail="uneven", with_meta=False,
                 prefetch_threads=1, **loader_kwargs):
        super().__init__()
        self.path = str(path)
        self.rank, self.world_size = rank, world_size
        self.shard_tail = shard_tail
        self.with_meta = with_meta
        self.prefetch_threads = prefetch_threads
        self.loader_kwargs = loader_kwargs
        self.epoch = loader_kwargs.pop("epoch", 0)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def _shard(self):
        rank, world = self.rank, self.world_size
        if rank is None or world is None:
            dist = torch.distributed
            if dist.is_available() and dist.is_initialized():
                rank = dist.get_rank() if rank is None else rank
                world = dist.get_world_size() if world is None else world
            else:
                rank, world = rank or 0, world or 1
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return rank * workers + worker, world * workers

    def __iter__(self):
        shard, shards = self._shard()
        loader = Dataset(self.path).loader(rank=shard, world_size=shards, shard_tail=self.shard_tail,
                                           epoch=self.epoch, prefetch_threads=self.prefetch_threads,
                                           **self.loader_kwargs)
        for batch in loader:
            yield {k: (torch.from_numpy(v) if hasattr(v, "dtype") else v)
                   for k, v in batch.items() if self.with_meta or k not in _META}
