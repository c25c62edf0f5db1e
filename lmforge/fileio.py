"""Files that are whole or absent: atomic writes, directories renamed into place, checksums, fsync,
exclusive ownership locks, and one-line messages for the OS errors a user can fix (full disk,
permissions). The one home of these for stores, checkpoints, run directories and exports."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from lmforge.errors import LmforgeError


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write bytes to `path` so that readers see either the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not leave a half file behind
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, value: Any, indent: Optional[int] = 2) -> None:
    write_atomic(path, (json.dumps(value, indent=indent) + "\n").encode("utf-8"))


@contextmanager
def building_directory(out: Path, purpose: str = "build") -> Iterator[Path]:
    """Yield an empty temporary directory beside `out`; on success it becomes `out`, on any failure
    it is removed. `out` must not exist, or be an empty directory, so nothing is ever overwritten."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LmforgeError(f"{out} already exists and is not empty; choose a new output directory")
    tmp = out.parent / f".{out.name}.{purpose}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as exc:
        raise LmforgeError(describe_os_error(exc, out.parent)) from None
    try:
        yield tmp
        if out.exists():
            out.rmdir()  # empty, checked above
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def describe_os_error(exc: BaseException, path: Path) -> str:
    """One line for an error writing under `path`: which path, and whether the disk is full or it is unwritable."""
    code = getattr(exc, "errno", None)
    text = str(exc)
    if code in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text or "Disk quota" in text:
        return f"{path}: the disk is full ({getattr(exc, 'strerror', None) or text}); free some space and try again"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS) or "Permission denied" in text or "Read-only" in text:
        return f"{path}: not writable ({getattr(exc, 'strerror', None) or text}); choose another location"
    return f"{path}: could not write ({getattr(exc, 'strerror', None) or text})"


def is_write_failure(exc: BaseException) -> bool:
    """Whether `exc` is a failed write (disk full, permissions) as torch or safetensors report it, not a bug."""
    if isinstance(exc, OSError):
        return True
    text = str(exc)
    name = type(exc).__name__
    # torch.save: "PytorchStreamWriter failed writing file ..."; safetensors: SafetensorError("... I/O error ...")
    return (name == "SafetensorError" and ("I/O" in text or "os error" in text.lower() or "No space" in text)) or (
        isinstance(exc, RuntimeError) and ("PytorchStreamWriter" in text or "No space left" in text
                                          or "file write failed" in text))


class Owner:
    """An exclusive lock on a directory for one process's lifetime (fcntl.flock on DIR/.lock).

    The OS releases it when the process ends, however it ends, so a killed run never leaves it stuck.
    A second process asking for it gets a one-line refusal naming the holder.
    """

    FILE = ".lock"

    def __init__(self, directory: Path, what: str):
        self.directory, self.what = directory, what
        self._fd: Optional[int] = None

    def acquire(self) -> "Owner":
        path = self.directory / self.FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise LmforgeError(describe_os_error(exc, self.directory)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise LmforgeError(f"{self.directory} is in use: {self.what} is owned by {holder}; wait for it to "
                               f"finish or stop it (a killed process releases it at once)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode("utf-8"), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None

    def __enter__(self) -> "Owner":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
