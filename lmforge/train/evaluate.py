"""Validation metrics over a fixed set of batches (the same ones at every evaluation).

The model's output reports (sum, count) per metric for each batch (`eval_sums()`), so the averages
here are exact over tokens / masked positions / pairs, whatever the batch composition.
gpt: val_loss (per token) and val_ppl. t5: the same over target tokens, and val_token_acc.
bert: val_mlm_loss, val_mlm_acc (on masked positions), val_nsp_loss, val_nsp_acc, and val_loss = val_mlm_loss + val_nsp_loss (the training loss).
In a run of several processes each scores its part of every batch and the sums are added up, so the
metrics are those of one process scoring everything.
"""

from __future__ import annotations

import math
import sys
from collections import defaultdict

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from lmforge.train.device import autocast
from lmforge.train.distributed import all_gather_objects, all_reduce_sum

EVAL_ROWS_FACTOR = 4  # an evaluation forward pass takes this many training micro-batches at once


@torch.no_grad()
def evaluate(model: nn.Module, loader, batches: int, device: torch.device, precision: str,
             progress: bool = False) -> dict[str, float]:
    """Averages over the first `batches` global batches of `loader` (at most one pass over its split).

    Give it an unshuffled loader and every evaluation, in any run with any seed and world size, scores
    the same examples: the first ones of the split, or all of it when it is smaller than `batches` batches.
    """
    was_training = model.training
    model.eval()
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    count_batches = max(1, min(batches, loader.batches_per_epoch))
    # This process's samples of those batches, scored EVAL_ROWS_FACTOR micro-batches at a time: the metrics
    # are sums, so the grouping changes nothing but the speed (a forward pass without gradients holds far
    # less than a training step, and larger matmuls run faster).
    samples = np.concatenate([loader.sample_indices(index * loader.batch_size, micro)
                              for index in range(count_batches) for micro in range(loader.accum_steps)])
    rows = loader.micro_batch_size * EVAL_ROWS_FACTOR
    for first in tqdm(range(0, len(samples), rows), desc="evaluating", unit="batch", disable=not progress,
                      file=sys.stderr, leave=False):
        batch = {k: v.to(device) for k, v in loader.examples(samples[first:first + rows]).items()}
        with autocast(device, precision):
            out = model(**batch)
        for name, (total, count) in out.eval_sums().items():
            sums[name][0] += total
            sums[name][1] += count
    model.train(was_training)
    names = sorted(set().union(*all_gather_objects(sorted(sums))))
    totals = all_reduce_sum(torch.tensor([sums[n] if n in sums else [0.0, 0] for n in names], dtype=torch.float64))
    metrics = {f"val_{name}": float(total / count) for name, (total, count) in zip(names, totals.tolist()) if count}
    if "val_loss" in metrics:
        metrics["val_ppl"] = math.exp(min(metrics["val_loss"], 50.0))
    elif "val_mlm_loss" in metrics:
        metrics["val_loss"] = metrics["val_mlm_loss"] + metrics.get("val_nsp_loss", 0.0)
    return metrics


def describe_metrics(metrics: dict[str, float]) -> str:
    """One line for people: 'loss 1.8971, perplexity 6.67' or 'loss 6.76, MLM loss 6.37 / accuracy 12.2%,
    NSP loss 0.39 / accuracy 82.5%'. Keys may carry the 'val_' prefix or not."""
    m = {k.removeprefix("val_"): v for k, v in metrics.items()}
    parts = [f"loss {m['loss']:.4f}"]
    if "ppl" in m or "perplexity" in m:
        parts.append(f"perplexity {m.get('ppl', m.get('perplexity')):.2f}")
    if "token_acc" in m:
        parts.append(f"token accuracy {m['token_acc']:.1%}")
    if "mlm_loss" in m:
        parts.append(f"MLM loss {m['mlm_loss']:.4f} / accuracy {m['mlm_acc']:.1%}")
    if "nsp_acc" in m:
        parts.append(f"NSP loss {m['nsp_loss']:.4f} / accuracy {m['nsp_acc']:.1%}")
    return ", ".join(parts)
