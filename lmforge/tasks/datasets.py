"""Labeled examples from TSV / CSV / JSONL task files: single sentences or pairs, class labels or scores.

TSV is read as GLUE writes it: split on tabs only, quotes are ordinary characters (csv.QUOTE_NONE).
CSV follows RFC 4180 quoting and refuses a malformed quote. JSONL holds one object per line.
Every row must have as many fields as the header (or as the first row); anything else is refused
with the file, line and column, since a stray tab silently shifts every column after it.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from lmforge.errors import LmforgeError
from lmforge.tasks.config import Column, TaskConfig, label_text, resolve_task_config
from lmforge.tasks.metrics import check_metric_names

SUFFIX_FORMATS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl"}


@dataclass(frozen=True)
class Example:
    text: str
    text_pair: Optional[str]  # None for single-sentence tasks
    # class index into TaskData.label_names, the target of a regression task, or a generation task's response
    label: Union[int, float, str]
    source: str  # "path:line", for messages


@dataclass
class TaskData:
    config: TaskConfig  # resolved: metrics and select_metric are filled in
    train: list[Example]
    dev: list[Example]
    label_names: list[str]  # class index -> label as written in the files; empty for regression

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def is_pair(self) -> bool:
        return self.config.text_pair is not None

    @property
    def is_regression(self) -> bool:
        return self.config.kind == "regression"

    @property
    def is_generation(self) -> bool:
        return self.config.kind == "generation"

    @property
    def num_outputs(self) -> int:
        """Width of the prediction head: the number of classes, or 1 for a regression score."""
        return 1 if self.is_regression else len(self.label_names)

    @property
    def positive_index(self) -> Optional[int]:
        """The class binary F1 scores: positive_label, else the label "1", else class 1; None unless binary."""
        if self.is_regression or len(self.label_names) != 2:
            return None
        if self.config.positive_label is not None:
            return self.label_names.index(self.config.positive_label)
        return self.label_names.index("1") if "1" in self.label_names else 1


@dataclass
class _Row:
    text: str
    text_pair: Optional[str]
    label: str
    line: int


def _columns(config: TaskConfig) -> list[tuple[str, Optional[Column]]]:
    return [("text", config.text), ("text_pair", config.text_pair), ("label", config.label)]


def _column_name(column: Column, fmt: str) -> str:
    if fmt == "jsonl":
        return f"field {column!r}"
    return f"column {column!r}" if isinstance(column, str) else f"column {column}"


def _file_format(path: Path, config: TaskConfig) -> str:
    if config.format != "auto":
        return config.format
    fmt = SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise LmforgeError(f"{path}: cannot tell the format from the suffix {path.suffix!r} "
                           f"(use .tsv, .csv or .jsonl, or set format)")
    return fmt


def _read_text(path: Path, encoding: str) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise LmforgeError(f"{path}: no such file") from None
    except OSError as err:
        raise LmforgeError(f"{path}: cannot read ({err.strerror})") from None
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise LmforgeError(f"{path}:{line}: byte {column} of the line is not valid {encoding} "
                           f"(set encoding in task.yaml)") from None
    return text.removeprefix("\ufeff")


def _delimited_rows(path: Path, text: str, fmt: str, config: TaskConfig) -> Iterator[_Row]:
    if fmt == "tsv":
        reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: Optional[list[str]] = None
    index: dict[str, int] = {}
    width = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise LmforgeError(f"{path}:{reader.line_num}: unparseable row ({err})") from None
        line = reader.line_num
        if not row or (len(row) == 1 and not row[0].strip()):
            continue  # blank line
        if not width:  # the first row fixes the columns
            width = len(row)
            if config.header:
                header = [name.strip() for name in row]
            for key, column in _columns(config):
                if column is None:
                    continue
                if isinstance(column, str):
                    if header is None:
                        raise LmforgeError(f"{path}: {key} is the column name {column!r} but the file has no "
                                           f"header row; give a 0-based column index")
                    if column not in header:
                        raise LmforgeError(f"{path}:{line}: no column {column!r} for {key} "
                                           f"(the header has: {', '.join(map(repr, header))})")
                    index[key] = header.index(column)
                elif column >= width:
                    raise LmforgeError(f"{path}:{line}: no column {column} for {key} (the row has {width} "
                                       f"columns, 0 to {width - 1})")
                else:
                    index[key] = column
            if header is not None:
                continue
        if len(row) != width:
            hint = " (a tab inside a field?)" if fmt == "tsv" else ""
            raise LmforgeError(f"{path}:{line}: unparseable row: {len(row)} fields where the "
                               f"{'header' if header else 'first row'} has {width}{hint}")
        yield _Row(text=row[index["text"]].strip(),
                   text_pair=row[index["text_pair"]].strip() if "text_pair" in index else None,
                   label=row[index["label"]].strip(), line=line)


def jsonl_objects(path: Path, text: str, python_literals: bool = False) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL text; a line that is no object is one error
    naming the file and line. python_literals: also read lines that are Python dict literals (single quotes,
    as DialogSum's train file has) with ast.literal_eval, which evaluates literals only, never code."""
    for line, raw in enumerate(io.StringIO(text, newline=""), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as err:
            if not python_literals:
                raise LmforgeError(f"{path}:{line}: not valid JSON ({err.msg} at column {err.colno})") from None
            try:
                obj = ast.literal_eval(raw.strip())
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                raise LmforgeError(f"{path}:{line}: neither JSON ({err.msg} at column {err.colno}) nor a "
                                   f"Python literal") from None
        if not isinstance(obj, dict):
            raise LmforgeError(f"{path}:{line}: expected a JSON object, got {type(obj).__name__}")
        yield line, obj


def _jsonl_rows(path: Path, text: str, config: TaskConfig) -> Iterator[_Row]:
    for line, obj in jsonl_objects(path, text):
        values: dict[str, Optional[str]] = {"text_pair": None}
        for key, field in _columns(config):
            if field is None:
                continue
            if isinstance(field, int):
                raise LmforgeError(f"{path}: {key} is the column index {field}, but JSONL fields are named")
            if field not in obj:
                raise LmforgeError(f"{path}:{line}: no field {field!r} for {key} "
                                   f"(the object has: {', '.join(map(repr, obj))})")
            value = obj[field]
            if key == "label" and isinstance(value, (str, int, float, bool)):
                values[key] = label_text(value)
            elif key != "label" and isinstance(value, str):
                values[key] = value.strip()
            else:
                raise LmforgeError(f"{path}:{line}: field {field!r} must be "
                                   f"{'a string or number' if key == 'label' else 'a string'}, got {value!r}")
        yield _Row(text=values["text"], text_pair=values["text_pair"], label=values["label"], line=line)


def _sorted_labels(labels: set[str]) -> list[str]:
    """Integers in numeric order ('2' before '10'), anything else in string order."""
    try:
        return sorted(labels, key=int)
    except ValueError:
        return sorted(labels)


def read_examples(path: str | os.PathLike, config: TaskConfig,
                  label_names: Optional[Sequence[str]] = None) -> tuple[list[Example], list[str]]:
    """Read one split. The label set is `label_names`, else config.labels, else the labels in this file.

    Returns the examples and the label set (class index -> label text; empty for regression).
    """
    path = Path(path)
    fmt = _file_format(path, config)
    text = _read_text(path, config.encoding)
    rows = list(_jsonl_rows(path, text, config) if fmt == "jsonl" else _delimited_rows(path, text, fmt, config))
    if not rows:
        raise LmforgeError(f"{path}: no examples (the split is empty)")
    column = _column_name(config.label, fmt)
    for row in rows:
        if not row.label:
            raise LmforgeError(f"{path}:{row.line}: {column}: the label is empty")
    names: list[str] = []
    if config.kind == "generation":

        def target(row: _Row) -> str:
            return row.label
    elif config.kind == "regression":

        def target(row: _Row) -> float:
            try:
                value = float(row.label)
            except ValueError:
                value = math.nan
            if not math.isfinite(value):
                raise LmforgeError(f"{path}:{row.line}: {column}: {row.label!r} is not a finite number")
            return value
    else:
        declared = label_names if label_names is not None else config.labels
        names = list(declared) if declared is not None else _sorted_labels({row.label for row in rows})
        class_of = {name: i for i, name in enumerate(names)}

        def target(row: _Row) -> int:
            if row.label not in class_of:
                raise LmforgeError(f"{path}:{row.line}: {column}: the label is {row.label!r}, which is not in "
                                   f"the label set {names}")
            return class_of[row.label]
    return [Example(row.text, row.text_pair, target(row), f"{path}:{row.line}") for row in rows], names


def split_file(config: TaskConfig, split: str) -> Path:
    """The file of `split` ('train' or 'dev'): {split}_file if set, else the one {split}.tsv/.csv/.jsonl present."""
    folder = Path(config.path)
    given = getattr(config, f"{split}_file")
    if given is not None:
        path = folder / given
        if not path.is_file():
            raise LmforgeError(f"{path}: no such file (set by {split}_file)")
        return path
    suffixes = [s for s, fmt in SUFFIX_FORMATS.items() if config.format in ("auto", fmt)]
    found = [folder / f"{split}{s}" for s in suffixes if (folder / f"{split}{s}").is_file()]
    if len(found) != 1:
        looked = ", ".join(f"{split}{s}" for s in suffixes)
        problem = "no" if not found else "more than one"
        raise LmforgeError(f"{folder}: {problem} {split} file (looked for {looked}; set {split}_file in task.yaml)")
    return found[0]


def load_task(task: str | os.PathLike | TaskConfig, data_root: Optional[str | os.PathLike] = None,
              overrides: Sequence[str] = ()) -> TaskData:
    """Train and dev splits of a task: a TaskConfig, a task directory, or a GLUE name under data_root."""
    config = task.validate() if isinstance(task, TaskConfig) else resolve_task_config(task, data_root, overrides)
    train_path = split_file(config, "train")
    train, names = read_examples(train_path, config)
    if config.kind == "classification":
        if len(names) < 2:
            raise LmforgeError(f"{train_path}: every example has the label {names[0]!r}; "
                               f"a classification task needs at least two classes")
        check_metric_names(config.metrics, config.kind, len(names))
        if config.positive_label is not None and config.positive_label not in names:
            raise LmforgeError(f"{train_path}: positive_label {config.positive_label!r} is not among the labels "
                               f"{names}")
    dev, _ = read_examples(split_file(config, "dev"), config, names if config.kind == "classification" else None)
    return TaskData(config=config, train=train, dev=dev, label_names=names)


def subsample(examples: Sequence[Example], fraction: float, seed: int) -> list[Example]:
    """A label budget: `fraction` of each class (at least one), chosen by `seed`, in the original order.

    Stratified by class for classification; a plain random sample for regression. The same seed
    gives nested subsets: what 10% keeps, 30% keeps too.
    """
    if not 0.0 < fraction <= 1.0:
        raise LmforgeError(f"subsample fraction must be in (0, 1], got {fraction}")
    labels = np.asarray([e.label if isinstance(e.label, int) else 0 for e in examples], dtype=np.int64)
    keep: list[int] = []
    for cls in np.unique(labels).tolist():
        members = np.flatnonzero(labels == cls)
        count = max(1, math.floor(fraction * len(members) + 0.5))
        order = np.random.default_rng([seed, cls]).permutation(len(members))
        keep.extend(members[order[:count]].tolist())
    return [examples[i] for i in sorted(keep)]
