"""Labeled examples -> token ids -> padded batches; the batch order as a pure function of (seed, step).

Encoders read `[CLS] a [SEP] b [SEP]` with token types 0 / 1 (the run's tokenizer template);
decoders read `a <eos> b <eos>` and are classified at their last token. Generation examples are
`prompt response <eos>` with the loss on the response only. Batches are right-padded, so a causal
model's real positions never see padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch
from tokenizers import Tokenizer
from tokenizers.processors import TemplateProcessing

from lmforge.data.tokenizer import EOS, PAD, eos_id, warn_unknown
from lmforge.model import IGNORE_INDEX
from lmforge.tasks.datasets import Example


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    type_ids: list[int]
    target: Union[int, float, list[int]]  # class, regression target, or per-token next-token labels (generation)


def task_tokenizer(tokenizer: Tokenizer, family: str, max_length: int) -> Tokenizer:
    """A copy of a run's tokenizer that adds the family's sequence template and truncates pairs longest-first."""
    tok = Tokenizer.from_str(tokenizer.to_str())
    if family == "gpt":
        eos = eos_id(tok)
        tok.post_processor = TemplateProcessing(single=f"$A {EOS}", pair=f"$A {EOS} $B:1 {EOS}:1",
                                                special_tokens=[(EOS, eos)])
    tok.no_padding()
    tok.enable_truncation(max_length, strategy="longest_first")
    return tok


def pad_id(tokenizer: Tokenizer, family: str) -> int:
    """[PAD] for BERT; decoders have no pad token, and <eos> serves (padding is masked out or ignored)."""
    return tokenizer.token_to_id(PAD) if family == "bert" else eos_id(tokenizer)


def encode_examples(tokenizer: Tokenizer, examples: Sequence[Example]) -> list[Encoded]:
    """Classification / regression inputs, through a task_tokenizer."""
    inputs = [(e.text, e.text_pair) if e.text_pair is not None else e.text for e in examples]
    encodings = tokenizer.encode_batch(inputs) if inputs else []
    warn_unknown(tokenizer, inputs, encodings, _described(examples))
    return [Encoded(enc.ids, enc.type_ids, e.label) for enc, e in zip(encodings, examples)]


def encode_generation(tokenizer: Tokenizer, examples: Sequence[Example], max_length: int) -> list[Encoded]:
    """`prompt response <eos>` as (input, next-token labels) with the prompt's labels ignored.

    Too long: the response keeps its head (at most max_length - 1 tokens), the prompt its tail.
    """
    eos = eos_id(tokenizer)
    prompts = tokenizer.encode_batch([e.text for e in examples], add_special_tokens=False)
    responses = tokenizer.encode_batch([str(e.label) for e in examples], add_special_tokens=False)
    warn_unknown(tokenizer, [e.text for e in examples] + [str(e.label) for e in examples], prompts + responses,
                 _described(examples))
    out = []
    for prompt, response in zip(prompts, responses):
        r = (response.ids + [eos])[: max_length - 1]
        p = prompt.ids[-(max_length + 1 - len(r)):] or [eos]  # an empty prompt starts from <eos>
        sequence = p + r
        labels = [IGNORE_INDEX] * (len(p) - 1) + r
        out.append(Encoded(sequence[:-1], [0] * (len(sequence) - 1), labels))
    return out


def _described(examples: Sequence[Example]) -> str:
    """'the examples of train.tsv' for a warning: the files the examples came from."""
    files = dict.fromkeys(e.source.rsplit(":", 1)[0] for e in examples)
    return f"the examples of {', '.join(files)}"


def collate(items: Sequence[Encoded], pad: int, regression: bool = False) -> dict[str, torch.Tensor]:
    """Right-pad to the longest item: input_ids, token_type_ids, attention_mask and labels."""
    length = max(len(item.ids) for item in items)
    ids = np.full((len(items), length), pad, dtype=np.int64)
    types = np.zeros((len(items), length), dtype=np.int64)
    mask = np.zeros((len(items), length), dtype=np.int64)
    for row, item in enumerate(items):
        n = len(item.ids)
        ids[row, :n], types[row, :n], mask[row, :n] = item.ids, item.type_ids, 1
    batch = {"input_ids": torch.from_numpy(ids), "token_type_ids": torch.from_numpy(types),
             "attention_mask": torch.from_numpy(mask)}
    if isinstance(items[0].target, list):
        labels = np.full((len(items), length), IGNORE_INDEX, dtype=np.int64)
        for row, item in enumerate(items):
            labels[row, : len(item.target)] = item.target
        batch["labels"] = torch.from_numpy(labels)
    elif regression:
        batch["labels"] = torch.tensor([float(item.target) for item in items], dtype=torch.float32)
    else:
        batch["labels"] = torch.tensor([int(item.target) for item in items], dtype=torch.int64)
    return batch


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    return max(1, -(-num_examples // batch_size))


def batch_indices(num_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """The examples of optimizer step `step`: each epoch a fresh permutation, drawn from (seed, epoch).

    A pure function of its arguments, so a resumed run sees exactly the batches it would have seen.
    The last batch of an epoch may be smaller.
    """
    per_epoch = steps_per_epoch(num_examples, batch_size)
    epoch, index = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    return order[index * batch_size:(index + 1) * batch_size]


def length_sorted_batches(items: Sequence[Encoded], batch_size: int) -> list[list[int]]:
    """Indices of evaluation batches, longest first and grouped by length so little is padding."""
    order = sorted(range(len(items)), key=lambda i: -len(items[i].ids))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def decode_response(tokenizer: Tokenizer, ids: Sequence[int], stop: Optional[int]) -> str:
    """Generated ids up to (not including) the stop token, as text."""
    ids = list(ids)
    if stop is not None and stop in ids:
        ids = ids[: ids.index(stop)]
    return tokenizer.decode(ids)
