"""A minimal plain-PyTorch GPT-2, written for the training-step benchmark as the "one file" peer.

The way the small reference implementations of the field write it: one module, the QKV projection as
one matrix, PyTorch SDPA with is_causal, a tanh-GELU MLP, LayerNorm with bias, the LM head tied to
the token embedding, N(0, 0.02) initialisation with the residual projections scaled by
1/sqrt(2 * n_layer). Same layout and parameter count as lmforge's gpt2 layout, so a step of either does
the same arithmetic.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PlainGPT(nn.Module):
    def __init__(self, vocab_size: int, n_layer: int, n_head: int, d_model: int, block_size: int):
        super().__init__()
        self.n_head = n_head
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(block_size, d_model)
        self.layers = nn.ModuleList(
            nn.ModuleDict({
                "norm1": nn.LayerNorm(d_model),
                "qkv": nn.Linear(d_model, 3 * d_model),
                "out": nn.Linear(d_model, d_model),
                "norm2": nn.LayerNorm(d_model),
                "up": nn.Linear(d_model, 4 * d_model),
                "down": nn.Linear(4 * d_model, d_model),
            })
            for _ in range(n_layer))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.tok.weight
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 2:
                residual = name.endswith(("out.weight", "down.weight"))
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layer) if residual else 0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of (batch, length) ids against (batch, length) targets."""
        b, t = idx.shape
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for layer in self.layers:
            h = layer["norm1"](x)
            q, k, v = layer["qkv"](h).view(b, t, 3, self.n_head, -1).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + layer["out"](a.transpose(1, 2).reshape(b, t, -1))
            x = x + layer["down"](F.gelu(layer["up"](layer["norm2"](x)), approximate="tanh"))
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
