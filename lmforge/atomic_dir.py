"""Build a directory under a temporary name and rename it into place only when it is whole."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from lmforge.errors import LmforgeError


@contextmanager
def building_directory(out: Path, purpose: str = "build") -> Iterator[Path]:
    """Yield an empty temporary directory beside `out`; on success it becomes `out`, on any failure
    it is removed. `out` must not exist, or be an empty directory, so nothing is ever overwritten."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LmforgeError(f"{out} already exists and is not empty; choose a new output directory")
    tmp = out.parent / f".{out.name}.{purpose}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            out.rmdir()  # empty, checked above
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
