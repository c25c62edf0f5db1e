"""Autoregressive decoding of decoder-only (GPT) models with a KV cache: sampling with temperature, top-k and
top-p (nucleus) filtering, greedy, and beam search."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.infer.beam import search_beams


def filter_logits(logits: torch.Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest set with probability >= top_p."""
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # drop a token when the tokens before it already reach top_p; the most likely always stays
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def generate(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None,
             generator: Optional[torch.Generator] = None, use_cache: bool = True,
             stop_token: Optional[int] = None) -> torch.Tensor:
    """Extend idx (batch, length) by up to max_new_tokens; temperature 0 means greedy.

    With the cache each new token costs one position of work. Past block_size the model's window
    slides, which changes every position, so from then on each step recomputes the cropped window.
    """
    was_training = model.training
    model.eval()
    block_size = model.config.block_size
    past = None
    for _ in range(max_new_tokens):
        if use_cache and idx.size(1) <= block_size:
            step_input = idx if past is None else idx[:, -1:]
            out = model(step_input, past=past, use_cache=True)
            past = out.past
        else:
            out = model(idx[:, -block_size:])
        logits = out.logits[:, -1, :].float()
        if temperature == 0:
            next_token = logits.argmax(dim=-1, keepdim=True)
        else:
            probs = torch.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
            next_token = torch.multinomial(probs, 1, generator=generator)
        idx = torch.cat([idx, next_token], dim=1)
        if stop_token is not None and bool((next_token == stop_token).all()):
            break
    model.train(was_training)
    return idx


class CausalDecoder:
    """Step-by-step decoding of a GPT's beams (rows b * beams ... b * beams + beams - 1 extend input row b).

    With the cache the prompt runs once per input row and its keys/values are copied to the row's beams;
    then each step feeds only the newest tokens. Past block_size the window slides and each step
    recomputes the cropped window, as `generate` does."""

    def __init__(self, model: nn.Module, use_cache: bool, beams: int):
        self.model, self.use_cache, self.beams = model, use_cache, beams
        self.past = None

    def next_logits(self, sequences: torch.Tensor) -> torch.Tensor:
        """(rows, vocab) float32 logits for the token after each row of `sequences` (rows, length)."""
        block_size = self.model.config.block_size
        if not self.use_cache or sequences.shape[1] > block_size:
            return self.model(sequences[:, -block_size:]).logits[:, -1].float()
        if self.past is None:  # the first step: every beam of an input row holds the same prompt
            out = self.model(sequences[:: self.beams], use_cache=True)
            self.past = [tuple(t.repeat_interleave(self.beams, dim=0) for t in layer) for layer in out.past]
            return out.logits[:, -1].float().repeat_interleave(self.beams, dim=0)
        out = self.model(sequences[:, -1:], past=self.past, use_cache=True)
        self.past = out.past
        return out.logits[:, -1].float()

    def reorder_beams(self, rows: torch.Tensor) -> None:
        """Make row i continue from row rows[i]: its KV cache follows."""
        if self.past is not None:
            self.past = [tuple(t.index_select(0, rows) for t in layer) for layer in self.past]


@torch.no_grad()
def beam_search(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, num_beams: int = 4,
                length_penalty: float = 1.0, early_stopping: bool = False, stop_token: Optional[int] = None,
                use_cache: bool = True) -> torch.Tensor:
    """The best beam-search continuation of each row of idx (batch, length: prompts of one length), prompt
    included; a hypothesis ends at stop_token or after max_new_tokens (rules: lmforge.infer.beam).
    Rows that ended earlier than the longest are padded with stop_token, as transformers pads them."""
    if num_beams < 1:
        raise LmforgeError(f"num_beams must be >= 1, got {num_beams}")
    if max_new_tokens < 1:
        return idx
    was_training = model.training
    model.eval()
    try:
        pad = 0 if stop_token is None else stop_token
        return search_beams(CausalDecoder(model, use_cache, num_beams), idx, max_new_tokens, num_beams,
                            length_penalty, early_stopping, stop_token, pad)
    finally:
        model.train(was_training)
