"""AdamW (or Adafactor, or Muon with AdamW) with weight decay on matrices only, and the learning-rate
schedule as a pure function of step."""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from lmforge.config import TrainConfig
from lmforge.train.muon import Muon


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay 2-D weights (matmuls, embeddings); never biases or norm gains, which only shift or scale."""
    return param_groups_of([p for p in model.parameters() if p.requires_grad], weight_decay)


def param_groups_of(params: list[nn.Parameter], weight_decay: float) -> list[dict]:
    unique = list({id(p): p for p in params}.values())  # a tied weight once
    return [{"params": [p for p in unique if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in unique if p.dim() < 2], "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    betas = (config.beta1, config.beta2)
    if config.optimizer == "muon":
        hidden = hidden_matrices(model)
        taken = {id(h) for h in hidden}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
        return MuonAdamW(hidden, param_groups_of(rest, config.weight_decay), config.lr, config.weight_decay,
                         betas, config.eps, device)
    return optimizer_for(param_groups(model, config.weight_decay), config.optimizer, config.lr, betas,
                         config.eps, device)


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The weights Muon orthogonalises: every Linear inside the network; not the token embeddings, a
    projection onto the vocabulary or a classifier's output layer (heads' `out`), which Muon's authors
    keep on AdamW with all vectors."""
    vocab = model.config.vocab_size
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.weight.requires_grad and module.out_features != vocab \
                and id(module.weight) not in embeddings and name.rsplit(".", 1)[-1] != "out":
            found[id(module.weight)] = module.weight
    return list(found.values())


class MuonAdamW(torch.optim.Optimizer):
    """Muon on the hidden matrices and torch's AdamW on the rest, as one optimizer.

    Muon steps each matrix by its momentum orthogonalised by Newton-Schulz iterations, scaled to AdamW's
    update RMS (`match_rms_adamw`, Moonlight's rule), so one learning rate and schedule drive both halves.
    The two share this object's param_groups and state, so checkpoints (whole or through
    torch.distributed.checkpoint) save and restore it like any single optimizer.
    """

    def __init__(self, hidden: list[nn.Parameter], rest: list[dict], lr: float, weight_decay: float,
                 betas: tuple[float, float], eps: float, device: torch.device):
        # Newton-Schulz in bf16 where matmuls have it natively (GPUs), in fp32 on CPUs
        ns_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.muon = Muon([{"params": hidden, "weight_decay": weight_decay}], lr=lr, weight_decay=weight_decay,
                         ns_dtype=ns_dtype)
        self.adamw = optimizer_for(rest, "adamw", lr, betas, eps, device)
        super().__init__([*self.muon.param_groups, *self.adamw.param_groups], {})
        self._share()

    def _share(self) -> None:
        # Optimizer.__init__ and load_state_dict build new group dicts and a new state: point both halves at them
        count = len(self.muon.param_groups)
        self.muon.param_groups, self.adamw.param_groups = self.param_groups[:count], self.param_groups[count:]
        self.muon.state = self.adamw.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._share()

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        self.muon.step()
        self.adamw.step()
        return loss


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
