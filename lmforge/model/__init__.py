"""Transformer models. They know nothing of training, devices or checkpoints."""

from lmforge.model.config import ModelConfig
from lmforge.model.transformer import GPT, build_model

__all__ = ["GPT", "ModelConfig", "build_model"]
