"""Transformer stacks built from layers.py. GPT: a decoder-only causal LM in GPT-2's layout."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.config import ModelConfig
from lmforge.model.layers import MLP, KVCache, SelfAttention

IGNORE_INDEX = -100  # label value that contributes no loss


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


class Block(nn.Module):
    """Transformer block. Pre-LN (GPT-2): x + attn(ln(x)), then x + mlp(ln(x)).
    Post-LN (original BERT): ln(x + attn(x)), then ln(x + mlp(x))."""

    def __init__(self, config: ModelConfig, causal: bool):
        super().__init__()
        self.pre_norm = config.pre_norm
        self.ln_1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = SelfAttention(config, causal=causal)
        self.ln_2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, past: Optional[KVCache] = None,
                key_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, KVCache]:
        if self.pre_norm:
            attn_out, present = self.attn(self.ln_1(x), past, key_mask)
            x = x + attn_out
            return x + self.mlp(self.ln_2(x)), present
        attn_out, present = self.attn(x, past, key_mask)
        x = self.ln_1(x + attn_out)
        return self.ln_2(x + self.mlp(x)), present


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None
    past: Optional[list[KVCache]] = None
    labels: Optional[torch.Tensor] = None

    def eval_sums(self) -> dict[str, tuple[float, int]]:
        """(sum, count) per validation metric, so evaluation can average over batches exactly."""
        n = int((self.labels != IGNORE_INDEX).sum())
        return {"loss": (float(self.loss) * n, n)}

    def loss_terms(self) -> dict[str, Optional[torch.Tensor]]:
        """The loss as terms, each keyed by the label tensor over whose non-ignored entries it is a mean
        (so that a trainer can weight micro-batches into the exact mean over a larger batch)."""
        return {"labels": self.loss}


class GPT(nn.Module):
    """Token + learned position embeddings, pre-LN blocks, final LayerNorm, LM head tied to the embeddings."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.block_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, causal=True) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, bias=config.bias)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying (Press & Wolf 2017), as GPT-2
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        init_weights(module, self.config)

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                past: Optional[list[KVCache]] = None, use_cache: bool = False) -> CausalLMOutput:
        """input_ids: (batch, length) token ids; labels: the next tokens, IGNORE_INDEX where no loss is wanted."""
        idx, targets = input_ids, labels
        past_length = past[0][0].shape[2] if past else 0
        length = idx.shape[1]
        if past_length + length > self.config.block_size:
            raise ValueError(f"sequence of {past_length + length} tokens exceeds block_size {self.config.block_size}")
        pos = torch.arange(past_length, past_length + length, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        presents = []
        for i, block in enumerate(self.blocks):
            x, present = block(x, past[i] if past else None)
            presents.append(present)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=IGNORE_INDEX)
        return CausalLMOutput(logits, loss, presents if use_cache else None, targets)

    def num_parameters(self, exclude_embeddings: bool = True) -> int:
        """Parameter count; position embeddings excluded by default since they do no matmul work."""
        total = sum(p.numel() for p in self.parameters())
        return total - self.wpe.weight.numel() if exclude_embeddings else total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6N + 12 * layers * width * seq_len (attention)."""
        c = self.config
        return 6 * self.num_parameters() + 12 * c.n_layer * c.d_model * seq_len


def build_model(config: ModelConfig) -> nn.Module:
    if config.family == "gpt":
        return GPT(config)
    if config.family == "bert":
        from lmforge.model.encoder import BertForPreTraining  # encoder.py builds on this module's Block

        return BertForPreTraining(config)
    if config.family == "t5":
        from lmforge.model.t5 import T5

        return T5(config)
    raise ValueError(f"unknown model family {config.family!r}")
