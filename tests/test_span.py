"""T5 span corruption, prefix LM and their mixture: exactness, statistics, fixed lengths, bad input."""

from math import comb

import numpy as np
import pytest

from lmforge.data.objectives.span import (
    IGNORE_INDEX, Denoiser, SpanLengths, SpanVocab, denoise_mixture, mixture_lengths, prefix_lm,
    random_spans_noise_mask, span_corruption, span_counts, span_lengths,
)
from lmforge.errors import LmforgeError

VOCAB = SpanVocab(eos=1, pad=0, sentinel_start=499, num_sentinels=100)  # ids 400..499 are sentinels
WORDS = (3, 400)  # ordinary token ids drawn in the tests


def is_sentinel(token: int) -> bool:
    return VOCAB.sentinel_start - VOCAB.num_sentinels < token <= VOCAB.sentinel_start


def reconstruct(inputs: list[int], targets: list[int]) -> list[int]:
    """Undo span corruption by hand: each input sentinel is replaced by the target span after the same sentinel."""
    assert inputs[-1] == VOCAB.eos and targets[-1] == VOCAB.eos
    spans, current = {}, None
    for token in targets[:-1]:
        if is_sentinel(token):
            current = token
            spans[current] = []
        else:
            spans[current].append(token)
    out = []
    for token in inputs[:-1]:
        out.extend(spans.pop(token) if is_sentinel(token) else [token])
    assert not spans, "a target span has no sentinel in the input"
    return out


def test_inputs_and_targets_reconstruct_the_tokens_for_many_lengths():
    rng = np.random.default_rng(0)
    for length in list(range(10, 80)) + [127, 128, 141, 300, 512, 568, 1000]:
        for density, mean_span in ((0.15, 3.0), (0.5, 8.0), (0.3, 1.0)):
            try:
                span_counts(length, density, mean_span)
            except LmforgeError:
                continue
            if span_counts(length, density, mean_span)[1] > VOCAB.num_sentinels:
                continue
            tokens = rng.integers(*WORDS, size=(5, length))
            ex = span_corruption(tokens, rng, VOCAB, density, mean_span)
            assert ex.attention_mask.all()
            for row in range(5):
                assert reconstruct(ex.input_ids[row].tolist(), ex.labels[row].tolist()) == tokens[row].tolist()


def test_sentinels_count_down_from_extra_id_0_in_inputs_and_targets():
    rng = np.random.default_rng(1)
    ex = span_corruption(rng.integers(*WORDS, size=(8, 568)), rng, VOCAB)
    for inputs, targets in zip(ex.input_ids, ex.labels):
        in_sentinels = [t for t in inputs if is_sentinel(t)]
        out_sentinels = [t for t in targets if is_sentinel(t)]
        expected = [VOCAB.sentinel_start - i for i in range(len(in_sentinels))]
        assert in_sentinels == expected and out_sentinels == expected
        assert targets[0] == VOCAB.sentinel_start  # targets open with <extra_id_0>
        assert inputs[-2] == expected[-1]  # rows end in a noise span (T5's layout)


def _runs(mask_row: np.ndarray) -> list[int]:
    """Lengths of the runs of True in a bool row, by walking it."""
    runs, count = [], 0
    for v in mask_row:
        if v:
            count += 1
        elif count:
            runs.append(count)
            count = 0
    return runs + ([count] if count else [])


def test_noise_density_and_mean_span_length_over_many_tokens():
    rng = np.random.default_rng(2)
    noise = total = 0
    runs: list[int] = []
    for length in rng.integers(60, 700, size=400):  # ~150k tokens over varied lengths
        mask = random_spans_noise_mask(rng, 1, int(length), 0.15, 3.0)[0]
        noise += int(mask.sum())
        total += int(length)
        runs += _runs(mask)
    assert total >= 100_000
    assert abs(noise / total - 0.15) < 0.003
    assert abs(np.mean(runs) - 3.0) < 0.1


def test_span_lengths_follow_uniform_compositions():
    """Noise span lengths of one row length: the first span's length j has probability
    C(n-j-1, k-2) / C(n-1, k-1) when n noise tokens are cut into k non-empty spans uniformly."""
    rng = np.random.default_rng(3)
    n, k = span_counts(568)
    mask = random_spans_noise_mask(rng, 20_000, 568)
    first_len = np.array([_runs(row)[0] for row in mask[:4000]])
    longest = n - k + 1  # the other k - 1 spans hold at least one token each
    observed = np.bincount(first_len, minlength=longest + 1)[1:] / len(first_len)
    expected = np.array([comb(n - j - 1, k - 2) / comb(n - 1, k - 1) for j in range(1, longest + 1)])
    assert len(observed) == longest
    assert np.abs(observed - expected).sum() / 2 < 0.04  # total variation distance
    assert not mask[:, 0].any() and mask[:, -1].all()
    # every position other than the ends is noise at about the overall rate (no position bias inside the row)
    assert abs(mask[:, 200:400].mean() - n / 568) < 0.01


@pytest.mark.parametrize("block_size", [16, 32, 64, 100, 128, 256, 512, 1024])
@pytest.mark.parametrize("density,mean_span", [(0.15, 3.0), (0.5, 3.0), (0.25, 8.0)])
def test_corrupted_lengths_equal_the_precomputed_ones(block_size, density, mean_span):
    lengths = span_lengths(block_size, density, mean_span)
    if span_counts(lengths.tokens, density, mean_span)[1] > VOCAB.num_sentinels:
        return
    rng = np.random.default_rng(block_size)
    ex = span_corruption(rng.integers(*WORDS, size=(4, lengths.tokens)), rng, VOCAB, density, mean_span)
    assert ex.input_ids.shape == (4, lengths.inputs) and ex.labels.shape == (4, lengths.targets)
    assert lengths.inputs <= block_size
    noise, spans = span_counts(lengths.tokens + 1, density, mean_span)  # one more token no longer fits
    assert lengths.tokens + 1 - noise + spans + 1 > block_size


def test_t5_reference_lengths():
    # the numbers T5's compute_input_and_target_lengths gives for 512-token inputs (used by T5 and nanoT5)
    assert span_lengths(512) == SpanLengths(tokens=568, inputs=512, targets=114)


def test_same_generator_state_gives_the_same_examples():
    tokens = np.random.default_rng(4).integers(*WORDS, size=(6, 141))
    a = span_corruption(tokens, np.random.default_rng([7, 2, 40]), VOCAB)
    b = span_corruption(tokens, np.random.default_rng([7, 2, 40]), VOCAB)
    c = span_corruption(tokens, np.random.default_rng([7, 3, 40]), VOCAB)
    assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.input_ids, c.input_ids)


def test_prefix_lm_splits_each_row_into_prefix_and_rest():
    rng = np.random.default_rng(5)
    tokens = rng.integers(*WORDS, size=(200, 33))
    ex = prefix_lm(tokens, rng, VOCAB)
    splits = []
    for row, inputs, mask, labels in zip(tokens, ex.input_ids, ex.attention_mask, ex.labels):
        prefix = inputs[mask].tolist()
        rest = labels[labels != IGNORE_INDEX].tolist()
        assert prefix[-1] == VOCAB.eos and rest[-1] == VOCAB.eos
        assert prefix[:-1] + rest[:-1] == row.tolist()
        assert (inputs[~mask] == VOCAB.pad).all()
        splits.append(len(prefix) - 1)
    assert min(splits) >= 1 and max(splits) <= 32 and len(set(splits)) > 20


def test_mixture_draws_denoisers_by_weight_and_keeps_fixed_widths():
    denoisers = [Denoiser("span", weight=3.0), Denoiser("span", 1.0, 0.5, 32.0), Denoiser("prefix_lm", 1.0)]
    lengths = mixture_lengths(128, denoisers)
    rng = np.random.default_rng(6)
    tokens = rng.integers(*WORDS, size=(2000, lengths.tokens))
    ex = denoise_mixture(tokens, rng, VOCAB, denoisers)
    assert ex.input_ids.shape == (2000, lengths.inputs) and ex.labels.shape == (2000, lengths.targets)
    assert lengths.inputs <= 128
    kinds = []
    for row, inputs, mask, labels in zip(tokens, ex.input_ids, ex.attention_mask, ex.labels):
        inputs, labels = inputs[mask].tolist(), labels[labels != IGNORE_INDEX].tolist()
        if is_sentinel(labels[0]):
            assert reconstruct(inputs, labels) == row.tolist()
            noise = len(labels) - 1 - sum(map(is_sentinel, labels))
            kinds.append(0 if noise == span_counts(lengths.tokens)[0] else 1)
        else:
            assert inputs[:-1] + labels[:-1] == row.tolist()
            kinds.append(2)
    share = np.bincount(kinds, minlength=3) / len(kinds)
    assert np.allclose(share, [0.6, 0.2, 0.2], atol=0.04)


def test_span_vocab_finds_sentinels_counting_down_in_a_tokenizer():
    from tokenizers import Tokenizer, models

    names = ["<pad>", "</s>", "<unk>", "a", "b"] + [f"<extra_id_{i}>" for i in reversed(range(4))]
    tokenizer = Tokenizer(models.WordLevel({t: i for i, t in enumerate(names)}, unk_token="<unk>"))
    assert SpanVocab.from_tokenizer(tokenizer) == SpanVocab(eos=1, pad=0, sentinel_start=8, num_sentinels=4)
    plain = Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "<unk>": 2}, unk_token="<unk>"))
    with pytest.raises(LmforgeError, match="<extra_id_0>"):
        SpanVocab.from_tokenizer(plain)


@pytest.mark.parametrize("call,message", [
    (lambda: span_counts(3), "too short to corrupt"),
    (lambda: span_lengths(512, noise_density=0.0), "span.noise_density must be in"),
    (lambda: span_lengths(512, noise_density=1.2), "span.noise_density must be in"),
    (lambda: span_lengths(512, mean_span_length=0.5), "span.mean_span_length must be"),
    (lambda: span_corruption(np.full((2, 5000), 7), np.random.default_rng(0), VOCAB), "only 100 sentinels"),
    (lambda: span_corruption(np.full((2, 3), 7), np.random.default_rng(0), VOCAB), "too short to corrupt"),
    (lambda: prefix_lm(np.full((2, 1), 7), np.random.default_rng(0), VOCAB), "at least 2 tokens"),
    (lambda: mixture_lengths(128, [Denoiser("span", weight=0.0)]), r"span.mixture\[0\].weight"),
    (lambda: mixture_lengths(128, [Denoiser("bogus")]), r"span.mixture\[0\].kind"),
    (lambda: mixture_lengths(128, []), "at least one denoiser"),
])
def test_bad_settings_raise_one_line_errors(call, message):
    with pytest.raises(LmforgeError, match=message) as info:
        call()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("length,denoisers", [
    (141, [Denoiser()]),
    (568, [Denoiser()]),
    (40, [Denoiser("span", 1.0, 0.5, 1.0)]),
    (33, [Denoiser("prefix_lm")]),
    (128, [Denoiser("span", 2.0), Denoiser("span", 1.0, 0.5, 32.0), Denoiser("prefix_lm", 1.0)]),
    (97, [Denoiser("prefix_lm", 1.0), Denoiser("span", 3.0, 0.3, 2.0)]),
])
def test_denoise_rows_makes_each_row_as_if_it_were_denoised_alone_with_its_generator(length, denoisers):
    """The batched per-example path draws exactly what the one-row calls draw: same examples, bit for bit."""
    from lmforge.data.objectives.span import denoise, denoise_rows

    tokens = np.random.default_rng(length).integers(*WORDS, size=(300, length))
    generators = lambda: [np.random.default_rng([9, 1, i, 2]) for i in range(len(tokens))]  # noqa: E731
    batched = denoise_rows(tokens, generators(), VOCAB, denoisers)
    alone = [denoise(row[None], rng, VOCAB, denoisers[0]) if len(denoisers) == 1 else
             denoise_mixture(row[None], rng, VOCAB, denoisers) for row, rng in zip(tokens, generators())]
    for key in ("input_ids", "attention_mask", "labels"):
        assert np.array_equal(getattr(batched, key), np.concatenate([getattr(one, key) for one in alone]))
    if len(denoisers) > 1:  # both span (sentinel-led, unpadded) and prefix-LM (padded) examples occur
        assert len({(bool(mask.all()), bool(is_sentinel(labels[0]))) for mask, labels in
                    zip(batched.attention_mask, batched.labels)}) >= 2
