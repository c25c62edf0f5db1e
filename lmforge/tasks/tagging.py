"""Token classification (`task.kind: tokens`): tagged sentences -> subword windows -> per-word tags -> entity F1.

Files are CoNLL columns (one word per line, whitespace-separated columns, a blank line ends a
sentence, `-DOCSTART-` lines separate documents) or JSONL objects with a list of words and a list
of tags. Words become subwords through the run's tokenizer (pre-tokenized input, so every subword
knows its word); the word's tag is the label of its first subword and the others are ignored by
the loss (or all carry it, `label_all_subwords`). A causal model reads a word whole only at its
last subword, so a GPT tagger is better labelled there (`label_subword: last`). A sentence longer than the model's length is cut
into overlapping windows (the tokenizer's own truncation with a stride); each word's prediction is
taken from the window where its labelled subword has the most context on both sides, as BERT does for
SQuAD. Entity-level scores are seqeval's.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from tokenizers import Tokenizer

from lmforge.errors import LmforgeError
from lmforge.tasks.batches import IGNORE_INDEX, Encoded, collate
from lmforge.tasks.config import TaskConfig, find_split_file
from lmforge.tasks.datasets import jsonl_objects
from lmforge.tasks.metrics import metric_package

DOCSTART = "-DOCSTART-"
SUFFIXES = (".conll", ".txt", ".jsonl")  # where train / dev files are looked for when not named
OUTSIDE = "O"
# Tag prefixes each scheme allows, and the name of seqeval's class for strict entity matching.
SCHEMES = {"IOB1": ("BI", "IOB1"), "IOB2": ("BI", "IOB2"), "BIOES": ("BIES", "IOBES")}


@dataclass(frozen=True)
class TaggedSentence:
    words: list[str]
    tags: list[str]  # one per word
    source: str  # "path:line" of the first word, for messages
    tag_lines: Optional[list[int]] = None  # the line of each word (CoNLL), to name a bad tag's line


def read_conll(path: str | Path, word_column: int = 0, tag_column: int = -1,
               encoding: str = "utf-8") -> list[TaggedSentence]:
    """Sentences of a CoNLL column file; columns are 0-based, negative ones count from the line's end."""
    path = Path(path)
    text = _read(path, encoding)
    sentences: list[TaggedSentence] = []
    words: list[str] = []
    tags: list[str] = []
    lines: list[int] = []

    def end_sentence() -> None:
        if words:
            sentences.append(TaggedSentence(list(words), list(tags), f"{path}:{lines[0]}", list(lines)))
            words.clear()
            tags.clear()
            lines.clear()

    for number, raw in enumerate(io.StringIO(text, newline=None), start=1):
        fields = raw.split()
        if not fields:
            end_sentence()
            continue
        if fields[0] == DOCSTART:
            end_sentence()
            continue
        word_at = word_column if word_column >= 0 else len(fields) + word_column
        tag_at = tag_column if tag_column >= 0 else len(fields) + tag_column
        if not (0 <= word_at < len(fields) and 0 <= tag_at < len(fields)) or word_at == tag_at:
            raise LmforgeError(f"{path}:{number}: the line {raw.strip()!r} has no tag column (task.word_column "
                               f"{word_column}, task.tag_column {tag_column}; {len(fields)} column(s) here)")
        words.append(fields[word_at])
        tags.append(fields[tag_at])
        lines.append(number)
    end_sentence()
    if not sentences:
        raise LmforgeError(f"{path}: no sentences (the split is empty)")
    return sentences


def read_tagged_jsonl(path: str | Path, words_field: str = "tokens", tags_field: str = "tags",
                      encoding: str = "utf-8") -> list[TaggedSentence]:
    """Sentences of a JSONL file: one object per line with a list of words and a list of tags as long."""
    path = Path(path)
    sentences = []
    for number, obj in jsonl_objects(path, _read(path, encoding)):
        values = []
        for field in (words_field, tags_field):
            value = obj.get(field)
            if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
                raise LmforgeError(f"{path}:{number}: field {field!r} must be a list of non-empty strings, "
                                   f"got {value!r}")
            values.append([v.strip() for v in value])
        words, tags = values
        if len(words) != len(tags):
            raise LmforgeError(f"{path}:{number}: {len(words)} words in {words_field!r} but {len(tags)} tags "
                               f"in {tags_field!r}")
        if words:
            sentences.append(TaggedSentence(words, tags, f"{path}:{number}"))
    if not sentences:
        raise LmforgeError(f"{path}: no sentences (the split is empty)")
    return sentences


def _read(path: Path, encoding: str) -> str:
    try:
        return path.read_text(encoding=encoding).removeprefix("\ufeff")
    except FileNotFoundError:
        raise LmforgeError(f"{path}: no such file") from None
    except UnicodeDecodeError as err:
        raise LmforgeError(f"{path}: byte {err.start} is not valid {encoding} (set task.encoding)") from None


def read_tagged(path: str | Path, config: TaskConfig) -> list[TaggedSentence]:
    """One split in the task's format: JSONL (by format or a .jsonl suffix), else CoNLL columns."""
    path = Path(path)
    fmt = config.format if config.format != "auto" else ("jsonl" if path.suffix.lower() == ".jsonl" else "conll")
    if fmt == "jsonl":
        return read_tagged_jsonl(path, str(config.text), str(config.label), config.encoding)
    return read_conll(path, config.word_column, config.tag_column, config.encoding)


@dataclass
class TaggingData:
    config: TaskConfig
    train: list[TaggedSentence]
    dev: list[TaggedSentence]
    label_names: list[str]  # class index -> tag
    train_tags: list[list[int]]  # per sentence, per word: class index
    dev_tags: list[list[int]]

    @property
    def outside(self) -> int:
        """The class of O: what a word no window holds is predicted as."""
        return self.label_names.index(OUTSIDE) if OUTSIDE in self.label_names else 0


def load_tagging_task(config: TaskConfig) -> TaggingData:
    """Train and dev sentences of a tokens task; the label set is task.labels, else the tags of train."""
    train_path = find_split_file(config, "train", SUFFIXES)
    train = read_tagged(train_path, config)
    labels = list(config.labels) if config.labels is not None else tag_set(train)
    try:
        check_scheme(labels, config.scheme)
    except LmforgeError as err:
        raise LmforgeError(f"{'task.labels' if config.labels is not None else train_path}: {err}") from None
    if len(labels) < 2:
        raise LmforgeError(f"{train_path}: every word has the tag {labels[0]!r}; tagging needs at least two tags")
    dev = read_tagged(find_split_file(config, "dev", SUFFIXES), config)
    return TaggingData(config, train, dev, labels, tag_ids(train, labels), tag_ids(dev, labels))


def split_words(tokenizer: Tokenizer, text: str) -> list[tuple[str, tuple[int, int]]]:
    """A raw text's words with their character spans, as the tokenizer's pre-tokenizer splits it (for predict).

    BERT's pre-tokenizer splits on whitespace and punctuation, as CoNLL files are tokenised;
    a tokenizer without one is split on whitespace.
    """
    if tokenizer.pre_tokenizer is None:
        return [(m.group(0), m.span()) for m in re.finditer(r"\S+", text)]
    return [(word, span) for word, span in tokenizer.pre_tokenizer.pre_tokenize_str(text) if word.strip()]


def tag_set(sentences: Sequence[TaggedSentence]) -> list[str]:
    """The tags seen, in class order: O first, then by entity type and prefix (B-LOC, I-LOC, B-MISC, ...)."""
    seen = {tag for s in sentences for tag in s.tags}
    rest = sorted(seen - {OUTSIDE}, key=lambda t: (t[2:], t[:2]))
    return ([OUTSIDE] if OUTSIDE in seen else []) + rest


def check_scheme(labels: Sequence[str], scheme: str) -> None:
    """Every label is O or PREFIX-TYPE with a prefix the scheme allows."""
    if scheme not in SCHEMES:
        raise LmforgeError(f"task.scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    prefixes = SCHEMES[scheme][0]
    for label in labels:
        if label != OUTSIDE and not (len(label) > 2 and label[0] in prefixes and label[1] == "-"):
            allowed = " / ".join(f"{p}-TYPE" for p in prefixes)
            raise LmforgeError(f"tag {label!r} does not fit task.scheme {scheme} (allowed: O, {allowed})")


def tag_ids(sentences: Sequence[TaggedSentence], labels: Sequence[str]) -> list[list[int]]:
    """Each sentence's tags as class indices; a tag outside the label set is an error naming its line."""
    index = {label: i for i, label in enumerate(labels)}
    out = []
    for s in sentences:
        for k, tag in enumerate(s.tags):
            if tag not in index:
                where = f"{s.source.rsplit(':', 1)[0]}:{s.tag_lines[k]}" if s.tag_lines else s.source
                raise LmforgeError(f"{where}: tag {tag!r} is not in the label set {list(labels)} "
                                   f"(the tags of train; list every tag in task.labels)")
        out.append([index[tag] for tag in s.tags])
    return out


@dataclass(frozen=True)
class TokenWindow:
    sentence: int  # index into the sentences encoded
    ids: list[int]
    type_ids: list[int]
    word_ids: list[Optional[int]]  # per token: the word it is part of, None for special tokens
    labels: list[int]  # per token: the word's class on its labelled subword (or all), IGNORE_INDEX elsewhere
    predicts_word: list[bool]  # per token: whether it is the subword its word is labelled and predicted at


def encode_tagged(tokenizer: Tokenizer, sentences: Sequence[TaggedSentence], tags: Optional[Sequence[Sequence[int]]],
                  max_length: int, stride: int, label_all_subwords: bool = False,
                  label_subword: str = "first") -> list[TokenWindow]:
    """Subword windows of each sentence with per-token labels (all IGNORE_INDEX when tags is None).

    tokenizer: a task tokenizer (its template's special tokens frame every window); a sentence longer
    than max_length tokens becomes windows of max_length whose texts overlap by `stride` tokens.
    label_subword: "first" or "last", the subword of each word that carries its label and prediction.
    """
    if label_subword not in ("first", "last"):
        raise LmforgeError(f"task.label_subword must be first or last, got {label_subword!r}")
    head, tail = _template(tokenizer)
    room = max_length - len(head) - len(tail)
    if room < 1:
        raise LmforgeError(f"finetune.max_length {max_length} leaves no room for words beside "
                           f"{len(head) + len(tail)} special tokens")
    if not 0 <= stride < room:
        raise LmforgeError(f"task.stride must be in [0, {room}) (tokens shared by consecutive windows: "
                           f"finetune.max_length {max_length} less the special tokens), got {stride}")
    encodings = tokenizer.encode_batch([s.words for s in sentences], is_pretokenized=True,
                                       add_special_tokens=False) if sentences else []
    windows = []
    for i, enc in enumerate(encodings):
        ids, word_ids = list(enc.ids), list(enc.word_ids)
        n = len(ids)
        if label_subword == "first":
            marked = [t == 0 or word_ids[t - 1] != word_ids[t] for t in range(n)]
        else:
            marked = [t == n - 1 or word_ids[t + 1] != word_ids[t] for t in range(n)]
        labels = [IGNORE_INDEX] * len(ids)
        if tags is not None:
            labels = [int(tags[i][w]) if (label_all_subwords or m) else IGNORE_INDEX for w, m in zip(word_ids, marked)]
        start = 0
        while True:  # windows start every room - stride tokens; the last one reaches the end
            end = min(start + room, len(ids))
            windows.append(TokenWindow(
                sentence=i,
                ids=[t for t, _ in head] + ids[start:end] + [t for t, _ in tail],
                type_ids=[y for _, y in head] + [0] * (end - start) + [y for _, y in tail],
                word_ids=[None] * len(head) + word_ids[start:end] + [None] * len(tail),
                labels=[IGNORE_INDEX] * len(head) + labels[start:end] + [IGNORE_INDEX] * len(tail),
                predicts_word=[False] * len(head) + marked[start:end] + [False] * len(tail)))
            if end == len(ids):
                break
            start = end - stride
    return windows


def _template(tokenizer: Tokenizer) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The (id, type id) of the special tokens the tokenizer's template puts before and after a single text."""
    enc = tokenizer.encode(["x"], is_pretokenized=True)
    inside = [t for t, w in enumerate(enc.word_ids) if w is not None]
    pairs = list(zip(enc.ids, enc.type_ids))
    if not inside:  # "x" vanished in normalisation: take every special token as leading (none here in practice)
        return pairs, []
    return pairs[: inside[0]], pairs[inside[-1] + 1:]


def collate_windows(windows: Sequence[TokenWindow], pad: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, token_type_ids, attention_mask and per-token labels (IGNORE_INDEX on padding)."""
    return collate([Encoded(w.ids, w.type_ids, w.labels) for w in windows], pad)


def merge_windows(windows: Sequence[TokenWindow], token_predictions: Sequence[Sequence[int]],
                  num_words: Sequence[int], fallback: int = 0) -> list[list[int]]:
    """One class per word of each sentence, from per-token predictions of every window.

    A word is read at its labelled subword, in the window where that subword has the most tokens of
    context on its nearer side. A word no window holds (a word the tokenizer drops, such as a lone
    control character) gets `fallback` (the O class).
    """
    best: list[list[tuple[int, int]]] = [[(-1, fallback)] * n for n in num_words]
    for window, predicted in zip(windows, token_predictions):
        real = [t for t, w in enumerate(window.word_ids) if w is not None]
        if not real:
            continue
        lo, hi = real[0], real[-1]
        for t in real:
            if not window.predicts_word[t]:
                continue
            word = window.word_ids[t]
            context = min(t - lo, hi - t)
            if context > best[window.sentence][word][0]:
                best[window.sentence][word] = (context, int(predicted[t]))
    return [[cls for _, cls in sentence] for sentence in best]


def entity_scores(true_tags: Sequence[Sequence[str]], pred_tags: Sequence[Sequence[str]], scheme: str = "IOB2",
                  mode: str = "conlleval") -> dict[str, float]:
    """Entity-level micro precision / recall / F1 (and f1_TYPE per entity type), x100, as seqeval computes them.

    mode "conlleval": seqeval's default, conlleval-compatible chunking (an I- after O starts an entity;
    the same for IOB1, IOB2 and BIOES input); "strict": only entities well-formed under `scheme` count.
    """
    if scheme not in SCHEMES:
        raise LmforgeError(f"task.scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    if mode not in ("conlleval", "strict"):
        raise LmforgeError(f"task.entity_mode must be conlleval or strict, got {mode!r}")
    metrics = metric_package("seqeval.metrics", "seqeval", "tokens")
    schemes = metric_package("seqeval.scheme", "seqeval", "tokens")
    kwargs = {"mode": "strict", "scheme": getattr(schemes, SCHEMES[scheme][1])} if mode == "strict" else {}
    with warnings.catch_warnings():  # with no entity anywhere seqeval averages empty arrays: a NumPy warning
        warnings.simplefilter("ignore", RuntimeWarning)
        report = metrics.classification_report([list(t) for t in true_tags], [list(p) for p in pred_tags],
                                               output_dict=True, zero_division=0, **kwargs)
    micro = report.get("micro avg", {})

    def percent(row: dict, key: str) -> float:  # undefined (no entities at all) is 0.0, never NaN
        value = float(row.get(key, 0.0))
        return 100.0 * value if np.isfinite(value) else 0.0

    scores = {"entity_precision": percent(micro, "precision"), "entity_recall": percent(micro, "recall"),
              "entity_f1": percent(micro, "f1-score")}
    for name, row in report.items():
        if not name.endswith(" avg"):
            scores[f"f1_{name}"] = percent(row, "f1-score")
    return scores


def token_accuracy(true_ids: Sequence[Sequence[int]], pred_ids: Sequence[Sequence[int]]) -> float:
    """The fraction of words tagged correctly, x100."""
    t = np.concatenate([np.asarray(s, dtype=np.int64) for s in true_ids]) if true_ids else np.zeros(0)
    p = np.concatenate([np.asarray(s, dtype=np.int64) for s in pred_ids]) if pred_ids else np.zeros(0)
    return 100.0 * float(np.mean(t == p)) if len(t) else 0.0


def tagging_metrics(labels: Sequence[str], true_ids: Sequence[Sequence[int]], pred_ids: Sequence[Sequence[int]],
                    scheme: str = "IOB2", mode: str = "conlleval") -> dict[str, float]:
    """Dev metrics of a tagger from class indices per word: entity P/R/F1, per-type F1, token accuracy."""
    as_tags = lambda seqs: [[labels[i] for i in s] for s in seqs]  # noqa: E731
    scores = entity_scores(as_tags(true_ids), as_tags(pred_ids), scheme, mode)
    scores["token_accuracy"] = token_accuracy(true_ids, pred_ids)
    return scores


def entities(words: Sequence[str], tags: Sequence[str]) -> list[tuple[str, str, int, int]]:
    """The entities of one tagged sentence as (type, text, first word, last word), conlleval-style chunking."""
    get_entities = metric_package("seqeval.metrics.sequence_labeling", "seqeval", "tokens").get_entities
    return [(kind, " ".join(words[start:end + 1]), start, end) for kind, start, end in get_entities(list(tags))]
