"""Device and precision are configuration: resolve them, and measure the matmul peak for MFU."""

from __future__ import annotations

import contextlib
import time

import torch

from lmforge.errors import LmforgeError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LmforgeError(f"train.device={name} but this machine has no CUDA device; use train.device=cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise LmforgeError("train.device=mps but MPS is not available here; use train.device=cpu")
    return torch.device(name)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision: parameters stay fp32, matmuls run in the low-precision dtype."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_PEAK_CACHE: dict[tuple[str, str], float] = {}


def measured_matmul_flops(device: torch.device, precision: str, size: int = 1024, seconds: float = 0.5) -> float:
    """FLOP/s of square matmuls in `precision` on `device`, measured here: the MFU denominator."""
    key = (str(device), precision)
    if key in _PEAK_CACHE:
        return _PEAK_CACHE[key]
    if device.type == "cuda":
        size = 8192
    dtype = DTYPES[precision]
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    for _ in range(2):
        a @ b
    synchronize(device)
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or runs < 3:
        a @ b
        runs += 1
        synchronize(device)
    flops = 2 * size**3 * runs / (time.perf_counter() - start)
    _PEAK_CACHE[key] = flops
    return flops
