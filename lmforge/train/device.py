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


def measured_matmul_flops(device: torch.device, precision: str, seconds: float = 0.3, fresh: bool = False) -> float:
    """FLOP/s of square matmuls in `precision` on `device`, measured here: the MFU denominator.

    The best of a few sizes, since small matrices under-use a CPU and large ones spill its caches.
    Cached per device and precision; `fresh` measures again and keeps the better of old and new (a
    measurement taken while other work shared the device reads low).
    """
    key = (str(device), precision)
    if key in _PEAK_CACHE and not fresh:
        return _PEAK_CACHE[key]
    sizes = (4096, 8192) if device.type == "cuda" else (1024, 2048)
    dtype = DTYPES[precision]
    best = 0.0
    for size in sizes:
        # a private generator: measuring must not move the global RNG that dropout and resumption rely on
        generator = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(size, size, device=device, generator=generator).to(dtype)
        b = torch.randn(size, size, device=device, generator=generator).to(dtype)
        a @ b
        synchronize(device)
        runs, start = 0, time.perf_counter()
        while runs < 2 or (time.perf_counter() - start < seconds and runs < 50):
            a @ b
            runs += 1
        synchronize(device)
        best = max(best, 2 * size**3 * runs / (time.perf_counter() - start))
        if precision != "fp32" and best < 5e9:
            break  # no native support for this dtype here: one size tells enough, and larger ones crawl
    best = max(best, _PEAK_CACHE.get(key, 0.0))
    _PEAK_CACHE[key] = best
    return best
