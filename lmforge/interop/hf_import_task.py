"""`lmforge import` of a transformers BERT task model: a fine-tuned run, as `lmforge finetune` leaves one.

BertForSequenceClassification, BertForTokenClassification and BertForQuestionAnswering become runs of
task.kind classification (or regression), tokens and span: config.yaml (a FinetuneRunConfig: the model
from config.json, the task from --task or from config.json's labels alone, the finetune section from
the task recipe and --set), tokenizer.json, and checkpoints/step-000000 holding the weights. So
`predict` reads it, `evaluate` too when the task's data is named (--task), and `finetune` takes it as
a base run (its head kept when the task's labels match).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from lmforge.config import apply_overrides, from_dict
from lmforge.errors import LmforgeError
from lmforge.interop.hf import TASK_HEADS, bert_task_layout, config_from_hf, state_from_hf
from lmforge.interop.hf_weights import checked_tokenizer, dtype_note, read_hf_weights
from lmforge.tasks.config import DEFAULT_STRIDE, FinetuneRunConfig, TaskConfig, recipe_finetune, resolve_task_config


def task_kind(hf: dict[str, Any], architecture: str) -> str:
    """The task kind a transformers task class's config.json describes."""
    if architecture == "BertForQuestionAnswering":
        return "span"
    if architecture == "BertForTokenClassification":
        return "tokens"
    problem = hf.get("problem_type")
    if problem == "multi_label_classification":
        raise LmforgeError("config.json problem_type='multi_label_classification': lmforge classifiers pick one "
                           "label per input (supported: single_label_classification, regression)")
    return "regression" if problem == "regression" or hf.get("num_labels", len(hf.get("id2label") or {})) == 1 \
        else "classification"


def label_names(hf: dict[str, Any], kind: str) -> list[str]:
    """The head's class names in index order, from config.json's id2label ([] for span and regression)."""
    if kind in ("span", "regression"):
        return []
    id2label = hf.get("id2label")
    if not isinstance(id2label, dict) or not id2label:
        raise LmforgeError("config.json has no id2label: a classification head needs its label names")
    try:
        order = sorted((int(k), str(v)) for k, v in id2label.items())
    except (TypeError, ValueError):
        raise LmforgeError(f"config.json id2label keys must be class indices, got {list(id2label)}") from None
    if [i for i, _ in order] != list(range(len(order))):
        raise LmforgeError(f"config.json id2label must number the classes 0..{len(order) - 1}, got "
                           f"{[i for i, _ in order]}")
    names = [name for _, name in order]
    if len(set(names)) != len(names):
        raise LmforgeError(f"config.json id2label names a label twice: {names}")
    if "num_labels" in hf and hf["num_labels"] != len(names):
        raise LmforgeError(f"config.json num_labels={hf['num_labels']} but id2label names {len(names)} labels")
    return names


def _split_overrides(overrides: Sequence[str], architecture: str) -> tuple[list[str], list[str]]:
    """--set values for the task (task.KEY) and for the run (name, finetune.KEY, parallel.KEY)."""
    task, run = [], []
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        if key.startswith("task."):
            task.append(text.strip().removeprefix("task."))
        elif key == "name" or key.startswith(("finetune.", "parallel.")):
            run.append(text)
        else:
            raise LmforgeError(f"--set {text!r}: importing a {architecture} takes task.KEY=..., finetune.KEY=..., "
                               f"parallel.KEY=... or name=... (the model comes from config.json)")
    return task, run


def _task_config(task: Optional[str], kind: str, labels: list[str], name: str, overrides: list[str],
                 architecture: str, data_root: Optional[str]) -> TaskConfig:
    """The run's task: --task's (checked against the head), or one made of config.json's labels alone."""
    if task is None:
        data: dict[str, Any] = {"name": name, "kind": kind, "labels": labels or None}
        if kind == "tokens" and any(label.startswith(("S-", "E-")) for label in labels):
            data["scheme"] = "BIOES"
        return from_dict(TaskConfig, apply_overrides(data, overrides), "task")
    config = resolve_task_config(task, data_root, overrides)
    allowed = TASK_HEADS[architecture].kinds
    if config.kind not in allowed:
        raise LmforgeError(f"--task {task} is a {config.kind} task; the {architecture} checkpoint holds a "
                           f"{' / '.join(allowed)} head")
    if config.kind != kind:
        raise LmforgeError(f"--task {task} is a {config.kind} task; the checkpoint's head is a {kind} head "
                           f"(config.json problem_type / num_labels)")
    if labels and config.labels is not None and config.labels != labels:
        raise LmforgeError(f"--task {task} names the labels {config.labels}; the checkpoint's head predicts "
                           f"{labels} (config.json id2label), in this order")
    if labels:
        config.labels = labels
    return config


def task_run_config(directory: Path, hf: dict[str, Any], architecture: str, weights_file: str,
                    task: Optional[str] = None, overrides: Sequence[str] = (),
                    data_root: Optional[str] = None) -> FinetuneRunConfig:
    """The imported run's config.yaml: the model from config.json, the task, and the finetune section."""
    kind = task_kind(hf, architecture)
    labels = label_names(hf, kind)
    task_overrides, run_overrides = _split_overrides(overrides, architecture)
    task_config = _task_config(task, kind, labels, directory.resolve().name, task_overrides, architecture, data_root)
    # without a task recipe, a span model reads SQuAD's usual 384-token windows (BERT's SQuAD fine-tunes)
    finetune = recipe_finetune(task) if task is not None else ({"max_length": 384} if kind == "span" else {})
    data: dict[str, Any] = {"name": task_config.name, "base_run": str(directory.resolve()),
                            "base_checkpoint": weights_file, "model": {}, "task": {}, "finetune": finetune}
    apply_overrides(data, run_overrides)
    config = from_dict(FinetuneRunConfig, data)
    config.model, config.task = config_from_hf(hf), task_config
    if task_config.stride is None and kind in DEFAULT_STRIDE:
        # no task directory to validate (which fills the default in): the default, kept below half a window
        length = min(config.finetune.max_length, config.model.block_size)
        task_config.stride = min(DEFAULT_STRIDE[kind], length // 2)
    config.finetune.validate()
    config.parallel.validate("parallel")
    config.model.dropout = config.finetune.dropout  # as plan_finetune: the fine-tune's dropout is the model's
    config.model.validate("model")
    return config


def import_task_model(directory: Path, out: Path, hf: dict[str, Any], architecture: str,
                      task: Optional[str] = None, overrides: Sequence[str] = (),
                      data_root: Optional[str] = None) -> tuple[FinetuneRunConfig, int, list[str]]:
    """Convert the transformers task model in `directory` into a fine-tuned run `out`. Returns its
    config, its number of parameters and notes for the user."""
    from lmforge.fileio import building_directory
    from lmforge.tasks.models import build_task_model
    from lmforge.train.checkpoint import TrainerState, save_checkpoint
    from lmforge.train.rng import seed_everything
    from lmforge.train.rundir import TOKENIZER_FILE, RunDir

    hf_state, weights_file = read_hf_weights(directory)
    config = task_run_config(directory, hf, architecture, weights_file, task, overrides, data_root)
    tokenizer, notes = checked_tokenizer(directory, "bert", config.model.vocab_size)
    notes += dtype_note(hf_state)
    kind = config.task.kind
    outputs = {"span": 2, "regression": 1}.get(kind, len(config.task.labels or []))
    seed_everything(config.finetune.seed)  # the per-token classes have no pooler: ours (unused) is seeded
    model = build_task_model(config.model, kind, outputs, config.finetune.dropout, "cls")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    imported = state_from_hf(hf_state, config.model, shapes,
                             bert_task_layout(config.model.n_layer, architecture, with_pooler=True))
    model.load_state_dict(imported.state, strict=False)
    model.eval()

    with building_directory(out, "import") as tmp:
        run = RunDir(tmp)
        run.write_config(config)
        tokenizer.save(str(tmp / TOKENIZER_FILE))
        save_checkpoint(tmp / "checkpoints", model, None, TrainerState(config=config.to_dict()))
        run.write_record("import", None, imported_from={
            "path": str(directory.resolve()), "architecture": architecture, "weights": weights_file,
            "task": config.task.path or None, "notes": notes})
    # the per-token models' unused pooler is not reported as initialised: they compute without it
    return config, sum(p.numel() for p in model.parameters()), notes


def describe_task_import(out: Path, config: FinetuneRunConfig) -> list[str]:
    """How to use an imported task model: lines for the user."""
    kind, task = config.task.kind, config.task
    example = ' "QUESTION" "PASSAGE"' if kind == "span" else ' "TEXT"'
    lines = [f"  a fine-tuned {kind} run" + (f" with labels {', '.join(task.labels)}" if task.labels else ""),
             f"  predict: lmforge predict {out}{example}"]
    if task.path:
        lines.append(f"  evaluate on {task.path}: lmforge evaluate {out}")
    else:
        lines.append("  evaluate reads the task's dev split: import with --task TASK_DIR to name it")
    lines.append(f"  fine-tune further: lmforge finetune {out} --task TASK_DIR")
    return lines
