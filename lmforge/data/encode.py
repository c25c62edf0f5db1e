"""Turn document texts into the id sequences a token store holds, per model family.

gpt:  each document's ids followed by the end-of-text token (documents pack back to back for CLM).
t5:   the same with T5's `</s>`: span corruption packs documents back to back as T5 does.
bert: each document split into sentences; every sentence's ids followed by [SEP], which marks the
      sentence boundary that next-sentence-prediction examples are cut at (see objectives/mlm.py).
A text longer than `max_chars` is encoded in pieces of at most that many characters, so no document,
however long, needs more memory than one piece (see `split_text` for where pieces are cut).
A pure function of (tokenizer, texts), so any number of worker processes produce identical output.
"""

from __future__ import annotations

import hashlib

import re
from typing import Callable, Iterator

import numpy as np
from tokenizers import Tokenizer

from lmforge.data.fast_encoder import Encode, batch_encoder
from lmforge.data.sentences import split_sentences
from lmforge.data.tokenizer import EOS, SEP, T5_EOS, special_id

MAX_DOCUMENT_CHARS = 1_000_000  # data.max_document_chars' default
# A space between two non-space characters: no pre-token of GPT-2's byte-level BPE, BERT's WordPiece,
# Metaspace Unigram or the char tokenizer spans it, so cutting before it changes no id.
_EXACT_CUT = re.compile(r"(?<=\S) (?=\S)")
_WHITESPACE = re.compile(r"\s")


def boundary_token(tokenizer: Tokenizer, family: str) -> int:
    """The id that ends each stored unit: a document (gpt, t5) or a sentence (bert)."""
    if family == "bert":
        return special_id(tokenizer, SEP, "BERT needs to mark sentence boundaries")
    if family == "t5":
        return special_id(tokenizer, T5_EOS, "T5 ends each document with (train the tokenizer with model.family t5)")
    return special_id(tokenizer, EOS, "a causal LM needs to separate documents")


def _last_match(pattern: re.Pattern, text: str, start: int, end: int) -> int:
    """Start of the last match of `pattern` in text[start:end], or -1."""
    last = -1
    for match in pattern.finditer(text, start, end):
        last = match.start()
    return last


def split_text(text: str, max_chars: int) -> list[str]:
    """`text` cut into pieces of at most max_chars characters (see iter_pieces)."""
    return list(iter_pieces(text, max_chars))


def iter_pieces(text: str, max_chars: int) -> Iterator[str]:
    """`text` cut into pieces of at most max_chars characters, each cut as late as possible in its window.

    A cut goes before a space between two non-space characters (ids unchanged, see _EXACT_CUT), in the
    window's second half; failing that before any whitespace, failing that anywhere (a run of max_chars
    characters without a space: the ids around that cut may differ from encoding the whole).
    """
    start = 0
    while len(text) - start > max_chars:
        end = start + max_chars
        cut = _last_match(_EXACT_CUT, text, start + max_chars // 2, end)
        if cut <= start:
            cut = _last_match(_WHITESPACE, text, start + 1, end)
        if cut <= start:
            cut = end
        yield text[start:cut]
        start = cut
    yield text[start:] if start else text


def encode_texts(encode: Encode, texts: list[str], max_chars: int) -> list[np.ndarray]:
    """Ids of each text (uint32), long texts encoded piece by piece, at most ~max_chars characters per call."""
    out: list[np.ndarray] = []
    group: list[str] = []
    owners: list[int] = []
    parts: list[list[np.ndarray]] = [[] for _ in texts]

    def flush() -> None:
        for owner, ids in zip(owners, encode(group)):
            parts[owner].append(ids)
        group.clear()
        owners.clear()

    size = 0
    for index, text in enumerate(texts):
        for piece in split_text(text, max_chars):
            if size + len(piece) > max_chars and group:
                flush()
                size = 0
            group.append(piece)
            owners.append(index)
            size += len(piece)
    if group:
        flush()
    for pieces in parts:
        out.append(pieces[0] if len(pieces) == 1 else
                   np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint32))
    return out


def encode_documents(tokenizer: Tokenizer, texts: list[str], family: str,
                     max_chars: int = MAX_DOCUMENT_CHARS, encode: Encode | None = None,
                     ends: list[bool] | None = None) -> list[np.ndarray]:
    """One int64 array per text; an empty array for a text with nothing to store.

    encode: the tokenizer's batch encoder when the caller already made one (see fast_encoder.batch_encoder).
    ends: gpt only, whether each text ends its document (False: a piece the next text continues, no
    end-of-text token after it). A bert piece always ends its last sentence.
    """
    end = boundary_token(tokenizer, family)
    encode = encode or batch_encoder(tokenizer)
    if family != "bert":
        ends = [True] * len(texts) if ends is None else ends
        return [_with_end(ids, [len(ids)], end) if last else ids.astype(np.int64)
                for ids, last in zip(encode_texts(encode, texts, max_chars), ends)]
    per_doc = [split_sentences(text) for text in texts]
    encoded: Iterator[np.ndarray] = iter(encode_texts(encode, [s for doc in per_doc for s in doc], max_chars))
    out = []
    for sentences in per_doc:
        # a "sentence" of characters the tokenizer drops entirely adds nothing
        kept = [ids for ids in (next(encoded) for _ in sentences) if len(ids)]
        ids = np.concatenate(kept) if kept else np.zeros(0, dtype=np.uint32)
        out.append(_with_end(ids, [len(k) for k in kept], end))
    return out


def encode_stream(tokenizer: Tokenizer, texts: list[str], family: str, max_chars: int, encode: Encode,
                  ends: list[bool], joined: Callable[[list[str]], np.ndarray] | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """What encode_documents gives, as the ids of all texts back to back (uint32) and each text's length.

    joined: fast_encoder.joined_encoder(tokenizer, EOS), which encodes a whole batch of gpt documents in
    one call; used when every text ends its document and none holds the end-of-text token itself.
    """
    if joined is not None and family != "bert" and all(ends) and all(len(t) <= max_chars for t in texts) \
            and not any(EOS in t for t in texts):
        tokens = joined(texts)
        stops = np.flatnonzero(tokens == boundary_token(tokenizer, family))
        return tokens, np.diff(stops, prepend=-1)
    arrays = encode_documents(tokenizer, texts, family, max_chars, encode, ends)
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    return (np.concatenate(arrays).astype(np.uint32) if arrays else np.zeros(0, dtype=np.uint32)), lengths


def _with_end(ids: np.ndarray, lengths: list[int], end: int) -> np.ndarray:
    """`ids` (units of `lengths` tokens back to back) as int64 with `end` after each unit."""
    out = np.empty(len(ids) + len(lengths), dtype=np.int64)
    stops = np.cumsum(lengths) + np.arange(1, len(lengths) + 1) - 1  # where each end token goes
    mask = np.ones(len(out), dtype=bool)
    mask[stops] = False
    out[mask] = ids
    out[stops] = end
    return out


def is_validation(text: str, val_fraction: float) -> bool:
    """A document's split depends only on its text, so it never changes with file order or workers."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction
