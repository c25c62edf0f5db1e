"""Deterministic, resumable, rank-sharded batches of causal-LM blocks from a token store split.

Batch b of the run is a pure function of (seed, b): sample indices [b * G, (b + 1) * G) of the global
stream, where G = per-rank batch size * world size; rank r takes the r-th slice of each. The position
is one integer, so `state_dict()` is tiny and resumption is exact.
"""

from __future__ import annotations

import numpy as np
import torch

from lmforge.data.objectives.clm import epoch_starts, inputs_and_labels, num_blocks
from lmforge.data.store import SplitReader


class CLMLoader:
    def __init__(self, split: SplitReader, block_size: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, order: str = "blocks"):
        self.split, self.block_size, self.batch_size = split, block_size, batch_size
        self.seed, self.rank, self.world_size, self.order = seed, rank, world_size, order
        self.blocks_per_epoch = num_blocks(split.num_tokens, block_size)
        self.batch_index = 0
        self._epoch = -1
        self._epoch_starts = np.zeros(0, dtype=np.int64)

    def _starts(self, sample_indices: np.ndarray) -> np.ndarray:
        starts = np.empty(len(sample_indices), dtype=np.int64)
        epochs, positions = np.divmod(sample_indices, self.blocks_per_epoch)
        for epoch in np.unique(epochs):
            if epoch != self._epoch:
                self._epoch_starts = epoch_starts(self.seed, int(epoch), self.split.num_tokens, self.block_size,
                                                  self.order)
                self._epoch = int(epoch)
            mask = epochs == epoch
            starts[mask] = self._epoch_starts[positions[mask]]
        return starts

    def batch(self, batch_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (inputs, labels) of global batch `batch_index`, as int64 tensors."""
        first = (batch_index * self.world_size + self.rank) * self.batch_size
        samples = np.arange(first, first + self.batch_size, dtype=np.int64)
        windows = np.stack([self.split.read(int(s), self.block_size + 1) for s in self._starts(samples)])
        x, y = inputs_and_labels(windows.astype(np.int64))
        return torch.from_numpy(x), torch.from_numpy(y)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch at the current position; advances the position."""
        batch = self.batch(self.batch_index)
        self.batch_index += 1
        return batch

    @property
    def batches_per_epoch(self) -> int:
        return self.blocks_per_epoch // (self.batch_size * self.world_size)

    @property
    def epoch(self) -> float:
        return self.batch_index * self.batch_size * self.world_size / self.blocks_per_epoch

    def state_dict(self) -> dict:
        return {"batch_index": self.batch_index, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.batch_index = int(state["batch_index"])
        self.seed = int(state["seed"])
