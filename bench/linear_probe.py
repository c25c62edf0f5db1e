"""Do a run's pretrained features know a task better than random weights of the same shape? A linear probe.

Both models (the run's last checkpoint, and a fresh init of its shape with `--seed`) encode every train
and dev example of a classification or regression task; the mean of the final hidden states over the
real tokens (the `pooling: mean` of fine-tuning) is the feature vector. A logistic regression with
balanced class weights (classification) or a ridge regression (regression), both from scikit-learn on
standardised features, is fitted on train, optionally on a stratified label budget, and scored with the
task's selection metric (SST-2 accuracy, CoLA Matthews, STS-B Spearman) on dev. Also printed:
the mean cosine between the features of different examples (near 1: every input looks alike) and how
far the largest feature dimension stands above the mean one (massive activations).

With `--pooling siamese` (pair tasks), each sentence is encoded alone and the features are the
fine-tuning head's [u, v, |u - v|, u * v] of the two mean-pooled sentence vectors.

No weight moves, so this separates "the features hold the task" from "fine-tuning finds it": when the
probe favours the pretrained model but fine-tuning does not, the fine-tuning recipe is what to change.

    python bench/linear_probe.py RUN [--task sst2] [--fraction 0.1] [--seed 1] [--max-length 128]
                                     [--pooling mean|siamese] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression, Ridge
from tqdm import tqdm

from lmforge.data.tokenizer import load_tokenizer
from lmforge.errors import LmforgeError
from lmforge.model import build_model
from lmforge.run import load_run_config
from lmforge.tasks.batches import collate, encode_examples, pad_id, task_tokenizer
from lmforge.tasks.datasets import TaskData, load_task, subsample
from lmforge.tasks.metrics import compute_metrics
from lmforge.tasks.models import SequenceClassifier, mean_pool
from lmforge.train.checkpoint import find_checkpoint, load_model_weights


@torch.no_grad()
def features(model: torch.nn.Module, family: str, encoded: list, pad: int, batch_size: int = 64,
             pooling: str = "mean") -> np.ndarray:
    """Mean-pooled final hidden states (or siamese pair features), one row per example (length-sorted batches,
    original order)."""
    model.eval()
    backbone = model.bert if family == "bert" else model
    # The fine-tuning classifier's own feature code; its head is never used.
    siamese = SequenceClassifier(backbone, 1, 0.0, "siamese").eval() if pooling == "siamese" else None
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].ids))
    width = model.config.d_model * (4 if siamese else 1)
    out = np.zeros((len(encoded), width), dtype=np.float64)
    for start in tqdm(range(0, len(order), batch_size), desc="encode", unit="batch", leave=False,
                      disable=not sys.stderr.isatty()):
        rows = order[start:start + batch_size]
        batch = collate([encoded[i] for i in rows], pad)
        if siamese is not None:
            out[rows] = siamese.siamese_features(batch["input_ids"], batch["token_type_ids"],
                                                 batch["attention_mask"]).double().numpy()
            continue
        if family == "bert":
            hidden, _ = model.bert(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
        else:  # causal and right-padded: real positions never see the pads
            hidden = model.hidden_states(batch["input_ids"])
        out[rows] = mean_pool(hidden, batch["attention_mask"]).double().numpy()
    return out


def probe(train_x: np.ndarray, train_y: np.ndarray, dev_x: np.ndarray, dev_y: np.ndarray, task: TaskData) -> float:
    """The task's selection metric on dev of a linear model fitted on train's standardised features."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, dev_x = (train_x - mean) / std, (dev_x - mean) / std
    if task.is_regression:
        predicted = Ridge(alpha=10.0).fit(train_x, train_y).predict(dev_x)
    else:  # balanced: a minority class (CoLA's unacceptable) is not left to the majority's vote
        predicted = LogisticRegression(C=0.1, max_iter=3000, class_weight="balanced").fit(train_x, train_y).predict(dev_x)
    metric = task.config.select_metric
    return compute_metrics([metric], predicted, dev_y, task.positive_index or 1)[metric]


def geometry(x: np.ndarray) -> dict:
    """Mean cosine between the features of different examples, and the top dimension's mean |value| over the mean."""
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    n = len(unit)
    cosine = (np.square(unit.sum(0)).sum() - n) / max(1, n * (n - 1))
    magnitude = np.abs(x).mean(0)
    return {"mean_cosine": float(cosine), "top_dimension_ratio": float(magnitude.max() / magnitude.mean())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a pretraining run (bert or gpt family)")
    parser.add_argument("--task", default="sst2", help="task directory or GLUE name (default: sst2)")
    parser.add_argument("--glue-root", default="../shared/data/glue")
    parser.add_argument("--fraction", type=float, default=1.0, help="label budget of train, as in fine-tuning")
    parser.add_argument("--seed", type=int, default=1, help="the label sample and the random init")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--pooling", choices=["mean", "siamese"], default="mean",
                        help="mean of the input's final hidden states, or siamese (pair tasks): "
                             "[u, v, |u - v|, u * v] of each sentence encoded alone")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        run = Path(args.run)
        config = load_run_config(run).model
        if config.family not in ("bert", "gpt"):
            raise LmforgeError(f"{run} is a {config.family} run; the probe reads bert and gpt runs")
        task = load_task(args.task, args.glue_root)
        if task.config.kind not in ("classification", "regression"):
            raise LmforgeError(f"task {task.name} is a {task.config.kind} task; the probe needs classification "
                               f"or regression")
        if args.pooling == "siamese" and not task.is_pair:
            raise LmforgeError(f"--pooling siamese compares the two sentences of a pair task; {task.name} has one")
        tokenizer = task_tokenizer(load_tokenizer(run / "tokenizer.json"), config.family, args.max_length)
        train = subsample(task.train, args.fraction, args.seed) if args.fraction < 1 else task.train
        encoded_train, encoded_dev = encode_examples(tokenizer, train), encode_examples(tokenizer, task.dev)
        checkpoint = find_checkpoint(run, None)
    except LmforgeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    pad = pad_id(tokenizer, config.family)
    train_y = np.array([e.label for e in train], dtype=np.float64)
    dev_y = np.array([e.label for e in task.dev], dtype=np.float64)
    result = {"run": str(run), "checkpoint": checkpoint.path.name, "task": task.name, "train_examples": len(train),
              "metric": task.config.select_metric, "pooling": args.pooling}
    for init in ("pretrained", "random"):
        torch.manual_seed(args.seed)
        model = build_model(config)
        if init == "pretrained":
            load_model_weights(model, checkpoint.model_path)
        train_x = features(model, config.family, encoded_train, pad, pooling=args.pooling)
        dev_x = features(model, config.family, encoded_dev, pad, pooling=args.pooling)
        result[init] = {"probe": probe(train_x, train_y, dev_x, dev_y, task), **geometry(dev_x)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{run} ({checkpoint.path.name}) on {task.name}, {len(train):,} train examples; "
              f"linear probe of {'siamese pair' if args.pooling == 'siamese' else 'mean-pooled'} features:")
        for init in ("pretrained", "random"):
            r = result[init]
            print(f"  {init:<10} dev {result['metric']} {r['probe']:.3f}   mean cosine {r['mean_cosine']:.3f}   "
                  f"top dimension {r['top_dimension_ratio']:.1f}x the mean")
    return 0


if __name__ == "__main__":
    sys.exit(main())
