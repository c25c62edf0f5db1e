"""Weight layouts shared with Hugging Face `transformers`: our names and shapes <-> theirs.

BERT: BertForPreTraining. Our attention keeps Q, K and V in one fused matrix (one matmul); theirs
are three, so export splits and import concatenates. Everything else maps one to one.
"""

from __future__ import annotations

from typing import Any

import torch

from lmforge.errors import LmforgeError
from lmforge.model.config import ModelConfig

_BERT_LAYER = {  # ours (under bert.blocks.{i}.) -> transformers (under bert.encoder.layer.{i}.)
    "attn.proj": "attention.output.dense",
    "ln_1": "attention.output.LayerNorm",
    "mlp.fc": "intermediate.dense",
    "mlp.proj": "output.dense",
    "ln_2": "output.LayerNorm",
}
_BERT_TOP = {
    "bert.wte.weight": "bert.embeddings.word_embeddings.weight",
    "bert.wpe.weight": "bert.embeddings.position_embeddings.weight",
    "bert.wtt.weight": "bert.embeddings.token_type_embeddings.weight",
    "bert.ln_emb.weight": "bert.embeddings.LayerNorm.weight",
    "bert.ln_emb.bias": "bert.embeddings.LayerNorm.bias",
    "bert.pooler.dense.weight": "bert.pooler.dense.weight",
    "bert.pooler.dense.bias": "bert.pooler.dense.bias",
    "mlm.dense.weight": "cls.predictions.transform.dense.weight",
    "mlm.dense.bias": "cls.predictions.transform.dense.bias",
    "mlm.ln.weight": "cls.predictions.transform.LayerNorm.weight",
    "mlm.ln.bias": "cls.predictions.transform.LayerNorm.bias",
    "mlm.bias": "cls.predictions.bias",
    "nsp.out.weight": "cls.seq_relationship.weight",
    "nsp.out.bias": "cls.seq_relationship.bias",
}


def bert_hf_config(config: ModelConfig) -> dict[str, Any]:
    """transformers BertConfig fields for our bert ModelConfig."""
    if config.family != "bert":
        raise LmforgeError(f"not a bert model (model.family={config.family})")
    if config.pre_norm:
        raise LmforgeError("a pre-LayerNorm BERT (model.norm=pre) has no transformers BERT equivalent; "
                           "only post-LN (the original layout) exports")
    if not config.bias:
        raise LmforgeError("transformers' BERT has biases everywhere; a model.bias=false BERT cannot be exported")
    return {
        "model_type": "bert", "architectures": ["BertForPreTraining"],
        "vocab_size": config.vocab_size, "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
        "intermediate_size": config.mlp_ratio * config.d_model,
        "hidden_act": "gelu_new" if config.gelu_approximate == "tanh" else "gelu",
        "hidden_dropout_prob": config.dropout, "attention_probs_dropout_prob": config.dropout,
        "max_position_embeddings": config.block_size, "type_vocab_size": config.type_vocab_size,
        "layer_norm_eps": config.layer_norm_eps, "pad_token_id": 0, "tie_word_embeddings": True,
    }


def bert_state_to_hf(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our BertForPreTraining state dict -> transformers BertForPreTraining's (decoder tied, included)."""
    bert_hf_config(config)  # refuses layouts that do not map
    out = {theirs: state[ours] for ours, theirs in _BERT_TOP.items()}
    out["cls.predictions.decoder.weight"] = state["bert.wte.weight"]
    out["cls.predictions.decoder.bias"] = state["mlm.bias"]
    for i in range(config.n_layer):
        ours, theirs = f"bert.blocks.{i}.", f"bert.encoder.layer.{i}."
        for kind in ("weight", "bias"):
            q, k, v = state[f"{ours}attn.qkv.{kind}"].chunk(3, dim=0)
            out[f"{theirs}attention.self.query.{kind}"] = q
            out[f"{theirs}attention.self.key.{kind}"] = k
            out[f"{theirs}attention.self.value.{kind}"] = v
            for our_name, their_name in _BERT_LAYER.items():
                out[f"{theirs}{their_name}.{kind}"] = state[f"{ours}{our_name}.{kind}"]
    return {k: v.contiguous() for k, v in out.items()}


def bert_state_from_hf(state: dict[str, torch.Tensor], n_layer: int) -> dict[str, torch.Tensor]:
    """transformers BERT state dict (BertForPreTraining, or a bare BertModel without heads) -> ours.

    Missing heads are left out; the caller initialises them (e.g. a checkpoint without an NSP head)."""
    if not any(k.startswith("bert.") for k in state):
        state = {f"bert.{k}": v for k, v in state.items()}  # a bare BertModel's names have no prefix
    out = {ours: state[theirs] for ours, theirs in _BERT_TOP.items() if theirs in state}
    for i in range(n_layer):
        ours, theirs = f"bert.blocks.{i}.", f"bert.encoder.layer.{i}."
        for kind in ("weight", "bias"):
            parts = [state[f"{theirs}attention.self.{n}.{kind}"] for n in ("query", "key", "value")]
            out[f"{ours}attn.qkv.{kind}"] = torch.cat(parts, dim=0)
            for our_name, their_name in _BERT_LAYER.items():
                out[f"{ours}{our_name}.{kind}"] = state[f"{theirs}{their_name}.{kind}"]
    return out
