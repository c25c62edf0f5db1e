"""What each speed lever does to lmforge's GPT training step on this machine, measured side by side.

Every variant trains its own copy of the same weights on the same batches with the same step (forward,
backward, clip at 1.0, fused AdamW), timed in alternating rounds in one process; compilation happens
in an untimed first step whose seconds are reported. Tokens/s relative to plain eager lmforge.

    python bench/step_levers.py                           # baby GPT and 6L/6H/384/ctx256, all levers
    python bench/step_levers.py --shapes small --levers eager sdpa-math compile-model
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import alternate_rounds, make_step  # noqa: E402
from train_throughput import SHAPES, VOCAB, build_models, loss_fn  # noqa: E402


def _sdpa_math() -> contextlib.AbstractContextManager:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


@contextlib.contextmanager
def _flush_denormals():
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


@contextlib.contextmanager
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _TanhGelu(torch.autograd.Function):
    """GPT-2's tanh GELU keeping tanh(z) for the backward pass, which then needs no transcendental."""

    @staticmethod
    def forward(ctx, x):
        t = torch.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))
        ctx.save_for_backward(x, t)
        return 0.5 * x * (1.0 + t)

    @staticmethod
    def backward(ctx, grad):
        x, t = ctx.saved_tensors
        dz = 0.7978845608028654 * (1.0 + 0.134145 * x * x)
        return grad * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * dz)


def _saved_tanh_gelu(model: torch.nn.Module) -> torch.nn.Module:
    from lmforge.model.layers import MLP

    for mlp in (m for m in model.modules() if isinstance(m, MLP)):
        mlp.forward = lambda x, mlp=mlp: mlp.proj(_TanhGelu.apply(mlp.fc(x)))
    return model


def _compile_blocks(model: torch.nn.Module) -> torch.nn.Module:
    from lmforge.train.distributed import compile_with_fallback, transformer_blocks

    compile_with_fallback(transformer_blocks(model), strict=True)
    return model


# lever -> (how the model is prepared, the context every step runs in, what the optimizer step is)
LEVERS: dict[str, tuple[Callable, Callable, bool]] = {
    "eager": (lambda m: m, contextlib.nullcontext, False),
    "sdpa-math": (lambda m: m, _sdpa_math, False),
    "flush-denormal": (lambda m: m, _flush_denormals, False),
    "one-thread": (lambda m: m, _one_thread, False),
    "gelu-saved-tanh": (_saved_tanh_gelu, contextlib.nullcontext, False),
    "compile-blocks": (_compile_blocks, contextlib.nullcontext, False),
    "compile-model": (torch.compile, contextlib.nullcontext, False),
    "compile-model-cpp-wrapper": (lambda m: torch.compile(m, options={"cpp_wrapper": True}), contextlib.nullcontext,
                                  False),
    "compile-model-max-autotune": (lambda m: torch.compile(m, mode="max-autotune-no-cudagraphs"),
                                   contextlib.nullcontext, False),
    "compile-model+optimizer": (torch.compile, contextlib.nullcontext, True),
}
DEFAULT_LEVERS = ["eager", "sdpa-math", "flush-denormal", "one-thread", "gelu-saved-tanh", "compile-blocks",
                  "compile-model", "compile-model-cpp-wrapper", "compile-model+optimizer"]


def measure(shape_name: str, levers: list[str], rounds: int, steps: int, max_seconds: float) -> None:
    shape = SHAPES[shape_name]
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, VOCAB, (steps, shape["batch"], shape["block_size"] + 1), generator=gen)
    inputs = [(data[i, :, :-1].contiguous(), data[i, :, 1:].contiguous()) for i in range(steps)]
    steppers, compile_seconds = {}, {}
    for lever in levers:
        prepare, context, compile_optimizer = LEVERS[lever]
        model = prepare(build_models(shape, ["lmforge"])["lmforge"])
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.99), weight_decay=0.1, fused=True)
        if compile_optimizer:
            optimizer.step = torch.compile(optimizer.step)
        step = make_step(model, optimizer, loss_fn("lmforge"), "fp32")

        def run(i: int, step=step, context=context) -> float:
            with context():
                return step(inputs[i])

        start = time.perf_counter()
        run(0)
        compile_seconds[lever] = time.perf_counter() - start
        steppers[lever] = run
    seconds = alternate_rounds(steppers, rounds, steps, max_seconds, warm_up=False)
    tokens = shape["batch"] * shape["block_size"]
    base = seconds.get("eager", next(iter(seconds.values())))
    for lever, s in seconds.items():
        first = f"{compile_seconds[lever] - s:>10.1f}" if lever.startswith("compile") else f"{'':>10}"
        print(f"{shape_name:<7}{lever:<30}{tokens / s:>10,.0f}{base / s:>9.2f}x{first}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["baby", "small"], choices=list(SHAPES))
    parser.add_argument("--levers", nargs="+", default=DEFAULT_LEVERS, choices=list(LEVERS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--max-seconds", type=float, default=20.0)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.rounds} alternating rounds of "
          f"{args.steps} steps, median step")
    print(f"{'shape':<7}{'lever':<30}{'tokens/s':>10}{'vs eager':>10}{'compile s':>10}")
    for shape in args.shapes:
        measure(shape, args.levers, args.rounds, args.steps, args.max_seconds)


if __name__ == "__main__":
    main()
