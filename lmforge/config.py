"""Typed configuration: dataclasses per section, YAML loading, `--set a.b=c` overrides, validation.

Every error names the offending key and what would have been accepted.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from lmforge.errors import LmforgeError
from lmforge.model.config import ModelConfig

RECIPES_DIR = Path(__file__).parent / "configs"
DEFAULT_RECIPE = "shakespeare-char"


@dataclass
class TokenizerConfig:
    # char: one token per character; bpe: byte-level BPE (GPT-2); wordpiece: BERT's; unigram: SentencePiece-style.
    # auto: the model family's own (t5: unigram; gpt, bert: bpe), resolved when the config is loaded.
    kind: Literal["auto", "char", "bpe", "wordpiece", "unigram"] = "auto"
    vocab_size: int = 8192  # target size for bpe / wordpiece / unigram; ignored for char
    lowercase: bool = True  # wordpiece only: BERT "uncased" normalisation (lower-case, strip accents)
    path: Optional[str] = None  # use an existing tokenizer.json instead of training one
    train_max_bytes: int = 200_000_000  # train on at most this much text (a bounded sample of the corpus)
    sentinels: int = 100  # t5 only: <extra_id_0> ... at the vocabulary's end (counted within vocab_size)

    def validate(self, prefix: str) -> None:
        if self.sentinels < 0:
            raise LmforgeError(f"{prefix}.sentinels must be >= 0, got {self.sentinels}")
        if self.kind == "bpe" and self.path is None and self.vocab_size < 257:
            raise LmforgeError(f"{prefix}.vocab_size must be at least 257 for byte-level bpe, got {self.vocab_size}")
        if self.train_max_bytes <= 0:
            raise LmforgeError(f"{prefix}.train_max_bytes must be positive, got {self.train_max_bytes}")


@dataclass
class SplitConfig:
    # document: each document goes to validation with probability val_fraction (a hash of its text);
    # tail: the last val_fraction of the token stream is validation (nanoGPT's split of one long text).
    by: Literal["document", "tail"] = "document"
    val_fraction: float = 0.05

    def validate(self, prefix: str) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise LmforgeError(f"{prefix}.val_fraction must be in (0, 1), got {self.val_fraction}")


CURATE_FILTERS = ("gopher_repetition", "gopher_quality", "c4", "fineweb")


@dataclass
class CurateConfig:
    """Cleaning before tokenization, run as datatrove pipelines (see lmforge/data/curate.py)."""

    normalize: bool = False  # fix broken Unicode and mojibake (ftfy)
    filters: list[str] = field(default_factory=list)  # any of CURATE_FILTERS, applied in the order given
    dedup: Literal["none", "exact", "minhash"] = "none"  # minhash removes near duplicates (and exact ones)
    language: str = "en"  # for the word tokenizer the Gopher filters and MinHash use
    chunk_bytes: int = 16_000_000  # text per parallel task; fixed, so the output never depends on data.workers
    minhash_ngrams: int = 5  # word n-grams hashed per document
    minhash_buckets: int = 14  # LSH bands; with minhash_hashes_per_bucket, sets the similarity threshold (~0.75)
    minhash_hashes_per_bucket: int = 8

    @property
    def enabled(self) -> bool:
        return self.normalize or bool(self.filters) or self.dedup != "none"

    def validate(self, prefix: str) -> None:
        for i, name in enumerate(self.filters):
            if name not in CURATE_FILTERS:
                raise LmforgeError(f"{prefix}.filters[{i}] must be one of {', '.join(CURATE_FILTERS)}, got {name!r}")
        for key in ("chunk_bytes", "minhash_ngrams", "minhash_buckets", "minhash_hashes_per_bucket"):
            if getattr(self, key) <= 0:
                raise LmforgeError(f"{prefix}.{key} must be positive, got {getattr(self, key)}")


@dataclass
class DataConfig:
    corpus: list[str] = field(default_factory=list)  # files, directories or globs; "builtin:NAME" for shipped text
    format: Literal["auto", "txt", "jsonl", "parquet"] = "auto"
    text_field: str = "text"  # the JSONL field or parquet column that holds the text
    txt_documents: Literal["file", "paragraph", "line"] = "file"  # what one document is in a .txt file
    encoding_errors: Literal["replace", "skip"] = "replace"  # undecodable bytes: replace them, or skip the file
    store: Optional[str] = None  # where the token store goes; None = a cache directory keyed by this section
    shard_tokens: int = 50_000_000
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    curate: CurateConfig = field(default_factory=CurateConfig)
    workers: int = 1  # tokenizer (and curation) processes; 0 = one per CPU core. Never changes the store
    # Longer documents are encoded in pieces of at most this many characters (cut at spaces: same ids),
    # and enter tokenizer training as such pieces: memory stays bounded whatever the document's size.
    max_document_chars: int = 1_000_000
    # Tokenize as datatrove tasks: local | slurm | ray (None: this process's pool). Same store either way.
    executor: Optional[Literal["local", "slurm", "ray"]] = None
    tasks: int = 0  # datatrove tasks (each a share of the corpus files); 0 = one per file
    slurm_partition: Optional[str] = None  # executor slurm: the partition to submit to
    slurm_time: str = "24:00:00"  # executor slurm: each task's time limit

    def validate(self, prefix: str) -> None:
        if not self.corpus and self.store is None:
            raise LmforgeError(f"{prefix}.corpus is empty: give files, directories or globs (or {prefix}.store)")
        for i, pattern in enumerate(self.corpus):
            if not pattern.strip():  # Path("") is the working directory: private files would become training data
                raise LmforgeError(f"{prefix}.corpus[{i}] is an empty path: give a file, directory or glob "
                                   f"(write '.' to mean the current directory)")
        if self.shard_tokens <= 0:
            raise LmforgeError(f"{prefix}.shard_tokens must be positive, got {self.shard_tokens}")
        self.tokenizer.validate(f"{prefix}.tokenizer")
        self.split.validate(f"{prefix}.split")
        self.curate.validate(f"{prefix}.curate")
        if self.workers < 0:
            raise LmforgeError(f"{prefix}.workers must be >= 0 (0 = one per CPU core), got {self.workers}")
        if self.tasks < 0:
            raise LmforgeError(f"{prefix}.tasks must be >= 0 (0 = one per corpus file), got {self.tasks}")
        if self.max_document_chars < 1000:
            raise LmforgeError(f"{prefix}.max_document_chars must be at least 1000, got {self.max_document_chars}")


@dataclass
class TrainConfig:
    steps: int = 2000
    # The global batch: sequences per optimizer step, all processes together. It alone decides the
    # training math; micro_batch_size and the number of processes only decide how it is computed.
    batch_size: int = 12
    # Sequences per forward/backward pass on one process; 0 = batch_size / processes (no accumulation).
    # Gradient accumulation steps = batch_size / (micro_batch_size * processes).
    micro_batch_size: int = 0
    # Processes that build training batches ahead of the step (0: built in the training process). Never
    # changes the batches; a few keep a GPU fed (see docs/loader.md).
    loader_workers: int = 0
    # blocks: each epoch a shuffled partition of the stream (no window twice); random: uniform offsets
    windows: Literal["blocks", "random"] = "blocks"
    # adamw: AdamW (beta1, beta2, eps). adafactor: torch's Adafactor (T5's optimizer): each matrix's step is
    # lr times its own RMS (relative steps, which T5's N(0, 1/fan_in) initialisation assumes), factored
    # second moments, no momentum; beta1/beta2/eps do not apply. muon: torch's Muon (orthogonalised
    # momentum) on the hidden matrices, scaled to AdamW's update size so lr carries over; AdamW (beta1,
    # beta2, eps) on embeddings, the vocabulary projection and vectors. Not with parallel.strategy=fsdp.
    optimizer: Literal["adamw", "adafactor", "muon"] = "adamw"
    lr: float = 1e-3
    min_lr: float = 1e-4  # cosine decay floor
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    eval_every: int = 250
    eval_batches: int = 50
    checkpoint_every: int = 500
    keep_checkpoints: int = 3  # keep the newest K checkpoints (0 keeps all)
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this (0: none)
    log_every: int = 10
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast matmuls; weights and optimizer stay fp32
    compile: bool = False  # torch.compile each Transformer block
    # when compiling fails on this platform: true stops the run with the error; false warns and trains eagerly
    compile_strict: bool = False
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    sample_tokens: int = 200  # length of the sample generated at the end ("0" disables it)
    sample_prompt: str = "\n"

    def validate(self, prefix: str) -> None:
        positive = ("steps", "batch_size", "eval_every", "eval_batches", "checkpoint_every",
                    "log_every", "max_bad_steps")
        for key in positive:
            if getattr(self, key) <= 0:
                raise LmforgeError(f"{prefix}.{key} must be positive, got {getattr(self, key)}")
        for key in ("lr",):
            if not getattr(self, key) > 0:
                raise LmforgeError(f"{prefix}.{key} must be positive, got {getattr(self, key)}")
        for key in ("min_lr", "weight_decay", "grad_clip", "warmup_steps", "keep_checkpoints", "keep_every", "eps",
                    "sample_tokens", "micro_batch_size", "loader_workers"):
            if getattr(self, key) < 0:
                raise LmforgeError(f"{prefix}.{key} must be >= 0, got {getattr(self, key)}")
        if self.min_lr > self.lr:
            raise LmforgeError(f"{prefix}.min_lr ({self.min_lr}) must not exceed {prefix}.lr ({self.lr})")
        for key in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise LmforgeError(f"{prefix}.{key} must be in [0, 1), got {getattr(self, key)}")
        if not (self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:")):
            raise LmforgeError(f"{prefix}.device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        check_seed(self.seed, f"{prefix}.seed")


FAMILY_TOKENIZER = {"gpt": "bpe", "bert": "bpe", "t5": "unigram"}  # data.tokenizer.kind auto


def check_seed(seed: int, name: str) -> None:
    """Seeds feed numpy's SeedSequence (non-negative) and torch's generators (64 bits): [0, 2**63) suits both."""
    if not 0 <= seed < 2**63:
        raise LmforgeError(f"{name} must be in [0, 2**63), got {seed}")


@dataclass
class MLMConfig:
    """BERT's pretraining objective (used when model.family is bert)."""

    mask_rate: float = 0.15  # fraction of non-special tokens selected for prediction
    mask_token_fraction: float = 0.8  # of the selected: replaced by [MASK]
    random_token_fraction: float = 0.1  # of the selected: replaced by a random token (the rest stay as they are)
    whole_word: bool = False  # select whole words (all their word pieces) instead of single tokens
    next_sentence: bool = True  # sentence pairs with the NSP task; false: single segments, MLM only
    short_seq_prob: float = 0.1  # chance that an example targets a shorter random length (BERT's recipe)

    def validate(self, prefix: str) -> None:
        if not 0.0 < self.mask_rate < 1.0:
            raise LmforgeError(f"{prefix}.mask_rate must be in (0, 1), got {self.mask_rate}")
        for key in ("mask_token_fraction", "random_token_fraction", "short_seq_prob"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise LmforgeError(f"{prefix}.{key} must be in [0, 1], got {getattr(self, key)}")
        if self.mask_token_fraction + self.random_token_fraction > 1.0:
            raise LmforgeError(f"{prefix}.mask_token_fraction + {prefix}.random_token_fraction must not exceed 1, "
                               f"got {self.mask_token_fraction} + {self.random_token_fraction}")


@dataclass
class DenoiserConfig:
    """One objective of a span.mixture, drawn per example with probability weight / sum of weights."""

    kind: Literal["span", "prefix_lm"] = "span"
    weight: float = 1.0
    noise_density: float = 0.15  # span only
    mean_span_length: float = 3.0  # span only


def _ul2_mixture() -> list[DenoiserConfig]:
    # UL2's three kinds: regular spans, extreme (long, dense) spans, and prefix LM
    return [DenoiserConfig("span", 2.0), DenoiserConfig("span", 1.0, 0.5, 32.0), DenoiserConfig("prefix_lm", 1.0)]


@dataclass
class SpanConfig:
    """T5's denoising objective (used when model.family is t5); see lmforge/data/objectives/span.py."""

    objective: Literal["span", "prefix_lm", "mixture"] = "span"
    noise_density: float = 0.15  # span: fraction of each row's tokens dropped into spans
    mean_span_length: float = 3.0  # span: average tokens per dropped span
    mixture: list[DenoiserConfig] = field(default_factory=_ul2_mixture)  # mixture: the denoisers and weights

    def validate(self, prefix: str) -> None:
        settings = [(prefix, self.noise_density, self.mean_span_length)]
        if self.objective == "mixture":
            if not self.mixture:
                raise LmforgeError(f"{prefix}.mixture must name at least one denoiser for {prefix}.objective=mixture")
            for i, d in enumerate(self.mixture):
                if not d.weight > 0:
                    raise LmforgeError(f"{prefix}.mixture[{i}].weight must be positive, got {d.weight}")
            settings = [(f"{prefix}.mixture[{i}]", d.noise_density, d.mean_span_length)
                        for i, d in enumerate(self.mixture) if d.kind == "span"]
        for where, density, span in settings:
            if not 0.0 < density < 1.0:
                raise LmforgeError(f"{where}.noise_density must be in (0, 1), got {density}")
            if not span >= 1.0:
                raise LmforgeError(f"{where}.mean_span_length must be >= 1, got {span}")

    def denoisers(self) -> list[tuple[str, str, float, float, float]]:
        """(key, kind, weight, noise_density, mean_span_length) of every objective the run draws from."""
        if self.objective == "mixture":
            return [(f"span.mixture[{i}]", d.kind, d.weight, d.noise_density, d.mean_span_length)
                    for i, d in enumerate(self.mixture)]
        return [("span", self.objective, 1.0, self.noise_density, self.mean_span_length)]


@dataclass
class ParallelConfig:
    """How a run launched with torchrun on several processes shares the work (ignored in one process)."""

    strategy: Literal["ddp", "fsdp"] = "ddp"  # ddp: a whole replica per process; fsdp: FSDP2, sharded per block
    param_dtype: Literal["auto", "fp32", "bf16"] = "auto"  # fsdp: dtype of gathered parameters; auto = train.precision
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"  # fsdp: dtype of the gradient reduce-scatter
    cpu_offload: bool = False  # fsdp on GPUs: keep parameter shards, gradients and optimizer state in host memory
    activation_checkpointing: bool = False  # recompute each Transformer block in the backward pass (any strategy)

    def validate(self, prefix: str) -> None:
        if self.strategy != "fsdp":
            for key, default in (("param_dtype", "auto"), ("reduce_dtype", "fp32"), ("cpu_offload", False)):
                if getattr(self, key) != default:
                    raise LmforgeError(f"{prefix}.{key} applies to {prefix}.strategy=fsdp only "
                                       f"(strategy is {self.strategy})")


@dataclass
class Config:
    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mlm: MLMConfig = field(default_factory=MLMConfig)
    span: SpanConfig = field(default_factory=SpanConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self) -> "Config":
        if self.data.tokenizer.kind == "auto":  # resolved here, so a saved config (and a store's key) says which
            self.data.tokenizer.kind = FAMILY_TOKENIZER[self.model.family]
        self.data.validate("data")
        self.model.validate("model")
        self.train.validate("train")
        self.mlm.validate("mlm")
        self.span.validate("span")  # lengths and sentinels: data.loader.check_objective, before a run starts
        self.parallel.validate("parallel")
        if self.train.optimizer == "muon" and self.parallel.strategy == "fsdp":
            # Newton-Schulz needs each matrix whole; FSDP leaves every process a slice of it
            raise LmforgeError("train.optimizer=muon needs whole matrices on every process; "
                               "parallel.strategy=fsdp shards them (use ddp, or adamw)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with errors that name the key.


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _number(value: Any) -> int | float | None:
    """An int or float read from a number or a numeric string, else None.

    PyYAML (YAML 1.1) reads `3e-4` and `1e3` as strings, and JSON or a shell may hand over "10":
    a number written as text is the same number wherever it comes from (a YAML file, `--set`, a flag).
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        for parse in (int, float):
            try:
                return parse(value)
            except ValueError:
                pass
    return None


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting only lossless cases (int -> float, "3e-4" -> 3e-4)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and str in args:
            return value  # text where text is accepted stays text (a column header "3" is not the index 3)
        options = [arg for arg in args if arg is not type(None)]
        for arg in options:
            try:
                return _coerce(value, arg, key)
            except LmforgeError:
                if len(options) == 1:  # Optional[X]: X's own message is the precise one
                    raise
        raise LmforgeError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise LmforgeError(f"config key '{key}' must be one of {_type_name(tp)}, got {value!r}")
        return value
    if tp is Any:
        return value  # checked by whoever reads it (e.g. a section of settings merged into a dataclass)
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise LmforgeError(f"config key '{key}' must be a mapping, got {value!r}")
        return {_coerce(k, key_tp, key): _coerce(v, value_tp, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single path where a list is expected is a list of one
        if not isinstance(value, list):
            raise LmforgeError(f"config key '{key}' must be a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise LmforgeError(f"config key '{key}' must be a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise LmforgeError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if tp is int:
        number = _number(value)
        if isinstance(number, float) and number.is_integer():
            return int(number)
        if not isinstance(number, int):
            raise LmforgeError(f"config key '{key}' must be an integer, got {value!r}")
        return number
    if tp is float:
        number = _number(value)
        if number is None:
            raise LmforgeError(f"config key '{key}' must be a number, got {value!r}")
        if not math.isfinite(number):
            raise LmforgeError(f"config key '{key}' must be a finite number, got {value!r}")
        return float(number)
    if tp is str:
        if not isinstance(value, str):
            raise LmforgeError(f"config key '{key}' must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")  # a bug in lmforge, not user input


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from `data`, refusing unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise LmforgeError(f"unknown config key '{full}' (allowed here: {', '.join(names)})")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.steps=10' -> (['train', 'steps'], 10); the value is read as YAML."""
    if "=" not in text:
        raise LmforgeError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise LmforgeError(f"--set expects key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML 1.1 reads "3e-4" as a string: the typed keys read numeric strings (see _number), as they do from a file.
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise LmforgeError(f"--set {text!r}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return data


def resolve_recipe(name_or_path: str) -> Path:
    """A path to a YAML file, or the name of a recipe that ships with lmforge (e.g. 'gpt-tiny')."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = RECIPES_DIR / f"{name_or_path.removesuffix('.yaml')}.yaml"
    if shipped.is_file():
        return shipped
    available = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
    raise LmforgeError(f"config file not found: {name_or_path} (shipped recipes: {available})")


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise LmforgeError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LmforgeError(f"cannot read config {path}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LmforgeError(f"{path}: a config must be a mapping of sections, got {type(data).__name__}")
    return data


def upgrade_train_section(train: Any) -> None:
    """Rewrite, in place, a `train` section of the days before global batches to today's keys.

    Then `batch_size` counted the sequences of one micro-batch and `grad_accum` the micro-batches per
    step (one process only); now `batch_size` is the global batch and `micro_batch_size` the
    micro-batch, so `batch_size: 8, grad_accum: 4` becomes `batch_size: 32, micro_batch_size: 8`.
    Run directories written then keep loading and resuming as they were.
    """
    if not isinstance(train, dict) or "grad_accum" not in train:
        return
    accum = train.pop("grad_accum")
    if isinstance(accum, bool) or not isinstance(accum, int) or accum <= 0:
        raise LmforgeError(f"train.grad_accum must be a positive integer, got {accum!r} (it is now derived: "
                           f"train.batch_size / (train.micro_batch_size x processes))")
    if accum > 1:
        micro = train.get("batch_size", TrainConfig.batch_size)
        if isinstance(micro, int):
            train["batch_size"] = micro * accum
            train.setdefault("micro_batch_size", micro)


def load_config(name_or_path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Load a recipe (default: the built-in one), apply `--set` overrides and validate."""
    path = resolve_recipe(name_or_path or DEFAULT_RECIPE)
    data = apply_overrides(read_yaml(path), overrides or [])
    data.setdefault("name", path.stem)
    upgrade_train_section(data.get("train"))
    return from_dict(Config, data).validate()


def config_from_dict(data: dict[str, Any], overrides: Optional[list[str]] = None) -> Config:
    data = apply_overrides(data, overrides or [])
    upgrade_train_section(data.get("train"))
    return from_dict(Config, data).validate()


def dump_config(config: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
