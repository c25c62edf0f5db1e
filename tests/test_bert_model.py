"""Our BERT against transformers' BertForPreTraining with the same weights, and its padding behaviour."""

import pytest
import torch

from lmforge.interop.hf import bert_hf_config, bert_state_from_hf, bert_state_to_hf
from lmforge.model import ModelConfig, build_model
from lmforge.model import IGNORE_INDEX

CONFIG = ModelConfig(family="bert", n_layer=2, n_head=4, d_model=32, block_size=24, vocab_size=97,
                     layer_norm_eps=1e-12)


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 97, (3, 24), generator=g)
    types = torch.zeros_like(ids)
    types[:, 12:] = 1
    attention = torch.ones_like(ids)
    attention[1, 18:] = 0
    ids[1, 18:] = 0
    return ids, types, attention


def test_outputs_equal_transformers_bert_for_pretraining():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ours = build_model(CONFIG).eval()
    for p in ours.parameters():  # beyond the init, so every weight matters
        torch.nn.init.normal_(p, std=0.2)
    theirs = transformers.BertForPreTraining(transformers.BertConfig(**bert_hf_config(CONFIG))).eval()
    missing, unexpected = theirs.load_state_dict(bert_state_to_hf(ours.state_dict(), CONFIG), strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    ids, types, attention = _inputs()
    with torch.no_grad():
        mine = ours(ids, types, attention)
        ref = theirs(input_ids=ids, token_type_ids=types, attention_mask=attention)
    real = attention.bool()
    assert (mine.mlm_logits[real] - ref.prediction_logits[real]).abs().max() < 1e-4
    assert (mine.nsp_logits - ref.seq_relationship_logits).abs().max() < 1e-4
    back = bert_state_from_hf(theirs.state_dict(), CONFIG.n_layer)
    state = ours.state_dict()
    assert all(torch.equal(back[k], state[k]) for k in back)
    assert set(state) - set(back) == {"mlm.embeddings.weight"}  # the decoder, tied to bert.wte


def test_padding_does_not_change_real_positions():
    torch.manual_seed(0)
    model = build_model(CONFIG).eval()
    ids, types, attention = _inputs()
    with torch.no_grad():
        full = model(ids[1:2, :18], types[1:2, :18]).mlm_logits
        padded = model(ids[1:2], types[1:2], attention[1:2]).mlm_logits[:, :18]
    assert torch.allclose(full, padded, atol=1e-5)


def test_loss_uses_only_masked_positions_and_pre_norm_option_trains():
    for norm in ("post", "pre"):
        torch.manual_seed(0)
        model = build_model(ModelConfig(**{**CONFIG.__dict__, "norm": norm}))
        ids, types, attention = _inputs()
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[:, 3] = ids[:, 3]
        nsp = torch.tensor([0, 1, 0])
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        first = model(ids, types, attention, labels, nsp)
        assert first.mlm_logits.shape == (3, 97)  # the vocabulary projection ran on 3 positions only
        for _ in range(40):
            loss = model(ids, types, attention, labels, nsp).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        assert loss.item() < 0.2 * first.loss.item()


def test_pre_norm_bert_refuses_export():
    from lmforge.errors import LmforgeError

    with pytest.raises(LmforgeError, match="pre-LayerNorm"):
        bert_hf_config(ModelConfig(**{**CONFIG.__dict__, "norm": "pre"}))


ALIBI = ModelConfig(**{**CONFIG.__dict__, "position": "alibi", "norm": "pre"})


def test_alibi_attention_equals_float64_softmax_with_the_slope_times_distance_subtracted():
    from lmforge.model.layers import SelfAttention, alibi_bias

    torch.manual_seed(0)
    attention = SelfAttention(ALIBI, causal=False).double().eval()
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    keys = torch.ones(2, 7, dtype=torch.bool)
    keys[1, 5:] = False
    with torch.no_grad():
        ours, _ = attention(x, key_mask=keys[:, None, None, :], attn_bias=alibi_bias(4, 7, x.device).double())
        q, k, v = attention.qkv(x).split(32, dim=2)
        q, k, v = (t.view(2, 7, 4, 8).transpose(1, 2) for t in (q, k, v))
        slopes = [2.0 ** (-8.0 * (h + 1) / 4) for h in range(4)]
        distance = torch.tensor([[abs(i - j) for j in range(7)] for i in range(7)], dtype=torch.float64)
        scores = q @ k.transpose(-1, -2) / 8 ** 0.5 - torch.tensor(slopes, dtype=torch.float64)[:, None, None] * distance
        scores = scores.masked_fill(~keys[:, None, None, :], float("-inf"))
        expected = attention.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 7, 32))
    assert (ours - expected).abs().max() < 1e-10


def test_alibi_bert_has_no_position_embeddings_sees_word_order_and_ignores_padding():
    torch.manual_seed(0)
    model = build_model(ALIBI).eval()
    assert model.bert.wpe is None and not any("wpe" in name for name in model.state_dict())
    ids, types, attention = _inputs()
    with torch.no_grad():
        full = model(ids[1:2, :18], types[1:2, :18]).mlm_logits
        padded = model(ids[1:2], types[1:2], attention[1:2]).mlm_logits[:, :18]
        swapped = ids[1:2, :18].clone()
        swapped[0, [3, 9]] = swapped[0, [9, 3]]
        moved = model(swapped, types[1:2, :18]).mlm_logits
    assert torch.allclose(full, padded, atol=1e-5)
    # position 0 keeps its token but its neighbours' distances changed: order is seen without wpe
    assert not torch.allclose(full[0, 0], moved[0, 0], atol=1e-4)


def test_alibi_is_for_bert_and_does_not_export():
    from lmforge.errors import LmforgeError

    with pytest.raises(LmforgeError, match="model.position=alibi"):
        bert_hf_config(ModelConfig(**{**CONFIG.__dict__, "position": "alibi"}))
    with pytest.raises(LmforgeError, match="model.position=alibi is offered for bert only"):
        ModelConfig(family="gpt", position="alibi").validate()
