"""A run directory on disk loaded back for use: its resolved config, tokenizer and a checkpoint's model,
the token store it trained on, and text sampled from it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from tokenizers import Tokenizer

from lmforge.config import Config, config_from_dict, read_yaml
from lmforge.data.tokenizer import eos_id, load_tokenizer
from lmforge.errors import LmforgeError
from lmforge.model import build_model
from lmforge.train.checkpoint import Checkpoint, find_checkpoint, load_model_weights
from lmforge.train.rundir import CONFIG_FILE, TOKENIZER_FILE, RunDir, open_recorded_store

__all__ = ["CONFIG_FILE", "TOKENIZER_FILE", "LoadedRun", "fill_text", "load_run", "load_run_config", "run_store",
           "sample_text"]


def load_run_config(run_dir: Path, overrides: Optional[list[str]] = None) -> Config:
    if not run_dir.is_dir():
        raise LmforgeError(f"run directory not found: {run_dir}")
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise LmforgeError(f"{run_dir} is not an lmforge run: {CONFIG_FILE} missing")
    RunDir(run_dir).record()  # refuses a run of a newer format
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


def run_store(run_dir: str | Path, config: Config, progress: bool = False) -> Any:
    """The token store the run trained on (its recorded one, else rebuilt from its corpus)."""
    return open_recorded_store(RunDir(run_dir), config.data, config.model.family, progress)


def sample_text(model: torch.nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int,
                device: torch.device, seed: int, temperature: float = 0.8, top_k: Optional[int] = 200,
                top_p: Optional[float] = None) -> str:
    """Decode a sampled continuation of `prompt` (prompt included)."""
    from lmforge.infer.generate import generate

    # An empty prompt starts from the end-of-text token: "a new document begins".
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids or [eos_id(tokenizer)]
    generator = torch.Generator(device=device).manual_seed(seed)
    out = generate(model, torch.tensor([ids], device=device), max_new_tokens, temperature=temperature,
                   top_k=top_k, top_p=top_p, generator=generator)
    return tokenizer.decode(out[0].tolist())


def fill_text(model: torch.nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int, device: torch.device,
              temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
              num_beams: int = 1, length_penalty: float = 1.0, early_stopping: bool = False,
              generator: Optional[torch.Generator] = None) -> str:
    """A t5 model's answer to `prompt`, for people: a line per sentinel of the prompt with the span the
    model wrote for it, then the prompt with the spans filled in; for a prompt without sentinels, the
    text the model writes."""
    from lmforge.data.objectives.span import SENTINEL, SpanVocab
    from lmforge.infer.seq2seq import fill_spans, generate_seq2seq

    vocab = SpanVocab.from_tokenizer(tokenizer)
    ids = tokenizer.encode(prompt).ids  # ends with </s>, as the encoder read its inputs in pretraining
    out = generate_seq2seq(model, torch.tensor([ids], device=device), None, max_new_tokens, temperature, top_k,
                           top_p, generator, num_beams, length_penalty, early_stopping, eos_id=vocab.eos)[0].tolist()
    sentinels = [t for t in ids if vocab.is_sentinel(t)]
    if not sentinels:
        return tokenizer.decode(out)
    lines = [f"{SENTINEL.format(vocab.sentinel_start - s)}: {tokenizer.decode(fill_spans([s], out, vocab))!r}"
             for s in sentinels]
    return "\n".join([*lines, tokenizer.decode(fill_spans(ids, out, vocab))])


def sample_run(run_dir: str | Path, device: str | torch.device = "cpu") -> Optional[str]:
    """The end-of-pretraining sample of a run's final checkpoint (train.sample_prompt / sample_tokens):
    a continuation for decoders, the [MASK] fill for encoders, the spans of the prompt's sentinels for
    encoder-decoders (greedy); None when the recipe asks for none."""
    from lmforge.infer.fill_mask import describe as describe_fill_mask
    from lmforge.infer.fill_mask import fill_mask

    run = load_run(run_dir, device=device)
    tc = run.config.train
    if tc.sample_tokens <= 0:
        return None
    device = torch.device(device)
    if run.config.model.family == "bert":
        if "[MASK]" not in tc.sample_prompt:
            return None
        return tc.sample_prompt + "\n" + describe_fill_mask(fill_mask(run.model, run.tokenizer, tc.sample_prompt,
                                                                      top_k=5, device=device))
    if run.config.model.family == "t5":
        return tc.sample_prompt + "\n" + fill_text(run.model, run.tokenizer, tc.sample_prompt, tc.sample_tokens, device)
    return sample_text(run.model, run.tokenizer, tc.sample_prompt, tc.sample_tokens, device, seed=tc.seed)
