"""Span-corruption throughput: sequences per second at 128- and 512-token encoder inputs.

Measures `span_corruption` on batches of rows drawn from one Generator, `denoise_rows` on batches whose
every row has its own Generator made from (seed, epoch, position) (the training loader's path: the
generators are made and drawn from per row, the rest is batched), and one row per call of
`span_corruption` (what the loader did before, row by row), on random token ids from a 32,100-id
vocabulary with T5's 100 sentinels. Each figure is the best of --repeats timings of --seconds each. The project's goal is
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
from lmforge.data.loader import example_generators  # noqa: E402
from lmforge.data.objectives.span import Denoiser, SpanVocab, denoise_rows, span_corruption, span_lengths  # noqa: E402

VOCAB = SpanVocab(eos=1, pad=0, sentinel_start=32_099, num_sentinels=100)


def sequences_per_second(block_size: int, batch: int, seconds: float, repeats: int, per_row: bool = False) -> float:
    """Best sequences/s of span_corruption (per_row: denoise_rows with a Generator per row) on `batch` rows."""
    lengths = span_lengths(block_size)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 32_000, size=(batch, lengths.tokens)).astype(np.uint16)  # a token store's dtype
    best = 0.0
    for _ in range(repeats):
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            if per_row:
                positions = np.arange(done, done + batch)
                out = denoise_rows(tokens, example_generators(0, positions // 10**6, positions, 2), VOCAB,
                                   [Denoiser()])
            else:
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
        loader = sequences_per_second(block_size, args.batch, args.seconds, args.repeats, per_row=True)
        single = sequences_per_second(block_size, 1, args.seconds, args.repeats)
        print(f"block_size {block_size}: batch {args.batch} {batched:,.0f} seq/s  |  batch, a generator per row "
              f"{loader:,.0f} seq/s  |  one row per call {single:,.0f} seq/s  |  ratios {batched / single:.1f}, "
              f"{loader / single:.1f}")


if __name__ == "__main__":
    main()
