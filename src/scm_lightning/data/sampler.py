"""A training sampler whose order depends only on (seed, epoch), split by rank, resumable mid-epoch.

Global batch ``b`` of epoch ``e`` is ``perm[b·B·W : (b+1)·B·W]`` with ``perm`` a permutation
drawn from ``(seed, e)`` alone, ``B`` the per-rank batch size and ``W`` the world size; rank
``r`` takes the ``r``-th block of ``B`` indices of it. Hence

* ``W`` ranks with batch ``B`` see, step by step, exactly the images one process sees with
  batch ``W·B`` (the single-process reference of a DDP/FSDP run);
* an interrupted run that restarts inside epoch ``e`` after ``k`` batches resumes with batch
  ``k`` of the same permutation (:meth:`EpochShuffleSampler.resume_from`), so a resumed run
  is bit-identical to an uninterrupted one.

It subclasses :class:`~torch.utils.data.DistributedSampler` only so that Lightning leaves it in
place under DDP/FSDP instead of wrapping it (it already splits by rank itself).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DistributedSampler


class EpochShuffleSampler(DistributedSampler):
    """Indices of ``num_batches`` full per-rank batches of epoch :attr:`epoch` (see module doc).

    Args:
        size: number of items in the dataset (N).
        batch_size: per-rank batch size B (the DataLoader's ``batch_size``).
        seed: shuffle seed.
        rank, world_size: this process's data-parallel rank and the number of ranks W.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if int(world_size) < 1 or not 0 <= int(rank) < int(world_size):
            raise ValueError(
                f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}"
            )
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.size, self.batch_size, self.seed = int(size), int(batch_size), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        if self.num_batches < 1:
            raise ValueError(
                f"{self.size} items cannot fill one global batch of {self.world_size} ranks × "
                f"batch_size {self.batch_size}; lower data.batch_size or use fewer devices"
            )
        self.epoch = 0
        self._skip: tuple[int, int] | None = None  # (epoch, batches already consumed)
        # DistributedSampler attributes some tools read.
        self.num_replicas, self.shuffle, self.drop_last = self.world_size, True, True

    @property
    def num_batches(self) -> int:
        """Per-rank batches per epoch ``N // (B·W)`` (the incomplete global batch is dropped)."""
        return self.size // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this at every epoch start; plain iteration advances it by itself."""
        self.epoch = int(epoch)

    def resume_from(self, epoch: int, batches_done: int) -> None:
        """Continue in epoch ``epoch`` after its first ``batches_done`` batches (a resume).

        The next iteration of epoch ``epoch`` skips those batches; ``batches_done`` outside
        ``(0, num_batches)`` only sets the epoch.
        """
        self.epoch = int(epoch)
        self._skip = (
            (int(epoch), int(batches_done)) if 0 < batches_done < self.num_batches else None
        )

    def permutation(self, epoch: int) -> torch.Tensor:
        """The global order of epoch ``epoch``: a function of ``(seed, epoch)`` only."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=gen)

    def __iter__(self) -> Iterator[int]:
        epoch, start = self.epoch, 0
        if self._skip is not None and self._skip[0] == epoch:
            start = self._skip[1]
        self._skip = None
        b, w = self.batch_size, self.world_size
        batches = self.permutation(epoch)[: self.num_batches * b * w].view(-1, w, b)
        yield from batches[start:, self.rank].reshape(-1).tolist()
        if self.epoch == epoch:  # no set_epoch meanwhile: the next plain iteration is a new epoch
            self.epoch = epoch + 1

    def __len__(self) -> int:
        return self.num_batches * self.batch_size


def resume_position(trainer: Any) -> tuple[int, int]:
    """``(epoch, batches of it already trained)`` restored from a checkpoint (``(0, 0)`` if none).

    Lightning restores its loop progress before it asks for the training loader; a checkpoint
    written in ``on_train_batch_end`` of batch ``i`` counts ``i + 1`` batches as processed.
    """
    if trainer is None:
        return 0, 0
    loop = getattr(trainer, "fit_loop", None)
    if loop is None:
        return 0, 0
    return int(trainer.current_epoch), int(loop.epoch_loop.batch_progress.current.processed)
