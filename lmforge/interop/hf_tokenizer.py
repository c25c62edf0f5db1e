"""Tokenizer files shared with `transformers`: ours written for AutoTokenizer, theirs read as a `tokenizers` Tokenizer.

Export writes our tokenizer.json unchanged with tokenizer_class PreTrainedTokenizerFast, the class
that runs tokenizer.json as it is. (transformers 5's BertTokenizer / GPT2Tokenizer rebuild the
pipeline from the vocabulary with their own defaults, e.g. lower-casing, and can give other ids.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from lmforge.data.tokenizer import BERT_UNK, CLS, EOS, MASK, PAD, SEP, T5_EOS, T5_PAD, UNK, add_bert_template
from lmforge.errors import LmforgeError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def special_tokens(tokenizer: Tokenizer, family: str) -> dict[str, str]:
    """transformers' special-token roles for our tokenizer of `family`."""
    if family == "bert":
        return {"unk_token": BERT_UNK, "sep_token": SEP, "pad_token": PAD, "cls_token": CLS, "mask_token": MASK}
    # GPT-2's convention: <|endoftext|> begins and ends texts; no padding token
    unk = UNK if tokenizer.token_to_id(UNK) is not None else EOS
    return {"bos_token": EOS, "eos_token": EOS, "unk_token": unk}


def write_tokenizer_files(tokenizer: Tokenizer, family: str, out: Path, model_max_length: int) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json for AutoTokenizer."""
    roles = special_tokens(tokenizer, family)
    for token in roles.values():
        if tokenizer.token_to_id(token) is None:
            raise LmforgeError(f"the run's tokenizer has no {token} token, which a {family} export needs")
    inputs = ["input_ids", "token_type_ids", "attention_mask"] if family == "bert" else ["input_ids", "attention_mask"]
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
              "model_input_names": inputs, "padding_side": "right", "clean_up_tokenization_spaces": False, **roles}
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(roles, indent=2) + "\n", encoding="utf-8")


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LmforgeError(f"{path} is not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise LmforgeError(f"{path}: expected a JSON object")
    return data


def _token_text(value: Any) -> Optional[str]:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def _gpt2_from_vocab(directory: Path, options: dict[str, Any]) -> Tokenizer:
    """GPT-2's byte-level BPE from vocab.json + merges.txt (as GPT2TokenizerFast builds it)."""
    tokenizer = Tokenizer(models.BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt")))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(options.get("add_prefix_space", False)))
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def _bert_from_vocab(directory: Path, options: dict[str, Any]) -> Tokenizer:
    """BERT's WordPiece from vocab.txt, honouring do_lower_case / strip_accents / tokenize_chinese_chars."""
    tokenizer = Tokenizer(models.WordPiece.from_file(str(directory / "vocab.txt"),
                                                     unk_token=_token_text(options.get("unk_token")) or BERT_UNK))
    lowercase = bool(options.get("do_lower_case", True))
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=bool(options.get("tokenize_chinese_chars", True)),
        strip_accents=options.get("strip_accents"), lowercase=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return tokenizer


def read_hf_tokenizer(directory: Path, family: str) -> tuple[Tokenizer, list[str]]:
    """The tokenizer of a transformers checkpoint directory, and notes for the user on what was changed.

    tokenizer.json when there is one; else GPT-2's vocab.json + merges.txt or BERT's vocab.txt."""
    options: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins, as in transformers
        if (directory / name).is_file():
            options.update(read_json(directory / name))
    notes = []
    if (directory / "tokenizer.json").is_file():
        try:
            tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as exc:  # the Rust side raises plain Exception for malformed files
            raise LmforgeError(f"{directory / 'tokenizer.json'} is not a tokenizers JSON file: {exc}") from None
        source = "tokenizer.json"
    elif family == "gpt" and (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        tokenizer, source = _gpt2_from_vocab(directory, options), "vocab.json + merges.txt"
    elif family == "bert" and (directory / "vocab.txt").is_file():
        tokenizer, source = _bert_from_vocab(directory, options), "vocab.txt"
    else:
        present = ", ".join(sorted(p.name for p in directory.iterdir() if p.is_file())) or "no files"
        wanted = {"gpt": ", or vocab.json + merges.txt (GPT-2)", "bert": ", or vocab.txt (BERT)"}.get(family, "")
        raise LmforgeError(f"no tokenizer files in {directory} (found: {present}); supported: tokenizer.json"
                           f"{wanted}")
    notes.append(f"tokenizer from {source}")
    # Fixed-length padding and truncation are inference settings (e.g. a sentence-embedding model's 128);
    # lmforge packs and pads its own sequences.
    if tokenizer.truncation is not None or tokenizer.padding is not None:
        tokenizer.no_truncation()
        tokenizer.no_padding()
        notes.append("its fixed truncation/padding settings were dropped")
    needed = {"gpt": [EOS], "t5": [T5_PAD, T5_EOS]}.get(family, [CLS, SEP, PAD, MASK])
    absent = [t for t in needed if tokenizer.token_to_id(t) is None]
    if absent:
        why = {"gpt": "to separate documents", "t5": "to pad and end texts"}.get(
            family, "for BERT's [CLS] A [SEP] B [SEP] examples and masking")
        raise LmforgeError(f"the tokenizer in {directory} has no {', '.join(absent)}, which lmforge's "
                           f"{family} runs need {why}")
    tokenizer.add_special_tokens(needed)  # a no-op for tokens already special; vocab.* builds need it
    if family == "bert" and source != "tokenizer.json":
        add_bert_template(tokenizer)
    return tokenizer, notes
