"""Helpers shared by the benchmarks: timing, and the gcide corpus with its BPE tokenizer."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
# ../shared next to the repository (or next to the worktrees' folder, for a git worktree)
SHARED = next((p / "shared" for p in (ROOT.parent, ROOT.parent.parent) if (p / "shared").is_dir()), ROOT.parent / "shared")
GCIDE = SHARED / "data" / "gcide" / "gcide.txt"


def gcide_text() -> str:
    """The whole gcide dictionary (it has a few non-UTF-8 bytes; lmforge replaces them too)."""
    return GCIDE.read_text(encoding="utf-8", errors="replace")


def gcide_bpe_tokenizer(text: str):
    """The data benchmarks' tokenizer: byte-level BPE, vocab 8,192, trained on gcide's first 20 MB
    (paragraphs as documents)."""
    sys.path.insert(0, str(ROOT))
    from lmforge.config import TokenizerConfig
    from lmforge.data.tokenizer import train_tokenizer

    return train_tokenizer(text[:20_000_000].split("\n\n"), TokenizerConfig(kind="bpe", vocab_size=8192),
                           show_progress=False)


def alternate_rounds(steppers: dict[str, Callable[[int], float]], rounds: int, steps: int,
                     max_seconds: float, warm_up: bool = True) -> dict[str, float]:
    """Median seconds per step of each stepper, timed in alternating rounds so machine noise hits all alike.

    A stepper takes the batch number and runs one training step on it. One untimed warm-up step each
    first (allocator, kernels, autocast caches) unless the caller took it; a round is cut short after
    max_seconds.
    """
    for step in steppers.values() if warm_up else ():
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


def make_step(model, optimizer, loss_of: Callable, precision: str) -> Callable:
    """A function running one training step (forward under autocast, backward, clip, AdamW) on a batch;
    `loss_of(model, batch)` computes the loss the way that model's API wants it."""
    import torch

    from lmforge.train.device import autocast

    device = torch.device("cpu")

    def step(batch) -> float:
        with autocast(device, precision):
            loss = loss_of(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step
