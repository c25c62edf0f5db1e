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

import dataclasses
import io
import json
import logging
import os
import pickle
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.fileio import describe_os_error, fsync_dir, fsync_file, is_write_failure, sha256_file, write_atomic
from lmforge.train.distributed import all_reduce_sum, is_distributed, is_main, raise_together

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d+)$")
MODEL_FILE, OPTIMIZER_FILE, STATE_FILE = "model.safetensors", "optimizer.pt", "trainer_state.json"
DCP_DIR = "dcp"  # torch.distributed.checkpoint's files: model and optimizer state of a multi-process run


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


STATE_FORMAT = 1  # trainer_state.json's format; 0 = written before it carried one (read the same way)


@dataclass
class TrainerState:
    """Where a run stands at a checkpoint: what trainer_state.json holds, beside the weights.

    One writer (save_checkpoint) and one reader (Checkpoint.state): pretraining fills the loader
    position and tokens seen, fine-tuning the planned steps and the best dev score so far.
    """

    step: int = 0
    tokens_seen: int = 0
    bad_steps_total: int = 0  # updates skipped for a non-finite loss or gradient norm
    loader: Optional[dict[str, Any]] = None  # the training loader's position (pretraining)
    total_steps: Optional[int] = None  # the planned number of steps (fine-tuning: derived from the data)
    best_step: Optional[int] = None
    best_score: Optional[float] = None
    best: dict[str, float] = field(default_factory=dict)  # dev metrics at best_step
    since_best: int = 0  # evaluations since the best one (early stopping)
    rng: Any = None  # every process's RNG states (lmforge.train.rng.all_rng_states)
    config: Optional[dict[str, Any]] = None  # the resolved config the run had at this step

    def to_json(self, files: dict[str, str]) -> dict[str, Any]:
        return {"format": STATE_FORMAT, **dataclasses.asdict(self), "files": files}

    @classmethod
    def from_json(cls, data: dict[str, Any], path: Path) -> "TrainerState":
        version = data.get("format", 0)
        if not isinstance(version, int) or version > STATE_FORMAT:
            raise LmforgeError(f"{path} has trainer-state format {version!r}; this lmforge reads up to "
                               f"{STATE_FORMAT}: upgrade lmforge to continue this run")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def step_dirs(root: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def weights_are_finite(model: nn.Module) -> bool:
    """Whether every parameter of `model` is finite, on every process (a NaN checkpoint is no good one)."""
    bad = sum(int((~torch.isfinite(p.detach())).any()) for p in model.parameters())
    return float(all_reduce_sum(torch.tensor([float(bad)], dtype=torch.float64))[0]) == 0.0


def save_checkpoint(root: Path, model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
                    state: TrainerState) -> Path:
    """Write checkpoint `state.step` under `root` atomically and point `latest` at it.

    With several processes every process must call it (they write `dcp/` together; rank 0 the rest).
    model: the plain or FSDP-sharded model, not a DDP wrapper. A write that fails (disk full,
    permissions) is an LmforgeError naming the path; the previous checkpoint stays intact.
    """
    final = root / step_name(state.step)
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
    try:
        raise_together(_as_user_error(error, root, state.step))
        if is_distributed():
            _save_sharded(tmp / DCP_DIR, model, optimizer)
            optimizer = None  # its state is in dcp/
        weights = whole_weights(model)
        error = None
        if is_main():
            try:
                _write_and_publish(tmp, final, weights, optimizer, state)
            except Exception as exc:  # noqa: BLE001 - a failed write becomes one line below, a bug re-raises
                error = exc
        raise_together(_as_user_error(error, root, state.step))
    except BaseException:
        if is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _as_user_error(error: Optional[BaseException], root: Path, step: int) -> Optional[BaseException]:
    """A failed write as one line that says the previous checkpoint is intact; anything else unchanged."""
    if error is None or not is_write_failure(error):
        return error
    latest = root / "latest"
    kept = latest.read_text(encoding="utf-8").strip() if latest.is_file() else "none yet"
    return LmforgeError(f"could not write the {step_name(step)} checkpoint: {describe_os_error(error, root)}; "
                        f"the previous checkpoint ({kept}) is intact")


def prune_checkpoints(root: Path, keep_last: int, keep_every: int, newest: str, best: Optional[str] = None) -> None:
    """Retention after writing `newest`: it and `best` stay, and of the others the newest keep_last - 1
    (0: keep all), plus every multiple of `keep_every` steps (milestones kept for good)."""
    if keep_last <= 0 or not is_main():
        return
    others = [p for p in step_dirs(root) if p.name not in (newest, best)]
    for old in others[: max(0, len(others) - (keep_last - 1))]:
        if keep_every > 0 and int(STEP_DIR.match(old.name).group(1)) % keep_every == 0:
            continue
        shutil.rmtree(old, ignore_errors=True)


def _save_sharded(path: Path, model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    dcp.save(state, checkpoint_id=path)


def _write_and_publish(tmp: Path, final: Path, weights: dict[str, torch.Tensor],
                       optimizer: Optional[torch.optim.Optimizer], state: TrainerState) -> None:
    """Rank 0's part: the weights file (and optimizer.pt), checksums of every file, the rename, `latest`."""
    save_file(weights, str(tmp / MODEL_FILE), metadata={"format": "pt"})
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
    files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    for name in files:
        fsync_file(tmp / name)
    record = state.to_json({n: sha256_file(tmp / n) for n in files})
    write_atomic(tmp / STATE_FILE, json.dumps(record).encode("utf-8"))
    for directory in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
        fsync_dir(directory)
    if final.exists():  # re-saving the same step (e.g. final == periodic): replace it whole
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(final.parent)
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


class DamagedCheckpoint(LmforgeError):
    """A checkpoint whose files pass their checksums but cannot be read safely (e.g. a planted pickle)."""


@dataclass
class Checkpoint:
    path: Path
    state: TrainerState

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def sharded(self) -> bool:
        """Written by several processes: model and optimizer state are in dcp/."""
        return (self.path / DCP_DIR).is_dir()

    def optimizer_state(self) -> dict:
        # weights_only: the optimizer state is tensors and numbers; never unpickle arbitrary objects.
        try:
            return torch.load(self.path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
            reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise DamagedCheckpoint(f"checkpoint {self.path}: {OPTIMIZER_FILE} refused ({reason})") from None


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
            raise DamagedCheckpoint(f"{path / '.metadata'}: refused ({exc})") from None


def _weights_only_planner() -> Any:
    """DCP's default load planner, except that its non-tensor values (optimizer settings: numbers,
    flags, lists) must load with torch.load(weights_only=True); DCP itself would unpickle anything."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            try:
                torch.load(value, weights_only=True)  # raises on anything but plain values
            except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
                raise DamagedCheckpoint(f"optimizer state in dcp/ refused ({str(exc).splitlines()[0][:160]})") from None
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


def _read_checkpoint(path: Path) -> Checkpoint:
    state_path = path / STATE_FILE
    return Checkpoint(path, TrainerState.from_json(json.loads(state_path.read_text(encoding="utf-8")), state_path))


def complete_checkpoints(run_dir: Path) -> Iterator[Checkpoint]:
    """The run's whole checkpoints, newest first (`latest` first), warning past damaged ones."""
    root = run_dir / "checkpoints"
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
            yield _read_checkpoint(path)
        else:
            log.warning("warning: checkpoint %s is damaged (%s); trying the previous one", path, problem)


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
        return _read_checkpoint(path)
    for ckpt in complete_checkpoints(run_dir):
        return ckpt
    raise LmforgeError(f"no complete checkpoint in {run_dir}")


def resume_training_state(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> Checkpoint:
    """Load the newest checkpoint that loads safely into model and optimizer; a damaged one (checksum,
    or contents refused as unsafe) is skipped with a warning, as a torn one is."""
    from lmforge.train.distributed import run_on_main

    skip: set[str] = set()
    while True:
        path = run_on_main(_newest_path, run_dir, skip)
        if path is None:
            raise LmforgeError(f"no complete checkpoint in {run_dir}")
        ckpt = _read_checkpoint(Path(path))
        try:
            load_training_state(ckpt, model, optimizer)
            return ckpt
        except DamagedCheckpoint as exc:
            log.warning("warning: %s; trying the previous one", exc)
            skip.add(path)


def _newest_path(run_dir: Path, skip: set[str]) -> Optional[str]:
    for ckpt in complete_checkpoints(run_dir):
        if str(ckpt.path) not in skip:
            return str(ckpt.path)
    return None
