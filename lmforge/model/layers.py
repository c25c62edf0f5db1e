"""Building blocks shared by every family: attention through torch SDPA, rotary positions, feed-forward
networks, norms, the Transformer block, and the weight initialisation."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.config import ModelConfig

IGNORE_INDEX = -100  # label value that contributes no loss
KVCache = tuple[torch.Tensor, torch.Tensor]  # keys and values, each (batch, kv heads, length, head_dim)
Rotary = tuple[torch.Tensor, torch.Tensor]  # cos and sin, each (length, head_dim)


def init_weights(module: nn.Module, config: ModelConfig) -> None:
    """N(0, 0.02) for matrices and embeddings, zero biases (GPT-2 and BERT alike). In pre-LN stacks the
    projections into the residual stream are scaled by 1/sqrt(2 * n_layer) so the stream's variance
    does not grow with depth (GPT-2); post-LN stacks renormalise after every sum and need no scaling."""
    if isinstance(module, nn.Linear):
        std = 0.02
        if getattr(module, "is_residual_projection", False) and config.pre_norm:
            std /= math.sqrt(2 * config.n_layer)
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)


def make_norm(config: ModelConfig) -> nn.Module:
    """The layout's normalisation over d_model: LayerNorm (gpt2) or RMSNorm (llama)."""
    if config.layout == "llama":
        return nn.RMSNorm(config.d_model, eps=config.layer_norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, bias=config.bias)


def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float) -> Rotary:
    """cos and sin of the rotary angles position * theta**(-2i / head_dim), each (length, head_dim): angle i
    is repeated at i and i + head_dim / 2, the pair it rotates (transformers' Llama convention)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, rotary: Rotary) -> torch.Tensor:
    """Rotate each pair (x[i], x[i + head_dim / 2]) of x (batch, heads, length, head_dim) by its angle."""
    cos, sin = (t.to(x.dtype) for t in rotary)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class SelfAttention(nn.Module):
    """Multi-head self-attention; causal for decoders. Grouped-query when n_kv_head < n_head (each key/value
    head serves n_head / n_kv_head query heads). Optionally extends and returns a KV cache."""

    def __init__(self, config: ModelConfig, causal: bool):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        self.d_model, self.causal = config.d_model, causal
        # Q, K and V in one matrix: one matmul instead of three
        self.qkv = nn.Linear(config.d_model, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=config.bias)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.proj.is_residual_projection = True
        self.q_norm = nn.RMSNorm(self.head_dim, eps=config.layer_norm_eps) if config.qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, eps=config.layer_norm_eps) if config.qk_norm else None
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, past: Optional[KVCache] = None, key_mask: Optional[torch.Tensor] = None,
                rotary: Optional[Rotary] = None, attn_bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, KVCache]:
        """key_mask: optional (batch, 1, 1, keys) bool, True where a key may be attended (padding is False);
        rotary: cos and sin for the new positions (rotary position embeddings), or None;
        attn_bias: optional additive (1, heads, queries, keys) scores of a bidirectional stack (ALiBi)."""
        batch, length, _ = x.shape
        q_size, kv_size = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = self.qkv(x).split([q_size, kv_size, kv_size], dim=2)
        q = q.view(batch, length, self.n_head, self.head_dim).transpose(1, 2)
        k, v = (t.view(batch, length, self.n_kv_head, self.head_dim).transpose(1, 2) for t in (k, v))
        if self.q_norm is not None:  # in float32: under bf16 autocast q and k arrive in bf16, the weights do not
            q, k = self.q_norm(q.float()).to(q.dtype), self.k_norm(k.float()).to(k.dtype)
        if rotary is not None:
            q, k = apply_rotary(q, rotary), apply_rotary(k, rotary)
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
        if attn_bias is not None:
            bias = attn_bias.to(q.dtype)
            mask = bias if mask is None else bias.masked_fill(~mask, torch.finfo(q.dtype).min)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=self.n_kv_head != self.n_head)
        y = y.transpose(1, 2).contiguous().view(batch, length, self.d_model)
        return self.resid_dropout(self.proj(y)), (k, v)


class MLP(nn.Module):
    """Position-wise feed-forward network: expand, GELU (GPT-2's tanh approximation or BERT's erf), project back."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden = config.ffn_size
        self.fc = nn.Linear(config.d_model, hidden, bias=config.bias)
        self.proj = nn.Linear(hidden, config.d_model, bias=config.bias)
        self.proj.is_residual_projection = True
        self.dropout = nn.Dropout(config.dropout)
        self.approximate = config.gelu_approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate=self.approximate)))


class SwiGLU(nn.Module):
    """Gated feed-forward network (Shazeer 2020, as Llama): proj(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden = config.ffn_size
        self.fc = nn.Linear(config.d_model, 2 * hidden, bias=config.bias)  # gate and up in one matmul
        self.proj = nn.Linear(hidden, config.d_model, bias=config.bias)
        self.proj.is_residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fc(x).chunk(2, dim=-1)
        return self.dropout(self.proj(F.silu(gate) * up))


class Block(nn.Module):
    """Transformer block. Pre-norm (GPT-2, Llama): x + attn(norm(x)), then x + mlp(norm(x)).
    Post-LN (original BERT): ln(x + attn(x)), then ln(x + mlp(x))."""

    def __init__(self, config: ModelConfig, causal: bool):
        super().__init__()
        self.pre_norm = config.pre_norm
        self.ln_1 = make_norm(config)
        self.attn = SelfAttention(config, causal=causal)
        self.ln_2 = make_norm(config)
        self.mlp = SwiGLU(config) if config.layout == "llama" else MLP(config)

    def forward(self, x: torch.Tensor, past: Optional[KVCache] = None, key_mask: Optional[torch.Tensor] = None,
                rotary: Optional[Rotary] = None, attn_bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, KVCache]:
        if self.pre_norm:
            attn_out, present = self.attn(self.ln_1(x), past, key_mask, rotary, attn_bias)
            x = x + attn_out
            return x + self.mlp(self.ln_2(x)), present
        attn_out, present = self.attn(x, past, key_mask, rotary, attn_bias)
        x = self.ln_1(x + attn_out)
        return self.ln_2(x + self.mlp(x)), present


def alibi_slopes(n_head: int) -> torch.Tensor:
    """ALiBi's per-head slopes 2**(-8 (h + 1) / n_head), float64: head 0 the most local."""
    return 2.0 ** (-8.0 * torch.arange(1, n_head + 1, dtype=torch.float64, device="cpu") / n_head)


def alibi_bias(n_head: int, length: int, device: torch.device) -> torch.Tensor:
    """(1, heads, length, length): -slope_h * |query - key|, the symmetric (bidirectional) ALiBi of MosaicBERT."""
    positions = torch.arange(length, device=device)
    distance = (positions[None, :] - positions[:, None]).abs()
    return (-alibi_slopes(n_head).to(device)[:, None, None] * distance).float().unsqueeze(0)


def layer_index(name: str, embeddings: tuple[str, ...], top: tuple[str, ...], n_layer: int) -> int:
    """Depth of parameter `name` in a stack: 0 for the `embeddings` modules, 1..n_layer for blocks.i,
    n_layer + 1 for the `top` modules (final norm, pooler, heads)."""
    first, _, rest = name.partition(".")
    if first == "blocks":
        return int(rest.split(".", 1)[0]) + 1
    if first in embeddings:
        return 0
    if first in top:
        return n_layer + 1
    raise ValueError(f"{name!r} is not a parameter of this model")
