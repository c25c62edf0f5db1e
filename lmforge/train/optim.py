"""AdamW (or Adafactor) with weight decay on matrices only, and the learning-rate schedule as a pure function of step."""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from lmforge.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay 2-D weights (matmuls, embeddings); never biases or norm gains, which only shift or scale."""
    decay, no_decay = [], []
    for param in {id(p): p for p in model.parameters() if p.requires_grad}.values():
        (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    return optimizer_for(param_groups(model, config.weight_decay), config.optimizer, config.lr,
                         (config.beta1, config.beta2), config.eps, device)


def optimizer_for(groups: list[dict], kind: str, lr: float, betas: tuple[float, float], eps: float,
                  device: torch.device) -> torch.optim.Optimizer:
    """AdamW over `groups` (fused where the kernel exists), or torch's Adafactor (betas and eps unused).
    Pretraining and fine-tuning both build theirs here."""
    if kind == "adafactor":
        # Adafactor's decay is lr * weight_decay * param, not relative to the parameter's scale as its steps are
        return torch.optim.Adafactor(groups, lr=lr, foreach=True)
    kwargs = {}
    # The fused kernel exists for CUDA (and CPU in recent PyTorch); foreach is the portable fast path.
    if "fused" in inspect.signature(torch.optim.AdamW).parameters and device.type in ("cuda", "cpu"):
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = True
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kwargs)


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup to lr over warmup_steps, then cosine decay to min_lr at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    decay_steps = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.lr - config.min_lr)
