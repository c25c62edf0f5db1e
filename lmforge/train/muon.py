"""Muon (momentum orthogonalised by Newton-Schulz) with the orthogonalisation in a dtype chosen per device.

torch.optim.Muon runs its Newton-Schulz iterations in bfloat16, which is right on GPUs and ~100x slower
than fp32 on CPUs without native bf16 matmuls (every CPU this project is measured on): there it doubled
the step time of a 4x128 decoder. This is the same update with `ns_dtype` as a parameter; with bfloat16
it matches torch's step for step (tests/test_muon.py).
"""

from __future__ import annotations

import torch

# Quintic Newton-Schulz coefficients from Muon's authors, as torch.optim.Muon uses them
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalise(grad: torch.Tensor, steps: int, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """Approximately U V^T for grad = U S V^T: every singular value pushed towards 1 (within ~0.7-1.2)."""
    a, b, c = NS_COEFFICIENTS
    x = grad.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.T
    x = x / x.norm().clamp_min(eps)  # spectral norm <= Frobenius norm <= 1: inside the iteration's basin
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.T if tall else x).to(grad.dtype)


class Muon(torch.optim.Optimizer):
    """SGD with Nesterov momentum whose update is orthogonalised, for 2-D weights only.

    Each matrix's step is scaled by 0.2 * sqrt(max(rows, cols)), which gives it the update RMS of AdamW
    (Moonlight's rule), so AdamW's learning rate and weight decay carry over.
    """

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, eps: float = 1e-7,
                 ns_dtype: torch.dtype = torch.bfloat16):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_steps=ns_steps, eps=eps)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon takes 2-D weights only, got a parameter of shape {tuple(p.shape)}")
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)  # an average of gradients; the scale is normalised away below
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = orthogonalise(update, group["ns_steps"], group["eps"], self.ns_dtype)
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * 0.2 * max(p.shape) ** 0.5)
        return loss
