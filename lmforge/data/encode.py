"""Turn document texts into the id sequences a token store holds, per model family.

gpt:  each document's ids followed by the end-of-text token (documents pack back to back for CLM).
t5:   the same with T5's `</s>`: span corruption packs documents back to back as T5 does.
bert: each document split into sentences; every sentence's ids followed by [SEP], which marks the
      sentence boundary that next-sentence-prediction examples are cut at (see objectives/mlm.py).
A pure function of (tokenizer, texts), so any number of worker processes produce identical output.
"""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer

from lmforge.data.sentences import split_sentences
from lmforge.data.tokenizer import EOS, SEP, T5_EOS, special_id


def boundary_token(tokenizer: Tokenizer, family: str) -> int:
    """The id that ends each stored unit: a document (gpt, t5) or a sentence (bert)."""
    if family == "bert":
        return special_id(tokenizer, SEP, "BERT needs to mark sentence boundaries")
    if family == "t5":
        return special_id(tokenizer, T5_EOS, "T5 ends each document with (train the tokenizer with model.family t5)")
    return special_id(tokenizer, EOS, "a causal LM needs to separate documents")


def _encode_ids(tokenizer: Tokenizer, texts: list[str]):
    """Encodings of `texts` without character offsets, which a store never needs (about 10% faster)."""
    fast = getattr(tokenizer, "encode_batch_fast", None)  # tokenizers >= 0.20
    return (fast or tokenizer.encode_batch)(texts, add_special_tokens=False)


def encode_documents(tokenizer: Tokenizer, texts: list[str], family: str) -> list[np.ndarray]:
    """One int64 array per text; an empty array for a text with nothing to store."""
    end = boundary_token(tokenizer, family)
    if family != "bert":
        encodings = _encode_ids(tokenizer, texts)
        return [np.fromiter((*enc.ids, end), dtype=np.int64, count=len(enc.ids) + 1) for enc in encodings]
    per_doc = [split_sentences(text) for text in texts]
    flat = [s for sentences in per_doc for s in sentences]
    encodings = iter(_encode_ids(tokenizer, flat))
    out = []
    for sentences in per_doc:
        ids: list[int] = []
        for _ in sentences:
            sentence = next(encodings).ids
            if sentence:  # a "sentence" of characters the tokenizer drops entirely adds nothing
                ids.extend(sentence)
                ids.append(end)
        out.append(np.asarray(ids, dtype=np.int64))
    return out
