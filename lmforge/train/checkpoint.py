"""Atomic checkpoints: safetensors weights + optimizer state + JSON trainer state, verified on load.

A checkpoint is written into a hidden temporary directory, every file fsynced, then renamed to
`step-NNNNNN`; `latest` (a one-line text file naming it) is replaced last. A crash at any instant
leaves the previous checkpoint valid and `latest` pointing at a complete one.

One process writes model.safetensors (whole weights) + optimizer.pt. A run of several processes
writes `dcp/` instead of optimizer.pt: model and optimizer state through torch.distributed.checkpoint,
each process writing its own shards (FSDP) or one copy of each replicated tensor (DDP); rank 0 also
writes whole weights to model.safetensors, which is what evaluate, generate, export and finetune
read. A checkpoint of either kind resumes with any number of processes. trainer_state.json holds
every process's RNG states.
"""

from __future__ import annotations

import base64
import io
import json
import os
import pickle
import random
import re
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.data.store import sha256_file, write_atomic
from lmforge.errors import LmforgeError
from lmforge.train.distributed import all_gather_objects, is_distributed, is_main, raise_together

STEP_DIR = re.compile(r"^step-(\d+)$")
MODEL_FILE, OPTIMIZER_FILE, STATE_FILE = "model.safetensors", "optimizer.pt", "trainer_state.json"
DCP_DIR = "dcp"  # torch.distributed.checkpoint's files: model and optimizer state of a multi-process run


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


def tied_parameters(model: nn.Module) -> dict[str, str]:
    """Names of parameters that are another, earlier-named parameter (the tied LM head) -> that name."""
    first: dict[int, str] = {}
    tied = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            tied[name] = first[id(param)]
        else:
            first[id(param)] = name
    return tied


def _check_fits(state: dict[str, torch.Tensor], model: nn.Module, path: Path) -> None:
    """Explain in words how the tensors in `state` (tied ones left out) do not fit `model`, if they do not."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = tied_parameters(model)
    missing = [k for k in expected if k not in state and k not in tied]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [f"{k} {tuple(state[k].shape)} vs model {expected[k]}"
                   for k in state if k in expected and tuple(state[k].shape) != expected[k]]
    if missing or unexpected or wrong_shape:
        parts = []
        if wrong_shape:
            parts.append("shape differs: " + "; ".join(wrong_shape[:4]))
        if missing:
            parts.append("missing: " + ", ".join(missing[:6]))
        if unexpected:
            parts.append("unexpected: " + ", ".join(unexpected[:6]))
        raise LmforgeError(f"checkpoint {path} does not fit this model ({' | '.join(parts)})")


def load_model_weights(model: nn.Module, path: Path) -> None:
    """Load safetensors weights into `model`, explaining any mismatch in words."""
    state = load_file(str(path))
    _check_fits(state, model, path)
    model.load_state_dict(state, strict=False)


def whole_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole tensors on the CPU, a tied tensor stored once: what model.safetensors holds.

    With several processes every process must call it (FSDP gathers the shards); rank 0 gets the
    tensors, the others an empty dict.
    """
    if not is_distributed():
        return model_state(model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    tied = tied_parameters(model)
    return {k: v.detach().contiguous() for k, v in full.items() if k not in tied}


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derived_seed(seed: int, *keys: int) -> int:
    """A seed for the stream named by (seed, *keys), e.g. (seed, rank): independent of every other one."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1, dtype=np.uint64)[0] % 2**63)


def all_rng_states() -> Any:
    """What trainer_state.json keeps as "rng": this process's states, or with several processes a list
    of every process's, in rank order. Every process must call it."""
    states = all_gather_objects(rng_state())
    return states[0] if len(states) == 1 else states


def restore_rng_states(saved: Any, rank: int, world_size: int, seed: int, step: int) -> Optional[str]:
    """Restore this process's RNG states from a checkpoint's "rng" (see all_rng_states).

    Written by as many processes as there are now, each takes its own back exactly. Otherwise there is
    no state that belongs to this process: the streams are re-derived from (seed, step, rank), and the
    returned line says so.
    """
    states = saved if isinstance(saved, list) else [saved]
    if len(states) == world_size:
        set_rng_state(states[rank])
        return None
    seed_everything(derived_seed(seed, step, rank))
    return (f"the checkpoint holds the RNG states of {len(states)} process{'es' if len(states) > 1 else ''} "
            f"and this run has {world_size}: RNG streams re-derived from (seed, step, rank)")


def step_dirs(root: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(root: Path, step: int, model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
                    trainer_state: dict[str, Any], keep_last: int = 0, keep_every: int = 0) -> Path:
    """Write checkpoint `step` under `root` atomically and point `latest` at it.

    With several processes every process must call it (they write `dcp/` together; rank 0 the rest).
    model: the plain or FSDP-sharded model, not a DDP wrapper.
    """
    final = root / f"step-{step:06d}"
    tmp = root / f".{final.name}.tmp"  # the same name in every process
    error: Optional[BaseException] = None
    if is_main():
        try:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(".step-*.tmp*"):  # half-written by a process that was killed
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        except OSError as exc:
            error = exc
    raise_together(error)
    try:
        if is_distributed():
            _save_sharded(tmp / DCP_DIR, model, optimizer)
            optimizer = None  # its state is in dcp/
        weights = whole_weights(model)
        error = None
        if is_main():
            try:
                _write_and_publish(tmp, final, weights, optimizer, {**trainer_state, "step": step})
            except OSError as exc:
                error = exc
        raise_together(error)
    except BaseException:
        if is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last > 0 and is_main():
        for old in step_dirs(root)[:-keep_last]:
            if keep_every > 0 and int(STEP_DIR.match(old.name).group(1)) % keep_every == 0:
                continue  # a milestone kept for good (e.g. for later evaluation)
            shutil.rmtree(old, ignore_errors=True)
    return final


def _save_sharded(path: Path, model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    dcp.save(state, checkpoint_id=path)


def _write_and_publish(tmp: Path, final: Path, weights: dict[str, torch.Tensor],
                       optimizer: Optional[torch.optim.Optimizer], trainer_state: dict[str, Any]) -> None:
    """Rank 0's part: the weights file (and optimizer.pt), checksums of every file, the rename, `latest`."""
    save_file(weights, str(tmp / MODEL_FILE), metadata={"format": "pt"})
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
    files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    for name in files:
        _fsync_file(tmp / name)
    state = {**trainer_state, "files": {n: sha256_file(tmp / n) for n in files}}
    write_atomic(tmp / STATE_FILE, json.dumps(state).encode("utf-8"))
    for directory in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
        _fsync_dir(directory)
    if final.exists():  # re-saving the same step (e.g. final == periodic): replace it whole
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    write_atomic(final.parent / "latest", f"{final.name}\n".encode("utf-8"))


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

    @property
    def sharded(self) -> bool:
        """Written by several processes: model and optimizer state are in dcp/."""
        return (self.path / DCP_DIR).is_dir()

    def optimizer_state(self) -> dict:
        # weights_only: the optimizer state is tensors and numbers; never unpickle arbitrary objects.
        return torch.load(self.path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)


def load_training_state(ckpt: Checkpoint, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Model weights and optimizer state from a checkpoint written by any number of processes, into
    this run of any number of processes. model: plain or FSDP-sharded, not a DDP wrapper."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)

    if ckpt.sharded:
        import torch.distributed.checkpoint as dcp

        # DCP reads the parts of each saved tensor that this process holds, whatever the saved layout.
        state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
        _check_dcp_metadata(ckpt.path / DCP_DIR)
        with warnings.catch_warnings():  # in one process DCP says that it loads in one process: as intended
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=ckpt.path / DCP_DIR, planner=_weights_only_planner())
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
    elif not is_distributed():
        load_model_weights(model, ckpt.model_path)
        optimizer.load_state_dict(ckpt.optimizer_state())
    else:  # whole tensors written by one process: every process takes its part of each
        weights = load_file(str(ckpt.model_path))
        _check_fits(weights, model, ckpt.model_path)
        weights.update({name: weights[source] for name, source in tied_parameters(model).items()})
        whole = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, weights, options=whole)
        set_optimizer_state_dict(model, optimizer, _optimizer_state_by_name(ckpt.optimizer_state(), model, optimizer),
                                 options=whole)


# What a DCP .metadata file may name when unpickled: DCP's own metadata records, torch sizes, dtypes
# and layouts, paths. Anything else (a crafted file) is refused instead of run.
_DCP_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
     ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_METADATA_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                      torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's DCP metadata")


def _check_dcp_metadata(path: Path) -> None:
    """Unpickle DCP's .metadata with an allow-list first, so that DCP's own unrestricted read of it
    only ever sees a file of metadata records."""
    with open(path / ".metadata", "rb") as fh:
        try:
            _MetadataUnpickler(fh).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as exc:
            raise LmforgeError(f"{path / '.metadata'}: refused ({exc})") from None


def _weights_only_planner() -> Any:
    """DCP's default load planner, except that its non-tensor values (optimizer settings: numbers,
    flags, lists) must load with torch.load(weights_only=True); DCP itself would unpickle anything."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            torch.load(value, weights_only=True)  # raises on anything but plain values
            value.seek(0)
            super().load_bytes(read_item, value)

    return Planner()


def _optimizer_state_by_name(saved: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() numbers parameters in the optimizer's order; name them instead, as
    torch.distributed.checkpoint.state_dict wants. The optimizer is built the same way in every run,
    so its order today is the order the state was saved in."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    return {"state": {order[int(i)]: s for i, s in saved["state"].items()},
            "param_groups": [{**g, "params": [order[int(i)] for i in g["params"]]} for g in saved["param_groups"]]}


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
