"""train.optimizer=muon: torch's Muon on the hidden matrices, AdamW on the rest, as one resumable optimizer."""

import pytest
import torch
import yaml

from conftest import assert_resume_reproduces, tiny_config_dict
from lmforge.cli import main
from lmforge.config import TrainConfig
from lmforge.model import build_model
from lmforge.model.config import ModelConfig
from lmforge.train.optim import MuonAdamW, build_optimizer, hidden_matrices

SHAPES = dict(n_layer=2, n_head=4, d_model=32, block_size=16, vocab_size=50)


def _names(model, params):
    ids = {id(p) for p in params}
    return {name for name, p in model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("model_config", [
    ModelConfig(family="gpt", **SHAPES),
    ModelConfig(family="gpt", layout="llama", n_kv_head=2, tie_embeddings=False, **SHAPES),
    ModelConfig(family="bert", **SHAPES),
    ModelConfig(family="t5", n_head=4, d_model=32, n_layer=2, vocab_size=50, block_size=16, tie_embeddings=False),
], ids=["gpt2-tied", "llama-untied", "bert", "t5-untied"])
def test_muon_takes_the_hidden_matrices_and_leaves_embeddings_head_and_vectors_to_adamw(model_config):
    model = build_model(model_config)
    hidden = _names(model, hidden_matrices(model))
    assert hidden, "every family has hidden matrices"
    for name, param in model.named_parameters():
        is_projection = any(part in name for part in ("attn.", "mlp.", "attention.", "ffn.", "layer.", "dense"))
        if name in hidden:
            assert param.dim() == 2 and param.shape[0] != 50, name  # never a vocabulary projection
        elif param.dim() == 2 and is_projection and "embed" not in name and "relative" not in name:
            pytest.fail(f"{name} is a hidden matrix left out of Muon")
    # the embeddings (and an untied head) are AdamW's
    embedding_names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}
    assert not any(name.rsplit(".", 1)[0] in embedding_names for name in hidden)
    assert not any("lm_head" in name or name.endswith("out.weight") for name in hidden)  # outputs stay AdamW's


def test_both_halves_step_muon_orthogonally_and_adamw_by_sign():
    torch.manual_seed(0)
    model = build_model(ModelConfig(family="gpt", layout="llama", n_kv_head=2, tie_embeddings=False, **SHAPES))
    lr = 1e-3
    opt = build_optimizer(model, TrainConfig(optimizer="muon", lr=lr, weight_decay=0.0), torch.device("cpu"))
    assert isinstance(opt, MuonAdamW)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    hidden = _names(model, hidden_matrices(model))
    for name, p in model.named_parameters():
        update = (before[name] - p.detach()).double()
        assert update.abs().max() > 0, f"{name} did not move"
        if name in hidden:
            # Newton-Schulz leaves every singular value of the step near 1, times lr x 0.2 x sqrt(max dim)
            singular = torch.linalg.svdvals(update / (lr * 0.2 * max(update.shape) ** 0.5))
            assert 0.5 < singular.min() and singular.max() < 1.5, (name, singular.min(), singular.max())
        else:  # AdamW's first step is lr x sign(grad), whatever the gradient's size
            assert torch.allclose(update.abs(), torch.full_like(update, lr), rtol=1e-3), name


def test_a_muon_run_resumes_bit_identically(tmp_path, corpus_file):
    config = tiny_config_dict(corpus_file, steps=12, eval_every=6, checkpoint_every=6, sample_tokens=0,
                              optimizer="muon")
    config["model"].update(layout="llama", n_kv_head=1)
    path = tmp_path / "muon.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["pretrain", "--config", str(path), "--out", str(tmp_path / "full")]) == 0
    assert_resume_reproduces(tmp_path / "full", tmp_path / "resumed", died_after=6, last=12)


def test_ddp_muon_on_two_processes_matches_one_process(tmp_path, corpus_file):
    from test_distributed import assert_pretrain_matches_on_two_processes

    config = tiny_config_dict(corpus_file, steps=6, eval_every=6, checkpoint_every=6, sample_tokens=0,
                              optimizer="muon")
    assert_pretrain_matches_on_two_processes(config, tmp_path)


def test_muon_with_fsdp_is_refused_naming_the_keys(tmp_path, corpus_file, capsys):
    path = tmp_path / "muon.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(corpus_file, optimizer="muon")))
    assert main(["pretrain", "--config", str(path), "--out", str(tmp_path / "run"),
                 "--set", "parallel.strategy=fsdp"]) == 2
    err = capsys.readouterr().err
    assert "train.optimizer=muon" in err and "parallel.strategy=fsdp" in err
    assert not (tmp_path / "run").exists()


def test_our_muon_in_bf16_steps_as_torch_muon_and_fp32_newton_schulz_is_close():
    """lmforge's Muon exists for its Newton-Schulz dtype; in bf16 it must be torch.optim.Muon's update."""
    from lmforge.train.muon import Muon

    torch.manual_seed(0)
    weights = [torch.randn(24, 40), torch.randn(64, 16)]
    grads = [[torch.randn_like(w) for w in weights] for _ in range(3)]

    def run(make):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        opt = make(params)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
        return [p.detach() for p in params]

    theirs = run(lambda ps: torch.optim.Muon(ps, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"))
    ours = run(lambda ps: Muon(ps, lr=0.02, weight_decay=0.1, ns_dtype=torch.bfloat16))
    fp32 = run(lambda ps: Muon(ps, lr=0.02, weight_decay=0.1, ns_dtype=torch.float32))
    for a, b, c, w in zip(theirs, ours, fp32, weights):
        assert torch.equal(a, b)
        moved = (a - w).abs().max()
        assert (c - a).abs().max() < 0.05 * moved  # bf16 rounding only: the fp32 step is the same step
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(3))])
