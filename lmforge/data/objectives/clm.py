"""Causal language modelling: the token stream is cut into blocks; labels are the inputs shifted by one.

Documents already end with the end-of-text token in the store, so blocks pack documents back to back
(as GPT-2 did) and the model learns where one text stops and the next begins.
"""

from __future__ import annotations

import numpy as np

from lmforge.errors import LmforgeError


def num_blocks(num_tokens: int, block_size: int) -> int:
    """Blocks of block_size + 1 tokens that fit for any per-epoch shift in [0, block_size)."""
    count = (num_tokens - block_size) // block_size
    if count <= 0:
        raise LmforgeError(f"a split of {num_tokens} tokens is too short for blocks of {block_size} "
                           f"(needs at least {2 * block_size + 1}); lower model.block_size or add text")
    return count


def epoch_layout(seed: int, epoch: int, num_tokens: int, block_size: int,
                 shuffle: bool = True) -> tuple[int, np.ndarray]:
    """(shift, order) of an epoch: block k starts at shift + order[k] * block_size.

    A fresh shift each epoch shows the model every boundary position; the order is a seeded shuffle.
    Both depend only on (seed, epoch), so any step's batch can be recomputed after a restart.
    Without shuffling (evaluation) the blocks are simply consecutive from the start of the split.
    """
    if not shuffle:
        return 0, np.arange(num_blocks(num_tokens, block_size))
    rng = np.random.default_rng([seed, epoch])
    shift = int(rng.integers(block_size))
    order = rng.permutation(num_blocks(num_tokens, block_size))
    return shift, order


def inputs_and_labels(windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """windows: (batch, block_size + 1) token ids -> inputs and next-token labels, both (batch, block_size)."""
    return windows[:, :-1], windows[:, 1:]
