import os
from pathlib import Path

import pytest

TEXT = (
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.\n"
    "All that glitters is not gold. Where there is a will there is a way. Time and tide wait for no man.\n"
)


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
