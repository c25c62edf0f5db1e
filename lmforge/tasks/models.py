"""Task models over a pretrained stack: sequence classification / regression for encoders and decoders.

By default (pooling "auto") BERT is classified on its pooled [CLS] vector (the pooler pretrained by
next-sentence prediction) and a GPT on its final hidden state at the last real token, the only
position that has read the whole input. Pooling "mean" averages the final hidden states of the real
tokens instead: for a small causal model the last position is a poor summary of a sentence pair
(each earlier position has read a prefix, and together they cover it). Pooling "siamese" (pair tasks,
Reimers & Gurevych's Sentence-BERT) encodes the two sentences apart, mean-pools each to u and v, and
classifies [u, v, |u - v|, u * v]: the head compares two sentence vectors instead of hoping attention
across the pair learns to compare them from a few thousand labels. Generation fine-tunes the GPT
itself, so it needs no wrapper.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from lmforge.model import ModelConfig, build_model
from lmforge.model.heads import ClassificationHead
from lmforge.model.layers import init_weights

POOLINGS = ("auto", "cls", "last", "mean", "siamese")


def resolve_pooling(pooling: str, family: str) -> str:
    """'auto' -> the family's natural summary vector ('cls' for bert, 'last' for gpt); checks the pair."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    if pooling == "auto":
        return "cls" if family == "bert" else "last"
    if pooling == "cls" and family != "bert":
        raise ValueError("pooling 'cls' needs a BERT (a GPT has no [CLS] token); use 'last' or 'mean'")
    if pooling == "last" and family == "bert":
        raise ValueError("pooling 'last' is for GPTs (a BERT's last real token is [SEP]); use 'cls' or 'mean'")
    return pooling


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The mean of (batch, length, d) hidden states over the real tokens (attention_mask 1): (batch, d)."""
    if attention_mask is None:
        return hidden.mean(1)
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def split_pair(input_ids: torch.Tensor, token_type_ids: torch.Tensor, attention_mask: torch.Tensor,
               shared: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A right-padded batch of pairs (token type 0 then 1) -> its two sides as one batch of 2 x batch rows,
    each side moved to the start of its row (original order kept): (ids, attention_mask), first sides on top.
    The first `shared` positions (BERT's [CLS]) lead both sides, so each reads as a single sentence does.

    Padding ids are whatever the row held there; the mask marks them (a causal model never reads them).
    """
    real = attention_mask.bool()
    leading = torch.arange(input_ids.shape[1], device=input_ids.device) < shared
    sides = torch.cat([real & (token_type_ids == 0), real & ((token_type_ids != 0) | leading)])
    ids = input_ids.repeat(2, 1)
    # A stable sort on "not in this side" brings the side's tokens to the front, in order.
    order = torch.sort((~sides).to(torch.int8), dim=1, stable=True).indices
    lengths = sides.sum(1)
    width = max(1, int(lengths.max()))
    mask = (torch.arange(width, device=ids.device) < lengths.unsqueeze(1)).to(attention_mask.dtype)
    return ids.gather(1, order[:, :width]), mask


class SequenceClassifier(nn.Module):
    """A Transformer stack + ClassificationHead: class logits, or one score for regression."""

    def __init__(self, backbone: nn.Module, num_outputs: int, dropout: float, pooling: str = "auto"):
        super().__init__()
        self.config: ModelConfig = backbone.config
        self.pooling = resolve_pooling(pooling, self.config.family)
        self.backbone = backbone  # BertEncoder (bert) or GPT (gpt)
        if self.config.family == "bert" and self.pooling != "cls":
            # The [CLS] pooler goes unused: frozen, it needs no gradient (DDP would wait for one)
            # and no optimizer state.
            backbone.pooler.requires_grad_(False)
        # siamese: the head reads [u, v, |u - v|, u * v]
        features = 4 * self.config.d_model if self.pooling == "siamese" else self.config.d_model
        self.head = ClassificationHead(features, num_outputs, dropout)
        self.head.apply(lambda m: init_weights(m, self.config))

    @property
    def num_outputs(self) -> int:
        return self.head.out.out_features

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, length) inputs, right-padded; attention_mask 1 for real tokens. Returns (batch, num_outputs)."""
        if self.pooling == "siamese":
            return self.head(self.siamese_features(input_ids, token_type_ids, attention_mask))
        if self.config.family == "bert":
            hidden, pooled = self.backbone(input_ids, token_type_ids, attention_mask)
            features = pooled if self.pooling == "cls" else mean_pool(hidden, attention_mask)
        else:
            # Right padding and causal attention: real positions never see the pads, so no mask is needed.
            hidden = self.backbone.hidden_states(input_ids)
            if self.pooling == "mean":
                features = mean_pool(hidden, attention_mask)
            else:
                last = (attention_mask.sum(1) - 1 if attention_mask is not None
                        else torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device))
                features = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.head(features)

    def siamese_features(self, input_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor],
                         attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """[u, v, |u - v|, u * v] of a pair batch: u, v the mean final hidden states of each side encoded alone."""
        if token_type_ids is None or attention_mask is None:
            raise ValueError("pooling 'siamese' reads sentence pairs: it needs token_type_ids and attention_mask")
        bert = self.config.family == "bert"
        ids, mask = split_pair(input_ids, token_type_ids, attention_mask, shared=1 if bert else 0)
        if bert:  # `[CLS] a [SEP]` and `[CLS] b [SEP]`, each with token type 0 as a single sentence has
            hidden, _ = self.backbone(ids, torch.zeros_like(ids), mask)
        else:  # right padding and causal attention: real positions never see the pads
            hidden = self.backbone.hidden_states(ids)
        u, v = mean_pool(hidden, mask).chunk(2)
        return torch.cat([u, v, (u - v).abs(), u * v], dim=-1)


def build_task_model(config: ModelConfig, kind: str, num_outputs: int, dropout: float,
                     pooling: str = "auto") -> nn.Module:
    """A freshly initialised task model: SequenceClassifier, a per-token model (tokens, span), or the pretraining
    model itself for generation and seq2seq."""
    if kind in ("tokens", "span"):
        from lmforge.tasks.heads import build_per_token_model  # heads.py imports this module's neighbours

        return build_per_token_model(config, kind, num_outputs, dropout)
    pretraining_model = build_model(config)
    if kind in ("generation", "seq2seq") or config.family == "t5":  # the model itself writes the target (text)
        return pretraining_model
    backbone = pretraining_model.bert if config.family == "bert" else pretraining_model
    return SequenceClassifier(backbone, num_outputs, dropout, pooling)


def backbone_of(model: nn.Module) -> nn.Module:
    """The pretrained stack inside a task model (the model itself for generation and seq2seq)."""
    return getattr(model, "backbone", model)
