"""The T5 encoder-decoder and its decoding, checked against float64 reference math and their own invariants."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmforge.data.objectives.span import SpanVocab, span_corruption, span_lengths
from lmforge.errors import LmforgeError
from lmforge.infer.seq2seq import generate_seq2seq
from lmforge.model import ModelConfig, build_model
from lmforge.model.t5 import IGNORE_INDEX, T5, relative_position_bucket, shift_right


def tiny(**overrides) -> ModelConfig:
    fields = dict(family="t5", vocab_size=64, d_model=32, n_head=4, d_kv=6, d_ff=40, n_layer=2, n_decoder_layer=3,
                  dropout=0.0, relative_attention_num_buckets=8, relative_attention_max_distance=20)
    fields.update(overrides)
    config = ModelConfig(**fields)
    config.validate()
    return config


def model_for(seed: int = 0, **overrides) -> T5:
    torch.manual_seed(seed)
    return build_model(tiny(**overrides)).eval()


def reference_bucket(relative: int, bidirectional: bool, num_buckets: int, max_distance: int) -> int:
    """The bucketing rule of the T5 paper / Mesh TensorFlow, in plain Python float64 arithmetic."""
    bucket = 0
    if bidirectional:
        num_buckets //= 2
        if relative > 0:
            bucket = num_buckets
        distance = abs(relative)
    else:
        distance = max(-relative, 0)
    exact = num_buckets // 2
    if distance < exact:
        return bucket + distance
    log_part = exact + int(math.log(distance / exact) / math.log(max_distance / exact) * (num_buckets - exact))
    return bucket + min(log_part, num_buckets - 1)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20), (64, 256)])
def test_relative_position_buckets_follow_the_rule(bidirectional, num_buckets, max_distance):
    relative = torch.arange(-600, 601)
    ours = relative_position_bucket(relative, bidirectional, num_buckets, max_distance).tolist()
    expected = [reference_bucket(r, bidirectional, num_buckets, max_distance) for r in relative.tolist()]
    assert ours == expected


def naive_t5_logits(model: T5, ids: torch.Tensor, mask: torch.Tensor, dec: torch.Tensor) -> torch.Tensor:
    """The whole forward pass written out in float64 with explicit softmax(q k^T + bias) v (no SDPA)."""
    c = model.config
    p = {k: v.double() for k, v in model.state_dict().items()}
    rms = lambda x, w: w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + c.layer_norm_eps)  # noqa: E731

    def attend(prefix, x, memory, bias):
        heads = lambda t: t.view(t.shape[0], t.shape[1], c.n_head, -1).transpose(1, 2)  # noqa: E731
        q, k, v = heads(x @ p[prefix + "q.weight"].T), heads(memory @ p[prefix + "k.weight"].T), \
            heads(memory @ p[prefix + "v.weight"].T)
        weights = torch.softmax(q @ k.transpose(-1, -2) + bias, dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        return out @ p[prefix + "o.weight"].T

    def ffn(prefix, x):
        gate = F.gelu(x @ p[prefix + "wi_0.weight"].T, approximate="tanh")
        return (gate * (x @ p[prefix + "wi_1.weight"].T)) @ p[prefix + "wo.weight"].T

    def bias(table, q_len, k_len, bidirectional):
        rel = torch.arange(k_len)[None, :] - torch.arange(q_len)[:, None]
        buckets = [[reference_bucket(r, bidirectional, c.relative_attention_num_buckets,
                                     c.relative_attention_max_distance) for r in row] for row in rel.tolist()]
        return p[table][torch.tensor(buckets)].permute(2, 0, 1)[None]

    neg = -1e30
    x = p["embed.weight"][ids]
    enc_bias = bias("encoder.position_bias.embedding.weight", ids.shape[1], ids.shape[1], True)
    enc_bias = enc_bias + (1 - mask.double())[:, None, None, :] * neg
    for i in range(c.n_layer):
        b = f"encoder.blocks.{i}."
        x = x + attend(b + "attn.", rms(x, p[b + "attn_norm.weight"]), rms(x, p[b + "attn_norm.weight"]), enc_bias)
        x = x + ffn(b + "ffn.", rms(x, p[b + "ffn_norm.weight"]))
    memory = rms(x, p["encoder.final_norm.weight"])
    y = p["embed.weight"][dec]
    causal = torch.ones(dec.shape[1], dec.shape[1]).tril()
    dec_bias = bias("decoder.position_bias.embedding.weight", dec.shape[1], dec.shape[1], False) + (1 - causal) * neg
    cross_bias = (1 - mask.double())[:, None, None, :] * neg
    for i in range(c.n_decoder_layer):
        b = f"decoder.blocks.{i}."
        h = rms(y, p[b + "self_attn_norm.weight"])
        y = y + attend(b + "self_attn.", h, h, dec_bias)
        y = y + attend(b + "cross_attn.", rms(y, p[b + "cross_attn_norm.weight"]), memory, cross_bias)
        y = y + ffn(b + "ffn.", rms(y, p[b + "ffn_norm.weight"]))
    return rms(y, p["decoder.final_norm.weight"]) @ p["lm_head.weight"].T


def test_forward_matches_float64_reference_on_a_padded_batch():
    model = model_for()
    ids = torch.randint(3, 64, (3, 17))
    mask = torch.ones(3, 17, dtype=torch.long)
    mask[1, 11:] = 0
    mask[2, 4:] = 0
    dec = torch.randint(3, 64, (3, 9))
    ours = model(ids, mask, decoder_input_ids=dec).logits.double()
    assert torch.allclose(ours, naive_t5_logits(model, ids, mask, dec), atol=1e-4, rtol=1e-4)


def test_padding_does_not_change_the_real_rows():
    model = model_for(1)
    ids = torch.randint(3, 64, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0
    labels = torch.randint(3, 64, (2, 6))
    padded = model(ids, mask, labels=labels).logits
    alone = model(ids[1:, :7], labels=labels[1:]).logits
    assert torch.allclose(padded[1], alone[0], atol=1e-5)


def test_decoder_is_causal():
    model = model_for(2)
    ids = torch.randint(3, 64, (2, 10))
    dec = torch.randint(3, 64, (2, 8))
    changed = dec.clone()
    changed[:, 5:] = torch.randint(3, 64, (2, 3))
    a = model(ids, decoder_input_ids=dec).logits
    b = model(ids, decoder_input_ids=changed).logits
    assert torch.allclose(a[:, :5], b[:, :5], atol=1e-6) and not torch.allclose(a[:, 5:], b[:, 5:])


def test_loss_is_cross_entropy_over_target_tokens_with_labels_shifted_right():
    model = model_for(3)
    ids = torch.randint(3, 64, (2, 10))
    labels = torch.randint(3, 64, (2, 7))
    labels[1, 4:] = IGNORE_INDEX
    assert shift_right(labels).tolist() == [[0] + labels[0, :-1].tolist(), [0] + labels[1, :4].tolist() + [0, 0]]
    out = model(ids, labels=labels)
    logits = model(ids, decoder_input_ids=shift_right(labels)).logits.double()
    keep = labels != IGNORE_INDEX
    expected = -torch.log_softmax(logits, -1)[keep].gather(1, labels[keep][:, None]).mean()
    assert torch.allclose(out.loss.double(), expected, atol=1e-5)
    sums = out.eval_sums()
    assert sums["loss"][1] == 11 and sums["token_acc"][1] == 11


def test_tied_head_scales_the_decoder_output_like_t5_1_0():
    model = model_for(4, tie_embeddings=True, ffn="relu")
    assert model.lm_head is None and "lm_head.weight" not in model.state_dict()
    ids, dec = torch.randint(3, 64, (1, 6)), torch.randint(3, 64, (1, 4))
    encoder_out = model.encode(ids)
    hidden, _ = model.decoder(model.embed(dec), model.start_cache(encoder_out))
    expected = hidden @ model.embed.weight.T / math.sqrt(32)
    assert torch.allclose(model(ids, decoder_input_ids=dec).logits, expected, atol=1e-5)


def test_span_corruption_batches_train_the_model():
    """A few optimizer steps on one corrupted batch: the loss falls well below its start."""
    vocab = SpanVocab(eos=1, pad=0, sentinel_start=63, num_sentinels=10)
    lengths = span_lengths(32)
    rng = np.random.default_rng(0)
    ex = span_corruption(rng.integers(3, 50, size=(8, lengths.tokens)), rng, vocab)
    model = model_for(5).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = dict(input_ids=torch.from_numpy(ex.input_ids), attention_mask=torch.from_numpy(ex.attention_mask),
                 labels=torch.from_numpy(ex.labels))
    losses = []
    for _ in range(40):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("overrides,message", [
    (dict(d_kv=-1), "model.d_kv must be >= 0"),
    (dict(n_head=5, d_kv=0), "must divide model.d_model"),
    (dict(norm="post"), "do not apply to t5"),
    (dict(relative_attention_num_buckets=2), "relative_attention_num_buckets must be >= 4"),
    (dict(relative_attention_max_distance=4), "relative_attention_max_distance must exceed"),
])
def test_bad_t5_config_is_a_one_line_error(overrides, message):
    with pytest.raises(LmforgeError, match=message) as info:
        tiny(**overrides)
    assert "\n" not in str(info.value)


def test_ffn_kind_is_checked_when_loading_a_config():
    from lmforge.config import from_dict

    with pytest.raises(LmforgeError, match="model.ffn"):
        from_dict(ModelConfig, {"family": "t5", "ffn": "swiglu"}, "model")


# --- decoding -------------------------------------------------------------------------------------


def make_eos_likely(model: T5, batch: int, scale: float, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tilt a random T5's </s> logit so that decoded hypotheses end at different lengths; returns a padded
    batch of encoder inputs (ids, mask) to decode."""
    ids = torch.randint(3, vocab, (batch, 11), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[batch - 2, 3:] = 0
    with torch.no_grad():
        model.lm_head.weight.mul_(0.3)
        hidden, _ = model.decoder(model.embed(torch.zeros(batch, 4, dtype=torch.long)),
                                  model.start_cache(model.encode(ids, mask), mask))
        model.lm_head.weight[1] += scale * hidden.mean((0, 1))
    return ids, mask


def decoding_model() -> tuple[T5, torch.Tensor, torch.Tensor]:
    """A random T5 whose </s> is likely enough that hypotheses end at different lengths."""
    model = model_for(6, n_decoder_layer=2)
    ids, mask = make_eos_likely(model, 5, 0.1, 64)
    return model, ids, mask


@pytest.mark.parametrize("settings", [
    dict(), dict(num_beams=3), dict(num_beams=4, length_penalty=0.5, early_stopping=True),
    dict(temperature=0.8, top_k=10, top_p=0.9),
])
def test_cached_decoding_equals_uncached(settings):
    model, ids, mask = decoding_model()
    outputs = []
    for use_cache in (True, False):
        generator = torch.Generator().manual_seed(0)
        outputs.append(generate_seq2seq(model, ids, mask, max_new_tokens=12, use_cache=use_cache,
                                        generator=generator, **settings))
    assert torch.equal(outputs[0], outputs[1])


def test_beam_width_one_equals_greedy():
    from lmforge.infer.seq2seq import beam_search

    model, ids, mask = decoding_model()
    greedy = generate_seq2seq(model, ids, mask, max_new_tokens=12)
    beam = beam_search(model, ids, mask, max_new_tokens=12, num_beams=1, early_stopping=True)
    assert torch.equal(greedy[:, : beam.shape[1]], beam) and (greedy[:, beam.shape[1]:] == 0).all()
    assert (greedy == 1).any()  # some rows end with </s> before the limit, so stopping is exercised


def test_greedy_decodes_the_argmax_of_the_full_forward_pass():
    model, ids, mask = decoding_model()
    out = generate_seq2seq(model, ids, mask, max_new_tokens=6)
    logits = model(ids, mask, decoder_input_ids=out[:, :-1]).logits
    finished = torch.cumsum(out[:, :-1] == 1, dim=1) > 0  # after </s> a row only pads
    expected = logits.argmax(-1).masked_fill(finished, 0)
    assert torch.equal(out[:, 1:], expected)


def test_top_k_one_sampling_is_greedy():
    model, ids, mask = decoding_model()
    greedy = generate_seq2seq(model, ids, mask, max_new_tokens=10)
    sampled = generate_seq2seq(model, ids, mask, max_new_tokens=10, temperature=1.3, top_k=1,
                               generator=torch.Generator().manual_seed(1))
    assert torch.equal(greedy, sampled)


def test_bad_decoding_settings_raise():
    model, ids, mask = decoding_model()
    for settings, message in ((dict(max_new_tokens=0), "max_new_tokens"), (dict(num_beams=0), "num_beams"),
                              (dict(temperature=-1.0), "temperature")):
        with pytest.raises(LmforgeError, match=message):
            generate_seq2seq(model, ids, mask, **settings)


# --- layer-wise learning rates ----------------------------------------------------------------------

# decoder block j of D sits at ceil((j + 1) * n_layer / D): hand-computed for the shapes tested
DECODER_DEPTHS = {(2, 3): [1, 2, 2], (2, 2): [1, 2], (3, 2): [2, 3], (4, 1): [4]}


@pytest.mark.parametrize("n_layer,n_decoder", list(DECODER_DEPTHS))
@pytest.mark.parametrize("tied", [False, True])
def test_layer_of_places_encoder_and_decoder_blocks_side_by_side(n_layer, n_decoder, tied):
    model = model_for(0, n_layer=n_layer, n_decoder_layer=n_decoder, tie_embeddings=tied,
                      ffn="relu" if tied else "gated-gelu")
    top = n_layer + 1
    for name, _ in model.named_parameters():
        parts = name.split(".")
        if parts[0] == "embed" or parts[1:2] == ["position_bias"]:
            want = 0
        elif parts[0] == "lm_head" or parts[1:2] == ["final_norm"]:
            want = top
        elif parts[0] == "encoder":
            want = int(parts[2]) + 1
        else:
            want = DECODER_DEPTHS[n_layer, n_decoder][int(parts[2])]
        assert model.layer_of(name) == want, name
    assert ("lm_head.weight" in dict(model.named_parameters())) is not tied
    with pytest.raises(ValueError, match="not a parameter"):
        model.layer_of("decoder.nonsense.weight")


def test_layerwise_learning_rates_of_a_t5_run_decay_from_the_top_block_down():
    from lmforge.tasks.config import FinetuneConfig
    from lmforge.tasks.finetune import param_groups
    from lmforge.tasks.models import build_task_model

    model = build_task_model(tiny(n_layer=2, n_decoder_layer=3), "seq2seq", 0, 0.0)
    groups = param_groups(model, FinetuneConfig(lr=1e-3, layer_lr_decay=0.5, weight_decay=0.1))
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    expected = {  # the documented rates: lr * decay ** (n_layer - depth), the top (norms, head) at lr
        "embed.weight": 0.25, "encoder.position_bias.embedding.weight": 0.25,
        "decoder.position_bias.embedding.weight": 0.25, "encoder.blocks.0": 0.5, "encoder.blocks.1": 1.0,
        "decoder.blocks.0": 0.5, "decoder.blocks.1": 1.0, "decoder.blocks.2": 1.0, "encoder.final_norm": 1.0,
        "decoder.final_norm": 1.0, "lm_head.weight": 1.0}
    for name, param in model.named_parameters():
        key = next(k for k in expected if name == k or name.startswith(k + "."))
        assert lr_of[id(param)] == (pytest.approx(1e-3 * expected[key]), 0.1 if param.dim() >= 2 else 0.0), name
    assert len(lr_of) == len({id(p) for p in model.parameters()})
    assert sorted({round(g["lr"] / 1e-3, 6) for g in groups}) == [0.25, 0.5, 1.0]


def test_an_adafactor_fine_tune_keeps_the_layerwise_groups():
    from lmforge.tasks.config import FinetuneConfig
    from lmforge.tasks.finetune import _optimizer, param_groups
    from lmforge.tasks.models import build_task_model

    model = build_task_model(tiny(n_layer=2, n_decoder_layer=3), "seq2seq", 0, 0.0)
    ft = FinetuneConfig(optimizer="adafactor", lr=1e-3, layer_lr_decay=0.5, weight_decay=0.1)
    optimizer = _optimizer(model, ft, torch.device("cpu"))
    assert isinstance(optimizer, torch.optim.Adafactor)
    expected = [(g["lr"], g["weight_decay"], len(g["params"])) for g in param_groups(model, ft)]
    assert [(g["lr"], g["weight_decay"], len(g["params"])) for g in optimizer.param_groups] == expected


def test_flops_per_token_counts_encoder_and_decoder_matmuls():
    model = model_for(7)
    c = model.config
    inner = c.n_head * c.d_kv
    per_enc_block = 4 * c.d_model * inner + 3 * c.d_model * c.d_ff
    per_dec_block = 8 * c.d_model * inner + 3 * c.d_model * c.d_ff
    seq, tgt = 20, 6
    expected = (6 * (c.n_layer * per_enc_block * seq + (c.n_decoder_layer * per_dec_block + c.vocab_size * c.d_model)
                     * tgt) + 12 * inner * (c.n_layer * seq * seq + c.n_decoder_layer * (tgt * tgt + tgt * seq))) / seq
    assert model.flops_per_token(seq, tgt) == pytest.approx(expected)


def test_fill_spans_puts_written_spans_back_into_the_input():
    from lmforge.infer.seq2seq import fill_spans

    vocab = SpanVocab(eos=1, pad=0, sentinel_start=63, num_sentinels=10)
    rng = np.random.default_rng(8)
    rows = rng.integers(3, 50, size=(20, 60))
    ex = span_corruption(rows, rng, vocab)
    for row, inputs, labels in zip(rows, ex.input_ids, ex.labels):  # a perfect model writes the targets
        assert fill_spans(inputs.tolist(), [0] + labels.tolist() + [1, 1], vocab) == row.tolist()
    # a span the model did not write is left empty; text after </s> is not read
    assert fill_spans([5, 63, 7, 62, 1], [0, 63, 9, 9, 1, 62, 4], vocab) == [5, 9, 9, 7]


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20)])
def test_alibi_start_of_the_position_tables_is_the_slope_times_each_buckets_mean_distance(
        bidirectional, num_buckets, max_distance):
    n_head = 4
    model = model_for(relative_attention_num_buckets=num_buckets, relative_attention_max_distance=max_distance,
                      n_head=n_head)
    stack = model.encoder if bidirectional else model.decoder
    table = stack.position_bias.embedding.weight.detach().double()
    slopes = [2.0 ** (-8.0 * (h + 1) / n_head) for h in range(n_head)]
    covered: dict[int, list[int]] = {}
    for relative in range(-max_distance, max_distance + 1):
        if bidirectional or relative <= 0:
            covered.setdefault(reference_bucket(relative, bidirectional, num_buckets, max_distance), []).append(
                abs(relative))
    for bucket in range(num_buckets):
        distances = covered.get(bucket, [0])
        for head in range(n_head):
            assert table[bucket, head].item() == pytest.approx(-slopes[head] * sum(distances) / len(distances),
                                                               rel=1e-6, abs=1e-7)
    # nearer keys are never penalised more than farther ones, in every head
    bias = stack.position_bias(1, 2 * max_distance + 1, query_offset=max_distance)[0, :, 0]
    nearer_first = bias[:, :max_distance + 1].flip(-1)  # keys before the query, nearest first
    assert bool((nearer_first[:, :-1] >= nearer_first[:, 1:] - 1e-6).all())


def test_normal_start_of_the_position_tables_is_mesh_tf_s():
    model = model_for(relative_attention_init="normal", d_model=512, relative_attention_num_buckets=64,
                      relative_attention_max_distance=128)
    table = model.encoder.position_bias.embedding.weight.detach()
    assert table.std().item() == pytest.approx(512 ** -0.5, rel=0.15)
