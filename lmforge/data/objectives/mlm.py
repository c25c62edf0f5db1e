"""BERT's pretraining examples: sentence pairs for next-sentence prediction and 80/10/10 masking.

Pure functions of their inputs and numpy Generators, so the loader can make any example from
(seed, sample index) alone; each works on a whole micro-batch with array operations. The steps, as
in the BERT paper and its create_pretraining_data.py:

1. `SentenceIndex`: a bert token store ends every sentence with [SEP]; the index lists sentences
   (start, end) and which document each belongs to.
2. `plan_epoch`: walk each document, gather sentences up to a target length (the max length, or with
   probability short_seq_prob a random shorter one), cut the chunk at a random point into A and B.
   With probability 1/2 (label 1) B is instead a span from another document and the unused
   sentences go back to the document. When the draw says "actual next" but the chunk is one sentence,
   B is the following sentence, or at the document's end A becomes the sentence before; a document of
   a single sentence cannot form a true pair and such draws are skipped (counted in PlanStats).
   All documents advance together, one chunk per round.
3. `build_pairs`: [CLS] A [SEP] B [SEP], token types 0 for [CLS] A [SEP] and 1 for B [SEP], the longer
   segment truncated (each removed token from the front or the back at random) until the pair fits,
   then padding; the tokens of a whole micro-batch are gathered from the store at once.
4. `mask_batch`: a mask_rate fraction of the non-special tokens (stochastically rounded per sequence,
   so the expected rate is exact) is selected, a uniformly random subset; of those
   mask_token_fraction become [MASK], random_token_fraction a random non-special token, the rest
   stay. Labels are the original ids at selected positions and IGNORE_INDEX elsewhere. Whole-word
   masking selects whole words instead (in random order, passing over a word that would overshoot).
   Each sequence's random numbers come from its own Generator (`mask_draws`), so an example's masks
   do not depend on the batch it is in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from tokenizers import Tokenizer

from lmforge.data.store import SplitReader
from lmforge.data.tokenizer import CLS, MASK, PAD, SEP, special_id
from lmforge.errors import LmforgeError

IGNORE_INDEX = -100
NOT_RANDOM, RANDOM_NEXT = 0, 1


@dataclass(frozen=True)
class BertVocab:
    """The ids the objective needs from a tokenizer, plus which ids continue a word."""

    cls: int
    sep: int
    pad: int
    mask: int
    vocab_size: int
    special: np.ndarray  # sorted ids of all special tokens (never selected, never drawn as random tokens)
    continues_word: np.ndarray | None  # bool per id; None when the tokenizer has no notion of words

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer) -> "BertVocab":
        why = "BERT's example layout needs"
        ids = {name: special_id(tokenizer, tok, why) for name, tok in
               (("cls", CLS), ("sep", SEP), ("pad", PAD), ("mask", MASK))}
        added = [t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special]
        special = np.unique([tokenizer.token_to_id(t) for t in added] + list(ids.values())).astype(np.int64)
        return cls(**ids, vocab_size=tokenizer.get_vocab_size(), special=special,
                   continues_word=word_continuation_table(tokenizer))

    @property
    def random_pool(self) -> np.ndarray:
        """Ids a "random token" replacement is drawn from: the vocabulary without special tokens."""
        return np.setdiff1d(np.arange(self.vocab_size, dtype=np.int64), self.special)

    @cached_property
    def is_special(self) -> np.ndarray:
        """bool per id: a special token (never selected for prediction)."""
        table = np.zeros(self.vocab_size, dtype=bool)
        table[self.special] = True
        return table


def word_continuation_table(tokenizer: Tokenizer) -> np.ndarray | None:
    """continues_word[id] is True when the token continues the previous token's word.

    WordPiece marks continuations with "##"; byte-level BPE and Unigram/Metaspace mark word starts
    with "Ġ" and "▁". A character tokenizer has no such marks: None (whole-word masking unavailable).
    """
    kind = json.loads(tokenizer.to_str())["model"]["type"]
    vocab = tokenizer.get_vocab()
    table = np.zeros(tokenizer.get_vocab_size(), dtype=bool)
    if kind == "WordPiece":
        for token, i in vocab.items():
            table[i] = token.startswith("##")
    elif kind in ("BPE", "Unigram"):
        start = "Ġ" if kind == "BPE" else "▁"
        for token, i in vocab.items():
            table[i] = not token.startswith(start) and token[:1].isalnum()
    else:
        return None
    return table


@dataclass
class SentenceIndex:
    starts: np.ndarray  # token offset of each sentence in the split
    ends: np.ndarray  # offset of the sentence's [SEP] (exclusive end of its tokens)
    doc_first: np.ndarray  # doc_first[d] .. doc_first[d + 1]: the sentences of document d

    @classmethod
    def build(cls, split: SplitReader, sep: int) -> "SentenceIndex":
        ends, offset = [], 0
        for shard in split.shards:  # one pass over the memmapped shards; memory ~ number of sentences
            ends.append(np.flatnonzero(np.asarray(shard) == sep).astype(np.int64) + offset)
            offset += len(shard)
        ends_all = np.concatenate(ends) if ends else np.zeros(0, dtype=np.int64)
        starts = np.concatenate([[0], ends_all[:-1] + 1]).astype(np.int64) if len(ends_all) else ends_all
        keep = ends_all > starts  # drop empty sentences ([SEP][SEP])
        starts, ends_all = starts[keep], ends_all[keep]
        # a sentence belongs to the document its first token is in
        doc_of = np.searchsorted(split.doc_starts, starts, side="right") - 1
        doc_first = np.searchsorted(doc_of, np.arange(len(split.doc_starts) + 1), side="left").astype(np.int64)
        return cls(starts, ends_all, doc_first)

    @property
    def lengths(self) -> np.ndarray:
        return self.ends - self.starts

    @property
    def num_sentences(self) -> int:
        return len(self.starts)

    @cached_property
    def text_offsets(self) -> np.ndarray:
        """text_offsets[s]: tokens before sentence s, [SEP]s not counted (num_sentences + 1 entries)."""
        return np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)

    def store_positions(self, text_positions: np.ndarray) -> np.ndarray:
        """Store offsets of tokens given by their text offset (the stream without [SEP]s)."""
        offsets = self.text_offsets
        sentence = np.searchsorted(offsets, text_positions, side="right") - 1
        return self.starts[sentence] + (text_positions - offsets[sentence])


@dataclass
class PlanStats:
    instances: int = 0
    random_next: int = 0
    skipped_single_sentence: int = 0  # one-sentence documents drawn as "actual next" (no true pair exists)


def plan_epoch(index: SentenceIndex, max_tokens: int, rng: np.random.Generator, short_seq_prob: float,
               next_sentence: bool = True) -> tuple[np.ndarray, PlanStats]:
    """Rows (a_first, a_end, b_first, b_end, label) of sentence ranges, in document order.

    max_tokens is the token budget for A + B (the sequence length minus the special tokens).
    Without next_sentence, rows hold one segment A of up to max_tokens and label IGNORE_INDEX.
    All documents advance together, one chunk each per round, so a round is a few array operations
    whatever the number of documents (the rounds are as many as the longest document has chunks).
    """
    cum = index.text_offsets
    first = index.doc_first
    docs = np.flatnonzero(first[1:] > first[:-1])  # documents with text; a row's "rank" indexes this
    if next_sentence and len(docs) < 2:
        raise LmforgeError(f"next-sentence prediction needs at least 2 documents with text, found {len(docs)} "
                           f"(or set mlm.next_sentence=false)")
    doc_start, doc_end = first[docs], first[docs + 1]
    short = rng.random(len(docs)) < short_seq_prob
    target = np.where(short, 2 + np.floor(rng.random(len(docs)) * (max_tokens - 1)).astype(np.int64), max_tokens)
    chunk_start = doc_start.copy()
    active = np.arange(len(docs))
    # per round: the document rank of each row, then the row's columns a_first, a_end, b_first, b_end, label
    columns: list[list[np.ndarray]] = [[] for _ in range(6)]
    stats = PlanStats()
    while len(active):
        cs, s0, s1, goal = chunk_start[active], doc_start[active], doc_end[active], target[active]
        # the chunk is sentences [cs, i]: the first that reach the target, or up to the document's end
        i = np.minimum(np.searchsorted(cum, cum[cs] + goal, side="left") - 1, s1 - 1)
        if not next_sentence:
            row = [active, cs, i + 1, np.zeros_like(cs), np.zeros_like(cs), np.full_like(cs, IGNORE_INDEX)]
            chunk_start[active] = i + 1
        else:
            u = rng.random((4, len(active)))
            is_random = u[0] < 0.5
            lone = ~is_random & (i == cs)  # "actual next" drawn for a one-sentence chunk
            borrow = lone & (i + 1 < s1)  # B is the following sentence
            back = lone & ~borrow & (i > s0)  # the document's last sentence: A is the one before (reused)
            skip = lone & ~borrow & ~back  # a document of one sentence has no true continuation
            i = np.where(borrow, i + 1, i)
            cs = np.where(back, cs - 1, cs)
            a_end = cs + 1 + (u[1] * (i - cs)).astype(np.int64)  # cut in [1, sentences - 1] (1 if one)
            # a random B: a span of about the remaining budget from a random sentence of another document
            budget_b = np.maximum(1, goal - (cum[a_end] - cum[cs]))
            drawn = (u[2] * (len(docs) - 1)).astype(np.int64)
            other = docs[drawn + (drawn >= active)]  # uniform over the documents other than this one
            b_first = first[other] + (u[3] * (first[other + 1] - first[other])).astype(np.int64)
            stop = np.searchsorted(cum, cum[b_first] + budget_b, side="left")
            b_end = np.minimum(np.maximum(stop, b_first + 1), first[other + 1])
            row = [active, cs, a_end, np.where(is_random, b_first, a_end), np.where(is_random, b_end, i + 1),
                   is_random.astype(np.int64)]  # RANDOM_NEXT is 1, NOT_RANDOM 0
            if skip.any():
                row = [column[~skip] for column in row]
                stats.skipped_single_sentence += int(skip.sum())
            # B came from elsewhere: the rest of the chunk goes back to the document
            chunk_start[active] = np.where(skip, s1, np.where(is_random, a_end, i + 1))
        for column, values in zip(columns, row):
            column.append(values)
        active = active[chunk_start[active] < doc_end[active]]
    if not columns[0]:
        return np.zeros((0, 5), dtype=np.int64), stats
    ranks = np.concatenate(columns[0])
    rows = np.stack([np.concatenate(column) for column in columns[1:]], 1).astype(np.int64)
    rows = rows[np.argsort(ranks, kind="stable")]  # document order; within a document, chunk order
    stats.instances = len(rows)
    stats.random_next = int((rows[:, 4] == RANDOM_NEXT).sum())
    return rows, stats


def truncated_lengths(len_a: np.ndarray, len_b: np.ndarray, max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Segment lengths once the longer one is trimmed until the pair fits in max_tokens.

    The longer segment (A on a tie) loses tokens until it is as short as the other; if the pair still
    does not fit, both shrink to half the budget (B keeping the odd token).
    """
    len_a, len_b = np.asarray(len_a, dtype=np.int64), np.asarray(len_b, dtype=np.int64)
    excess = np.maximum(len_a + len_b - max_tokens, 0)
    from_longer = np.minimum(excess, np.abs(len_a - len_b))
    rest = excess - from_longer  # what is left once both are equally long
    a_longer = len_a >= len_b
    new_a = len_a - np.where(a_longer, from_longer, 0) - (rest + 1) // 2
    new_b = len_b - np.where(a_longer, 0, from_longer) - rest // 2
    return new_a, new_b


def trimmed_from_front(dropped: int, rng: np.random.Generator) -> int:
    """How many of the tokens dropped from a segment come off its front: each token front or back at 1/2."""
    return int(rng.binomial(int(dropped), 0.5)) if dropped else 0


def truncate_pair(a: np.ndarray, b: np.ndarray, max_tokens: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Trim the longer segment, each removed token from the front or the back with equal odds."""
    new_a, new_b = (int(n) for n in truncated_lengths(len(a), len(b), max_tokens))
    front_a, front_b = trimmed_from_front(len(a) - new_a, rng), trimmed_from_front(len(b) - new_b, rng)
    return a[front_a: front_a + new_a], b[front_b: front_b + new_b]


@dataclass
class PairLayout:
    """[CLS] A [SEP] B [SEP] (or [CLS] A [SEP]) for a batch of segment lengths, padded to seq_len."""

    input_ids: np.ndarray  # (batch, seq_len): the special tokens and padding; 0 where A and B go
    token_type_ids: np.ndarray  # 0 for [CLS] A [SEP] and padding, 1 for B [SEP]
    attention_mask: np.ndarray
    in_a: np.ndarray  # bool: the position holds a token of A (A's token number position - 1)
    in_b: np.ndarray  # bool: the position holds a token of B (B's token number position - len_a - 2)

    @classmethod
    def of(cls, len_a: np.ndarray, len_b: np.ndarray | None, seq_len: int, vocab: BertVocab) -> "PairLayout":
        position = np.arange(seq_len)[None, :]
        la = np.asarray(len_a, dtype=np.int64)[:, None]
        lb = np.asarray(len_b, dtype=np.int64)[:, None] if len_b is not None else None
        in_a = (position >= 1) & (position <= la)
        ends = la + 1 if lb is None else la + lb + 2  # position of the last [SEP]
        in_b = (position >= la + 2) & (position < ends) if lb is not None else np.zeros_like(in_a)
        attention = position <= ends
        sep = (position == la + 1) | (position == ends)
        ids = np.where(sep, vocab.sep, np.where(attention, 0, vocab.pad))
        ids[:, 0] = vocab.cls
        types = (position >= la + 2) & attention if lb is not None else np.zeros_like(in_a)
        return cls(ids.astype(np.int64), types.astype(np.int64), attention.astype(np.int64), in_a, in_b)

    def fill(self, tokens_a: np.ndarray, tokens_b: np.ndarray | None) -> np.ndarray:
        """input_ids with A's and B's tokens (each flat, examples in order) in their places."""
        ids = self.input_ids.copy()
        ids[self.in_a] = tokens_a
        if tokens_b is not None:
            ids[self.in_b] = tokens_b
        return ids


def build_pair(a: np.ndarray, b: np.ndarray | None, seq_len: int, vocab: BertVocab,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids, token_type_ids, attention_mask) of [CLS] A [SEP] B [SEP] (or [CLS] A [SEP]), padded."""
    if b is None:
        a = a[: seq_len - 2]
    else:
        a, b = truncate_pair(a, b, seq_len - 3, rng)
    layout = PairLayout.of([len(a)], None if b is None else [len(b)], seq_len, vocab)
    return layout.fill(a, b)[0], layout.token_type_ids[0], layout.attention_mask[0]


def build_pairs(split: SplitReader, index: SentenceIndex, rows: np.ndarray, seq_len: int, vocab: BertVocab,
                rngs: list[np.random.Generator],
                next_sentence: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """build_pair for plan rows (a_first, a_end, b_first, b_end, label), reading the sentences from the split.

    A segment is its sentences joined without their [SEP]s; rngs[i] draws example i's truncation.
    """
    cum = index.text_offsets
    start_a, len_a = cum[rows[:, 0]], cum[rows[:, 1]] - cum[rows[:, 0]]
    if not next_sentence:
        layout = PairLayout.of(np.minimum(len_a, seq_len - 2), None, seq_len, vocab)
        text = start_a[:, None] + layout.in_a.cumsum(1) - 1
        return layout.fill(split.take(index.store_positions(text[layout.in_a])), None), \
            layout.token_type_ids, layout.attention_mask
    start_b, len_b = cum[rows[:, 2]], cum[rows[:, 3]] - cum[rows[:, 2]]
    new_a, new_b = truncated_lengths(len_a, len_b, seq_len - 3)
    dropped = np.stack([len_a - new_a, len_b - new_b], 1)
    front = np.zeros_like(dropped)
    for i in np.flatnonzero(dropped.any(1)):
        front[i] = [trimmed_from_front(n, rngs[i]) for n in dropped[i].tolist()]
    layout = PairLayout.of(new_a, new_b, seq_len, vocab)
    # text offset of each A and B position: the segment's start, its trimmed front, the token's number
    text_a = (start_a + front[:, 0])[:, None] + layout.in_a.cumsum(1) - 1
    text_b = (start_b + front[:, 1])[:, None] + layout.in_b.cumsum(1) - 1
    tokens_a = split.take(index.store_positions(text_a[layout.in_a]))
    tokens_b = split.take(index.store_positions(text_b[layout.in_b]))
    return layout.fill(tokens_a, tokens_b), layout.token_type_ids, layout.attention_mask


@dataclass(frozen=True)
class MaskingSpec:
    rate: float = 0.15
    mask_token_fraction: float = 0.8
    random_token_fraction: float = 0.1
    whole_word: bool = False


def mask_draws(rng: np.random.Generator, seq_len: int) -> np.ndarray:
    """One sequence's random numbers for masking: 3 * seq_len + 1 uniforms in [0, 1)."""
    return rng.random(3 * seq_len + 1)


def mask_batch(input_ids: np.ndarray, token_types: np.ndarray, vocab: BertVocab, spec: MaskingSpec,
               draws: np.ndarray, random_pool: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(masked input ids, labels) for a batch of sequences; labels are IGNORE_INDEX except at selected positions.

    draws: (batch, 3 * seq_len + 1), one row of mask_draws per sequence: the rounding of the count,
    a selection key per position (the k smallest keys are selected: a uniform k-subset), a roll per
    position for [MASK] / random / kept, and a pick per position for the random token.
    """
    batch, seq_len = input_ids.shape
    rounding, keys, roll, pick = (draws[:, 0], draws[:, 1: seq_len + 1], draws[:, seq_len + 1: 2 * seq_len + 1],
                                  draws[:, 2 * seq_len + 1:])
    candidate = ~vocab.is_special[input_ids]
    n = candidate.sum(1)
    k = np.minimum(n, np.floor(n * spec.rate + rounding).astype(np.int64))  # stochastic rounding: E[k] = n * rate
    if spec.whole_word:
        selected = _select_whole_words(input_ids, token_types, candidate, keys, k, vocab)
    else:
        order = np.argsort(np.where(candidate, keys, np.inf), axis=1)
        selected = np.zeros_like(candidate)
        np.put_along_axis(selected, order, np.arange(seq_len)[None, :] < k[:, None], axis=1)
    labels = np.where(selected, input_ids, IGNORE_INDEX)
    to_mask = selected & (roll < spec.mask_token_fraction)
    to_random = selected & (roll >= spec.mask_token_fraction) & \
        (roll < spec.mask_token_fraction + spec.random_token_fraction)
    random_ids = random_pool[np.minimum((pick * len(random_pool)).astype(np.int64), len(random_pool) - 1)]
    masked = np.where(to_mask, vocab.mask, np.where(to_random, random_ids, input_ids))
    return masked.astype(np.int64), labels.astype(np.int64)


def mask_tokens(input_ids: np.ndarray, token_types: np.ndarray, vocab: BertVocab, spec: MaskingSpec,
                rng: np.random.Generator, random_pool: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(masked input ids, labels) for one sequence; labels are IGNORE_INDEX except at selected positions."""
    draws = mask_draws(rng, len(input_ids))[None, :]
    masked, labels = mask_batch(input_ids[None, :], token_types[None, :], vocab, spec, draws, random_pool)
    return masked[0], labels[0]


def check_whole_word(vocab: BertVocab) -> None:
    if vocab.continues_word is None:
        raise LmforgeError("mlm.whole_word needs a wordpiece, bpe or unigram tokenizer (a char tokenizer "
                           "has no word boundaries)")


def word_starts(input_ids: np.ndarray, token_types: np.ndarray, candidate: np.ndarray,
                vocab: BertVocab) -> np.ndarray:
    """(batch, seq_len) bool: a candidate starts a word unless it continues one and directly follows a
    candidate of the same segment."""
    check_whole_word(vocab)
    continues = vocab.continues_word[input_ids]
    follows = np.zeros_like(candidate)
    follows[:, 1:] = candidate[:, :-1] & (token_types[:, 1:] == token_types[:, :-1])
    return candidate & ~(continues & follows)


def word_ids(input_ids: np.ndarray, token_types: np.ndarray, candidates: np.ndarray,
             vocab: BertVocab) -> np.ndarray:
    """A word number for each candidate position (an index array into one sequence)."""
    candidate = np.zeros(len(input_ids), dtype=bool)
    candidate[candidates] = True
    starts = word_starts(input_ids[None, :], token_types[None, :], candidate[None, :], vocab)[0]
    return np.cumsum(starts)[candidates] - 1


def _select_whole_words(input_ids: np.ndarray, token_types: np.ndarray, candidate: np.ndarray, keys: np.ndarray,
                        k: np.ndarray, vocab: BertVocab) -> np.ndarray:
    """Whole words in the order of their first piece's key; one that would overshoot k tokens is passed over."""
    batch, seq_len = candidate.shape
    starts = word_starts(input_ids, token_types, candidate, vocab)
    word = np.maximum(np.cumsum(starts, axis=1) - 1, 0)  # word number of each candidate in its sequence
    row = np.arange(batch)[:, None]
    flat = row * seq_len + word
    sizes = np.bincount(flat[candidate], minlength=batch * seq_len).reshape(batch, seq_len)
    word_keys = np.full(batch * seq_len, np.inf)
    word_keys[flat[starts]] = keys[starts]
    word_keys = word_keys.reshape(batch, seq_len)
    order = np.argsort(word_keys, axis=1)
    sizes_in_order = np.take_along_axis(sizes, order, axis=1)
    taken_in_order = np.zeros((batch, seq_len), dtype=bool)
    covered = np.zeros(batch, dtype=np.int64)
    for j in range(seq_len):  # greedy, word by word, every sequence at once
        size = sizes_in_order[:, j]
        if not size.any() or (covered == k).all():
            break
        take = (size > 0) & (covered + size <= k)
        taken_in_order[:, j] = take
        covered += np.where(take, size, 0)
    taken = np.zeros_like(taken_in_order)
    np.put_along_axis(taken, order, taken_in_order, axis=1)
    return candidate & taken[row, word]
