import math

import pytest
import torch

from lmforge.model import GPT, ModelConfig
from lmforge.train.optim import learning_rate, param_groups
from lmforge.config import TrainConfig


def test_lm_head_is_tied_to_token_embeddings():
    model = GPT(ModelConfig(vocab_size=50, n_layer=2, n_head=2, d_model=16, block_size=8))
    assert model.lm_head.weight.data_ptr() == model.wte.weight.data_ptr()


def test_gpt2_initialisation_scales_residual_projections():
    torch.manual_seed(0)
    n_layer = 8
    model = GPT(ModelConfig(vocab_size=64, n_layer=n_layer, n_head=4, d_model=256, block_size=8))
    resid_std = model.blocks[0].mlp.proj.weight.std().item()
    other_std = model.blocks[0].mlp.fc.weight.std().item()
    assert other_std == pytest.approx(0.02, rel=0.05)
    assert resid_std == pytest.approx(0.02 / math.sqrt(2 * n_layer), rel=0.05)


def test_weight_decay_only_on_matrices():
    model = GPT(ModelConfig(vocab_size=50, n_layer=1, n_head=2, d_model=16, block_size=8))
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.dim() == 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    n_params = len({id(p) for p in model.parameters()})
    assert len(decay["params"]) + len(no_decay["params"]) == n_params


def test_schedule_warms_up_then_decays_to_floor():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    lrs = [learning_rate(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert learning_rate(100, cfg) == pytest.approx(1e-4)


def test_loss_falls_when_fitting_a_repeated_sequence():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=20, n_layer=2, n_head=2, d_model=32, block_size=16))
    data = torch.arange(17).remainder(20).repeat(4, 1)
    x, y = data[:, :-1], data[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = model(x, y).loss.item()
    assert first == pytest.approx(math.log(20), rel=0.1)  # a fresh model is near uniform
    for _ in range(60):
        loss = model(x, y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first


def test_sequence_longer_than_block_size_is_refused():
    model = GPT(ModelConfig(vocab_size=20, n_layer=1, n_head=2, d_model=16, block_size=8))
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 9, dtype=torch.long))
