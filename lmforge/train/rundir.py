"""The run directory: one owner, a format version, and the files a run writes.

    RUN/
      run.json          format and version, what kind of run, the token store it trained on
      config.yaml       the resolved config (a Config, or a FinetuneRunConfig for fine-tuned runs)
      tokenizer.json    the run's tokenizer
      metrics.jsonl     one JSON row per logged step; tb/ the same for TensorBoard
      summary.json      the final numbers, written when a run ends
      checkpoints/      step-NNNNNN/ (lmforge.train.checkpoint), `latest`, and `best` for fine-tuned runs
      .lock             held (flock) by the process that trains the run, for its whole life

A directory without run.json was written before it existed (version 0): it loads the same way, and
gains a run.json when it is trained again. A newer version is refused without touching anything.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from lmforge.errors import LmforgeError
from lmforge.fileio import Owner, describe_os_error, write_json_atomic, write_text_atomic
from lmforge.train.checkpoint import step_dirs

log = logging.getLogger(__name__)

CONFIG_FILE, TOKENIZER_FILE, RUN_FILE = "config.yaml", "tokenizer.json", "run.json"
SUMMARY_FILE, CHECKPOINTS, BEST_FILE = "summary.json", "checkpoints", "best"
RUN_FORMAT, RUN_VERSION = "lmforge-run", 1


@dataclass
class StoreRecord:
    """The token store a run trains on: where it was and what it held (its manifest's fingerprint)."""

    path: str
    fingerprint: Optional[str]
    tokenizer_sha256: Optional[str]

    @classmethod
    def of(cls, store: Any) -> "StoreRecord":
        return cls(str(Path(store.path).resolve()), store.manifest.get("fingerprint"),
                   store.manifest.get("tokenizer_sha256"))


class RunDir:
    """Paths and records of one run directory. Reading needs nothing; writing needs `owned()`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.checkpoints = self.path / CHECKPOINTS
        self.config_file = self.path / CONFIG_FILE
        self.tokenizer_file = self.path / TOKENIZER_FILE
        self.metrics_file = self.path / "metrics.jsonl"

    # -- reading ---------------------------------------------------------------------------

    def record(self) -> dict[str, Any]:
        """run.json, or the version-0 record of a run written before it existed. Refuses what it cannot read."""
        path = self.path / RUN_FILE
        if not path.is_file():
            return {"format": RUN_FORMAT, "version": 0}
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise LmforgeError(f"{path} is unreadable ({exc}); restore it from a backup, or delete it to treat "
                               f"{self.path} as a run of format 0") from None
        if not isinstance(record, dict) or record.get("format") != RUN_FORMAT:
            raise LmforgeError(f"{path} is not an lmforge run record; is {self.path} a run directory?")
        version = record.get("version")
        if not isinstance(version, int) or version > RUN_VERSION:
            raise LmforgeError(f"{self.path} is a run of format version {version!r}; this lmforge reads up to "
                               f"{RUN_VERSION}: upgrade lmforge to use it (nothing was changed)")
        return record

    def store(self) -> Optional[StoreRecord]:
        found = self.record().get("store")
        return StoreRecord(**found) if isinstance(found, dict) else None

    def has_checkpoint(self) -> bool:
        return bool(step_dirs(self.checkpoints))

    def best_name(self) -> Optional[str]:
        pointer = self.checkpoints / BEST_FILE
        return pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else None

    # -- writing (by the owner) --------------------------------------------------------------

    def owned(self) -> Owner:
        """The run's lock, held while training: a second trainer of the same run is refused in one line."""
        self.make()
        return Owner(self.path, "this run")

    def make(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LmforgeError(describe_os_error(exc, self.path)) from None

    def check_new(self, resume_hint: str) -> bool:
        """For a new run: refuse a directory that holds a run with checkpoints. True if it held a run
        that never finished its first checkpoint (it is started over: nothing in it can be continued)."""
        if self.has_checkpoint():
            raise LmforgeError(f"{self.path} already holds a run; continue it with {resume_hint} {self.path} "
                               f"or choose another --out")
        return self.config_file.is_file()

    def start(self, kind: str, config: Any, tokenizer: Path, store: Optional[StoreRecord]) -> None:
        """Write a new run's record, config and tokenizer (after every check passed, so that a run that
        fails its checks leaves nothing behind)."""
        try:
            self.make()
            if self.checkpoints.exists():  # only torn leftovers of a run that never finished a checkpoint
                shutil.rmtree(self.checkpoints)
            for stale in (self.metrics_file, self.path / SUMMARY_FILE):
                stale.unlink(missing_ok=True)
            shutil.rmtree(self.path / "tb", ignore_errors=True)
            shutil.copyfile(tokenizer, self.tokenizer_file)
            self.write_config(config)
            self.write_record(kind, store)
        except OSError as exc:
            raise LmforgeError(describe_os_error(exc, self.path)) from None

    def write_record(self, kind: str, store: Optional[StoreRecord], **extra: Any) -> None:
        """run.json: kind is pretrain, finetune or import; extra keys (e.g. imported_from) are kept on rewrites."""
        record = {"format": RUN_FORMAT, "version": RUN_VERSION, "kind": kind,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        previous = self.path / RUN_FILE
        if previous.is_file():
            old = self.record()
            record.update({k: v for k, v in old.items() if k not in record or k == "created"})
        record.update(extra)
        if store is not None:
            record["store"] = store.__dict__
        write_json_atomic(previous, record)

    def write_config(self, config: Any) -> None:
        """config.yaml from a Config or FinetuneRunConfig (anything with to_dict())."""
        write_text_atomic(self.config_file, yaml.safe_dump(config.to_dict(), sort_keys=False))

    def discard_if_unused(self) -> None:
        """Remove the directory if it holds nothing but the lock: a run that failed its checks leaves nothing."""
        if self.path.is_dir() and [p.name for p in self.path.iterdir()] in ([], [Owner.FILE]):
            shutil.rmtree(self.path, ignore_errors=True)

    def point_best(self, name: str) -> None:
        write_text_atomic(self.checkpoints / BEST_FILE, name + "\n")

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json_atomic(self.path / SUMMARY_FILE, summary)


def open_recorded_store(run: RunDir, data_config: Any, family: str, progress: bool) -> Any:
    """The token store a run trained on: the recorded one when it is present and whole, else the one
    its data config builds (from the corpus), saying why. An error that names both when neither is there."""
    from lmforge.data.prepare import data_fingerprint, prepare
    from lmforge.data.store import TokenStore

    recorded = run.store()
    if recorded is not None:
        problem = None
        try:
            store = TokenStore(recorded.path)
            if recorded.fingerprint is not None and store.manifest.get("fingerprint") != recorded.fingerprint:
                problem = "it now holds another store"
        except LmforgeError as exc:
            problem = str(exc)
        if problem is None:
            try:
                if data_fingerprint(data_config, family) != recorded.fingerprint and progress:
                    log.warning("warning: the corpus or data settings changed since %s started; it continues "
                                "on the token store it trained on (%s)", run.path, recorded.path)
            except LmforgeError:
                pass  # the corpus is gone: the store is all this run needs
            return store
        log.warning("warning: the token store %s recorded by %s cannot be used (%s); rebuilding it from the corpus",
                    recorded.path, run.path, problem)
    try:
        return TokenStore(prepare(data_config, family, progress=progress))
    except LmforgeError as exc:
        where = f"its token store ({recorded.path}) is missing and " if recorded is not None else ""
        raise LmforgeError(f"{run.path}: {where}its corpus cannot be read ({exc}); restore the store or the "
                           f"corpus (data.corpus in {run.config_file})") from None
