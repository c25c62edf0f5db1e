"""Throughput of one pretraining recipe on 1 process and on 2 processes (torchrun, DDP and FSDP).

Each configuration runs `lmforge pretrain` as a user would (the 2-process ones through torchrun,
gloo on CPU) with the same global batch, so all of them train the same model on the same batches;
tokens/s is the median of the trainer's own logged windows after the first (warm-up) one. The last
column checks that the runs agree: their final training loss.

    python bench/distributed_scaling.py                 # baby GPT on Tiny Shakespeare, 60 steps of 32 x 64
    python bench/distributed_scaling.py --steps 100 --batch-size 64

On a machine with C cores, one process uses all C for its matmuls; torchrun gives each of its
processes C / processes threads (OMP_NUM_THREADS), so on a CPU box more processes mainly add
communication. The scaling that matters is across GPUs and nodes; this shows the machinery works
and what it costs here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(out: Path, processes: int, strategy: str, threads: int, args: argparse.Namespace) -> dict:
    overrides = {"train.steps": args.steps, "train.batch_size": args.batch_size, "train.log_every": args.log_every,
                 "train.eval_every": args.steps, "train.eval_batches": 1, "train.checkpoint_every": args.steps,
                 "train.sample_tokens": 0, "parallel.strategy": strategy}
    sets = [item for key, value in overrides.items() for item in ("--set", f"{key}={value}")]
    lmforge = ["-m", "lmforge", "pretrain", "--config", args.config, "--out", str(out), *sets]
    if processes == 1:
        command = [sys.executable, *lmforge]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   str(processes), *lmforge]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    windows = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]
    return {"tokens_per_s": statistics.median(windows), "loss": [r for r in rows if "loss" in r][-1]["loss"],
            "wall_s": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="shakespeare-char")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=32, help="the global batch (sequences per step)")
    parser.add_argument("--log-every", type=int, default=10)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    layouts = [(1, "ddp", cores), (1, "ddp", max(1, cores // 2)), (2, "ddp", max(1, cores // 2)),
               (2, "fsdp", max(1, cores // 2))]
    print(f"{args.config}: {args.steps} steps, global batch {args.batch_size}; {cores} CPU cores; torch.distributed "
          f"gloo")
    print(f"{'processes':>9}  {'strategy':>8}  {'threads each':>12}  {'tokens/s':>9}  {'vs 1 process':>12}  "
          f"{'final loss':>10}  {'wall s':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        base = None
        for i, (processes, strategy, threads) in enumerate(layouts):
            result = run(Path(tmp) / f"run-{i}", processes, strategy, threads, args)
            base = base or result["tokens_per_s"]
            shown = strategy if processes > 1 else "-"
            print(f"{processes:>9}  {shown:>8}  {threads:>12}  {result['tokens_per_s']:>9,.0f}  "
                  f"{result['tokens_per_s'] / base:>11.2f}x  {result['loss']:>10.4f}  {result['wall_s']:>6.0f}",
                  flush=True)


if __name__ == "__main__":
    main()
