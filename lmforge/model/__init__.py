"""Transformer models. They know nothing of training, devices or checkpoints."""

from torch import nn

from lmforge.model.bert import BertForPreTraining
from lmforge.model.config import ModelConfig
from lmforge.model.gpt import GPT
from lmforge.model.layers import IGNORE_INDEX

__all__ = ["GPT", "IGNORE_INDEX", "ModelConfig", "build_model"]


def build_model(config: ModelConfig) -> nn.Module:
    """The pretraining model of config.family: GPT (causal LM) or BertForPreTraining (MLM + NSP)."""
    if config.family == "gpt":
        return GPT(config)
    if config.family == "bert":
        return BertForPreTraining(config)
    raise ValueError(f"unknown model family {config.family!r}")
