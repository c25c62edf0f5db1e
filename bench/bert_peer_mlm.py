"""The transformers way of pretraining a small BERT, for a fixed wall-clock budget, beside an lmforge recipe.

What a transformers user would write (the `run_mlm.py` example's recipe): a WordPiece tokenizer trained
with `tokenizers`, documents tokenized as `[CLS] doc [SEP]`, concatenated and cut into blocks of the
recipe's length (run_mlm's `group_texts`), `BertForMaskedLM` with `BertConfig`'s defaults and the
recipe's dimensions, `DataCollatorForLanguageModeling` (15% of tokens, 80/10/10), AdamW with linear
warm-up and linear decay. The data and shape come from an lmforge recipe, so both sides see the same
documents: lmforge's own corpus reader and document split (`is_validation`), the same vocabulary
size, layers, heads, width, feed-forward width and sequence length.

The clock counts training only: it is paused while evaluating (lmforge's throughput windows, which
`plot_encoder_curves.py` sums, exclude evaluation too). The learning-rate schedule runs on that clock,
since the number of steps a budget allows is not known in advance. Every `--eval-every-s` seconds, and
at the end, the model is scored on the same masked held-out blocks (masks drawn once, from
`--eval-seed`): accuracy and cross-entropy over the positions chosen for prediction (labels != -100).

    python bench/bert_peer_mlm.py                                  # bert-tiny's shape, 20 minutes
    python bench/bert_peer_mlm.py --config bert-tiny --minutes 1 --out runs/peer-smoke.jsonl \\
        --set 'data.corpus=[/work/shared/data/english-nltk/corpus.jsonl]'

Writes one JSON line per evaluation (`elapsed_s`, `step`, `val_masked_acc`, `val_loss`, plus `wall_s`,
`tokens`, `lr`); the last line printed is `peer: ... val_masked_acc X.XXXX ...`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lmforge.config import Config, DataConfig, load_config  # noqa: E402
from lmforge.data.corpus import iter_documents  # noqa: E402
from lmforge.data.encode import is_validation  # noqa: E402
from lmforge.errors import LmforgeError  # noqa: E402

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
IGNORE = -100  # transformers' label for positions without a loss


@dataclass
class PeerSettings:
    """The peer's training recipe (the transformers side; the shape and data come from the lmforge recipe)."""
    minutes: float = 20.0
    batch_size: int = 32
    lr: float = 1e-3
    warmup_fraction: float = 0.06  # of the budget
    weight_decay: float = 0.01
    dropout: float = 0.1  # BertConfig's default (hidden and attention)
    grad_clip: float = 1.0  # Trainer's max_grad_norm
    mlm_probability: float = 0.15
    eval_every_s: float = 60.0
    eval_sequences: int = 640
    seed: int = 0
    eval_seed: int = 1234


def split_documents(data: DataConfig) -> tuple[list[str], list[str]]:
    """The recipe's training and held-out documents, read and split by lmforge's own functions."""
    if data.split.by != "document":
        raise LmforgeError(f"data.split.by must be 'document' for the peer (got {data.split.by!r}): "
                           f"only a document split can be reproduced outside lmforge's token store")
    if data.curate.enabled:
        raise LmforgeError("data.curate must be off for the peer: it reads the raw corpus, as lmforge does without curation")
    train, val = [], []
    for doc in iter_documents(data.corpus, data.format, data.text_field, data.txt_documents, data.encoding_errors):
        (val if is_validation(doc.text, data.split.val_fraction) else train).append(doc.text)
    if not train or not val:
        raise LmforgeError(f"data.corpus: {len(train)} training and {len(val)} held-out documents; the peer needs both "
                           f"(more documents or another data.split.val_fraction)")
    return train, val


def train_wordpiece(texts: list[str], vocab_size: int, lowercase: bool):
    """BERT's WordPiece as the `tokenizers` library builds it (BertWordPieceTokenizer's pieces)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tokenizer


def group_texts(tokenizer, texts: list[str], length: int) -> tuple[np.ndarray, np.ndarray]:
    """run_mlm's `group_texts`: each text as [CLS] text [SEP], all concatenated and cut into blocks of
    `length` (the remainder dropped). Returns (ids, special_tokens_mask), each (blocks, length)."""
    ids, special = [], []
    for encoding in tokenizer.encode_batch(texts):
        ids.extend(encoding.ids)
        special.extend(encoding.special_tokens_mask)
    blocks = len(ids) // length
    if blocks == 0:
        raise LmforgeError(f"{len(ids)} tokens make no block of model.block_size={length}; more text or a smaller block")
    shape = (blocks, length)
    return (np.asarray(ids[:blocks * length], dtype=np.int64).reshape(shape),
            np.asarray(special[:blocks * length], dtype=np.int64).reshape(shape))


def collator_for(tokenizer, mlm_probability: float, seed: int):
    """transformers' MLM collator over our tokenizer (80% [MASK], 10% random, 10% unchanged), seeded."""
    from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast

    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                      cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    return DataCollatorForLanguageModeling(wrapped, mlm=True, mlm_probability=mlm_probability, seed=seed,
                                           return_tensors="pt")


def collate(collator, ids: np.ndarray, special: np.ndarray) -> dict[str, torch.Tensor]:
    """One masked batch from blocks: input_ids, attention_mask (no padding: all ones), labels."""
    batch = collator([{"input_ids": i.tolist(), "special_tokens_mask": s.tolist()} for i, s in zip(ids, special)])
    return {"input_ids": batch["input_ids"], "attention_mask": torch.ones_like(batch["input_ids"]),
            "labels": batch["labels"]}


def build_bert(config: Config, vocab_size: int, dropout: float):
    """BertForMaskedLM of the recipe's shape; every other setting is BertConfig's default."""
    from transformers import BertConfig, BertForMaskedLM

    m = config.model
    return BertForMaskedLM(BertConfig(
        vocab_size=vocab_size, hidden_size=m.d_model, num_hidden_layers=m.n_layer, num_attention_heads=m.n_head,
        intermediate_size=m.mlp_ratio * m.d_model, max_position_embeddings=m.block_size,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout))


@torch.no_grad()
def evaluate(model, batches: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) over every position with a label (labels != -100), pooled over batches."""
    was_training = model.training
    model.eval()
    correct, nll, count = 0, 0.0, 0
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        keep = batch["labels"] != IGNORE
        scored, targets = logits[keep].float(), batch["labels"][keep]
        correct += int((scored.argmax(-1) == targets).sum())
        nll += float(F.cross_entropy(scored, targets, reduction="sum"))
        count += int(keep.sum())
    model.train(was_training)
    return correct / max(count, 1), nll / max(count, 1)


def learning_rate(elapsed: float, budget: float, peak: float, warmup_fraction: float) -> float:
    """Linear warm-up over the first `warmup_fraction` of the budget, then linear decay to 0 at its end
    (transformers' get_linear_schedule_with_warmup, with seconds in place of steps)."""
    warmup = warmup_fraction * budget
    if elapsed < warmup:
        return peak * elapsed / warmup
    return peak * max(0.0, (budget - elapsed) / max(budget - warmup, 1e-9))


def decay_groups(model, weight_decay: float) -> list[dict]:
    """Trainer's parameter groups: weight decay on everything but biases and LayerNorm weights."""
    from transformers.trainer_pt_utils import get_parameter_names

    decayed = set(get_parameter_names(model, [torch.nn.LayerNorm], ["bias", "layernorm", "rmsnorm"]))
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if n in decayed], "weight_decay": weight_decay},
            {"params": [p for n, p in named if n not in decayed], "weight_decay": 0.0}]


def run(config: Config, settings: PeerSettings, out: Path) -> dict:
    """Train for `settings.minutes` of training time, evaluating as it goes; returns the last curve row."""
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    length = config.model.block_size
    train_docs, val_docs = split_documents(config.data)
    tokenizer = train_wordpiece(train_docs, config.data.tokenizer.vocab_size, config.data.tokenizer.lowercase)
    train_ids, train_special = group_texts(tokenizer, train_docs, length)
    val_ids, val_special = group_texts(tokenizer, val_docs, length)
    val_ids, val_special = val_ids[:settings.eval_sequences], val_special[:settings.eval_sequences]
    eval_collator = collator_for(tokenizer, settings.mlm_probability, settings.eval_seed)
    eval_batches = [collate(eval_collator, val_ids[i:i + settings.batch_size], val_special[i:i + settings.batch_size])
                    for i in range(0, len(val_ids), settings.batch_size)]
    collator = collator_for(tokenizer, settings.mlm_probability, settings.seed)
    model = build_bert(config, tokenizer.get_vocab_size(), settings.dropout)
    optimizer = torch.optim.AdamW(decay_groups(model, settings.weight_decay), lr=0.0)  # betas, eps: torch's = Trainer's
    print(f"peer: {len(train_docs):,} training / {len(val_docs):,} held-out documents; {len(train_ids):,} training "
        f"blocks of {length}; {len(val_ids):,} held-out blocks scored; vocab {tokenizer.get_vocab_size():,}; "
        f"BertForMaskedLM {config.model.n_layer}x{config.model.d_model} ({config.model.n_head} heads, ffn "
        f"{config.model.mlp_ratio * config.model.d_model}); batch {settings.batch_size}, lr {settings.lr:g}, "
        f"{settings.minutes:g} min", file=sys.stderr)

    budget = settings.minutes * 60.0
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    elapsed, step, tokens, next_eval, lr = 0.0, 0, 0, 0.0, 0.0
    order, cursor = rng.permutation(len(train_ids)), 0
    model.train()
    with open(out, "w", encoding="utf-8") as fh:
        while True:
            if elapsed >= next_eval or elapsed >= budget:
                acc, loss = evaluate(model, eval_batches)
                row = {"elapsed_s": round(elapsed, 3), "step": step, "val_masked_acc": acc, "val_loss": loss,
                       "wall_s": round(time.perf_counter() - started, 3), "tokens": tokens, "lr": lr}
                fh.write(json.dumps(row) + "\n")
                fh.flush()
                print(f"peer: {elapsed / 60:5.2f} min, step {step:,}: val masked acc {acc:.2%}, loss {loss:.4f}",
                    file=sys.stderr)
                next_eval += settings.eval_every_s
                if elapsed >= budget:
                    return row
            step_start = time.perf_counter()
            if cursor + settings.batch_size > len(order):  # a new epoch, freshly shuffled
                order, cursor = rng.permutation(len(train_ids)), 0
            rows = order[cursor:cursor + settings.batch_size]
            cursor += settings.batch_size
            batch = collate(collator, train_ids[rows], train_special[rows])
            lr = learning_rate(elapsed, budget, settings.lr, settings.warmup_fraction)
            for group in optimizer.param_groups:
                group["lr"] = lr
            model(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += batch["input_ids"].numel()
            elapsed += time.perf_counter() - step_start


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, PeerSettings]:
    d = PeerSettings()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="bert-tiny", help="lmforge recipe (name or YAML) giving data and shape")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, as `lmforge --set` (e.g. data.corpus=[...])")
    p.add_argument("--minutes", type=float, default=d.minutes, help="training wall-clock budget")
    p.add_argument("--batch-size", type=int, default=0, help="sequences per step (0 = the recipe's train.batch_size)")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument("--warmup-fraction", type=float, default=d.warmup_fraction)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--dropout", type=float, default=d.dropout)
    p.add_argument("--eval-every-s", type=float, default=d.eval_every_s, help="training seconds between evaluations")
    p.add_argument("--eval-sequences", type=int, default=0,
                   help="held-out blocks scored (0 = the recipe's train.eval_batches x train.batch_size)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--eval-seed", type=int, default=d.eval_seed, help="seed of the held-out masks (fixed per run)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--out", default="runs/bert-peer.jsonl", help="the JSONL curve")
    args = p.parse_args(argv)
    settings = PeerSettings(minutes=args.minutes, batch_size=args.batch_size, lr=args.lr,
                            warmup_fraction=args.warmup_fraction, weight_decay=args.weight_decay,
                            dropout=args.dropout, eval_every_s=args.eval_every_s,
                            eval_sequences=args.eval_sequences, seed=args.seed, eval_seed=args.eval_seed)
    return args, settings


def main(argv: list[str] | None = None) -> int:
    args, settings = parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        if config.model.family != "bert":
            raise LmforgeError(f"model.family must be 'bert' for the encoder peer, got {config.model.family!r}")
        if settings.minutes <= 0 or settings.eval_every_s <= 0 or not 0 <= settings.warmup_fraction < 1:
            raise LmforgeError("--minutes and --eval-every-s must be > 0 and --warmup-fraction in [0, 1)")
        settings.batch_size = settings.batch_size or config.train.batch_size
        settings.eval_sequences = settings.eval_sequences or config.train.eval_batches * config.train.batch_size
        if args.threads:
            torch.set_num_threads(args.threads)
        row = run(config, settings, Path(args.out))
    except LmforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"peer: {row['elapsed_s'] / 60:.2f} min of training, {row['step']:,} steps, {row['tokens']:,} tokens: "
          f"val_masked_acc {row['val_masked_acc']:.4f}, val_loss {row['val_loss']:.4f} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
