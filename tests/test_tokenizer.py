import pytest

from lmforge.config import TokenizerConfig
from lmforge.data.tokenizer import EOS, eos_id, load_tokenizer, train_tokenizer
from lmforge.errors import LmforgeError

TEXTS = ["Hello, world!\nSecond line\twith tab.", "Ünïcödé — 日本語 text, emoji 🙂.", "  leading spaces and trailing  "]


def test_char_tokenizer_round_trips_and_has_eos():
    tok = train_tokenizer(TEXTS, TokenizerConfig(kind="char"), show_progress=False)
    for text in TEXTS:
        ids = tok.encode(text).ids
        assert len(ids) == len(text)  # one token per character
        assert tok.decode(ids) == text
    assert eos_id(tok) == 0 and tok.id_to_token(0) == EOS


def test_char_tokenizer_maps_unseen_characters_to_unk():
    tok = train_tokenizer(["abc"], TokenizerConfig(kind="char"), show_progress=False)
    assert tok.encode("abz").tokens == ["a", "b", "<unk>"]


def test_bpe_tokenizer_round_trips_any_text(tmp_path):
    tok = train_tokenizer(TEXTS * 20, TokenizerConfig(kind="bpe", vocab_size=300), show_progress=False)
    unseen = "Completely unseen: Ωμέγα, 中文, \x00 control and ✓ marks"
    for text in TEXTS + [unseen]:
        assert tok.decode(tok.encode(text).ids) == text  # byte-level: nothing is unknown
    tok.save(str(tmp_path / "t.json"))
    again = load_tokenizer(tmp_path / "t.json")
    assert again.encode(unseen).ids == tok.encode(unseen).ids


def test_training_sample_is_bounded():
    # Only the first ~10 bytes are seen, so characters after them never enter the vocabulary.
    tok = train_tokenizer(["aaaaaaaaaa", "zzzz"], TokenizerConfig(kind="char", train_max_bytes=10),
                          show_progress=False)
    assert tok.token_to_id("a") is not None and tok.token_to_id("z") is None


def test_loading_a_non_tokenizer_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(LmforgeError, match="not a tokenizers JSON"):
        load_tokenizer(bad)
