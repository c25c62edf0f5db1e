"""The llama layout of the GPT family: rotary embeddings, grouped-query attention, KV-cache generation,
config validation and a pretraining run through the CLI. (Export / import: tests/test_interop_hf.py.)"""

import math

import pytest
import torch
import yaml

from conftest import incremental_logits_error, tiny_config_dict
from lmforge.cli import main
from lmforge.config import load_config
from lmforge.errors import LmforgeError
from lmforge.infer.generate import generate
from lmforge.model import GPT, ModelConfig
from lmforge.model.layers import SelfAttention, apply_rotary, rotary_tables


def _llama(**kw) -> ModelConfig:
    return ModelConfig(**{"layout": "llama", "vocab_size": 40, "n_layer": 2, "n_head": 4, "d_model": 32,
                          "block_size": 24, **kw})


def _rotate_float64(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Reference rotary embedding: each pair (x[j], x[j + d/2]) turned by the angle p * theta**(-2j/d)."""
    x = x.double()
    d = x.shape[-1]
    out = torch.empty_like(x)
    for j in range(d // 2):
        angle = positions.double() * theta ** (-2.0 * j / d)
        a, b = x[..., j], x[..., j + d // 2]
        out[..., j] = a * torch.cos(angle) - b * torch.sin(angle)
        out[..., j + d // 2] = a * torch.sin(angle) + b * torch.cos(angle)
    return out


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_rotary_embedding_matches_a_float64_rotation(theta):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 50, 16)
    positions = torch.arange(7, 57)
    ours = apply_rotary(x, rotary_tables(positions, 16, theta))
    assert (ours.double() - _rotate_float64(x, positions, theta)).abs().max().item() < 1e-4
    # a rotation keeps lengths, and q.k depends only on the distance between the positions
    assert torch.allclose(ours.norm(dim=-1), x.norm(dim=-1), atol=1e-4)
    q, k = torch.randn(16), torch.randn(16)

    def dot(pq, pk):
        rq = apply_rotary(q.view(1, 1, 1, 16), rotary_tables(torch.tensor([pq]), 16, theta))
        rk = apply_rotary(k.view(1, 1, 1, 16), rotary_tables(torch.tensor([pk]), 16, theta))
        return float((rq * rk).sum())

    assert dot(10, 3) == pytest.approx(dot(40, 33), abs=1e-4)
    assert dot(10, 3) != pytest.approx(dot(10, 4), abs=1e-3)


def test_rotary_embedding_matches_transformers_llama():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(1)
    q, k = torch.randn(2, 4, 30, 16), torch.randn(2, 4, 30, 16)
    positions = torch.arange(30)[None].expand(2, -1)
    cos, sin = llama.LlamaRotaryEmbedding(config)(q, positions)
    theirs_q, theirs_k = llama.apply_rotary_pos_emb(q, k, cos, sin)
    rotary = rotary_tables(torch.arange(30), 16, 10000.0)
    assert torch.allclose(apply_rotary(q, rotary), theirs_q, atol=1e-6)
    assert torch.allclose(apply_rotary(k, rotary), theirs_k, atol=1e-6)


def _naive_attention(layer: SelfAttention, x: torch.Tensor, rotary) -> torch.Tensor:
    """float64 causal softmax(QK^T / sqrt(d)) V, each key/value head repeated for its group of query heads."""
    b, t, _ = x.shape
    h, kv, d = layer.n_head, layer.n_kv_head, layer.head_dim
    qkv = x.double() @ layer.qkv.weight.double().T
    q, k, v = qkv.split([h * d, kv * d, kv * d], dim=2)
    q = q.view(b, t, h, d).transpose(1, 2)
    k, v = (z.view(b, t, kv, d).transpose(1, 2).repeat_interleave(h // kv, dim=1) for z in (k, v))
    positions = torch.arange(t)
    q, k = _rotate_float64(q, positions, 10000.0), _rotate_float64(k, positions, 10000.0)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    scores = scores.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, h * d)
    return y @ layer.proj.weight.double().T


def _attention(n_kv_head: int) -> SelfAttention:
    torch.manual_seed(0)
    layer = SelfAttention(_llama(n_kv_head=n_kv_head), causal=True)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return layer.eval()


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_grouped_query_attention_matches_naive_float64(n_kv_head):
    layer = _attention(n_kv_head)
    x = torch.randn(2, 11, 32)
    ours, (k, _) = layer(x, rotary=rotary_tables(torch.arange(11), 8, 10000.0))
    assert k.shape == (2, n_kv_head, 11, 8)  # the cache holds only the key/value heads
    assert (ours.double() - _naive_attention(layer, x, rotary=True)).abs().max().item() < 1e-5


def test_gqa_with_n_kv_head_equal_n_head_is_multi_head_attention():
    """n_kv_head = n_head (or 0) is plain MHA; and a GQA layer equals the MHA layer whose key and value
    heads are its own, copied to every query head of their group."""
    rotary = rotary_tables(torch.arange(9), 8, 10000.0)
    x = torch.randn(2, 9, 32)
    mha = _attention(0)
    same = SelfAttention(_llama(n_kv_head=4), causal=True).eval()
    same.load_state_dict(mha.state_dict())
    assert torch.equal(mha(x, rotary=rotary)[0], same(x, rotary=rotary)[0])

    gqa = _attention(2)
    q, k, v = gqa.qkv.weight.split([32, 16, 16])
    expand = lambda w: w.view(2, 1, 8, 32).expand(2, 2, 8, 32).reshape(32, 32)  # kv head i -> query heads 2i, 2i+1
    with torch.no_grad():
        mha.qkv.weight.copy_(torch.cat([q, expand(k), expand(v)]))
        mha.proj.weight.copy_(gqa.proj.weight)
    assert torch.allclose(gqa(x, rotary=rotary)[0], mha(x, rotary=rotary)[0], atol=1e-5)


def _model(**kw) -> GPT:
    torch.manual_seed(0)
    model = GPT(_llama(**kw))
    with torch.no_grad():
        for p in model.parameters():  # weights far from the init, so the distribution is far from flat
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


@pytest.mark.parametrize("kw", [{}, {"n_kv_head": 2, "tie_embeddings": False, "qk_norm": True}])
def test_kv_cache_logits_and_generation_equal_recomputation(kw):
    model = _model(**kw)
    assert incremental_logits_error(model, torch.randint(0, 40, (2, 20))) < 1e-4
    prompt = torch.tensor([[4, 5, 6, 7]])
    for temperature in (0.0, 0.9):
        cached = generate(model, prompt, 30, temperature=temperature, generator=torch.Generator().manual_seed(1))
        plain = generate(model, prompt, 30, temperature=temperature, use_cache=False,
                         generator=torch.Generator().manual_seed(1))
        assert cached.shape == (1, 34)  # past block_size 24: the window slides
        assert torch.equal(cached, plain)


def test_llama_layout_has_no_position_table_or_biases_and_unties_on_request():
    tied, untied = GPT(_llama()), GPT(_llama(tie_embeddings=False, ffn_hidden=48))
    names = set(tied.state_dict())
    assert tied.wpe is None and not any("wpe" in n or n.endswith(".bias") for n in names)
    assert tied.lm_head.weight is tied.wte.weight and untied.lm_head.weight is not untied.wte.weight
    assert tied.blocks[0].mlp.proj.in_features == 128  # 2/3 * 4 * 32 = 85, rounded up to 64s
    assert untied.blocks[0].mlp.proj.in_features == 48
    assert isinstance(tied.ln_f, torch.nn.RMSNorm)


def test_hidden_states_are_the_forward_pass_without_the_head():
    model = _model(n_kv_head=2)
    ids = torch.randint(0, 40, (2, 12))
    hidden = model.hidden_states(ids)
    assert hidden.shape == (2, 12, 32)
    assert torch.allclose(model.lm_head(hidden), model(ids).logits, atol=1e-6)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding: the real positions do not change
    assert torch.allclose(model.hidden_states(ids, attention_mask=mask)[1, :8], hidden[1, :8], atol=1e-5)


@pytest.mark.parametrize("model, message", [
    ({"layout": "llama", "n_head": 4, "n_kv_head": 3}, "model.n_head (4) must be a multiple of model.n_kv_head (3)"),
    ({"layout": "llama", "n_head": 4, "d_model": 12}, "model.d_model / model.n_head = 3 is odd; rotary"),
    ({"n_kv_head": 2}, "model.n_kv_head=2 is a llama-layout key; the gpt2 layout does not take it"),
    ({"qk_norm": True}, "model.qk_norm=True is a llama-layout key"),
    ({"tie_embeddings": False}, "model.tie_embeddings=False is a llama-layout key"),
    ({"rope_theta": 5e5}, "model.rope_theta=500000.0 is a llama-layout key"),
    ({"ffn_hidden": 100}, "model.ffn_hidden=100 is a llama-layout key"),
    ({"layout": "llama", "family": "bert"}, "model.layout=llama is offered for model.family=gpt only"),
    ({"layout": "llama", "activation": "gelu"}, "model.activation=gelu applies to the gpt2 layout"),
    ({"layout": "mamba"}, "config key 'model.layout' must be one of 'gpt2' | 'llama'"),
])
def test_bad_llama_options_are_refused_naming_the_key(model, message):
    with pytest.raises(LmforgeError) as err:
        load_config(overrides=[f"model.{key}={value}" for key, value in model.items()])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_llama_option_on_the_command_line_is_one_line_and_exit_2(capsys):
    code = main(["pretrain", "--set", "model.layout=llama", "--set", "model.n_kv_head=3"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "model.n_kv_head (3)" in err


def test_bias_follows_the_layout_unless_set():
    assert ModelConfig().bias is True and _llama().bias is False
    assert _llama(bias=True).bias is True
    biased = GPT(_llama(bias=True))
    assert biased.blocks[0].attn.qkv.bias is not None and biased.blocks[0].mlp.fc.bias is not None


def test_pretrain_a_tiny_llama_through_the_cli_then_generate(tmp_path, corpus_file, capsys):
    config = tiny_config_dict(corpus_file, steps=2, eval_every=2, checkpoint_every=2)
    config["model"].update(layout="llama", n_kv_head=1, tie_embeddings=False, qk_norm=True)
    path = tmp_path / "llama.yaml"
    path.write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    assert main(["pretrain", "--config", str(path), "--out", str(run)]) == 0
    assert "validation loss:" in capsys.readouterr().out
    saved = yaml.safe_load((run / "config.yaml").read_text())["model"]
    assert saved["layout"] == "llama" and saved["bias"] is False and saved["n_kv_head"] == 1
    assert main(["generate", str(run), "--prompt", "The ", "--max-new-tokens", "10", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("The ") and len(out.strip()) > len("The ")


def test_fsdp_on_two_processes_wraps_the_llama_blocks_and_matches_one_process(tmp_path, corpus_file):
    from test_distributed import assert_pretrain_matches_on_two_processes

    from lmforge.train.distributed import transformer_blocks

    assert len(transformer_blocks(GPT(_llama(n_layer=3)))) == 3
    config = tiny_config_dict(corpus_file, steps=6, eval_every=6, checkpoint_every=6, sample_tokens=0)
    config["model"].update(layout="llama", n_kv_head=1, tie_embeddings=False)
    assert_pretrain_matches_on_two_processes(config, tmp_path, "parallel.strategy=fsdp",
                                             "parallel.activation_checkpointing=true")
