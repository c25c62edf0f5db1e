"""Encoder-decoder decoding: greedy, sampling (temperature / top-k / top-p) and beam search.

The encoder runs once; the cross-attention keys/values of its output are computed once (the
model's DecoderCache); with use_cache each step feeds the decoder only the newest token and extends
the self-attention KV cache (without it, each step reruns the decoder over the whole prefix, which
gives the same tokens and exists to check that). Outputs are (batch, length) decoder sequences
starting with the start token (<pad>), as transformers' generate returns them; a sequence that has
ended with </s> is padded with <pad>. `fill_spans` puts the spans a model wrote for sentinels back
into its input (span filling: "The <extra_id_0> sat on the mat.").

Beam search keeps `num_beams` running hypotheses and the `num_beams` best finished ones, in the way
transformers' beam search does (so that exports decode identically): each step takes the 2 x
num_beams best continuations; those ending in </s> among the top num_beams join the finished set,
scored sum(log p) / generated_length ** length_penalty; the rest continue. It stops when every
finished slot is filled and early_stopping is true, when no running hypothesis can beat the worst
finished one (early_stopping false: judged at the current length), or at max_new_tokens.
"""

from __future__ import annotations

from typing import Optional

import torch

from lmforge.data.objectives.span import SpanVocab
from lmforge.errors import LmforgeError
from lmforge.infer.generate import filter_logits
from lmforge.model.t5 import PAD_ID, T5

EOS_ID = 1
NEG = -1.0e9  # the score of an empty slot / a forbidden candidate (large, finite: sums stay ordered)


class Decoder:
    """Step-by-step decoder over one encoded batch, with or without the self-attention KV cache."""

    def __init__(self, model: T5, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                 use_cache: bool, repeat: int = 1):
        encoder_out = model.encode(input_ids, attention_mask)
        if repeat > 1:  # beams: each input row repeated for its beams, rows b*repeat ... b*repeat+repeat-1
            encoder_out = encoder_out.repeat_interleave(repeat, dim=0)
            attention_mask = None if attention_mask is None else attention_mask.repeat_interleave(repeat, dim=0)
        self.model, self.use_cache = model, use_cache
        self.base = model.start_cache(encoder_out, attention_mask)
        self.cache = self.base

    def next_logits(self, sequences: torch.Tensor) -> torch.Tensor:
        """(rows, vocab) float32 logits for the token after `sequences` (rows, length)."""
        if self.use_cache:
            logits, self.cache = self.model.decode(sequences[:, self.cache.length:], self.cache)
        else:
            logits, _ = self.model.decode(sequences, self.base)
        return logits[:, -1].float()

    def reorder_beams(self, rows: torch.Tensor) -> None:
        """Make row i continue from row rows[i], a beam of the same input."""
        if self.use_cache:
            self.cache = self.cache.select(rows, same_inputs=True)


def _check(max_new_tokens: int, num_beams: int, temperature: float) -> None:
    if max_new_tokens < 1:
        raise LmforgeError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if num_beams < 1:
        raise LmforgeError(f"num_beams must be >= 1, got {num_beams}")
    if temperature < 0:
        raise LmforgeError(f"temperature must be >= 0 (0 = greedy), got {temperature}")


@torch.no_grad()
def generate_seq2seq(model: T5, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                     max_new_tokens: int = 32, temperature: float = 0.0, top_k: Optional[int] = None,
                     top_p: Optional[float] = None, generator: Optional[torch.Generator] = None,
                     num_beams: int = 1, length_penalty: float = 1.0, early_stopping: bool = False,
                     eos_id: int = EOS_ID, use_cache: bool = True) -> torch.Tensor:
    """Decode up to max_new_tokens per input row: beam search when num_beams > 1, else greedy
    (temperature 0) or sampling."""
    _check(max_new_tokens, num_beams, temperature)
    was_training = model.training
    model.eval()
    try:
        if num_beams > 1:
            return beam_search(model, input_ids, attention_mask, max_new_tokens, num_beams, length_penalty,
                               early_stopping, eos_id, use_cache)
        return sample(model, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p, generator,
                      eos_id, use_cache)
    finally:
        model.train(was_training)


@torch.no_grad()
def sample(model: T5, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], max_new_tokens: int,
           temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
           generator: Optional[torch.Generator] = None, eos_id: int = EOS_ID, use_cache: bool = True) -> torch.Tensor:
    """Greedy (temperature 0) or sampled decoding, one token per row per step, until every row has </s>."""
    decoder = Decoder(model, input_ids, attention_mask, use_cache)
    sequences = torch.full((input_ids.shape[0], 1), PAD_ID, dtype=torch.long, device=input_ids.device)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        logits = decoder.next_logits(sequences)
        if temperature == 0:
            token = logits.argmax(dim=-1)
        else:
            probs = torch.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        token = token.masked_fill(finished, PAD_ID)
        sequences = torch.cat([sequences, token[:, None]], dim=1)
        finished |= token == eos_id
        if bool(finished.all()):
            break
    return sequences


def _gather(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values (batch, n, ...) picked along dim 1 by index (batch, k)."""
    index = index.view(*index.shape, *([1] * (values.dim() - 2))).expand(*index.shape, *values.shape[2:])
    return values.gather(1, index)


@torch.no_grad()
def beam_search(model: T5, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], max_new_tokens: int,
                num_beams: int = 4, length_penalty: float = 1.0, early_stopping: bool = False,
                eos_id: int = EOS_ID, use_cache: bool = True) -> torch.Tensor:
    """The best finished hypothesis per input row (see the module docstring for the rules)."""
    batch, device = input_ids.shape[0], input_ids.device
    max_length = 1 + max_new_tokens
    decoder = Decoder(model, input_ids, attention_mask, use_cache, repeat=num_beams)
    keep = 2 * num_beams
    running = torch.full((batch, num_beams, max_length), PAD_ID, dtype=torch.long, device=device)
    running_scores = torch.zeros(batch, num_beams, device=device)
    running_scores[:, 1:] = NEG  # all beams start identical: only the first may expand at step one
    done = running.clone()
    done_scores = torch.full((batch, num_beams), NEG, device=device)
    done_lengths = torch.zeros(batch, num_beams, dtype=torch.long, device=device)
    done_filled = torch.zeros(batch, num_beams, dtype=torch.bool, device=device)
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)
    in_top = torch.arange(keep, device=device) < num_beams
    row_offset = torch.arange(batch, device=device)[:, None] * num_beams
    length = 1
    while True:
        logits = decoder.next_logits(running[:, :, :length].reshape(batch * num_beams, length))
        log_probs = torch.log_softmax(logits, dim=-1).view(batch, num_beams, -1) + running_scores[..., None]
        vocab = log_probs.shape[-1]
        scores, flat = torch.topk(log_probs.view(batch, -1), k=keep)
        source_beam, token = flat // vocab, flat % vocab
        candidates = _gather(running, source_beam)
        candidates[:, :, length] = token
        ends = (token == eos_id) | (length + 1 >= max_length)

        # the best num_beams candidates that did not end keep running
        open_scores = scores + ends.float() * NEG
        chosen = torch.topk(open_scores, k=num_beams).indices
        running, running_scores = _gather(candidates, chosen), _gather(open_scores, chosen)
        decoder.reorder_beams((_gather(source_beam, chosen) + row_offset).view(-1))

        # ended candidates among the top num_beams join the finished set if they beat its worst
        final = scores / (length ** length_penalty)
        final = final + (done_filled.all(-1, keepdim=True) & early_stopping).float() * NEG
        final = final + (~improvable).float() * NEG
        final = final + (~(ends & in_top)).float() * NEG
        merged = torch.topk(torch.cat([done_scores, final], dim=1), k=num_beams).indices
        done = _gather(torch.cat([done, candidates], dim=1), merged)
        done_scores = _gather(torch.cat([done_scores, final], dim=1), merged)
        done_lengths = _gather(torch.cat([done_lengths, torch.full_like(token, length)], dim=1), merged)
        done_filled = _gather(torch.cat([done_filled, ends & in_top], dim=1), merged)

        length += 1
        best_running = running_scores[:, :1] / ((length - 1) ** length_penalty)
        worst_done = torch.where(done_filled, done_scores.min(dim=1, keepdim=True).values, NEG)
        improvable = improvable & (best_running > worst_done).any(dim=-1, keepdim=True)
        if (not bool(improvable.any()) or (early_stopping and bool(done_filled.all()))
                or bool(ends.all())):
            break
    return done[:, 0, : 1 + int(done_lengths[:, 0].max())]


def fill_spans(input_ids: list[int], output_ids: list[int], vocab: SpanVocab) -> list[int]:
    """The input with each sentinel replaced by the span written after the same sentinel in the output
    (empty if the output has none); the output's start <pad> and anything from </s> on are ignored."""
    spans: dict[int, list[int]] = {}
    current = None
    for token in output_ids:
        if token == vocab.eos:
            break
        if vocab.is_sentinel(token):
            current = spans.setdefault(token, [])
        elif current is not None:
            current.append(token)
    filled = []
    for token in input_ids:
        if token == vocab.eos:
            break
        filled.extend(spans.get(token, []) if vocab.is_sentinel(token) else [token])
    return filled
