"""Atomic checkpoints: safetensors weights + optimizer state + JSON trainer state, verified on load.

A checkpoint is written into a hidden temporary directory, every file fsynced, then renamed to
`step-NNNNNN`; `latest` (a one-line text file naming it) is replaced last. A crash at any instant
leaves the previous checkpoint valid and `latest` pointing at a complete one.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.data.store import sha256_file, write_atomic
from lmforge.errors import LmforgeError

STEP_DIR = re.compile(r"^step-(\d+)$")
MODEL_FILE, OPTIMIZER_FILE, STATE_FILE = "model.safetensors", "optimizer.pt", "trainer_state.json"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors for saving; a tensor tied to an earlier one (the LM head) is stored once."""
    seen: set[int] = set()
    state = {}
    for name, tensor in model.state_dict().items():
        key = tensor.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        state[name] = tensor.detach().to("cpu").contiguous()
    return state


def load_model_weights(model: nn.Module, path: Path) -> None:
    """Load safetensors weights into `model`, explaining any mismatch in words."""
    state = load_file(str(path))
    expected = model.state_dict()
    tied = set(expected) - set(model_state(model))
    missing = [k for k in expected if k not in state and k not in tied]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [f"{k} {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                   for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        parts = []
        if wrong_shape:
            parts.append("shape differs: " + "; ".join(wrong_shape[:4]))
        if missing:
            parts.append("missing: " + ", ".join(missing[:6]))
        if unexpected:
            parts.append("unexpected: " + ", ".join(unexpected[:6]))
        raise LmforgeError(f"checkpoint {path} does not fit this model ({' | '.join(parts)})")
    model.load_state_dict(state, strict=False)


def rng_state() -> dict[str, Any]:
    """Every global RNG, as JSON-able values (our data order never uses them, but user code might)."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()
    state = {
        "python": random.getstate(),
        "numpy": numpy_state,
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii"),
    }
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode("ascii") for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = dict(state["numpy"])
    numpy_state["state"] = {**numpy_state["state"], "key": np.asarray(numpy_state["state"]["key"], dtype=np.uint32)}
    np.random.set_state(numpy_state)
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)
                                      for s in state["cuda"]])


def step_dirs(root: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(root: Path, step: int, model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
                    trainer_state: dict[str, Any], keep_last: int = 0, keep_every: int = 0) -> Path:
    """Write checkpoint `step` under `root` atomically and point `latest` at it."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    for stale in root.glob(".step-*.tmp-*"):  # half-written by a process that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(model_state(model), str(tmp / MODEL_FILE), metadata={"format": "pt"})
        files = [MODEL_FILE]
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
            files.append(OPTIMIZER_FILE)
        for name in files:
            _fsync_file(tmp / name)
        state = {**trainer_state, "step": step, "files": {n: sha256_file(tmp / n) for n in files}}
        write_atomic(tmp / STATE_FILE, json.dumps(state).encode("utf-8"))
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. final == periodic): replace it whole
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        write_atomic(root / "latest", f"{final.name}\n".encode("utf-8"))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last > 0:
        for old in step_dirs(root)[:-keep_last]:
            if keep_every > 0 and int(STEP_DIR.match(old.name).group(1)) % keep_every == 0:
                continue  # a milestone kept for good (e.g. for later evaluation)
            shutil.rmtree(old, ignore_errors=True)
    return final


def verify_checkpoint(path: Path) -> Optional[str]:
    """None if the checkpoint is whole, else what is wrong with it."""
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        return f"{STATE_FILE} unreadable ({exc})"
    for name, digest in state.get("files", {}).items():
        if not (path / name).is_file():
            return f"{name} missing"
        if sha256_file(path / name) != digest:
            return f"{name} checksum mismatch"
    return None


@dataclass
class Checkpoint:
    path: Path
    state: dict[str, Any]

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    def optimizer_state(self) -> dict:
        # weights_only: the optimizer state is tensors and numbers; never unpickle arbitrary objects.
        return torch.load(self.path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)


def find_checkpoint(run_dir: Path, name: Optional[str] = None) -> Checkpoint:
    """The named checkpoint, or the newest complete one (falling back past corrupt ones, with a warning)."""
    root = run_dir / "checkpoints"
    if not run_dir.is_dir():
        raise LmforgeError(f"run directory not found: {run_dir}")
    if name is not None:
        path = root / name if not Path(name).is_dir() else Path(name)
        if not path.is_dir():
            names = ", ".join(p.name for p in step_dirs(root)) or "none"
            raise LmforgeError(f"no checkpoint {name!r} in {run_dir} (available: {names})")
        problem = verify_checkpoint(path)
        if problem:
            raise LmforgeError(f"checkpoint {path} is damaged: {problem}")
        return Checkpoint(path, json.loads((path / STATE_FILE).read_text(encoding="utf-8")))
    candidates = list(reversed(step_dirs(root)))
    latest_file = root / "latest"
    if latest_file.is_file():
        pointed = root / latest_file.read_text(encoding="utf-8").strip()
        if pointed in candidates:  # try what `latest` names first; newer ones can only be unreferenced
            candidates.remove(pointed)
            candidates.insert(0, pointed)
    for path in candidates:
        problem = verify_checkpoint(path)
        if problem is None:
            return Checkpoint(path, json.loads((path / STATE_FILE).read_text(encoding="utf-8")))
        print(f"warning: checkpoint {path} is damaged ({problem}); trying the previous one", file=sys.stderr)
    raise LmforgeError(f"no complete checkpoint in {run_dir}")
