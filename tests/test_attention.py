"""Our attention against a naive float64 implementation of softmax(QK^T / sqrt(d)) V."""

import math

import torch

from lmforge.model import ModelConfig
from lmforge.model.layers import SelfAttention


def naive_attention(layer: SelfAttention, x: torch.Tensor, causal: bool,
                    key_mask: torch.Tensor | None = None) -> torch.Tensor:
    b, t, c = x.shape
    h = layer.n_head
    w, bias = layer.qkv.weight.double(), layer.qkv.bias.double()
    qkv = x.double() @ w.T + bias
    q, k, v = qkv.split(c, dim=2)
    q, k, v = (z.view(b, t, h, c // h).transpose(1, 2) for z in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(c // h)
    if causal:
        future = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
        scores = scores.masked_fill(future, float("-inf"))
    if key_mask is not None:  # (b, t) True for real tokens: padding keys get no weight
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, c)
    return y @ layer.proj.weight.double().T + layer.proj.bias.double()


def _layer(causal: bool) -> SelfAttention:
    torch.manual_seed(0)
    layer = SelfAttention(ModelConfig(n_head=4, d_model=32), causal=causal)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return layer.eval()


def test_causal_attention_matches_naive_float64():
    layer = _layer(causal=True)
    x = torch.randn(3, 11, 32)
    ours, _ = layer(x)
    ref = naive_attention(layer, x, causal=True)
    assert (ours.double() - ref).abs().max().item() < 1e-5


def test_causal_mask_hides_the_future():
    layer = _layer(causal=True)
    x = torch.randn(1, 8, 32)
    changed = x.clone()
    changed[:, 5:] += 10.0  # perturb only positions 5..7
    before, _ = layer(x)
    after, _ = layer(changed)
    assert torch.allclose(before[:, :5], after[:, :5], atol=1e-6)
    assert not torch.allclose(before[:, 5:], after[:, 5:], atol=1e-3)


def test_bidirectional_attention_matches_naive_float64():
    layer = _layer(causal=False)
    x = torch.randn(2, 9, 32)
    ours, _ = layer(x)
    assert (ours.double() - naive_attention(layer, x, causal=False)).abs().max().item() < 1e-5


def test_cached_attention_with_several_new_queries_equals_full():
    layer = _layer(causal=True)
    x = torch.randn(2, 10, 32)
    full, _ = layer(x)
    first, cache = layer(x[:, :6])
    rest, _ = layer(x[:, 6:], past=cache)  # four new queries against six cached keys
    assert torch.allclose(torch.cat([first, rest], dim=1), full, atol=1e-5)


def test_padding_mask_matches_naive_float64_and_ignores_padding():
    layer = _layer(causal=False)
    x = torch.randn(2, 9, 32)
    real = torch.ones(2, 9, dtype=torch.bool)
    real[0, 6:] = False  # the first sequence has 3 padding positions
    ours, _ = layer(x, key_mask=real[:, None, None, :])
    ref = naive_attention(layer, x, causal=False, key_mask=real)
    assert (ours.double() - ref).abs().max().item() < 1e-5
    changed = x.clone()
    changed[0, 6:] = 100.0  # whatever sits in the padding does not reach the real positions
    again, _ = layer(changed, key_mask=real[:, None, None, :])
    assert torch.allclose(ours[0, :6], again[0, :6], atol=1e-6)
