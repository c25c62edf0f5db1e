"""Validation loss and perplexity over a fixed set of batches (the same ones at every evaluation)."""

from __future__ import annotations

import math
import sys

import torch
from torch import nn
from tqdm import tqdm

from lmforge.data.loader import CLMLoader
from lmforge.train.device import autocast


@torch.no_grad()
def evaluate_loss(model: nn.Module, loader: CLMLoader, batches: int, device: torch.device,
                  precision: str, progress: bool = False) -> dict[str, float]:
    """Mean token loss over the first `batches` batches of `loader` (at most one pass over its split).

    Give it an unshuffled loader and every evaluation, in any run with any seed, scores the same
    windows: the first blocks of the split, or all of it when it is smaller than `batches` batches.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    count_batches = max(1, min(batches, loader.batches_per_epoch))
    for index in tqdm(range(count_batches), desc="evaluating", unit="batch", disable=not progress,
                      file=sys.stderr, leave=False):
        x, y = loader.batch(index)
        x, y = x.to(device), y.to(device)
        with autocast(device, precision):
            loss = model(x, y).loss
        total += loss.item() * y.numel()
        count += y.numel()
    model.train(was_training)
    mean = total / count
    return {"val_loss": mean, "val_ppl": math.exp(min(mean, 50.0))}
