"""Span-corruption throughput: sequences per second at 128- and 512-token encoder inputs.

Measures `span_corruption` on batches of rows (the vectorised path a loader uses) and one row per call
(what a per-example loop would cost), on random token ids from a 32,100-id vocabulary with T5's 100
sentinels. Each figure is the best of --repeats timings of --seconds each. The project's goal is
>= 5,000 sequences/s of 128 tokens.

    flock /tmp/lmforge-heavy.lock .venv/bin/python bench/span_throughput.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lmforge.data.objectives.span import SpanVocab, span_corruption, span_lengths  # noqa: E402

VOCAB = SpanVocab(eos=1, pad=0, sentinel_start=32_099, num_sentinels=100)


def sequences_per_second(block_size: int, batch: int, seconds: float, repeats: int) -> float:
    lengths = span_lengths(block_size)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 32_000, size=(batch, lengths.tokens)).astype(np.uint16)  # a token store's dtype
    best = 0.0
    for _ in range(repeats):
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            out = span_corruption(tokens, rng, VOCAB)
            done += batch
        assert out.input_ids.shape == (batch, lengths.inputs)
        best = max(best, done / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for block_size in (128, 512):
        batched = sequences_per_second(block_size, args.batch, args.seconds, args.repeats)
        single = sequences_per_second(block_size, 1, args.seconds, args.repeats)
        print(f"block_size {block_size}: batch {args.batch} {batched:,.0f} seq/s  |  one row per call "
              f"{single:,.0f} seq/s  |  ratio {batched / single:.1f}")


if __name__ == "__main__":
    main()
