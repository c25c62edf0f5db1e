"""What a t5 pretraining run learned: its validation curve against the unigram baseline of the targets,
and span fills of validation examples, printed as the model wrote them.

The baseline is the cross-entropy, on the run's validation targets (the same fixed batches every
evaluation scores), of the unigram distribution of target tokens counted over training batches of the
same objective: what a model that ignores its input entirely would score. Two probes say whether the
encoder is used: the content targets' loss with another example's encoder input (the gap), and how
alike the encoder's output vectors are across positions (a collapsed encoder writes one vector). Fills
are greedy decodes of the first validation examples (corrupted exactly as the evaluation corrupts
them), beside the truth.

    python bench/t5_pretrain_report.py RUN [--examples 10] [--train-batches 200] [--plot RUN/t5-curve.png]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from lmforge.data.loader import loader_for
from lmforge.data.objectives.span import SpanVocab
from lmforge.infer.seq2seq import generate_seq2seq
from lmforge.run import load_run, run_store


def unigram_baseline(run, store, train_batches: int) -> tuple[float, int]:
    """Cross-entropy (nats per target token) of train targets' unigram distribution on the validation targets."""
    config = run.config
    vocab_size = config.model.vocab_size
    counts = np.ones(vocab_size, dtype=np.float64)  # add-one: no validation token gets probability 0
    train = loader_for(config, store, "train", training=True)
    for _ in range(train_batches):
        for _ in range(train.accum_steps):
            labels = train.next()["labels"].numpy()
            counts += np.bincount(labels[labels >= 0], minlength=vocab_size)
    train.close()
    log_p = np.log(counts / counts.sum())
    val = loader_for(config, store, "val", training=False)
    total, n = 0.0, 0
    for _ in range(config.train.eval_batches):
        for _ in range(val.accum_steps):
            labels = val.next()["labels"].numpy()
            kept = labels[labels >= 0]
            total, n = total - float(log_p[kept].sum()), n + kept.size
    val.close()
    return total / n, n


def span_fills(run, store, count: int) -> list[dict[str, str]]:
    """Greedy fills of the first `count` validation examples: input, model output and truth, as text."""
    config, tokenizer = run.config, run.tokenizer
    vocab = SpanVocab.from_tokenizer(tokenizer)
    val = loader_for(config, store, "val", training=False)
    batch = val.next()
    val.close()
    out = []
    for row in range(min(count, batch["input_ids"].shape[0])):
        ids = batch["input_ids"][row : row + 1]
        labels = batch["labels"][row]
        target_len = int((labels >= 0).sum())
        written = generate_seq2seq(run.model, ids, None, target_len + 8, 0.0, None, None, None, 1, 1.0, False,
                                   eos_id=vocab.eos)[0].tolist()
        decode = lambda t: tokenizer.decode([int(x) for x in t], skip_special_tokens=False)  # noqa: E731
        out.append({"input": decode(ids[0].tolist()), "model": decode(written[1:]),
                    "truth": decode(labels[labels >= 0].tolist())})
    return out


@torch.no_grad()
def encoder_use(run, store, batches: int = 4) -> tuple[float, float, float]:
    """Does the decoder read the encoder? The mean loss of the content target tokens (no sentinel, </s> or
    padding) of the first validation batches with each example's own encoder input, with another
    example's (the batch rolled by one), and the second minus the first: 0 = the encoder is ignored."""
    vocab = SpanVocab.from_tokenizer(run.tokenizer)
    val = loader_for(run.config, store, "val", training=False)
    own, other, count = 0.0, 0.0, 0
    for _ in range(batches):
        batch = val.next()
        labels = batch["labels"]
        sentinel = (labels > vocab.sentinel_start - vocab.num_sentinels) & (labels <= vocab.sentinel_start)
        content = (labels >= 0) & (labels != vocab.eos) & (labels != vocab.pad) & ~sentinel
        roll = torch.roll(torch.arange(labels.shape[0]), 1)
        for inputs, mask, total in ((batch["input_ids"], batch["attention_mask"], "own"),
                                    (batch["input_ids"][roll], batch["attention_mask"][roll], "other")):
            logits = run.model(inputs, mask, labels=labels).logits
            loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
            if total == "own":
                own += float(loss[content].sum())
            else:
                other += float(loss[content].sum())
        count += int(content.sum())
    val.close()
    return own / count, other / count, (other - own) / count


@torch.no_grad()
def encoder_spread(run, store) -> float:
    """Mean cosine similarity between the encoder's output vectors at different positions of one example,
    averaged over the first validation batch: near 0 for distinct positions, near 1 when the encoder has
    collapsed to one vector (what AdamW at T5's init did: docs/t5.md)."""
    val = loader_for(run.config, store, "val", training=False)
    batch = val.next()
    val.close()
    out = torch.nn.functional.normalize(run.model.encode(batch["input_ids"], batch["attention_mask"]), dim=-1)
    sims = out @ out.transpose(1, 2)
    n = sims.shape[1]
    return float(((sims.sum((1, 2)) - n) / (n * n - n)).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--examples", type=int, default=10)
    parser.add_argument("--train-batches", type=int, default=200)
    parser.add_argument("--plot", help="validation curve with the baseline (default: RUN/t5-val-curve.png)")
    args = parser.parse_args()
    run_dir = Path(args.run)
    run = load_run(run_dir)
    store = run_store(run_dir, run.config)
    baseline, n = unigram_baseline(run, store, args.train_batches)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["val_loss"], r.get("val_token_acc")) for r in rows if "val_loss" in r]
    print(f"unigram baseline of the targets: {baseline:.4f} nats/token (ppl {math.exp(baseline):.1f}; "
          f"{args.train_batches} train batches counted, {n:,} validation target tokens)")
    print("| step | val loss | val token acc | below the baseline |")
    print("|---|---|---|---|")
    for step, loss, acc in evals:
        print(f"| {step} | {loss:.4f} | {acc if acc is None else f'{acc:.1%}'} | {baseline - loss:+.3f} |")
    own, other, gap = encoder_use(run, store)
    print(f"content targets: {own:.4f} nats with their own encoder input, {other:.4f} with another example's "
          f"(gap {gap:+.4f}; 0 = the decoder ignores the encoder)")
    print(f"encoder output: mean cosine between positions {encoder_spread(run, store):.3f} (near 1 = collapsed)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot([e[0] for e in evals], [e[1] for e in evals], "o-", label="validation loss")
    ax.axhline(baseline, color="gray", ls="--", label="unigram baseline of the targets")
    ax.set(xlabel="step", ylabel="nats per target token", title=f"{run.config.name}: span corruption")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    plot = Path(args.plot or run_dir / "t5-val-curve.png")
    fig.savefig(plot, dpi=110)
    print(f"plot: {plot}")
    with torch.no_grad():
        for i, fill in enumerate(span_fills(run, store, args.examples), 1):
            print(f"\n[{i}] input: {fill['input']}\n    model: {fill['model']}\n    truth: {fill['truth']}")


if __name__ == "__main__":
    main()
