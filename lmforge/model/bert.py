"""BERT: a bidirectional Transformer encoder with masked-LM and next-sentence-prediction heads.

Laid out as the original BERT (and transformers' BertForPreTraining) so checkpoints map one to one:
token + learned position + segment embeddings -> LayerNorm -> post-LN blocks (GELU) -> pooler on
[CLS]; MLM head with its decoder tied to the token embeddings; NSP head on the pooled vector.
`model.norm: pre` gives pre-LN blocks and a final LayerNorm instead, which trains more stably deep.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.config import ModelConfig
from lmforge.model.heads import ClassificationHead, MLMHead, Pooler
from lmforge.model.layers import IGNORE_INDEX, Block, alibi_bias, init_weights, layer_index

MLM_ROWS_BUCKET = 64


class BertEncoder(nn.Module):
    """Embeddings + encoder blocks + pooler; returns per-token hidden states and the pooled vector."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.block_size, config.d_model) if config.position == "learned" else None
        self.wtt = nn.Embedding(config.type_vocab_size, config.d_model)
        self.ln_emb = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, causal=False) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps) if config.pre_norm else nn.Identity()
        self.pooler = Pooler(config)

    def forward(self, input_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids, token_type_ids, attention_mask: (batch, length); attention_mask is 1 for real tokens
        and 0 for padding (padding is never attended to)."""
        length = input_ids.shape[1]
        if length > self.config.block_size:
            raise ValueError(f"sequence of {length} tokens exceeds block_size {self.config.block_size}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.wte(input_ids) + self.wtt(token_type_ids)
        attn_bias = None
        if self.wpe is None:
            attn_bias = alibi_bias(self.config.n_head, length, input_ids.device)
        else:
            x = x + self.wpe(torch.arange(length, device=input_ids.device))
        x = self.drop(self.ln_emb(x))
        key_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            key_mask = attention_mask.bool()[:, None, None, :]  # (batch, 1 head-broadcast, 1 query, keys)
        for block in self.blocks:
            x, _ = block(x, key_mask=key_mask, attn_bias=attn_bias)
        x = self.ln_f(x)
        return x, self.pooler(x)

    def hidden_states(self, input_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor] = None,
                      attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Final hidden states, (batch, length, d_model), without the pooler."""
        return self(input_ids, token_type_ids, attention_mask)[0]

    def layer_of(self, param_name: str) -> int:
        """Depth of a parameter: 0 embeddings, 1..n_layer blocks, n_layer + 1 the final norm and pooler."""
        return layer_index(param_name, ("wte", "wpe", "wtt", "ln_emb"), ("ln_f", "pooler"), self.config.n_layer)


@dataclass
class PreTrainingOutput:
    loss: Optional[torch.Tensor]  # mlm_loss + nsp_loss (the NSP term only where NSP labels are given)
    mlm_logits: torch.Tensor  # (masked positions, vocab) when mlm_labels are given, else (batch, length, vocab)
    nsp_logits: torch.Tensor  # (batch, 2)
    mlm_loss: Optional[torch.Tensor] = None
    nsp_loss: Optional[torch.Tensor] = None
    mlm_targets: Optional[torch.Tensor] = None  # the labels of the rows of mlm_logits
    nsp_labels: Optional[torch.Tensor] = None

    def loss_terms(self) -> dict[str, Optional[torch.Tensor]]:
        """The loss as terms, each keyed by the label tensor over whose non-ignored entries it is a mean
        (so that a trainer can weight micro-batches into the exact mean over a larger batch)."""
        return {"mlm_labels": self.mlm_loss, "nsp_labels": self.nsp_loss}

    def eval_sums(self) -> dict[str, tuple[float, int]]:
        """(sum, count) per validation metric, so evaluation can average over batches exactly."""
        sums: dict[str, tuple[float, int]] = {}
        if self.mlm_targets is not None and self.mlm_loss is not None:
            n = int(self.mlm_targets.numel())
            correct = int((self.mlm_logits.argmax(-1) == self.mlm_targets).sum())
            sums["mlm_loss"] = (float(self.mlm_loss) * n, n)
            sums["mlm_acc"] = (float(correct), n)
        if self.nsp_labels is not None:
            keep = self.nsp_labels != IGNORE_INDEX
            n = int(keep.sum())
            if n:
                nll = F.cross_entropy(self.nsp_logits.float()[keep], self.nsp_labels[keep], reduction="sum")
                correct = int((self.nsp_logits[keep].argmax(-1) == self.nsp_labels[keep]).sum())
                sums["nsp_loss"] = (float(nll), n)
                sums["nsp_acc"] = (float(correct), n)
        return sums


class BertForPreTraining(nn.Module):
    """Encoder + MLM head (decoder tied to the token embeddings) + NSP head."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.bert = BertEncoder(config)
        self.mlm = MLMHead(config, self.bert.wte)
        self.nsp = ClassificationHead(config.d_model, 2)
        self.apply(lambda m: init_weights(m, config))

    def forward(self, input_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, mlm_labels: Optional[torch.Tensor] = None,
                nsp_labels: Optional[torch.Tensor] = None) -> PreTrainingOutput:
        """mlm_labels: (batch, length), the original id at masked positions and IGNORE_INDEX elsewhere;
        nsp_labels: (batch,), 0 = B follows A, 1 = B is random (IGNORE_INDEX: no NSP loss)."""
        hidden, pooled = self.bert(input_ids, token_type_ids, attention_mask)
        nsp_logits = self.nsp(pooled)
        if mlm_labels is None:
            return PreTrainingOutput(None, self.mlm(hidden), nsp_logits)
        # Only the masked ~15% of positions need the vocabulary projection, the costliest matmul here.
        # Their count varies per batch; rounding it up to a multiple of MLM_ROWS_BUCKET (extra rows
        # repeat position 0 and carry no loss) keeps the matmul shapes few, so CPU kernel and allocator
        # caches stay small instead of growing with every new shape.
        flat_labels = mlm_labels.reshape(-1)
        rows = torch.nonzero(flat_labels != IGNORE_INDEX).squeeze(1)
        count = rows.numel()
        padded = -(-count // MLM_ROWS_BUCKET) * MLM_ROWS_BUCKET
        rows = F.pad(rows, (0, padded - count))
        targets = F.pad(flat_labels[rows[:count]], (0, padded - count), value=IGNORE_INDEX)
        logits = self.mlm(hidden.reshape(-1, hidden.shape[-1])[rows])
        if count:
            mlm_loss = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX)
        else:  # nothing masked in this batch: a zero that still carries the graph
            mlm_loss = logits.sum() * 0.0
        mlm_logits, targets = logits[:count], targets[:count]
        loss, nsp_loss = mlm_loss, None
        if nsp_labels is not None and bool((nsp_labels != IGNORE_INDEX).any()):
            nsp_loss = F.cross_entropy(nsp_logits.float(), nsp_labels, ignore_index=IGNORE_INDEX)
            loss = loss + nsp_loss
        return PreTrainingOutput(loss, mlm_logits, nsp_logits, mlm_loss, nsp_loss, targets, nsp_labels)

    def hidden_states(self, input_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor] = None,
                      attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The encoder's final hidden states, (batch, length, d_model)."""
        return self.bert.hidden_states(input_ids, token_type_ids, attention_mask)

    def layer_of(self, param_name: str) -> int:
        """Depth of a parameter: 0 embeddings, 1..n_layer blocks, n_layer + 1 what sits on top (pooler, heads)."""
        if param_name.startswith("bert."):
            return self.bert.layer_of(param_name.removeprefix("bert."))
        return layer_index(param_name, (), ("mlm", "nsp"), self.config.n_layer)

    def num_parameters(self, exclude_embeddings: bool = True) -> int:
        """Parameter count; position and segment embeddings excluded by default (no matmul work)."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.bert.wtt.weight.numel() + (self.bert.wpe.weight.numel() if self.bert.wpe is not None else 0)
        return total

    def flops_per_token(self, seq_len: int, mask_rate: float = 0.15) -> float:
        """Training FLOPs per token: 6 x the matmul parameters the token passes through, plus attention.
        The tied vocabulary projection runs only at the masked positions."""
        c = self.config
        vocab_matmul = c.vocab_size * c.d_model
        body = self.num_parameters() - vocab_matmul - c.vocab_size  # minus the embedding matrix and MLM bias
        return 6 * (body + mask_rate * vocab_matmul) + 12 * c.n_layer * c.d_model * seq_len
