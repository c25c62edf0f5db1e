"""T5 <-> transformers' T5ForConditionalGeneration: names, config, and the model directory on disk.

Our names map one to one to theirs; transformers keeps the relative position table inside the first
block's self-attention of each stack, and holds the shared embedding three times (shared, and each
stack's embed_tokens, tied), of which the directory stores `shared.weight`. Tied output (T5 1.0) is
`tie_word_embeddings: true`, which transformers also reads as "scale the decoder output by
d_model**-0.5", as our model does; untied (v1.1) stores `lm_head.weight`. Nothing here needs
transformers installed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from lmforge.fileio import building_directory
from lmforge.data.objectives.span import SENTINEL, SpanVocab
from lmforge.errors import LmforgeError
from lmforge.interop.hf_weights import read_hf_weights
from lmforge.interop.hf_tokenizer import read_json
from lmforge.model.config import ModelConfig
from lmforge.model.t5 import T5, t5_sizes

ARCHITECTURE = "T5ForConditionalGeneration"
FFN_NAMES = {"gated-gelu": ("wi_0", "wi_1", "wo"), "relu": ("wi", "wo")}


def t5_layout(config: ModelConfig) -> dict[str, str]:
    """Our state-dict name -> transformers' name, for every tensor of our T5."""
    names = {"embed.weight": "shared.weight",
             "encoder.position_bias.embedding.weight":
                 "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
             "decoder.position_bias.embedding.weight":
                 "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
             "encoder.final_norm.weight": "encoder.final_layer_norm.weight",
             "decoder.final_norm.weight": "decoder.final_layer_norm.weight"}
    ffn = FFN_NAMES[config.ffn]
    stacks = (("encoder", config.n_layer, (("attn", "SelfAttention"),)),
              ("decoder", t5_sizes(config)[2], (("self_attn", "SelfAttention"), ("cross_attn", "EncDecAttention"))))
    for stack, n_layer, attentions in stacks:
        for i in range(n_layer):
            ours, theirs = f"{stack}.blocks.{i}.", f"{stack}.block.{i}.layer."
            for j, (attn, their_attn) in enumerate(attentions):
                names[f"{ours}{attn}_norm.weight"] = f"{theirs}{j}.layer_norm.weight"
                for proj in "qkvo":
                    names[f"{ours}{attn}.{proj}.weight"] = f"{theirs}{j}.{their_attn}.{proj}.weight"
            j = len(attentions)
            names[f"{ours}ffn_norm.weight"] = f"{theirs}{j}.layer_norm.weight"
            for proj in ffn:
                names[f"{ours}ffn.{proj}.weight"] = f"{theirs}{j}.DenseReluDense.{proj}.weight"
    if not config.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    return names


def t5_hf_config(config: ModelConfig, vocab: Optional[SpanVocab] = None) -> dict[str, Any]:
    """config.json for T5ForConditionalGeneration."""
    d_kv, d_ff, n_decoder_layer = t5_sizes(config)
    return {
        "architectures": [ARCHITECTURE], "model_type": "t5", "vocab_size": config.vocab_size,
        "d_model": config.d_model, "d_kv": d_kv, "d_ff": d_ff, "num_layers": config.n_layer,
        "num_decoder_layers": n_decoder_layer, "num_heads": config.n_head,
        "relative_attention_num_buckets": config.relative_attention_num_buckets,
        "relative_attention_max_distance": config.relative_attention_max_distance,
        "n_positions": config.block_size,  # as the hub's T5 configs: the input length it was trained at
        "dropout_rate": config.dropout, "layer_norm_epsilon": config.layer_norm_eps, "initializer_factor": 1.0,
        "feed_forward_proj": config.ffn, "tie_word_embeddings": config.tie_embeddings,
        "is_encoder_decoder": True, "use_cache": True,
        "pad_token_id": vocab.pad if vocab else 0, "eos_token_id": vocab.eos if vocab else 1,
        "decoder_start_token_id": vocab.pad if vocab else 0,
    }


def t5_state_to_hf(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    return {theirs: state[ours] for ours, theirs in t5_layout(config).items()}


def _get(hf: dict[str, Any], key: str, path: str, kind: type = int) -> Any:
    if key not in hf:
        raise LmforgeError(f"{path}: config key {key!r} is missing")
    value = hf[key]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise LmforgeError(f"{path}: config key {key!r} must be an integer, got {value!r}")
    return value


def t5_config_from_hf(hf: dict[str, Any], path: str = "config.json") -> ModelConfig:
    """Our ModelConfig for a transformers T5 config.json; LmforgeError naming the key for what we cannot load."""
    if hf.get("model_type") != "t5":
        raise LmforgeError(f"{path}: model_type is {hf.get('model_type')!r}, not 't5'")
    ffn = hf.get("feed_forward_proj", "relu")
    if ffn not in FFN_NAMES:
        raise LmforgeError(f"{path}: feed_forward_proj {ffn!r} is not supported (supported: gated-gelu, relu)")
    # T5 1.0 scales the decoder output by d_model**-0.5 and ties the head; v1.1 does neither. transformers 5
    # writes which in scale_decoder_outputs (and always ties); older configs say it by tie_word_embeddings.
    tied = bool(hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True) is not False))
    config = ModelConfig(
        family="t5", vocab_size=_get(hf, "vocab_size", path), d_model=_get(hf, "d_model", path),
        d_kv=_get(hf, "d_kv", path), d_ff=_get(hf, "d_ff", path), n_layer=_get(hf, "num_layers", path),
        n_decoder_layer=hf.get("num_decoder_layers") or _get(hf, "num_layers", path),
        n_head=_get(hf, "num_heads", path), block_size=hf.get("n_positions") or 512,
        relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
        dropout=float(hf.get("dropout_rate", 0.1)), layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-6)),
        ffn=ffn, tie_embeddings=tied)
    config.validate(f"{path} (as model)")
    return config


def t5_state_from_hf(state: dict[str, torch.Tensor], config: ModelConfig,
                     path: str = "weights") -> dict[str, torch.Tensor]:
    """Our state dict from transformers' tensors; a missing or misshapen tensor is a one-line error."""
    state = dict(state)
    state.setdefault("shared.weight", state.get("encoder.embed_tokens.weight"))
    if state["shared.weight"] is None:
        raise LmforgeError(f"{path} has no shared.weight (the token embedding)")
    if not config.tie_embeddings:
        # transformers 5 ties v1.1's head to the embedding too and saves it once: an untied copy is equal
        state.setdefault("lm_head.weight", state["shared.weight"])
    with torch.device("meta"):  # shapes only, no memory
        expected = {k: v.shape for k, v in T5(config).state_dict().items()}
    ours = {}
    for our_name, their_name in t5_layout(config).items():
        if their_name not in state:
            raise LmforgeError(f"{path} has no tensor {their_name}, which this T5 config needs")
        tensor = state[their_name]
        if tensor.shape != expected[our_name]:
            raise LmforgeError(f"{path}: {their_name} has shape {tuple(tensor.shape)}, "
                               f"config.json implies {tuple(expected[our_name])}")
        ours[our_name] = tensor
    return ours


def export_t5(model: T5, out: str | Path, tokenizer: Optional[Tokenizer] = None) -> list[str]:
    """Write `out` as a T5ForConditionalGeneration directory (config.json, model.safetensors, and with a
    tokenizer its files for AutoTokenizer); written under a temporary name and renamed when whole."""
    out = Path(out)
    vocab = SpanVocab.from_tokenizer(tokenizer) if tokenizer is not None else None
    state = {k: v.detach().to("cpu", torch.float32).contiguous()
             for k, v in t5_state_to_hf(model.state_dict(), model.config).items()}
    with building_directory(out, "export") as tmp:
        _write_json(tmp / "config.json", t5_hf_config(model.config, vocab))
        _write_json(tmp / "generation_config.json", {"decoder_start_token_id": vocab.pad if vocab else 0,
                                                     "eos_token_id": vocab.eos if vocab else 1,
                                                     "pad_token_id": vocab.pad if vocab else 0})
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            _write_tokenizer(tokenizer, vocab, tmp, model.config.block_size)
        files = sorted(p.name for p in tmp.iterdir())
    return files


def _write_tokenizer(tokenizer: Tokenizer, vocab: SpanVocab, out: Path, max_length: int) -> None:
    """tokenizer.json as is, run by PreTrainedTokenizerFast with T5's special-token roles."""
    (out / "tokenizer.json").write_text(tokenizer.to_str(), encoding="utf-8")
    sentinels = [SENTINEL.format(i) for i in range(vocab.num_sentinels)]
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
        "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
        "additional_special_tokens": sentinels, "extra_special_tokens": sentinels})


def import_t5(directory: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Our ModelConfig and state dict from a transformers T5 directory (config.json + weights)."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise LmforgeError(f"{config_path} not found: not a transformers model directory")
    config = t5_config_from_hf(read_json(config_path), str(config_path))
    weights, name = read_hf_weights(directory)
    return config, t5_state_from_hf(weights, config, str(directory / name))


def load_t5(directory: str | Path) -> T5:
    """A T5 model with the weights of a transformers T5 directory."""
    config, state = import_t5(directory)
    model = T5(config)
    model.load_state_dict(state)
    return model


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
