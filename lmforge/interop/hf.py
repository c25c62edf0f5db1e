"""Weight layouts and configs shared with Hugging Face `transformers`: our names and shapes <-> theirs.

GPT (gpt2 layout) <-> GPT2LMHeadModel: one to one, except that GPT-2 keeps its linear maps in Conv1D
modules, whose weights are (in, out), the transpose of torch's Linear. BERT <-> BertForPreTraining: our
attention keeps Q, K and V in one fused matrix (one matmul); theirs are three, so export splits and
import concatenates. GPT (llama layout) <-> LlamaForCausalLM: the same split for Q, K, V (of unequal
sizes under grouped-query attention) and for SwiGLU's fused gate and up projections. Our rotary
embedding rotates the pairs (i, i + head_dim / 2) as transformers' Llama does, so Q and K need no
permutation. With model.qk_norm the same layout is Qwen3ForCausalLM: Llama's plus an RMSNorm over
each head's queries and keys before the rotation, as ours. Fine-tuned BERTs <-> BertForSequenceClassification / BertForTokenClassification /
BertForQuestionAnswering (TASK_HEADS): the encoder under `backbone.` and one linear head.
Pure functions on state dicts and config dicts; files are hf_export / hf_import's.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from lmforge.errors import LmforgeError
from lmforge.model.config import ModelConfig


@dataclass(frozen=True)
class Mapped:
    """One of our tensors and the transformers tensor(s) it is."""

    ours: str
    theirs: tuple[str, ...]  # several: ours is theirs concatenated along dim 0 (the fused Q, K, V)
    transpose: bool = False  # GPT-2's Conv1D stores (in, out)
    part: str = "body"  # body, or the optional part it belongs to: pooler, mlm head, nsp head
    sizes: Optional[tuple[int, ...]] = None  # rows of each of theirs in ours; None = equal parts

    def split(self, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Our tensor cut into theirs (before any transpose)."""
        return tensor.split(list(self.sizes)) if self.sizes else tensor.chunk(len(self.theirs), dim=0)

    def their_shapes(self, ours: tuple[int, ...]) -> list[tuple[int, ...]]:
        """The shape of each of theirs, given the shape of ours."""
        rows = self.sizes or (ours[0] // len(self.theirs),) * len(self.theirs)
        return [(n, *ours[1:])[::-1] if self.transpose else (n, *ours[1:]) for n in rows]


def _affine(ours: str, theirs: str, transpose: bool = False, part: str = "body") -> list[Mapped]:
    """weight and bias of a Linear / Conv1D / LayerNorm."""
    return [Mapped(f"{ours}.weight", (f"{theirs}.weight",), transpose, part),
            Mapped(f"{ours}.bias", (f"{theirs}.bias",), False, part)]


def gpt_layout(n_layer: int) -> list[Mapped]:
    """Our GPT <-> GPT2LMHeadModel. The LM head is tied to wte on both sides, so it is not listed."""
    out = [Mapped("wte.weight", ("transformer.wte.weight",)), Mapped("wpe.weight", ("transformer.wpe.weight",))]
    for i in range(n_layer):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        out += _affine(f"{ours}ln_1", f"{theirs}ln_1") + _affine(f"{ours}ln_2", f"{theirs}ln_2")
        for our_name, their_name in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                                     ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
            out += _affine(ours + our_name, theirs + their_name, transpose=True)
    return out + _affine("ln_f", "transformer.ln_f")


def bert_encoder_layout(n_layer: int, ours: str = "bert.") -> list[Mapped]:
    """Our BertEncoder (under `ours`) <-> transformers' BertModel (under bert.), pooler included."""
    out = [Mapped(f"{ours}wte.weight", ("bert.embeddings.word_embeddings.weight",)),
           Mapped(f"{ours}wpe.weight", ("bert.embeddings.position_embeddings.weight",)),
           Mapped(f"{ours}wtt.weight", ("bert.embeddings.token_type_embeddings.weight",)),
           *_affine(f"{ours}ln_emb", "bert.embeddings.LayerNorm")]
    for i in range(n_layer):
        block, layer = f"{ours}blocks.{i}.", f"bert.encoder.layer.{i}."
        for kind in ("weight", "bias"):
            out.append(Mapped(f"{block}attn.qkv.{kind}",
                              tuple(f"{layer}attention.self.{n}.{kind}" for n in ("query", "key", "value"))))
        for our_name, their_name in (("attn.proj", "attention.output.dense"), ("ln_1", "attention.output.LayerNorm"),
                                     ("mlp.fc", "intermediate.dense"), ("mlp.proj", "output.dense"),
                                     ("ln_2", "output.LayerNorm")):
            out += _affine(block + our_name, layer + their_name)
    return out + _affine(f"{ours}pooler.dense", "bert.pooler.dense", part="pooler")


def bert_layout(n_layer: int) -> list[Mapped]:
    """Our BertForPreTraining <-> transformers' BertForPreTraining (MLM decoder tied to the embeddings)."""
    return [*bert_encoder_layout(n_layer),
            *_affine("mlm.dense", "cls.predictions.transform.dense", part="mlm head"),
            *_affine("mlm.ln", "cls.predictions.transform.LayerNorm", part="mlm head"),
            Mapped("mlm.bias", ("cls.predictions.bias",), part="mlm head"),
            *_affine("nsp.out", "cls.seq_relationship", part="nsp head")]


def llama_layout(config: ModelConfig) -> list[Mapped]:
    """Our GPT in the llama layout <-> LlamaForCausalLM (Qwen3ForCausalLM with qk_norm). A tied LM head is not
    listed (it is wte)."""
    q, kv = config.n_head * config.head_dim, config.kv_heads * config.head_dim
    kinds = ("weight", "bias") if config.bias else ("weight",)
    out = [Mapped("wte.weight", ("model.embed_tokens.weight",))]
    for i in range(config.n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        out += [Mapped(f"{ours}ln_1.weight", (f"{theirs}input_layernorm.weight",)),
                Mapped(f"{ours}ln_2.weight", (f"{theirs}post_attention_layernorm.weight",))]
        if config.qk_norm:  # Qwen3ForCausalLM
            out += [Mapped(f"{ours}attn.{n}_norm.weight", (f"{theirs}self_attn.{n}_norm.weight",)) for n in "qk"]
        for kind in kinds:
            out += [Mapped(f"{ours}attn.qkv.{kind}", tuple(f"{theirs}self_attn.{n}_proj.{kind}" for n in "qkv"),
                           sizes=(q, kv, kv)),
                    Mapped(f"{ours}attn.proj.{kind}", (f"{theirs}self_attn.o_proj.{kind}",)),
                    Mapped(f"{ours}mlp.fc.{kind}", (f"{theirs}mlp.gate_proj.{kind}", f"{theirs}mlp.up_proj.{kind}")),
                    Mapped(f"{ours}mlp.proj.{kind}", (f"{theirs}mlp.down_proj.{kind}",))]
    out.append(Mapped("ln_f.weight", ("model.norm.weight",)))
    if not config.tie_embeddings:
        out.append(Mapped("lm_head.weight", ("lm_head.weight",)))
    return out


def layout(config: ModelConfig) -> list[Mapped]:
    if config.family == "gpt":
        return llama_layout(config) if config.layout == "llama" else gpt_layout(config.n_layer)
    return bert_layout(config.n_layer)


def position_table(config: ModelConfig) -> Optional[str]:
    """Our learned position-embedding table, (block_size, d_model); None for rotary positions."""
    if config.layout == "llama":
        return None
    return "wpe.weight" if config.family == "gpt" else "bert.wpe.weight"


def tied_copies(config: ModelConfig) -> dict[str, str]:
    """Tensors transformers may store twice (tied): the copy -> the tensor it must equal."""
    if config.family == "bert":
        return {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
                "cls.predictions.decoder.bias": "cls.predictions.bias"}
    if config.layout == "llama":
        return {"lm_head.weight": "model.embed_tokens.weight"} if config.tie_embeddings else {}
    return {"lm_head.weight": "transformer.wte.weight"}


# Stored by some transformers versions, recomputed by all: the causal mask of old GPT-2 files, position ids.
IGNORED = re.compile(r"(^|\.)(attn\.bias|attn\.masked_bias|position_ids)$")


# ---------------------------------------------------------------------------------------------
# Export: ours -> transformers


def _check_exportable(config: ModelConfig) -> None:
    if config.family == "bert" and config.pre_norm:
        raise LmforgeError("a pre-LayerNorm BERT (model.norm=pre) has no transformers BERT equivalent; "
                           "only post-LN (the original layout) exports")
    if config.family == "bert" and config.position == "alibi":
        raise LmforgeError("a BERT with ALiBi attention (model.position=alibi) has no transformers BERT "
                           "equivalent (it has no position embeddings); only model.position=learned exports")
    if config.family not in ("gpt", "bert"):
        raise LmforgeError(f"no transformers layout for model.family={config.family} (exportable: gpt, bert)")
    if config.qk_norm and config.bias:
        raise LmforgeError("model.qk_norm=true exports as Qwen3ForCausalLM, whose feed-forward has no biases; "
                           "a run with model.bias=true and qk_norm does not export")


def _activation_name(config: ModelConfig) -> str:
    # gelu_new is GPT-2's own name for the tanh approximation (older transformers know no other).
    return "gelu_new" if config.gelu_approximate == "tanh" else "gelu"


def gpt_hf_config(config: ModelConfig, eos_token_id: Optional[int] = None) -> dict[str, Any]:
    """transformers GPT2Config fields for our gpt ModelConfig."""
    _check_exportable(config)
    return {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": config.vocab_size,
        "n_positions": config.block_size, "n_embd": config.d_model, "n_layer": config.n_layer,
        "n_head": config.n_head, "n_inner": config.mlp_ratio * config.d_model,
        "activation_function": _activation_name(config), "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout, "attn_pdrop": config.dropout, "layer_norm_epsilon": config.layer_norm_eps,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "tie_word_embeddings": True,
        "bos_token_id": eos_token_id, "eos_token_id": eos_token_id,
    }


def llama_hf_config(config: ModelConfig, eos_token_id: Optional[int] = None) -> dict[str, Any]:
    """transformers LlamaConfig fields for our gpt ModelConfig in the llama layout (Qwen3Config with qk_norm)."""
    _check_exportable(config)
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.qk_norm:  # every layer full attention: Qwen3's sliding window off
        qwen3 = {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "use_sliding_window": False,
                 "sliding_window": None, "max_window_layers": config.n_layer,
                 "layer_types": ["full_attention"] * config.n_layer}
    else:
        qwen3 = {}
    return {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": config.vocab_size,
        "hidden_size": config.d_model, "intermediate_size": config.ffn_size, "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head, "num_key_value_heads": config.kv_heads, "head_dim": config.head_dim,
        "hidden_act": "silu", "max_position_embeddings": config.block_size, "rms_norm_eps": config.layer_norm_eps,
        "attention_bias": config.bias, "mlp_bias": config.bias, "attention_dropout": config.dropout,
        "tie_word_embeddings": config.tie_embeddings, "pretraining_tp": 1,
        # transformers 5 reads rope_parameters, 4.x rope_theta and rope_scaling
        "rope_parameters": rope, "rope_theta": config.rope_theta, "rope_scaling": None,
        "bos_token_id": eos_token_id, "eos_token_id": eos_token_id, **qwen3,
    }


def bert_hf_config(config: ModelConfig, pad_token_id: int = 0) -> dict[str, Any]:
    """transformers BertConfig fields for our bert ModelConfig."""
    if config.family != "bert":
        raise LmforgeError(f"not a bert model (model.family={config.family})")
    _check_exportable(config)
    return {
        "model_type": "bert", "architectures": ["BertForPreTraining"],
        "vocab_size": config.vocab_size, "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
        "intermediate_size": config.mlp_ratio * config.d_model, "hidden_act": _activation_name(config),
        "hidden_dropout_prob": config.dropout, "attention_probs_dropout_prob": config.dropout,
        "max_position_embeddings": config.block_size, "type_vocab_size": config.type_vocab_size,
        "layer_norm_eps": config.layer_norm_eps, "pad_token_id": pad_token_id, "tie_word_embeddings": True,
        "position_embedding_type": "absolute",
    }


def _ours_to_theirs(state: dict[str, torch.Tensor], entries: list[Mapped]) -> dict[str, torch.Tensor]:
    out = {}
    for entry in entries:
        tensor = state.get(entry.ours)
        if tensor is None and entry.ours.endswith(".bias"):
            # model.bias=false: transformers' layers always have biases; zeros compute the same thing
            weight = state[entry.ours.removesuffix("bias") + "weight"]
            tensor = weight.new_zeros(weight.shape[0])
        elif tensor is None:
            raise KeyError(entry.ours)  # a bug: the layout does not match the model
        for name, part in zip(entry.theirs, entry.split(tensor)):
            out[name] = (part.t() if entry.transpose else part).contiguous()
    return out


def state_to_hf(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our pretraining model's state dict -> transformers' (GPT2LMHeadModel / BertForPreTraining),
    each tied tensor stored once (transformers re-ties lm_head / the MLM decoder when loading)."""
    _check_exportable(config)
    return _ours_to_theirs(state, layout(config))


def bert_state_to_hf(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our BertForPreTraining state dict -> transformers BertForPreTraining's, the tied decoder included."""
    bert_hf_config(config)  # refuses layouts that do not map
    out = state_to_hf(state, config)
    out["cls.predictions.decoder.weight"] = out["bert.embeddings.word_embeddings.weight"]
    out["cls.predictions.decoder.bias"] = out["cls.predictions.bias"]
    return out


@dataclass(frozen=True)
class TaskHead:
    """A transformers BERT task class and the lmforge fine-tuned model it is (lmforge/tasks)."""

    kinds: tuple[str, ...]  # the task kinds (task.kind) it holds
    ours: str  # our head's linear layer
    theirs: str  # transformers' name for it
    pooled: bool  # reads the pooled [CLS] vector (the pooler is part of it), else every token's hidden state


TASK_HEADS = {
    "BertForSequenceClassification": TaskHead(("classification", "regression"), "head.out", "classifier", True),
    "BertForTokenClassification": TaskHead(("tokens",), "classifier", "classifier", False),
    "BertForQuestionAnswering": TaskHead(("span",), "qa_outputs", "qa_outputs", False),
}


def task_architecture(kind: str) -> str:
    """The transformers class a fine-tuned BERT of task kind `kind` exports as."""
    for name, head in TASK_HEADS.items():
        if kind in head.kinds:
            return name
    kinds = ", ".join(k for head in TASK_HEADS.values() for k in head.kinds)
    raise LmforgeError(f"a BERT fine-tuned for task.kind={kind} has no transformers task class (exportable: {kinds})")


def bert_task_layout(n_layer: int, architecture: str, with_pooler: bool = False) -> list[Mapped]:
    """Our fine-tuned BERT (`backbone.` + head) <-> transformers' `architecture` (a TASK_HEADS key).

    The per-token classes have no pooler (ours has one, unused): with_pooler lists it as an optional
    part, for checkpoints that store one anyway."""
    head = TASK_HEADS[architecture]
    body = bert_encoder_layout(n_layer, ours="backbone.")
    if not (head.pooled or with_pooler):
        body = [entry for entry in body if entry.part != "pooler"]
    elif head.pooled:  # the classifier reads the pooled vector: without the pooler it is not the model
        body = [dataclasses.replace(entry, part="body") for entry in body]
    return [*body, *_affine(head.ours, head.theirs)]


def bert_task_to_hf(config: ModelConfig, state: dict[str, torch.Tensor], kind: str, labels: list[str],
                    pad_token_id: int = 0) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A fine-tuned BERT (lmforge.tasks: SequenceClassifier, TokenClassifier, SpanExtractor) -> (config,
    state dict) of its transformers class. labels: the class names in index order (one label: regression;
    none for span, whose two outputs are start and end)."""
    architecture = task_architecture(kind)
    hf = bert_hf_config(config, pad_token_id)
    hf["architectures"] = [architecture]
    if kind != "span":
        hf.update(num_labels=len(labels), id2label={str(i): name for i, name in enumerate(labels)},
                  label2id={name: i for i, name in enumerate(labels)})
    if kind in ("classification", "regression"):
        hf["problem_type"] = "regression" if kind == "regression" else "single_label_classification"
    return hf, _ours_to_theirs(state, bert_task_layout(config.n_layer, architecture))


# ---------------------------------------------------------------------------------------------
# Import: transformers -> ours

SUPPORTED = {"gpt2": ("GPT2LMHeadModel", "GPT2Model"),
             "bert": ("BertForPreTraining", "BertForMaskedLM", *TASK_HEADS, "BertModel"),
             "llama": ("LlamaForCausalLM",), "qwen3": ("Qwen3ForCausalLM",)}
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def _supported_names() -> str:
    return ", ".join(name for names in SUPPORTED.values() for name in names)


def architecture_of(hf: dict[str, Any]) -> str:
    """The checkpoint's architecture name, refused unless lmforge can load it."""
    model_type = hf.get("model_type")
    names = hf.get("architectures") or []
    if model_type not in SUPPORTED:
        found = f"model_type={model_type!r}" + (f" ({', '.join(names)})" if names else "")
        raise LmforgeError(f"unsupported architecture: config.json has {found}; supported: {_supported_names()}")
    if not names:  # old checkpoints name no class: the bare model, with whatever heads the weights hold
        return SUPPORTED[model_type][-1]
    if names[0] not in SUPPORTED[model_type]:
        raise LmforgeError(f"unsupported architecture {names[0]} (config.json architectures); "
                           f"supported: {_supported_names()}")
    return names[0]


def _required(hf: dict[str, Any], key: str) -> Any:
    if key not in hf:
        raise LmforgeError(f"config.json has no {key!r}")
    return hf[key]


def _mlp_ratio(inner: int, width: int, key: str) -> int:
    if inner % width:
        raise LmforgeError(f"config.json {key}={inner} is not a whole multiple of the width {width}; "
                           f"lmforge's MLP is model.mlp_ratio (an integer) x model.d_model")
    return inner // width


def _activation(name: Any, key: str) -> str:
    if name not in _ACTIVATIONS:
        raise LmforgeError(f"config.json {key}={name!r} is not supported; supported: {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def _refuse(hf: dict[str, Any], key: str, supported: Any, what: str) -> None:
    if key in hf and hf[key] not in (supported, None):
        raise LmforgeError(f"config.json {key}={hf[key]!r}: {what} has no lmforge equivalent "
                           f"(supported: {supported!r})")


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Our ModelConfig for a transformers config.json dict (GPT-2 or BERT), refusing what we cannot run."""
    model_type = hf.get("model_type")
    architecture_of(hf)
    if model_type == "gpt2":
        _refuse(hf, "scale_attn_weights", True, "unscaled attention")
        _refuse(hf, "scale_attn_by_inverse_layer_idx", False, "attention scaled by layer index")
        _refuse(hf, "add_cross_attention", False, "cross-attention")
        width = _required(hf, "n_embd")
        inner = hf.get("n_inner") or 4 * width
        config = ModelConfig(
            family="gpt", n_layer=_required(hf, "n_layer"), n_head=_required(hf, "n_head"), d_model=width,
            block_size=_required(hf, "n_positions"), vocab_size=_required(hf, "vocab_size"),
            mlp_ratio=_mlp_ratio(inner, width, "n_inner"), dropout=float(hf.get("resid_pdrop", 0.1)),
            layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), norm="pre",
            activation=_activation(hf.get("activation_function", "gelu_new"), "activation_function"))
    elif model_type in ("llama", "qwen3"):
        config = _llama_config_from_hf(hf, qk_norm=model_type == "qwen3")
    else:
        _refuse(hf, "position_embedding_type", "absolute", "relative position embeddings")
        _refuse(hf, "is_decoder", False, "a causal (decoder) BERT")
        _refuse(hf, "add_cross_attention", False, "cross-attention")
        width = _required(hf, "hidden_size")
        config = ModelConfig(
            family="bert", n_layer=_required(hf, "num_hidden_layers"), n_head=_required(hf, "num_attention_heads"),
            d_model=width, block_size=_required(hf, "max_position_embeddings"),
            vocab_size=_required(hf, "vocab_size"),
            mlp_ratio=_mlp_ratio(_required(hf, "intermediate_size"), width, "intermediate_size"),
            dropout=float(hf.get("hidden_dropout_prob", 0.1)), layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
            norm="post", activation=_activation(hf.get("hidden_act", "gelu"), "hidden_act"),
            type_vocab_size=hf.get("type_vocab_size", 2))
    try:
        config.validate("config.json")
    except LmforgeError as exc:
        raise LmforgeError(f"config.json describes a model lmforge cannot build: {exc}") from None
    return config


def _rope_theta(hf: dict[str, Any]) -> float:
    """The rotary base of a Llama config.json (transformers 5: rope_parameters; 4.x: rope_theta), refusing
    scaled rotary variants."""
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise LmforgeError(f"config.json rope type {kind!r}: scaled rotary embeddings have no lmforge "
                           f"equivalent (supported: 'default')")
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _llama_config_from_hf(hf: dict[str, Any], qk_norm: bool) -> ModelConfig:
    """A LlamaConfig, or a Qwen3Config (qk_norm: Llama with normalised queries and keys)."""
    _refuse(hf, "hidden_act", "silu", "a gated feed-forward with another activation")
    _refuse(hf, "pretraining_tp", 1, "tensor-parallel slicing of the projections")
    if qk_norm:
        _refuse(hf, "use_sliding_window", False, "sliding-window attention")
        _refuse(hf, "attention_bias", False, "attention biases beside a feed-forward without them")
    if bool(hf.get("attention_bias", False)) != bool(hf.get("mlp_bias", False)):
        raise LmforgeError(f"config.json attention_bias={hf.get('attention_bias')} and mlp_bias="
                           f"{hf.get('mlp_bias')} differ; lmforge's model.bias sets both")
    width, heads = _required(hf, "hidden_size"), _required(hf, "num_attention_heads")
    if hf.get("head_dim") not in (None, width // heads):
        raise LmforgeError(f"config.json head_dim={hf['head_dim']} is not hidden_size / num_attention_heads "
                           f"({width // heads}); lmforge's heads split d_model evenly")
    return ModelConfig(
        family="gpt", layout="llama", n_layer=_required(hf, "num_hidden_layers"), n_head=heads, d_model=width,
        n_kv_head=hf.get("num_key_value_heads") or heads, block_size=_required(hf, "max_position_embeddings"),
        vocab_size=_required(hf, "vocab_size"), ffn_hidden=_required(hf, "intermediate_size"),
        dropout=float(hf.get("attention_dropout", 0.0)), bias=bool(hf.get("attention_bias", False)),
        layer_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), norm="pre",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), rope_theta=_rope_theta(hf), qk_norm=qk_norm)


def _base_prefix(config: ModelConfig) -> str:
    """The prefix of the base model's tensors inside transformers' full model."""
    if config.family == "bert":
        return "bert."
    return "model." if config.layout == "llama" else "transformer."


def _with_full_names(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A base model's names (GPT2Model, BertModel: without `prefix`) -> the full model's."""
    if any(k.startswith(prefix) for k in state):
        return dict(state)
    return {k if k.startswith(("cls.", "lm_head.")) else prefix + k: v for k, v in state.items()}


def _first(items: list[str], n: int, sep: str) -> str:
    return sep.join(items[:n]) + (f" (and {len(items) - n} more)" if len(items) > n else "")


@dataclass
class ImportedState:
    state: dict[str, torch.Tensor]  # ours, float32
    missing_parts: list[str]  # optional parts the checkpoint does not have (to be initialised)


def state_from_hf(state: dict[str, torch.Tensor], config: ModelConfig, shapes: Mapping[str, tuple[int, ...]],
                  entries: Optional[list[Mapped]] = None) -> ImportedState:
    """transformers state dict (the architectures in SUPPORTED) -> ours, checked against `config`.

    shapes: our tensors' shapes as config.json implies them (those of the model to be loaded).
    Heads the checkpoint lacks (a BertModel has no MLM / NSP head, a BertForMaskedLM no pooler or NSP
    head) are reported in missing_parts, not filled. entries: the layout (default: the pretraining
    model's, `layout(config)`)."""
    state = _with_full_names(state, _base_prefix(config))
    for copy, source in tied_copies(config).items():
        if copy not in state:
            continue
        if source not in state:
            state[source] = state[copy]  # only the copy was saved
        elif state[copy].shape != state[source].shape or not torch.equal(state[copy], state[source]):
            raise LmforgeError(f"{copy} differs from {source}: the checkpoint's output layer is not tied to "
                               f"its input embeddings, and lmforge's are (weight tying)")
        state.pop(copy)

    out, missing_parts, missing, wrong = {}, [], [], []
    used: set[str] = set()
    for entry in entries if entries is not None else layout(config):
        absent = [name for name in entry.theirs if name not in state]
        if absent:
            if entry.part == "body":
                missing += absent
            elif entry.part not in missing_parts:
                missing_parts.append(entry.part)
            continue
        their_shapes = entry.their_shapes(tuple(shapes[entry.ours]))
        bad = [f"{name} is {tuple(state[name].shape)}, config.json implies {shape}"
               for name, shape in zip(entry.theirs, their_shapes) if tuple(state[name].shape) != shape]
        used.update(entry.theirs)
        if bad:
            wrong += bad
            continue
        parts = [state[name].t() if entry.transpose else state[name] for name in entry.theirs]
        out[entry.ours] = torch.cat(parts, dim=0).to(torch.float32).contiguous()
    unexpected = [k for k in state if k not in used and not IGNORED.search(k)]
    problems = [f"{what}: {_first(items, n, sep)}" for what, items, n, sep in (
        ("shape differs", wrong, 3, "; "), ("missing", missing, 4, ", "),
        ("not described by config.json", unexpected, 4, ", ")) if items]
    if problems:
        raise LmforgeError("the weights do not match config.json (" + " | ".join(problems) + ")")
    return ImportedState(out, missing_parts)


def bert_state_from_hf(state: dict[str, torch.Tensor], n_layer: int) -> dict[str, torch.Tensor]:
    """transformers BERT state dict (BertForPreTraining, or a bare BertModel without heads) -> ours,
    without checks against a config; missing heads are left out."""
    state = _with_full_names(state, "bert.")
    out = {}
    for entry in bert_layout(n_layer):
        if all(name in state for name in entry.theirs):
            out[entry.ours] = torch.cat([state[name] for name in entry.theirs], dim=0)
    return out
