"""A run directory on disk: its resolved config, tokenizer and checkpoints, loaded back as a model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from tokenizers import Tokenizer

from lmforge.config import Config, config_from_dict, read_yaml
from lmforge.data.tokenizer import load_tokenizer
from lmforge.errors import LmforgeError
from lmforge.model import build_model
from lmforge.train.checkpoint import Checkpoint, find_checkpoint, load_model_weights

CONFIG_FILE, TOKENIZER_FILE = "config.yaml", "tokenizer.json"


def load_run_config(run_dir: Path, overrides: Optional[list[str]] = None) -> Config:
    if not run_dir.is_dir():
        raise LmforgeError(f"run directory not found: {run_dir}")
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise LmforgeError(f"{run_dir} is not an lmforge run: {CONFIG_FILE} missing")
    return config_from_dict(read_yaml(path), overrides)


@dataclass
class LoadedRun:
    config: Config
    tokenizer: Tokenizer
    model: torch.nn.Module
    checkpoint: Checkpoint


def load_run(run_dir: str | Path, checkpoint: Optional[str] = None, device: str | torch.device = "cpu") -> LoadedRun:
    """Config, tokenizer and model weights of a run's newest (or named) checkpoint, in eval mode."""
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    tokenizer = load_tokenizer(run_dir / TOKENIZER_FILE)
    found = find_checkpoint(run_dir, checkpoint)
    model = build_model(config.model)
    load_model_weights(model, found.model_path)
    model.to(device).eval()
    return LoadedRun(config, tokenizer, model, found)
