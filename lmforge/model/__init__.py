"""Transformer models. They know nothing of training, devices or checkpoints."""

from torch import nn

from lmforge.model.bert import BertForPreTraining
from lmforge.model.config import ModelConfig
from lmforge.model.gpt import GPT
from lmforge.model.layers import IGNORE_INDEX

__all__ = ["GPT", "IGNORE_INDEX", "ModelConfig", "build_model"]


def build_model(config: ModelConfig) -> nn.Module:
    """The pretraining model of config.family: GPT (causal LM), BertForPreTraining (MLM + NSP) or T5 (denoising)."""
    if config.family == "gpt":
        return GPT(config)
    if config.family == "bert":
        return BertForPreTraining(config)
    if config.family == "t5":
        from lmforge.model.t5 import T5

        return T5(config)
    raise ValueError(f"unknown model family {config.family!r}")
