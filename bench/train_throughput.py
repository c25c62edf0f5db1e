"""Training-step throughput: lmforge's GPT against the peers a user would otherwise train with.

Set-ups, each eager and under torch.compile:
  lmforge       lmforge's GPT (gpt2 layout); compiled as `train.compile: true` compiles it
  plain         a minimal one-module PyTorch GPT written for this benchmark (bench/plain_gpt.py)
  transformers  transformers' GPT2LMHeadModel (SDPA attention)
All start from the same weights (their first losses are checked equal), see the same batches, and take
the same step: forward, backward, gradient clipping at 1.0, fused AdamW with the same settings. They
are timed in alternating rounds in one process so that machine noise hits all alike. Compilation
happens in an untimed first step per set-up; its seconds are reported, not counted in the step.
MFU is against this machine's fp32 (or bf16) square-matmul throughput, measured in the same run.

    python bench/train_throughput.py                      # baby GPT and 6L/6H/384/ctx256, fp32
    python bench/train_throughput.py --shapes baby --setups lmforge plain --no-compile
    python bench/train_throughput.py --precisions fp32 bf16   # bf16 crawls on CPUs without native bf16
    python bench/train_throughput.py --profile small      # where lmforge's step spends its time

Last line: `ratio X.XX` = lmforge's best set-up / the fastest peer set-up, tokens/s, at the shape where
that ratio is lowest.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import alternate_rounds, make_step  # noqa: E402
from plain_gpt import PlainGPT  # noqa: E402

from lmforge.model import GPT, ModelConfig
from lmforge.train.device import measured_matmul_flops

SHAPES = {
    "baby": dict(n_layer=4, n_head=4, d_model=128, block_size=64, batch=12),
    "small": dict(n_layer=6, n_head=6, d_model=384, block_size=256, batch=8),
}
VOCAB = 65  # Tiny Shakespeare's character vocabulary
SETUPS = ("lmforge", "plain", "transformers")


def build_models(shape: dict, setups: list[str]) -> dict[str, torch.nn.Module]:
    """One fresh model per set-up, all holding lmforge's initial weights."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=VOCAB, n_layer=shape["n_layer"], n_head=shape["n_head"], d_model=shape["d_model"],
                         block_size=shape["block_size"])
    ours = GPT(config)
    models = {}
    for name in setups:
        if name == "lmforge":
            model = GPT(config)
            model.load_state_dict(ours.state_dict())
        elif name == "plain":
            model = PlainGPT(VOCAB, shape["n_layer"], shape["n_head"], shape["d_model"], shape["block_size"])
            with torch.no_grad():  # the same layout, parameters registered in the same order
                for (_, mine), (_, theirs) in zip(ours.named_parameters(), model.named_parameters(), strict=True):
                    theirs.copy_(mine)
        else:
            model = _transformers_gpt2(shape)
            from lmforge.interop.hf import state_to_hf

            missing = model.load_state_dict(state_to_hf(ours.state_dict(), config), strict=False).missing_keys
            assert all(k.endswith(("attn.bias", "masked_bias", "lm_head.weight")) for k in missing), missing
            assert model.lm_head.weight is model.transformer.wte.weight  # tied, as ours
        models[name] = model
    return models


def _transformers_gpt2(shape: dict) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_positions=shape["block_size"], n_embd=shape["d_model"],
                        n_layer=shape["n_layer"], n_head=shape["n_head"], resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, activation_function="gelu_new", bos_token_id=None, eos_token_id=None)
    config._attn_implementation = "sdpa"
    return GPT2LMHeadModel(config)


def loss_fn(name: str) -> Callable:
    """The set-up's loss on a batch (inputs, next tokens), the way its API wants it called."""
    if name == "lmforge":
        return lambda m, xy: m(input_ids=xy[0], labels=xy[1]).loss
    if name == "plain":
        return lambda m, xy: m(xy[0], xy[1])
    # shift_labels: the next tokens as given (transformers would otherwise shift its labels itself)
    return lambda m, xy: m(input_ids=xy[0], labels=xy[1], shift_labels=xy[1]).loss


def compiled(name: str, model: torch.nn.Module) -> torch.nn.Module:
    """The set-up's compiled model: lmforge as train.compile does it; the peers whole, as their docs say."""
    if name == "lmforge":
        from lmforge.train.distributed import compile_with_fallback, transformer_blocks

        compile_with_fallback(transformer_blocks(model), strict=True)
        return model
    return torch.compile(model)


def measure(shape_name: str, setups: list[str], compile_too: bool, precision: str, rounds: int, steps: int,
            max_seconds: float) -> dict:
    shape = SHAPES[shape_name]
    batch, block = shape["batch"], shape["block_size"]
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, VOCAB, (steps, batch, block + 1), generator=gen)
    # contiguous inputs and labels, as lmforge's loader gives them
    inputs = [(data[i, :, :-1].contiguous(), data[i, :, 1:].contiguous()) for i in range(steps)]
    variants = [(name, False) for name in setups] + ([(name, True) for name in setups] if compile_too else [])
    steppers, first_losses, compile_seconds = {}, {}, {}
    for name, is_compiled in variants:
        model = build_models(shape, [name])[name]
        if is_compiled:
            model = compiled(name, model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.99), weight_decay=0.1, fused=True)
        step = make_step(model, optimizer, loss_fn(name), precision)
        label = f"{name} {'compiled' if is_compiled else 'eager'}"
        start = time.perf_counter()
        first_losses[label] = step(inputs[0])  # untimed: compiles, warms the allocator and caches
        compile_seconds[label] = time.perf_counter() - start
        steppers[label] = lambda i, f=step: f(inputs[i])
    reference = next(iter(first_losses.values()))
    for label, loss in first_losses.items():  # the same weights and batch: the same loss, or the step differs
        assert abs(loss - reference) < 1e-4 * max(1.0, abs(reference)), (label, loss, reference)
    seconds = alternate_rounds(steppers, rounds, steps, max_seconds, warm_up=False)
    peak = measured_matmul_flops(torch.device("cpu"), precision, fresh=True)
    flops_per_token = GPT(ModelConfig(vocab_size=VOCAB, n_layer=shape["n_layer"], n_head=shape["n_head"],
                                      d_model=shape["d_model"], block_size=block)).flops_per_token(block)
    result = {"peak_tflops": peak / 1e12, "setups": {}}
    for label in seconds:
        tokens_per_s = batch * block / seconds[label]
        first_step = compile_seconds[label] - seconds[label] if "compiled" in label else 0.0
        result["setups"][label] = {"tokens_per_s": tokens_per_s, "mfu": tokens_per_s * flops_per_token / peak,
                                   "compile_s": first_step}
    return result


def profile(shape_name: str, steps: int, rows: int) -> None:
    """torch.profiler's table of lmforge's eager step at this shape (self CPU time per op)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile, record_function

    shape = SHAPES[shape_name]
    model = build_models(shape, ["lmforge"])["lmforge"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.99), weight_decay=0.1, fused=True)
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, VOCAB, (steps + 1, shape["batch"], shape["block_size"] + 1), generator=gen)

    def step(i: int) -> None:
        with record_function("forward"):
            loss = model(input_ids=data[i, :, :-1], labels=data[i, :, 1:]).loss
        with record_function("backward"):
            loss.backward()
        with record_function("clip + AdamW"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    step(steps)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            step(i)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["baby", "small"], choices=list(SHAPES))
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=SETUPS)
    parser.add_argument("--no-compile", action="store_true", help="eager set-ups only")
    parser.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per set-up per round")
    parser.add_argument("--max-seconds", type=float, default=20.0, help="cut a round short after this long")
    parser.add_argument("--profile", choices=list(SHAPES), help="profile lmforge's eager step at this shape instead")
    parser.add_argument("--profile-rows", type=int, default=25)
    args = parser.parse_args()
    if args.profile:
        profile(args.profile, args.steps, args.profile_rows)
        return

    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads; "
          f"{args.rounds} alternating rounds of {args.steps} steps, median step")
    print(f"{'shape':<7}{'prec':<6}{'set-up':<24}{'tokens/s':>10}{'MFU':>8}{'compile s':>11}")
    worst: tuple[float, str] = (float("inf"), "")
    for shape in args.shapes:
        for precision in args.precisions:
            r = measure(shape, args.setups, not args.no_compile, precision, args.rounds, args.steps, args.max_seconds)
            for label, s in r["setups"].items():
                shown = f"{s['compile_s']:>11.1f}" if "compiled" in label else f"{'':>11}"
                print(f"{shape:<7}{precision:<6}{label:<24}{s['tokens_per_s']:>10,.0f}{s['mfu']:>8.1%}{shown}",
                      flush=True)
            ours = {k: v["tokens_per_s"] for k, v in r["setups"].items() if k.startswith("lmforge")}
            peers = {k: v["tokens_per_s"] for k, v in r["setups"].items() if not k.startswith("lmforge")}
            if not ours or not peers:
                continue
            best, fastest = max(ours, key=ours.get), max(peers, key=peers.get)
            ratio = ours[best] / peers[fastest]
            print(f"{shape} {precision}: fp32 peak {r['peak_tflops']:.3f} TFLOP/s (measured)"
                  if precision == "fp32" else f"{shape} {precision}: {precision} peak {r['peak_tflops']:.4f} TFLOP/s",
                  f"| best lmforge ({best}) / fastest peer ({fastest}) = {ratio:.2f}")
            worst = min(worst, (ratio, shape))
    if worst[1]:
        print(f"ratio {worst[0]:.2f}")


if __name__ == "__main__":
    main()
