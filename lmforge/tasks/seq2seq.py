"""Text to text (`task.kind: seq2seq`): input/target pairs from parallel, JSONL or TSV/CSV files; BLEU and ROUGE.

Readers: parallel line files (`PREFIX.LANG` or `PREFIX.LANG.gz`, line i of one side translating
line i of the other, as Multi30k ships them), JSONL (one object per line; a line that is not JSON
is read as a Python literal with ast.literal_eval, which DialogSum's train file needs and which
evaluates no code), and TSV/CSV with named or numbered columns as the other task files. A pair
with an empty input or target is skipped and counted (an error when `strict`).

Encoder-decoders read the input and are trained on the target (`encode_seq2seq`); decoders read
`prompt(input) target <eos>`, which is batches.encode_generation of `as_generation`'s examples.
Scores: sacreBLEU's corpus BLEU (detokenised input, its 13a tokenisation, cased by default) and
rouge-score's ROUGE-1/2/L F-measure (Porter stemming), all x100.
"""

from __future__ import annotations

import gzip
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tokenizers import Tokenizer

from lmforge.errors import LmforgeError
from lmforge.tasks.batches import IGNORE_INDEX
from lmforge.tasks.config import TaskConfig, find_split_file
from lmforge.tasks.datasets import Example, _delimited_rows, _file_format, _read_text, jsonl_objects
from lmforge.tasks.metrics import metric_package

log = logging.getLogger(__name__)

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
SEQ2SEQ_METRICS = ("bleu", *ROUGE_TYPES)


@dataclass(frozen=True)
class Seq2SeqExample:
    source: str
    target: str
    where: str  # "path:line", for messages


@dataclass
class Seq2SeqData:
    examples: list[Seq2SeqExample]
    skipped: int  # pairs with an empty input or target


def _open_text(path: Path, encoding: str) -> str:
    """The whole file as text; `.gz` files are decompressed."""
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
        return raw.decode(encoding).removeprefix("\ufeff")
    except FileNotFoundError:
        raise LmforgeError(f"{path}: no such file") from None
    except (OSError, EOFError) as err:
        raise LmforgeError(f"{path}: cannot read ({err})") from None
    except UnicodeDecodeError as err:
        raise LmforgeError(f"{path}: byte {err.start} is not valid {encoding} (set task.encoding)") from None


def _keep(pairs: list[tuple[str, str, str]], strict: bool, path: Path | str) -> Seq2SeqData:
    """Pairs with text on both sides; empty ones counted and skipped, or refused when strict."""
    kept, skipped = [], 0
    for source, target, where in pairs:
        if not source.strip() or not target.strip():
            side = "input" if not source.strip() else "target"
            if strict:
                raise LmforgeError(f"{where}: the {side} is empty (task.strict is on; off, such pairs are "
                                   f"skipped and counted)")
            skipped += 1
            continue
        kept.append(Seq2SeqExample(source.strip(), target.strip(), where))
    if skipped:
        log.warning("%s: skipped %d pair(s) with an empty input or target", path, skipped)
    if not kept:
        raise LmforgeError(f"{path}: no input/target pairs (the split is empty)")
    return Seq2SeqData(kept, skipped)


def parallel_paths(folder: str | Path, prefix: str, source_language: str, target_language: str) -> tuple[Path, Path]:
    """The two sides of a parallel split: PREFIX.LANG.gz, else PREFIX.LANG, in folder."""
    paths = []
    for language in (source_language, target_language):
        candidates = [Path(folder) / f"{prefix}.{language}.gz", Path(folder) / f"{prefix}.{language}"]
        found = [p for p in candidates if p.is_file()]
        if not found:
            raise LmforgeError(f"{folder}: no {candidates[0].name} or {candidates[1].name} (task.train_file / "
                               f"dev_file name the split, task.source_language / target_language the sides)")
        paths.append(found[0])
    return paths[0], paths[1]


def read_parallel(source_path: str | Path, target_path: str | Path, strict: bool = False,
                  encoding: str = "utf-8") -> Seq2SeqData:
    """Line i of source_path with line i of target_path; the files must have as many lines."""
    source_path, target_path = Path(source_path), Path(target_path)
    sources = _open_text(source_path, encoding).splitlines()
    targets = _open_text(target_path, encoding).splitlines()
    if len(sources) != len(targets):
        raise LmforgeError(f"{source_path} has {len(sources)} lines but {target_path} has {len(targets)} "
                           f"(parallel files pair their lines)")
    return _keep([(s, t, f"{target_path}:{i}") for i, (s, t) in enumerate(zip(sources, targets), start=1)],
                 strict, target_path)


def read_seq2seq_jsonl(path: str | Path, input_field: str = "input", target_field: str = "target",
                       strict: bool = False, encoding: str = "utf-8") -> Seq2SeqData:
    """One object per line; lines that are Python dict literals (single quotes) are read with ast.literal_eval."""
    path = Path(path)
    pairs = []
    for number, obj in jsonl_objects(path, _open_text(path, encoding), python_literals=True):
        values = []
        for key, field in (("text", input_field), ("label", target_field)):
            value = obj.get(field)
            if not isinstance(value, str):
                raise LmforgeError(f"{path}:{number}: field {field!r} (task.{key}) must be a string, got {value!r} "
                                   f"(the object has: {', '.join(map(repr, obj))})")
            values.append(value)
        pairs.append((values[0], values[1], f"{path}:{number}"))
    return _keep(pairs, strict, path)


def read_seq2seq_delimited(path: str | Path, config: TaskConfig) -> Seq2SeqData:
    """TSV / CSV rows (the task files' row reader) with task.text as the input column and task.label the target."""
    path = Path(path)
    rows = _delimited_rows(path, _read_text(path, config.encoding), _file_format(path, config), config)
    return _keep([(row.text, row.label, f"{path}:{row.line}") for row in rows], config.strict, path)


def read_seq2seq_split(config: TaskConfig, split: str) -> Seq2SeqData:
    """The pairs of `split` ('train' or 'dev'): parallel files PREFIX.LANG[.gz] (PREFIX: {split}_file, else
    the split's name), else the JSONL / TSV / CSV file {split}_file or {split}.jsonl/.tsv/.csv."""
    if config.format == "parallel":
        prefix = getattr(config, f"{split}_file") or split
        source, target = parallel_paths(config.path, prefix, config.source_language, config.target_language)
        return read_parallel(source, target, config.strict, config.encoding)
    path = find_split_file(config, split, (".jsonl", ".tsv", ".csv"))
    if config.format == "jsonl" or (config.format == "auto" and path.suffix.lower() in (".jsonl", ".json")):
        return read_seq2seq_jsonl(path, str(config.text), str(config.label), config.strict, config.encoding)
    return read_seq2seq_delimited(path, config)


@dataclass
class Seq2SeqTask:
    config: TaskConfig
    train: list[Seq2SeqExample]
    dev: list[Seq2SeqExample]
    skipped: int  # pairs with an empty side, both splits together


def load_seq2seq_task(config: TaskConfig) -> Seq2SeqTask:
    """Train and dev pairs of a seq2seq task."""
    train, dev = read_seq2seq_split(config, "train"), read_seq2seq_split(config, "dev")
    return Seq2SeqTask(config, train.examples, dev.examples, train.skipped + dev.skipped)


def as_generation(examples: Sequence[Seq2SeqExample], prompt: str = "{input}\n") -> list[Example]:
    """Decoder examples: the prompt template filled with the input, the target as the response."""
    return [Example(prompt.replace("{input}", e.source), None, e.target, e.where) for e in examples]


def count_cut_prompts(tokenizer: Tokenizer, examples: Sequence[Example], max_length: int,
                      strict: bool = False) -> int:
    """How many decoder examples batches.encode_generation will cut (prompt + target + <eos> over max_length + 1
    tokens, the prompt losing its head); an error naming the first when strict."""
    prompts = tokenizer.encode_batch([e.text for e in examples], add_special_tokens=False) if examples else []
    targets = tokenizer.encode_batch([str(e.label) for e in examples], add_special_tokens=False) if examples else []
    cut = 0
    for example, prompt, target in zip(examples, prompts, targets):
        if len(prompt.ids) + len(target.ids) + 1 > max_length + 1:
            if strict:
                raise LmforgeError(f"{example.source}: the input and target are {len(prompt.ids) + len(target.ids)} "
                                   f"tokens, more than finetune.max_length {max_length} (task.strict is on; off, "
                                   f"the input loses its head and is counted)")
            cut += 1
    if cut:
        log.warning("the inputs of %d of %d example(s) will be cut to fit %d tokens", cut, len(examples), max_length)
    return cut


@dataclass(frozen=True)
class Seq2SeqFeatures:
    source_ids: list[int]
    target_ids: list[int]


def encode_seq2seq(tokenizer: Tokenizer, examples: Sequence[Seq2SeqExample], max_source_length: int,
                   max_target_length: int, strict: bool = False) -> tuple[list[Seq2SeqFeatures], int]:
    """Encoder inputs and decoder targets (each with the tokenizer's template), cut to their lengths.

    Returns the features and how many inputs or targets were cut; with task.strict a cut one is an
    error naming the example's file and line (off, the loss on a cut target's head still teaches).
    """
    def encode(texts: list[str], limit: int) -> list:
        tok = Tokenizer.from_str(tokenizer.to_str())
        tok.no_padding()
        tok.enable_truncation(limit)
        return tok.encode_batch(texts) if texts else []

    sources = encode([e.source for e in examples], max_source_length)
    targets = encode([e.target for e in examples], max_target_length)
    truncated = 0
    for side, encodings, key, limit in (("input", sources, "finetune.max_length", max_source_length),
                                        ("target", targets, "task.max_target_length", max_target_length)):
        cut = 0
        for example, enc in zip(examples, encodings):
            if enc.overflowing:
                if strict:
                    raise LmforgeError(f"{example.where}: the {side} is longer than {key} {limit} tokens "
                                       f"(task.strict is on; off, it is cut and counted)")
                cut += 1
        if cut:
            log.warning("cut %d of %d %s(s) to %s = %d tokens", cut, len(examples), side, key, limit)
        truncated += cut
    return [Seq2SeqFeatures(list(s.ids), list(t.ids)) for s, t in zip(sources, targets)], truncated


def collate_seq2seq(items: Sequence[Seq2SeqFeatures], pad: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask over the inputs and labels (IGNORE_INDEX padding) over the targets."""
    source_length = max(len(item.source_ids) for item in items)
    target_length = max(len(item.target_ids) for item in items)
    ids = np.full((len(items), source_length), pad, dtype=np.int64)
    mask = np.zeros((len(items), source_length), dtype=np.int64)
    labels = np.full((len(items), target_length), IGNORE_INDEX, dtype=np.int64)
    for row, item in enumerate(items):
        ids[row, : len(item.source_ids)] = item.source_ids
        mask[row, : len(item.source_ids)] = 1
        labels[row, : len(item.target_ids)] = item.target_ids
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
            "labels": torch.from_numpy(labels)}


def bleu(hypotheses: Sequence[str], references: Sequence[str], lowercase: bool = False) -> float:
    """sacreBLEU corpus BLEU (13a tokenisation, cased unless lowercase) of one reference per hypothesis."""
    _check_lengths(hypotheses, references)
    sacrebleu = metric_package("sacrebleu", "sacrebleu", "seq2seq")
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)], lowercase=lowercase).score)


def rouge(hypotheses: Sequence[str], references: Sequence[str], use_stemmer: bool = True) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure x100 (rouge-score, Porter stemming), one reference per hypothesis."""
    _check_lengths(hypotheses, references)
    rouge_scorer = metric_package("rouge_score.rouge_scorer", "rouge-score", "seq2seq")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
    sums = dict.fromkeys(ROUGE_TYPES, 0.0)
    for hypothesis, reference in zip(hypotheses, references):
        scores = scorer.score(reference, hypothesis)  # rouge-score takes (target, prediction)
        for kind in ROUGE_TYPES:
            sums[kind] += scores[kind].fmeasure
    n = max(1, len(hypotheses))
    return {kind: 100.0 * total / n for kind, total in sums.items()}


def seq2seq_metrics(names: Sequence[str], hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """{name: value} for bleu / rouge1 / rouge2 / rougeL over the dev outputs."""
    unknown = [n for n in names if n not in SEQ2SEQ_METRICS]
    if unknown:
        raise LmforgeError(f"metric {unknown[0]!r} does not apply to seq2seq "
                           f"(choose from {', '.join(SEQ2SEQ_METRICS)})")
    out: dict[str, float] = {}
    if "bleu" in names:
        out["bleu"] = bleu(hypotheses, references)
    if any(n in ROUGE_TYPES for n in names):
        scores = rouge(hypotheses, references)
        out.update({n: scores[n] for n in names if n in ROUGE_TYPES})
    return {n: out[n] for n in names}


def _check_lengths(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} outputs for {len(references)} references")
