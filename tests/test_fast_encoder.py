import logging
from pathlib import Path

import numpy as np
import pytest

from lmforge.config import TokenizerConfig
from lmforge.data.encode import encode_documents, split_text
from lmforge.data.fast_encoder import _say_once, batch_encoder, tiktoken_encoding
from lmforge.data.tokenizer import train_tokenizer
from lmforge.interop.hf_tokenizer import _gpt2_from_vocab

# ../shared next to the repository (or next to the worktrees' folder, for a git worktree)
GPT2_DIR = next((p / "shared" / "data" / "models" / "gpt2-tokenizer" for p in Path(__file__).resolve().parents[2:4]
                 if (p / "shared").is_dir()), Path("missing"))

FRAGMENTS = ["Hello", "world", "The", "quick", "brown", "fox", "it's", "they'll", "we've", "I'm", "you'd", "can't",
             "THEY'RE", "O'Neil", "''s", "Ünïcödé", "naïve", "日本語のテキスト", "中文字符", "한국어", "العربية", "עברית",
             "ελληνικά", "русский", "हिन्दी", "ไทย", "🙂", "👍🏽", "👨‍👩‍👧", "🇫🇷", "∑∫√", "½", "²", "Ⅻ", "١٢٣", "０１２",
             "12345678901234567890123", "3.14159", "1,000,000", "$5", "e-mail", "<|endoftext|>", "<|endoftext",
             "...", "?!", "#", "@user", "http://x.org/a?b=c", "\u200b", "\u00ad", "a\u0301", "\ufeff"]
SPACES = [" ", " ", " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "\u00a0", "\u3000", "\u2009", "\x0b", "\x1c",
          "\u0085", "\u2028", ""]


def varied_texts(n: int, seed: int = 0) -> list[str]:
    """Documents mixing scripts, emoji, whitespace runs, long numbers, contractions and random code points."""
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(n):
        parts = []
        for _ in range(int(rng.integers(1, 60))):
            if rng.random() < 0.15:  # any code point but surrogates: catches regex class differences
                cp = int(rng.choice([rng.integers(0x20, 0x3000), rng.integers(0x3000, 0xD800),
                                     rng.integers(0xE000, 0x110000)]))
                parts.append(chr(cp))
            else:
                parts.append(str(rng.choice(FRAGMENTS)))
            parts.append(str(rng.choice(SPACES)))
        texts.append("".join(parts))
    return texts


@pytest.fixture(scope="module")
def gpt2():
    if not GPT2_DIR.is_dir():
        pytest.skip(f"GPT-2 tokenizer files not found at {GPT2_DIR}")
    tokenizer = _gpt2_from_vocab(GPT2_DIR, {})
    tokenizer.add_special_tokens(["<|endoftext|>"])
    return tokenizer


@pytest.fixture(scope="module")
def trained_bpe():
    texts = varied_texts(400, seed=1)
    return train_tokenizer(texts, TokenizerConfig(kind="bpe", vocab_size=1200), show_progress=False)


def _reference_ids(tokenizer, texts):
    return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]


@pytest.mark.parametrize("which", ["gpt2", "trained_bpe"])
def test_tiktoken_ids_equal_tokenizers_ids_on_varied_unicode(which, request):
    tokenizer = request.getfixturevalue(which)
    assert tiktoken_encoding(tokenizer) is not None  # the fast path is taken
    texts = varied_texts(1500, seed=2) + ["", " ", "\n", "   \n\n\t ", "a" * 5000, "9" * 3000, "🙂" * 300]
    fast = batch_encoder(tokenizer)(texts)
    assert [ids.tolist() for ids in fast] == _reference_ids(tokenizer, texts)


def test_gpt2_fast_path_gives_gpt2s_known_ids(gpt2):
    ids = batch_encoder(gpt2)(["Hello world! The quick brown fox<|endoftext|>"])[0].tolist()
    assert ids == [15496, 995, 0, 383, 2068, 7586, 21831, 50256]


@pytest.mark.parametrize("kind", ["wordpiece", "unigram"])
def test_other_tokenizers_fall_back_and_say_so_once(kind, caplog):
    tokenizer = train_tokenizer(varied_texts(200, seed=3), TokenizerConfig(kind=kind, vocab_size=3000),
                                family="bert" if kind == "wordpiece" else "gpt", show_progress=False)
    _say_once.cache_clear()  # said once per process: forget what earlier tests made it say
    with caplog.at_level(logging.INFO, logger="lmforge"):
        assert tiktoken_encoding(tokenizer) is None
        encode = batch_encoder(tokenizer)
        batch_encoder(tokenizer)
    said = [r.getMessage() for r in caplog.records if "not tiktoken" in r.getMessage()]
    assert len(said) == 1 and ("WordPiece" in said[0] or "Unigram" in said[0])
    texts = varied_texts(100, seed=4)
    assert [ids.tolist() for ids in encode(texts)] == _reference_ids(tokenizer, texts)


def test_the_char_tokenizer_encodes_by_table_with_the_ids_of_tokenizers(caplog):
    tokenizer = train_tokenizer(varied_texts(50, seed=9), TokenizerConfig(kind="char"), show_progress=False)
    texts = varied_texts(300, seed=10) + ["", "unseen: ∮ 𝔘 \x00", "<unk> and <|endoftext|> as text"]
    _say_once.cache_clear()
    with caplog.at_level(logging.INFO, logger="lmforge"):
        encode = batch_encoder(tokenizer)
    assert not [r for r in caplog.records if "not tiktoken" in r.getMessage()]  # the table, not tokenizers
    assert [ids.tolist() for ids in encode(texts)] == _reference_ids(tokenizer, texts)


def test_a_bpe_with_a_prefix_space_is_not_converted(gpt2):
    from tokenizers import Tokenizer, pre_tokenizers

    other = Tokenizer.from_str(gpt2.to_str())
    other.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    assert tiktoken_encoding(other) is None


def test_split_text_pieces_are_bounded_and_rejoin():
    rng = np.random.default_rng(5)
    text = "".join(varied_texts(300, seed=5))
    for max_chars in (1000, 3000):
        pieces = split_text(text, max_chars)
        assert "".join(pieces) == text and all(len(p) <= max_chars for p in pieces) and len(pieces) > 3
    no_spaces = "".join(rng.choice(list("abc日🙂"), size=2500))
    assert [len(p) for p in split_text(no_spaces, 1000)] == [1000, 1000, 500]


@pytest.mark.parametrize("kind", ["bpe", "gpt2", "wordpiece", "unigram", "char"])
def test_long_documents_encoded_in_pieces_give_the_ids_of_the_whole(kind, request):
    family = "bert" if kind == "wordpiece" else "gpt"
    if kind == "gpt2":
        tokenizer = request.getfixturevalue("gpt2")
    else:
        tokenizer = train_tokenizer(varied_texts(300, seed=6), TokenizerConfig(kind=kind, vocab_size=3000),
                                    family=family, show_progress=False)
    long_doc = "".join(varied_texts(400, seed=7))  # ~100k characters, spaces of every kind
    whole = encode_documents(tokenizer, [long_doc], "gpt" if family == "gpt" else "bert", max_chars=10**7)
    pieces = encode_documents(tokenizer, [long_doc], "gpt" if family == "gpt" else "bert", max_chars=1000)
    assert len(whole[0]) > 5000 and np.array_equal(whole[0], pieces[0])


def test_a_batch_encoded_in_one_call_equals_each_document_encoded_alone(trained_bpe):
    from lmforge.data.encode import encode_stream
    from lmforge.data.fast_encoder import joined_encoder

    texts = varied_texts(300, seed=8) + ["", "x"]
    reference = encode_documents(trained_bpe, texts, "gpt")
    joined = joined_encoder(trained_bpe, "<|endoftext|>")
    assert joined is not None
    for batch in (texts, texts[:50] + ["a doc holding <|endoftext|> itself"] + texts[50:60]):
        tokens, lengths = encode_stream(trained_bpe, batch, "gpt", 10**6, batch_encoder(trained_bpe),
                                        [True] * len(batch), joined)
        expected = encode_documents(trained_bpe, batch, "gpt")
        assert lengths.tolist() == [len(e) for e in expected]
        assert np.array_equal(tokens, np.concatenate(expected))
    assert [len(r) for r in reference][-2:] == [1, 2]  # an empty document is its end-of-text token alone
