import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

TEXT = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.\n"
    "All that glitters is not gold. Where there is a will there is a way. Time and tide wait for no man.\n"
)

REPO = Path(__file__).resolve().parent.parent


def load_bench(name: str):
    """A script of bench/ as a module, e.g. load_bench("linear_probe").main([...])."""
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own token-store cache, so tests never see each other's data."""
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    torch_threads = os.environ.get("LMFORGE_TEST_THREADS")
    if torch_threads:
        import torch

        torch.set_num_threads(int(torch_threads))


@pytest.fixture
def corpus_file(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT * 40, encoding="utf-8")
    return path


def tiny_config_dict(corpus: Path, **train) -> dict:
    """A config small enough to train in a second or two on a CPU."""
    return {
        "name": "tiny",
        "data": {"corpus": [str(corpus)], "tokenizer": {"kind": "char"},
                 "split": {"by": "tail", "val_fraction": 0.1}},
        "model": {"n_layer": 2, "n_head": 2, "d_model": 32, "block_size": 16},
        "train": {"steps": 30, "batch_size": 8, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 5,
                  "eval_every": 15, "eval_batches": 2, "checkpoint_every": 10, "log_every": 1,
                  "sample_tokens": 20, **train},
    }


def incremental_logits_error(model, seq, prefix: int = 5) -> float:
    """Largest difference between a decoder's logits for `seq` in one pass and fed token by token after
    `prefix` tokens through its KV cache."""
    full = model(seq).logits
    out = model(seq[:, :prefix], use_cache=True)
    logits, past = [out.logits], out.past
    for t in range(prefix, seq.shape[1]):
        out = model(seq[:, t:t + 1], past=past, use_cache=True)
        logits.append(out.logits)
        past = out.past
    import torch

    return (torch.cat(logits, dim=1) - full).abs().max().item()


def sentence_documents(path: Path, documents: int = 120) -> Path:
    """JSONL documents of 3-7 six-word sentences over a 13-word vocabulary (a tiny BERT's corpus)."""
    import numpy as np

    rng = np.random.default_rng(0)
    words = "red green blue cat dog bird runs sleeps eats the a big small".split()
    with open(path, "w") as fh:
        for _ in range(documents):
            sentences = [" ".join(rng.choice(words, size=6)).capitalize() + "." for _ in range(int(rng.integers(3, 8)))]
            fh.write(json.dumps({"text": " ".join(sentences)}) + "\n")
    return path


def step_losses(run_dir: Path) -> dict:
    """{step: training loss} from a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def assert_resume_reproduces(full: Path, copy: Path, died_after: int, last: int) -> None:
    """Copy a finished pretraining run as if it had died right after its step-`died_after` checkpoint (the
    step-`last` one gone, `latest` pointing back), resume it, and check it ends bit-identical to `full`:
    the same per-step losses (none logged twice) and the same final weights."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from lmforge.cli import main

    shutil.copytree(full, copy)
    shutil.rmtree(copy / "checkpoints" / f"step-{last:06d}")
    (copy / "checkpoints" / "latest").write_text(f"step-{died_after:06d}\n")
    assert main(["pretrain", "--resume", str(copy)]) == 0
    assert step_losses(copy) == step_losses(full)
    a, b = (load_file(str(run / f"checkpoints/step-{last:06d}/model.safetensors")) for run in (full, copy))
    assert all(torch.equal(a[k], b[k]) for k in a)
