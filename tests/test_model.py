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


def _named(model):
    return {name for name, _ in model.named_parameters(remove_duplicate=False)}


def test_layer_of_places_every_parameter_by_its_module():
    from lmforge.model import build_model

    n = 3
    expected_top = {"ln_f.weight", "ln_f.bias"}
    for config in (ModelConfig(vocab_size=50, n_layer=n, n_head=2, d_model=16, block_size=8),
                   ModelConfig(vocab_size=50, n_layer=n, n_head=2, d_model=16, block_size=8, layout="llama",
                               tie_embeddings=False)):
        gpt = GPT(config)
        for name in _named(gpt):
            want = (0 if name.startswith(("wte.", "wpe.")) else n + 1 if name.startswith(("ln_f.", "lm_head."))
                    else int(name.split(".")[1]) + 1)
            assert gpt.layer_of(name) == want, name
        assert {name for name in _named(gpt) if gpt.layer_of(name) == n + 1} == (
            expected_top | {"lm_head.weight"} if config.layout == "gpt2" else {"ln_f.weight", "lm_head.weight"})
        assert gpt.layer_of("blocks.2.attn.qkv.weight") == 3 and gpt.layer_of("blocks.0.ln_1.weight") == 1
    bert = build_model(ModelConfig(family="bert", vocab_size=50, n_layer=n, n_head=2, d_model=16, block_size=8))
    depths = {name: bert.layer_of(name) for name in _named(bert)}
    assert {k for k, v in depths.items() if v == 0} == {"bert.wte.weight", "bert.wpe.weight", "bert.wtt.weight",
                                                        "bert.ln_emb.weight", "bert.ln_emb.bias"}
    assert {k.split(".")[0] if not k.startswith("bert.") else k.split(".")[1]
            for k, v in depths.items() if v == n + 1} == {"pooler", "mlm", "nsp"}
    assert sorted({v for v in depths.values()}) == [0, 1, 2, 3, 4]
    assert bert.bert.layer_of("blocks.1.mlp.fc.weight") == 2
    with pytest.raises(ValueError, match="not a parameter"):
        bert.layer_of("bert.nonsense.weight")


@pytest.mark.parametrize("family", ["gpt", "bert"])
def test_layerwise_learning_rates_decay_from_the_top_block_down(family):
    from lmforge.tasks.config import FinetuneConfig
    from lmforge.tasks.finetune import param_groups
    from lmforge.tasks.models import build_task_model

    config = ModelConfig(family=family, vocab_size=50, n_layer=3, n_head=2, d_model=16, block_size=8)
    model = build_task_model(config, "classification", 2, 0.0)
    groups = param_groups(model, FinetuneConfig(lr=1e-3, head_lr=5e-3, layer_lr_decay=0.5, weight_decay=0.1))
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    embeddings = ("wte", "wpe", "wtt", "ln_emb")
    for name, param in model.named_parameters():
        module = name.split(".")[1]
        if name.startswith("head."):
            lr = 5e-3
        elif module in embeddings:
            lr = 1e-3 * 0.5 ** 3  # below block 1: one more decay than it
        elif module == "blocks":
            lr = 1e-3 * 0.5 ** (3 - (int(name.split(".")[2]) + 1))
        else:  # final norm, pooler: at the top block's rate
            lr = 1e-3
        assert lr_of[id(param)] == (pytest.approx(lr), 0.1 if param.dim() >= 2 else 0.0), name
    assert len(lr_of) == len({id(p) for p in model.parameters()})
    assert all(g["peak_lr"] == g["lr"] for g in groups)
