"""Autoregressive sampling with a KV cache: temperature, top-k and top-p (nucleus) filtering."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


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
