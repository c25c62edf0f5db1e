"""Seeding and RNG capture: every random stream of a run is named by (seed, *keys) and checkpointed, so a
resumed run draws exactly what an uninterrupted one would."""

from __future__ import annotations

import base64
import random
from typing import Any, Optional

import numpy as np
import torch

from lmforge.train.distributed import all_gather_objects


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
