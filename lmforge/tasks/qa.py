"""Extractive QA (`task.kind: span`): SQuAD v1.1 JSON -> question+passage windows -> best span -> EM / F1.

A passage longer than the model's length is cut into windows that overlap by `stride` tokens, the
question kept whole in each (the tokenizer's own truncation of the second text). A training window
marks the answer's first and last token, or position 0 ([CLS]) when the answer is not wholly inside
it, as BERT does. At evaluation the best span over all windows of a question (highest start + end
logit, end not before start, at most max_answer_length tokens) is mapped back to the passage's
characters through the tokenizer's offsets. Exact match and F1 normalise answers as the official
SQuAD v1.1 evaluation script does: lower case, no punctuation, no articles a/an/the, single spaces.

Only the SQuAD dev set is at hand here, so a recipe holds out whole articles of it as its dev split
(`split_by_article`): paragraphs of one article never sit on both sides.
"""

from __future__ import annotations

import json
import logging
import re
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from tokenizers import Tokenizer

from lmforge.errors import LmforgeError
from lmforge.tasks.batches import Encoded, collate
from lmforge.tasks.config import TaskConfig, find_split_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QAExample:
    id: str
    title: str  # the article; splits never cut one
    question: str
    context: str
    # every gold answer text whose offset matched (EM / F1 take the best of them); () for a question to predict
    answers: tuple[str, ...]
    answer_start: int  # character offset of answers[0] in context: the training target
    source: str  # "path: data[i].paragraphs[j].qas[k]", for messages


@dataclass
class SquadData:
    examples: list[QAExample]
    skipped_answers: int  # answers whose answer_start does not point at their text
    skipped_questions: int  # questions left without a usable answer


def read_squad(path: str | Path, strict: bool = False) -> SquadData:
    """The questions of a SQuAD v1.1 JSON file; an answer whose offset does not match its text is
    skipped with a warning (an error when strict), a question left without answers too."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LmforgeError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LmforgeError(f"{path}: not a SQuAD JSON file ({err})") from None
    articles = _field(data, "data", list, path, "the top level") if isinstance(data, dict) else None
    if articles is None:
        raise LmforgeError(f"{path}: not a SQuAD JSON file (expected an object with a 'data' list)")
    examples, skipped_answers, skipped_questions = [], 0, 0
    for i, article in enumerate(articles):
        where = f"data[{i}]"
        title = str(_field(article, "title", str, path, where))
        for j, paragraph in enumerate(_field(article, "paragraphs", list, path, where)):
            context = _field(paragraph, "context", str, path, f"{where}.paragraphs[{j}]")
            for k, qa in enumerate(_field(paragraph, "qas", list, path, f"{where}.paragraphs[{j}]")):
                at = f"{where}.paragraphs[{j}].qas[{k}]"
                texts, starts = [], []
                for a, answer in enumerate(_field(qa, "answers", list, path, at)):
                    text = _field(answer, "text", str, path, f"{at}.answers[{a}]")
                    start = answer.get("answer_start")
                    if not isinstance(start, int) or context[start:start + len(text)] != text or not text.strip():
                        if strict:
                            raise LmforgeError(f"{path}: {at}.answers[{a}]: answer_start {start!r} does not point at "
                                               f"its text {text!r} in the context (task.strict is on)")
                        skipped_answers += 1
                        continue
                    texts.append(text)
                    starts.append(start)
                if not texts:
                    skipped_questions += 1
                    continue
                examples.append(QAExample(str(_field(qa, "id", (str, int), path, at)), title,
                                          _field(qa, "question", str, path, at), context, tuple(texts), starts[0],
                                          f"{path}: {at}"))
    if skipped_answers:
        log.warning("%s: skipped %d answer(s) whose answer_start does not point at their text (%d question(s) left "
                    "without an answer, skipped too)", path, skipped_answers, skipped_questions)
    if not examples:
        raise LmforgeError(f"{path}: no questions with answers")
    ids = Counter(e.id for e in examples)
    twice = [i for i, n in ids.items() if n > 1]
    if twice:
        raise LmforgeError(f"{path}: question id {twice[0]!r} appears {ids[twice[0]]} times (ids must be unique)")
    return SquadData(examples, skipped_answers, skipped_questions)


def _field(obj: Any, key: str, kind: type | tuple[type, ...], path: Path, where: str) -> Any:
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, kind):
        raise LmforgeError(f"{path}: {where}: no {key!r} of the SQuAD layout (got {type(value).__name__})")
    return value


def split_by_article(examples: Sequence[QAExample], held_out: int, seed: int) -> tuple[list[QAExample],
                                                                                           list[QAExample]]:
    """(train, dev): `held_out` whole articles, drawn by seed from the titles in file order, become dev."""
    titles = list(dict.fromkeys(e.title for e in examples))
    if not 0 < held_out < len(titles):
        raise LmforgeError(f"task.held_out_articles must be in [1, {len(titles) - 1}] (the file has {len(titles)} "
                           f"articles), got {held_out}")
    dev_titles = {titles[i] for i in np.random.default_rng(seed).choice(len(titles), held_out, replace=False)}
    return ([e for e in examples if e.title not in dev_titles], [e for e in examples if e.title in dev_titles])


@dataclass
class SpanData:
    config: TaskConfig
    train: list[QAExample]
    dev: list[QAExample]
    skipped_answers: int  # over both splits' files
    skipped_questions: int


def load_span_task(config: TaskConfig) -> SpanData:
    """Train and dev questions of a span task: dev from its own file, or held-out articles of the train file."""
    train_data = read_squad(find_split_file(config, "train", (".json",)), config.strict)
    if config.held_out_articles:
        train, dev = split_by_article(train_data.examples, config.held_out_articles, config.split_seed)
        return SpanData(config, train, dev, train_data.skipped_answers, train_data.skipped_questions)
    dev_data = read_squad(find_split_file(config, "dev", (".json",)), config.strict)
    return SpanData(config, train_data.examples, dev_data.examples, train_data.skipped_answers
                    + dev_data.skipped_answers, train_data.skipped_questions + dev_data.skipped_questions)


def windowing_tokenizer(tokenizer: Tokenizer, max_length: int, stride: int) -> Tokenizer:
    """A copy of a task tokenizer that cuts a pair's second text into windows overlapping by `stride` tokens."""
    tok = Tokenizer.from_str(tokenizer.to_str())
    tok.no_padding()
    tok.enable_truncation(max_length, stride=stride, strategy="only_second")
    return tok


@dataclass(frozen=True)
class SpanWindow:
    example: int  # index into the examples encoded
    ids: list[int]
    type_ids: list[int]
    offsets: list[Optional[tuple[int, int]]]  # per token: its characters in the passage; None outside the passage
    start: int  # the answer's first and last token in this window; 0 and 0 when it is not wholly inside
    end: int


def encode_qa(tokenizer: Tokenizer, examples: Sequence[QAExample], max_length: int, stride: int) -> list[SpanWindow]:
    """Question + passage windows of each example, with the answer's token positions (0, 0 without an answer).

    tokenizer: a task tokenizer (the family's pair template); windows hold at most max_length tokens.
    """
    specials = tokenizer.num_special_tokens_to_add(True)
    questions = tokenizer.encode_batch([e.question for e in examples], add_special_tokens=False) if examples else []
    for example, question in zip(examples, questions):
        room = max_length - specials - len(question.ids)
        if room <= stride:
            raise LmforgeError(f"{example.source}: the question is {len(question.ids)} tokens, too long for windows of "
                               f"finetune.max_length {max_length} that overlap by task.stride {stride} (the passage "
                               f"needs more than {stride} tokens of each)")
    tok = windowing_tokenizer(tokenizer, max_length, stride)
    encodings = tok.encode_batch([(e.question, e.context) for e in examples]) if examples else []
    windows = []
    for index, (example, first) in enumerate(zip(examples, encodings)):
        # No answer (a question to predict): every window points at position 0.
        answer = (example.answer_start, example.answer_start + len(example.answers[0])) if example.answers else None
        for enc in [first, *first.overflowing]:
            sequence_ids, all_offsets = enc.sequence_ids, enc.offsets  # each access copies out of Rust: once
            passage = [t for t, s in enumerate(sequence_ids) if s == 1]
            offsets = [tuple(o) if s == 1 else None for o, s in zip(all_offsets, sequence_ids)]
            start = end = 0
            if answer and passage and offsets[passage[0]][0] <= answer[0] and offsets[passage[-1]][1] >= answer[1]:
                start = max(t for t in passage if offsets[t][0] <= answer[0])
                end = min(t for t in passage if t >= start and offsets[t][1] >= answer[1])
            windows.append(SpanWindow(index, list(enc.ids), list(enc.type_ids), offsets, start, end))
    return windows


def collate_windows(windows: Sequence[SpanWindow], pad: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, token_type_ids, attention_mask, and start_positions / end_positions (batch,)."""
    batch = collate([Encoded(w.ids, w.type_ids, w.start) for w in windows], pad)
    batch["start_positions"] = batch.pop("labels")
    batch["end_positions"] = torch.tensor([w.end for w in windows], dtype=torch.int64)
    return batch


def best_answers(windows: Sequence[SpanWindow], examples: Sequence[QAExample], start_logits: Sequence[np.ndarray],
                 end_logits: Sequence[np.ndarray], max_answer_length: int = 30) -> list[str]:
    """The predicted answer text of each example: its best passage span over all of its windows.

    start_logits / end_logits: one 1-d array per window, over the window's tokens (padding may follow).
    A span scores start + end logit; it lies in the passage, ends at or after its start and spans at
    most max_answer_length tokens. An example with no such span in any window answers "".
    """
    best: list[tuple[float, str]] = [(-np.inf, "")] * len(examples)
    for window, starts, ends in zip(windows, start_logits, end_logits):
        inside = np.array([o is not None for o in window.offsets])
        n = len(window.offsets)
        s = np.where(inside, np.asarray(starts, dtype=np.float64)[:n], -np.inf)
        e = np.where(inside, np.asarray(ends, dtype=np.float64)[:n], -np.inf)
        for length in range(min(max_answer_length, n)):  # spans of length+1 tokens: start i, end i + length
            scores = s[: n - length] + e[length:]
            i = int(np.argmax(scores))
            if scores[i] > best[window.example][0]:
                context = examples[window.example].context
                text = context[window.offsets[i][0]:window.offsets[i + length][1]].strip()
                best[window.example] = (float(scores[i]), text)
    return [text for _, text in best]


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's normalisation: lower-case, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


_PUNCTUATION = frozenset(string.punctuation)


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer."""
    return float(any(normalize_answer(prediction) == normalize_answer(g) for g in golds))


def token_f1(prediction: str, golds: Sequence[str]) -> float:
    """The best token-overlap F1 of the normalised prediction against any gold answer."""
    pred = normalize_answer(prediction).split()
    best = 0.0
    for gold in golds:
        truth = normalize_answer(gold).split()
        common = sum((Counter(pred) & Counter(truth)).values())
        if common:
            precision, recall = common / len(pred), common / len(truth)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def squad_scores(predictions: Sequence[str], examples: Sequence[QAExample]) -> dict[str, float]:
    """exact_match and span_f1, x100, averaged over the questions (as evaluate-v1.1.py)."""
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} questions")
    if not examples:
        return {"exact_match": 0.0, "span_f1": 0.0}
    em = [exact_match(p, e.answers) for p, e in zip(predictions, examples)]
    f1 = [token_f1(p, e.answers) for p, e in zip(predictions, examples)]
    return {"exact_match": 100.0 * float(np.mean(em)), "span_f1": 100.0 * float(np.mean(f1))}
