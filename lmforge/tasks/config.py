"""TaskConfig: where a labeled task's files are and how to read them; the GLUE layouts by name.

A task is a directory holding `train.{tsv,csv,jsonl}` and `dev.{...}`, optionally with a
`task.yaml` of TaskConfig keys. The GLUE folders (CoLA, SST-2, MRPC, STS-B, WNLI) need no
task.yaml: their layout is known here and recognised by the folder's name, or asked for by name
(`cola`, `sst-2`, ...) under a GLUE root directory.
"""

from __future__ import annotations

import codecs
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

from lmforge.config import RECIPES_DIR, ParallelConfig, apply_overrides, check_seed, from_dict, read_yaml
from lmforge.errors import LmforgeError
from lmforge.model.config import ModelConfig
from lmforge.tasks.metrics import KIND_METRICS, check_metric_names, selection_metric

DEFAULT_GLUE_ROOT = "../shared/data/glue"  # relative to the working directory, as the shipped recipes' corpora
TASK_YAML = "task.yaml"

Column = Union[int, str]  # a header name, or a 0-based field index


@dataclass
class TaskConfig:
    name: str = "task"
    path: str = ""  # the task directory
    # generation: prompt/response pairs (text = the prompt, label = the response) for decoders
    # tokens: a tag per word (NER); span: an answer span in a passage (SQuAD); seq2seq: input text -> target text
    kind: Literal["classification", "regression", "generation", "tokens", "span", "seq2seq"] = "classification"
    # auto: from each file's suffix (.conll/.txt: conll, .json: squad); conll: word-per-line columns (tokens);
    # squad: SQuAD v1.1 JSON (span); parallel: PREFIX.LANG[.gz] line files (seq2seq)
    format: Literal["auto", "tsv", "csv", "jsonl", "conll", "squad", "parallel"] = "auto"
    header: bool = True  # tsv/csv: the first row names the columns
    text: Column = "text"
    text_pair: Optional[Column] = None  # the second sentence of pair tasks; None: single-sentence
    label: Column = "label"
    # The label set, in class-index order. None: the labels seen in train, sorted (numerically when all are integers).
    labels: Optional[list[str]] = None
    positive_label: Optional[str] = None  # the class binary F1 scores; None: "1" if a label is "1", else the second
    metrics: Optional[list[str]] = None  # None: accuracy (classification) or spearman, pearson (regression)
    select_metric: Optional[str] = None  # the dev metric that picks the best checkpoint; None: the first of metrics
    train_file: Optional[str] = None  # relative to path; None: train.tsv, train.csv or train.jsonl
    dev_file: Optional[str] = None
    encoding: str = "utf-8"  # a UTF-8 byte-order mark is dropped either way
    # Structured kinds (tokens, span, seq2seq); JSONL fields are `text` and `label` (defaults: tokens/tags
    # for tokens, input/target for seq2seq).
    word_column: int = 0  # tokens, conll: the word's column (0-based; negative counts from the end)
    tag_column: int = -1  # tokens, conll: the tag's column (-1: the last)
    scheme: Literal["IOB1", "IOB2", "BIOES"] = "IOB2"  # tokens: the tagging scheme of the files
    entity_mode: Literal["conlleval", "strict"] = "conlleval"  # tokens: seqeval's default chunking, or strict
    label_all_subwords: bool = False  # tokens: every subword carries its word's tag (else one only)
    # tokens: the subword a word is labelled and predicted at; last suits a causal (GPT) model, which
    # reads the whole word only there
    label_subword: Literal["first", "last"] = "first"
    stride: Optional[int] = None  # tokens / span: tokens shared by consecutive windows; None: 32 / 128
    max_answer_length: int = 30  # span: the longest answer predicted, in tokens
    held_out_articles: int = 0  # span: > 0: dev = this many whole articles of the train file, drawn by split_seed
    split_seed: int = 0
    source_language: Optional[str] = None  # seq2seq, parallel: the input side's suffix (train.en.gz: en)
    target_language: Optional[str] = None
    prompt: str = "{input}\n"  # seq2seq on a decoder: the text before the target ({input}: the input)
    max_target_length: int = 128  # seq2seq: target tokens trained on and generated at most
    strict: bool = False  # bad pairs / QA offsets / over-long inputs are errors instead of skipped or cut and counted

    def validate(self, prefix: str = "task") -> "TaskConfig":
        if not Path(self.path).is_dir():
            raise LmforgeError(f"{prefix}.path must be the task directory, got {self.path!r}")
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise LmforgeError(f"{prefix}.encoding: unknown encoding {self.encoding!r}") from None
        if self.kind in KIND_METRICS:
            return self._validate_structured(prefix)
        if self.kind == "generation":
            for key in ("text_pair", "labels", "positive_label", "metrics", "select_metric"):
                if getattr(self, key) is not None:
                    raise LmforgeError(f"{prefix}.{key} does not apply to a generation task "
                                       f"(it is scored by the loss on the dev responses)")
            return self._check_columns(prefix)
        if self.metrics is None:
            self.metrics = ["accuracy"] if self.kind == "classification" else ["spearman", "pearson"]
        try:
            check_metric_names(self.metrics, self.kind, len(self.labels) if self.labels is not None else None)
        except LmforgeError as err:
            raise LmforgeError(f"{prefix}.metrics: {err}") from None
        try:
            self.select_metric = selection_metric(self.metrics, self.select_metric)
        except LmforgeError as err:
            raise LmforgeError(f"{prefix}.select_metric: {err}") from None
        if self.kind == "regression":
            for key in ("labels", "positive_label"):
                if getattr(self, key) is not None:
                    raise LmforgeError(f"{prefix}.{key} does not apply to a regression task")
        if self.labels is not None:
            if len(self.labels) < 2:
                raise LmforgeError(f"{prefix}.labels must list at least two labels, got {self.labels}")
            if len(set(self.labels)) != len(self.labels):
                raise LmforgeError(f"{prefix}.labels lists a label twice: {self.labels}")
            if self.positive_label is not None and self.positive_label not in self.labels:
                raise LmforgeError(f"{prefix}.positive_label {self.positive_label!r} is not in {prefix}.labels "
                                   f"{self.labels}")
        return self._check_columns(prefix)

    def _validate_structured(self, prefix: str) -> "TaskConfig":
        """The checks of the tokens / span / seq2seq kinds."""
        formats = STRUCTURED_FORMATS[self.kind]
        if self.format not in formats:
            raise LmforgeError(f"{prefix}.format {self.format!r} does not apply to a {self.kind} task "
                               f"(choose from {', '.join(formats)})")
        for key in ("text_pair", "positive_label"):
            if getattr(self, key) is not None:
                raise LmforgeError(f"{prefix}.{key} does not apply to a {self.kind} task")
        if self.labels is not None and self.kind != "tokens":
            raise LmforgeError(f"{prefix}.labels does not apply to a {self.kind} task")
        if self.metrics is None:
            self.metrics = list(KIND_METRICS[self.kind])
        if self.stride is None and self.kind in DEFAULT_STRIDE:
            self.stride = DEFAULT_STRIDE[self.kind]
        try:
            check_metric_names(self.metrics, self.kind)
            self.select_metric = selection_metric(self.metrics, self.select_metric)
        except LmforgeError as err:
            raise LmforgeError(f"{prefix}.metrics: {err}") from None
        if self.stride is not None and self.stride < 0:
            raise LmforgeError(f"{prefix}.stride must be >= 0 tokens, got {self.stride}")
        for key in ("max_answer_length", "max_target_length"):
            if getattr(self, key) <= 0:
                raise LmforgeError(f"{prefix}.{key} must be positive, got {getattr(self, key)}")
        if self.held_out_articles < 0 or (self.held_out_articles and self.kind != "span"):
            raise LmforgeError(f"{prefix}.held_out_articles splits a span task's file by article (>= 0), "
                               f"got {self.held_out_articles}")
        if self.held_out_articles and self.dev_file is not None:
            raise LmforgeError(f"{prefix}.held_out_articles takes the dev split from the train file; "
                               f"{prefix}.dev_file names another one (set one of them)")
        if self.kind == "tokens":
            if self.word_column == self.tag_column:
                raise LmforgeError(f"{prefix}.word_column and {prefix}.tag_column are both {self.word_column}")
            # that every tag fits the scheme is checked with the files (tagging.load_tagging_task)
            if self.labels is not None and len(set(self.labels)) != len(self.labels):
                raise LmforgeError(f"{prefix}.labels lists a tag twice: {self.labels}")
        parallel = self.format == "parallel"
        languages = (self.source_language, self.target_language)
        if parallel and None in languages:
            raise LmforgeError(f"{prefix}.format parallel needs {prefix}.source_language and "
                               f"{prefix}.target_language (the file suffixes, e.g. en and de)")
        if not parallel and languages != (None, None):
            raise LmforgeError(f"{prefix}.source_language / target_language name the sides of format parallel")
        if self.kind == "seq2seq" and "{input}" not in self.prompt:
            raise LmforgeError(f"{prefix}.prompt must contain {{input}}, got {self.prompt!r}")
        if self.format in ("jsonl", "auto"):
            for key in ("text", "label"):
                if isinstance(getattr(self, key), int):
                    raise LmforgeError(f"{prefix}.{key}: JSONL fields are named, got the index {getattr(self, key)}")
        return self

    def _check_columns(self, prefix: str) -> "TaskConfig":
        columns = [(k, getattr(self, k)) for k in ("text", "text_pair", "label") if getattr(self, k) is not None]
        for key, column in columns:
            if isinstance(column, int) and column < 0:
                raise LmforgeError(f"{prefix}.{key} must be a column name or an index >= 0, got {column}")
            if self.format == "jsonl" and isinstance(column, int):
                raise LmforgeError(f"{prefix}.{key}: JSONL fields are named, got the index {column}")
            if self.format in ("tsv", "csv") and not self.header and isinstance(column, str):
                raise LmforgeError(f"{prefix}.{key}: a file without a header row needs a column index, "
                                   f"got the name {column!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


STRUCTURED_FORMATS = {"tokens": ("auto", "conll", "jsonl"), "span": ("auto", "squad"),
                      "seq2seq": ("auto", "jsonl", "tsv", "csv", "parallel")}
# JSONL field names of the structured kinds when task.text / task.label are not given.
STRUCTURED_FIELDS = {"tokens": ("tokens", "tags"), "seq2seq": ("input", "target")}
DEFAULT_STRIDE = {"tokens": 32, "span": 128}


# Canonical name -> (folder name in the GLUE distribution, TaskConfig keys). Layouts as in
# ../shared/data/glue/PROVENANCE.md; metrics as GLUE reports them, the first being the one to select on.
GLUE_TASKS: dict[str, tuple[str, dict[str, Any]]] = {
    "cola": ("CoLA", dict(format="tsv", header=False, text=3, label=1, labels=["0", "1"], metrics=["mcc"])),
    "sst2": ("SST-2", dict(format="tsv", text="sentence", label="label", labels=["0", "1"],
                           metrics=["accuracy"])),
    "mrpc": ("MRPC", dict(format="tsv", text="#1 String", text_pair="#2 String", label="Quality",
                          labels=["0", "1"], positive_label="1", metrics=["f1", "accuracy"])),
    "stsb": ("STS-B", dict(kind="regression", format="tsv", text="sentence1", text_pair="sentence2",
                           label="score", metrics=["spearman", "pearson"])),
    "wnli": ("WNLI", dict(format="tsv", text="sentence1", text_pair="sentence2", label="label",
                          labels=["0", "1"], metrics=["accuracy"])),
}


def label_text(value: Any) -> str:
    """A label as text, alike from a TSV field, a JSON value or YAML: 1 and 1.0 -> '1', true -> 'true'."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return value.strip() if isinstance(value, str) else str(value)


def glue_name(name: str) -> Optional[str]:
    """'SST-2', 'sst2', 'sst_2' -> 'sst2'; None for a name that is not a GLUE task known here."""
    key = name.lower().replace("-", "").replace("_", "")
    return key if key in GLUE_TASKS else None


def _locate(task: str, data_root: Optional[str | os.PathLike]) -> tuple[Path, Optional[str]]:
    """The task directory and, when it is a GLUE task, its canonical name."""
    path = Path(task).expanduser()
    if path.is_dir():
        return path.resolve(), glue_name(path.name)
    name = glue_name(task)
    if name is None:
        known = ", ".join(folder for folder, _ in GLUE_TASKS.values())
        raise LmforgeError(f"task {task!r} is neither a directory nor a GLUE task name (known: {known})")
    root = Path(data_root if data_root is not None else DEFAULT_GLUE_ROOT).expanduser()
    folder = root / GLUE_TASKS[name][0]
    if not folder.is_dir():
        raise LmforgeError(f"GLUE task {task!r}: no directory {folder} (give the task directory, or the GLUE root)")
    return folder.resolve(), name


def task_recipe(task: str) -> Optional[Path]:
    """The task recipe `task` names, if any: a .yaml file, or a shipped configs/NAME.yaml with a `task` section."""
    path = Path(task).expanduser()
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    if path.is_dir() or os.sep in task or not task:
        return None
    shipped = RECIPES_DIR / f"{task}.yaml"
    return shipped if shipped.is_file() and "task" in read_yaml(shipped) else None


def _recipe_section(recipe: Path, section: str) -> dict[str, Any]:
    data = read_yaml(recipe).get(section, {})
    if not isinstance(data, dict):
        raise LmforgeError(f"{recipe}: `{section}` must be a mapping of keys, got {data!r}")
    return data


def recipe_finetune(task: str | os.PathLike) -> dict[str, Any]:
    """The `finetune` settings a task recipe states (its budget and learning rate); {} for anything else."""
    recipe = task_recipe(str(task))
    return _recipe_section(recipe, "finetune") if recipe is not None else {}


def resolve_task_config(task: str | os.PathLike, data_root: Optional[str | os.PathLike] = None,
                        overrides: Sequence[str] = ()) -> TaskConfig:
    """TaskConfig for a task recipe, task directory or GLUE name: the GLUE layout, then task.yaml, then
    `key=value` overrides. A recipe's `task` section names its directory in `path`, relative to the
    working directory (as the shipped recipes' corpora)."""
    recipe = task_recipe(str(task))
    if recipe is not None:
        data: dict[str, Any] = {"name": recipe.stem, **_recipe_section(recipe, "task")}
        apply_overrides(data, list(overrides))
        folder = Path(str(data.get("path", ""))).expanduser()
        if not data.get("path") or not folder.is_dir():
            raise LmforgeError(f"{recipe}: task.path must be the task's data directory, got {data.get('path')!r} "
                               f"(relative to the working directory {Path.cwd()})")
        data["path"] = str(folder.resolve())
        yaml_path = recipe
    else:
        folder, name = _locate(str(task), data_root)
        data = {"name": name or folder.name}
        if name is not None:
            data.update(GLUE_TASKS[name][1])
        yaml_path = folder / TASK_YAML
        if yaml_path.is_file():
            data.update(read_yaml(yaml_path))
        data["path"] = str(folder)
        apply_overrides(data, list(overrides))
    if data.get("kind") == "generation":  # JSONL prompt/response files by default
        data.setdefault("text", "prompt")
        data.setdefault("label", "response")
    if data.get("kind") in STRUCTURED_FIELDS:
        data.setdefault("text", STRUCTURED_FIELDS[data["kind"]][0])
        data.setdefault("label", STRUCTURED_FIELDS[data["kind"]][1])
    # YAML reads `labels: [0, 1]` as integers; labels are compared as the strings in the files.
    if isinstance(data.get("labels"), list):
        data["labels"] = [label_text(v) for v in data["labels"]]
    if data.get("positive_label") is not None:
        data["positive_label"] = label_text(data["positive_label"])
    where = str(yaml_path) if yaml_path.is_file() else str(folder)
    try:
        return from_dict(TaskConfig, data).validate()
    except LmforgeError as err:
        raise LmforgeError(f"{where}: {err}") from None


def find_split_file(config: TaskConfig, split: str, suffixes: Sequence[str]) -> Path:
    """The file of `split` of a structured task: {split}_file if set, else the one {split}{suffix} present."""
    folder = Path(config.path)
    given = getattr(config, f"{split}_file")
    if given is not None:
        path = folder / given
        if not path.is_file() and config.format != "parallel":
            raise LmforgeError(f"{path}: no such file (set by task.{split}_file)")
        return path
    found = [folder / f"{split}{s}" for s in suffixes if (folder / f"{split}{s}").is_file()]
    if len(found) != 1:
        problem = "no" if not found else "more than one"
        raise LmforgeError(f"{folder}: {problem} {split} file (looked for {', '.join(split + s for s in suffixes)}; "
                           f"set task.{split}_file)")
    return found[0]


@dataclass
class FinetuneConfig:
    """How a fine-tune trains: the `finetune` section of a fine-tuned run's config.yaml."""

    # pretrained: start from the base run's weights; random: its shape and tokenizer, fresh weights (the control)
    init: Literal["pretrained", "random"] = "pretrained"
    # adamw; adafactor: torch's Adafactor, steps relative to each matrix's RMS (T5's fine-tuning optimizer)
    optimizer: Literal["adamw", "adafactor"] = "adamw"
    lr: float = 1e-4  # peak learning rate of the Transformer's top layer
    head_lr: Optional[float] = None  # the new head's peak learning rate (None: lr)
    layer_lr_decay: float = 1.0  # layer l of L trains at lr * decay**(L - l), the embeddings at decay**L (1: off)
    epochs: float = 3.0
    steps: int = 0  # > 0: exactly this many optimizer steps, whatever epochs says
    batch_size: int = 32  # examples per optimizer step, all processes together
    micro_batch_size: int = 0  # examples per forward/backward pass on one process; 0 = batch_size / processes
    max_length: int = 128  # tokens per input, special tokens included; pairs are cut longest-first
    warmup: float = 0.1  # fraction of the steps with linear warm-up; then linear decay to 0
    weight_decay: float = 0.01
    grad_clip: float = 1.0  # 0 disables clipping
    dropout: float = 0.1  # in the Transformer and before the head
    patience: int = 0  # early stopping: dev evaluations without a better score before stopping (0: off)
    label_fraction: float = 1.0  # label budget: this fraction of each class of train (nested across fractions)
    seed: int = 42  # head init, data order, dropout and the label budget's sample
    eval_every: int = 0  # steps between dev evaluations (0: once per epoch); always after the last step
    log_every: int = 10
    keep_checkpoints: int = 1  # newest K checkpoints kept besides the best (0: all)
    max_bad_steps: int = 5  # consecutive non-finite steps (each update skipped) before the run stops
    device: str = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"
    generate_tokens: int = 64  # generation tasks: greedy response length for samples.jsonl and predict
    num_beams: int = 1  # seq2seq (gpt or t5 run), text-to-text (t5): beam width of dev decoding, predict (1: greedy)
    # multi-task (--task a,b on a t5 run): each epoch holds min(n, mixing_cap) examples of a task of n
    # (T5's examples-proportional mixing with an artificial limit, tasks/mixture.py)
    mixing_cap: int = 65536
    # classifiers' summary vector: auto = pooled [CLS] (bert) / last real token (gpt); cls; last; mean
    # = the average final hidden state over the real tokens (either family); or siamese (pair tasks):
    # each sentence encoded alone and mean-pooled to u, v, the head reading [u, v, |u - v|, u * v]
    pooling: Literal["auto", "cls", "last", "mean", "siamese"] = "auto"

    def validate(self, prefix: str = "finetune") -> "FinetuneConfig":
        for key in ("batch_size", "max_length", "log_every"):
            if getattr(self, key) <= 0:
                raise LmforgeError(f"{prefix}.{key} must be positive, got {getattr(self, key)}")
        for key in ("steps", "eval_every", "patience", "keep_checkpoints", "weight_decay", "grad_clip",
                    "generate_tokens", "micro_batch_size", "max_bad_steps"):
            if getattr(self, key) < 0:
                raise LmforgeError(f"{prefix}.{key} must be >= 0, got {getattr(self, key)}")
        if self.num_beams < 1:
            raise LmforgeError(f"{prefix}.num_beams must be >= 1, got {self.num_beams}")
        if self.mixing_cap < 1:
            raise LmforgeError(f"{prefix}.mixing_cap must be >= 1 example per task and epoch, got {self.mixing_cap}")
        if not self.lr > 0 or (self.head_lr is not None and not self.head_lr > 0):
            raise LmforgeError(f"{prefix}.lr and {prefix}.head_lr must be positive, got {self.lr}, {self.head_lr}")
        if not 0 < self.layer_lr_decay <= 1:
            raise LmforgeError(f"{prefix}.layer_lr_decay must be in (0, 1], got {self.layer_lr_decay}")
        if self.steps == 0 and not self.epochs > 0:
            raise LmforgeError(f"{prefix}.epochs must be positive (or set {prefix}.steps), got {self.epochs}")
        if not 0 <= self.warmup < 1:
            raise LmforgeError(f"{prefix}.warmup is a fraction of the steps, in [0, 1), got {self.warmup}")
        if not 0 <= self.dropout < 1:
            raise LmforgeError(f"{prefix}.dropout must be in [0, 1), got {self.dropout}")
        if not 0 < self.label_fraction <= 1:
            raise LmforgeError(f"{prefix}.label_fraction must be in (0, 1], got {self.label_fraction}")
        if not (self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:")):
            raise LmforgeError(f"{prefix}.device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        check_seed(self.seed, f"{prefix}.seed")
        return self


@dataclass
class FinetuneRunConfig:
    """A fine-tuned run's config.yaml: where it started, the model's shape, the task and the training."""

    name: str = "finetune"
    base_run: str = ""  # the run fine-tuned from (a pretraining run, or a fine-tuned one)
    base_checkpoint: str = ""  # the checkpoint of base_run it started from
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)  # labels filled in: the head's class order
    # a multi-task (text-to-text) run's other tasks, mixed with `task` (tasks/mixture.py); [] for one task
    extra_tasks: list[TaskConfig] = field(default_factory=list)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # how several processes share the work

    @property
    def tasks(self) -> list[TaskConfig]:
        """Every task the run trains on: `task`, then the extra tasks of a multi-task run."""
        return [self.task, *self.extra_tasks]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
