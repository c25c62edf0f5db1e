"""Beam search bookkeeping shared by decoder-only (GPT) and encoder-decoder (T5) decoding.

The model side is a step decoder (logits for the next token of every hypothesis, and a way to make
hypothesis rows continue from other rows: the KV cache follows its beam). Everything else is here.

Beam search keeps `num_beams` running hypotheses and the `num_beams` best finished ones per input row,
in the way transformers' beam search does (so that exported models decode identically): each step
takes the 2 x num_beams best continuations of the running hypotheses by sum(log p); those ending in
the end token (or reaching max_new_tokens) among the top num_beams join the finished set, scored
sum(log p) / generated_length ** length_penalty, where generated_length counts the tokens after the
prompt (T5's prompt is the decoder start token); the rest continue. It stops when every finished slot
is filled and early_stopping is true, when no running hypothesis can beat the worst finished one
(early_stopping false: judged at the current length), or at max_new_tokens.
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch

NEG = -1.0e9  # the score of an empty slot / a forbidden candidate (large, finite: sums stay ordered)


class StepDecoder(Protocol):
    """What beam search needs of a model: next-token logits, and beams reordered between steps."""

    def next_logits(self, sequences: torch.Tensor) -> torch.Tensor:
        """(rows, vocab) float32 logits for the token after each row of `sequences` (rows, length)."""

    def reorder_beams(self, rows: torch.Tensor) -> None:
        """Make row i continue from row rows[i], a beam of the same input."""


def _gather(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values (batch, n, ...) picked along dim 1 by index (batch, k)."""
    index = index.view(*index.shape, *([1] * (values.dim() - 2))).expand(*index.shape, *values.shape[2:])
    return values.gather(1, index)


@torch.no_grad()
def search_beams(decoder: StepDecoder, prompt: torch.Tensor, max_new_tokens: int, num_beams: int,
                 length_penalty: float, early_stopping: bool, eos_id: Optional[int], pad_id: int) -> torch.Tensor:
    """The best finished hypothesis per prompt row, (batch, prompt length + longest generated length).

    prompt: (batch, length) tokens every hypothesis starts with; the decoder's rows are b * num_beams + k
    (beam k of input row b). Rows shorter than the longest are padded with pad_id after their end token;
    eos_id None: hypotheses end only at max_new_tokens."""
    batch, prompt_length = prompt.shape
    device = prompt.device
    max_length = prompt_length + max_new_tokens
    keep = 2 * num_beams
    running = torch.full((batch, num_beams, max_length), pad_id, dtype=torch.long, device=device)
    running[:, :, :prompt_length] = prompt[:, None, :]
    running_scores = torch.zeros(batch, num_beams, device=device)
    running_scores[:, 1:] = NEG  # all beams start identical: only the first may expand at step one
    done = running.clone()
    done_scores = torch.full((batch, num_beams), NEG, device=device)
    done_lengths = torch.zeros(batch, num_beams, dtype=torch.long, device=device)
    done_filled = torch.zeros(batch, num_beams, dtype=torch.bool, device=device)
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)
    in_top = torch.arange(keep, device=device) < num_beams
    row_offset = torch.arange(batch, device=device)[:, None] * num_beams
    length = prompt_length
    while True:
        logits = decoder.next_logits(running[:, :, :length].reshape(batch * num_beams, length))
        log_probs = torch.log_softmax(logits, dim=-1).view(batch, num_beams, -1) + running_scores[..., None]
        vocab = log_probs.shape[-1]
        scores, flat = torch.topk(log_probs.view(batch, -1), k=keep)
        source_beam, token = flat // vocab, flat % vocab
        candidates = _gather(running, source_beam)
        candidates[:, :, length] = token
        ends = torch.full_like(token, length + 1 >= max_length, dtype=torch.bool)
        if eos_id is not None:
            ends |= token == eos_id
        generated = length + 1 - prompt_length

        # the best num_beams candidates that did not end keep running
        open_scores = scores + ends.float() * NEG
        chosen = torch.topk(open_scores, k=num_beams).indices
        running, running_scores = _gather(candidates, chosen), _gather(open_scores, chosen)
        decoder.reorder_beams((_gather(source_beam, chosen) + row_offset).view(-1))

        # ended candidates among the top num_beams join the finished set if they beat its worst
        final = scores / (generated ** length_penalty)
        final = final + (done_filled.all(-1, keepdim=True) & early_stopping).float() * NEG
        final = final + (~improvable).float() * NEG
        final = final + (~(ends & in_top)).float() * NEG
        merged = torch.topk(torch.cat([done_scores, final], dim=1), k=num_beams).indices
        done = _gather(torch.cat([done, candidates], dim=1), merged)
        done_scores = _gather(torch.cat([done_scores, final], dim=1), merged)
        done_lengths = _gather(torch.cat([done_lengths, torch.full_like(token, generated)], dim=1), merged)
        done_filled = _gather(torch.cat([done_filled, ends & in_top], dim=1), merged)

        length += 1
        best_running = running_scores[:, :1] / (generated ** length_penalty)
        worst_done = torch.where(done_filled, done_scores.min(dim=1, keepdim=True).values, NEG)
        improvable = improvable & (best_running > worst_done).any(dim=-1, keepdim=True)
        if (not bool(improvable.any()) or (early_stopping and bool(done_filled.all()))
                or bool(ends.all())):
            break
    return done[:, 0, : prompt_length + int(done_lengths[:, 0].max())]
