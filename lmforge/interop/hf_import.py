"""`lmforge import HF_DIR OUT`: a local transformers checkpoint becomes an lmforge run directory.

The run is what `lmforge pretrain` would have left at step 0 with these weights: config.yaml (model
fields from config.json; data and train sections from a recipe, the tokenizer fixed to the imported
one), tokenizer.json and checkpoints/step-000000 with the weights, a fresh optimizer state and the
data loader at its start. So `evaluate`, `generate`, `fill-mask` read it, and `pretrain --resume`
continues pretraining from it (warm-up from step 0, as a new run would). Heads the checkpoint lacks
are initialised as in a new model and reported. A BERT task model (sequence / token classification,
question answering) becomes a fine-tuned run instead: lmforge/interop/hf_import_task.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from lmforge.config import DEFAULT_RECIPE, Config, TokenizerConfig, config_from_dict, dump_config, read_yaml, resolve_recipe
from lmforge.fileio import building_directory
from lmforge.errors import LmforgeError
from lmforge.interop.hf import TASK_HEADS, architecture_of, config_from_hf, position_table, state_from_hf
from lmforge.interop.hf_import_task import describe_task_import, import_task_model
from lmforge.interop.hf_tokenizer import read_json
from lmforge.interop.hf_weights import checked_tokenizer, dtype_note, read_hf_weights
from lmforge.model.config import ModelConfig

# model keys an import may change: the rest is the checkpoint's (config.json)
ADJUSTABLE = {"dropout": "any value", "block_size": "at most the checkpoint's positions (the table is cut)"}


@dataclass
class Imported:
    out: Path
    architecture: str
    config: Any  # a Config; a FinetuneRunConfig for a task model
    parameters: int
    initialised: list[str] = field(default_factory=list)  # parts not in the checkpoint
    notes: list[str] = field(default_factory=list)


def _run_config(model: ModelConfig, tokenizer_path: Path, vocab: int, recipe: Optional[str],
                overrides: list[str], name: str, sentinels: int = 0) -> Config:
    """The run's Config: `model` from the checkpoint, data/train/mlm from the recipe, then --set overrides."""
    data = read_yaml(resolve_recipe(recipe or DEFAULT_RECIPE))
    data["name"] = name
    data["model"] = dataclasses.asdict(model)
    config = config_from_dict(data, overrides)
    for key in (f.name for f in dataclasses.fields(ModelConfig)):
        if getattr(config.model, key) != getattr(model, key) and key not in ADJUSTABLE:
            raise LmforgeError(f"model.{key} comes from the checkpoint's config.json ({getattr(model, key)!r}); "
                               f"an import may change only {', '.join(f'model.{k} ({v})' for k, v in ADJUSTABLE.items())}")
    if config.model.block_size > model.block_size and model.family != "t5":  # t5: relative positions, any length
        raise LmforgeError(f"model.block_size={config.model.block_size} exceeds the checkpoint's "
                           f"{model.block_size} position embeddings")
    # The run encodes its data with the imported tokenizer, never a newly trained one.
    config.data.tokenizer = TokenizerConfig(kind={"gpt": "bpe", "t5": "unigram"}.get(model.family, "wordpiece"),
                                            vocab_size=vocab, path=str(tokenizer_path), sentinels=sentinels)
    return config


def import_hf(directory: Path, out: Path, recipe: Optional[str] = None, overrides: Optional[list[str]] = None,
              task: Optional[str] = None) -> Imported:
    """Convert the transformers checkpoint in `directory` into an lmforge run directory `out`.

    recipe: the YAML recipe whose data / train / mlm sections the run uses (default: the built-in one);
    overrides: --set values, e.g. data.corpus=... or model.block_size=128. A BERT task model
    (TASK_HEADS) becomes a fine-tuned run instead (lmforge/interop/hf_import_task.py); task: the task
    directory or recipe it was trained for, which `evaluate` reads."""
    from lmforge.model import build_model
    from lmforge.train.checkpoint import TrainerState, save_checkpoint
    from lmforge.train.optim import build_optimizer
    from lmforge.train.rng import rng_state, seed_everything
    from lmforge.train.rundir import CONFIG_FILE, TOKENIZER_FILE, RunDir

    if not directory.is_dir():
        raise LmforgeError(f"not a directory: {directory}")
    if not (directory / "config.json").is_file():
        raise LmforgeError(f"no config.json in {directory}: not a transformers model directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LmforgeError(f"{out} already exists and is not empty; choose a new run directory")
    hf = read_json(directory / "config.json")
    t5 = hf.get("model_type") == "t5"
    if t5:
        from lmforge.interop.hf_t5 import ARCHITECTURE, t5_config_from_hf

        architecture, source_model = ARCHITECTURE, t5_config_from_hf(hf, str(directory / "config.json"))
    else:
        architecture = architecture_of(hf)
        if architecture in TASK_HEADS:
            if recipe is not None:
                raise LmforgeError(f"--config names a pretraining recipe; a {architecture} becomes a fine-tuned run: "
                                   f"name its task with --task TASK_DIR_OR_RECIPE")
            config, parameters, notes = import_task_model(directory, out, hf, architecture, task, overrides or [])
            return Imported(out, architecture, config, parameters, [], notes)
        source_model = config_from_hf(hf)
    if task is not None:
        raise LmforgeError(f"--task is for task models ({', '.join(TASK_HEADS)}); {architecture} is a pretraining "
                           f"model: import it, then lmforge finetune {out} --task {task}")
    tokenizer, notes = checked_tokenizer(directory, source_model.family, source_model.vocab_size)
    config = _run_config(source_model, out.resolve() / "tokenizer.json", tokenizer.get_vocab_size(), recipe,
                         overrides or [], directory.resolve().name, _sentinels(tokenizer) if t5 else 0)

    hf_state, weights_file = read_hf_weights(directory)
    notes += dtype_note(hf_state)
    seed_everything(config.train.seed)  # what a new run does first: the initialised heads are reproducible
    model = build_model(config.model)
    if t5:
        from lmforge.interop.hf_t5 import t5_state_from_hf

        model.load_state_dict({k: v.float() for k, v in
                               t5_state_from_hf(hf_state, source_model, str(directory / weights_file)).items()})
        missing: list[str] = []
    else:
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        position = position_table(source_model)
        if position is not None:
            shapes[position] = (source_model.block_size, source_model.d_model)  # as config.json says; cut below
        imported = state_from_hf(hf_state, source_model, shapes)
        if position is not None and config.model.block_size < source_model.block_size:
            imported.state[position] = imported.state[position][: config.model.block_size].clone()
            notes.append(f"position embeddings cut to the first {config.model.block_size} of "
                         f"{source_model.block_size}")
        model.load_state_dict(imported.state, strict=False)
        missing = imported.missing_parts
    optimizer = build_optimizer(model, config.train, torch.device("cpu"))

    with building_directory(out, "import") as tmp:
        dump_config(config, tmp / CONFIG_FILE)
        tokenizer.save(str(tmp / TOKENIZER_FILE))
        # a loader at its start (see data/loader.py)
        save_checkpoint(tmp / "checkpoints", model, optimizer, TrainerState(
            loader={"samples": 0, "seed": config.train.seed}, rng=rng_state(), config=config.to_dict()))
        RunDir(tmp).write_record("import", None, imported_from={
            "path": str(directory.resolve()), "architecture": architecture, "weights": weights_file,
            "initialised": missing, "notes": notes})
    return Imported(out, architecture, config, model.num_parameters(exclude_embeddings=False), missing, notes)


def _sentinels(tokenizer) -> int:
    """How many <extra_id_i> a T5 tokenizer has (0 when none)."""
    from lmforge.data.objectives.span import SpanVocab

    try:
        return SpanVocab.from_tokenizer(tokenizer).num_sentinels
    except LmforgeError:
        return 0


def describe(result: Imported) -> str:
    """What was imported, what was initialised, and how to go on: lines for the user."""
    c = result.config.model
    heads = f"{c.n_head} heads" + (f" sharing {c.kv_heads} key/value heads" if c.kv_heads != c.n_head else "")
    lines = [f"imported {result.architecture} ({c.n_layer} layers, {c.d_model} wide, {heads}, "
             f"vocab {c.vocab_size:,}, {result.parameters / 1e6:.2f}M parameters) -> {result.out}"]
    lines += [f"  note: {n}" for n in result.notes]
    if result.architecture in TASK_HEADS:
        return "\n".join(lines + describe_task_import(result.out, result.config))
    if result.initialised:
        lines.append(f"  not in the checkpoint, initialised at random: {', '.join(result.initialised)}"
                     + (" (fill-mask / MLM loss are meaningless until trained)" if "mlm head" in result.initialised else ""))
    lines.append(f"  continue pretraining: lmforge pretrain --resume {result.out} [--set train.steps=N ...]")
    return "\n".join(lines)
