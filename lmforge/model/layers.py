"""Building blocks: multi-head attention through torch SDPA, and the position-wise MLP."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.config import ModelConfig

KVCache = tuple[torch.Tensor, torch.Tensor]  # keys and values, each (batch, heads, length, head_dim)


class SelfAttention(nn.Module):
    """Multi-head self-attention; causal for decoders. Optionally extends and returns a KV cache."""

    def __init__(self, config: ModelConfig, causal: bool):
        super().__init__()
        self.n_head, self.d_model, self.causal = config.n_head, config.d_model, causal
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.proj.is_residual_projection = True
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, past: Optional[KVCache] = None,
                key_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, KVCache]:
        """key_mask: optional (batch, 1, 1, keys) bool, True where a key may be attended (padding is False)."""
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).split(self.d_model, dim=2)
        q, k, v = (t.view(batch, length, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
        past_length = 0
        if past is not None:
            past_length = past[0].shape[2]
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        mask, is_causal = None, False
        if self.causal and length > 1:
            if past_length == 0:
                is_causal = True
            else:  # new queries sit at positions past_length.. and may see every key up to their own
                mask = torch.ones(length, past_length + length, dtype=torch.bool, device=x.device)
                mask = mask.tril(diagonal=past_length)
        if key_mask is not None:
            mask = key_mask if mask is None else mask & key_mask
            if is_causal:  # SDPA takes either is_causal or a mask: fold causality into the mask
                mask = mask & torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
                is_causal = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(batch, length, self.d_model)
        return self.resid_dropout(self.proj(y)), (k, v)


class MLP(nn.Module):
    """Position-wise feed-forward network: expand, GELU (GPT-2's tanh approximation or BERT's erf), project back."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden = config.mlp_ratio * config.d_model
        self.fc = nn.Linear(config.d_model, hidden, bias=config.bias)
        self.proj = nn.Linear(hidden, config.d_model, bias=config.bias)
        self.proj.is_residual_projection = True
        self.dropout = nn.Dropout(config.dropout)
        self.approximate = config.gelu_approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate=self.approximate)))
