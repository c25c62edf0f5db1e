"""Score a run on any text (held-out files, other corpora): `lmforge evaluate RUN --text FILE...`.

Decoders: the documents, each followed by the end-of-text token as in a store, form one token stream,
cut into consecutive windows of block_size + 1 tokens (a window's last token starts the next); every
token after the first is predicted once, from at most block_size tokens before it in its window.
Reported: loss (nats per predicted token), perplexity, and bits per byte (all predicted tokens' nats /
ln 2 / the UTF-8 bytes of the documents), which compares models whose tokenizers differ.
Encoders: windows of block_size - 2 tokens read as `[CLS] window [SEP]`, masked with the run's
masking settings from a fixed seed; reported: masked-token accuracy and loss, and bits per byte of
the masked tokens' loss over their bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from lmforge.data.corpus import CorpusStats, iter_documents
from lmforge.data.tokenizer import eos_id, warn_unknown
from lmforge.errors import LmforgeError
from lmforge.model import IGNORE_INDEX


@dataclass
class TextScore:
    documents: int
    bytes: int
    tokens: int  # predicted (decoder) or masked (encoder) tokens
    loss: float  # nats per scored token
    bits_per_byte: float
    accuracy: float | None = None  # encoders: masked-token accuracy
    unknown_characters: int = 0

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50.0))


def read_texts(paths: Sequence[str], text_field: str = "text") -> list[str]:
    """The documents of the given files (txt: each file one document; jsonl/parquet: one per record)."""
    stats = CorpusStats()
    try:
        texts = [doc.text for doc in iter_documents(list(paths), text_field=text_field, stats=stats)]
    except LmforgeError as exc:
        raise LmforgeError(f"--text: {exc}") from None
    if not texts:
        why = "; ".join(stats.skipped_files) or "the files are empty"
        raise LmforgeError(f"--text: no text to score in {', '.join(paths)} ({why})")
    return texts


@torch.no_grad()
def score_text(model: torch.nn.Module, tokenizer: Any, config: Any, texts: Sequence[str],
               device: torch.device, batch_size: int = 32, progress: bool = False) -> TextScore:
    """Score `texts` with a decoder (gpt) or encoder (bert) run's model; see the module docstring."""
    encodings = tokenizer.encode_batch(list(texts), add_special_tokens=False)
    unknown = warn_unknown(tokenizer, list(texts), encodings, "the text")
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    model.eval()
    if config.model.family == "gpt":
        return _score_decoder(model, tokenizer, config, encodings, n_bytes, len(texts), unknown, device,
                              batch_size, progress)
    if config.model.family == "bert":
        return _score_encoder(model, tokenizer, config, encodings, texts, n_bytes, unknown, device, batch_size,
                              progress)
    raise LmforgeError(f"evaluate --text scores gpt and bert runs; this is a {config.model.family} run")


def decoder_windows(stream: np.ndarray, block_size: int) -> list[np.ndarray]:
    """Consecutive windows of block_size + 1 tokens sharing their edge token (the last may be shorter)."""
    return [stream[start:start + block_size + 1] for start in range(0, max(1, len(stream) - 1), block_size)
            if len(stream[start:start + block_size + 1]) > 1]


def _score_decoder(model, tokenizer, config, encodings, n_bytes, n_docs, unknown, device, batch_size,
                   progress) -> TextScore:
    eos = eos_id(tokenizer)
    stream = np.fromiter((i for enc in encodings for i in (*enc.ids, eos)), dtype=np.int64)
    windows = decoder_windows(stream, config.model.block_size)
    nats, count = 0.0, 0
    for start in tqdm(range(0, len(windows), batch_size), desc="scoring", unit="batch", disable=not progress,
                      leave=False):
        chunk = windows[start:start + batch_size]
        width = max(len(w) for w in chunk)
        ids = torch.zeros(len(chunk), width - 1, dtype=torch.long)
        labels = torch.full((len(chunk), width - 1), IGNORE_INDEX, dtype=torch.long)
        for row, w in enumerate(chunk):
            ids[row, : len(w) - 1] = torch.from_numpy(w[:-1])
            labels[row, : len(w) - 1] = torch.from_numpy(w[1:])
        logits = model(ids.to(device)).logits.float()
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.to(device).flatten(),
                                                ignore_index=IGNORE_INDEX, reduction="sum")
        nats += float(nll)
        count += int((labels != IGNORE_INDEX).sum())
    return TextScore(n_docs, n_bytes, count, nats / max(1, count), nats / math.log(2) / max(1, n_bytes),
                     unknown_characters=unknown)


def _score_encoder(model, tokenizer, config, encodings, texts, n_bytes, unknown, device, batch_size,
                   progress) -> TextScore:
    from lmforge.data.objectives.mlm import BertVocab, MaskingSpec, mask_batch, mask_draws

    vocab = BertVocab.from_tokenizer(tokenizer)
    m = config.mlm
    spec = MaskingSpec(m.mask_rate, m.mask_token_fraction, m.random_token_fraction, m.whole_word)
    width = config.model.block_size - 2
    pieces = []  # (ids, offsets, text) per window, for the bytes of the masked tokens
    for enc, text in zip(encodings, texts):
        for start in range(0, len(enc.ids), width):
            pieces.append((np.asarray(enc.ids[start:start + width], dtype=np.int64), enc.offsets[start:start + width],
                           text))
    rng = np.random.default_rng(0)  # the same masks at every call: scores compare across checkpoints
    nats, count, correct, masked_bytes = 0.0, 0, 0, 0
    for start in tqdm(range(0, len(pieces), batch_size), desc="scoring", unit="batch", disable=not progress,
                      leave=False):
        chunk = pieces[start:start + batch_size]
        seq = max(len(p[0]) for p in chunk) + 2
        ids = np.full((len(chunk), seq), vocab.pad, dtype=np.int64)
        for row, (piece, _, _) in enumerate(chunk):
            ids[row, : len(piece) + 2] = np.concatenate([[vocab.cls], piece, [vocab.sep]])
        types = np.zeros_like(ids)
        draws = np.stack([mask_draws(rng, seq) for _ in chunk])
        masked, labels = mask_batch(ids, types, vocab, spec, draws, vocab.random_pool)
        attention = torch.from_numpy(ids != vocab.pad)
        out = model(input_ids=torch.from_numpy(masked).to(device), token_type_ids=torch.from_numpy(types).to(device),
                    attention_mask=attention.to(device), mlm_labels=torch.from_numpy(labels).to(device))
        n = int(out.mlm_targets.numel())
        if n:
            nats += float(out.mlm_loss) * n
            correct += int((out.mlm_logits.argmax(-1) == out.mlm_targets).sum())
            count += n
        for row, (piece, offsets, text) in enumerate(chunk):
            for pos in np.flatnonzero(labels[row, 1: len(piece) + 1] != IGNORE_INDEX):
                a, b = offsets[pos]
                masked_bytes += len(text[a:b].encode("utf-8"))
    if count == 0:
        raise LmforgeError("--text: too little text to mask a single token; give a longer file")
    return TextScore(len(texts), n_bytes, count, nats / count, nats / math.log(2) / max(1, masked_bytes),
                     accuracy=correct / count, unknown_characters=unknown)
