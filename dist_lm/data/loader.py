"""Deterministic, rank-aware, resumable batches of (input, target) windows over token shards.

Design decisions:
- The split is cut into non-overlapping windows of seq_len + 1 tokens (stride seq_len; the
  extra token is the last target). Each epoch visits every window once, in an order fixed by
  (seed, epoch).
- Optimizer step s consumes global positions [s*G, (s+1)*G) of that order, G = the global batch
  (micro_batch * grad_accum * world_size). Micro-step m of rank r takes the slice starting at
  (m * world_size + r) * micro_batch. So the set of sequences in a step depends only on G: one
  process with batch 8 and two with batch 4, or accumulation 4 x 2 and 1 x 8, see the same data.
- The loader holds no cursor: the data position is the step number, so resuming needs only it.
- Integrity is the reader's job (ShardedTokens.read_rows, dist_lm.data.shards): each block of a shard is
  checksummed the first time a batch reads from it, and every batch is checked against the vocabulary, so a
  damaged shard stops the run with a UserError naming the file and the bytes, never an IndexError in the
  embedding. The batches here stay pure functions of (step, micro_step).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from dist_lm.data.shards import ShardedTokens
from dist_lm.errors import UserError


class TrainBatches:
    """Shuffled training windows; `batch(step, micro_step)` is a pure function of its arguments."""

    def __init__(self, tokens: ShardedTokens, *, seq_len: int, micro_batch: int, grad_accum: int,
                 rank: int, world_size: int, seed: int) -> None:
        self.tokens = tokens
        self.seq_len = seq_len
        self.micro_batch = micro_batch
        self.grad_accum = grad_accum
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        # Where this process's count starts: (step, samples) of the checkpoint it resumed from. With an
        # unchanged global batch, samples == step * global_batch and the offsets cancel.
        self._start_step, self._start_sample = 0, 0
        self.num_windows = (len(tokens) - 1) // seq_len
        if self.num_windows < 1:
            raise UserError(f"the training split has {len(tokens)} tokens, fewer than one window of "
                            f"seq_len+1={seq_len + 1}; lower model.seq_len or prepare more data")

    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    def resume_at(self, step: int, samples_consumed: int) -> None:
        """Continue after a checkpoint taken at `step` having consumed `samples_consumed` windows, even
        if the global batch has changed since (e.g. another number of GPUs)."""
        self._start_step, self._start_sample = step, samples_consumed

    def samples_consumed(self, step: int) -> int:
        """Windows consumed by all ranks once `step` optimizer steps are done."""
        return self._start_sample + (step - self._start_step) * self.global_batch()

    def epoch_of(self, step: int) -> float:
        """Fractional epochs completed after `step` optimizer steps."""
        return self.samples_consumed(step) / self.num_windows

    def window_ids(self, step: int, micro_step: int) -> np.ndarray:
        """Indices of the windows this rank reads at (step, micro_step), shape (micro_batch,)."""
        assert 0 <= micro_step < self.grad_accum
        first = self.samples_consumed(step) + (micro_step * self.world_size + self.rank) * self.micro_batch
        positions = np.arange(first, first + self.micro_batch, dtype=np.int64)
        epochs, within = np.divmod(positions, self.num_windows)
        ids = np.empty(self.micro_batch, dtype=np.int64)
        for epoch in np.unique(epochs):  # one epoch, two where the batch crosses an epoch boundary
            at = epochs == epoch
            ids[at] = self._order(int(epoch))[within[at]]
        return ids

    def batch(self, step: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (micro_batch, seq_len) int64 on the CPU."""
        data = torch.from_numpy(self.tokens.read_rows(self.window_ids(step, micro_step) * self.seq_len,
                                                      self.seq_len + 1))  # (B, T+1)
        return data[:, :-1], data[:, 1:]

    def _order(self, epoch: int) -> np.ndarray:
        return _permutation(self.num_windows, self.seed, epoch)


@lru_cache(maxsize=2)
def _permutation(num_windows: int, seed: int, epoch: int) -> np.ndarray:
    # PCG64 seeded by (seed, epoch): independent of rank and world size, stable across numpy versions.
    return np.random.Generator(np.random.PCG64([seed, epoch])).permutation(num_windows)


class EvalBatches:
    """The same fixed validation windows at every evaluation, split across ranks."""

    def __init__(self, tokens: ShardedTokens, *, seq_len: int, micro_batch: int, num_batches: int,
                 rank: int, world_size: int) -> None:
        self.tokens = tokens
        self.seq_len = seq_len
        self.micro_batch = micro_batch
        self.num_batches = num_batches
        self.rank = rank
        self.world_size = world_size
        self.num_windows = (len(tokens) - 1) // seq_len
        if self.num_windows < 1:
            raise UserError(f"the validation split has {len(tokens)} tokens, fewer than one window of "
                            f"seq_len+1={seq_len + 1}; raise data.val_fraction or lower model.seq_len")

    def __iter__(self):
        for i in range(self.num_batches):
            first = (i * self.world_size + self.rank) * self.micro_batch
            # Wrap around when the split is smaller than the evaluation asks for.
            ids = np.arange(first, first + self.micro_batch) % self.num_windows
            data = torch.from_numpy(self.tokens.read_rows(ids * self.seq_len, self.seq_len + 1))
            yield data[:, :-1], data[:, 1:]
