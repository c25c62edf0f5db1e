import torch

from conftest import incremental_logits_error
from lmforge.infer.generate import filter_logits, generate
from lmforge.model import GPT, ModelConfig


def _model() -> GPT:
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=30, n_layer=2, n_head=2, d_model=32, block_size=24))
    for p in model.parameters():  # larger weights than the init, so the distribution is far from flat
        p.data.mul_(5)
    return model.eval()


def test_generation_is_deterministic_under_a_seed():
    model, prompt = _model(), torch.tensor([[1, 2, 3]])
    outs = [generate(model, prompt, 15, temperature=1.0, top_k=10,
                     generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    other = generate(model, prompt, 15, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(8))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], other)


def test_kv_cache_logits_equal_full_recomputation():
    model = _model()
    assert incremental_logits_error(model, torch.randint(0, 30, (2, 20))) < 1e-4


def test_cached_generation_equals_uncached_even_past_the_context_window():
    model, prompt = _model(), torch.tensor([[4, 5, 6, 7]])
    for temperature in (0.0, 0.9):
        cached = generate(model, prompt, 40, temperature=temperature, generator=torch.Generator().manual_seed(1))
        plain = generate(model, prompt, 40, temperature=temperature, use_cache=False,
                         generator=torch.Generator().manual_seed(1))
        assert cached.shape == (1, 44)  # 44 > block_size 24: the window slides
        assert torch.equal(cached, plain)


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    # top_p=0.7: 0.5 alone is < 0.7, so 0.3 joins; the rest are dropped
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.1)).tolist() == [[False, True, True, True]]
