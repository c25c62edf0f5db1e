"""ModelConfig: the shape of a Transformer, independent of how it is trained."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from lmforge.errors import LmforgeError

FFN_MULTIPLE = 64  # the llama layout's default feed-forward width is rounded up to a multiple of this
ROPE_THETA = 10000.0
# The llama layout's keys with the values that mean "not asked for"; the gpt2 layout refuses the others.
LLAMA_KEYS = {"n_kv_head": 0, "ffn_hidden": 0, "tie_embeddings": True, "qk_norm": False, "rope_theta": ROPE_THETA}


@dataclass
class ModelConfig:
    # family: the objective and data path. gpt: causal decoder (next-token LM); bert: bidirectional encoder
    # (MLM + NSP); t5: encoder-decoder (T5 v1.1 layout, span-corruption denoising)
    family: Literal["gpt", "bert", "t5"] = "gpt"
    # layout: the block architecture. gpt2: learned positions, LayerNorm, GELU MLP, biases (GPT-2's and
    # BERT's blocks); llama: rotary positions, RMSNorm, SwiGLU, no biases, grouped-query attention (gpt only)
    layout: Literal["gpt2", "llama"] = "gpt2"
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    block_size: int = 64  # longest sequence the model takes (the position table's size in the gpt2 layout)
    vocab_size: int = 0  # 0 = take it from the tokenizer
    mlp_ratio: int = 4
    dropout: float = 0.0
    bias: Optional[bool] = None  # biases in linear layers and LayerNorms; None = the layout's (gpt2 yes, llama no)
    layer_norm_eps: float = 1e-5  # epsilon of every LayerNorm / RMSNorm
    # Where LayerNorm sits: pre (GPT-2; stable when deep) or post (original BERT). auto = the family's own.
    norm: Literal["auto", "pre", "post"] = "auto"
    # gelu: exact erf GELU (BERT); gelu_tanh: tanh approximation (GPT-2). auto = the family's own.
    activation: Literal["auto", "gelu", "gelu_tanh"] = "auto"
    type_vocab_size: int = 2  # bert: segment (token type) embeddings for sentence A / B
    # bert: where word order comes from. learned: BERT's position embeddings (exports to transformers);
    # alibi: no position embeddings, each head's scores fall by its slope times |query - key| (MosaicBERT):
    # attention is local from step 0, so a short run learns from context sooner (lmforge-only, no export)
    position: Literal["learned", "alibi"] = "learned"
    # output layer shares the token embedding matrix; None = the family's (gpt, bert: yes; t5: no, as v1.1).
    # A tied t5 scales its output by d_model**-0.5 (T5 1.0).
    tie_embeddings: Optional[bool] = None
    # llama layout only:
    n_kv_head: int = 0  # key/value heads of grouped-query attention; 0 = n_head (plain multi-head)
    ffn_hidden: int = 0  # SwiGLU width; 0 = 2/3 * mlp_ratio * d_model rounded up to a multiple of 64 (Llama's rule)
    qk_norm: bool = False  # RMSNorm on each head's queries and keys before the rotation
    rope_theta: float = ROPE_THETA  # base of the rotary frequencies
    # t5 only (n_layer counts encoder blocks; block_size is the encoder input length)
    n_decoder_layer: int = 0  # 0 = n_layer
    d_kv: int = 0  # width of each head's queries, keys and values; 0 = d_model // n_head
    d_ff: int = 0  # feed-forward width; 0 = mlp_ratio * d_model
    ffn: Literal["gated-gelu", "relu"] = "gated-gelu"  # gated-gelu: T5 v1.1; relu: T5 1.0
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    # Start of the relative position tables. alibi: each head's bias falls linearly with distance at its
    # own slope (ALiBi's geometric slopes), a locality prior that lets a short run use word order from
    # step 0; normal: Mesh TF's N(0, 1/d_model), which AdamW takes thousands of steps to shape.
    relative_attention_init: Literal["alibi", "normal"] = "alibi"

    def __post_init__(self) -> None:
        # resolved here, so a saved config states what the model has
        if self.bias is None:
            self.bias = self.layout != "llama"
        if self.tie_embeddings is None:
            self.tie_embeddings = self.family != "t5"

    @property
    def pre_norm(self) -> bool:
        return self.norm == "pre" or (self.norm == "auto" and self.family == "gpt")

    @property
    def gelu_approximate(self) -> str:
        """The `approximate` argument of torch's GELU for this config."""
        tanh = self.activation == "gelu_tanh" or (self.activation == "auto" and self.family == "gpt")
        return "tanh" if tanh else "none"

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        """Key/value heads: n_kv_head, or n_head when it is 0."""
        return self.n_kv_head or self.n_head

    @property
    def ffn_size(self) -> int:
        """Hidden width of the feed-forward network."""
        if self.layout != "llama":
            return self.mlp_ratio * self.d_model
        if self.ffn_hidden:
            return self.ffn_hidden
        width = 2 * self.mlp_ratio * self.d_model // 3
        return -(-width // FFN_MULTIPLE) * FFN_MULTIPLE

    def validate(self, prefix: str = "model") -> None:
        for key in ("n_layer", "n_head", "d_model", "block_size", "mlp_ratio"):
            if getattr(self, key) <= 0:
                raise LmforgeError(f"{prefix}.{key} must be positive, got {getattr(self, key)}")
        if self.vocab_size < 0:
            raise LmforgeError(f"{prefix}.vocab_size must be >= 0 (0 = from the tokenizer), got {self.vocab_size}")
        if self.family == "t5":
            self._validate_t5(prefix)
        elif self.d_model % self.n_head:
            raise LmforgeError(
                f"{prefix}.n_head ({self.n_head}) must divide {prefix}.d_model ({self.d_model})"
            )
        if self.family == "gpt" and self.norm == "post":
            raise LmforgeError(f"{prefix}.norm=post is offered for bert only; GPT blocks are pre-LayerNorm")
        if self.position == "alibi" and self.family != "bert":
            raise LmforgeError(f"{prefix}.position=alibi is offered for bert only (gpt: {prefix}.layout=llama "
                               f"for rotary positions; t5: {prefix}.relative_attention_init)")
        if self.type_vocab_size <= 0:
            raise LmforgeError(f"{prefix}.type_vocab_size must be positive, got {self.type_vocab_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise LmforgeError(f"{prefix}.dropout must be in [0, 1), got {self.dropout}")
        if self.layout == "llama":
            self._validate_llama(prefix)
        else:
            for key, unset in LLAMA_KEYS.items():
                if key == "tie_embeddings" and self.family == "t5":
                    continue  # a t5 key too
                if getattr(self, key) != unset and not (key == "n_kv_head" and self.n_kv_head == self.n_head):
                    raise LmforgeError(f"{prefix}.{key}={getattr(self, key)!r} is a llama-layout key; the "
                                       f"{self.layout} layout does not take it (set {prefix}.layout=llama, "
                                       f"family gpt)")

    def _validate_llama(self, prefix: str) -> None:
        if self.family != "gpt":
            raise LmforgeError(f"{prefix}.layout=llama is offered for {prefix}.family=gpt only "
                               f"(a {self.family} model takes layout gpt2)")
        if self.activation != "auto":
            raise LmforgeError(f"{prefix}.activation={self.activation} applies to the gpt2 layout; the llama "
                               f"layout's feed-forward is SwiGLU (leave it auto)")
        if self.n_kv_head < 0:
            raise LmforgeError(f"{prefix}.n_kv_head must be >= 0 (0 = n_head), got {self.n_kv_head}")
        if self.n_head % self.kv_heads:
            raise LmforgeError(f"{prefix}.n_head ({self.n_head}) must be a multiple of {prefix}.n_kv_head "
                               f"({self.n_kv_head}): each key/value head serves a whole group of query heads")
        if self.head_dim % 2:
            raise LmforgeError(f"{prefix}.d_model / {prefix}.n_head = {self.head_dim} is odd; rotary position "
                               f"embeddings rotate pairs of dimensions and need an even head dimension")
        if self.ffn_hidden < 0:
            raise LmforgeError(f"{prefix}.ffn_hidden must be >= 0 (0 = 2/3 * mlp_ratio * d_model rounded up "
                               f"to {FFN_MULTIPLE}), got {self.ffn_hidden}")
        if self.rope_theta <= 0:
            raise LmforgeError(f"{prefix}.rope_theta must be positive, got {self.rope_theta}")

    def _validate_t5(self, prefix: str) -> None:
        for key in ("n_decoder_layer", "d_kv", "d_ff"):
            if getattr(self, key) < 0:
                raise LmforgeError(f"{prefix}.{key} must be >= 0 (0 = the default), got {getattr(self, key)}")
        if self.d_kv == 0 and self.d_model % self.n_head:
            raise LmforgeError(f"{prefix}.n_head ({self.n_head}) must divide {prefix}.d_model ({self.d_model}) "
                               f"unless {prefix}.d_kv is set")
        if self.norm == "post" or self.activation != "auto":
            raise LmforgeError(f"{prefix}.norm and {prefix}.activation do not apply to t5 (pre-RMSNorm blocks; "
                               f"choose the feed-forward with {prefix}.ffn: gated-gelu | relu)")
        if self.relative_attention_num_buckets < 4:
            raise LmforgeError(f"{prefix}.relative_attention_num_buckets must be >= 4, "
                               f"got {self.relative_attention_num_buckets}")
        if self.relative_attention_max_distance <= self.relative_attention_num_buckets // 2:
            raise LmforgeError(f"{prefix}.relative_attention_max_distance must exceed half of "
                               f"{prefix}.relative_attention_num_buckets ({self.relative_attention_num_buckets // 2}),"
                               f" got {self.relative_attention_max_distance}")
