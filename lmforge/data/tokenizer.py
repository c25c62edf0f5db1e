"""Train and load tokenizers (Hugging Face `tokenizers`), with each model family's special tokens."""

from __future__ import annotations

import logging

import dataclasses
import hashlib
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

from tokenizers import Encoding, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from lmforge.config import FAMILY_TOKENIZER, TokenizerConfig
from lmforge.errors import LmforgeError

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
UNK = "<unk>"
PAD, BERT_UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
# Special tokens by model family, in id order. gpt: EOS ends every document in a causal-LM stream.
# bert: BERT's five, with [PAD] = 0 as transformers' BERT expects.
# t5: <pad> = 0, </s> = 1, <unk> = 2 as T5's, and T5_SENTINELS <extra_id_i> at the end of the vocabulary.
T5_PAD, T5_EOS, T5_SENTINELS, SENTINEL = "<pad>", "</s>", 100, "<extra_id_{}>"
SPECIAL_TOKENS = {"gpt": [EOS], "bert": [PAD, BERT_UNK, CLS, SEP, MASK], "t5": [T5_PAD, T5_EOS, UNK]}
UNK_TOKEN = {"gpt": UNK, "bert": BERT_UNK, "t5": UNK}


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
    if family not in SPECIAL_TOKENS:
        raise LmforgeError(f"no tokenizer recipe for model family {family!r} (known: {', '.join(SPECIAL_TOKENS)})")
    specials = SPECIAL_TOKENS[family]
    sample = _take_bytes(texts, config.train_max_bytes)
    if config.kind == "auto":
        config = dataclasses.replace(config, kind=FAMILY_TOKENIZER[family])
    if family == "t5":  # the sentinels are part of the requested vocabulary size, as in T5's 32,000 + 100
        config = dataclasses.replace(config, vocab_size=max(config.vocab_size - config.sentinels, len(specials) + 1))
    if config.kind == "char":
        tokenizer = _train_char(sample, specials, UNK_TOKEN[family])
    elif config.kind == "wordpiece":
        # BERT's recipe: lower-cased, accents stripped, split on whitespace and punctuation, "##" suffixes.
        tokenizer = Tokenizer(models.WordPiece(unk_token=UNK_TOKEN[family]))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=config.lowercase,
                                                          strip_accents=config.lowercase)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece(prefix="##")
        trainer = trainers.WordPieceTrainer(vocab_size=config.vocab_size, special_tokens=_with_unk(specials, family),
                                            show_progress=show_progress)
        tokenizer.train_from_iterator(sample, trainer)
    elif config.kind == "unigram":
        # SentencePiece-style Unigram LM over Metaspace pre-tokens (T5's tokenizer kind).
        tokenizer = Tokenizer(models.Unigram())
        tokenizer.normalizer = normalizers.NFKC()
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=config.vocab_size, special_tokens=_with_unk(specials, family),
                                          unk_token=UNK_TOKEN[family], show_progress=show_progress)
        tokenizer.train_from_iterator(sample, trainer)
    else:
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
    if tokenizer.get_vocab_size() <= len(specials):
        raise LmforgeError("cannot train a tokenizer: the corpus has no text")
    if family == "bert":
        add_bert_template(tokenizer)
    if family == "t5":
        add_t5_sentinels_and_template(tokenizer, config.sentinels)
    return tokenizer


def _with_unk(specials: list[str], family: str) -> list[str]:
    return specials if UNK_TOKEN[family] in specials else [*specials, UNK_TOKEN[family]]


def add_bert_template(tokenizer: Tokenizer) -> None:
    """encode(a) -> [CLS] a [SEP]; encode(a, b) -> [CLS] a [SEP] b [SEP] with token types 0 / 1."""
    cls, sep = tokenizer.token_to_id(CLS), tokenizer.token_to_id(SEP)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}", pair=f"{CLS} $A {SEP} $B:1 {SEP}:1", special_tokens=[(CLS, cls), (SEP, sep)])


def add_t5_sentinels_and_template(tokenizer: Tokenizer, num_sentinels: int = T5_SENTINELS) -> None:
    """Append <extra_id_{n-1}> ... <extra_id_0> so that <extra_id_0> is the highest id (T5's order), and
    end every encoded text with </s> as T5's tokenizer does."""
    tokenizer.add_special_tokens([SENTINEL.format(i) for i in reversed(range(num_sentinels))])
    eos = tokenizer.token_to_id(T5_EOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {T5_EOS}", pair=f"$A {T5_EOS} $B {T5_EOS}", special_tokens=[(T5_EOS, eos)])


def _train_char(texts: Iterable[str], specials: list[str], unk: str) -> Tokenizer:
    """One token per Unicode character seen in training, sorted; unseen characters map to the unknown token."""
    alphabet: set[str] = set()
    for text in texts:
        alphabet.update(text)
    if not alphabet:
        raise LmforgeError("cannot train a tokenizer: the corpus has no text")
    with_unk = specials if unk in specials else [*specials, unk]
    vocab = {tok: i for i, tok in enumerate([*with_unk, *sorted(alphabet)])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(with_unk)
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


def special_id(tokenizer: Tokenizer, token: str, why: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise LmforgeError(f"the tokenizer has no {token} token, which {why}")
    return token_id


def eos_id(tokenizer: Tokenizer) -> int:
    token_id = tokenizer.token_to_id(EOS)
    if token_id is None:
        raise LmforgeError(f"the tokenizer has no {EOS} token, which a causal LM needs to separate documents")
    return token_id


def warn_unknown(tokenizer: Tokenizer, texts: Sequence[Union[str, tuple[str, Optional[str]]]],
                 encodings: Sequence[Encoding], what: str) -> int:
    """Say once, on stderr, how many characters of `texts` (single texts or pairs) became the unknown token.

    A char-level vocabulary holds only the characters seen in training; any other becomes <unk>, which the
    model never learned and decoding drops, so without this the input would lose it silently. Returns the count.
    """
    unk = next((t for t in (UNK, BERT_UNK) if tokenizer.token_to_id(t) is not None), None)
    if unk is None:  # byte-level BPE has no unknown token: it encodes any text
        return 0
    unk_id, pieces = tokenizer.token_to_id(unk), Counter()
    for text, encoding in zip(texts, encodings):
        parts = text if isinstance(text, tuple) else (text,)
        for token_id, sequence, (start, end) in zip(encoding.ids, encoding.sequence_ids, encoding.offsets):
            if token_id == unk_id and sequence is not None:
                pieces[parts[sequence][start:end]] += 1
    count = sum(len(piece) * n for piece, n in pieces.items())
    if count:
        shown = ", ".join(f"{piece!r}" + (f" x{n}" if n > 1 else "") for piece, n in pieces.most_common(20))
        more = f" and {len(pieces) - 20} more" if len(pieces) > 20 else ""
        log.warning(f"warning: {count} characters of {what} are not in the tokenizer's vocabulary and became {unk}: "
              f"{shown}{more}")
    return count
