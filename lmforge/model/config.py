"""ModelConfig: the shape of a Transformer, independent of how it is trained."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lmforge.errors import LmforgeError


@dataclass
class ModelConfig:
    # gpt: causal decoder; bert: bidirectional encoder (MLM + NSP); t5: encoder-decoder (T5 v1.1 layout)
    family: Literal["gpt", "bert", "t5"] = "gpt"
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    block_size: int = 64  # longest sequence the position embeddings cover
    vocab_size: int = 0  # 0 = take it from the tokenizer
    mlp_ratio: int = 4
    dropout: float = 0.0
    bias: bool = True
    layer_norm_eps: float = 1e-5
    # Where LayerNorm sits: pre (GPT-2; stable when deep) or post (original BERT). auto = the family's own.
    norm: Literal["auto", "pre", "post"] = "auto"
    # gelu: exact erf GELU (BERT); gelu_tanh: tanh approximation (GPT-2). auto = the family's own.
    activation: Literal["auto", "gelu", "gelu_tanh"] = "auto"
    type_vocab_size: int = 2  # bert: segment (token type) embeddings for sentence A / B
    # t5 only (n_layer counts encoder blocks; block_size is the encoder input length)
    n_decoder_layer: int = 0  # 0 = n_layer
    d_kv: int = 0  # width of each head's queries, keys and values; 0 = d_model // n_head
    d_ff: int = 0  # feed-forward width; 0 = mlp_ratio * d_model
    ffn: Literal["gated-gelu", "relu"] = "gated-gelu"  # gated-gelu: T5 v1.1; relu: T5 1.0
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    tie_embeddings: bool = False  # true: LM head = token embedding, output scaled by d_model**-0.5 (T5 1.0)

    @property
    def pre_norm(self) -> bool:
        return self.norm == "pre" or (self.norm == "auto" and self.family == "gpt")

    @property
    def gelu_approximate(self) -> str:
        """The `approximate` argument of torch's GELU for this config."""
        tanh = self.activation == "gelu_tanh" or (self.activation == "auto" and self.family == "gpt")
        return "tanh" if tanh else "none"

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
        if self.type_vocab_size <= 0:
            raise LmforgeError(f"{prefix}.type_vocab_size must be positive, got {self.type_vocab_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise LmforgeError(f"{prefix}.dropout must be in [0, 1), got {self.dropout}")

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

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head
