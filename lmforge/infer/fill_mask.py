"""Fill in [MASK] tokens with a masked-LM: the top-k candidates for each mask, with probabilities."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Tokenizer
from torch import nn

from lmforge.data.tokenizer import MASK, special_id
from lmforge.errors import LmforgeError


@dataclass
class Candidate:
    token: str
    token_id: int
    probability: float
    sequence: str  # the text with this candidate in place of the mask


@torch.no_grad()
def fill_mask(model: nn.Module, tokenizer: Tokenizer, text: str, top_k: int = 5,
              device: torch.device | str = "cpu") -> list[list[Candidate]]:
    """For each [MASK] in `text` (in order), the top_k most probable tokens at that position."""
    mask_id = special_id(tokenizer, MASK, "fill-mask needs (is this a bert run?)")
    if top_k < 1:
        raise LmforgeError(f"--top-k must be >= 1, got {top_k}")
    encoding = tokenizer.encode(text)  # the tokenizer's template adds [CLS] ... [SEP]
    ids = encoding.ids
    positions = [i for i, t in enumerate(ids) if t == mask_id]
    if not positions:
        raise LmforgeError(f"no {MASK} in the text: write it where a token should be predicted, "
                           f"e.g. \"The capital of France is {MASK}.\"")
    block = model.config.block_size
    if len(ids) > block:
        raise LmforgeError(f"the text is {len(ids)} tokens long with [CLS]/[SEP]; this model reads at most {block}")
    was_training = model.training
    model.eval()
    input_ids = torch.tensor([ids], device=device)
    out = model(input_ids, torch.tensor([encoding.type_ids], device=device))
    model.train(was_training)
    probs = out.mlm_logits[0, positions].float().softmax(-1)
    top = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    results = []
    for slot, (p_row, id_row) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
        candidates = []
        for p, token_id in zip(p_row, id_row):
            filled = list(ids)
            filled[positions[slot]] = token_id
            candidates.append(Candidate(tokenizer.id_to_token(token_id), token_id, p,
                                        tokenizer.decode(filled, skip_special_tokens=False)
                                        .replace("[CLS]", "").replace("[SEP]", "").strip()))
        results.append(candidates)
    return results


def describe(results: list[list[Candidate]]) -> str:
    lines = []
    for slot, candidates in enumerate(results):
        if len(results) > 1:
            lines.append(f"[MASK] #{slot + 1}:")
        for c in candidates:
            lines.append(f"  {c.probability:7.2%}  {c.token:<15} {c.sequence}")
    return "\n".join(lines)
