"""The pretraining loop: step, accumulate, clip, log, evaluate, checkpoint; resumable at any checkpoint."""

from __future__ import annotations

import json
import math
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from tqdm import tqdm

from lmforge.config import Config, dump_config
from lmforge.data.loader import Batch, batch_layout, loader_for
from lmforge.data.prepare import prepare
from lmforge.data.store import TokenStore
from lmforge.data.tokenizer import eos_id, load_tokenizer, tokenizer_sha256
from lmforge.errors import LmforgeError
from lmforge.infer.fill_mask import describe as describe_fill_mask
from lmforge.infer.fill_mask import fill_mask
from lmforge.infer.generate import generate
from lmforge.model import build_model
from lmforge.model import IGNORE_INDEX
from lmforge.report import plot_run
from lmforge.run import CONFIG_FILE, TOKENIZER_FILE
from lmforge.train.checkpoint import (all_rng_states, derived_seed, find_checkpoint, load_model_weights,
                                      load_training_state, restore_rng_states, save_checkpoint, seed_everything)
from lmforge.train.device import autocast, measured_matmul_flops, synchronize
from lmforge.train.distributed import (World, all_reduce_sum, check_launch, clip_grad_norm, gradient_sync, parallelize,
                                       process_group, resolve_rank_device, run_on_main, world_from_env)
from lmforge.train.evaluate import describe_metrics, evaluate
from lmforge.train.metrics import MetricsWriter
from lmforge.train.optim import build_optimizer, learning_rate


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    val_loss: Optional[float] = None
    sample: Optional[str] = None
    interrupted_by: Optional[int] = None  # signal number when stopped by SIGINT / SIGTERM
    seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    val_metrics: dict[str, float] = field(default_factory=dict)


class StopRequest:
    """SIGINT / SIGTERM ask the loop to stop after the current step; a second SIGINT stops at once."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: leave now; checkpoints are atomic, nothing tears
        self.signum = signum
        print(f"\n{signal.Signals(signum).name} received: finishing this step and writing a checkpoint "
              f"(Ctrl-C again to quit at once)", file=sys.stderr)

    @contextmanager
    def installed(self) -> Iterator["StopRequest"]:
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for s in previous:
                signal.signal(s, self._handle)
        except ValueError:  # not the main thread (e.g. embedded use): run without handlers
            previous = {}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def _prepare_run_dir(config: Config, run_dir: Path, store: TokenStore) -> None:
    if (run_dir / "checkpoints").exists() and any((run_dir / "checkpoints").iterdir()):
        raise LmforgeError(f"{run_dir} already holds a run; continue it with --resume {run_dir} "
                           f"or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(config, run_dir / CONFIG_FILE)
    shutil.copyfile(store.tokenizer_path, run_dir / TOKENIZER_FILE)


def _check_resume_compatible(run_dir: Path, store: TokenStore) -> None:
    theirs = tokenizer_sha256(load_tokenizer(run_dir / TOKENIZER_FILE))
    if theirs != store.manifest["tokenizer_sha256"]:
        raise LmforgeError(f"cannot resume {run_dir}: its tokenizer differs from the token store's "
                           f"({theirs[:12]} vs {store.manifest['tokenizer_sha256'][:12]}); "
                           f"the data config changed since the run started")


def pretrain(config: Config, run_dir: Path, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train config.model on config.data from scratch (or from run_dir's newest checkpoint).

    Under torchrun every process calls it; they share the work and rank 0 alone writes the run files
    and reports progress. The results are those of one process training on the same global batches.
    """
    started = time.time()
    world = world_from_env()
    device = resolve_rank_device(config.train.device, world)
    batch_layout(config.train.batch_size, config.train.micro_batch_size, world.size)  # refuse bad input before work
    check_launch(config.parallel, config.model, device, world)
    with process_group(world, device) as mesh:
        return _pretrain(config, run_dir, resume, progress and world.is_main, world, device, mesh, started)


def loss_weights(micro_batches: list[Batch]) -> list[dict[str, float]]:
    """Each micro-batch's share of the global batch's targets, per label tensor (counted over all processes).

    A loss term that averages over its micro-batch's targets (a model output's loss_terms()), times
    this share, summed over micro-batches and processes, is the term's average over the global batch:
    the same number for any micro-batch size and world size.
    """
    keys = sorted(k for k in micro_batches[0] if k.endswith("labels"))
    counts = torch.tensor([[float((b[k] != IGNORE_INDEX).sum()) for k in keys] for b in micro_batches],
                          dtype=torch.float64)
    totals = all_reduce_sum(counts.sum(0))
    return [{k: float(c / t) if t > 0 else 0.0 for k, c, t in zip(keys, row, totals)} for row in counts]


def weighted_loss(terms: dict[str, Optional[torch.Tensor]], weights: dict[str, float]) -> torch.Tensor:
    """Sum of a micro-batch's loss terms, each times its share of the global batch's targets (loss_weights)."""
    parts = [term * weights[key] for key, term in terms.items() if term is not None and weights[key] > 0]
    if not parts:  # no targets in this micro-batch: a zero that still reaches the parameters, as DDP wants
        return sum(term * 0.0 for term in terms.values() if term is not None)
    return sum(parts)


def _pretrain(config: Config, run_dir: Path, resume: bool, progress: bool, world: World, device: torch.device,
              mesh: Any, started: float) -> TrainResult:
    tc = config.train
    store = TokenStore(run_on_main(prepare, config.data, config.model.family, progress=progress))
    vocab_size = store.manifest["vocab_size"]
    if config.model.vocab_size == 0:
        config.model.vocab_size = vocab_size
    elif config.model.vocab_size < vocab_size:
        raise LmforgeError(f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's {vocab_size}")

    if resume:
        run_on_main(_check_resume_compatible, run_dir, store)
    else:
        run_on_main(_prepare_run_dir, config, run_dir, store)

    seed_everything(tc.seed)  # every process builds the same initial weights
    model = build_model(config.model).to(device)
    if world.rank > 0:  # dropout masks of its own; rank 0 keeps the stream a single process would have
        seed_everything(derived_seed(tc.seed, world.rank))
    # Without NSP examples the pooler and NSP head get no gradient, and DDP must be told.
    unused = config.model.family == "bert" and not config.mlm.next_sentence
    train_model = parallelize(model, lambda m, batch: m(**batch).loss_terms(), config.parallel, mesh, device,
                              tc.precision, tc.compile, unused)
    optimizer = build_optimizer(model, tc, device)
    train_loader = loader_for(config, store, "train", training=True, rank=world.rank, world_size=world.size)
    val_loader = loader_for(config, store, "val", training=False, rank=world.rank, world_size=world.size)
    state: dict[str, Any] = {"tokens_seen": 0, "bad_steps_total": 0}
    step = 0
    if resume:
        ckpt = run_on_main(find_checkpoint, run_dir)
        load_training_state(ckpt, model, optimizer)
        train_loader.load_state_dict(ckpt.state["loader"])
        step = ckpt.state["step"]
        rng_note = restore_rng_states(ckpt.state["rng"], world.rank, world.size, tc.seed, step)
        state["tokens_seen"] = ckpt.state["tokens_seen"]
        state["bad_steps_total"] = ckpt.state.get("bad_steps_total", 0)
        if world.is_main:
            dump_config(config, run_dir / CONFIG_FILE)  # it fits: overrides given with --resume join the run
        if progress:
            print(f"resuming {run_dir} from {ckpt.path.name} (step {step})"
                  + (f"; {rng_note}" if rng_note else ""), file=sys.stderr)

    accum = train_loader.accum_steps
    tokens_per_step = tc.batch_size * config.model.block_size
    extra = {"mask_rate": config.mlm.mask_rate} if config.model.family == "bert" else {}
    flops_per_step = model.flops_per_token(config.model.block_size, **extra) * tokens_per_step
    peak_flops = measured_matmul_flops(device, tc.precision) if world.is_main else 1.0  # MFU is logged by rank 0
    if tc.precision != "fp32" and progress:
        fp32_flops = measured_matmul_flops(device, "fp32")
        if peak_flops < fp32_flops:  # e.g. an AVX2-only CPU has no native bf16 matmul
            print(f"warning: {tc.precision} matmuls run at {peak_flops / 1e9:.1f} GFLOP/s on this {device.type} "
                  f"vs {fp32_flops / 1e9:.1f} in fp32; train.precision=fp32 will be faster here", file=sys.stderr)
    metrics = MetricsWriter(run_dir, resume_step=step if resume else None) if world.is_main else None
    result = TrainResult(run_dir, step)
    if progress:
        layout = (f"{world.size} processes ({config.parallel.strategy}), " if world.distributed else "")
        print(f"model: {config.model.family}, {model.num_parameters() / 1e6:.2f}M parameters, "
              f"{tokens_per_step:,} tokens/step ({layout}{accum} micro-batch{'es' if accum > 1 else ''} of "
              f"{train_loader.micro_batch_size} per process), {tc.precision} on {device}", file=sys.stderr)

    def checkpoint() -> Path:
        trainer_state = {"tokens_seen": state["tokens_seen"], "bad_steps_total": state["bad_steps_total"],
                         "loader": train_loader.state_dict(), "rng": all_rng_states(), "config": config.to_dict()}
        try:
            return save_checkpoint(run_dir / "checkpoints", step, model, optimizer, trainer_state,
                                   keep_last=tc.keep_checkpoints, keep_every=tc.keep_every)
        except OSError as exc:  # disk full, quota, permissions: stop, keeping the last good checkpoint
            latest = run_dir / "checkpoints" / "latest"
            kept = latest.read_text().strip() if latest.is_file() else "none"
            raise LmforgeError(f"could not write the step-{step} checkpoint ({exc.strerror or exc}); "
                               f"the previous checkpoint ({kept}) is intact") from None

    bar = tqdm(total=tc.steps, initial=step, desc="pretrain", unit="step", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    bad_in_a_row = 0
    window_tokens, window_start = 0, time.perf_counter()
    model.train()
    with StopRequest().installed() as stop:
        while step < tc.steps:
            lr = learning_rate(step, tc)
            for group in optimizer.param_groups:
                group["lr"] = lr
            host_batches = [train_loader.next() for _ in range(accum)]
            shares = loss_weights(host_batches)  # counted on the host: no device sync per micro-batch
            losses = []
            for i, (host_batch, weights) in enumerate(zip(host_batches, shares)):
                batch = {k: v.to(device, non_blocking=True) for k, v in host_batch.items()}
                with gradient_sync(train_model, enabled=i == accum - 1):
                    with autocast(device, tc.precision):
                        loss = weighted_loss(train_model(batch), weights)
                    # DDP and FSDP average gradients over processes; the weights already make a global mean
                    (loss * world.size).backward()
                losses.append(loss.detach())
            loss_sum = torch.stack(losses).double().sum().cpu()  # one device sync per step
            # One collective for the step's loss and for stopping together (a signal may reach one process only).
            totals = all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(stop.signum is not None),
                                                                         dtype=torch.float64)]))
            loss_value, stopping = float(totals[0]), bool(totals[1] > 0)
            clip = tc.grad_clip if tc.grad_clip > 0 else math.inf
            grad_norm = float(clip_grad_norm(list(model.parameters()), clip))
            if math.isfinite(loss_value) and math.isfinite(grad_norm):
                optimizer.step()
                bad_in_a_row = 0
            else:  # skip the update: one bad batch must not poison the weights
                bad_in_a_row += 1
                state["bad_steps_total"] += 1
                if progress:
                    print(f"\nwarning: step {step + 1}: non-finite loss or gradient norm; update skipped "
                          f"({bad_in_a_row} in a row)", file=sys.stderr)
            optimizer.zero_grad(set_to_none=True)
            step += 1
            state["tokens_seen"] += tokens_per_step
            window_tokens += tokens_per_step
            bar.update(1)

            if bad_in_a_row >= tc.max_bad_steps:
                if metrics is not None:
                    metrics.close()
                bar.close()
                last = find_checkpoint(run_dir).path.name if (run_dir / "checkpoints" / "latest").exists() else "none"
                raise LmforgeError(f"{bad_in_a_row} consecutive non-finite steps ending at step {step}; stopped. "
                                   f"Last good checkpoint: {last}. Roll back with: lmforge pretrain --resume "
                                   f"{run_dir} --set train.lr={tc.lr / 2:g}")

            row: dict[str, Any] = {}
            if step % tc.log_every == 0 or step == tc.steps:
                synchronize(device)
                elapsed = time.perf_counter() - window_start
                tokens_per_s = window_tokens / elapsed if elapsed > 0 else 0.0
                # MFU per device: the whole run's FLOP/s over the peak of all its devices
                mfu = tokens_per_s / tokens_per_step * flops_per_step / (peak_flops * world.size)
                if mfu > 1.0 and world.is_main:  # the peak was measured while something else shared the device: again
                    peak_flops = measured_matmul_flops(device, tc.precision, fresh=True)
                    mfu = tokens_per_s / tokens_per_step * flops_per_step / (peak_flops * world.size)
                row = {"step": step, "tokens": state["tokens_seen"], "loss": loss_value, "lr": lr,
                       "grad_norm": grad_norm, "tokens_per_s": tokens_per_s, "mfu": mfu}
                bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tokens_per_s:,.0f}", mfu=f"{mfu:.1%}")
                window_tokens, window_start = 0, time.perf_counter()
            if step % tc.eval_every == 0 or step == tc.steps:
                evaluated = evaluate(model, val_loader, tc.eval_batches, device, tc.precision)
                row = {"step": step, "tokens": state["tokens_seen"], **row, **evaluated}
                result.val_loss = evaluated["val_loss"]
                result.val_metrics = evaluated
                if progress:
                    bar.write(f"step {step}: val {describe_metrics(evaluated)}", file=sys.stderr)
                window_start = time.perf_counter()  # evaluation time is not training throughput
            if row:
                if metrics is not None:
                    metrics.log(row)
                result.history.append(row)
            if step % tc.checkpoint_every == 0 or step == tc.steps or stopping:
                checkpoint()
                window_start = time.perf_counter()
            if stopping:
                result.interrupted_by = stop.signum or signal.SIGTERM
                break
    bar.close()
    result.step = step
    if not world.is_main:
        return result
    metrics.close()
    plot_run(run_dir)
    if result.interrupted_by is None and tc.sample_tokens > 0:
        tokenizer = load_tokenizer(run_dir / TOKENIZER_FILE)
        sampler = model
        if world.distributed:  # a whole model in this process, from the final checkpoint's weights
            sampler = build_model(config.model).to(device).eval()
            load_model_weights(sampler, find_checkpoint(run_dir).model_path)
        if config.model.family == "bert":
            if "[MASK]" in tc.sample_prompt:
                result.sample = tc.sample_prompt + "\n" + describe_fill_mask(
                    fill_mask(sampler, tokenizer, tc.sample_prompt, top_k=5, device=device))
        else:
            result.sample = sample_text(sampler, tokenizer, tc.sample_prompt, tc.sample_tokens, device, seed=tc.seed)
        if result.sample is not None:
            (run_dir / "samples.txt").write_text(result.sample + "\n", encoding="utf-8")
    result.seconds = time.time() - started
    (run_dir / "summary.json").write_text(json.dumps({
        "step": result.step, "val_loss": result.val_loss, "val": result.val_metrics,
        "seconds": round(result.seconds, 1), "interrupted": result.interrupted_by is not None},
        indent=2) + "\n", encoding="utf-8")
    return result


def sample_text(model: torch.nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int,
                device: torch.device, seed: int, temperature: float = 0.8, top_k: Optional[int] = 200,
                top_p: Optional[float] = None) -> str:
    """Decode a sampled continuation of `prompt` (prompt included)."""
    # An empty prompt starts from the end-of-text token: "a new document begins".
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids or [eos_id(tokenizer)]
    generator = torch.Generator(device=device).manual_seed(seed)
    out = generate(model, torch.tensor([ids], device=device), max_new_tokens, temperature=temperature,
                   top_k=top_k, top_p=top_p, generator=generator)
    return tokenizer.decode(out[0].tolist())
