"""Training throughput on one GPU: a 124M GPT-2 and a BERT-base, as lmforge trains them.

Each model is lmforge's own (lmforge.model.build_model from a ModelConfig), wrapped, compiled and
optimized by lmforge's own pieces: train.distributed.parallelize (each Transformer block compiled,
strictly: a failing compile stops the benchmark instead of measuring eager), train.optim.build_optimizer
(AdamW with decay on matrices only, fused on CUDA), train.device.autocast (bf16), the gradient clip of
the training loop. On CUDA, TF32 is on for fp32 matmuls and the timed steps run with SDPA restricted to
the flash-attention kernel (an error if the model's attention could not use it).

Batches are synthetic: uniformly random token ids (throughput does not depend on the values). The
GPT trains next-token prediction on full 1024-token blocks; BERT trains MLM + NSP at sequence length
128 (BERT's phase-1 length) on full-length [CLS] A [SEP] B [SEP] pairs (no padding), masked by
lmforge's own MLM masking (15% of tokens, 80/10/10), with lmforge's sparse head that projects only the
masked positions onto the vocabulary. Batches are moved to the device before timing: the numbers are
the training step's, not the loader's.

    python bench/gpu_throughput.py                              # both models on the GPU
    python bench/gpu_throughput.py --batch 32 --steps 50 --json gpu.json
    python bench/gpu_throughput.py --tiny --device cpu --steps 2 --warmup 1   # seconds, on a CPU

MFU = tokens/s x the model's flops_per_token / peak, against (a) the GPU's published dense bf16 peak
(without sparsity; PUBLISHED_BF16 below) and (b) the bf16 matmul throughput measured on this device in
the same run. The last lines read `gpt2-124M mfu X.X% ...`, one per model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lmforge.config import ParallelConfig, TrainConfig  # noqa: E402
from lmforge.data.objectives.mlm import BertVocab, MaskingSpec, PairLayout, mask_batch, mask_draws  # noqa: E402
from lmforge.errors import LmforgeError  # noqa: E402
from lmforge.model import ModelConfig, build_model  # noqa: E402
from lmforge.train.device import autocast, measured_matmul_flops, resolve_device, synchronize  # noqa: E402
from lmforge.train.distributed import clip_grad_norm, parallelize  # noqa: E402
from lmforge.train.optim import build_optimizer  # noqa: E402

# Published dense (without structured sparsity) bf16 tensor-core peaks, TFLOP/s, by a substring of
# torch.cuda.get_device_name(); the first match wins (so "H100 PCIe" before "H100", "L40S" before "L4").
PUBLISHED_BF16 = [
    ("H100 PCIe", 756.0, "H100 PCIe"),
    ("H100 NVL", 835.0, "H100 NVL"),
    ("H100", 989.0, "H100 SXM"),
    ("H200 NVL", 835.0, "H200 NVL"),
    ("H200", 989.0, "H200 SXM"),
    ("A100", 312.0, "A100"),
    ("L40S", 362.0, "L40S"),
    ("L4", 121.0, "L4"),
    ("A10", 125.0, "A10"),
]

BERT_VOCAB = 30528  # BERT's 30,522 word pieces rounded up to a multiple of 64, as GPT-2's 50,257 -> 50,304


@dataclass(frozen=True)
class Shape:
    name: str
    config: ModelConfig
    batch: int  # sequences per step by default

    @property
    def label(self) -> str:
        c = self.config
        length = "ctx" if c.family == "gpt" else "seq"
        return f"{c.n_layer}L/{c.n_head}H/{c.d_model} {length}{c.block_size}"


def shapes(tiny: bool) -> list[Shape]:
    """The two models: full size for a GPU, or 2 layers, 64 wide, length 32 for a CPU test."""
    if tiny:
        small = dict(n_layer=2, n_head=2, d_model=64, block_size=32, vocab_size=512)
        return [Shape("gpt-tiny", ModelConfig(family="gpt", **small), 4),
                Shape("bert-tiny", ModelConfig(family="bert", **small, layer_norm_eps=1e-12), 4)]
    return [Shape("gpt2-124M", ModelConfig(family="gpt", n_layer=12, n_head=12, d_model=768, block_size=1024,
                                           vocab_size=50304), 16),
            Shape("bert-base", ModelConfig(family="bert", n_layer=12, n_head=12, d_model=768, block_size=128,
                                           vocab_size=BERT_VOCAB, layer_norm_eps=1e-12), 128)]


def published_peak(device: torch.device) -> tuple[Optional[float], str]:
    """(dense bf16 FLOP/s, which GPU it is for), or (None, why) when the device is not in the table."""
    if device.type != "cuda":
        return None, f"none for {device.type}"
    name = torch.cuda.get_device_name(device)
    for key, tflops, label in PUBLISHED_BF16:
        if key in name:
            return tflops * 1e12, f"{label}, dense (without sparsity)"
    return None, f"{name} is not in the table"


def gpt_batches(config: ModelConfig, batch: int, count: int, rng: np.random.Generator) -> list[dict]:
    """Random next-token blocks: input ids and the following ids as labels."""
    ids = rng.integers(0, config.vocab_size, (count, batch, config.block_size + 1))
    return [{"input_ids": torch.from_numpy(x[:, :-1]), "labels": torch.from_numpy(x[:, 1:])} for x in ids]


def bert_batches(config: ModelConfig, batch: int, count: int, rng: np.random.Generator) -> list[dict]:
    """Full-length random sentence pairs masked by lmforge's MLM masking, with random NSP labels."""
    seq = config.block_size
    vocab = BertVocab(cls=2, sep=3, pad=0, mask=4, vocab_size=config.vocab_size, special=np.arange(5),
                      continues_word=None)
    pool = vocab.random_pool
    out = []
    for _ in range(count):
        len_a = rng.integers(1, seq - 3, batch)
        layout = PairLayout.of(len_a, seq - 3 - len_a, seq, vocab)
        ids = layout.fill(rng.integers(5, vocab.vocab_size, int(layout.in_a.sum())),
                          rng.integers(5, vocab.vocab_size, int(layout.in_b.sum())))
        draws = np.stack([mask_draws(rng, seq) for _ in range(batch)])
        masked, labels = mask_batch(ids, layout.token_type_ids, vocab, MaskingSpec(), draws, pool)
        out.append({"input_ids": torch.from_numpy(masked), "token_type_ids": torch.from_numpy(layout.token_type_ids),
                    "attention_mask": torch.from_numpy(layout.attention_mask),
                    "mlm_labels": torch.from_numpy(labels), "nsp_labels": torch.from_numpy(rng.integers(0, 2, batch))})
    return out


def flash_probe(model: torch.nn.Module, batch: dict, device: torch.device, precision: str) -> Optional[str]:
    """None when a forward and backward of the eager model on one sequence run with SDPA limited to the
    flash kernel (so the model's attention can use it), else the reason it cannot."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    one = {k: v[:1] for k, v in batch.items()}
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION), autocast(device, precision):
            model(**one).loss.backward()
    except RuntimeError as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    finally:
        model.zero_grad(set_to_none=True)
    return None


def make_step(train_model: torch.nn.Module, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
              device: torch.device, precision: str) -> Callable[[dict], torch.Tensor]:
    """One training step as lmforge's loop takes it: autocast forward, backward, clip to 1.0, AdamW."""
    params = list(model.parameters())

    def step(batch: dict) -> torch.Tensor:
        with autocast(device, precision):
            loss = train_model(batch)
        loss.backward()
        clip_grad_norm(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def measure(shape: Shape, batch: int, args: argparse.Namespace, device: torch.device, precision: str,
            compile_blocks: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    model = build_model(shape.config).to(device)
    make = gpt_batches if shape.config.family == "gpt" else bert_batches
    distinct = min(args.warmup + args.steps, 4)
    batches = [{k: v.to(device) for k, v in b.items()}
               for b in make(shape.config, batch, distinct, np.random.default_rng(0))]
    flash_error = flash_probe(model, batches[0], device, precision)
    train_model = parallelize(model, lambda m, b: m(**b).loss, ParallelConfig(), None, device, precision,
                              compile_blocks=compile_blocks, compile_strict=True)
    optimizer = build_optimizer(model, TrainConfig(), device)
    step = make_step(train_model, model, optimizer, device, precision)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    attention = contextlib.nullcontext()
    if flash_error is None:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        attention = sdpa_kernel(SDPBackend.FLASH_ATTENTION)
    with attention:
        start = time.perf_counter()
        for i in range(args.warmup):  # compilation, autotuning, allocator and optimizer-state warm-up
            step(batches[i % distinct])
        synchronize(device)
        warmup_s = time.perf_counter() - start
        losses = []
        start = time.perf_counter()
        for i in range(args.steps):
            losses.append(step(batches[(args.warmup + i) % distinct]))
        synchronize(device)
        seconds = time.perf_counter() - start
    last_loss = float(losses[-1])
    if not np.isfinite(last_loss):
        raise LmforgeError(f"{shape.name}: the loss is not finite ({last_loss}); the measurement is void")
    extra = {}
    if shape.config.family == "bert":  # the masked share the sparse head projects, as counted in the batches
        masked = sum(int((b["mlm_labels"] != -100).sum()) for b in batches)
        extra["mask_rate"] = masked / sum(b["mlm_labels"].numel() for b in batches)
    tokens_per_step = batch * shape.config.block_size
    tokens_per_s = tokens_per_step * args.steps / seconds
    result = {
        "model": shape.name, "shape": shape.label, "family": shape.config.family, "batch": batch,
        "seq_len": shape.config.block_size, "vocab_size": shape.config.vocab_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "flops_per_token": model.flops_per_token(shape.config.block_size, **extra), **extra,
        "tokens_per_s": tokens_per_s, "step_ms": 1000 * seconds / args.steps, "warmup_s": warmup_s,
        "steps": args.steps, "warmup": args.warmup, "last_loss": last_loss,
        "attention": "flash" if flash_error is None else f"sdpa default (flash unavailable: {flash_error})",
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }
    del train_model, optimizer, model, batches
    if compile_blocks:
        import torch._dynamo as dynamo

        dynamo.reset()  # the next model's blocks share the class: start them with fresh (static) shapes
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (cuda when there is one) | cuda | cuda:N | cpu")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    parser.add_argument("--batch", type=int, default=0, help="sequences per step for both models "
                        "(default: 16 for the GPT at ctx 1024, 128 for BERT at seq 128; 4 with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="2 layers, 64 wide, length 32: runs on a CPU in "
                        "seconds (fp32, not compiled unless --compile)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile each Transformer block as train.compile does (default: on, off with --tiny)")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default=None,
                        help="default: bf16 autocast, fp32 with --tiny")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the results here")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch < 0:
        parser.error("--steps must be >= 1, --warmup and --batch >= 0")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
    except LmforgeError as exc:
        print(f"gpu_throughput: {exc}", file=sys.stderr)
        return 2
    if device.type != "cuda" and not args.tiny:
        print(f"gpu_throughput: the full shapes (124M GPT-2, BERT-base) are for a GPU, and this run is on "
              f"{device.type}; add --tiny for the small shapes", file=sys.stderr)
        return 2
    precision = args.precision or ("fp32" if args.tiny else "bf16")
    compile_blocks = args.compile if args.compile is not None else not args.tiny
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls autocast leaves (and the optimizer's)
        torch.backends.cudnn.allow_tf32 = True
    published, published_note = published_peak(device)
    measured = measured_matmul_flops(device, precision, seconds=1.0 if device.type == "cuda" else 0.3)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name} ({device}), torch {torch.__version__}, {precision}"
          f"{' autocast' if precision != 'fp32' else ''}, TF32 {'on' if device.type == 'cuda' else 'n/a'}, "
          f"compile {'each block' if compile_blocks else 'off'}, AdamW "
          f"{'fused' if device.type in ('cuda', 'cpu') else 'foreach'}, synthetic random tokens")
    print(f"peak: published dense bf16 "
          f"{f'{published / 1e12:.0f} TFLOP/s ({published_note})' if published else f'n/a ({published_note})'}; "
          f"measured {precision} matmul {measured / 1e12:.2f} TFLOP/s (the best of "
          f"{'4096^3 and 8192^3' if device.type == 'cuda' else '1024^3 and 2048^3'}, timed here)")
    results = []
    try:
        for shape in shapes(args.tiny):
            results.append(measure(shape, args.batch or shape.batch, args, device, precision, compile_blocks))
    except LmforgeError as exc:
        print(f"gpu_throughput: {exc}", file=sys.stderr)
        return 2
    for r in results:
        flops = r["tokens_per_s"] * r["flops_per_token"]
        r["mfu_published"] = flops / published if published else None
        r["mfu_measured"] = flops / measured
        if r["mfu_measured"] > 1:  # e.g. bf16 on a CPU without native bf16, where large matmuls crawl
            print(f"note: {r['model']} runs above the measured {precision} matmul peak, so that measurement is not "
                  f"this device's real peak and its MFU means nothing", file=sys.stderr)
    header = (f"{'model':<11}{'shape':<22}{'batch':>6}{'tokens/s':>12}{'step ms':>9}{'MFU publ':>10}"
              f"{'MFU meas':>10}{'peak GiB':>10}  attention")
    print(header)
    for r in results:
        publ = f"{r['mfu_published']:.1%}" if r["mfu_published"] is not None else "n/a"
        mem = f"{r['peak_memory_bytes'] / 2**30:.1f}" if r["peak_memory_bytes"] is not None else "n/a"
        print(f"{r['model']:<11}{r['shape']:<22}{r['batch']:>6}{r['tokens_per_s']:>12,.0f}{r['step_ms']:>9.1f}"
              f"{publ:>10}{r['mfu_measured']:>10.1%}{mem:>10}  {r['attention']}")
    if args.json:
        args.json.write_text(json.dumps({
            "device": name, "torch": torch.__version__, "precision": precision, "compile": compile_blocks,
            "published_peak_flops": published, "published_peak_note": published_note,
            "measured_peak_flops": measured, "models": results}, indent=2) + "\n")
    for r in results:
        line = f"{r['model']} mfu "
        if r["mfu_published"] is not None:
            line += f"{r['mfu_published']:.1%} of the published dense bf16 peak ({published_note}), "
        line += f"{r['mfu_measured']:.1%} of the measured {precision} matmul peak, {r['tokens_per_s']:,.0f} tokens/s"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
