"""Training-step throughput: lmforge's GPT vs transformers' GPT2LMHeadModel of identical dimensions.

Same batches, same optimizer (AdamW, same settings), same precision, in one process; the two are
measured in alternating rounds so that machine noise hits both alike. MFU is against this machine's
matmul throughput for that precision, measured in the same run.

    python bench/train_throughput.py                      # baby GPT and 6L/6H/384/ctx256, fp32 and bf16
    python bench/train_throughput.py --shapes baby --steps 20

Last line: `ratio X.XX` = our best tokens/s / peer's best tokens/s (best precision of each), over the
first shape listed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import alternate_rounds, make_step  # noqa: E402

from lmforge.model import GPT, ModelConfig
from lmforge.train.device import measured_matmul_flops

SHAPES = {
    "baby": dict(n_layer=4, n_head=4, d_model=128, block_size=64, batch=12),
    "small": dict(n_layer=6, n_head=6, d_model=384, block_size=256, batch=8),
}
VOCAB = 65  # Tiny Shakespeare's character vocabulary


def build_pair(shape: dict) -> tuple[torch.nn.Module, torch.nn.Module]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    ours = GPT(ModelConfig(vocab_size=VOCAB, n_layer=shape["n_layer"], n_head=shape["n_head"],
                           d_model=shape["d_model"], block_size=shape["block_size"]))
    peer_config = GPT2Config(vocab_size=VOCAB, n_positions=shape["block_size"], n_embd=shape["d_model"],
                             n_layer=shape["n_layer"], n_head=shape["n_head"], resid_pdrop=0.0, embd_pdrop=0.0,
                             attn_pdrop=0.0, activation_function="gelu_new", bos_token_id=None,
                             eos_token_id=None)
    peer = GPT2LMHeadModel(peer_config, attn_implementation="sdpa") if _accepts_attn_impl() else GPT2LMHeadModel(peer_config)
    return ours, peer


def _accepts_attn_impl() -> bool:
    import inspect

    from transformers import GPT2LMHeadModel

    return "attn_implementation" in inspect.signature(GPT2LMHeadModel.__init__).parameters


def step_fn(model: torch.nn.Module, is_ours: bool, precision: str):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.99), weight_decay=0.1, fused=True)
    # ours takes next-token labels; transformers shifts its labels itself
    return make_step(model, optimizer, lambda m, xy: m(input_ids=xy[0], labels=xy[1] if is_ours else xy[0]).loss,
                     precision)


def measure(shape_name: str, precision: str, rounds: int, steps: int, max_seconds: float) -> dict:
    shape = SHAPES[shape_name]
    ours, peer = build_pair(shape)
    batch, block = shape["batch"], shape["block_size"]
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, VOCAB, (steps, batch, block + 1), generator=gen)
    train = {"ours": step_fn(ours, True, precision), "peer": step_fn(peer, False, precision)}
    steppers = {name: (lambda i, f=f: f((data[i, :, :-1], data[i, :, 1:]))) for name, f in train.items()}
    seconds = alternate_rounds(steppers, rounds, steps, max_seconds)
    peak = measured_matmul_flops(torch.device("cpu"), precision)
    flops_per_token = ours.flops_per_token(block)
    result = {}
    for name in seconds:
        tokens_per_s = batch * block / seconds[name]
        result[name] = {"tokens_per_s": tokens_per_s, "mfu": tokens_per_s * flops_per_token / peak}
    result["peak_tflops"] = peak / 1e12
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["baby", "small"], choices=list(SHAPES))
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model per round")
    parser.add_argument("--max-seconds", type=float, default=20.0, help="cut a round short after this long")
    args = parser.parse_args()

    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads")
    print(f"{'shape':<7}{'prec':<6}{'peak TFLOP/s':>13}{'ours tok/s':>12}{'ours MFU':>10}"
          f"{'peer tok/s':>12}{'peer MFU':>10}{'ours/peer':>11}")
    best: dict[str, dict[str, float]] = {}
    for shape in args.shapes:
        for precision in args.precisions:
            r = measure(shape, precision, args.rounds, args.steps, args.max_seconds)
            o, p = r["ours"], r["peer"]
            print(f"{shape:<7}{precision:<6}{r['peak_tflops']:>13.3f}{o['tokens_per_s']:>12,.0f}{o['mfu']:>10.1%}"
                  f"{p['tokens_per_s']:>12,.0f}{p['mfu']:>10.1%}{o['tokens_per_s'] / p['tokens_per_s']:>11.2f}",
                  flush=True)
            entry = best.setdefault(shape, {"ours": 0.0, "peer": 0.0})
            entry["ours"] = max(entry["ours"], o["tokens_per_s"])
            entry["peer"] = max(entry["peer"], p["tokens_per_s"])
    for shape, entry in best.items():
        print(f"{shape}: best-precision ratio {entry['ours'] / entry['peer']:.2f}")
    first = best[args.shapes[0]]
    print(f"ratio {first['ours'] / first['peer']:.2f}")


if __name__ == "__main__":
    main()
