"""Task heads that sit on a Transformer stack's hidden states."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.config import ModelConfig


class MLMHead(nn.Module):
    """BERT's masked-LM head: dense + GELU + LayerNorm, then a decoder tied to the input embeddings
    with a bias of its own."""

    def __init__(self, config: ModelConfig, embeddings: nn.Embedding):
        super().__init__()
        self.dense = nn.Linear(config.d_model, config.d_model)
        self.ln = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.embeddings = embeddings  # shared, not copied: the decoder weight is the embedding matrix
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.approximate = config.gelu_approximate

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        h = self.ln(F.gelu(self.dense(hidden), approximate=self.approximate))
        return F.linear(h, self.embeddings.weight, self.bias)


class Pooler(nn.Module):
    """BERT's pooled sequence vector: dense + tanh on the first ([CLS]) position."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(config.d_model, config.d_model)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class ClassificationHead(nn.Module):
    """Dropout + linear map from a pooled vector to class logits (NSP is the 2-class case)."""

    def __init__(self, d_model: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(d_model, num_classes)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.out(self.dropout(pooled))
