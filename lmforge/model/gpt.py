"""GPT: a decoder-only causal LM, in GPT-2's layout or Llama's (model.layout)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.config import ModelConfig
from lmforge.model.layers import IGNORE_INDEX, Block, KVCache, init_weights, layer_index, make_norm, rotary_tables


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
    """Token embeddings (+ learned positions in the gpt2 layout; rotary positions inside attention in the
    llama layout), pre-norm blocks, final norm, LM head (tied to the embeddings unless tie_embeddings=false)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.block_size, config.d_model) if config.layout == "gpt2" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, causal=True) for _ in range(config.n_layer))
        self.ln_f = make_norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # weight tying (Press & Wolf 2017), as GPT-2
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        init_weights(module, self.config)

    def _stack(self, input_ids: torch.Tensor, past: Optional[list[KVCache]] = None,
               key_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, list[KVCache]]:
        """Final normed hidden states of the new positions and every block's KV cache."""
        past_length = past[0][0].shape[2] if past else 0
        length = input_ids.shape[1]
        if past_length + length > self.config.block_size:
            raise ValueError(f"sequence of {past_length + length} tokens exceeds block_size {self.config.block_size}")
        pos = torch.arange(past_length, past_length + length, device=input_ids.device)
        rotary = None
        if self.wpe is not None:
            x = self.drop(self.wte(input_ids) + self.wpe(pos))
        else:
            x = self.drop(self.wte(input_ids))
            rotary = rotary_tables(pos, self.config.head_dim, self.config.rope_theta)
        presents = []
        for i, block in enumerate(self.blocks):
            x, present = block(x, past[i] if past else None, key_mask, rotary)
            presents.append(present)
        return self.ln_f(x), presents

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                past: Optional[list[KVCache]] = None, use_cache: bool = False) -> CausalLMOutput:
        """input_ids: (batch, length) token ids; labels: the next tokens, IGNORE_INDEX where no loss is wanted."""
        hidden, presents = self._stack(input_ids, past)
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.reshape(-1),
                                   ignore_index=IGNORE_INDEX)
        return CausalLMOutput(logits, loss, presents if use_cache else None, labels)

    def hidden_states(self, input_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor] = None,
                      attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Final (normed) hidden states, (batch, length, d_model): the forward pass without the LM head.
        attention_mask (1 real, 0 padding) hides padding keys; with right padding causal attention already
        keeps real positions from seeing the pads. A GPT has no segments: token_type_ids must be None."""
        if token_type_ids is not None:
            raise ValueError("a GPT has no segment (token type) embeddings; pass token_type_ids=None")
        key_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            key_mask = attention_mask.bool()[:, None, None, :]
        return self._stack(input_ids, key_mask=key_mask)[0]

    def layer_of(self, param_name: str) -> int:
        """Depth of a parameter: 0 embeddings, 1..n_layer blocks, n_layer + 1 the final norm and LM head."""
        return layer_index(param_name, ("wte", "wpe"), ("ln_f", "lm_head"), self.config.n_layer)

    def num_parameters(self, exclude_embeddings: bool = True) -> int:
        """Parameter count; by default without the lookup-only tables (positions, an untied token
        embedding), which do no matmul work."""
        total = sum(p.numel() for p in self.parameters())
        if not exclude_embeddings:
            return total
        if self.wpe is not None:
            total -= self.wpe.weight.numel()
        if not self.config.tie_embeddings:
            total -= self.wte.weight.numel()
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6N + 12 * layers * width * seq_len (attention)."""
        c = self.config
        return 6 * self.num_parameters() + 12 * c.n_layer * c.d_model * seq_len
