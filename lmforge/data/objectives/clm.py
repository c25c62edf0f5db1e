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


WINDOW_ORDERS = ("blocks", "random", "sequential")


def epoch_starts(seed: int, epoch: int, num_tokens: int, block_size: int, order: str = "blocks") -> np.ndarray:
    """Start offsets of every window of an epoch, a pure function of (seed, epoch).

    blocks: the split cut into blocks at a fresh random shift each epoch, in a seeded shuffle; every
        token is in exactly one window per epoch (nothing seen twice), the choice for large corpora.
    random: windows at uniformly random offsets, drawn with replacement (nanoGPT's sampling); on a
        small corpus the varied offsets act as augmentation.
    sequential: consecutive blocks from the start of the split (evaluation).
    """
    count = num_blocks(num_tokens, block_size)
    if order == "sequential":
        return np.arange(count, dtype=np.int64) * block_size
    rng = np.random.default_rng([seed, epoch])
    if order == "random":
        return rng.integers(0, num_tokens - block_size, size=count, dtype=np.int64)
    if order != "blocks":
        raise ValueError(f"unknown window order {order!r}; expected one of {WINDOW_ORDERS}")
    shift = int(rng.integers(block_size))
    return shift + rng.permutation(count).astype(np.int64) * block_size


def inputs_and_labels(windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """windows: (batch, block_size + 1) token ids -> inputs and next-token labels, both (batch, block_size)."""
    return windows[:, :-1], windows[:, 1:]
