"""The one training loop. Every objective (causal LM, masked LM + NSP, ...) and every fine-tuning task
kind is a Recipe that hands it batches, a loss, an evaluation and a keep policy; the loop owns the rest:

- micro-batches weighted into the exact mean over the global batch (for any micro-batch size and
  number of processes), gradient sync on the last micro-batch only, autocast, backward;
- one collective per step for the loss and for stopping together (a signal may reach one process);
- gradient clipping, and the skip of an update whose loss or gradient norm is not finite;
- SIGINT / SIGTERM: finish the step, write a checkpoint, return;
- cadence (log, evaluate, checkpoint) and retention (keep the last N, milestones, the best by a metric,
  early stopping after `patience` evaluations without a better one);
- metrics.jsonl / TensorBoard rows and the progress bar.

It returns a LoopResult; drawing plots and sampling text are for its callers.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn
from tqdm import tqdm

from lmforge.errors import LmforgeError
from lmforge.model import IGNORE_INDEX
from lmforge.train.checkpoint import TrainerState, prune_checkpoints, save_checkpoint, step_name, weights_are_finite
from lmforge.train.device import autocast, synchronize
from lmforge.train.distributed import World, all_reduce_sum, clip_grad_norm, gradient_sync
from lmforge.train.metrics import MetricsWriter
from lmforge.train.rng import all_rng_states
from lmforge.train.rundir import RunDir

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]


def count_targets(batch: Batch) -> dict[str, float]:
    """Targets per label tensor of a micro-batch (positions that are not IGNORE_INDEX): what each loss
    term of the model averages over."""
    return {k: float((v != IGNORE_INDEX).sum()) for k, v in batch.items() if k.endswith("labels")}


def loss_weights(counts: list[dict[str, float]]) -> list[dict[str, float]]:
    """Each micro-batch's share of the global batch's targets, per label tensor (counted over all processes).

    A loss term that averages over its micro-batch's targets, times this share, summed over
    micro-batches and processes, is the term's average over the global batch: the same number for
    any micro-batch size and world size.
    """
    keys = sorted(counts[0])
    local = torch.tensor([[row[k] for k in keys] for row in counts], dtype=torch.float64)
    totals = all_reduce_sum(local.sum(0))
    return [{k: float(c / t) if t > 0 else 0.0 for k, c, t in zip(keys, row, totals)} for row in local]


def weighted_loss(terms: dict[str, Optional[torch.Tensor]], weights: dict[str, float]) -> torch.Tensor:
    """Sum of a micro-batch's loss terms, each times its share of the global batch's targets (loss_weights)."""
    parts = [term * weights[key] for key, term in terms.items() if term is not None and weights[key] > 0]
    if not parts:  # no targets in this micro-batch: a zero that still reaches the parameters, as DDP wants
        return sum(term * 0.0 for term in terms.values() if term is not None)
    return sum(parts)


@dataclass
class KeepPolicy:
    """Which checkpoints a run writes and keeps.

    every: checkpoint every N steps (0: at each evaluation); always at the end and when stopped.
    keep_last / keep_every: the newest N (0: all), plus every multiple of keep_every steps.
    score: the evaluation's metrics -> a number, higher is better; the checkpoint with the best score
    is kept and named by checkpoints/best. patience: stop after that many evaluations without a
    better score (0: never).
    """

    every: int = 0
    keep_last: int = 0
    keep_every: int = 0
    score: Optional[Callable[[dict[str, float]], float]] = None
    patience: int = 0


class Recipe:
    """What an objective or a task kind hands the loop. Subclasses set the attributes and methods."""

    name: str  # shown on the progress bar
    model: nn.Module  # the plain (or FSDP-sharded) model: evaluated and checkpointed
    train_model: nn.Module  # what train.distributed.parallelize returned: called with a batch, gives loss terms
    optimizer: torch.optim.Optimizer
    device: torch.device
    precision: str
    total_steps: int
    grad_clip: float
    max_bad_steps: int = 0  # stop after this many non-finite steps in a row (0: never)
    log_every: int = 1
    eval_every: int = 0  # 0: only at the end
    keep: KeepPolicy

    def set_learning_rate(self, step: int) -> float:
        """Set the optimizer's learning rates for `step`; return the one to log."""
        raise NotImplementedError

    def micro_batches(self, step: int) -> list[tuple[Batch, dict[str, float]]]:
        """This process's micro-batches of step `step` (on the host), each with its target counts."""
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        """Validation metrics (`val_*` keys); every process calls it."""
        raise NotImplementedError

    def throughput(self, steps: int, seconds: float) -> dict[str, float]:
        """Log fields for `steps` steps done in `seconds` (tokens/s, MFU, examples/s ...)."""
        return {}

    def save_state(self, state: TrainerState) -> None:
        """Add what this recipe needs to resume (e.g. the loader's position) to the checkpoint's state."""

    def rollback_command(self, run_dir: Path) -> str:
        """The command that resumes `run_dir` from its last good checkpoint with half the learning rate."""
        raise NotImplementedError

    def on_evaluated(self, step: int, metrics: dict[str, float], best: bool) -> None:
        """Say what an evaluation found (the loop has already logged it)."""


@dataclass
class LoopResult:
    step: int
    state: TrainerState
    last_eval: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    interrupted_by: Optional[int] = None  # signal number when stopped by SIGINT / SIGTERM
    stopped_early: bool = False
    # wall seconds of the loop's parts: training steps (with logging), evaluations, checkpoints
    seconds: dict[str, float] = field(default_factory=lambda: {"steps": 0.0, "evaluations": 0.0, "checkpoints": 0.0})


class StopRequest:
    """SIGINT / SIGTERM ask the loop to stop after the current step; a second SIGINT stops at once."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: leave now; checkpoints are atomic, nothing tears
        self.signum = signum
        log.warning("\n%s received: finishing this step and writing a checkpoint (Ctrl-C again to quit at once)",
                    signal.Signals(signum).name)

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


def _is_better(value: float, best: Optional[float]) -> bool:
    return math.isfinite(value) and (best is None or value > best)


def run_loop(recipe: Recipe, run: RunDir, state: TrainerState, world: World, progress: bool,
             resumed: bool) -> LoopResult:
    """Train `recipe` from `state` (a fresh one, or a checkpoint's) to recipe.total_steps."""
    keep = recipe.keep
    metrics = MetricsWriter(run.path, resume_step=state.step if resumed else None) if world.is_main else None
    result = LoopResult(state.step, state)
    bar = tqdm(total=recipe.total_steps, initial=state.step, desc=recipe.name, unit="step", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)

    def checkpoint() -> None:
        state.rng = all_rng_states()
        recipe.save_state(state)
        if not weights_are_finite(recipe.model):  # a NaN checkpoint would be named "good" later
            raise LmforgeError(f"step {state.step}: the weights are not finite; the {step_name(state.step)} "
                               f"checkpoint was not written (last good: {_latest(run)}). Roll back with: "
                               f"{recipe.rollback_command(run.path)}")
        save_checkpoint(run.checkpoints, recipe.model, recipe.optimizer, state)
        if world.is_main:
            best = step_name(state.best_step) if state.best_step is not None and keep.score else None
            if best is not None:
                run.point_best(best)
            prune_checkpoints(run.checkpoints, keep.keep_last, keep.keep_every, step_name(state.step), best)

    bad_in_a_row = 0
    window_steps, window_start = 0, time.perf_counter()
    loop_start = window_start
    step = state.step
    model, optimizer = recipe.model, recipe.optimizer
    try:
        model.train()
        with StopRequest().installed() as stop:
            while step < recipe.total_steps:
                lr = recipe.set_learning_rate(step)
                parts = recipe.micro_batches(step)
                shares = loss_weights([counts for _, counts in parts])  # on the host: no device sync per micro-batch
                losses = []
                for i, ((host_batch, _), weights) in enumerate(zip(parts, shares)):
                    batch = {k: v.to(recipe.device, non_blocking=True) for k, v in host_batch.items()}
                    with gradient_sync(recipe.train_model, enabled=i == len(parts) - 1):
                        with autocast(recipe.device, recipe.precision):
                            loss = weighted_loss(recipe.train_model(batch), weights)
                        # DDP and FSDP average gradients over processes; the weights already make a global mean
                        (loss * world.size).backward()
                    losses.append(loss.detach())
                loss_sum = torch.stack(losses).double().sum().cpu()  # one device sync per step
                totals = all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(stop.signum is not None),
                                                                             dtype=torch.float64)]))
                loss_value, stopping = float(totals[0]), bool(totals[1] > 0)
                clip = recipe.grad_clip if recipe.grad_clip > 0 else math.inf
                grad_norm = float(clip_grad_norm(list(model.parameters()), clip))
                if math.isfinite(loss_value) and math.isfinite(grad_norm):
                    optimizer.step()
                    bad_in_a_row = 0
                else:  # skip the update: one bad batch must not poison the weights
                    bad_in_a_row += 1
                    state.bad_steps_total += 1
                    if progress:
                        bar.write(f"warning: step {step + 1}: non-finite loss or gradient norm; update skipped "
                                  f"({bad_in_a_row} in a row)", file=sys.stderr)
                optimizer.zero_grad(set_to_none=True)
                step += 1
                state.step = step
                window_steps += 1
                bar.update(1)
                if recipe.max_bad_steps and bad_in_a_row >= recipe.max_bad_steps:
                    raise LmforgeError(f"{bad_in_a_row} consecutive non-finite steps ending at step {step}; stopped. "
                                       f"Last good checkpoint: {_latest(run)}. Roll back with: "
                                       f"{recipe.rollback_command(run.path)}")

                row: dict[str, Any] = {}
                last = step == recipe.total_steps
                if step % recipe.log_every == 0 or last:
                    synchronize(recipe.device)
                    row = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                           **recipe.throughput(window_steps, time.perf_counter() - window_start)}
                    bar.set_postfix(_postfix(row))
                    window_steps, window_start = 0, time.perf_counter()
                evaluated = (recipe.eval_every > 0 and step % recipe.eval_every == 0) or last
                improved = False
                if evaluated:
                    began = time.perf_counter()
                    scores = recipe.evaluate()
                    result.seconds["evaluations"] += time.perf_counter() - began
                    row = {**{"step": step}, **row, **scores}
                    result.last_eval = scores
                    if keep.score is not None:
                        value = keep.score(scores)
                        if _is_better(value, state.best_score):
                            state.best_score, state.best_step, state.best, state.since_best = value, step, scores, 0
                            improved = True
                        else:
                            state.since_best += 1
                    if progress:
                        recipe.on_evaluated(step, scores, improved)
                    window_start = time.perf_counter()  # evaluation time is not training throughput
                if row:
                    if metrics is not None:
                        metrics.log(row)
                    result.history.append(row)
                early_stop = evaluated and keep.patience > 0 and state.since_best >= keep.patience
                due = (step % keep.every == 0) if keep.every > 0 else evaluated
                if due or last or stopping or early_stop:
                    began = time.perf_counter()
                    checkpoint()
                    window_start = time.perf_counter()
                    result.seconds["checkpoints"] += window_start - began
                if stopping:
                    result.interrupted_by = stop.signum or signal.SIGTERM
                    break
                if early_stop:
                    result.stopped_early = True
                    if progress:
                        bar.write(f"early stop: no better dev score in {keep.patience} evaluations", file=sys.stderr)
                    break
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
        elsewhere = result.seconds["evaluations"] + result.seconds["checkpoints"]
        result.seconds["steps"] = time.perf_counter() - loop_start - elsewhere
    result.step = step
    return result


def describe_time(total: float, parts: dict[str, float]) -> str:
    """One line for people: where a command's `total` wall seconds went, part by part (in the given order),
    with what no part measured as "other"."""
    shown = [f"{name} {seconds:.1f}" for name, seconds in parts.items()]
    other = total - sum(parts.values())
    if other >= 0.05:
        shown.append(f"other {other:.1f}")
    return f"time: {total:.1f} s = " + " + ".join(shown)


def _postfix(row: dict[str, Any]) -> dict[str, str]:
    shown = {"loss": f"{row['loss']:.4f}"}
    if "tokens_per_s" in row:
        shown["tok_s"] = f"{row['tokens_per_s']:,.0f}"
    if "mfu" in row:
        shown["mfu"] = f"{row['mfu']:.1%}"
    return shown


def _latest(run: RunDir) -> str:
    pointer = run.checkpoints / "latest"
    return pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else "none"


def resume_note(run_dir: Path, checkpoint_name: str, step: int, total: int, rng_note: Optional[str]) -> str:
    return (f"resuming {run_dir} from {checkpoint_name} (step {step} of {total})"
            + (f"; {rng_note}" if rng_note else ""))
