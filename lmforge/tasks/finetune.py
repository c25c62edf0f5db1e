"""Supervised fine-tuning: a run (pretrained or fine-tuned) + a labeled task -> a new run with the best dev checkpoint.

The run directory mirrors a pretraining run's: config.yaml (a FinetuneRunConfig), tokenizer.json,
metrics.jsonl, summary.json, checkpoints/step-N/ with `latest` (newest, what --resume continues)
and `best` (the checkpoint with the best dev score, what evaluate and predict load). Batches are a
pure function of (seed, step) and every RNG is checkpointed, so a resumed fine-tune continues exactly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn
from tqdm import tqdm

from lmforge.config import apply_overrides, from_dict, read_yaml
from lmforge.data.loader import batch_layout
from lmforge.data.tokenizer import eos_id, load_tokenizer, warn_unknown
from lmforge.errors import LmforgeError
from lmforge.infer.generate import generate
from lmforge.model import IGNORE_INDEX, build_model
from lmforge.run import load_run_config
from lmforge.tasks.batches import (Encoded, batch_indices, collate, decode_response, encode_examples,
                                   encode_generation, length_sorted_batches, pad_id, steps_per_epoch,
                                   task_tokenizer)
from lmforge.tasks.config import (FinetuneConfig, FinetuneRunConfig, TaskConfig, recipe_finetune,
                                  resolve_task_config)
from lmforge.tasks.datasets import Example, TaskData, load_task, subsample
from lmforge.tasks.heads import TokenClassifier
from lmforge.tasks.kinds import (STRUCTURED_KINDS, KindData, evaluate_kind, kind_loss, predict_answers,
                                 predict_entities, predict_outputs, prepare_kind)
from lmforge.tasks.metrics import compute_metrics
from lmforge.tasks.mixture import mixture_name, split_task_list
from lmforge.tasks.models import SequenceClassifier, backbone_of, build_task_model, resolve_pooling
from lmforge.train.checkpoint import (Checkpoint, TrainerState, find_checkpoint, load_model_weights,
                                      resume_training_state, step_name)
from lmforge.train.device import autocast, resolve_device
from lmforge.train.distributed import (World, all_gather_objects, broadcast_object, check_launch, parallelize,
                                       process_group, rank_and_size, resolve_rank_device, run_on_main, world_from_env)
from lmforge.train.loop import KeepPolicy, Recipe, resume_note, run_loop
from lmforge.train.optim import optimizer_for
from lmforge.train.pretrain import take_ownership
from lmforge.train.rng import derived_seed, restore_rng_states, seed_everything
from lmforge.train.rundir import CONFIG_FILE, TOKENIZER_FILE, RunDir

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Run directories


def is_finetune_run(run_dir: str | Path) -> bool:
    """Whether run_dir holds a fine-tuned run (its config.yaml has a `finetune` section)."""
    path = Path(run_dir) / CONFIG_FILE
    return path.is_file() and "finetune" in read_yaml(path)


def load_finetune_config(run_dir: Path, overrides: Sequence[str] = ()) -> FinetuneRunConfig:
    data = read_yaml(run_dir / CONFIG_FILE)
    _apply_run_overrides(data, overrides)
    config = from_dict(FinetuneRunConfig, data)
    config.model.validate("model")
    config.finetune.validate()
    config.parallel.validate("parallel")
    return config


def _apply_run_overrides(data: dict[str, Any], overrides: Sequence[str]) -> None:
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        if not (key == "name" or key.startswith("finetune.") or key.startswith("parallel.")):
            raise LmforgeError(f"--set {text!r}: a fine-tune takes name=..., finetune.KEY=..., parallel.KEY=... "
                               f"or task.KEY=... (see lmforge/tasks/config.py)")
    apply_overrides(data, list(overrides))


def best_checkpoint(run_dir: Path) -> Checkpoint:
    """A fine-tuned run's best checkpoint on the dev split (else its newest)."""
    return find_checkpoint(run_dir, RunDir(run_dir).best_name())


def plan_finetune(base_run: str | Path, task: str, overrides: Sequence[str] = (), data_root: Optional[str] = None,
                  checkpoint: Optional[str] = None, finetune: Optional[FinetuneConfig] = None) -> FinetuneRunConfig:
    """The resolved FinetuneRunConfig for fine-tuning base_run on task: `finetune` (default: the task
    recipe's `finetune` section, if `task` names one, else the defaults), then `--set` overrides.
    `task` may list several tasks (`sst2,stsb`): a multi-task text-to-text fine-tune of a t5 run."""
    base_run = Path(base_run)
    task_overrides = [o.removeprefix("task.") for o in overrides if o.strip().startswith("task.")]
    run_overrides = [o for o in overrides if not o.strip().startswith("task.")]
    names = split_task_list(task)
    if any(not name for name in names):
        raise LmforgeError(f"--task {task!r}: an empty task name in the list (give e.g. sst2,stsb)")
    if len(set(names)) != len(names):
        raise LmforgeError(f"--task {task!r} names a task twice")
    task_configs = [resolve_task_config(name, data_root, task_overrides) for name in names]
    task_config = task_configs[0]
    if finetune is None and len(names) == 1:
        finetune = from_dict(FinetuneConfig, recipe_finetune(task), "finetune")
    if is_finetune_run(base_run):
        base = load_finetune_config(base_run)
        model_config = base.model
        name = best_checkpoint(base_run).path.name if checkpoint is None else checkpoint
    else:
        model_config = load_run_config(base_run).model
        name = find_checkpoint(base_run, checkpoint).path.name
    data: dict[str, Any] = {"name": mixture_name([t.name for t in task_configs]), "base_run": str(base_run),
                            "base_checkpoint": name, "model": dataclasses.asdict(model_config),
                            "task": task_config.to_dict(), "extra_tasks": [t.to_dict() for t in task_configs[1:]],
                            "finetune": dataclasses.asdict(finetune) if finetune is not None else {}}
    _apply_run_overrides(data, run_overrides)
    config = from_dict(FinetuneRunConfig, data)
    config.finetune.validate()
    config.parallel.validate("parallel")
    config.model.dropout = config.finetune.dropout
    config.model.validate("model")
    for each in config.tasks:
        check_kind_family(each, config.model.family, base_run)
    if config.extra_tasks:
        check_mixture(config.tasks, config.model.family, base_run)
    if config.task.kind in ("classification", "regression") and config.model.family != "t5":
        try:
            resolve_pooling(config.finetune.pooling, config.model.family)
        except ValueError as err:
            raise LmforgeError(f"finetune.pooling: {err} ({base_run} is a {config.model.family} run)") from None
        single = [t.name for t in config.tasks if t.text_pair is None]
        if config.finetune.pooling == "siamese" and single:
            raise LmforgeError(f"finetune.pooling: 'siamese' compares the two sentences of a pair task; "
                               f"{', '.join(single)} has no text_pair (use mean, cls or last)")
    return config


KIND_FAMILIES = {"generation": ("gpt",), "tokens": ("bert", "gpt"), "span": ("bert", "gpt"),
                 "seq2seq": ("gpt", "t5"), "classification": ("bert", "gpt", "t5"),
                 "regression": ("bert", "gpt", "t5")}


def check_kind_family(task: TaskConfig, family: str, base_run: Path) -> None:
    """Refuse a task kind the base run's family cannot be fine-tuned for."""
    families = KIND_FAMILIES[task.kind]
    if family not in families:
        raise LmforgeError(f"task {task.name}: a {task.kind} task fine-tunes a {' or '.join(families)} run; "
                           f"{base_run} is a {family} run")


def check_mixture(tasks: Sequence[TaskConfig], family: str, base_run: Path) -> None:
    """Several tasks in one run are text-to-text: a t5 run, and tasks it writes as text."""
    names = ", ".join(t.name for t in tasks)
    if family != "t5":
        raise LmforgeError(f"--task {names}: several tasks in one fine-tune are text-to-text, for a t5 run; "
                           f"{base_run} is a {family} run (fine-tune each task on its own)")
    for each in tasks:
        if each.kind not in ("classification", "regression", "seq2seq"):
            raise LmforgeError(f"--task {names}: {each.name} is a {each.kind} task; a multi-task t5 run mixes "
                               f"classification, regression and seq2seq tasks")
    seen = [t.name for t in tasks]
    if len(set(seen)) != len(seen):
        raise LmforgeError(f"--task {names}: two tasks share the name {next(n for n in seen if seen.count(n) > 1)!r} "
                           f"(a task's name is its text prefix and its metrics' prefix)")


def _initial_weights(config: FinetuneRunConfig, model: nn.Module, task: TaskData) -> None:
    """Load the base run's weights into the new task model (init=pretrained)."""
    base_run = Path(config.base_run)
    ckpt = find_checkpoint(base_run, config.base_checkpoint)
    if is_finetune_run(base_run):
        base = load_finetune_config(base_run)
        if base.task.kind != config.task.kind:
            raise LmforgeError(f"{base_run} was fine-tuned for {base.task.kind}; task {task.name} is "
                               f"{config.task.kind}; fine-tune its base run {base.base_run} instead")
        if isinstance(model, (SequenceClassifier, TokenClassifier)):
            theirs = 1 if base.task.kind == "regression" else len(base.task.labels or [])
            if theirs != model.num_outputs:
                raise LmforgeError(f"{base_run}'s head predicts {theirs} labels ({', '.join(base.task.labels or [])}) "
                                   f"but task {task.name} has {model.num_outputs} ({', '.join(task.label_names)}); "
                                   f"fine-tune from its base run {base.base_run} for a new head")
        load_model_weights(model, ckpt.model_path)
        return
    pretrained = build_model(config.model)
    load_model_weights(pretrained, ckpt.model_path)
    target = backbone_of(model)
    source = pretrained.bert if config.model.family == "bert" and target is not model else pretrained
    target.load_state_dict(source.state_dict())


# ---------------------------------------------------------------------------------------------
# Optimisation


def param_groups(model: nn.Module, ft: FinetuneConfig) -> list[dict]:
    """Optimizer groups: per layer a peak lr of lr * layer_lr_decay**(L - layer), the head at head_lr;
    weight decay on matrices only. Each group's peak is kept as `peak_lr` for the schedule."""
    n_layer, backbone = model.config.n_layer, backbone_of(model)
    wrapped = backbone is not model  # a head beside the pretrained stack: what is not under backbone.
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():  # tied parameters appear once
        if not param.requires_grad:
            continue
        if wrapped and not name.startswith("backbone."):
            lr = ft.head_lr if ft.head_lr is not None else ft.lr
        else:  # every family's model says which layer a parameter belongs to (layer_of)
            # what sits on top of the blocks (final norm, pooler) trains at the top block's lr
            depth = min(backbone.layer_of(name.removeprefix("backbone.")), n_layer)
            lr = ft.lr * ft.layer_lr_decay ** (n_layer - depth)
        groups.setdefault((lr, param.dim() >= 2), []).append(param)
    return [{"params": params, "lr": lr, "peak_lr": lr, "weight_decay": ft.weight_decay if decay else 0.0}
            for (lr, decay), params in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1]))]


def lr_factor(step: int, total: int, warmup: float) -> float:
    """Linear warm-up over the first `warmup` fraction of the steps, then linear decay to 0 (BERT's schedule)."""
    warm = int(warmup * total)
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (total - step) / max(1, total - warm))


def _optimizer(model: nn.Module, ft: FinetuneConfig, device: torch.device) -> torch.optim.Optimizer:
    return optimizer_for(param_groups(model, ft), ft.optimizer, ft.lr, (0.9, 0.999), 1e-8, device)


# ---------------------------------------------------------------------------------------------
# Loss, evaluation, prediction


def task_loss(model: nn.Module, batch: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    if kind in STRUCTURED_KINDS or model.config.family == "t5":
        return kind_loss(model, batch, kind, model.config.family)
    if kind == "generation":
        return model(batch["input_ids"], labels=batch["labels"]).loss
    out = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]).float()
    if kind == "regression":
        return F.mse_loss(out.squeeze(-1), batch["labels"])
    return F.cross_entropy(out, batch["labels"])


@torch.no_grad()
def evaluate_task(model: nn.Module, items: Sequence[Encoded], task: TaskData, pad: int, device: torch.device,
                  precision: str = "fp32", batch_size: int = 64) -> dict[str, float]:
    """Dev metrics: val_loss, plus val_<metric> for each of the task's metrics (generation: val_ppl)."""
    was_training = model.training
    model.eval()
    kind = task.config.kind
    loss_sum, count, outputs = 0.0, 0, {}
    # Under torchrun each process scores every size-th batch. All run the same number of forward
    # passes (one with nothing left repeats the first batch and discards it): FSDP gathers the
    # weights in every pass, and a process that skipped one would leave its peers waiting.
    rank, size = rank_and_size()
    batches = length_sorted_batches(items, batch_size)
    mine = batches[rank::size]
    for pass_index in range(-(-len(batches) // size)):
        indices = mine[pass_index] if pass_index < len(mine) else None
        rows = [items[i] for i in (indices if indices is not None else batches[0])]
        batch = {k: v.to(device) for k, v in collate(rows, pad, kind == "regression").items()}
        with autocast(device, precision):
            if kind == "generation":
                out = model(batch["input_ids"], labels=batch["labels"])
            else:
                logits = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]).float()
        if indices is None:
            continue
        if kind == "generation":
            n = int((batch["labels"] != -100).sum())
            loss_sum, count = loss_sum + float(out.loss) * n, count + n
            continue
        if kind == "regression":
            loss_sum += float(F.mse_loss(logits.squeeze(-1), batch["labels"], reduction="sum"))
        else:
            loss_sum += float(F.cross_entropy(logits, batch["labels"], reduction="sum"))
        count += len(indices)
        for i, row in zip(indices, logits.cpu()):
            outputs[i] = row
    model.train(was_training)
    if size > 1:  # every process gets every part, so all compute the same metrics
        parts = all_gather_objects((loss_sum, count, outputs))
        loss_sum, count = sum(p[0] for p in parts), sum(p[1] for p in parts)
        outputs = {i: row for p in parts for i, row in p[2].items()}
    metrics = {"val_loss": loss_sum / max(1, count)}
    if kind == "generation":
        metrics["val_ppl"] = math.exp(min(metrics["val_loss"], 50.0))
        return metrics
    stacked = torch.stack([outputs[i] for i in range(len(items))])
    targets = np.asarray([item.target for item in items])
    preds = stacked.squeeze(-1).numpy() if kind == "regression" else stacked.argmax(-1).numpy()
    positive = task.positive_index if task.positive_index is not None else 1
    metrics.update({f"val_{k}": v for k, v in compute_metrics(task.config.metrics, preds, targets, positive).items()})
    return metrics


def evaluate_prepared(model: nn.Module, data: "Prepared | KindData", device: torch.device, ft: FinetuneConfig,
                      family: str) -> dict[str, float]:
    """Dev metrics of any task kind on its prepared dev split."""
    if isinstance(data, KindData):
        return evaluate_kind(model, data, device, ft.precision, family, ft.num_beams)
    return evaluate_task(model, data.dev, data.task, data.pad, device, ft.precision)


def selection_score(metrics: dict[str, float], config: TaskConfig) -> float:
    """Higher is better: the task's selection metric, or minus the dev loss for generation."""
    if config.kind == "generation":
        return -metrics["val_loss"]
    return metrics[f"val_{config.select_metric}"]


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass
class FinetuneResult:
    run_dir: Path
    step: int
    total_steps: int
    best_step: Optional[int] = None
    best: dict[str, float] = field(default_factory=dict)  # dev metrics of the best checkpoint
    stopped_early: bool = False
    interrupted_by: Optional[int] = None
    seconds: float = 0.0
    train_examples: int = 0


@dataclass
class Prepared:
    """A fine-tune's data, ready: the task, its encoded train (label budget applied) and dev splits."""

    task: TaskData
    tokenizer: Tokenizer  # the task tokenizer (template + truncation)
    train: list[Encoded]
    dev: list[Encoded]
    pad: int
    regression: bool = False

    def collate(self, rows: Sequence[Encoded]) -> dict[str, torch.Tensor]:
        return collate(rows, self.pad, self.regression)

    @staticmethod
    def targets(item: Encoded) -> float:
        """What the loss of one example averages over: its response tokens (generation), else the example."""
        return float(sum(t != IGNORE_INDEX for t in item.target)) if isinstance(item.target, list) else 1.0


def prepare_data(config: FinetuneRunConfig, tokenizer: Tokenizer,
                 task: Optional[TaskData] = None) -> "Prepared | KindData":
    """Load (or take) the task, apply the label budget, and encode both splits."""
    ft = config.finetune
    if config.task.kind in STRUCTURED_KINDS or config.model.family == "t5":
        return prepare_kind(config, tokenizer, ft.label_fraction)
    task = task or load_task(config.task)
    max_length = min(ft.max_length, config.model.block_size)
    train_examples: list[Example] = task.train
    if ft.label_fraction < 1.0:
        train_examples = subsample(task.train, ft.label_fraction, ft.seed)
    family = config.model.family
    if task.is_generation:
        encode = lambda examples: encode_generation(tokenizer, examples, max_length)  # noqa: E731
    else:
        tok = task_tokenizer(tokenizer, family, max_length)
        encode = lambda examples: encode_examples(tok, examples)  # noqa: E731
    return Prepared(task, tokenizer if task.is_generation else tok, encode(train_examples), encode(task.dev),
                    pad_id(tokenizer, family), task.is_regression)


def total_steps(ft: FinetuneConfig, num_train: int) -> int:
    return ft.steps if ft.steps > 0 else max(1, math.ceil(ft.epochs * steps_per_epoch(num_train, ft.batch_size)))


def finetune(config: FinetuneRunConfig, run_dir: Path, resume: bool = False, progress: bool = True,
             task: Optional[TaskData] = None) -> FinetuneResult:
    """Fine-tune (or continue fine-tuning) config's model on its task; writes run_dir. `task`: preloaded data.

    Under torchrun every process calls it; each trains on its part of every batch, rank 0 alone writes
    the run files, and the results are those of one process on the same batches.
    """
    started = time.time()
    ft = config.finetune
    world = world_from_env()
    device = resolve_rank_device(ft.device, world)
    batch_layout(ft.batch_size, ft.micro_batch_size, world.size, prefix="finetune")  # refuse bad input before work
    check_launch(config.parallel, config.model, device, world)
    run = RunDir(run_dir)
    owner = take_ownership(run, resume) if world.is_main else None
    try:
        with process_group(world, device) as mesh:
            return _finetune(config, run, resume, progress and world.is_main, task, world, device, mesh, started)
    finally:
        if owner is not None:
            owner.release()
            run.discard_if_unused()


def rank_micro_batches(indices: np.ndarray, rank: int, world_size: int, accum: int) -> list[np.ndarray]:
    """This process's micro-batches of a step's examples: its consecutive part, cut in `accum` pieces.
    A short last batch of an epoch gives near-equal pieces, some of which may be empty."""
    return np.array_split(np.array_split(indices, world_size)[rank], accum)


class FinetuneRecipe(Recipe):
    """The task's loss over shuffled labeled batches, scored on the dev set; the best dev checkpoint is kept."""

    def __init__(self, config: FinetuneRunConfig, data: "Prepared | KindData", model: nn.Module, world: World,
                 device: torch.device, mesh: Any):
        ft = config.finetune
        self.family = config.model.family
        self.ft, self.data, self.world, self.device, self.precision = ft, data, world, device, ft.precision
        self.kind = data.task.config.kind
        self.name, self.grad_clip, self.log_every = f"finetune {data.task.name}", ft.grad_clip, ft.log_every
        self.mixing = getattr(data, "mixing", None)  # a multi-task run's epochs: capped shares of each task
        epoch_size = self.mixing.epoch_size if self.mixing is not None else len(data.train)
        self.total_steps = total_steps(ft, epoch_size)
        self.per_epoch = steps_per_epoch(epoch_size, ft.batch_size)
        self.eval_every = ft.eval_every or self.per_epoch
        self.max_bad_steps = ft.max_bad_steps
        task_config = data.task.config
        self.keep = KeepPolicy(every=0, keep_last=ft.keep_checkpoints, patience=ft.patience,
                               score=lambda metrics: selection_score(metrics, task_config))
        self.micro, self.accum = batch_layout(ft.batch_size, ft.micro_batch_size, world.size, prefix="finetune")
        self.model = model.to(device)
        kind = self.kind
        self.train_model = parallelize(model, lambda m, batch: {"labels": task_loss(m, batch, kind)}, config.parallel,
                                       mesh, device, ft.precision)
        self.optimizer = _optimizer(model, ft, device)
        self.step_examples, self.steps_done = 0, 0

    def set_learning_rate(self, step: int) -> float:
        self.steps_done = step + 1
        factor = lr_factor(step, self.total_steps, self.ft.warmup)
        for group in self.optimizer.param_groups:
            group["lr"] = group["peak_lr"] * factor
        return self.ft.lr * factor

    def micro_batches(self, step: int) -> list[tuple[dict, dict[str, float]]]:
        train = self.data.train
        if self.mixing is not None:
            indices = self.mixing.batch_indices(self.ft.batch_size, self.ft.seed, step)
        else:
            indices = batch_indices(len(train), self.ft.batch_size, self.ft.seed, step)
        self.step_examples += len(indices)
        parts = []
        for part in rank_micro_batches(indices, self.world.rank, self.world.size, self.accum):
            count = float(sum(self.data.targets(train[i]) for i in part))
            if len(part) == 0:  # every process must run as many passes as the others: one that counts 0
                part = indices[:1]
            parts.append((self.data.collate([train[i] for i in part]), {"labels": count}))
        return parts

    def evaluate(self) -> dict[str, float]:
        # The processes share the dev set's batches; rank 0's scores decide for all.
        return broadcast_object(evaluate_prepared(self.model, self.data, self.device, self.ft, self.family))

    def throughput(self, steps: int, seconds: float) -> dict[str, float]:
        examples, self.step_examples = self.step_examples, 0
        return {"epoch": self.steps_done / self.per_epoch, "examples_per_s": examples / seconds if seconds > 0 else 0.0}

    def on_evaluated(self, step: int, metrics: dict[str, float], best: bool) -> None:
        shown = ", ".join(f"{k.removeprefix('val_')} {v:.4f}" for k, v in metrics.items())
        tqdm.write(f"step {step}: dev {shown}" + ("  (best)" if best else ""), file=sys.stderr)

    def save_state(self, state: TrainerState) -> None:
        state.total_steps = self.total_steps

    def rollback_command(self, run_dir: Path) -> str:
        return f"lmforge finetune --resume {run_dir} --set finetune.lr={self.ft.lr / 2:g}"


def _finetune(config: FinetuneRunConfig, run: RunDir, resume: bool, progress: bool, task: Optional[TaskData],
              world: World, device: torch.device, mesh: Any, started: float) -> FinetuneResult:
    ft = config.finetune
    restart = False
    if not resume:
        restart = run_on_main(run.check_new, "lmforge finetune --resume")
    elif not run_on_main(run.has_checkpoint):  # killed before its first checkpoint was whole
        restart, resume = True, False
    tokenizer_source = (run.path if resume else Path(config.base_run)) / TOKENIZER_FILE
    data = prepare_data(config, load_tokenizer(tokenizer_source), task)
    task = data.task
    if task.label_names:  # record the head's class order, so the run predicts without the data
        config.task.labels = task.label_names

    seed_everything(ft.seed)
    model = build_task_model(config.model, task.config.kind, task.num_outputs, ft.dropout, ft.pooling)
    if world.rank > 0:  # dropout masks of its own; rank 0 keeps the stream a single process would have
        seed_everything(derived_seed(ft.seed, world.rank))
    if not resume:
        if progress and restart:
            log.warning("warning: %s has no complete checkpoint (stopped before its first one was written); "
                        "starting it over from step 0", run.path)
        if ft.init == "pretrained":
            _initial_weights(config, model, task)
        if world.is_main:  # only now: a task that does not fit leaves nothing behind
            run.start("finetune", config, tokenizer_source, None)
    recipe = FinetuneRecipe(config, data, model, world, device, mesh)
    state = TrainerState()
    if resume:
        ckpt = resume_training_state(run.path, recipe.model, recipe.optimizer)
        state = ckpt.state
        rng_note = restore_rng_states(state.rng, world.rank, world.size, ft.seed, state.step)
        if progress:
            log.info(resume_note(run.path, ckpt.path.name, state.step, recipe.total_steps, rng_note))
    if progress:
        budget = f"{ft.label_fraction:.0%} of train: " if ft.label_fraction < 1 else ""
        layout = f" on {world.size} processes ({config.parallel.strategy})" if world.distributed else ""
        log.info(f"fine-tune {config.model.family} ({ft.init} init) on {task.name}: {budget}{len(data.train):,} "
                 f"examples, {recipe.total_steps} steps of {ft.batch_size}{layout}, dev {len(data.dev):,}")
        if recipe.mixing is not None:
            shares = ", ".join(f"{name} {n:,} ({rate:.1%})" for name, n, rate in _mixture_shares(data))
            log.info(f"mixed in proportion to size, at most {ft.mixing_cap:,} per task and epoch: {shares}")
    done = run_loop(recipe, run, state, world, progress, resumed=resume)
    state = done.state
    result = FinetuneResult(run.path, done.step, recipe.total_steps, best_step=state.best_step, best=state.best,
                            stopped_early=done.stopped_early, interrupted_by=done.interrupted_by,
                            train_examples=len(data.train))
    if not world.is_main:
        return result
    result.seconds = time.time() - started
    kind = task.config.kind
    best_name = step_name(state.best_step) if state.best_step is not None else None
    run.write_summary({"task": task.name, "kind": kind, "base_run": config.base_run, "init": ft.init,
                       "label_fraction": ft.label_fraction, "train_examples": len(data.train), "step": done.step,
                       "total_steps": recipe.total_steps, "best_checkpoint": best_name,
                       "select_metric": "loss" if kind == "generation" else task.config.select_metric,
                       "dev": {k.removeprefix("val_"): v for k, v in state.best.items()},
                       **({"counts": data.task.counts} if isinstance(data, KindData) else {}),
                       **({"tasks": {name: {"train_examples": n, "rate": rate} for name, n, rate in
                                     _mixture_shares(data)}} if recipe.mixing is not None else {}),
                       "stopped_early": result.stopped_early, "interrupted": result.interrupted_by is not None,
                       "seconds": round(result.seconds, 1)})
    return result


def _mixture_shares(data: KindData) -> list[tuple[str, int, float]]:
    """(task, train examples, share of each epoch) of a multi-task run."""
    assert data.parts is not None and data.mixing is not None
    return [(part.task.name, len(part.train), rate) for part, rate in zip(data.parts, data.mixing.rates())]


# ---------------------------------------------------------------------------------------------
# Using a fine-tuned run


@dataclass
class LoadedFinetune:
    config: FinetuneRunConfig
    tokenizer: Tokenizer
    model: nn.Module
    checkpoint: Checkpoint


def load_finetuned(run_dir: str | Path, checkpoint: Optional[str] = None,
                   device: str | torch.device = "cpu") -> LoadedFinetune:
    """A fine-tuned run's config, tokenizer and model (its best checkpoint by default), in eval mode."""
    run_dir = Path(run_dir)
    config = load_finetune_config(run_dir)
    tokenizer = load_tokenizer(run_dir / TOKENIZER_FILE)
    ckpt = best_checkpoint(run_dir) if checkpoint is None else find_checkpoint(run_dir, checkpoint)
    outputs = 1 if config.task.kind == "regression" else len(config.task.labels or [])
    if config.task.kind in ("span", "seq2seq"):
        outputs = 0
    model = build_task_model(config.model, config.task.kind, outputs, 0.0, config.finetune.pooling)
    load_model_weights(model, ckpt.model_path)
    model.to(device).eval()
    return LoadedFinetune(config, tokenizer, model, ckpt)


def evaluate_finetuned(run_dir: str | Path, checkpoint: Optional[str] = None, device: str = "auto",
                       progress: bool = False) -> tuple[LoadedFinetune, dict[str, float]]:
    """Dev metrics of a fine-tuned run's checkpoint, recomputed from the task's dev file."""
    dev = resolve_device(device)
    run = load_finetuned(run_dir, checkpoint, dev)
    if not run.config.task.path:  # an imported task model without --task
        raise LmforgeError(f"{run_dir} names no task data (task.path is empty); evaluate reads the task's dev split: "
                           f"import the model again with --task TASK_DIR")
    data = prepare_data(dataclasses.replace(run.config, finetune=dataclasses.replace(run.config.finetune,
                                                                                     label_fraction=1.0)),
                        run.tokenizer)
    return run, evaluate_prepared(run.model, data, dev, run.config.finetune, run.config.model.family)


@torch.no_grad()
def predict(run: LoadedFinetune, texts: Sequence[tuple[str, Optional[str]]],
            task: Optional[str] = None) -> list[dict[str, Any]]:
    """Per input: {label, probabilities} (classification), {score} (regression) or {response} (generation).
    task: which task of a multi-task run the inputs are for (its text prefix); default its first."""
    config, device = run.config, next(run.model.parameters()).device
    if task is not None:
        chosen = [t for t in config.tasks if t.name == task]
        if not chosen:
            raise LmforgeError(f"--task {task}: the run was fine-tuned on {', '.join(t.name for t in config.tasks)}")
        config = dataclasses.replace(config, task=chosen[0], extra_tasks=[])
    kind = config.task.kind
    if kind == "tokens":
        return predict_entities(run.model, run.tokenizer, config, [text for text, _ in texts])
    if kind == "span":
        if any(pair is None for _, pair in texts):
            raise LmforgeError(f"task {config.task.name} answers a question from a passage: give both, "
                               f'e.g. lmforge predict RUN "Who wrote it?" "It was written by ..."')
        return predict_answers(run.model, run.tokenizer, config, texts)
    if kind == "seq2seq":
        return predict_outputs(run.model, run.tokenizer, config, [text for text, _ in texts])
    if config.model.family == "t5":  # text-to-text: the decoded label word (or score)
        return predict_outputs(run.model, run.tokenizer, config, list(texts))
    max_length = min(config.finetune.max_length, config.model.block_size)
    if config.task.kind == "generation":
        out = []
        eos = eos_id(run.tokenizer)
        prompts = [prompt for prompt, _ in texts]
        encodings = run.tokenizer.encode_batch(prompts, add_special_tokens=False)
        warn_unknown(run.tokenizer, prompts, encodings, "the prompts")
        for prompt, encoding in zip(prompts, encodings):
            ids = encoding.ids[-(max_length - 1):] or [eos]
            room = max(0, config.model.block_size - len(ids))
            generated = generate(run.model, torch.tensor([ids], device=device),
                                 min(config.finetune.generate_tokens, room), temperature=0.0, stop_token=eos)
            out.append({"prompt": prompt, "response": decode_response(run.tokenizer, generated[0, len(ids):].tolist(),
                                                                      eos)})
        return out
    pair_task = config.task.text_pair is not None
    for text, pair in texts:
        if (pair is not None) != pair_task:
            raise LmforgeError(f"task {config.task.name} takes {'a pair of texts' if pair_task else 'one text'} "
                               f"per input; got {'two' if pair is not None else 'one'}")
    tok = task_tokenizer(run.tokenizer, config.model.family, max_length)
    items = encode_examples(tok, [Example(t, p, 0, "input") for t, p in texts])
    batch = {k: v.to(device) for k, v in collate(items, pad_id(run.tokenizer, config.model.family)).items()}
    logits = run.model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]).float().cpu()
    if config.task.kind == "regression":
        return [{"score": float(v)} for v in logits.squeeze(-1)]
    probs = torch.softmax(logits, -1)
    names = config.task.labels or []
    return [{"label": names[int(p.argmax())], "probabilities": {n: float(v) for n, v in zip(names, p)}} for p in probs]


def write_samples(run_dir: Path, device: torch.device, count: int = 8) -> None:
    """samples.jsonl: greedy responses of the best checkpoint to the first dev prompts, beside the references."""
    run = load_finetuned(run_dir, device=device)
    examples = load_task(run.config.task).dev[:count]
    answers = predict(run, [(e.text, None) for e in examples])
    lines = [json.dumps({"prompt": e.text, "reference": e.label, "response": a["response"]}) for e, a in
             zip(examples, answers)]
    (run_dir / "samples.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
