"""Timing helpers shared by the training-throughput benchmarks."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def alternate_rounds(steppers: dict[str, Callable[[int], float]], rounds: int, steps: int,
                     max_seconds: float) -> dict[str, float]:
    """Median seconds per step of each stepper, timed in alternating rounds so machine noise hits all alike.

    A stepper takes the batch number and runs one training step on it. One untimed warm-up step each
    first (allocator, kernels, autocast caches); a round is cut short after max_seconds.
    """
    for step in steppers.values():
        step(0)
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for _ in range(rounds):
        for name, step in steppers.items():
            round_start = time.perf_counter()
            for i in range(steps):
                start = time.perf_counter()
                step(i)
                times[name].append(time.perf_counter() - start)
                if i >= 1 and time.perf_counter() - round_start > max_seconds:
                    break  # a slow precision on this machine (e.g. bf16 without native support)
    return {name: statistics.median(t) for name, t in times.items()}
