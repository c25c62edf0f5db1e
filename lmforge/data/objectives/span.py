"""T5's denoising objectives: span corruption, prefix LM, and a per-example (UL2-style) mixture of them.

Pure, batch-vectorised functions of token rows and a numpy Generator, or one Generator per row
(`denoise_rows`, the training loader's path: each row draws its own numbers, the rest is done for the
batch at once): the caller derives the Generators from (seed, epoch, position), so a resumed run
redraws exactly the same masks.

Span corruption follows the T5 paper and its `random_spans_noise_mask`: of a row of L tokens,
round(L * noise_density) are noise, split into round(noise / mean_span_length) spans. Both the noise
and the non-noise tokens are cut into that many non-empty segments, uniformly at random, and the
segments are interleaved starting with non-noise, so every row ends in a noise span. The encoder reads
the non-noise tokens with each noise span replaced by one sentinel (`<extra_id_0>`, `<extra_id_1>`, ...;
ids counting down from `sentinel_start`) and `</s>`; the decoder writes each sentinel followed by the
span it stands for, then `</s>`. Since every row of a given length has the same counts, inputs and
targets of a batch have fixed lengths, computed in advance by `span_lengths`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
from tokenizers import Tokenizer

from lmforge.data.tokenizer import SENTINEL, T5_EOS, T5_PAD
from lmforge.errors import LmforgeError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class SpanVocab:
    """The ids the denoising objectives write: `</s>`, `<pad>`, and the sentinels counting down."""

    eos: int
    pad: int
    sentinel_start: int  # id of <extra_id_0>; <extra_id_i> is sentinel_start - i
    num_sentinels: int

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer) -> "SpanVocab":
        ids = {}
        for name, token in (("eos", T5_EOS), ("pad", T5_PAD), ("sentinel_start", SENTINEL.format(0))):
            ids[name] = tokenizer.token_to_id(token)
            if ids[name] is None:
                raise LmforgeError(f"the tokenizer has no {token} token, which the span objectives need "
                                   f"(train it with model.family t5)")
        count = 1
        while tokenizer.token_to_id(SENTINEL.format(count)) == ids["sentinel_start"] - count:
            count += 1
        return cls(**ids, num_sentinels=count)

    def sentinel(self, i: int) -> int:
        return self.sentinel_start - i

    def is_sentinel(self, token: int) -> bool:
        return self.sentinel_start - self.num_sentinels < token <= self.sentinel_start


@dataclass(frozen=True)
class SpanLengths:
    """Raw tokens to take per row, and the (fixed) encoder input and decoder target lengths they give."""

    tokens: int
    inputs: int
    targets: int


@dataclass
class Seq2SeqExamples:
    """Encoder inputs (padded with pad, attention_mask False there) and labels (IGNORE_INDEX on padding)."""

    input_ids: np.ndarray  # (batch, input length) int64
    attention_mask: np.ndarray  # (batch, input length) bool
    labels: np.ndarray  # (batch, target length) int64


def check_span_settings(noise_density: float, mean_span_length: float) -> None:
    if not 0.0 < noise_density < 1.0:
        raise LmforgeError(f"span.noise_density must be in (0, 1), got {noise_density}")
    if not mean_span_length >= 1.0:
        raise LmforgeError(f"span.mean_span_length must be >= 1, got {mean_span_length}")


def _counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int] | None:
    """(noise tokens, noise spans) for a row of `length` tokens, or None when it cannot be corrupted."""
    num_noise = int(round(length * noise_density))
    num_spans = max(int(round(num_noise / mean_span_length)), 1)  # as T5's mask: at least one span
    # every span and every gap before a span holds >= 1 token
    if num_noise < 1 or length - num_noise < num_spans:
        return None
    return num_noise, num_spans


def span_counts(length: int, noise_density: float = 0.15, mean_span_length: float = 3.0) -> tuple[int, int]:
    """(noise tokens, noise spans) for a row of `length` tokens; LmforgeError if the row is too short."""
    check_span_settings(noise_density, mean_span_length)
    counts = _counts(length, noise_density, mean_span_length)
    if counts is None:
        shortest = next(n for n in range(1, 1_000_000) if _counts(n, noise_density, mean_span_length))
        raise LmforgeError(f"sequences of {length} tokens are too short to corrupt at span.noise_density="
                           f"{noise_density} and span.mean_span_length={mean_span_length} "
                           f"(need at least {shortest} tokens)")
    return counts


def span_lengths(block_size: int, noise_density: float = 0.15, mean_span_length: float = 3.0) -> SpanLengths:
    """The longest raw row whose corrupted input fits `block_size` tokens, and its target length.

    As T5's compute_input_and_target_lengths: input = non-noise + one sentinel per span + </s>,
    target = noise + one sentinel per span + </s>.
    """
    span_counts(block_size, noise_density, mean_span_length)  # validates, and block_size itself must corrupt

    def lengths(tokens: int) -> tuple[int, int] | None:
        counts = _counts(tokens, noise_density, mean_span_length)
        if counts is None:
            return None
        noise, spans = counts
        return tokens - noise + spans + 1, noise + spans + 1

    tokens = block_size
    while lengths(tokens) is None or lengths(tokens)[0] > block_size:
        tokens -= 1  # only when the </s> and sentinels push a short block over: shrink until it fits
        if tokens < 1:
            raise LmforgeError(f"model.block_size={block_size} is too short for span corruption at "
                               f"span.noise_density={noise_density}")
    while (grown := lengths(tokens + 1)) is not None and grown[0] <= block_size:
        tokens += 1
    inputs, targets = lengths(tokens)
    return SpanLengths(tokens, inputs, targets)


def _keys_for(num_items: int, num_segments: int) -> int:
    """Uniform keys one row draws to cut num_items into num_segments (none when there is nothing to cut)."""
    return num_items - 1 if num_segments > 1 else 0


def segmentation(keys: np.ndarray, num_items: int, num_segments: int) -> np.ndarray:
    """(rows, num_segments) lengths >= 1 summing to num_items, from (rows, _keys_for(...)) uniform keys.

    The cut points are the gaps of the num_segments - 1 smallest keys: a uniformly random set of cuts
    among the num_items - 1 gaps, so each composition is equally likely.
    """
    rows = len(keys)
    if num_segments == 1:
        return np.full((rows, 1), num_items, dtype=np.int64)
    cuts = np.argpartition(keys, num_segments - 2, axis=1)[:, : num_segments - 1] + 1
    cuts.sort(axis=1)
    bounds = np.concatenate([np.zeros((rows, 1), np.int64), cuts, np.full((rows, 1), num_items)], axis=1)
    return np.diff(bounds, axis=1)


def span_keys(length: int, noise_density: float = 0.15, mean_span_length: float = 3.0) -> tuple[int, int]:
    """(noise keys, non-noise keys): the uniforms a row of `length` draws, in this order, for its noise mask."""
    num_noise, num_spans = span_counts(length, noise_density, mean_span_length)
    return _keys_for(num_noise, num_spans), _keys_for(length - num_noise, num_spans)


def noise_mask_from_keys(keys: np.ndarray, length: int, noise_density: float = 0.15,
                         mean_span_length: float = 3.0) -> np.ndarray:
    """(rows, length) bool, True on noise, from each row's uniform keys (span_keys: the noise cuts' first)."""
    num_noise, num_spans = span_counts(length, noise_density, mean_span_length)
    rows, split = len(keys), _keys_for(num_noise, num_spans)
    noise = segmentation(keys[:, :split], num_noise, num_spans)
    kept = segmentation(keys[:, split:], length - num_noise, num_spans)
    segments = np.stack([kept, noise], axis=2).reshape(rows, 2 * num_spans)
    starts = np.cumsum(segments, axis=1)[:, :-1]
    start_marks = np.zeros((rows, length), dtype=np.int8)
    np.put_along_axis(start_marks, starts, 1, axis=1)
    return (np.cumsum(start_marks, axis=1) % 2).astype(bool)


def random_spans_noise_mask(rng: np.random.Generator, rows: int, length: int, noise_density: float = 0.15,
                            mean_span_length: float = 3.0) -> np.ndarray:
    """(rows, length) bool, True on noise: alternating non-noise / noise segments, the first non-noise."""
    noise_keys, kept_keys = span_keys(length, noise_density, mean_span_length)
    keys = np.concatenate([rng.random((rows, noise_keys)), rng.random((rows, kept_keys))], axis=1)
    return noise_mask_from_keys(keys, length, noise_density, mean_span_length)


def _spans_to_sentinels(tokens: np.ndarray, mask: np.ndarray, sentinel_start: int) -> np.ndarray:
    """Replace each run of True in `mask` by one sentinel (the i-th run by sentinel_start - i)."""
    previous = np.zeros_like(mask)
    previous[:, 1:] = mask[:, :-1]
    first = mask & ~previous
    sentinels = sentinel_start + 1 - np.cumsum(first, axis=1)
    out = np.where(first, sentinels, tokens)
    keep = ~(mask & previous)  # every row keeps the same count, so the flat selection reshapes
    return out[keep].reshape(len(tokens), -1)


def _with_eos(rows: np.ndarray, eos: int) -> np.ndarray:
    return np.concatenate([rows, np.full((len(rows), 1), eos, dtype=rows.dtype)], axis=1)


def _token_rows(tokens: np.ndarray) -> np.ndarray:
    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be (batch, length), got shape {tokens.shape}")
    return tokens


def _check_fits(length: int, denoiser: "Denoiser", vocab: SpanVocab) -> None:
    """LmforgeError if rows of `length` tokens cannot take this denoiser with this vocabulary."""
    if denoiser.kind == "prefix_lm":
        if length < 2:
            raise LmforgeError(f"prefix_lm needs rows of at least 2 tokens, got {length}")
        return
    _, num_spans = span_counts(length, denoiser.noise_density, denoiser.mean_span_length)
    if num_spans > vocab.num_sentinels:
        raise LmforgeError(f"rows of {length} tokens get {num_spans} noise spans but the tokenizer has only "
                           f"{vocab.num_sentinels} sentinels (raise the sentinel count, lower "
                           f"span.noise_density or model.block_size, or raise span.mean_span_length)")


def corrupt_spans(tokens: np.ndarray, mask: np.ndarray, vocab: SpanVocab) -> Seq2SeqExamples:
    """Span corruption of (batch, length) token rows at the noise positions `mask` (as many spans in every row)."""
    inputs = _with_eos(_spans_to_sentinels(tokens, mask, vocab.sentinel_start), vocab.eos)
    targets = _with_eos(_spans_to_sentinels(tokens, ~mask, vocab.sentinel_start), vocab.eos)
    return Seq2SeqExamples(inputs, np.ones(inputs.shape, dtype=bool), targets)


def span_corruption(tokens: np.ndarray, rng: np.random.Generator, vocab: SpanVocab, noise_density: float = 0.15,
                    mean_span_length: float = 3.0) -> Seq2SeqExamples:
    """T5 span corruption of (batch, length) token rows; outputs have span_lengths-consistent fixed widths."""
    tokens = _token_rows(tokens)
    rows, length = tokens.shape
    _check_fits(length, Denoiser("span", 1.0, noise_density, mean_span_length), vocab)
    mask = random_spans_noise_mask(rng, rows, length, noise_density, mean_span_length)
    return corrupt_spans(tokens, mask, vocab)


def split_prefix(tokens: np.ndarray, split: np.ndarray, vocab: SpanVocab) -> Seq2SeqExamples:
    """Prefix LM with row i's prefix being its first split[i] tokens (1 <= split < length); see prefix_lm."""
    rows, length = tokens.shape
    split = split.reshape(rows, 1)
    col = np.arange(length)[None, :]
    inputs = np.where(col < split, tokens, np.where(col == split, vocab.eos, vocab.pad))
    rest = length - split
    shifted = np.take_along_axis(tokens, np.minimum(col + split, length - 1), axis=1)
    labels = np.where(col < rest, shifted, np.where(col == rest, vocab.eos, IGNORE_INDEX))
    return Seq2SeqExamples(inputs, col <= split, labels)


def prefix_lm(tokens: np.ndarray, rng: np.random.Generator, vocab: SpanVocab) -> Seq2SeqExamples:
    """The encoder reads a uniformly random prefix (1 .. length-1 tokens) + </s>; the decoder writes the rest + </s>.

    Both sides are `length` wide: inputs padded with <pad>, labels with IGNORE_INDEX.
    """
    tokens = _token_rows(tokens)
    rows, length = tokens.shape
    _check_fits(length, Denoiser("prefix_lm"), vocab)
    return split_prefix(tokens, rng.integers(1, length, size=(rows, 1)), vocab)


@dataclass(frozen=True)
class Denoiser:
    """One objective of a mixture, drawn per example with probability weight / sum of weights."""

    kind: Literal["span", "prefix_lm"] = "span"
    weight: float = 1.0
    noise_density: float = 0.15  # span only
    mean_span_length: float = 3.0  # span only

    def lengths(self, tokens: int) -> tuple[int, int]:
        """(input, target) lengths for rows of `tokens` raw tokens."""
        if self.kind == "prefix_lm":
            return tokens, tokens
        noise, spans = span_counts(tokens, self.noise_density, self.mean_span_length)
        return tokens - noise + spans + 1, noise + spans + 1


def mixture_lengths(block_size: int, denoisers: Sequence[Denoiser]) -> SpanLengths:
    """Raw row length whose every denoiser's input fits block_size; widths are the widest over denoisers."""
    _check_denoisers(denoisers)
    tokens = min(block_size if d.kind == "prefix_lm" else
                 span_lengths(block_size, d.noise_density, d.mean_span_length).tokens for d in denoisers)
    inputs, targets = zip(*(d.lengths(tokens) for d in denoisers))
    return SpanLengths(tokens, max(inputs), max(targets))


def _check_denoisers(denoisers: Sequence[Denoiser]) -> None:
    if not denoisers:
        raise LmforgeError("span.mixture must name at least one denoiser")
    for i, d in enumerate(denoisers):
        if d.kind not in ("span", "prefix_lm"):
            raise LmforgeError(f"span.mixture[{i}].kind must be span or prefix_lm, got {d.kind!r}")
        if not d.weight > 0:
            raise LmforgeError(f"span.mixture[{i}].weight must be positive, got {d.weight}")
        if d.kind == "span":
            check_span_settings(d.noise_density, d.mean_span_length)


def denoise(tokens: np.ndarray, rng: np.random.Generator, vocab: SpanVocab, denoiser: Denoiser) -> Seq2SeqExamples:
    """Apply one denoiser to every row."""
    if denoiser.kind == "prefix_lm":
        return prefix_lm(tokens, rng, vocab)
    return span_corruption(tokens, rng, vocab, denoiser.noise_density, denoiser.mean_span_length)


def _probabilities(denoisers: Sequence[Denoiser]) -> np.ndarray:
    weights = np.array([d.weight for d in denoisers], dtype=np.float64)
    return weights / weights.sum()


def _mixture_examples(rows: int, length: int, vocab: SpanVocab, denoisers: Sequence[Denoiser], choice: np.ndarray,
                      build) -> Seq2SeqExamples:
    """Rows where choice == k made by build(k, their row numbers), in order of k, padded to the mixture's widths."""
    widths = [d.lengths(length) for d in denoisers]
    input_width, target_width = max(w[0] for w in widths), max(w[1] for w in widths)
    out = Seq2SeqExamples(np.full((rows, input_width), vocab.pad, dtype=np.int64),
                          np.zeros((rows, input_width), dtype=bool),
                          np.full((rows, target_width), IGNORE_INDEX, dtype=np.int64))
    for k in range(len(denoisers)):
        picked = np.flatnonzero(choice == k)
        if len(picked) == 0:
            continue
        part = build(k, picked)
        out.input_ids[picked, : part.input_ids.shape[1]] = part.input_ids
        out.attention_mask[picked, : part.input_ids.shape[1]] = part.attention_mask
        out.labels[picked, : part.labels.shape[1]] = part.labels
    return out


def denoise_mixture(tokens: np.ndarray, rng: np.random.Generator, vocab: SpanVocab,
                    denoisers: Sequence[Denoiser]) -> Seq2SeqExamples:
    """Each row gets one denoiser drawn by weight; outputs are padded to the mixture's fixed widths."""
    tokens = _token_rows(tokens)
    _check_denoisers(denoisers)
    rows, length = tokens.shape
    choice = rng.choice(len(denoisers), size=rows, p=_probabilities(denoisers))
    return _mixture_examples(rows, length, vocab, denoisers, choice,
                             lambda k, picked: denoise(tokens[picked], rng, vocab, denoisers[k]))


def denoise_rows(tokens: np.ndarray, rngs: Sequence[np.random.Generator], vocab: SpanVocab,
                 denoisers: Sequence[Denoiser]) -> Seq2SeqExamples:
    """Row i denoised with its own Generator rngs[i], all rows at once.

    Row by row the same examples as `denoise` (one denoiser) or `denoise_mixture` (several) given that row
    alone and rngs[i]: each row makes exactly their draws (its denoiser, then its noise-mask keys or split
    point), and the masks and layouts are then built for the whole batch with array operations.
    """
    tokens = _token_rows(tokens)
    _check_denoisers(denoisers)
    rows, length = tokens.shape
    if len(rngs) != rows:
        raise ValueError(f"{rows} rows but {len(rngs)} generators")
    for d in denoisers:
        _check_fits(length, d, vocab)
    keys = [sum(span_keys(length, d.noise_density, d.mean_span_length)) if d.kind == "span" else 0
            for d in denoisers]
    # as Generator.choice(len(denoisers), size=1, p=...) draws: one uniform, placed in the cumulative weights
    cdf = _probabilities(denoisers).cumsum()
    cdf /= cdf[-1]
    choice = np.zeros(rows, dtype=np.int64)
    draws: list[list[np.ndarray]] = [[] for _ in denoisers]
    for i, rng in enumerate(rngs):
        k = int(cdf.searchsorted(rng.random(), side="right")) if len(denoisers) > 1 else 0
        choice[i] = k
        draws[k].append(rng.integers(1, length, size=(1, 1))[0] if denoisers[k].kind == "prefix_lm"
                        else rng.random(keys[k]))

    def build(k: int, picked: np.ndarray) -> Seq2SeqExamples:
        d, drawn = denoisers[k], np.stack(draws[k])
        if d.kind == "prefix_lm":
            return split_prefix(tokens[picked], drawn, vocab)
        return corrupt_spans(tokens[picked], noise_mask_from_keys(drawn, length, d.noise_density,
                                                                   d.mean_span_length), vocab)

    if len(denoisers) == 1:
        return build(0, np.arange(rows))
    return _mixture_examples(rows, length, vocab, denoisers, choice, build)
