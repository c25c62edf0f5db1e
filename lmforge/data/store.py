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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import numpy as np

from lmforge.errors import LmforgeError
from lmforge.fileio import sha256_file
from lmforge.fileio import write_atomic as _write_atomic

FORMAT = "lmforge-token-store"
VERSION = 1


class StoreWriteError(LmforgeError):
    """A store file could not be written (full disk, unwritable directory); a re-run resumes once fixed."""


@contextmanager
def writing(path: Path, leftovers: tuple[Path, ...] = ()) -> Iterator[None]:
    """Turn an OSError while writing `path` into one line naming it; remove `leftovers` (temp files) first."""
    try:
        yield
    except OSError as exc:
        for leftover in leftovers:
            try:
                leftover.unlink(missing_ok=True)
            except OSError:
                pass
        raise StoreWriteError(f"cannot write {path}: {exc.strerror or exc}; free space or fix the directory's "
                              f"permissions, then re-run (finished shards are kept)") from None


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def write_atomic(path: Path, data: bytes) -> None:
    """fileio.write_atomic (no temp file left on failure), a failure being one line naming `path`."""
    with writing(path):
        _write_atomic(path, data)


class SplitWriter:
    """Appends documents to one split, cutting a new shard at the first document boundary past shard_tokens.

    Tokens stream to `shard-N.bin.tmp` as they come (memory does not grow with the shard), and a shard is
    fsynced and renamed when whole; then `on_shard(entry)` runs, so a caller can record progress. A writer
    given the verified `shards` of an interrupted run continues after them.
    """

    def __init__(self, root: Path, name: str, dtype: np.dtype, shard_tokens: int,
                 shards: list[dict[str, Any]] | None = None, on_shard: Callable[[dict], None] | None = None):
        self.root, self.name, self.dtype, self.shard_tokens = root, name, dtype, shard_tokens
        self.on_shard = on_shard
        with writing(root / name):
            (root / name).mkdir(parents=True, exist_ok=True)
        self.shards: list[dict[str, Any]] = list(shards or [])
        self._file: IO[bytes] | None = None
        self._digest = hashlib.sha256()
        self._starts: list[np.ndarray] = []
        self._buffered = 0
        self._end_document = self.shards[-1]["end_document"] if self.shards else 0
        self._last_document = -1  # stream index of the last piece added: a piece with the same one continues it

    @property
    def next_document(self) -> int:
        """Index (in the prepare's document stream) of the first document not yet in a finished shard."""
        return self.shards[-1]["end_document"] if self.shards else 0

    def add(self, ids: np.ndarray, document: int = -1) -> None:
        """Append one document; `document` is its index in the input stream (recorded for resumption)."""
        self.add_many(np.asarray(ids), np.asarray([len(ids)]), np.asarray([document]))

    def add_many(self, tokens: np.ndarray, lengths: np.ndarray, documents: np.ndarray,
                 ends: np.ndarray | None = None) -> None:
        """Append pieces given back to back (`lengths[i]` tokens each, stream indices `documents`).

        A piece with the document index of the piece before it (in this or the previous call) continues
        that document. ends[i] False: piece i does not end its document, so no shard is cut after it.
        Cuts shards exactly where adding whole documents one at a time would: at the first document end
        that brings the open shard to shard_tokens.
        """
        ends = np.ones(len(lengths), dtype=bool) if ends is None else np.asarray(ends, dtype=bool)
        stops = np.cumsum(lengths, dtype=np.int64)
        begins = np.empty(len(lengths), dtype=bool)  # whether piece i starts a new document
        if len(lengths):
            begins[0] = int(documents[0]) != self._last_document or int(documents[0]) < 0
            begins[1:] = (documents[1:] != documents[:-1]) | (documents[1:] < 0)
            self._last_document = int(documents[-1])
        first = 0
        while first < len(lengths):
            base = int(stops[first - 1]) if first else 0
            last = min(int(np.searchsorted(stops, base + self.shard_tokens - self._buffered)), len(lengths) - 1)
            if not ends[last]:  # the shard may only end where a document does
                later = np.flatnonzero(ends[last:])
                last = last + int(later[0]) if len(later) else len(lengths) - 1
            data = tokens[base:int(stops[last])].astype(self.dtype, copy=False).tobytes()
            with self._guard():
                if self._file is None:
                    self._file = open(self._tmp_path(), "wb")
                self._file.write(data)
            piece_starts = np.concatenate([[base], stops[first:last]])[begins[first:last + 1]]
            self._starts.append(piece_starts - base + self._buffered)
            self._digest.update(data)
            self._buffered += int(stops[last]) - base
            if ends[last]:
                self._end_document = int(documents[last]) + 1
                if self._buffered >= self.shard_tokens:
                    self._close_shard()
            first = last + 1

    def _stem(self, index: int) -> str:
        return f"{self.name}/shard-{index:05d}"

    def _tmp_path(self) -> Path:
        return self.root / f"{self._stem(len(self.shards))}.bin.tmp"

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """On a failed write, close and remove the shard being written (never leave a .tmp behind)."""
        try:
            with writing(self._tmp_path().with_suffix(""), (self._tmp_path(),)):
                try:
                    yield
                except OSError:
                    if self._file is not None:
                        try:
                            self._file.close()
                        except OSError:
                            pass
                        self._file = None
                    raise
        except StoreWriteError:
            self._digest, self._starts, self._buffered = hashlib.sha256(), [], 0
            raise

    def flush(self) -> None:
        """Finish the shard being written, if it holds anything."""
        if self._buffered:
            self._close_shard()

    def _close_shard(self) -> None:
        assert self._file is not None
        stem = self._stem(len(self.shards))
        with self._guard():
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            os.replace(self.root / f"{stem}.bin.tmp", self.root / f"{stem}.bin")
        starts = np.concatenate(self._starts)
        write_atomic(self.root / f"{stem}.idx", starts.tobytes())
        entry = {"bin": f"{stem}.bin", "idx": f"{stem}.idx", "tokens": self._buffered, "documents": len(starts),
                 "sha256": self._digest.hexdigest(), "idx_sha256": hashlib.sha256(starts.tobytes()).hexdigest(),
                 "end_document": self._end_document}
        self.shards.append(entry)
        self._digest, self._starts, self._buffered = hashlib.sha256(), [], 0
        if self.on_shard is not None:
            self.on_shard(entry)

    def _write_shard(self, index: int, tokens: np.ndarray, starts: np.ndarray) -> None:
        """Replace shard `index` (or append it) with these tokens in one go (used when moving a tail)."""
        stem = self._stem(index)
        data = tokens.astype(self.dtype, copy=False).tobytes()
        idx = starts.astype(np.int64).tobytes()
        write_atomic(self.root / f"{stem}.bin", data)
        write_atomic(self.root / f"{stem}.idx", idx)
        entry = {"bin": f"{stem}.bin", "idx": f"{stem}.idx", "tokens": int(len(tokens)),
                 "documents": int(len(starts)), "sha256": hashlib.sha256(data).hexdigest(),
                 "idx_sha256": hashlib.sha256(idx).hexdigest(), "end_document": -1}
        if index < len(self.shards):
            self.shards[index] = entry
        else:
            self.shards.append(entry)

    def summary(self) -> dict[str, Any]:
        return {"tokens": sum(s["tokens"] for s in self.shards),
                "documents": sum(s["documents"] for s in self.shards),
                "shards": self.shards}


def shard_problem(root: Path, entry: dict[str, Any], dtype: np.dtype, vocab_size: int | None) -> str | None:
    """What is wrong with a finished shard (missing, wrong size, sha256 mismatch, an id outside the
    vocabulary), or None. One pass over the tokens computes both the sha256 and the largest id."""
    bin_path, idx_path = root / entry["bin"], root / entry["idx"]
    for path, size in ((bin_path, entry["tokens"] * dtype.itemsize), (idx_path, entry["documents"] * 8)):
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size:,} bytes, the manifest says {size:,}"
    digest, top = hashlib.sha256(), -1
    with open(bin_path, "rb") as fh:
        while block := fh.read(1 << 22):  # a multiple of the item size: the file's size was checked
            digest.update(block)
            if vocab_size is not None:
                top = max(top, int(np.frombuffer(block, dtype=dtype).max()))
    if digest.hexdigest() != entry["sha256"]:
        return f"{bin_path} is corrupt (its sha256 differs from the manifest's)"
    if vocab_size is not None and top >= vocab_size:
        return f"{bin_path} holds token id {top}, outside the vocabulary of {vocab_size:,}"
    if "idx_sha256" in entry and sha256_file(idx_path) != entry["idx_sha256"]:
        return f"{idx_path} is corrupt (its sha256 differs from the manifest's)"
    return None


def shard_is_intact(root: Path, entry: dict[str, Any], dtype: np.dtype) -> bool:
    """Whether a finished shard's files are on disk with the sizes and sha256 its entry records."""
    return shard_problem(root, entry, dtype, None) is None


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

    def take(self, positions: np.ndarray) -> np.ndarray:
        """Tokens at these global offsets (an array of any shape), as int64: one gather per shard."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= self.num_tokens):
            raise IndexError(f"offsets outside a split of {self.num_tokens} tokens")
        if len(self.shards) == 1:
            return np.asarray(self.shards[0])[positions].astype(np.int64)
        tokens = np.empty(positions.shape, dtype=np.int64)
        shard_of = np.searchsorted(self.offsets, positions, side="right") - 1
        for shard in np.unique(shard_of):
            here = shard_of == shard
            tokens[here] = np.asarray(self.shards[shard])[positions[here] - self.offsets[shard]]
        return tokens


# Shards this process has verified (path, size, mtime, sha256): checked once per process, at first open.
_verified: set[tuple] = set()


class TokenStore:
    """A finished store on disk; refuses what it does not understand, and shards that fail their checksum."""

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
                self._check_once(shard)
                path = self.path / shard["bin"]
                shards.append(np.memmap(path, dtype=self.dtype, mode="r") if shard["tokens"] else
                              np.zeros(0, dtype=self.dtype))
                starts.append(np.fromfile(self.path / shard["idx"], dtype=np.int64) + sizes[-1])
                sizes.append(sizes[-1] + shard["tokens"])
            doc_starts = np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)
            self._readers[name] = SplitReader(shards, np.asarray(sizes, dtype=np.int64), doc_starts)
        return self._readers[name]

    def _check_once(self, shard: dict[str, Any]) -> None:
        path = self.path / shard["bin"]
        try:
            stat = path.stat()
            key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, shard["sha256"])
        except OSError:
            key = None
        if key is not None and key in _verified:
            return
        problem = shard_problem(self.path, shard, self.dtype, self.manifest.get("vocab_size"))
        if problem is not None:
            raise LmforgeError(f"token store {self.path}: {problem}; remove the store and re-run prepare")
        _verified.add(key)

    def verify(self, progress: bool = False) -> list[str]:
        """Everything wrong with the store's shards (empty when every shard is whole), checked now."""
        from tqdm import tqdm

        vocab_size = self.manifest.get("vocab_size")
        shards = [shard for info in self.manifest["splits"].values() for shard in info["shards"]]
        # disable=None: a bar for a person at a terminal, nothing in logs or captured output
        bar = tqdm(shards, desc="verifying shards", unit="shard", disable=None if progress else True, leave=False)
        return [problem for shard in bar
                if (problem := shard_problem(self.path, shard, self.dtype, vocab_size)) is not None]


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    manifest = {"format": FORMAT, "version": VERSION, **manifest}
    write_atomic(root / "manifest.json", json.dumps(manifest, indent=2).encode("utf-8"))
