"""Transformer models. They know nothing of training, devices or checkpoints."""

from lmforge.model.config import ModelConfig
from lmforge.model.transformer import GPT, IGNORE_INDEX, build_model

__all__ = ["GPT", "IGNORE_INDEX", "ModelConfig", "build_model"]
