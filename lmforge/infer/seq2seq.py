"""Encoder-decoder decoding: greedy, sampling (temperature / top-k / top-p) and beam search.

The encoder runs once; the cross-attention keys/values of its output are computed once (the
model's DecoderCache); with use_cache each step feeds the decoder only the newest token and extends
the self-attention KV cache (without it, each step reruns the decoder over the whole prefix, which
gives the same tokens and exists to check that). Outputs are (batch, length) decoder sequences
starting with the start token (<pad>), as transformers' generate returns them; a sequence that has
ended with </s> is padded with <pad>. `fill_spans` puts the spans a model wrote for sentinels back
into its input (span filling: "The <extra_id_0> sat on the mat.").

Beam search follows transformers' rules (lmforge.infer.beam), so that exports decode identically.
"""

from __future__ import annotations

from typing import Optional

import torch

from lmforge.data.objectives.span import SpanVocab
from lmforge.errors import LmforgeError
from lmforge.infer.beam import search_beams
from lmforge.infer.generate import filter_logits
from lmforge.model.t5 import PAD_ID, T5

EOS_ID = 1


class Decoder:
    """Step-by-step decoder over one encoded batch, with or without the self-attention KV cache."""

    def __init__(self, model: T5, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                 use_cache: bool, repeat: int = 1):
        encoder_out = model.encode(input_ids, attention_mask)
        if repeat > 1:  # beams: each input row repeated for its beams, rows b*repeat ... b*repeat+repeat-1
            encoder_out = encoder_out.repeat_interleave(repeat, dim=0)
            attention_mask = None if attention_mask is None else attention_mask.repeat_interleave(repeat, dim=0)
        self.model, self.use_cache = model, use_cache
        self.base = model.start_cache(encoder_out, attention_mask)
        self.cache = self.base

    def next_logits(self, sequences: torch.Tensor) -> torch.Tensor:
        """(rows, vocab) float32 logits for the token after `sequences` (rows, length)."""
        if self.use_cache:
            logits, self.cache = self.model.decode(sequences[:, self.cache.length:], self.cache)
        else:
            logits, _ = self.model.decode(sequences, self.base)
        return logits[:, -1].float()

    def reorder_beams(self, rows: torch.Tensor) -> None:
        """Make row i continue from row rows[i], a beam of the same input."""
        if self.use_cache:
            self.cache = self.cache.select(rows, same_inputs=True)


def _check(max_new_tokens: int, num_beams: int, temperature: float) -> None:
    if max_new_tokens < 1:
        raise LmforgeError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if num_beams < 1:
        raise LmforgeError(f"num_beams must be >= 1, got {num_beams}")
    if temperature < 0:
        raise LmforgeError(f"temperature must be >= 0 (0 = greedy), got {temperature}")


@torch.no_grad()
def generate_seq2seq(model: T5, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                     max_new_tokens: int = 32, temperature: float = 0.0, top_k: Optional[int] = None,
                     top_p: Optional[float] = None, generator: Optional[torch.Generator] = None,
                     num_beams: int = 1, length_penalty: float = 1.0, early_stopping: bool = False,
                     eos_id: int = EOS_ID, use_cache: bool = True) -> torch.Tensor:
    """Decode up to max_new_tokens per input row: beam search when num_beams > 1, else greedy
    (temperature 0) or sampling."""
    _check(max_new_tokens, num_beams, temperature)
    was_training = model.training
    model.eval()
    try:
        if num_beams > 1:
            return beam_search(model, input_ids, attention_mask, max_new_tokens, num_beams, length_penalty,
                               early_stopping, eos_id, use_cache)
        return sample(model, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p, generator,
                      eos_id, use_cache)
    finally:
        model.train(was_training)


@torch.no_grad()
def sample(model: T5, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], max_new_tokens: int,
           temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
           generator: Optional[torch.Generator] = None, eos_id: int = EOS_ID, use_cache: bool = True) -> torch.Tensor:
    """Greedy (temperature 0) or sampled decoding, one token per row per step, until every row has </s>."""
    decoder = Decoder(model, input_ids, attention_mask, use_cache)
    sequences = torch.full((input_ids.shape[0], 1), PAD_ID, dtype=torch.long, device=input_ids.device)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        logits = decoder.next_logits(sequences)
        if temperature == 0:
            token = logits.argmax(dim=-1)
        else:
            probs = torch.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        token = token.masked_fill(finished, PAD_ID)
        sequences = torch.cat([sequences, token[:, None]], dim=1)
        finished |= token == eos_id
        if bool(finished.all()):
            break
    return sequences


@torch.no_grad()
def beam_search(model: T5, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], max_new_tokens: int,
                num_beams: int = 4, length_penalty: float = 1.0, early_stopping: bool = False,
                eos_id: int = EOS_ID, use_cache: bool = True) -> torch.Tensor:
    """The best finished hypothesis per input row (the rules: lmforge.infer.beam), starting with <pad>."""
    decoder = Decoder(model, input_ids, attention_mask, use_cache, repeat=num_beams)
    start = torch.full((input_ids.shape[0], 1), PAD_ID, dtype=torch.long, device=input_ids.device)
    return search_beams(decoder, start, max_new_tokens, num_beams, length_penalty, early_stopping, eos_id, PAD_ID)


def fill_spans(input_ids: list[int], output_ids: list[int], vocab: SpanVocab) -> list[int]:
    """The input with each sentinel replaced by the span written after the same sentinel in the output
    (empty if the output has none); the output's start <pad> and anything from </s> on are ignored."""
    spans: dict[int, list[int]] = {}
    current = None
    for token in output_ids:
        if token == vocab.eos:
            break
        if vocab.is_sentinel(token):
            current = spans.setdefault(token, [])
        elif current is not None:
            current.append(token)
    filled = []
    for token in input_ids:
        if token == vocab.eos:
            break
        filled.extend(spans.get(token, []) if vocab.is_sentinel(token) else [token])
    return filled
