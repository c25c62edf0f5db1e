"""`lmforge verify STORE|RUN`: check every checksum of a token store, or of a run's checkpoints and its store."""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.errors import LmforgeError


def verify_store(path: Path) -> tuple[list[str], list[str]]:
    """(what was checked, what is wrong) for a token store: every shard's sha256 and id range, the tokenizer."""
    from lmforge.data.store import TokenStore
    from lmforge.data.tokenizer import load_tokenizer, tokenizer_sha256

    store = TokenStore(path)
    problems = store.verify(progress=True)
    try:
        if tokenizer_sha256(load_tokenizer(store.tokenizer_path)) != store.manifest.get("tokenizer_sha256"):
            problems.append(f"{store.tokenizer_path} is not the tokenizer the manifest names")
    except LmforgeError as exc:
        problems.append(str(exc))
    shards = sum(len(info["shards"]) for info in store.manifest["splits"].values())
    tokens = sum(info["tokens"] for info in store.manifest["splits"].values())
    return [f"token store {path}: {shards} shards, {tokens:,} tokens"], problems


def verify_run(run_dir: Path) -> tuple[list[str], list[str]]:
    """(what was checked, what is wrong) for a run: each checkpoint's checksums, and its token store if present."""
    from lmforge.data.prepare import store_location
    from lmforge.run import load_run_config
    from lmforge.train.checkpoint import step_dirs, verify_checkpoint

    checked, problems = [], []
    checkpoints = step_dirs(run_dir / "checkpoints")
    for checkpoint in checkpoints:
        problem = verify_checkpoint(checkpoint)
        if problem is not None:
            problems.append(f"checkpoint {checkpoint}: {problem}")
    checked.append(f"run {run_dir}: {len(checkpoints)} checkpoints")
    try:  # run.json records the store a run trained on; older runs only have their config
        store = Path(json.loads((run_dir / "run.json").read_text(encoding="utf-8"))["store"]["path"])
    except (OSError, ValueError, KeyError, TypeError):
        config = load_run_config(run_dir)
        try:
            store = store_location(config.data, config.model.family)
        except LmforgeError as exc:
            checked.append(f"its token store cannot be located ({exc})")
            return checked, problems
    if (store / "manifest.json").is_file():
        store_checked, store_problems = verify_store(store)
        checked += store_checked
        problems += store_problems
    else:
        checked.append(f"its token store {store} is not present (prepare or pretrain rebuilds it)")
    return checked, problems


def verify(path: str | Path) -> tuple[list[str], list[str]]:
    """Verify a token store (a directory with manifest.json) or a run (with config.yaml)."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        return verify_store(path)
    if (path / "config.yaml").is_file():
        return verify_run(path)
    raise LmforgeError(f"{path} is neither a token store (manifest.json) nor a run (config.yaml)")
