"""Task models that predict per token: a tagger (a class per token) and a span extractor (start / end logits).

Both read the backbone's final hidden states: BERT's bidirectional ones, or a GPT's causal ones
(each position has read only its left context: a weaker tagger, but the same shapes). The layers are
named as in transformers' BertForTokenClassification (`classifier`) and BertForQuestionAnswering
(`qa_outputs`), so export maps them one to one. The losses are BERT's: cross-entropy over the
labelled tokens, and the mean of the start and end cross-entropies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model import build_model
from lmforge.model.config import ModelConfig
from lmforge.tasks.batches import IGNORE_INDEX


def backbone_hidden(backbone: nn.Module, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Final hidden states (batch, length, d_model) of a BertEncoder or GPT backbone.

    A GPT has no segments: token_type_ids are dropped for it.
    """
    if backbone.config.family != "bert":
        token_type_ids = None
    return backbone.hidden_states(input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask)


class _PerTokenModel(nn.Module):
    """A backbone with a linear layer over each token's final hidden state."""

    def __init__(self, backbone: nn.Module, width: int, dropout: float):
        super().__init__()
        self.config: ModelConfig = backbone.config
        self.backbone = backbone  # BertEncoder (bert) or GPT (gpt)
        if self.config.family == "bert":
            # The [CLS] pooler goes unused: frozen, it needs no gradient (DDP would wait for one).
            backbone.pooler.requires_grad_(False)
        self.dropout = nn.Dropout(dropout)
        self._width = width

    def _linear(self) -> nn.Linear:
        layer = nn.Linear(self.config.d_model, self._width)
        nn.init.normal_(layer.weight, mean=0.0, std=0.02)  # as the model's own linear layers (GPT-2 / BERT)
        nn.init.zeros_(layer.bias)
        return layer

    def _per_token(self, layer: nn.Linear, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None,
                   attention_mask: torch.Tensor | None) -> torch.Tensor:
        return layer(self.dropout(backbone_hidden(self.backbone, input_ids, token_type_ids, attention_mask)))


class TokenClassifier(_PerTokenModel):
    """Class logits for every token: (batch, length, num_labels)."""

    def __init__(self, backbone: nn.Module, num_labels: int, dropout: float):
        super().__init__(backbone, num_labels, dropout)
        self.classifier = self._linear()

    @property
    def num_outputs(self) -> int:
        return self.classifier.out_features

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._per_token(self.classifier, input_ids, token_type_ids, attention_mask)


class SpanExtractor(_PerTokenModel):
    """Start and end logits for every token: two (batch, length) tensors."""

    def __init__(self, backbone: nn.Module, dropout: float):
        super().__init__(backbone, 2, dropout)
        self.qa_outputs = self._linear()

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self._per_token(self.qa_outputs, input_ids, token_type_ids, attention_mask)
        start, end = logits.unbind(-1)
        return start, end


def token_classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the tokens whose label is not IGNORE_INDEX."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)


def span_loss(start_logits: torch.Tensor, end_logits: torch.Tensor, start_positions: torch.Tensor,
              end_positions: torch.Tensor) -> torch.Tensor:
    """BERT's QA loss: the mean of the start and end positions' cross-entropies over the sequence."""
    return (F.cross_entropy(start_logits.float(), start_positions)
            + F.cross_entropy(end_logits.float(), end_positions)) / 2


def build_per_token_model(config: ModelConfig, kind: str, num_labels: int, dropout: float) -> nn.Module:
    """A freshly initialised tagger (kind "tokens") or span extractor (kind "span") over a new backbone."""
    pretraining_model = build_model(config)
    backbone = pretraining_model.bert if config.family == "bert" else pretraining_model
    if kind == "tokens":
        return TokenClassifier(backbone, num_labels, dropout)
    if kind == "span":
        return SpanExtractor(backbone, dropout)
    raise ValueError(f"no per-token model for task kind {kind!r} (tokens or span)")
