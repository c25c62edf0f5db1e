"""BERT's objective: sentence pairs, NSP labels, masking statistics, whole-word masking, the loader."""

import numpy as np
import pytest
import torch

from lmforge.config import TokenizerConfig
from lmforge.data.encode import encode_documents
from lmforge.data.loader import MLMLoader
from lmforge.data.objectives.mlm import (IGNORE_INDEX, BertVocab, MaskingSpec, SentenceIndex, build_pair,
                                         build_pairs, mask_batch, mask_draws, mask_tokens, plan_epoch,
                                         trimmed_from_front, truncated_lengths, word_ids)
from lmforge.data.store import SplitReader
from lmforge.data.tokenizer import train_tokenizer
from lmforge.errors import LmforgeError

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu extraordinary unbelievable "
         "reconstruction photosynthesis the a of and to in is was").split()


def _documents(n_docs: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        sentences = []
        for _ in range(int(rng.integers(3, 12))):
            words = rng.choice(WORDS, size=int(rng.integers(4, 20)))
            sentences.append(" ".join(words).capitalize() + ".")
        docs.append(" ".join(sentences))
    return docs


@pytest.fixture(scope="module")
def bert_data():
    docs = _documents(400)
    tokenizer = train_tokenizer(docs, TokenizerConfig(kind="wordpiece", vocab_size=150), family="bert",
                                show_progress=False)
    arrays = encode_documents(tokenizer, docs, "bert")
    starts = np.concatenate([[0], np.cumsum([len(a) for a in arrays])[:-1]]).astype(np.int64)
    tokens = np.concatenate(arrays).astype(np.uint16)
    split = SplitReader([tokens], np.asarray([0, len(tokens)]), starts)
    return tokenizer, BertVocab.from_tokenizer(tokenizer), split


def _loader(bert_data, **kwargs) -> MLMLoader:
    _, vocab, split = bert_data
    options = dict(seq_len=64, batch_size=16, seed=3, masking=MaskingSpec())
    options.update(kwargs)
    return MLMLoader(split, vocab, **options)


def test_special_tokens_come_first_with_pad_zero(bert_data):
    tokenizer, vocab, _ = bert_data
    assert [tokenizer.id_to_token(i) for i in range(5)] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert vocab.pad == 0 and set(vocab.special) == {0, 1, 2, 3, 4}
    assert tokenizer.encode("alpha", "bravo").type_ids == [0, 0, 0, 1, 1]  # [CLS] a [SEP] b [SEP]


def test_nsp_labels_are_balanced_and_pairs_are_right(bert_data):
    _, vocab, split = bert_data
    index = SentenceIndex.build(split, vocab.sep)
    doc_of = np.searchsorted(index.doc_first, np.arange(index.num_sentences), side="right") - 1
    labels = []
    for epoch in range(6):
        rows, stats = plan_epoch(index, 61, np.random.default_rng([0, epoch]), short_seq_prob=0.1)
        for a_first, a_end, b_first, b_end, label in rows:
            assert a_first < a_end and b_first < b_end
            assert doc_of[a_first] == doc_of[a_end - 1]  # A is consecutive sentences of one document
            if label == 0:
                assert b_first == a_end and doc_of[b_end - 1] == doc_of[a_first]  # B is A's continuation
            else:
                assert doc_of[b_first] != doc_of[a_first]  # B comes from another document
        labels.extend(rows[:, 4])
    assert len(labels) > 2000
    assert abs(np.mean(labels) - 0.5) < 0.02


def test_examples_have_bert_layout(bert_data):
    loader = _loader(bert_data)
    vocab = loader.vocab
    for b in range(5):
        batch = loader.micro_batch(b * loader.batch_size)
        for ids, types, attention, labels in zip(batch["input_ids"], batch["token_type_ids"],
                                                 batch["attention_mask"], batch["mlm_labels"]):
            original = torch.where(labels != IGNORE_INDEX, labels, ids)
            n = int(attention.sum())
            assert attention[:n].all() and not attention[n:].any()  # real tokens first, then padding
            assert (original[n:] == vocab.pad).all() and (types[n:] == 0).all()
            seps = torch.nonzero(original[:n] == vocab.sep).flatten().tolist()
            assert original[0] == vocab.cls and len(seps) == 2 and seps[1] == n - 1
            assert seps[0] > 1 and seps[1] > seps[0] + 1  # A and B are both non-empty
            assert (types[: seps[0] + 1] == 0).all() and (types[seps[0] + 1: n] == 1).all()


def test_masking_statistics_match_the_spec(bert_data):
    loader = _loader(bert_data)
    vocab = loader.vocab
    selected = candidates = as_mask = as_random = kept = 0
    batch_index = 0
    while candidates < 100_000:
        batch = loader.micro_batch(batch_index * loader.batch_size)
        batch_index += 1
        ids, labels = batch["input_ids"], batch["mlm_labels"]
        chosen = labels != IGNORE_INDEX
        original = torch.where(chosen, labels, ids)
        special = torch.isin(original, torch.from_numpy(vocab.special))
        assert not (chosen & special).any()  # special tokens are never selected
        candidates += int((~special).sum())
        selected += int(chosen.sum())
        as_mask += int((ids[chosen] == vocab.mask).sum())
        kept += int((ids[chosen] == labels[chosen]).sum())
        as_random += int(((ids[chosen] != vocab.mask) & (ids[chosen] != labels[chosen])).sum())
    assert abs(selected / candidates - 0.15) < 0.005
    # a random replacement equals the original 1 time in |vocab| and then counts as kept
    assert abs(as_mask / selected - 0.8) < 0.01
    assert abs(as_random / selected - 0.1) < 0.01
    assert abs(kept / selected - 0.1) < 0.01


def test_masking_rate_and_ratios_are_configurable(bert_data):
    _, vocab, _ = bert_data
    rng = np.random.default_rng(0)
    ids = np.concatenate([[vocab.cls], rng.integers(5, vocab.vocab_size, 2000), [vocab.sep]])
    masked, labels = mask_tokens(ids, np.zeros_like(ids), vocab, MaskingSpec(0.4, 1.0, 0.0), rng, vocab.random_pool)
    chosen = labels != IGNORE_INDEX
    assert abs(chosen.mean() - 0.4) < 0.01 and (masked[chosen] == vocab.mask).all()
    assert (masked[~chosen] == ids[~chosen]).all()


def test_whole_word_masking_never_splits_a_word(bert_data):
    loader = _loader(bert_data, masking=MaskingSpec(whole_word=True))
    vocab = loader.vocab
    assert vocab.continues_word is not None and vocab.continues_word.any()
    split_words = whole_words_seen = 0
    selected = candidates = 0
    for b in range(20):
        batch = loader.micro_batch(b * loader.batch_size)
        for ids, types, labels in zip(batch["input_ids"].numpy(), batch["token_type_ids"].numpy(),
                                      batch["mlm_labels"].numpy()):
            original = np.where(labels != IGNORE_INDEX, labels, ids)
            cand = np.flatnonzero(~np.isin(original, vocab.special))
            words = word_ids(original, types, cand, vocab)
            chosen = labels[cand] != IGNORE_INDEX
            for w in np.unique(words[chosen]):
                members = chosen[words == w]
                split_words += int(not members.all())
                whole_words_seen += int(len(members) > 1)
            selected += int(chosen.sum())
            candidates += len(cand)
    assert split_words == 0
    assert whole_words_seen > 50  # multi-piece words were masked, whole
    assert 0.14 < selected / candidates <= 0.155


def test_loader_is_deterministic_resumable_and_rank_sharded(bert_data):
    a, b = _loader(bert_data), _loader(bert_data)
    for _ in range(3):
        x, y = a.next(), b.next()
        assert all(torch.equal(x[k], y[k]) for k in x)
    state = a.state_dict()
    expected = [a.next() for _ in range(2)]
    fresh = _loader(bert_data)
    fresh.load_state_dict(state)
    for batch in expected:
        got = fresh.next()
        assert all(torch.equal(batch[k], got[k]) for k in batch)
    single = _loader(bert_data, batch_size=8)
    ranks = [_loader(bert_data, batch_size=8, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        whole = single.next()
        parts = [r.next() for r in ranks]
        assert torch.equal(torch.cat([p["input_ids"] for p in parts]), whole["input_ids"])


def test_masks_are_drawn_afresh_each_epoch_but_evaluation_is_fixed(bert_data):
    train = _loader(bert_data, batch_size=4)
    per_epoch = train.examples_per_epoch
    first, later = train.examples(np.asarray([0, per_epoch]))["mlm_labels"]  # position 0 of epochs 0 and 1
    assert not torch.equal(first, later)
    fixed = _loader(bert_data, batch_size=4, shuffle=False, seed=0)
    again = fixed.examples(np.asarray([5, 5 + fixed.examples_per_epoch]))
    assert all(torch.equal(column[0], column[1]) for column in again.values())


def test_bad_inputs_give_clear_errors(bert_data):
    tokenizer, vocab, split = bert_data
    with pytest.raises(LmforgeError, match="block_size=4"):
        _loader(bert_data, seq_len=4)
    # a corpus of one-sentence documents cannot form actual-next pairs
    arrays = encode_documents(tokenizer, ["Alpha bravo charlie."] * 2, "bert")
    starts = np.asarray([0, len(arrays[0])], dtype=np.int64)
    one_sentence = SplitReader([np.concatenate(arrays)], np.asarray([0, sum(map(len, arrays))]), starts)
    index = SentenceIndex.build(one_sentence, vocab.sep)
    rows, stats = plan_epoch(index, 20, np.random.default_rng(0), 0.0)
    assert (rows[:, 4] == 1).all() and stats.skipped_single_sentence > 0
    # a single document cannot give random partners
    single_doc = SplitReader([np.concatenate(arrays)], np.asarray([0, sum(map(len, arrays))]), starts[:1])
    with pytest.raises(LmforgeError, match="at least 2 documents"):
        plan_epoch(SentenceIndex.build(single_doc, vocab.sep), 20, np.random.default_rng(0), 0.0)
    # without NSP a single document is fine: segments only, no NSP label
    rows, _ = plan_epoch(SentenceIndex.build(single_doc, vocab.sep), 20, np.random.default_rng(0), 0.0,
                         next_sentence=False)
    assert len(rows) and (rows[:, 4] == IGNORE_INDEX).all()


def test_build_pair_truncates_the_longer_segment():
    vocab = BertVocab(cls=2, sep=3, pad=0, mask=4, vocab_size=100, special=np.arange(5), continues_word=None)
    a, b = np.arange(10, 60), np.arange(60, 70)
    ids, types, attention = build_pair(a, b, 32, vocab, np.random.default_rng(0))
    assert attention.all() and ids[0] == 2 and (ids == 3).sum() == 2
    b_kept = ids[types == 1][:-1]
    assert np.array_equal(b_kept, b)  # the shorter segment is untouched


def test_truncation_lengths_equal_trimming_one_token_at_a_time():
    rng = np.random.default_rng(1)
    len_a, len_b = rng.integers(0, 200, 3000), rng.integers(0, 200, 3000)
    budget = rng.integers(2, 150, 3000)
    for la, lb, m in zip(len_a, len_b, budget):
        new_a, new_b = truncated_lengths(la, lb, int(m))
        a, b = int(la), int(lb)
        while a + b > m:  # the longer loses a token; A on a tie
            a, b = (a - 1, b) if a >= b else (a, b - 1)
        assert (int(new_a), int(new_b)) == (a, b)


def _naive_pair(split, index, row, seq_len, vocab, front_a, front_b, sep):
    """[CLS] A [SEP] B [SEP] read sentence by sentence, trimmed by the given fronts and lengths."""
    def segment(first, end):
        parts = [split.read(int(index.starts[s]), int(index.ends[s] - index.starts[s])) for s in range(first, end)]
        ids = np.concatenate(parts).astype(np.int64)
        assert not (ids == sep).any()
        return ids
    a, b = segment(row[0], row[1]), segment(row[2], row[3])
    new_a, new_b = (int(n) for n in truncated_lengths(len(a), len(b), seq_len - 3))
    a, b = a[front_a: front_a + new_a], b[front_b: front_b + new_b]
    ids = np.concatenate([[vocab.cls], a, [vocab.sep], b, [vocab.sep]])
    return np.pad(ids, (0, seq_len - len(ids)), constant_values=vocab.pad), len(a) + 2


def test_build_pairs_equals_reading_each_pair_sentence_by_sentence(bert_data):
    _, vocab, split = bert_data
    index = SentenceIndex.build(split, vocab.sep)
    rows, _ = plan_epoch(index, 45, np.random.default_rng(2), short_seq_prob=0.1)
    rows = rows[:300]
    rngs = [np.random.default_rng(i) for i in range(len(rows))]
    ids, types, attention = build_pairs(split, index, rows, 48, vocab, rngs)
    assert (rows[:, 1] - rows[:, 0] > 0).all()
    trimmed = 0
    for i, row in enumerate(rows):
        # the fronts each example's generator drew (the same draws, replayed)
        rng = np.random.default_rng(i)
        cum = index.text_offsets
        len_a, len_b = cum[row[1]] - cum[row[0]], cum[row[3]] - cum[row[2]]
        new_a, new_b = truncated_lengths(len_a, len_b, 45)
        fronts = [trimmed_from_front(int(n), rng) for n in (len_a - new_a, len_b - new_b)]
        trimmed += int(new_a + new_b < len_a + len_b)
        expected, b_starts = _naive_pair(split, index, row, 48, vocab, *fronts, vocab.sep)
        n = int(attention[i].sum())
        assert np.array_equal(ids[i], expected)
        assert (types[i, :b_starts] == 0).all() and (types[i, b_starts:n] == 1).all() and (types[i, n:] == 0).all()
    assert trimmed > 50  # the truncation path was exercised


def test_each_document_is_cut_into_consecutive_chunks_and_random_partners_give_sentences_back(bert_data):
    _, vocab, split = bert_data
    index = SentenceIndex.build(split, vocab.sep)
    rows, _ = plan_epoch(index, 61, np.random.default_rng(5), short_seq_prob=0.1)
    doc_of = np.searchsorted(index.doc_first, rows[:, 0], side="right") - 1
    for d in np.unique(doc_of):
        mine = rows[doc_of == d]
        expected_start = index.doc_first[d]
        for a_first, a_end, b_first, b_end, label in mine:
            # a chunk starts where the previous one stopped (or one sentence earlier: A reused at the end)
            assert a_first == expected_start or (a_first == expected_start - 1 and b_end == index.doc_first[d + 1])
            expected_start = a_end if label == 1 else b_end  # a random partner gives the rest back
        assert expected_start == index.doc_first[d + 1]  # every sentence of the document is used


def _naive_masks(ids, types, vocab, spec, draws, pool):
    """Masking of one sequence from its draws, position by position (the reference for mask_batch)."""
    seq_len = len(ids)
    rounding, keys, roll, pick = draws[0], draws[1: seq_len + 1], draws[seq_len + 1: 2 * seq_len + 1], \
        draws[2 * seq_len + 1:]
    candidates = [p for p in range(seq_len) if ids[p] not in set(vocab.special.tolist())]
    k = min(len(candidates), int(np.floor(len(candidates) * spec.rate + rounding)))
    if spec.whole_word:
        words = []
        for p in candidates:
            joins = (words and words[-1][-1] == p - 1 and types[p] == types[p - 1]
                     and vocab.continues_word[ids[p]])
            words[-1].append(p) if joins else words.append([p])
        chosen, covered = [], 0
        for word in sorted(words, key=lambda w: keys[w[0]]):
            if covered + len(word) <= k:
                chosen += word
                covered += len(word)
    else:
        chosen = sorted(candidates, key=lambda p: keys[p])[:k]
    masked, labels = ids.copy(), np.full(seq_len, IGNORE_INDEX)
    for p in chosen:
        labels[p] = ids[p]
        if roll[p] < spec.mask_token_fraction:
            masked[p] = vocab.mask
        elif roll[p] < spec.mask_token_fraction + spec.random_token_fraction:
            masked[p] = pool[int(pick[p] * len(pool))]
    return masked, labels


@pytest.mark.parametrize("whole_word", [False, True])
def test_mask_batch_equals_masking_each_sequence_position_by_position(bert_data, whole_word):
    loader = _loader(bert_data)
    vocab, spec = loader.vocab, MaskingSpec(rate=0.3, whole_word=whole_word)
    batch = loader.micro_batch(0)
    ids = torch.where(batch["mlm_labels"] != IGNORE_INDEX, batch["mlm_labels"], batch["input_ids"]).numpy()
    types = batch["token_type_ids"].numpy()
    rng = np.random.default_rng(8)
    draws = np.stack([mask_draws(rng, ids.shape[1]) for _ in ids])
    masked, labels = mask_batch(ids, types, vocab, spec, draws, vocab.random_pool)
    for i in range(len(ids)):
        expected_masked, expected_labels = _naive_masks(ids[i], types[i], vocab, spec, draws[i], vocab.random_pool)
        assert np.array_equal(labels[i], expected_labels) and np.array_equal(masked[i], expected_masked)


@pytest.mark.parametrize("workers", [1, 2])
def test_background_workers_give_the_same_bert_batches(bert_data, workers):
    # micro-batches of 4, 2 per global batch; the run crosses into the second epoch
    reference = _loader(bert_data, batch_size=8, micro_batch_size=4)
    count = 2 * (reference.batches_per_epoch + 5)
    expected = [reference.next() for _ in range(count)]
    loader = _loader(bert_data, batch_size=8, micro_batch_size=4, workers=workers)
    got = [loader.next() for _ in range(count)]
    loader.close()
    assert all(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(expected, got))


def test_bert_loader_resumes_mid_epoch_with_workers_as_if_uninterrupted(bert_data):
    reference = _loader(bert_data, batch_size=8)
    uninterrupted = [reference.next() for _ in range(30)]
    loader = _loader(bert_data, batch_size=8, workers=2)
    first = [loader.next() for _ in range(11)]
    state = loader.state_dict()
    loader.close()
    assert state["samples"] == 11 * 8 < loader.examples_per_epoch  # mid-epoch, what was consumed
    resumed = _loader(bert_data, batch_size=8, workers=2, seed=0)
    resumed.load_state_dict(state)
    rest = [resumed.next() for _ in range(19)]
    resumed.close()
    for a, b in zip(uninterrupted, first + rest):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_single_segments_without_nsp_are_the_chunk_cut_at_the_back(bert_data):
    _, vocab, split = bert_data
    index = SentenceIndex.build(split, vocab.sep)
    rows, _ = plan_epoch(index, 30, np.random.default_rng(3), short_seq_prob=0.1, next_sentence=False)
    ids, types, attention = build_pairs(split, index, rows[:200], 32, vocab, [], next_sentence=False)
    cut = 0
    for i, (a_first, a_end, *_rest) in enumerate(rows[:200]):
        text = np.concatenate([split.read(int(index.starts[s]), int(index.ends[s] - index.starts[s]))
                               for s in range(a_first, a_end)]).astype(np.int64)
        cut += len(text) > 30
        expected = np.concatenate([[vocab.cls], text[:30], [vocab.sep]])
        assert np.array_equal(ids[i, :len(expected)], expected) and (ids[i, len(expected):] == vocab.pad).all()
        assert attention[i].sum() == len(expected) and not types[i].any()
    assert cut > 10
