"""Fast id encoding: a byte-level BPE with GPT-2's pre-tokenization runs through `tiktoken`, built from the
same ranks; lmforge's char tokenizer through a code point -> id table; any other tokenizer through Hugging
Face `tokenizers`. All give identical ids.

Why the conversion is exact. `tokenizers` applies, in each pre-token, the adjacent pair with the lowest merge
rank; tiktoken merges the adjacent pair whose concatenation has the lowest rank (its token id), and returns a
pre-token that is itself a token as that token. These agree when (checked in `tiktoken_encoding`):
  1. ids of merge results increase with the merge order and no two merges make the same token, so a pair's
     rank and its concatenation's rank order the same way;
  2. every merge result, tokenized alone by `tokenizers`' BPE, is that one token ("self-consistent"). Then a
     pair (x, y) that tiktoken could merge but `tokenizers` could not never meets: the merges that built x and
     y inside the span of x+y would, run on that span alone, stop at [x, y] and not reach x+y;
  3. no normalizer, ByteLevel pre-tokenization with GPT-2's regex and no prefix space, a plain BPE model
     (no dropout, no subword prefix or suffix, no byte fallback);
  4. added tokens (matched in the text before pre-tokenization by both) have no strip / single-word options
     and none is a prefix of another (leftmost-longest and leftmost-first matching then agree).
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from typing import Callable

import numpy as np
from tokenizers import Tokenizer

log = logging.getLogger(__name__)

# GPT-2's pre-tokenization, exactly as `tokenizers`' ByteLevel pre-tokenizer (use_regex=True) writes it.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Text the conversion is tried on before it is used: scripts, emoji, whitespace runs, digits, contractions.
PROBE = ("Hello, world! It's 2024; they'll've 12345678901234567890 items.\n\n\t  x  \r\n"
         "Ünïcödé — 日本語のテキスト, 中文, 한국어, العربية, עברית, ελληνικά, русский, हिन्दी, ไทย.\n"
         "emoji 🙂👍🏽👨‍👩‍👧 flags 🇫🇷 math ∑∫√ ½ ² Ⅻ ١٢٣ ０１２ \u00a0nbsp \u3000 ideographic space\u200b zero width"
         "   trailing   \n\n\n")

Encode = Callable[[list[str]], list[np.ndarray]]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (ByteLevel's alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _not_convertible(spec: dict) -> str | None:
    """Why a tokenizer (its JSON) cannot run through tiktoken, or None when its pipeline matches GPT-2's."""
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE":
        return f"a {model.get('type')} model"
    if spec.get("normalizer") is not None:
        return "a normalizer"
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
        pre = pre["pretokenizers"][0]
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or not pre.get("use_regex", True):
        return "a pre-tokenizer other than GPT-2's ByteLevel"
    if model.get("dropout") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") \
            or model.get("byte_fallback"):
        return "BPE options tiktoken lacks (dropout, subword affixes or byte fallback)"
    for added in spec.get("added_tokens", []):
        if added.get("single_word") or added.get("lstrip") or added.get("rstrip"):
            return f"added token {added['content']!r} with strip / single-word matching"
    contents = [a["content"] for a in spec.get("added_tokens", [])]
    if any(a != b and b.startswith(a) for a in contents for b in contents):
        return "added tokens that are prefixes of one another"
    return None


def _ranks(spec: dict) -> tuple[dict[bytes, int], dict[str, int]] | str:
    """tiktoken's mergeable ranks and special tokens for a ByteLevel BPE, or why they cannot be made."""
    decode = {c: b for b, c in _bytes_to_unicode().items()}
    vocab: dict[str, int] = spec["model"]["vocab"]
    ranks: dict[bytes, int] = {}
    for char, byte in decode.items():
        if char not in vocab:
            return f"byte {byte} missing from the vocabulary"
        ranks[bytes([byte])] = vocab[char]
    previous = -1
    for merge in spec["model"]["merges"]:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        token = left + right
        token_id = vocab.get(token)
        if token_id is None or token_id <= previous:
            return "merge results whose ids do not follow the merge order"
        try:
            ranks[bytes(decode[c] for c in token)] = previous = token_id
        except KeyError:
            return "a merge outside the byte alphabet"
    if len(ranks) != 256 + len(spec["model"]["merges"]):
        return "two merges that make the same token"
    specials = {a["content"]: a["id"] for a in spec.get("added_tokens", [])}
    if set(specials.values()) & set(ranks.values()):
        return "added tokens sharing ids with merge results"
    return ranks, specials


def _self_consistent(spec: dict) -> bool:
    """Whether `tokenizers`' BPE, given each merge result alone, returns that one token (condition 2)."""
    bare = {**spec, "normalizer": None, "pre_tokenizer": None, "post_processor": None, "added_tokens": [],
            "decoder": None}
    model = Tokenizer.from_str(json.dumps(bare))
    vocab = spec["model"]["vocab"]
    tokens = [left + right for left, right in
              (m.split(" ", 1) if isinstance(m, str) else m for m in spec["model"]["merges"])]
    encoded = model.encode_batch_fast(tokens, add_special_tokens=False) if hasattr(model, "encode_batch_fast") \
        else model.encode_batch(tokens, add_special_tokens=False)
    return all(e.ids == [vocab[t]] for t, e in zip(tokens, encoded))


@lru_cache(maxsize=4)
def _tiktoken_from_json(tokenizer_json: str):
    """(tiktoken Encoding, None) when the tokenizer converts exactly, else (None, why not)."""
    spec = json.loads(tokenizer_json)
    why = _not_convertible(spec)
    if why is None:
        made = _ranks(spec)
        if isinstance(made, str):
            why = made
        elif not _self_consistent(spec):
            why = "merge results that its own BPE does not rebuild"
    if why is not None:
        return None, why
    try:
        import tiktoken
    except ImportError:
        return None, "tiktoken is not installed (pip install tiktoken)"
    ranks, specials = made
    encoding = tiktoken.Encoding("lmforge", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    reference = Tokenizer.from_str(tokenizer_json)
    if encoding.encode(PROBE, allowed_special="all") != reference.encode(PROBE, add_special_tokens=False).ids:
        return None, "tiktoken's ids differ from tokenizers' on the probe text"
    return encoding, None


def tiktoken_encoding(tokenizer: Tokenizer):
    """The tiktoken Encoding giving the same ids as `tokenizer`, or None."""
    return _tiktoken_from_json(tokenizer.to_str())[0]


CHAR_SPLIT = {"type": "Split", "pattern": {"Regex": "[\\s\\S]"}, "behavior": "Isolated", "invert": False}


@lru_cache(maxsize=4)
def _char_table(tokenizer_json: str) -> tuple[np.ndarray, tuple[str, ...]] | None:
    """For a one-token-per-character tokenizer (lmforge's char kind): an array mapping each code point to its
    id (the unknown token's beyond the vocabulary; the last slot stands for every code point above), and the
    added tokens' texts (a text holding one goes through `tokenizers`, which matches them first)."""
    spec = json.loads(tokenizer_json)
    model = spec.get("model") or {}
    if model.get("type") != "WordLevel" or spec.get("normalizer") is not None or spec.get("pre_tokenizer") != CHAR_SPLIT:
        return None
    if any(a.get("single_word") or a.get("lstrip") or a.get("rstrip") for a in spec.get("added_tokens", [])):
        return None
    vocab, unk = model["vocab"], model["vocab"].get(model.get("unk_token"))
    chars = {token: i for token, i in vocab.items() if len(token) == 1}
    if unk is None or not chars:
        return None
    table = np.full(max(map(ord, chars)) + 2, unk, dtype=np.uint32)
    for char, i in chars.items():
        table[ord(char)] = i
    return table, tuple(a["content"] for a in spec.get("added_tokens", []))


@lru_cache(maxsize=None)
def _say_once(message: str) -> None:
    log.info(message)


def joined_encoder(tokenizer: Tokenizer, separator: str) -> Callable[[list[str]], np.ndarray] | None:
    """A function encoding texts as one call: the ids of text + separator for each text, back to back
    (uint32), or None when the tokenizer does not take the fast path or `separator` is not an added token.

    Exact because an added token splits the text before pre-tokenization (in tiktoken and in `tokenizers`
    alike): no pre-token crosses it. One Rust call per batch instead of one per document.
    """
    encoding = tiktoken_encoding(tokenizer)
    if encoding is None or separator not in encoding.special_tokens_set:
        return None
    allowed = encoding.special_tokens_set
    return lambda texts: encoding.encode_to_numpy(separator.join(texts) + separator, allowed_special=allowed)


def batch_encoder(tokenizer: Tokenizer) -> Encode:
    """A function from texts to their ids (one uint32 array each, added tokens in the text recognized, no
    template tokens added): through tiktoken when the tokenizer converts exactly, a character table for a
    char tokenizer, else `tokenizers` (said once in the log)."""
    tokenizer_json = tokenizer.to_str()
    encoding, why = _tiktoken_from_json(tokenizer_json)
    if encoding is not None:
        allowed = encoding.special_tokens_set
        return lambda texts: [encoding.encode_to_numpy(t, allowed_special=allowed) for t in texts]
    # Without character offsets, which ids never need (about 10% faster; tokenizers >= 0.20).
    slow = getattr(tokenizer, "encode_batch_fast", None) or tokenizer.encode_batch

    def with_tokenizers(texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.uint32) for e in slow(texts, add_special_tokens=False)]

    chars = _char_table(tokenizer_json)
    if chars is None:
        _say_once(f"encoding with tokenizers, not tiktoken: the tokenizer has {why}")
        return with_tokenizers
    table, added = chars
    top = len(table) - 1

    def by_table(texts: list[str]) -> list[np.ndarray]:
        out = []
        for text in texts:
            if any(a in text for a in added):
                out.append(with_tokenizers([text])[0])
            else:
                out.append(table[np.minimum(np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32), top)])
        return out

    return by_table
