"""The structured task kinds on the fine-tuning recipe: what each hands FinetuneRecipe.

A kind provides its data (train / dev items, the label budget applied), a collate function, the
number of targets an item's loss averages over, the loss terms of a batch, the dev evaluation and
prediction. `tokens` tags every word (tagging.py), `span` finds an answer in a passage (qa.py),
`seq2seq` writes a target text from an input text (seq2seq.py): a GPT reads `prompt(input) target`
with the loss on the target, a T5 reads the input in its encoder and the target in its decoder.

Every metric is reported as a fraction in [0, 1], as lmforge's other metrics (accuracy, F1): the
scoring modules' x100 values (seqeval, SQuAD, sacreBLEU, ROUGE) are divided by 100 here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn

from lmforge.data.tokenizer import eos_id, warn_unknown
from lmforge.errors import LmforgeError
from lmforge.model import IGNORE_INDEX
from lmforge.tasks.batches import Encoded, collate, decode_response, encode_generation, pad_id, task_tokenizer
from lmforge.tasks.config import TaskConfig
from lmforge.tasks.heads import span_loss, token_classification_loss
from lmforge.tasks.mixture import MixingPlan, merge_dev_metrics, mixture_config
from lmforge.train.device import autocast
from lmforge.train.distributed import whole_model

STRUCTURED_KINDS = ("tokens", "span", "seq2seq")
UNBOUNDED = 10 ** 9  # a task tokenizer that never truncates: the kinds cut windows themselves


@dataclass
class KindTask:
    """A structured task as the fine-tuning recipe sees it (the role TaskData plays for sentence labels)."""

    config: TaskConfig
    label_names: list[str]  # tokens: the tag of each class; others: []
    train_units: int  # sentences / questions / pairs in train (before the label budget)
    dev_units: int
    counts: dict[str, int] = field(default_factory=dict)  # what was skipped or cut, for the summary

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def num_outputs(self) -> int:
        return len(self.label_names)

    @property
    def is_generation(self) -> bool:
        return False


@dataclass
class KindData:
    """A structured task's encoded splits and the functions the recipe calls on them."""

    task: KindTask
    tokenizer: Tokenizer
    train: list  # items: TokenWindow / SpanWindow / Encoded / Seq2SeqFeatures
    dev: list
    pad: int
    collate: Callable[[Sequence[Any]], dict[str, torch.Tensor]]
    targets: Callable[[Any], float]  # what an item's loss term averages over
    dev_raw: list  # the dev sentences / questions / pairs the metrics are computed on
    dev_tags: Optional[list[list[int]]] = None  # tokens: per dev sentence, per word: class
    label_words: Optional[list[str]] = None  # text-to-text classification: the target text of each class
    dev_targets: Optional[list] = None  # text-to-text: the dev classes / scores
    parts: Optional[list["KindData"]] = None  # a multi-task run: each task's data (train is their concatenation)
    mixing: Optional[MixingPlan] = None  # a multi-task run: which train items each epoch holds


def budget_indices(count: int, fraction: float, seed: int) -> list[int]:
    """A label budget over `count` units: `fraction` of them (at least one), drawn by `seed`, in order;
    the same seed gives nested subsets."""
    if fraction >= 1.0:
        return list(range(count))
    keep = max(1, int(np.floor(fraction * count + 0.5)))
    return sorted(np.random.default_rng([seed, 0]).permutation(count)[:keep].tolist())


def prepare_kind(config: Any, tokenizer: Tokenizer, label_fraction: float) -> KindData:
    """Load a tokens / span / seq2seq task, apply the label budget, encode both splits. config: FinetuneRunConfig."""
    kind = config.task.kind
    if config.extra_tasks:
        return _prepare_mixture(config, tokenizer, label_fraction)
    if config.model.family == "t5" and kind in ("classification", "regression"):
        return _prepare_text_to_text(config, tokenizer, label_fraction)
    if kind == "tokens":
        return _prepare_tokens(config, tokenizer, label_fraction)
    if kind == "span":
        return _prepare_span(config, tokenizer, label_fraction)
    return _prepare_seq2seq(config, tokenizer, label_fraction)


def _prepare_mixture(config: Any, tokenizer: Tokenizer, fraction: float) -> KindData:
    """Each task of a multi-task t5 run prepared on its own (its label budget too), trained as one mixture."""
    parts = [prepare_kind(dataclasses.replace(config, task=task, extra_tasks=[]), tokenizer, fraction)
             for task in config.tasks]
    counts: dict[str, int] = {}
    for part in parts:
        for key, value in part.task.counts.items():
            counts[key] = counts.get(key, 0) + value
    task = KindTask(mixture_config(config.tasks), [], sum(p.task.train_units for p in parts),
                    sum(p.task.dev_units for p in parts), counts)
    plan = MixingPlan(tuple(len(p.train) for p in parts), config.finetune.mixing_cap)
    first = parts[0]  # every part is text-to-text on one tokenizer: one collate, one target count
    return KindData(task, tokenizer, [item for p in parts for item in p.train], [item for p in parts for item in p.dev],
                    first.pad, first.collate, first.targets, [raw for p in parts for raw in p.dev_raw], parts=parts,
                    mixing=plan)


def _max_length(config: Any) -> int:
    return min(config.finetune.max_length, config.model.block_size)


def _labelled_count(item: Any) -> float:
    return float(sum(t != IGNORE_INDEX for t in item.labels))


def _prepare_tokens(config: Any, tokenizer: Tokenizer, fraction: float) -> KindData:
    from lmforge.tasks.tagging import collate_windows, encode_tagged, load_tagging_task

    data = load_tagging_task(config.task)
    keep = budget_indices(len(data.train), fraction, config.finetune.seed)
    tok = task_tokenizer(tokenizer, config.model.family, UNBOUNDED)
    task_config, length = config.task, _max_length(config)

    def encode(sentences, tags):
        return encode_tagged(tok, sentences, tags, length, task_config.stride, task_config.label_all_subwords,
                             task_config.label_subword)

    train = encode([data.train[i] for i in keep], [data.train_tags[i] for i in keep])
    dev = encode(data.dev, data.dev_tags)
    pad = pad_id(tokenizer, config.model.family)
    task = KindTask(task_config, data.label_names, len(data.train), len(data.dev),
                    {"train_windows": len(train), "dev_windows": len(dev)})
    return KindData(task, tok, train, dev, pad, lambda rows: collate_windows(rows, pad), _labelled_count,
                    data.dev, data.dev_tags)


def _prepare_span(config: Any, tokenizer: Tokenizer, fraction: float) -> KindData:
    from lmforge.tasks.qa import collate_windows, encode_qa, load_span_task

    data = load_span_task(config.task)
    keep = budget_indices(len(data.train), fraction, config.finetune.seed)
    tok = task_tokenizer(tokenizer, config.model.family, UNBOUNDED)
    length, stride = _max_length(config), config.task.stride
    train = encode_qa(tok, [data.train[i] for i in keep], length, stride)
    dev = encode_qa(tok, data.dev, length, stride)
    pad = pad_id(tokenizer, config.model.family)
    task = KindTask(config.task, [], len(data.train), len(data.dev),
                    {"skipped_answers": data.skipped_answers, "skipped_questions": data.skipped_questions,
                     "train_windows": len(train), "dev_windows": len(dev)})
    return KindData(task, tok, train, dev, pad, lambda rows: collate_windows(rows, pad), lambda item: 1.0, data.dev)


def _prepare_seq2seq(config: Any, tokenizer: Tokenizer, fraction: float) -> KindData:
    from lmforge.tasks.seq2seq import (as_generation, collate_seq2seq, count_cut_prompts, encode_seq2seq,
                                       load_seq2seq_task)

    data = load_seq2seq_task(config.task)
    keep = budget_indices(len(data.train), fraction, config.finetune.seed)
    train_raw = [data.train[i] for i in keep]
    dev_raw = data.dev
    task_config, length = config.task, _max_length(config)
    counts = {"skipped_pairs": data.skipped}
    if config.model.family == "t5":
        pad = pad_id_t5(tokenizer)
        train, cut_train = encode_seq2seq(tokenizer, train_raw, length, task_config.max_target_length,
                                          task_config.strict)
        dev, cut_dev = encode_seq2seq(tokenizer, dev_raw, length, task_config.max_target_length, task_config.strict)
        counts["cut_inputs"] = cut_train + cut_dev
        task = KindTask(task_config, [], len(data.train), len(dev_raw), counts)
        return KindData(task, tokenizer, train, dev, pad, lambda rows: collate_seq2seq(rows, pad),
                        lambda item: float(len(item.target_ids)), dev_raw)
    if config.model.family != "gpt":
        raise LmforgeError(f"task {task_config.name}: seq2seq fine-tunes a decoder (gpt) or an encoder-decoder (t5) "
                           f"run, not a {config.model.family} run")
    train_examples = as_generation(train_raw, task_config.prompt)
    dev_examples = as_generation(dev_raw, task_config.prompt)
    # The target and <eos> fit first (max_target_length of them); the prompt keeps its tail in what is left.
    counts["cut_inputs"] = (count_cut_prompts(tokenizer, train_examples, length, task_config.strict)
                            + count_cut_prompts(tokenizer, dev_examples, length, task_config.strict))
    train = encode_generation(tokenizer, train_examples, length)
    dev = encode_generation(tokenizer, dev_examples, length)
    pad = pad_id(tokenizer, "gpt")
    task = KindTask(task_config, [], len(data.train), len(dev_raw), counts)
    return KindData(task, tokenizer, train, dev, pad, lambda rows: collate(rows, pad),
                    lambda item: float(sum(t != IGNORE_INDEX for t in item.target)), dev_examples)


def pad_id_t5(tokenizer: Tokenizer) -> int:
    """T5's <pad> (id 0 in lmforge's t5 tokenizers)."""
    pad = tokenizer.token_to_id("<pad>")
    return 0 if pad is None else pad


# ---------------------------------------------------------------------------------------------
# Loss


def kind_loss(model: nn.Module, batch: dict[str, torch.Tensor], kind: str, family: str) -> torch.Tensor:
    """The mean loss of a batch of a structured kind (over its labelled tokens, windows or target tokens)."""
    if kind in ("tokens", "span"):
        return per_token_loss(model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]), batch, kind)
    if family == "t5":  # seq2seq, or text-to-text classification / regression
        return model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"]).loss
    return model(batch["input_ids"], labels=batch["labels"]).loss


def per_token_loss(out: Any, batch: dict[str, torch.Tensor], kind: str) -> torch.Tensor:
    """The loss of a tagger's logits (tokens) or a span extractor's (start, end) logits (span)."""
    if kind == "tokens":
        return token_classification_loss(out, batch["labels"])
    return span_loss(out[0], out[1], batch["start_positions"], batch["end_positions"])


# ---------------------------------------------------------------------------------------------
# Dev evaluation


def _batches(items: Sequence[Any], size: int, length: Callable[[Any], int]) -> list[list[int]]:
    order = sorted(range(len(items)), key=lambda i: -length(items[i]))
    return [order[i:i + size] for i in range(0, len(order), size)]


@torch.no_grad()
def evaluate_kind(model: nn.Module, data: KindData, device: torch.device, precision: str, family: str,
                  num_beams: int = 1, batch_size: int = 32) -> dict[str, float]:
    """Dev metrics of a structured kind: val_loss and val_<metric> for each of the task's metrics (fractions)."""
    was_training = model.training
    model.eval()
    try:
        if data.parts is not None:
            return merge_dev_metrics([(part.task.config, evaluate_kind(model, part, device, precision, family,
                                                                       num_beams, batch_size),
                                       sum(part.targets(item) for item in part.dev)) for part in data.parts])
        kind = data.task.config.kind
        if kind == "seq2seq" or family == "t5":
            return _evaluate_seq2seq(model, data, device, precision, family, num_beams, batch_size)
        per_item: dict[int, Any] = {}
        loss_sum, count = 0.0, 0.0
        for indices in _batches(data.dev, batch_size, lambda w: len(w.ids)):
            rows = [data.dev[i] for i in indices]
            batch = {k: v.to(device) for k, v in data.collate(rows).items()}
            with autocast(device, precision):
                out = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
            weight = sum(data.targets(r) for r in rows)
            loss_sum += float(per_token_loss(out, batch, kind)) * weight
            count += weight
            if kind == "tokens":
                for i, row in zip(indices, out.float().argmax(-1).cpu().numpy()):
                    per_item[i] = row
            else:
                starts, ends = out[0].float().cpu().numpy(), out[1].float().cpu().numpy()
                for i, s, e in zip(indices, starts, ends):
                    per_item[i] = (s, e)
        metrics = {"val_loss": loss_sum / max(count, 1.0)}
        ordered = [per_item[i] for i in range(len(data.dev))]
        if kind == "tokens":
            from lmforge.tasks.tagging import merge_windows, tagging_metrics

            outside = data.task.label_names.index("O") if "O" in data.task.label_names else 0
            predicted = merge_windows(data.dev, ordered, [len(s.words) for s in data.dev_raw], outside)
            scores = tagging_metrics(data.task.label_names, data.dev_tags, predicted, data.task.config.scheme,
                                     data.task.config.entity_mode)
        else:
            from lmforge.tasks.qa import best_answers, squad_scores

            answers = best_answers(data.dev, data.dev_raw, [s for s, _ in ordered], [e for _, e in ordered],
                                   data.task.config.max_answer_length)
            scores = squad_scores(answers, data.dev_raw)
        return {**metrics, **{f"val_{k}": v / 100.0 for k, v in scores.items()}}
    finally:
        model.train(was_training)


def _evaluate_seq2seq(model: nn.Module, data: KindData, device: torch.device, precision: str, family: str,
                      num_beams: int, batch_size: int) -> dict[str, float]:
    from lmforge.tasks.seq2seq import seq2seq_metrics

    loss_sum, count = 0.0, 0.0
    length = (lambda f: len(f.source_ids)) if family == "t5" else (lambda e: len(e.ids))
    for indices in _batches(data.dev, batch_size, length):
        rows = [data.dev[i] for i in indices]
        batch = {k: v.to(device) for k, v in data.collate(rows).items()}
        with autocast(device, precision):
            loss = kind_loss(model, batch, "seq2seq", family)
        weight = sum(data.targets(r) for r in rows)
        loss_sum, count = loss_sum + float(loss) * weight, count + weight
    config = data.task.config
    with whole_model(model):  # FSDP: decoding needs every weight on every process
        if family == "t5":
            hypotheses = decode_t5(model, data.tokenizer, [e.source for e in data.dev_raw], _source_limit(data),
                                   config.max_target_length, num_beams, device)
        else:
            hypotheses = decode_gpt(model, data.tokenizer, [e.text for e in data.dev_raw],
                                    model.config.block_size, config.max_target_length, device, num_beams)
    if family == "t5" and config.kind != "seq2seq":
        scores = text_to_text_metrics(config, hypotheses, data)
        return {"val_loss": loss_sum / max(count, 1.0), **{f"val_{k}": v for k, v in scores.items()}}
    references = [e.target for e in data.dev_raw] if family == "t5" else [str(e.label) for e in data.dev_raw]
    scores = seq2seq_metrics(config.metrics, hypotheses, references)
    return {"val_loss": loss_sum / max(count, 1.0), **{f"val_{k}": v / 100.0 for k, v in scores.items()}}


def _source_limit(data: KindData) -> int:
    return max((len(f.source_ids) for f in data.dev), default=1)


# ---------------------------------------------------------------------------------------------
# Decoding and prediction


def decode_gpt(model: nn.Module, tokenizer: Tokenizer, prompts: Sequence[str], block_size: int, max_new: int,
               device: torch.device, num_beams: int = 1) -> list[str]:
    """Continuations of each prompt up to <eos> (at most max_new tokens), as text: greedy, or beam search when
    num_beams > 1."""
    from lmforge.infer.generate import beam_search, generate

    eos = eos_id(tokenizer)
    out = []
    for encoding in tokenizer.encode_batch(list(prompts), add_special_tokens=False):
        ids = encoding.ids[-(block_size - 1):] or [eos]
        room = max(0, block_size - len(ids))
        prompt = torch.tensor([ids], device=device)
        if num_beams > 1:
            generated = beam_search(model, prompt, min(max_new, room), num_beams, stop_token=eos)
        else:
            generated = generate(model, prompt, min(max_new, room), temperature=0.0, stop_token=eos)
        out.append(decode_response(tokenizer, generated[0, len(ids):].tolist(), eos))
    return out


def decode_t5(model: nn.Module, tokenizer: Tokenizer, inputs: Sequence[str], max_source: int, max_new: int,
              num_beams: int, device: torch.device, batch_size: int = 32) -> list[str]:
    """Decoded outputs of a T5 for each input text (greedy, or beam search when num_beams > 1)."""
    from lmforge.infer.seq2seq import generate_seq2seq

    tok = Tokenizer.from_str(tokenizer.to_str())
    tok.no_padding()
    tok.enable_truncation(max_source)
    encodings = tok.encode_batch(list(inputs)) if inputs else []
    warn_unknown(tok, list(inputs), encodings, "the inputs")
    eos = tokenizer.token_to_id("</s>")
    eos = 1 if eos is None else eos
    pad = pad_id_t5(tokenizer)
    out = []
    for start in range(0, len(encodings), batch_size):
        part = encodings[start:start + batch_size]
        width = max(len(e.ids) for e in part)
        ids = torch.full((len(part), width), pad, dtype=torch.long)
        mask = torch.zeros((len(part), width), dtype=torch.long)
        for row, enc in enumerate(part):
            ids[row, :len(enc.ids)] = torch.tensor(enc.ids)
            mask[row, :len(enc.ids)] = 1
        generated = generate_seq2seq(model, ids.to(device), mask.to(device), max_new_tokens=max_new,
                                     num_beams=num_beams, eos_id=eos)
        for row in generated.tolist():  # each row starts with the decoder start token (<pad>)
            out.append(decode_response(tokenizer, row[1:], eos))
    return out


@torch.no_grad()
def predict_entities(model: nn.Module, tokenizer: Tokenizer, config: Any, texts: Sequence[str]) -> list[dict[str, Any]]:
    """Per text: its words' tags and the entities they form (type, text, characters)."""
    from lmforge.tasks.tagging import TaggedSentence, encode_tagged, entities, merge_windows, split_words

    device = next(model.parameters()).device
    labels = config.task.labels or []
    tok = task_tokenizer(tokenizer, config.model.family, UNBOUNDED)
    out = []
    for text in texts:
        words = split_words(tokenizer, text)
        if not words:
            out.append({"tags": [], "entities": []})
            continue
        sentence = TaggedSentence([w for w, _ in words], ["O"] * len(words), "input")
        windows = encode_tagged(tok, [sentence], None, _max_length(config), config.task.stride,
                                config.task.label_all_subwords, config.task.label_subword)
        predictions = []
        for window in windows:
            batch = collate([Encoded(window.ids, window.type_ids, 0)], 0)
            logits = model(batch["input_ids"].to(device), batch["token_type_ids"].to(device),
                           batch["attention_mask"].to(device))
            predictions.append(logits[0].float().argmax(-1).cpu().numpy())
        outside = labels.index("O") if "O" in labels else 0
        classes = merge_windows(windows, predictions, [len(words)], outside)[0]
        tags = [labels[c] for c in classes]
        found = [{"type": kind, "text": text[words[a][1][0]:words[b][1][1]], "start": words[a][1][0],
                  "end": words[b][1][1]} for kind, _, a, b in entities(sentence.words, tags)]
        out.append({"tags": tags, "entities": found})
    return out


@torch.no_grad()
def predict_answers(model: nn.Module, tokenizer: Tokenizer, config: Any,
                    pairs: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    """Per (question, passage): the best answer span's text."""
    from lmforge.tasks.qa import QAExample, best_answers, encode_qa

    device = next(model.parameters()).device
    tok = task_tokenizer(tokenizer, config.model.family, UNBOUNDED)
    examples = [QAExample(str(i), "input", q, p, (), 0, "input") for i, (q, p) in enumerate(pairs)]
    windows = encode_qa(tok, examples, _max_length(config), config.task.stride)
    starts, ends = [], []
    for window in windows:
        batch = collate([Encoded(window.ids, window.type_ids, 0)], 0)
        s, e = model(batch["input_ids"].to(device), batch["token_type_ids"].to(device),
                     batch["attention_mask"].to(device))
        starts.append(s[0].float().cpu().numpy())
        ends.append(e[0].float().cpu().numpy())
    answers = best_answers(windows, examples, starts, ends, config.task.max_answer_length)
    return [{"question": q, "answer": a} for (q, _), a in zip(pairs, answers)]


@torch.no_grad()
def predict_outputs(model: nn.Module, tokenizer: Tokenizer, config: Any, texts: Sequence[Any]) -> list[dict[str, Any]]:
    """Per input text (text-to-text: (text, pair)): the generated target text."""
    device = next(model.parameters()).device
    if config.model.family == "t5":
        if config.task.kind != "seq2seq":
            texts = [text_input(config.task, t, p) for t, p in texts]
        outputs = decode_t5(model, tokenizer, texts, _max_length(config), config.task.max_target_length,
                            config.finetune.num_beams, device)
    else:
        prompts = [config.task.prompt.replace("{input}", t) for t in texts]
        outputs = decode_gpt(model, tokenizer, prompts, config.model.block_size, config.task.max_target_length,
                             device, config.finetune.num_beams)
    return [{"input": t, "output": o} for t, o in zip(texts, outputs)]


# ---------------------------------------------------------------------------------------------
# Text-to-text: classification and regression on a t5 run (label words as targets)

# GLUE labels as T5 writes them (class index -> word); other tasks use their label names.
GLUE_LABEL_WORDS = {"cola": ["unacceptable", "acceptable"], "sst2": ["negative", "positive"],
                    "mrpc": ["not_equivalent", "equivalent"], "wnli": ["not_entailment", "entailment"]}


def label_words(config: TaskConfig, names: Sequence[str]) -> list[str]:
    """The target text of each class: T5's words for GLUE tasks, else the label names themselves."""
    words = GLUE_LABEL_WORDS.get(config.name)
    if words is not None and len(words) == len(names):
        return list(words)
    for name in names:
        if not str(name).strip():
            raise LmforgeError(f"task {config.name}: the label {name!r} has no text form for a text-to-text (t5) run")
    return [str(n) for n in names]


def stsb_text(score: float) -> str:
    """A regression target as T5 writes STS-B scores: rounded to the nearest 0.2, one decimal."""
    return f"{round(float(score) * 5) / 5:.1f}"


def text_input(config: TaskConfig, text: str, pair: Optional[str]) -> str:
    """The encoder text: a task prefix, then `sentence: a` or `sentence1: a sentence2: b`."""
    if pair is None:
        return f"{config.name} sentence: {text}"
    return f"{config.name} sentence1: {text} sentence2: {pair}"


def _prepare_text_to_text(config: Any, tokenizer: Tokenizer, fraction: float) -> KindData:
    from lmforge.tasks.datasets import load_task, subsample
    from lmforge.tasks.seq2seq import Seq2SeqExample, collate_seq2seq, encode_seq2seq

    task_data = load_task(config.task)
    regression = config.task.kind == "regression"
    words = [] if regression else label_words(config.task, task_data.label_names)
    train = task_data.train if fraction >= 1.0 else subsample(task_data.train, fraction, config.finetune.seed)

    def pairs(examples):
        return [Seq2SeqExample(text_input(config.task, e.text, e.text_pair),
                               stsb_text(e.label) if regression else words[int(e.label)], e.source) for e in examples]

    length, pad = _max_length(config), pad_id_t5(tokenizer)
    train_items, cut_train = encode_seq2seq(tokenizer, pairs(train), length, config.task.max_target_length,
                                            config.task.strict)
    dev_raw = pairs(task_data.dev)
    dev_items, cut_dev = encode_seq2seq(tokenizer, dev_raw, length, config.task.max_target_length, config.task.strict)
    # Dev decoding stops a few tokens past the longest label text: an untrained model that never writes </s>
    # costs max_target_length decoder steps per batch otherwise, for outputs that are wrong either way.
    longest = max((len(item.target_ids) for item in train_items), default=1)
    scored = dataclasses.replace(config.task, max_target_length=min(config.task.max_target_length, longest + 4))
    task = KindTask(scored, list(task_data.label_names), len(task_data.train), len(task_data.dev),
                    {"cut_inputs": cut_train + cut_dev})
    return KindData(task, tokenizer, train_items, dev_items, pad, lambda rows: collate_seq2seq(rows, pad),
                    lambda item: float(len(item.target_ids)), dev_raw, label_words=words,
                    dev_targets=[e.label for e in task_data.dev])


def text_to_label(outputs: Sequence[str], words: Sequence[str], regression: bool) -> np.ndarray:
    """Decoded texts -> class indices (-1: no label word, counted wrong) or scores (NaN: no number)."""
    if regression:
        values = []
        for text in outputs:
            try:
                values.append(float(text.strip()))
            except ValueError:
                values.append(float("nan"))
        return np.asarray(values, dtype=np.float64)
    index = {w: i for i, w in enumerate(words)}
    return np.asarray([index.get(text.strip(), -1) for text in outputs], dtype=np.int64)


def text_to_text_metrics(config: TaskConfig, outputs: Sequence[str], data: KindData) -> dict[str, float]:
    """The task's metrics from decoded texts: a text that is no label counts as wrong (as another class; a
    regression output that is no number as 0.0); `invalid_outputs` is their fraction."""
    from lmforge.tasks.metrics import compute_metrics

    regression = config.kind == "regression"
    preds = text_to_label(outputs, data.label_words or [], regression)
    targets = np.asarray(data.dev_targets)
    if regression:
        invalid = np.isnan(preds)
        preds = np.where(invalid, 0.0, preds)
    else:
        invalid = preds < 0
        preds = np.where(invalid, (targets + 1) % max(2, len(data.label_words or [])), preds)
    positive = data.task.label_names.index(config.positive_label) if config.positive_label else (
        data.task.label_names.index("1") if "1" in data.task.label_names else 1)
    scores = compute_metrics(config.metrics, preds, targets, positive)
    return {**scores, "invalid_outputs": float(np.mean(invalid)) if len(invalid) else 0.0}
