"""BERT's pretraining examples: sentence pairs for next-sentence prediction and 80/10/10 masking.

Pure functions of their inputs and a numpy Generator, so the loader can make any example from
(seed, sample index) alone. The steps, as in the BERT paper and its create_pretraining_data.py:

1. `SentenceIndex`: a bert token store ends every sentence with [SEP]; the index lists sentences
   (start, end) and which document each belongs to.
2. `plan_epoch`: walk each document, gather sentences up to a target length (the max length, or with
   probability short_seq_prob a random shorter one), cut the chunk at a random point into A and B.
   With probability 1/2 (label 1) B is instead a span from another document and the unused
   sentences go back to the document. When the draw says "actual next" but the chunk is one sentence,
   B is the following sentence, or at the document's end A becomes the sentence before; a document of
   a single sentence cannot form a true pair and such draws are skipped (counted in PlanStats).
3. `build_pair`: [CLS] A [SEP] B [SEP], token types 0 for [CLS] A [SEP] and 1 for B [SEP], the longer
   segment truncated (randomly at front or back) until the pair fits, then padding.
4. `mask_tokens`: a mask_rate fraction of the non-special tokens (stochastically rounded per sequence,
   so the expected rate is exact) is selected; of those mask_token_fraction become [MASK],
   random_token_fraction a random non-special token, the rest stay. Labels are the original ids at
   selected positions and IGNORE_INDEX elsewhere. Whole-word masking selects whole words instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

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
    """
    lengths = index.lengths
    cum = np.concatenate([[0], np.cumsum(lengths)])
    first = index.doc_first
    nonempty = np.flatnonzero(first[1:] > first[:-1])
    if next_sentence and len(nonempty) < 2:
        raise LmforgeError(f"next-sentence prediction needs at least 2 documents with text, found {len(nonempty)} "
                           f"(or set mlm.next_sentence=false)")
    rows: list[tuple[int, int, int, int, int]] = []
    stats = PlanStats()
    for d in nonempty:
        s0, s1 = int(first[d]), int(first[d + 1])
        target = max_tokens
        if rng.random() < short_seq_prob:
            target = int(rng.integers(2, max_tokens + 1))
        chunk_start, i = s0, s0
        while i < s1:
            if i + 1 < s1 and cum[i + 1] - cum[chunk_start] < target:
                i += 1
                continue
            # the chunk is sentences [chunk_start, i] and has reached the target (or the document's end)
            if not next_sentence:
                rows.append((chunk_start, i + 1, 0, 0, IGNORE_INDEX))
                chunk_start = i = i + 1
                continue
            is_random = bool(rng.random() < 0.5)
            n = i + 1 - chunk_start
            if not is_random and n == 1:
                if i + 1 < s1:  # borrow the next sentence as B
                    i, n = i + 1, 2
                elif i > s0:  # the document's last sentence: pair it with the one before (reused)
                    chunk_start, n = i - 1, 2
                else:  # a document of one sentence has no true continuation
                    stats.skipped_single_sentence += 1
                    break
            a_end = chunk_start + (1 if n == 1 else int(rng.integers(1, n)))
            if is_random:
                target_b = max(1, target - int(cum[a_end] - cum[chunk_start]))
                other = d
                while other == d:
                    other = int(nonempty[rng.integers(len(nonempty))])
                b_first = int(rng.integers(first[other], first[other + 1]))
                stop = int(np.searchsorted(cum, cum[b_first] + target_b, side="left"))
                b_end = min(max(stop, b_first + 1), int(first[other + 1]))
                rows.append((chunk_start, a_end, b_first, b_end, RANDOM_NEXT))
                stats.random_next += 1
                chunk_start = i = a_end  # B came from elsewhere: the rest of the chunk goes back
            else:
                rows.append((chunk_start, a_end, a_end, i + 1, NOT_RANDOM))
                chunk_start = i = i + 1
    stats.instances = len(rows)
    return np.asarray(rows, dtype=np.int64).reshape(-1, 5), stats


def read_segment(split: SplitReader, index: SentenceIndex, first: int, end: int, sep: int) -> np.ndarray:
    """Token ids of sentences [first, end) joined, without their [SEP] markers."""
    if end <= first:
        return np.zeros(0, dtype=np.int64)
    start = int(index.starts[first])
    ids = split.read(start, int(index.ends[end - 1]) - start).astype(np.int64)
    return ids[ids != sep]


def truncate_pair(a: np.ndarray, b: np.ndarray, max_tokens: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Trim the longer segment, each removed token from the front or the back with equal odds."""
    while len(a) + len(b) > max_tokens:
        excess = len(a) + len(b) - max_tokens
        a_longer = len(a) >= len(b)
        longer, shorter = (a, b) if a_longer else (b, a)
        gap = len(longer) - len(shorter)
        drop = min(excess, gap) if gap > 0 else (excess + 1) // 2
        front = int(rng.binomial(drop, 0.5))
        longer = longer[front: len(longer) - (drop - front)]
        a, b = (longer, shorter) if a_longer else (shorter, longer)
    return a, b


def build_pair(a: np.ndarray, b: np.ndarray | None, seq_len: int, vocab: BertVocab,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids, token_type_ids, attention_mask) of [CLS] A [SEP] B [SEP] (or [CLS] A [SEP]), padded."""
    if b is None:
        a = a[: seq_len - 2]
        parts, types = [[vocab.cls], a, [vocab.sep]], [0] * (len(a) + 2)
    else:
        a, b = truncate_pair(a, b, seq_len - 3, rng)
        parts = [[vocab.cls], a, [vocab.sep], b, [vocab.sep]]
        types = [0] * (len(a) + 2) + [1] * (len(b) + 1)
    ids = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])
    n = len(ids)
    input_ids = np.full(seq_len, vocab.pad, dtype=np.int64)
    input_ids[:n] = ids
    token_types = np.zeros(seq_len, dtype=np.int64)
    token_types[:n] = types
    attention = np.zeros(seq_len, dtype=np.int64)
    attention[:n] = 1
    return input_ids, token_types, attention


@dataclass(frozen=True)
class MaskingSpec:
    rate: float = 0.15
    mask_token_fraction: float = 0.8
    random_token_fraction: float = 0.1
    whole_word: bool = False


def mask_tokens(input_ids: np.ndarray, token_types: np.ndarray, vocab: BertVocab, spec: MaskingSpec,
                rng: np.random.Generator, random_pool: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(masked input ids, labels) for one sequence; labels are IGNORE_INDEX except at selected positions."""
    candidates = np.flatnonzero(~np.isin(input_ids, vocab.special))
    n = len(candidates)
    k = min(n, int(np.floor(n * spec.rate + rng.random())))  # stochastic rounding: E[k] = n * rate
    if spec.whole_word:
        selected = _select_whole_words(input_ids, token_types, candidates, k, vocab, rng)
    else:
        selected = rng.choice(candidates, size=k, replace=False) if k else candidates[:0]
    labels = np.full_like(input_ids, IGNORE_INDEX)
    labels[selected] = input_ids[selected]
    masked = input_ids.copy()
    roll = rng.random(len(selected))
    to_mask = selected[roll < spec.mask_token_fraction]
    to_random = selected[(roll >= spec.mask_token_fraction) &
                         (roll < spec.mask_token_fraction + spec.random_token_fraction)]
    masked[to_mask] = vocab.mask
    masked[to_random] = random_pool[rng.integers(len(random_pool), size=len(to_random))]
    return masked, labels


def word_ids(input_ids: np.ndarray, token_types: np.ndarray, candidates: np.ndarray,
             vocab: BertVocab) -> np.ndarray:
    """A word number for each candidate position: a new word starts unless the token continues one
    and directly follows a candidate of the same segment."""
    if vocab.continues_word is None:
        raise LmforgeError("mlm.whole_word needs a wordpiece, bpe or unigram tokenizer (a char tokenizer "
                           "has no word boundaries)")
    cont = vocab.continues_word[input_ids[candidates]]
    adjacent = np.zeros(len(candidates), dtype=bool)
    adjacent[1:] = (np.diff(candidates) == 1) & (token_types[candidates[1:]] == token_types[candidates[:-1]])
    starts = ~(cont & adjacent)
    return np.cumsum(starts) - 1


def _select_whole_words(input_ids: np.ndarray, token_types: np.ndarray, candidates: np.ndarray, k: int,
                        vocab: BertVocab, rng: np.random.Generator) -> np.ndarray:
    if k == 0:
        return candidates[:0]
    words = word_ids(input_ids, token_types, candidates, vocab)
    sizes = np.bincount(words)
    # words in random order; one that would overshoot k tokens is passed over (a word is never split)
    taken, covered = [], 0
    for w in rng.permutation(len(sizes)):
        if covered + sizes[w] <= k:
            taken.append(w)
            covered += sizes[w]
            if covered == k:
                break
    return candidates[np.isin(words, taken)]
