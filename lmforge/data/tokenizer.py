"""Train and load tokenizers (Hugging Face `tokenizers`), with each model family's special tokens."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from lmforge.config import TokenizerConfig
from lmforge.errors import LmforgeError

EOS = "<|endoftext|>"
UNK = "<unk>"
# Special tokens by model family; the first one ends every document in a causal-LM stream.
SPECIAL_TOKENS = {"gpt": [EOS]}


def _take_bytes(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    """Yield texts until about max_bytes of UTF-8 have passed: a bounded training sample."""
    seen = 0
    for text in texts:
        if seen >= max_bytes:
            return
        piece = text[: max_bytes - seen] if len(text) > max_bytes - seen else text
        seen += len(piece.encode("utf-8"))
        yield piece


def train_tokenizer(texts: Iterable[str], config: TokenizerConfig, family: str = "gpt",
                    show_progress: bool = True) -> Tokenizer:
    """Train a tokenizer of `config.kind` on (a bounded sample of) `texts`."""
    specials = SPECIAL_TOKENS[family]
    sample = _take_bytes(texts, config.train_max_bytes)
    if config.kind == "char":
        return _train_char(sample, specials)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(sample, trainer)
    return tokenizer


def _train_char(texts: Iterable[str], specials: list[str]) -> Tokenizer:
    """One token per Unicode character seen in training, sorted; unseen characters map to <unk>."""
    alphabet: set[str] = set()
    for text in texts:
        alphabet.update(text)
    if not alphabet:
        raise LmforgeError("cannot train a tokenizer: the corpus has no text")
    vocab = {tok: i for i, tok in enumerate([*specials, UNK, *sorted(alphabet)])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(specials + [UNK])
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"tokenizer file not found: {path}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises plain Exception for malformed files
        raise LmforgeError(f"{path} is not a tokenizers JSON file: {exc}") from None


def tokenizer_sha256(tokenizer: Tokenizer) -> str:
    return hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()


def eos_id(tokenizer: Tokenizer) -> int:
    token_id = tokenizer.token_to_id(EOS)
    if token_id is None:
        raise LmforgeError(f"the tokenizer has no {EOS} token, which a causal LM needs to separate documents")
    return token_id
