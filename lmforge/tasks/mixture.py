"""Several text-to-text tasks in one fine-tune: T5's examples-proportional mixing with a cap.

Each task i contributes min(n_i, cap) examples to every epoch, so a task's share of the training is
proportional to its size until the cap (T5 paper, section 3.5.2: rate r_i = min(n_i, K) / sum_j min(n_j, K)).
A task larger than the cap sees a different window of its own stream each epoch (the stream being
fresh permutations of its examples, one after another, as a repeated and reshuffled dataset reads), so
over several epochs it is read whole; an epoch that straddles two passes may hold an example twice.
The epoch's examples are shuffled together; everything is a pure function of (seed, epoch), so a
resumed run sees exactly the batches an unbroken one would.

Dev: every task is scored on its own dev split; `val_<task>_<metric>` for each of its metrics, and
`val_average` = the mean of the tasks' selection metrics (as T5 reports a GLUE average) picks the best
checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from lmforge.tasks.config import TaskConfig

SEPARATORS = (",", "+")  # --task sst2,stsb (finetune) or sst2+stsb (an experiment's one cell)
SELECT_METRIC = "average"


def split_task_list(task: str) -> list[str]:
    """'sst2,stsb' or 'sst2+stsb' -> ['sst2', 'stsb']; one name -> [name]. Empty items are refused by the caller."""
    text = str(task)
    for sep in SEPARATORS:
        if sep in text:
            return [part.strip() for part in text.split(sep)]
    return [text]


def mixture_name(names: Sequence[str]) -> str:
    return "+".join(names)


def mixture_config(tasks: Sequence[TaskConfig]) -> TaskConfig:
    """The TaskConfig the recipe sees for a mixture: its name, and `average` as the metric it selects on."""
    first = tasks[0]
    return dataclasses.replace(first, name=mixture_name([t.name for t in tasks]), metrics=[SELECT_METRIC],
                               select_metric=SELECT_METRIC)


@dataclass(frozen=True)
class MixingPlan:
    """Which examples of the concatenated train splits each epoch holds (examples-proportional, capped)."""

    sizes: tuple[int, ...]  # train examples per task, in task order (label budget applied)
    cap: int  # examples per task per epoch, at most

    @property
    def per_epoch(self) -> tuple[int, ...]:
        return tuple(min(n, self.cap) for n in self.sizes)

    @property
    def epoch_size(self) -> int:
        return sum(self.per_epoch)

    def rates(self) -> list[float]:
        total = self.epoch_size
        return [k / total for k in self.per_epoch]

    @functools.lru_cache(maxsize=2)  # every step of an epoch reads the same order: drawn once, not per step
    def epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        """The epoch's examples as indices into the concatenated train splits, shuffled together (read-only)."""
        offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        parts = [offset + _stream_window(size, take, seed, task, epoch)
                 for task, (offset, size, take) in enumerate(zip(offsets, self.sizes, self.per_epoch))]
        order = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        order = order[np.random.default_rng([seed, epoch, 1]).permutation(len(order))]
        order.flags.writeable = False  # shared by the cache
        return order

    def batch_indices(self, batch_size: int, seed: int, step: int) -> np.ndarray:
        """The examples of optimizer step `step` (the last batch of an epoch may be smaller)."""
        per_epoch = -(-self.epoch_size // batch_size)
        epoch, index = divmod(step, per_epoch)
        return self.epoch_order(seed, epoch)[index * batch_size:(index + 1) * batch_size]


def _stream_window(size: int, take: int, seed: int, task: int, epoch: int) -> np.ndarray:
    """Positions [epoch * take, (epoch + 1) * take) of task's endless stream of permutations of range(size)."""
    start, end = epoch * take, (epoch + 1) * take
    pieces = []
    for lap in range(start // size, -(-end // size)):
        order = np.random.default_rng([seed, task, lap, 2]).permutation(size)
        lo, hi = max(start - lap * size, 0), min(end - lap * size, size)
        pieces.append(order[lo:hi])
    return np.concatenate(pieces).astype(np.int64) if pieces else np.zeros(0, dtype=np.int64)


def merge_dev_metrics(per_task: Sequence[tuple[TaskConfig, dict[str, float], float]]) -> dict[str, float]:
    """One dev report from each task's (config, val_* metrics, dev target count): per-task metrics prefixed
    with the task's name, val_loss over all dev targets, val_average over the tasks' selection metrics."""
    merged: dict[str, Any] = {}
    loss_sum = count = 0.0
    selected = []
    for config, metrics, targets in per_task:
        loss_sum, count = loss_sum + metrics["val_loss"] * targets, count + targets
        for key, value in metrics.items():
            merged[f"val_{config.name}_{key.removeprefix('val_')}"] = value
        selected.append(metrics[f"val_{config.select_metric}"])
    return {"val_loss": loss_sum / max(count, 1.0), f"val_{SELECT_METRIC}": float(np.mean(selected)), **merged}
