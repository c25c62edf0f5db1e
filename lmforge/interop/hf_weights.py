"""The weights of a transformers model directory: safetensors (sharded or not) or plain-tensor .bin files."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lmforge.errors import LmforgeError
from lmforge.interop.hf_tokenizer import read_json

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        # weights_only: a .bin is a pickle; never run the code a pickle can carry
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[-1].strip() if str(exc).strip() else type(exc).__name__
        raise LmforgeError(f"{path} holds more than tensors and was not loaded: torch.load(weights_only=True) "
                           f"refuses it ({first}); lmforge reads only plain tensors (safetensors, or a .bin of "
                           f"tensors). Convert it to model.safetensors where you trust its source.") from None
    except (OSError, RuntimeError, EOFError) as exc:
        raise LmforgeError(f"{path} is not a readable PyTorch weights file ({exc})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LmforgeError(f"{path} is not a state dict (a mapping of names to tensors)")
    return state


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".bin":
        return _load_bin(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise LmforgeError(f"{path} is not a readable safetensors file ({exc})") from None


def read_hf_weights(directory: Path) -> tuple[dict[str, torch.Tensor], str]:
    """A transformers directory's weights (safetensors preferred; shards joined) and the file they came from."""
    for name in WEIGHT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return _load_file(path), name
        shards = sorted(set(read_json(path).get("weight_map", {}).values()))
        if not shards:
            raise LmforgeError(f"{path} lists no weight files (weight_map)")
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            if not (directory / shard).is_file():
                raise LmforgeError(f"{path} names {shard}, which is not in {directory}")
            state.update(_load_file(directory / shard))
        return state, name
    present = ", ".join(sorted(p.name for p in directory.iterdir() if p.is_file())) or "no files"
    raise LmforgeError(f"no PyTorch weights in {directory} (found: {present}); supported: "
                       f"{', '.join(WEIGHT_FILES)}")


def checked_tokenizer(directory: Path, family: str, vocab_size: int):
    """The directory's tokenizer (and notes for the user), refused when it has more tokens than the model embeddings."""
    from lmforge.interop.hf_tokenizer import read_hf_tokenizer

    tokenizer, notes = read_hf_tokenizer(directory, family)
    if tokenizer.get_vocab_size() > vocab_size:
        raise LmforgeError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the model only "
                           f"{vocab_size} embeddings (config.json vocab_size)")
    return tokenizer, notes


def dtype_note(state: dict[str, torch.Tensor]) -> list[str]:
    """A note for the user when the weights are not all float32 (lmforge converts them)."""
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in state.values() if t.is_floating_point()})
    return [] if dtypes == ["float32"] else [f"weights converted from {', '.join(dtypes)} to float32"]
