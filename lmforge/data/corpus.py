"""Stream Documents from text files, directories and globs, in constant memory.

Formats: plain text (.txt and anything else that decodes) and JSON lines (.jsonl / .json), each
optionally compressed (.gz, .bz2, .xz), and parquet (a text column, read one row group at a time).
Text is UTF-8, or UTF-16 / UTF-32 when a byte-order mark says so. Bad input is counted and reported,
never a traceback: a file or directory that is skipped is named in a warning and in `skipped_files`.
"""

from __future__ import annotations

import logging

import bz2
import codecs
import glob
import gzip
import io
import json
import lzma
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator

from lmforge.errors import LmforgeError

log = logging.getLogger(__name__)

SAMPLE_DATA_DIR = Path(__file__).resolve().parent.parent / "sample_data"
_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}
_PARQUET_SUFFIXES = {".parquet", ".pq"}
_SKIP_SUFFIXES = {".md", ".yaml", ".yml", ".py", ".pyc"}  # metadata next to corpora, not corpus text
# Byte-order marks and the codec that reads (and drops) each; UTF-32-LE's starts with UTF-16-LE's, so first.
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


@dataclass
class Document:
    text: str
    source: str  # "path" or "path:line", for messages


@dataclass
class CorpusStats:
    files: int = 0
    documents: int = 0
    bytes: int = 0
    empty_documents: int = 0
    files_with_replaced_bytes: int = 0
    skipped_files: list[str] = field(default_factory=list)  # "path (why)": files, and directories that cannot be read
    bad_json_lines: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _plain_suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    while suffixes and suffixes[-1] in _OPENERS:
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def _walk(directory: Path) -> tuple[list[Path], list[OSError]]:
    """The corpus files under `directory` (recursively), and the errors of the subdirectories that cannot be read."""
    errors: list[OSError] = []
    found = []
    for parent, _dirs, names in os.walk(directory, onerror=errors.append):
        found.extend(Path(parent) / name for name in names)
    files = sorted(p for p in found if p.is_file() and not p.name.startswith(".") and _plain_suffix(p) not in _SKIP_SUFFIXES)
    return files, errors


def resolve_corpus_files(patterns: list[str], stats: CorpusStats | None = None) -> list[Path]:
    """Expand files, directories (recursively) and globs into a sorted, de-duplicated file list.

    A subdirectory that cannot be read is skipped; with `stats` it is also named in a warning and in
    stats.skipped_files (the callers that only list the files pass none, so it is said once).
    """
    if not patterns:
        raise LmforgeError("no corpus given: data.corpus lists files, directories or globs")
    files: list[Path] = []
    for pattern in patterns:
        if not pattern.strip():  # Path("") is the working directory
            raise LmforgeError("data.corpus holds an empty path: give a file, directory or glob ('.' for this directory)")
        if pattern.startswith("builtin:"):
            name = pattern.removeprefix("builtin:")
            path = SAMPLE_DATA_DIR / f"{name}.txt"
            if not path.is_file():
                shipped = ", ".join(sorted(p.stem for p in SAMPLE_DATA_DIR.glob("*.txt")))
                raise LmforgeError(f"unknown built-in corpus {pattern!r} (shipped: {shipped})")
            files.append(path)
            continue
        path = Path(pattern).expanduser()
        if path.is_dir():
            found, errors = _walk(path)
            if not found:
                unreadable = f" (cannot read {errors[0].filename}: {errors[0].strerror})" if errors else ""
                raise LmforgeError(f"corpus directory {path} holds no text files{unreadable}")
            for error in errors if stats is not None else ():
                _skip(stats, Path(error.filename), f"directory cannot be read: {error.strerror}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        elif any(ch in pattern for ch in "*?["):
            found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            if not found:
                raise LmforgeError(f"corpus glob {pattern!r} matches no files")
            files.extend(found)
        else:
            raise LmforgeError(f"corpus file not found: {pattern}")
    unique = list(dict.fromkeys(p.resolve() for p in files))
    return unique


def _open_binary(path: Path) -> IO[bytes]:
    opener = _OPENERS.get(path.suffix.lower())
    return opener(path, "rb") if opener else open(path, "rb")


def _head(path: Path) -> bytes:
    with _open_binary(path) as fh:
        return fh.read(8192)


def _bom_encoding(head: bytes) -> str | None:
    return next((codec for bom, codec in _BOMS if head.startswith(bom)), None)


def _likely_encoding(head: bytes) -> str | None:
    """The UTF-16 / UTF-32 layout that NUL bytes in fixed positions suggest (mostly-ASCII text without a BOM)."""
    def zeros(offset: int, step: int) -> float:
        column = head[offset:len(head) - len(head) % step:step]
        return column.count(0) / len(column) if column else 0.0

    layouts = (("UTF-32-LE", 4, (1, 2, 3), 0), ("UTF-32-BE", 4, (0, 1, 2), 3),
               ("UTF-16-LE", 2, (1,), 0), ("UTF-16-BE", 2, (0,), 1))
    for name, step, empty, full in layouts:
        if len(head) >= 4 * step and all(zeros(o, step) > 0.9 for o in empty) and zeros(full, step) < 0.1:
            return name
    return None


def _kind(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    suffix = _plain_suffix(path)
    return "jsonl" if suffix in _JSONL_SUFFIXES else "parquet" if suffix in _PARQUET_SUFFIXES else "txt"


def iter_documents(
    patterns: list[str],
    fmt: str = "auto",
    text_field: str = "text",
    txt_documents: str = "file",
    encoding_errors: str = "replace",
    stats: CorpusStats | None = None,
) -> Iterator[Document]:
    """Yield every non-empty Document of the corpus, file by file, in a stable order."""
    stats = stats if stats is not None else CorpusStats()
    for path in resolve_corpus_files(patterns, stats):
        yield from _iter_file(path, fmt, text_field, txt_documents, encoding_errors, stats)


def _skip(stats: CorpusStats, path: Path, why: str) -> None:
    stats.skipped_files.append(f"{path} ({why})")
    log.warning(f"warning: skipping {path}: {why}")


def _iter_file(path: Path, fmt: str, text_field: str, txt_documents: str, encoding_errors: str,
               stats: CorpusStats) -> Iterator[Document]:
    documents_before, skipped_before = stats.documents, len(stats.skipped_files)
    try:
        yield from _read_file(path, fmt, text_field, txt_documents, encoding_errors, stats)
    except (OSError, EOFError, lzma.LZMAError) as exc:
        _skip(stats, path, f"unreadable: {exc}")
    finally:
        stats.files += 1
    # reached only when the file was read to its end (not when the reader stopped early)
    if stats.documents == documents_before and len(stats.skipped_files) == skipped_before:
        _skip(stats, path, "empty: no text in it")


def _read_file(path: Path, fmt: str, text_field: str, txt_documents: str, encoding_errors: str,
               stats: CorpusStats) -> Iterator[Document]:
    kind = _kind(path, fmt)
    if kind == "parquet":
        yield from _iter_parquet(path, text_field, stats)
        return
    head = _head(path)
    encoding = _bom_encoding(head) or "utf-8"
    if encoding == "utf-8" and b"\x00" in head:
        likely = _likely_encoding(head)
        _skip(stats, path, "binary file" if likely is None else
              f"binary file; it looks like {likely} text without a byte-order mark: convert it to UTF-8, "
              f"e.g. iconv -f {likely.replace('-LE', 'LE').replace('-BE', 'BE')} -t UTF-8")
        return
    with _open_binary(path) as raw:
        if kind == "txt" and txt_documents == "file":
            yield from _txt_whole(path, raw.read(), encoding, encoding_errors, stats)
            return
        if encoding in ("utf-16", "utf-32"):  # lines cannot be cut on b"\n" here: decode the whole file
            text, replaced = _decode(raw.read(), encoding, encoding_errors)
            if text is None:
                _skip(stats, path, f"not valid {encoding.upper()} (data.encoding_errors=skip)")
                return
            lines = ((n, line, replaced) for n, line in enumerate(io.StringIO(text, newline="\n"), start=1))
        else:
            lines = _utf8_lines(raw, encoding_errors)
        yield from _iter_lines(path, lines, kind, text_field, txt_documents, stats)


def _iter_parquet(path: Path, column: str, stats: CorpusStats) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        schema = parquet.schema_arrow
        if column not in schema.names:
            raise LmforgeError(f"{path}: no column {column!r} (found: {', '.join(schema.names)}); set data.text_field")
        kind = schema.field(column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise LmforgeError(f"{path}: column {column!r} holds {kind}, not text; set data.text_field")
        row = 0
        for group in range(parquet.num_row_groups):  # one row group in memory at a time
            for value in parquet.read_row_group(group, columns=[column]).column(0).to_pylist():
                row += 1
                if value is None:
                    stats.empty_documents += 1
                else:
                    yield from _emit(value, f"{path}:row {row}", stats)
    except pa.ArrowException as exc:
        _skip(stats, path, f"not a readable parquet file: {exc}")


def _decode(data: bytes, encoding: str, encoding_errors: str) -> tuple[str | None, bool]:
    try:
        return data.decode(encoding), False
    except UnicodeDecodeError:
        if encoding_errors == "skip":
            return None, True
        return data.decode(encoding, errors="replace"), True


def _utf8_lines(raw: IO[bytes], encoding_errors: str) -> Iterator[tuple[int, str | None, bool]]:
    """(line number, text or None when undecodable and skipped, whether bytes were replaced) per line."""
    for lineno, line_bytes in enumerate(raw, start=1):
        if lineno == 1 and line_bytes.startswith(codecs.BOM_UTF8):
            line_bytes = line_bytes[len(codecs.BOM_UTF8):]
        yield (lineno, *_decode(line_bytes, "utf-8", encoding_errors))


def _emit(text: str, source: str, stats: CorpusStats) -> Iterator[Document]:
    if not text.strip():
        stats.empty_documents += 1
        return
    stats.documents += 1
    stats.bytes += len(text.encode("utf-8"))
    yield Document(text, source)


def _txt_whole(path: Path, data: bytes, encoding: str, encoding_errors: str, stats: CorpusStats) -> Iterator[Document]:
    text, replaced = _decode(data, encoding, encoding_errors)
    if text is None:
        _skip(stats, path, f"not valid {encoding.removesuffix('-sig').upper()} (data.encoding_errors=skip)")
        return
    stats.files_with_replaced_bytes += int(replaced)
    yield from _emit(text, str(path), stats)


def _iter_lines(path: Path, lines: Iterator[tuple[int, str | None, bool]], kind: str, text_field: str,
                txt_documents: str, stats: CorpusStats) -> Iterator[Document]:
    paragraph: list[str] = []
    paragraph_start = 1
    replaced_any = False
    for lineno, line, replaced in lines:
        if line is None:
            log.warning(f"warning: {path}:{lineno}: not valid UTF-8, line skipped")
            replaced_any = True
            continue
        replaced_any |= replaced
        if kind == "jsonl":
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                stats.bad_json_lines += 1
                log.warning(f"warning: {path}:{lineno}: malformed JSON line skipped ({exc.msg})")
                continue
            if not isinstance(record, dict) or text_field not in record:
                keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                raise LmforgeError(f"{path}:{lineno}: no field {text_field!r} (found: {keys}); set data.text_field")
            value = record[text_field]
            if not isinstance(value, str):
                raise LmforgeError(f"{path}:{lineno}: field {text_field!r} is {type(value).__name__}, not text")
            yield from _emit(value, f"{path}:{lineno}", stats)
        elif txt_documents == "line":
            yield from _emit(line.rstrip("\r\n"), f"{path}:{lineno}", stats)
        else:  # paragraph: blank lines separate documents
            if line.strip():
                if not paragraph:
                    paragraph_start = lineno
                paragraph.append(line)
            elif paragraph:
                yield from _emit("".join(paragraph).rstrip("\r\n"), f"{path}:{paragraph_start}", stats)
                paragraph = []
    if paragraph:
        yield from _emit("".join(paragraph).rstrip("\r\n"), f"{path}:{paragraph_start}", stats)
    stats.files_with_replaced_bytes += int(replaced_any)
