"""T5: an encoder-decoder Transformer in the layout of transformers' T5 v1.1 (T5 1.0 with ffn=relu, tied head).

Shared token embedding; pre-norm residual blocks with RMS norm (no bias, no mean subtraction);
relative position bias from log-spaced buckets, computed once per stack (bidirectional in the
encoder, causal in the decoder) and added to every layer's attention scores; feed-forward without
biases, gated-GELU (v1.1) or ReLU (1.0); the decoder attends causally to itself and to the encoder
output. Attention runs through torch SDPA with the position bias (plus masks) as an additive mask and
scale 1, since T5 folds the 1/sqrt(d) scaling into its initialisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.config import ModelConfig
from lmforge.model.layers import alibi_slopes, layer_index

IGNORE_INDEX = -100  # label value that contributes no loss
PAD_ID = 0  # <pad>: also the decoder's start token, as in T5

KVCache = tuple[torch.Tensor, torch.Tensor]  # keys and values, each (batch, heads, length, d_kv)


def t5_sizes(config: ModelConfig) -> tuple[int, int, int]:
    """(d_kv, d_ff, decoder layers) with the config's zeros resolved to their defaults."""
    return (config.d_kv or config.d_model // config.n_head, config.d_ff or config.mlp_ratio * config.d_model,
            config.n_decoder_layer or config.n_layer)


def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """Bucket of (key position - query position): one bucket per distance below half the buckets (per
    direction when bidirectional), then log-spaced buckets up to max_distance, beyond which all share
    the last. Causal stacks see only keys at or before the query, so only distances <= 0 count."""
    if bidirectional:
        num_buckets //= 2
        direction = (relative_position > 0).long() * num_buckets  # keys after the query use the upper half
        distance = relative_position.abs()
    else:
        direction = torch.zeros_like(relative_position)
        distance = (-relative_position).clamp(min=0)
    exact = num_buckets // 2
    scaled = torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    log_bucket = (exact + (scaled * (num_buckets - exact)).long()).clamp(max=num_buckets - 1)
    return direction + torch.where(distance < exact, distance, log_bucket)


class RelativePositionBias(nn.Module):
    """A learned scalar per (bucket, head), looked up for every query-key pair: (1, heads, queries, keys)."""

    def __init__(self, config: ModelConfig, bidirectional: bool):
        super().__init__()
        self.bidirectional = bidirectional
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        self.embedding = nn.Embedding(self.num_buckets, config.n_head)

    def forward(self, num_queries: int, num_keys: int, query_offset: int = 0) -> torch.Tensor:
        device = self.embedding.weight.device
        queries = torch.arange(query_offset, query_offset + num_queries, device=device)
        keys = torch.arange(num_keys, device=device)
        buckets = relative_position_bucket(keys[None, :] - queries[:, None], self.bidirectional,
                                           self.num_buckets, self.max_distance)
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)

    def alibi_table(self) -> torch.Tensor:
        """(buckets, heads): -slope_h * the mean distance a bucket covers, with ALiBi's slopes
        2**(-8 (h + 1) / heads); the buckets a stack never looks up stay 0."""
        slopes = alibi_slopes(self.embedding.weight.shape[1])
        offsets = torch.arange(-self.max_distance, self.max_distance + 1, device="cpu")  # also when built on meta
        buckets = relative_position_bucket(offsets, self.bidirectional, self.num_buckets, self.max_distance)
        if not self.bidirectional:
            buckets, offsets = buckets[offsets <= 0], offsets[offsets <= 0]
        total = torch.zeros(self.num_buckets, dtype=torch.float64, device="cpu").index_add_(0, buckets, offsets.abs().double())
        count = torch.zeros(self.num_buckets, dtype=torch.float64, device="cpu").index_add_(0, buckets, torch.ones_like(total[buckets]))
        distance = total / count.clamp(min=1)
        return (-distance[:, None] * slopes[None, :]).float().to(self.embedding.weight.device)


class Attention(nn.Module):
    """Multi-head attention without biases or 1/sqrt(d) scaling; the additive mask carries position and padding."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        d_kv = t5_sizes(config)[0]
        self.n_head, self.d_kv, self.dropout = config.n_head, d_kv, config.dropout
        inner = config.n_head * d_kv
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.n_head, self.d_kv).transpose(1, 2)

    def keys_values(self, x: torch.Tensor) -> KVCache:
        return self._heads(self.k(x)), self._heads(self.v(x))

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor, memory: Optional[KVCache | torch.Tensor] = None,
                past: Optional[KVCache] = None) -> tuple[torch.Tensor, KVCache]:
        """Self-attention over x (after `past` keys/values), or cross-attention to `memory`: the encoder
        output's keys/values computed beforehand, or the encoder output itself."""
        q = self._heads(self.q(x))
        if isinstance(memory, torch.Tensor):
            k, v = self.keys_values(memory)
        elif memory is not None:
            k, v = memory
        else:
            k, v = self.keys_values(x)
            if past is not None:
                k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask.to(q.dtype), scale=1.0,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(x.shape[0], x.shape[1], self.n_head * self.d_kv)
        return self.o(y), (k, v)


class FeedForward(nn.Module):
    """Bias-free position-wise network: gated-GELU wo(gelu(wi_0 x) * wi_1 x), or ReLU wo(relu(wi x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        d_ff = t5_sizes(config)[1]
        self.gated = config.ffn == "gated-gelu"
        if self.gated:
            self.wi_0 = nn.Linear(config.d_model, d_ff, bias=False)
            self.wi_1 = nn.Linear(config.d_model, d_ff, bias=False)
        else:
            self.wi = nn.Linear(config.d_model, d_ff, bias=False)
        self.wo = nn.Linear(d_ff, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            hidden = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)
        else:
            hidden = F.relu(self.wi(x))
        return self.wo(self.dropout(hidden))


def _norm(config: ModelConfig) -> nn.RMSNorm:
    return nn.RMSNorm(config.d_model, eps=config.layer_norm_eps)


class EncoderBlock(nn.Module):
    """x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attn_norm, self.attn = _norm(config), Attention(config)
        self.ffn_norm, self.ffn = _norm(config), FeedForward(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), additive_mask)[0])
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class DecoderBlock(nn.Module):
    """x + self_attn(norm(x)) (causal), x + cross_attn(norm(x), encoder), x + ffn(norm(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.self_attn_norm, self.self_attn = _norm(config), Attention(config)
        self.cross_attn_norm, self.cross_attn = _norm(config), Attention(config)
        self.ffn_norm, self.ffn = _norm(config), FeedForward(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, self_mask: torch.Tensor, cross_mask: torch.Tensor,
                memory: KVCache | torch.Tensor, past: Optional[KVCache] = None) -> tuple[torch.Tensor, KVCache]:
        attn_out, present = self.self_attn(self.self_attn_norm(x), self_mask, past=past)
        x = x + self.dropout(attn_out)
        x = x + self.dropout(self.cross_attn(self.cross_attn_norm(x), cross_mask, memory=memory)[0])
        return x + self.dropout(self.ffn(self.ffn_norm(x))), present


def masked(scores: torch.Tensor, allowed: Optional[torch.Tensor]) -> torch.Tensor:
    """The additive mask: `scores` where `allowed` (broadcast), the dtype's minimum elsewhere."""
    return scores if allowed is None else scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)


def key_mask(attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """(batch, keys) with nonzero = real token -> bool (batch, 1, 1, keys)."""
    return None if attention_mask is None else attention_mask.bool()[:, None, None, :]


@dataclass
class DecoderCache:
    """What decoding one more token needs: per layer the self-attention keys/values so far and the
    cross-attention keys/values of the encoder output (computed once), plus the encoder's padding mask."""

    self_kv: list[KVCache]
    cross_kv: list[KVCache | torch.Tensor]  # or, per layer, the encoder output each block projects itself
    cross_mask: torch.Tensor  # additive (batch, 1, 1, encoder length)

    @property
    def length(self) -> int:
        return self.self_kv[0][0].shape[2] if self.self_kv else 0

    def select(self, rows: torch.Tensor, same_inputs: bool = False) -> "DecoderCache":
        """The cache of the given batch rows. same_inputs: each row keeps its encoder input (beam search
        reordering beams of one input), so the cross-attention part is kept as it is, not copied."""
        pick = lambda kv: (kv[0].index_select(0, rows), kv[1].index_select(0, rows))  # noqa: E731
        if same_inputs:
            return DecoderCache([pick(kv) for kv in self.self_kv], self.cross_kv, self.cross_mask)
        return DecoderCache([pick(kv) for kv in self.self_kv], [pick(kv) for kv in self.cross_kv],
                            self.cross_mask.index_select(0, rows))


class T5Encoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.position_bias = RelativePositionBias(config, bidirectional=True)
        self.blocks = nn.ModuleList(EncoderBlock(config) for _ in range(config.n_layer))
        self.final_norm = _norm(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        length = x.shape[1]
        additive = masked(self.position_bias(length, length).to(x.dtype), key_mask(attention_mask))
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x, additive)
        return self.dropout(self.final_norm(x))


class T5Decoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.position_bias = RelativePositionBias(config, bidirectional=False)
        self.blocks = nn.ModuleList(DecoderBlock(config) for _ in range(t5_sizes(config)[2]))
        self.final_norm = _norm(config)
        self.dropout = nn.Dropout(config.dropout)

    def start_cache(self, encoder_out: torch.Tensor, attention_mask: Optional[torch.Tensor],
                    precompute: bool = True) -> DecoderCache:
        """Cross-attention keys/values of the encoder output, for every decoding step to reuse.

        precompute=False leaves the projection to each block's forward (one pass of teacher forcing), so
        that a block's parameters are used only inside its own forward, as FSDP's per-block units need."""
        cross = [block.cross_attn.keys_values(encoder_out) if precompute else encoder_out for block in self.blocks]
        zeros = encoder_out.new_zeros(encoder_out.shape[0], 1, 1, encoder_out.shape[1])
        return DecoderCache([], cross, masked(zeros, key_mask(attention_mask)))

    def forward(self, x: torch.Tensor, cache: DecoderCache,
                decoder_attention_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, DecoderCache]:
        """x: embedded new decoder tokens, at positions cache.length ...; returns hidden states and the grown cache.

        decoder_attention_mask covers all decoder positions so far (batch, cache.length + new).
        """
        past_length, length = cache.length, x.shape[1]
        keys = past_length + length
        allowed = torch.ones(length, keys, dtype=torch.bool, device=x.device).tril(diagonal=past_length)
        if decoder_attention_mask is not None:
            allowed = allowed & key_mask(decoder_attention_mask)
        additive = masked(self.position_bias(length, keys, past_length).to(x.dtype), allowed)
        x = self.dropout(x)
        presents = []
        for i, block in enumerate(self.blocks):
            x, present = block(x, additive, cache.cross_mask, cache.cross_kv[i],
                               cache.self_kv[i] if cache.self_kv else None)
            presents.append(present)
        return self.dropout(self.final_norm(x)), DecoderCache(presents, cache.cross_kv, cache.cross_mask)


@dataclass
class Seq2SeqLMOutput:
    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None
    labels: Optional[torch.Tensor] = None

    def eval_sums(self) -> dict[str, tuple[float, int]]:
        """(sum, count) per validation metric (loss and token accuracy over target tokens)."""
        keep = self.labels != IGNORE_INDEX
        n = int(keep.sum())
        correct = int((self.logits.argmax(-1)[keep] == self.labels[keep]).sum())
        return {"loss": (float(self.loss.detach()) * n, n), "token_acc": (float(correct), n)}

    def loss_terms(self) -> dict[str, Optional[torch.Tensor]]:
        """The loss keyed by the label tensor over whose non-ignored entries it is a mean."""
        return {"labels": self.loss}


def shift_right(labels: torch.Tensor) -> torch.Tensor:
    """Decoder inputs for teacher forcing: <pad> (the start token), then the labels but the last; ignored -> <pad>."""
    shifted = labels.new_full(labels.shape, PAD_ID)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == IGNORE_INDEX, PAD_ID)


class T5(nn.Module):
    """Encoder-decoder LM: forward(input_ids, attention_mask, decoder_input_ids | labels) -> logits (+ loss)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Encoder(config)
        self.decoder = T5Decoder(config)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """Mesh TensorFlow's initialisation (T5's): each matrix ~ N(0, 1/fan_in), queries also / d_kv, which
        takes the place of the 1/sqrt(d_kv) score scaling; embeddings and the LM head ~ N(0, 1)."""
        c = self.config
        if isinstance(module, Attention):
            nn.init.normal_(module.q.weight, std=(c.d_model * module.d_kv) ** -0.5)
            nn.init.normal_(module.k.weight, std=c.d_model ** -0.5)
            nn.init.normal_(module.v.weight, std=c.d_model ** -0.5)
            nn.init.normal_(module.o.weight, std=(module.n_head * module.d_kv) ** -0.5)
        elif isinstance(module, FeedForward):
            for name in ("wi_0", "wi_1") if module.gated else ("wi",):
                nn.init.normal_(getattr(module, name).weight, std=c.d_model ** -0.5)
            nn.init.normal_(module.wo.weight, std=module.wo.in_features ** -0.5)
        elif isinstance(module, RelativePositionBias):
            if c.relative_attention_init == "alibi":
                with torch.no_grad():
                    module.embedding.weight.copy_(module.alibi_table())
            else:
                nn.init.normal_(module.embedding.weight, std=c.d_model ** -0.5)
        elif isinstance(module, nn.RMSNorm):
            nn.init.ones_(module.weight)
        elif module is self.embed:
            nn.init.normal_(module.weight, std=1.0)
        elif module is self.lm_head:
            # Not Mesh TF's std 1.0: over the unit-RMS final hidden state that gives logits of std
            # sqrt(d_model) and a first loss far above log(vocab) (19 nats at vocab 8,192, d_model 128),
            # which AdamW spends hundreds of steps undoing. d_model**-0.5 starts at ~log(vocab).
            nn.init.normal_(module.weight, std=self.config.d_model ** -0.5)

    def encode(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.encoder(self.embed(input_ids), attention_mask)

    def start_cache(self, encoder_out: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> DecoderCache:
        return self.decoder.start_cache(encoder_out, attention_mask)

    def decode(self, decoder_input_ids: torch.Tensor, cache: DecoderCache,
               decoder_attention_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, DecoderCache]:
        """Logits for new decoder tokens after those in `cache`; returns the cache grown by them."""
        hidden, cache = self.decoder(self.embed(decoder_input_ids), cache, decoder_attention_mask)
        if self.lm_head is None:
            return F.linear(hidden * self.config.d_model ** -0.5, self.embed.weight), cache
        return self.lm_head(hidden), cache

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                decoder_input_ids: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                decoder_attention_mask: Optional[torch.Tensor] = None) -> Seq2SeqLMOutput:
        """input_ids/attention_mask: encoder tokens and padding (1 = real token); labels: the targets,
        IGNORE_INDEX where no loss is wanted; decoder inputs default to the labels shifted right."""
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("T5.forward needs labels or decoder_input_ids")
            decoder_input_ids = shift_right(labels)
        encoder_out = self.encode(input_ids, attention_mask)
        cache = self.decoder.start_cache(encoder_out, attention_mask, precompute=False)
        logits, _ = self.decode(decoder_input_ids, cache, decoder_attention_mask)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.reshape(-1),
                                   ignore_index=IGNORE_INDEX)
        return Seq2SeqLMOutput(logits, loss, labels)

    def layer_of(self, param_name: str) -> int:
        """Depth of a parameter: 0 the shared embedding and both relative-position tables, 1..n_layer the
        encoder blocks (block i at i + 1) and the decoder blocks (rescaled onto the same 1..n_layer),
        n_layer + 1 both final norms and an untied LM head.

        The two stacks sit side by side, not one above the other: each starts from the shared token
        embedding (the decoder's first block reads target-token embeddings, not encoder features) and
        each ends at the output (the encoder's top feeds every decoder block through cross-attention).
        So a block's depth is its height in its own stack; decoder block j of D sits at ceil((j + 1) *
        n_layer / D), which is j + 1 when the stacks are equally deep (T5's usual shape). Stacked
        numbering would put the encoder's first block decay**(n_layer + D) below the top and all but
        freeze it. The position tables are position embeddings (GPT-2's wpe is depth 0 too), though
        every block of their stack reads them."""
        n_layer, n_decoder = self.config.n_layer, t5_sizes(self.config)[2]
        first, _, rest = param_name.partition(".")
        if first == "embed":
            return 0
        if first == "lm_head":
            return n_layer + 1
        if first == "encoder":
            return layer_index(rest, ("position_bias",), ("final_norm",), n_layer)
        if first == "decoder":
            depth = layer_index(rest, ("position_bias",), ("final_norm",), n_decoder)
            return n_layer + 1 if depth > n_decoder else math.ceil(depth * n_layer / n_decoder)
        raise ValueError(f"{param_name!r} is not a parameter of this model")

    def num_parameters(self, exclude_embeddings: bool = True) -> int:
        """Parameter count; the relative position tables excluded by default (lookups, no matmul work)."""
        total = sum(p.numel() for p in self.parameters())
        tables = self.encoder.position_bias.embedding.weight.numel() * 2
        return total - tables if exclude_embeddings else total

    def flops_per_token(self, seq_len: int, target_len: Optional[int] = None) -> float:
        """Training FLOPs per encoder input token, for inputs of seq_len and targets of target_len tokens
        (default seq_len): 6 x the matmul parameters each token passes through, plus attention scores."""
        c = self.config
        target_len = seq_len if target_len is None else target_len
        d_kv, _, n_decoder = t5_sizes(c)
        inner = c.n_head * d_kv
        matmul = lambda module: sum(p.numel() for p in module.parameters() if p.dim() == 2)  # noqa: E731
        encoder = sum(matmul(b) for b in self.encoder.blocks)
        decoder = sum(matmul(b) for b in self.decoder.blocks) + c.vocab_size * c.d_model  # + the LM head
        attention = 12 * inner * (c.n_layer * seq_len ** 2 + n_decoder * (target_len ** 2 + target_len * seq_len))
        return (6 * (encoder * seq_len + decoder * target_len) + attention) / seq_len
