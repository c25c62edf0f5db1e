"""TokenStore: sharded flat token files with a document index and a checksummed manifest.

Layout of a store directory (format version 1):
    manifest.json                 what is here; written last, so its presence means "complete"
    tokenizer.json                the tokenizer that produced the ids
    <split>/shard-00000.bin       token ids, flat, little-endian uint16 (vocab < 65,536) or uint32
    <split>/shard-00000.idx       int64 start offset of every document that begins in this shard
Documents are stored back to back, each followed by the end-of-document token where the family has one.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.errors import LmforgeError

FORMAT = "lmforge-token-store"
VERSION = 1


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write bytes to `path` so that readers see either the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class SplitWriter:
    """Appends documents to one split, cutting a new shard at a document boundary past shard_tokens."""

    def __init__(self, root: Path, name: str, dtype: np.dtype, shard_tokens: int):
        self.root, self.name, self.dtype, self.shard_tokens = root, name, dtype, shard_tokens
        (root / name).mkdir(parents=True, exist_ok=True)
        self.shards: list[dict[str, Any]] = []
        self._pieces: list[np.ndarray] = []
        self._starts: list[int] = []
        self._buffered = 0

    def add(self, ids: np.ndarray) -> None:
        self._starts.append(self._buffered)
        self._pieces.append(ids.astype(self.dtype, copy=False))
        self._buffered += len(ids)
        if self._buffered >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self._pieces:
            return
        tokens = np.concatenate(self._pieces)
        self._write_shard(len(self.shards), tokens, np.asarray(self._starts, dtype=np.int64))
        self._pieces, self._starts, self._buffered = [], [], 0

    def _write_shard(self, index: int, tokens: np.ndarray, starts: np.ndarray) -> None:
        stem = f"{self.name}/shard-{index:05d}"
        write_atomic(self.root / f"{stem}.bin", tokens.astype(self.dtype, copy=False).tobytes())
        write_atomic(self.root / f"{stem}.idx", starts.astype(np.int64).tobytes())
        entry = {"bin": f"{stem}.bin", "idx": f"{stem}.idx", "tokens": int(len(tokens)),
                 "documents": int(len(starts)), "sha256": sha256_file(self.root / f"{stem}.bin")}
        if index < len(self.shards):
            self.shards[index] = entry
        else:
            self.shards.append(entry)

    def summary(self) -> dict[str, Any]:
        return {"tokens": sum(s["tokens"] for s in self.shards),
                "documents": sum(s["documents"] for s in self.shards),
                "shards": self.shards}


def move_tail(source: SplitWriter, target: SplitWriter, n_tokens: int) -> None:
    """Move the last n_tokens of `source` into `target` (a document cut in two becomes two)."""
    source.flush()
    total = sum(s["tokens"] for s in source.shards)
    cut = total - n_tokens
    offset = 0
    kept: list[dict[str, Any]] = []
    for index, shard in enumerate(list(source.shards)):
        tokens = np.fromfile(source.root / shard["bin"], dtype=source.dtype)
        starts = np.fromfile(source.root / shard["idx"], dtype=np.int64)
        local_cut = min(max(cut - offset, 0), len(tokens))
        if local_cut < len(tokens):  # some or all of this shard moves
            tail_tokens = tokens[local_cut:]
            tail_starts = starts[starts >= local_cut] - local_cut
            if len(tail_starts) == 0 or tail_starts[0] != 0:
                tail_starts = np.concatenate([[0], tail_starts]).astype(np.int64)
            for start, end in zip(tail_starts, [*tail_starts[1:], len(tail_tokens)]):
                target.add(tail_tokens[start:end])
            if local_cut > 0:
                source._write_shard(len(kept), tokens[:local_cut], starts[starts < local_cut])
                kept.append(source.shards[len(kept)])
            for path in (shard["bin"], shard["idx"]):
                if index >= len(kept):
                    (source.root / path).unlink(missing_ok=True)
        else:
            kept.append(shard)
        offset += len(tokens)
    source.shards = kept
    target.flush()


@dataclass
class SplitReader:
    """Random access to one split's tokens as if they were a single flat array."""

    shards: list[np.memmap]
    offsets: np.ndarray  # offsets[i] = global index of shard i's first token; offsets[-1] = total
    doc_starts: np.ndarray  # global start offset of every document

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length), crossing shard boundaries as needed."""
        if start < 0 or start + length > self.num_tokens:
            raise IndexError(f"read [{start}, {start + length}) outside a split of {self.num_tokens} tokens")
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pieces, need, shard = [], length, first
        pos = start - int(self.offsets[first])
        while need > 0:
            piece = self.shards[shard][pos: pos + need]
            pieces.append(piece)
            need -= len(piece)
            shard, pos = shard + 1, 0
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


class TokenStore:
    """A finished store on disk; refuses what it does not understand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest_path = self.path / "manifest.json"
        if not manifest_path.is_file():
            partial = " (an unfinished prepare left it; re-run prepare)" if self.path.exists() else ""
            raise LmforgeError(f"no token store at {self.path}: manifest.json missing{partial}")
        try:
            self.manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise LmforgeError(f"{manifest_path}: corrupt manifest ({exc})") from None
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
            raise LmforgeError(f"{manifest_path}: not a {FORMAT} v{VERSION} manifest "
                               f"(found format={self.manifest.get('format')!r}, version={self.manifest.get('version')!r})")
        self.dtype = np.dtype(self.manifest["dtype"])
        self._readers: dict[str, SplitReader] = {}

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.json"

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    def split(self, name: str) -> SplitReader:
        if name not in self.manifest["splits"]:
            raise LmforgeError(f"token store {self.path} has no split {name!r} (has: {', '.join(self.splits)})")
        if name not in self._readers:
            info = self.manifest["splits"][name]
            shards, sizes, starts = [], [0], []
            for shard in info["shards"]:
                path = self.path / shard["bin"]
                expected = shard["tokens"] * self.dtype.itemsize
                if not path.is_file() or path.stat().st_size != expected:
                    raise LmforgeError(f"token store shard {path} is missing or has the wrong size; re-run prepare")
                shards.append(np.memmap(path, dtype=self.dtype, mode="r") if shard["tokens"] else
                              np.zeros(0, dtype=self.dtype))
                starts.append(np.fromfile(self.path / shard["idx"], dtype=np.int64) + sizes[-1])
                sizes.append(sizes[-1] + shard["tokens"])
            doc_starts = np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)
            self._readers[name] = SplitReader(shards, np.asarray(sizes, dtype=np.int64), doc_starts)
        return self._readers[name]

    def verify(self) -> list[str]:
        """Names of shards whose sha256 no longer matches the manifest."""
        bad = []
        for info in self.manifest["splits"].values():
            for shard in info["shards"]:
                path = self.path / shard["bin"]
                if not path.is_file() or sha256_file(path) != shard["sha256"]:
                    bad.append(shard["bin"])
        return bad


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    manifest = {"format": FORMAT, "version": VERSION, **manifest}
    write_atomic(root / "manifest.json", json.dumps(manifest, indent=2).encode("utf-8"))
