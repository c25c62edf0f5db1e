"""Many processes, one run: torchrun's environment, the process group, DDP / FSDP2 wrapping, collectives.

A run launched with `torchrun --nproc_per_node N -m lmforge ...` has N processes (ranks), each training
on its part of every global batch. Everything here is a no-op in a single process, so the training
loops read the same for one process and for many. Parallelism is applied to a plain model from the
outside: the model classes know nothing of it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmforge.errors import LmforgeError

log = logging.getLogger(__name__)

_started = False  # whether this process ever joined a process group (the CLI then prefixes errors with the rank)


@dataclass(frozen=True)
class World:
    """This process's place among the processes of a run, as torchrun describes it in the environment."""

    rank: int = 0
    local_rank: int = 0  # the rank among the processes on this machine: which GPU to use
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_env() -> World:
    """RANK / LOCAL_RANK / WORLD_SIZE as torchrun sets them; one process when they are absent."""
    try:
        world = World(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                      int(os.environ.get("WORLD_SIZE", 1)))
    except ValueError:
        raise LmforgeError("RANK, LOCAL_RANK and WORLD_SIZE must be integers (launch with torchrun)") from None
    if world.size < 1 or not 0 <= world.rank < world.size:
        raise LmforgeError(f"RANK={world.rank} is not in [0, WORLD_SIZE={world.size}) (launch with torchrun)")
    return world


def started() -> bool:
    """Whether this process has joined a process group (its errors may then be its own, not every rank's)."""
    return _started


def resolve_rank_device(name: str, world: World) -> torch.device:
    """The device of this process: train.device, with one GPU per process (cuda:LOCAL_RANK) under torchrun."""
    from lmforge.train.device import resolve_device

    if world.distributed and name.startswith("cuda:"):
        raise LmforgeError(f"train.device={name} names one GPU, but each of the {world.size} processes needs its own; "
                           f"use auto or cuda (process k on a machine takes cuda:k)")
    device = resolve_device(name)
    if device.type == "cuda" and world.distributed:
        if world.local_rank >= torch.cuda.device_count():
            raise LmforgeError(f"LOCAL_RANK={world.local_rank} but this machine has {torch.cuda.device_count()} GPUs; "
                               f"launch at most that many processes per node")
        device = torch.device("cuda", world.local_rank)
    return device


def check_launch(parallel: Any, model_config: Any, device: torch.device, world: World) -> None:
    """Refuse a parallel setup that cannot work, before any process starts work.

    parallel: a ParallelConfig; model_config: a ModelConfig (its model is built on the meta device,
    which costs nothing, to see whether FSDP has blocks to shard).
    """
    if not world.distributed:
        return
    if parallel.cpu_offload and device.type != "cuda":
        raise LmforgeError(f"parallel.cpu_offload moves FSDP's shards from GPU to host memory; this run is on "
                           f"{device.type}, where everything already is in host memory (set it to false)")
    if parallel.strategy == "fsdp":
        import dataclasses

        from lmforge.model import build_model

        with torch.device("meta"):
            model = build_model(dataclasses.replace(model_config, vocab_size=max(1, model_config.vocab_size)))
        fsdp_units(model, model_config.family)


def fsdp_units(model: nn.Module, family: str) -> list[nn.Module]:
    """The blocks FSDP shards one by one; an error for a model that has none."""
    blocks = transformer_blocks(model)
    if not blocks:
        raise LmforgeError(f"parallel.strategy=fsdp cannot wrap a model.family={family} model: it has no "
                           f"Transformer blocks to shard one by one; use parallel.strategy=ddp")
    return blocks


@contextlib.contextmanager
def process_group(world: World, device: torch.device) -> Iterator[Optional[Any]]:
    """Join the run's process group (NCCL on GPUs, gloo on CPUs) for the duration; yields the device mesh."""
    global _started
    if not world.distributed:
        yield None
        return
    from torch.distributed.device_mesh import init_device_mesh

    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            device_id=device if device.type == "cuda" else None)
    _started = True
    try:
        yield init_device_mesh(device.type, (world.size,))
        # Every process done with every collective before any tears gloo down: without this a rank that
        # finishes first can close connections a peer's gloo thread still uses, and that peer aborts at
        # exit ("terminate called without an active exception"), failing a finished run. Not on errors:
        # a failed peer would never arrive.
        dist.barrier()
    finally:
        dist.destroy_process_group()


T = TypeVar("T")


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all processes, in place; returns it. Any device: NCCL gets a GPU copy."""
    if _active():
        if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
            on_gpu = tensor.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(on_gpu)
            tensor.copy_(on_gpu)
        else:
            dist.all_reduce(tensor)
    return tensor


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's `obj`, in rank order (a list of one in a single process)."""
    if not _active():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every process."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def raise_together(error: Optional[BaseException]) -> None:
    """Raise on every process if any process failed, so that none is left waiting in a collective.

    A process re-raises its own error; the others raise an LmforgeError naming the rank that failed.
    In a single process: raise `error` if there is one.
    """
    if not _active():
        if error is not None:
            raise error
        return
    messages = all_gather_objects(None if error is None else f"{error}")
    if error is not None:
        raise error
    for rank, message in enumerate(messages):
        if message is not None:
            raise LmforgeError(f"stopped because rank {rank} failed: {message}")


def run_on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """fn(*args, **kwargs) on rank 0 only (e.g. building the token store, checking files); every process
    gets its result, or raises when it failed."""
    if not _active():
        return fn(*args, **kwargs)
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - handed to every process by raise_together
            error = exc
    raise_together(error)
    return broadcast_object(result)


def is_distributed() -> bool:
    """Whether this process is one of several in a process group."""
    return _active()


def is_main() -> bool:
    """Rank 0, or the only process."""
    return not _active() or dist.get_rank() == 0


def rank_and_size() -> tuple[int, int]:
    """(this process's rank, the number of processes): (0, 1) outside a process group."""
    return (dist.get_rank(), dist.get_world_size()) if _active() else (0, 1)


# ---------------------------------------------------------------------------------------------
# Wrapping a model for training


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's Transformer blocks, in order: the units of activation checkpointing, compilation and FSDP."""
    from lmforge.model.layers import Block
    from lmforge.model.t5 import DecoderBlock, EncoderBlock

    return [m for m in model.modules() if isinstance(m, (Block, EncoderBlock, DecoderBlock))]


def checkpoint_activations(block: nn.Module) -> None:
    """Recompute `block`'s forward pass during backward instead of keeping its activations.

    The block's forward is replaced on the instance, so the module tree and its parameter names
    (hence checkpoints) are untouched; hooks on the block (FSDP's) still run around the whole call.
    """
    block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def compile_with_fallback(blocks: list[nn.Module], strict: bool) -> None:
    """torch.compile each block; if compiling fails on this platform, warn and run the blocks eagerly
    (or, when `strict`, raise an LmforgeError).

    Compilation is lazy: a missing C++ compiler or Triton, or a GPU too old for Triton, shows only
    when a block first runs, as dynamo's BackendCompilerFailed. So each block's first call is guarded,
    with the backward graph compiled during that call (where this PyTorch can) instead of at the first
    backward, which no guard here could catch. Later calls go straight to the compiled code.
    """
    try:
        for block in blocks:
            block.compile()
    except RuntimeError as exc:  # e.g. a Python version this PyTorch's dynamo does not support
        _compile_failed(blocks, exc, strict)
        return
    for block in blocks:
        # Module.compile keeps the compiled callable in _compiled_call_impl, which Module.__call__ prefers
        block._compiled_call_impl = functools.partial(_first_compiled_call, block, block._compiled_call_impl,
                                                      blocks, strict)


def _first_compiled_call(block: nn.Module, compiled: Callable, blocks: list[nn.Module], strict: bool,
                         *args: Any, **kwargs: Any) -> Any:
    from torch._dynamo.exc import BackendCompilerFailed

    block._compiled_call_impl = compiled
    try:
        with _backward_compiled_with_forward():
            return compiled(*args, **kwargs)
    except BackendCompilerFailed as exc:
        _compile_failed(blocks, exc, strict)
        return block(*args, **kwargs)


def _backward_compiled_with_forward() -> contextlib.AbstractContextManager:
    """AOTAutograd lowers the backward graph at the first backward unless told otherwise (PyTorch >= 2.8)."""
    import torch._functorch.config as functorch_config

    if hasattr(functorch_config, "force_non_lazy_backward_lowering"):
        return functorch_config.patch(force_non_lazy_backward_lowering=True)
    return contextlib.nullcontext()


def _compile_failed(blocks: list[nn.Module], exc: BaseException, strict: bool) -> None:
    """Every block back to eager, with one warning; an LmforgeError instead when `strict`."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = f"{type(exc).__name__}: {lines[0] if lines else 'no message'}"
    if strict:
        raise LmforgeError(f"train.compile failed on this platform ({reason}); set train.compile: false, or "
                           f"train.compile_strict: false to fall back to eager with a warning") from None
    log.warning("warning: train.compile failed on this platform (%s); training eagerly instead, as with "
                "train.compile: false", reason)
    for block in blocks:
        block._compiled_call_impl = None


class TrainingLoss(nn.Module):
    """A model and the loss a training step takes from it, as one module: what the training loop calls
    and DDP wraps. DDP then sees the loss as the forward pass's output; told that some parameters get
    no gradient, it finds them from the loss, not from outputs the loss ignores (BERT's NSP logits
    when there is no NSP task)."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, dict], Any]):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: dict) -> Any:
        return self.loss_fn(self.model, batch)


def parallelize(model: nn.Module, loss_fn: Callable[[nn.Module, dict], Any], parallel: Any, mesh: Optional[Any],
                device: torch.device, precision: str, compile_blocks: bool = False,
                find_unused_parameters: bool = False, compile_strict: bool = False) -> nn.Module:
    """Apply activation checkpointing, compilation and DDP or FSDP2 to `model` (already on `device`).

    Returns the module a training step calls with a batch to get loss_fn(model, batch): a TrainingLoss,
    DDP-wrapped for strategy ddp. FSDP2 shards `model` in place. Build the optimizer on `model`'s
    parameters afterwards, and evaluate, checkpoint and sample with `model`.
    parallel: a ParallelConfig; mesh: from process_group (None in a single process);
    find_unused_parameters: some parameters get no gradient from the loss (DDP must know);
    compile_strict: a compilation that fails raises instead of falling back to eager (see compile_blocks).
    """
    blocks = transformer_blocks(model)
    for block in blocks:
        if parallel.activation_checkpointing:
            checkpoint_activations(block)
    if compile_blocks and blocks:
        compile_with_fallback(blocks, compile_strict)
    if mesh is not None and parallel.strategy == "fsdp":
        _fully_shard(model, parallel, mesh, precision)
    train_model = TrainingLoss(model, loss_fn)
    if mesh is None or parallel.strategy != "ddp":
        return train_model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(train_model, device_ids=[device] if device.type == "cuda" else None,
                                   find_unused_parameters=find_unused_parameters)


def _fully_shard(model: nn.Module, parallel: Any, mesh: Any, precision: str) -> None:
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    from lmforge.train.device import DTYPES

    # The blocks also return their attention keys and values (a KV cache, used only when generating);
    # they are views, and FSDP warns about in-place changes to returned views, which nothing makes.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    param_dtype = DTYPES[precision if parallel.param_dtype == "auto" else parallel.param_dtype]
    options = dict(mesh=mesh,
                   mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=DTYPES[parallel.reduce_dtype]),
                   offload_policy=CPUOffloadPolicy() if parallel.cpu_offload else OffloadPolicy())
    for block in fsdp_units(model, model.config.family):
        fully_shard(block, **options)
    fully_shard(model, **options)  # the rest (embeddings, final norm, heads) as one unit at the root


@contextlib.contextmanager
def whole_model(model: nn.Module):
    """Within the context an FSDP2-sharded model holds all its weights on every process, and forwards
    gather nothing: decoding, which calls the model's parts directly (T5's encode / decode, not the root's
    forward, which is what gathers the root's weights) and stops after a number of steps that differs from
    process to process, needs exactly that. A model that is not sharded passes through untouched."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    blocks = [unit for unit in units if unit is not model]  # FSDP never reshards the root after its forward
    for unit in blocks:
        unit.set_reshard_after_forward(False, recurse=False)
    for unit in units:  # the same collectives in the same order on every process
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()
        for unit in blocks:
            unit.set_reshard_after_forward(True, recurse=False)


def gradient_sync(train_model: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """Within the context, backward passes reduce gradients across processes only if `enabled`:
    all but the last micro-batch of a step accumulate locally. train_model: what parallelize returned."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(train_model, DistributedDataParallel):
        return contextlib.nullcontext() if enabled else train_model.no_sync()
    if isinstance(train_model.model, FSDPModule):
        train_model.model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def clip_grad_norm(parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip gradients to a total norm of max_norm; returns the norm before clipping.

    Works for whole and sharded (FSDP's DTensor) gradients alike: the norm is always the global one.
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
    return total
