"""Pretraining: a token store, a model and its objective (causal LM, masked LM + NSP, or T5 denoising) as a
Recipe of the training loop; resumable at any checkpoint, the same on one process or many."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm import tqdm

from lmforge.config import Config
from lmforge.data.loader import batch_layout, check_objective, loader_for
from lmforge.data.store import TokenStore
from lmforge.data.tokenizer import load_tokenizer, tokenizer_sha256
from lmforge.errors import LmforgeError
from lmforge.model import build_model
from lmforge.train.checkpoint import TrainerState, resume_training_state
from lmforge.train.device import measured_matmul_flops
from lmforge.train.distributed import (World, check_launch, parallelize, process_group, resolve_rank_device,
                                       run_on_main, world_from_env)
from lmforge.train.evaluate import describe_metrics, evaluate
from lmforge.train.loop import KeepPolicy, Recipe, count_targets, resume_note, run_loop
from lmforge.train.optim import build_optimizer, learning_rate
from lmforge.train.rng import derived_seed, restore_rng_states, seed_everything
from lmforge.train.rundir import RunDir, StoreRecord, open_recorded_store

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    val_loss: Optional[float] = None
    interrupted_by: Optional[int] = None  # signal number when stopped by SIGINT / SIGTERM
    seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    val_metrics: dict[str, float] = field(default_factory=dict)
    # wall seconds of the run's parts, in order: "checks" (before the store), "store", "set-up" (model,
    # optimizer, loaders, matmul peak; a checkpoint's loading on resume), "steps", "evaluations", "checkpoints"
    parts: dict[str, float] = field(default_factory=dict)


def pretrain(config: Config, run_dir: Path, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train config.model on config.data from scratch (or from run_dir's newest checkpoint).

    Under torchrun every process calls it; they share the work and rank 0 alone writes the run files
    and reports progress. The results are those of one process training on the same global batches.
    """
    started = time.time()
    world = world_from_env()
    device = resolve_rank_device(config.train.device, world)
    batch_layout(config.train.batch_size, config.train.micro_batch_size, world.size)  # refuse bad input before work
    check_objective(config)
    check_launch(config.parallel, config.model, device, world)
    run = RunDir(run_dir)
    owner = take_ownership(run, resume) if world.is_main else None
    try:
        with process_group(world, device) as mesh:
            return _pretrain(config, run, resume, progress and world.is_main, world, device, mesh, started)
    finally:
        if owner is not None:
            owner.release()
            run.discard_if_unused()


def take_ownership(run: RunDir, resume: bool) -> Any:
    """Rank 0's lock on the run directory for the run's life (released by the OS if the process dies)."""
    if resume:
        if not run.path.is_dir():
            raise LmforgeError(f"run directory not found: {run.path}")
        run.record()  # refuses a run of a newer format before anything is written
    return run.owned().acquire()


class PretrainRecipe(Recipe):
    """The objective's loss over blocks from the token store, evaluated on the validation split."""

    def __init__(self, config: Config, store: TokenStore, world: World, device: torch.device, mesh: Any,
                 progress: bool):
        tc = config.train
        self.config, self.world, self.device, self.precision = config, world, device, tc.precision
        self.name, self.total_steps, self.grad_clip = "pretrain", tc.steps, tc.grad_clip
        self.max_bad_steps, self.log_every, self.eval_every = tc.max_bad_steps, tc.log_every, tc.eval_every
        self.keep = KeepPolicy(every=tc.checkpoint_every, keep_last=tc.keep_checkpoints, keep_every=tc.keep_every)
        seed_everything(tc.seed)  # every process builds the same initial weights
        self.model = build_model(config.model).to(device)
        if world.rank > 0:  # dropout masks of its own; rank 0 keeps the stream a single process would have
            seed_everything(derived_seed(tc.seed, world.rank))
        # Without NSP examples the pooler and NSP head get no gradient, and DDP must be told.
        unused = config.model.family == "bert" and not config.mlm.next_sentence
        self.train_model = parallelize(self.model, lambda m, batch: m(**batch).loss_terms(), config.parallel, mesh,
                                       device, tc.precision, tc.compile, unused, tc.compile_strict)
        self.optimizer = build_optimizer(self.model, tc, device)
        self.train_loader = loader_for(config, store, "train", training=True, rank=world.rank, world_size=world.size)
        self.val_loader = loader_for(config, store, "val", training=False, rank=world.rank, world_size=world.size)
        self.tokens_per_step = tc.batch_size * config.model.block_size
        self.tokens_seen = 0
        extra = {}
        if config.model.family == "bert":
            extra = {"mask_rate": config.mlm.mask_rate}
        elif config.model.family == "t5":  # per encoder input token, with the decoder's targets
            extra = {"target_len": self.train_loader.lengths.targets}
        self.flops_per_step = self.model.flops_per_token(config.model.block_size, **extra) * self.tokens_per_step
        self.peak_flops = measured_matmul_flops(device, tc.precision) if world.is_main else 1.0  # MFU: rank 0 logs it
        if tc.precision != "fp32" and progress:
            fp32_flops = measured_matmul_flops(device, "fp32")
            if self.peak_flops < fp32_flops:  # e.g. an AVX2-only CPU has no native bf16 matmul
                log.warning("warning: %s matmuls run at %.1f GFLOP/s on this %s vs %.1f in fp32; train.precision=fp32 "
                            "will be faster here", tc.precision, self.peak_flops / 1e9, device.type, fp32_flops / 1e9)

    def set_learning_rate(self, step: int) -> float:
        lr = learning_rate(step, self.config.train)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def micro_batches(self, step: int) -> list[tuple[dict, dict[str, float]]]:
        batches = [self.train_loader.next() for _ in range(self.train_loader.accum_steps)]
        self.tokens_seen += self.tokens_per_step
        return [(b, count_targets(b)) for b in batches]

    def evaluate(self) -> dict[str, float]:
        tc = self.config.train
        return evaluate(self.model, self.val_loader, tc.eval_batches, self.device, tc.precision)

    def throughput(self, steps: int, seconds: float) -> dict[str, float]:
        tokens_per_s = steps * self.tokens_per_step / seconds if seconds > 0 else 0.0
        # MFU per device: the whole run's FLOP/s over the peak of all its devices
        mfu = tokens_per_s / self.tokens_per_step * self.flops_per_step / (self.peak_flops * self.world.size)
        if mfu > 1.0 and self.world.is_main:  # the peak was measured while something else shared the device: again
            self.peak_flops = measured_matmul_flops(self.device, self.precision, fresh=True)
            mfu = tokens_per_s / self.tokens_per_step * self.flops_per_step / (self.peak_flops * self.world.size)
        return {"tokens": self.tokens_seen, "tokens_per_s": tokens_per_s, "mfu": mfu}

    def save_state(self, state: TrainerState) -> None:
        state.tokens_seen = self.tokens_seen
        state.loader = self.train_loader.state_dict()
        state.config = self.config.to_dict()

    def on_evaluated(self, step: int, metrics: dict[str, float], best: bool) -> None:
        tqdm.write(f"step {step}: val {describe_metrics(metrics)}", file=sys.stderr)

    def rollback_command(self, run_dir: Path) -> str:
        return f"lmforge pretrain --resume {run_dir} --set train.lr={self.config.train.lr / 2:g}"


def _pretrain(config: Config, run: RunDir, resume: bool, progress: bool, world: World, device: torch.device,
              mesh: Any, started: float) -> TrainResult:
    tc = config.train
    parts = {"checks": time.time() - started}
    began = time.perf_counter()
    restart = False
    if resume:
        store = TokenStore(run_on_main(_recorded_store_path, run, config, progress))
    else:
        from lmforge.data.prepare import prepare

        restart = run_on_main(run.check_new, "lmforge pretrain --resume")
        store = TokenStore(run_on_main(prepare, config.data, config.model.family, progress=progress))
    vocab_size = store.manifest["vocab_size"]
    if config.model.vocab_size == 0:
        config.model.vocab_size = vocab_size
    elif config.model.vocab_size < vocab_size:
        raise LmforgeError(f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's {vocab_size}")

    parts["store"] = time.perf_counter() - began
    began = time.perf_counter()
    recipe = PretrainRecipe(config, store, world, device, mesh, progress)
    state = TrainerState()
    if resume and run_on_main(run.has_checkpoint):
        ckpt = resume_training_state(run.path, recipe.model, recipe.optimizer)
        state = ckpt.state
        recipe.train_loader.load_state_dict(state.loader)
        recipe.tokens_seen = state.tokens_seen
        rng_note = restore_rng_states(state.rng, world.rank, world.size, tc.seed, state.step)
        if world.is_main:  # it fits: overrides given with --resume join the run
            run.write_config(config)
            run.write_record("pretrain", StoreRecord.of(store))
        if progress:
            log.info(resume_note(run.path, ckpt.path.name, state.step, tc.steps, rng_note))
    elif resume or restart:  # killed before its first checkpoint was whole: nothing to continue
        if progress:
            log.warning("warning: %s has no complete checkpoint (stopped before its first one was written); "
                        "starting it over from step 0", run.path)
        resume = False
    if not resume and world.is_main:  # only now: a run that fails its checks leaves nothing behind
        run.start("pretrain", config, store.tokenizer_path, StoreRecord.of(store))
    if progress:
        accum = recipe.train_loader.accum_steps
        layout = (f"{world.size} processes ({config.parallel.strategy}), " if world.distributed else "")
        log.info(f"model: {config.model.family}, {recipe.model.num_parameters() / 1e6:.2f}M parameters, "
                 f"{recipe.tokens_per_step:,} tokens/step ({layout}{accum} micro-batch{'es' if accum > 1 else ''} of "
                 f"{recipe.train_loader.micro_batch_size} per process), {tc.precision} on {device}")
    parts["set-up"] = time.perf_counter() - began
    try:
        done = run_loop(recipe, run, state, world, progress, resumed=resume)
    finally:
        recipe.train_loader.close()  # background batch workers, if any
    result = TrainResult(run.path, done.step, interrupted_by=done.interrupted_by, history=done.history,
                         val_metrics=done.last_eval, val_loss=done.last_eval.get("val_loss"),
                         parts={**parts, **done.seconds})
    result.seconds = time.time() - started
    if world.is_main:
        run.write_summary({"step": result.step, "val_loss": result.val_loss, "val": result.val_metrics,
                           "seconds": round(result.seconds, 1), "interrupted": result.interrupted_by is not None})
    return result


def _recorded_store_path(run: RunDir, config: Config, progress: bool) -> Path:
    store = open_recorded_store(run, config.data, config.model.family, progress)
    _check_same_tokenizer(run, store)
    return store.path


def _check_same_tokenizer(run: RunDir, store: TokenStore) -> None:
    theirs = tokenizer_sha256(load_tokenizer(run.tokenizer_file))
    if theirs != store.manifest["tokenizer_sha256"]:
        raise LmforgeError(f"cannot resume {run.path}: its tokenizer differs from the token store's "
                           f"({theirs[:12]} vs {store.manifest['tokenizer_sha256'][:12]}); "
                           f"the data config changed since the run started")
