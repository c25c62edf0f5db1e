"""prepare's tokenization as datatrove pipeline tasks: `lmforge prepare --executor local|slurm|ray`.

Task r of N encodes the corpus files r, r+N, r+2N, ... Each file becomes one part under `parts/`:
`F.bin` (its documents' ids back to back, in the store's dtype), `F.npz` (each document's length and
split) and `F.json` (the file's corpus statistics), each written under a temp name and renamed; the
.json last, so its presence means the part is whole. A task that fails or is pre-empted leaves its
finished parts; rerun, it skips them, and datatrove reruns only the tasks that did not complete.
The driver then feeds the parts, in corpus order, to the same shard writer a local prepare uses, so the
store is byte for byte the one a local prepare builds, for any number of tasks.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from lmforge.errors import LmforgeError

EXECUTORS = ("local", "slurm", "ray")
_INSTALL = {"local": "pip install 'lmforge[curate]' (datatrove)",
            "slurm": "pip install 'lmforge[curate]' (datatrove; submits with sbatch)",
            "ray": "pip install 'lmforge[cluster]' (ray)"}
BATCH_CHARS = 1 << 20


class TasksUnfinished(LmforgeError):
    """Some tasks failed or are still queued: their finished parts are kept for the next run."""


@dataclass
class EncodeFiles:
    """The datatrove pipeline step (a picklable callable): encode this task's share of the files."""

    files: list[str]
    parts: str
    tokenizer_json: str
    family: str
    dtype: str
    max_chars: int
    by_document: bool
    val_fraction: float
    fmt: str
    text_field: str
    txt_documents: str
    encoding_errors: str

    def __call__(self, data, rank: int = 0, world_size: int = 1):
        from tokenizers import Tokenizer

        from lmforge.data.encode import encode_stream
        from lmforge.data.fast_encoder import batch_encoder, joined_encoder
        from lmforge.data.tokenizer import EOS

        tokenizer = Tokenizer.from_str(self.tokenizer_json)
        encode = batch_encoder(tokenizer)
        joined = joined_encoder(tokenizer, EOS) if self.family == "gpt" else None
        for number in range(rank, len(self.files), world_size):
            if not (Path(self.parts) / f"{number:06d}.json").is_file():
                self._encode_file(number, tokenizer, encode, joined, encode_stream)
        yield from data or ()

    def _encode_file(self, number: int, tokenizer, encode, joined, encode_stream) -> None:
        from lmforge.data.corpus import CorpusStats, iter_documents
        from lmforge.data.encode import is_validation

        stem = Path(self.parts) / f"{number:06d}"
        stats = CorpusStats()
        lengths: list[np.ndarray] = []
        to_val: list[bool] = []
        dtype = np.dtype(self.dtype)
        with open(f"{stem}.bin.tmp", "wb") as out:
            batch, size = [], 0

            def flush() -> None:
                tokens, counts = encode_stream(tokenizer, batch, self.family, self.max_chars, encode,
                                               [True] * len(batch), joined)
                out.write(tokens.astype(dtype).tobytes())
                lengths.append(counts)
                batch.clear()

            documents = iter_documents([self.files[number]], self.fmt, self.text_field, self.txt_documents,
                                       self.encoding_errors, stats)
            for doc in documents:
                batch.append(doc.text)
                to_val.append(self.by_document and is_validation(doc.text, self.val_fraction))
                size += len(doc.text)
                if size >= BATCH_CHARS:
                    flush()
                    size = 0
            if batch:
                flush()
            out.flush()
            os.fsync(out.fileno())
        os.replace(f"{stem}.bin.tmp", f"{stem}.bin")
        with open(f"{stem}.npz.tmp", "wb") as fh:
            np.savez(fh, lengths=np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64),
                     to_val=np.asarray(to_val, dtype=bool))
        os.replace(f"{stem}.npz.tmp", f"{stem}.npz")
        Path(f"{stem}.json.tmp").write_text(json.dumps(stats.to_dict()), encoding="utf-8")
        os.replace(f"{stem}.json.tmp", f"{stem}.json")


def make_executor(name: str, step: EncodeFiles, tasks: int, workers: int, logs: Path, slurm_partition: str | None,
                  slurm_time: str):
    """datatrove's executor `name` running `step` as `tasks` tasks, or one line naming what to install."""
    try:
        if name == "ray":
            import ray  # noqa: F401  (datatrove imports it lazily; fail here with the extra's name)
        from datatrove import executor as executors
    except ImportError:
        raise LmforgeError(f"data.executor={name} needs packages that are not installed: {_INSTALL[name]}") from None
    if name == "local":
        return executors.LocalPipelineExecutor([step], tasks=tasks, workers=workers, logging_dir=str(logs),
                                               start_method="fork")
    if name == "ray":
        return executors.RayPipelineExecutor([step], tasks=tasks, workers=workers, logging_dir=str(logs))
    if not slurm_partition:
        raise LmforgeError("data.executor=slurm needs data.slurm_partition (the partition to submit to)")
    return executors.SlurmPipelineExecutor([step], tasks=tasks, time=slurm_time, partition=slurm_partition,
                                           logging_dir=str(logs), job_name="lmforge-prepare")


def run_tasks(executor, name: str, logs: Path) -> None:
    """Run (or, on Slurm, submit) the tasks; refuse to go on while any task is unfinished."""
    from lmforge.data.curate import stderr_to

    if executor.get_incomplete_ranks():
        try:
            with stderr_to(logs / "console.log"):  # datatrove's chatty log, in every task
                executor.run()
        except Exception as exc:  # a task's failure surfaces here; its own log names the file
            raise TasksUnfinished(f"prepare tasks failed ({exc}); the store is not complete. Task logs: {logs / 'logs'}; "
                               f"the same command reruns only the unfinished tasks") from None
    incomplete = executor.get_incomplete_ranks()
    if incomplete and name == "slurm":
        raise TasksUnfinished(f"submitted {len(incomplete)} Slurm tasks (logs: {logs}); when they finish, run the "
                           f"same command again to assemble the store")
    if incomplete:
        raise TasksUnfinished(f"{len(incomplete)} prepare tasks did not finish (ranks {incomplete[:5]}...); the store is "
                           f"not complete. Task logs: {logs / 'logs'}; the same command reruns only those tasks")


def read_parts(parts: Path, count: int, dtype: np.dtype) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, dict]]:
    """Each file's part in corpus order: (tokens, document lengths, validation flags, corpus statistics)."""
    for number in range(count):
        stem = parts / f"{number:06d}"
        try:
            stats = json.loads(Path(f"{stem}.json").read_text(encoding="utf-8"))
            with np.load(f"{stem}.npz") as arrays:
                lengths, to_val = arrays["lengths"], arrays["to_val"]
            size = Path(f"{stem}.bin").stat().st_size
            # mapped, not read: a part as big as its file costs no memory
            tokens = np.memmap(f"{stem}.bin", dtype=dtype, mode="r") if size else np.zeros(0, dtype=dtype)
        except (OSError, ValueError, KeyError) as exc:
            raise LmforgeError(f"part {stem} of the prepare tasks is missing or damaged ({exc}); "
                               f"remove it and re-run") from None
        if len(tokens) != int(lengths.sum()):
            raise LmforgeError(f"part {stem}.bin holds {len(tokens)} tokens, its index says {int(lengths.sum())}; "
                               f"remove {stem}.json and re-run")
        yield tokens, lengths, to_val, stats
