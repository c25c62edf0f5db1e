"""T5 <-> transformers' T5ForConditionalGeneration: equal logits, buckets, decoding; import back; tokenizer."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration  # noqa: E402
from transformers.models.t5.modeling_t5 import T5Attention  # noqa: E402

from lmforge.config import TokenizerConfig  # noqa: E402
from lmforge.data.objectives.span import SpanVocab  # noqa: E402
from lmforge.data.tokenizer import train_tokenizer  # noqa: E402
from lmforge.errors import LmforgeError  # noqa: E402
from lmforge.infer.seq2seq import generate_seq2seq  # noqa: E402
from lmforge.interop.hf_t5 import export_t5, import_t5, load_t5  # noqa: E402
from lmforge.model import ModelConfig, build_model  # noqa: E402
from lmforge.model.t5 import relative_position_bucket  # noqa: E402
from test_t5_model import make_eos_likely  # noqa: E402

VARIANTS = {"v1.1": dict(ffn="gated-gelu", tie_embeddings=False), "1.0": dict(ffn="relu", tie_embeddings=True)}


def our_model(seed: int = 0, **overrides):
    fields = dict(family="t5", vocab_size=72, d_model=32, n_head=4, d_kv=6, d_ff=40, n_layer=2, n_decoder_layer=3,
                  dropout=0.0, relative_attention_num_buckets=16, relative_attention_max_distance=40,
                  layer_norm_eps=1e-6)
    fields.update(overrides)
    config = ModelConfig(**fields)
    config.validate()
    torch.manual_seed(seed)
    return build_model(config).eval()


def exported(model, tmp_path, name="hf"):
    export_t5(model, tmp_path / name)
    return T5ForConditionalGeneration.from_pretrained(tmp_path / name).eval()


def padded_batch(vocab: int = 72):
    torch.manual_seed(10)
    ids = torch.randint(3, vocab, (3, 19))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    mask[2, 5:] = 0
    labels = torch.randint(3, vocab, (3, 9))
    labels[1, 6:] = -100
    dec_mask = torch.ones_like(labels)
    dec_mask[1, 7:] = 0  # the decoder inputs of row 1 end in padding too
    return ids, mask, labels, dec_mask


@pytest.mark.parametrize("variant", VARIANTS)
def test_exported_logits_equal_transformers_on_a_padded_batch(variant, tmp_path):
    ours = our_model(**VARIANTS[variant])
    theirs = exported(ours, tmp_path)
    ids, mask, labels, dec_mask = padded_batch()
    a = ours(ids, mask, labels=labels, decoder_attention_mask=dec_mask)
    b = theirs(input_ids=ids, attention_mask=mask, labels=labels, decoder_attention_mask=dec_mask)
    real = dec_mask.bool()
    assert (a.logits - b.logits)[real].abs().max() < 1e-4
    assert abs(float(a.loss.detach()) - float(b.loss.detach())) < 1e-5


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 40), (8, 20), (64, 512)])
def test_relative_position_buckets_equal_transformers(bidirectional, num_buckets, max_distance):
    relative = torch.arange(-2000, 2001)[None, :] + torch.arange(0, 3)[:, None] * 7
    theirs = T5Attention._relative_position_bucket(relative, bidirectional, num_buckets, max_distance)
    assert torch.equal(relative_position_bucket(relative, bidirectional, num_buckets, max_distance), theirs)


def decoding_pair(tmp_path, scale: float):
    """Our random model with </s> made likely enough to end hypotheses at varied lengths, and its export."""
    model = our_model(3, n_decoder_layer=2)
    ids, mask = make_eos_likely(model, 6, scale, 72, seed=4)
    return model, exported(model, tmp_path, f"hf-{scale}"), ids, mask


def until_eos(row: list[int]) -> list[int]:
    return row[: row.index(1) + 1] if 1 in row else row


def test_greedy_and_beam_outputs_equal_transformers_generate(tmp_path):
    settings = [dict(num_beams=1), dict(num_beams=2), dict(num_beams=4),
                dict(num_beams=4, length_penalty=0.0, early_stopping=True),
                dict(num_beams=3, length_penalty=2.0), dict(num_beams=5, length_penalty=-0.5, early_stopping=True)]
    end_positions = set()
    for scale in (0.04, 0.06, 0.1):
        ours, theirs, ids, mask = decoding_pair(tmp_path, scale)
        for s in settings:
            a = generate_seq2seq(ours, ids, mask, max_new_tokens=14, **s)
            b = theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=14, do_sample=False, **s)
            assert a.shape == b.shape, (scale, s)
            for row_a, row_b in zip(a.tolist(), b.tolist()):
                assert until_eos(row_a) == until_eos(row_b), (scale, s)
                end = len(until_eos(row_a))
                # after </s> we pad with <pad>; transformers' beam search fills with `pad_token_id or eos`,
                # which for T5's pad id 0 is </s>
                assert set(row_a[end:]) <= {0} and set(row_b[end:]) <= ({0} if s["num_beams"] == 1 else {1})
                end_positions.add(end - 1 if 1 in row_a else None)
    # hypotheses ended at once, later, and not at all within the limit: every stopping rule was exercised
    assert None in end_positions and 1 in end_positions and max(p for p in end_positions if p) > 1


@pytest.mark.parametrize("variant", VARIANTS)
def test_export_then_import_gives_the_same_model(variant, tmp_path):
    ours = our_model(1, **VARIANTS[variant])
    export_t5(ours, tmp_path / "hf")
    back = load_t5(tmp_path / "hf")
    assert back.config == ours.config
    state = ours.state_dict()
    assert back.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in back.state_dict().items())


@pytest.mark.parametrize("variant", ["v1.1 saved by transformers 5", "1.0 saved by transformers 5",
                                     "v1.1 with its own head (hub layout)"])
def test_a_transformers_t5_directory_imports_with_equal_logits(variant, tmp_path):
    torch.manual_seed(5)
    v11 = variant.startswith("v1.1")
    config = T5Config(vocab_size=50, d_model=24, d_kv=8, d_ff=36, num_layers=2, num_decoder_layers=1, num_heads=3,
                      dropout_rate=0.0, decoder_start_token_id=0, feed_forward_proj="gated-gelu" if v11 else "relu",
                      **({"tie_word_embeddings": False} if v11 else {}))
    T5ForConditionalGeneration(config).save_pretrained(tmp_path / "theirs")
    if variant.endswith("(hub layout)"):  # as google/t5-v1_1-* ship: tie_word_embeddings false, lm_head stored
        path = tmp_path / "theirs" / "config.json"
        hf = json.loads(path.read_text())
        hf.pop("scale_decoder_outputs")
        path.write_text(json.dumps({**hf, "tie_word_embeddings": False}))
        weights = load_file(tmp_path / "theirs" / "model.safetensors")
        save_file({**weights, "lm_head.weight": torch.randn(50, 24)}, tmp_path / "theirs" / "model.safetensors",
                  metadata={"format": "pt"})
    theirs = T5ForConditionalGeneration.from_pretrained(tmp_path / "theirs").eval()
    ours = load_t5(tmp_path / "theirs").eval()
    assert ours.config.tie_embeddings == (not v11)
    ids, mask, labels, dec_mask = padded_batch(50)
    a = ours(ids, mask, labels=labels).logits
    b = theirs(input_ids=ids, attention_mask=mask, labels=labels).logits
    assert (a - b).abs().max() < 1e-4


def test_import_refuses_what_it_cannot_load(tmp_path):
    export_t5(our_model(), tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    for change, message in ((dict(model_type="bert"), "not 't5'"), (dict(feed_forward_proj="gated-silu"), "gated-silu"),
                            (dict(d_model=48), "has shape")):
        (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(LmforgeError, match=message) as info:
            import_t5(tmp_path / "hf")
        assert "\n" not in str(info.value)
    with pytest.raises(LmforgeError, match="not a transformers model directory"):
        import_t5(tmp_path / "nothing")


SHAKESPEARE = Path(__file__).resolve().parent.parent / "lmforge" / "sample_data" / "tinyshakespeare.txt"


def test_t5_tokenizer_has_t5_specials_and_sentinels_at_the_end(tmp_path):
    text = SHAKESPEARE.read_text(encoding="utf-8")[:300_000]
    tokenizer = train_tokenizer(text.split("\n\n"), TokenizerConfig(kind="unigram", vocab_size=300), "t5",
                                show_progress=False)
    size = tokenizer.get_vocab_size()
    assert size == 300
    assert [tokenizer.id_to_token(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
    assert [tokenizer.token_to_id(f"<extra_id_{i}>") for i in range(100)] == [size - 1 - i for i in range(100)]
    assert SpanVocab.from_tokenizer(tokenizer) == SpanVocab(eos=1, pad=0, sentinel_start=size - 1, num_sentinels=100)
    assert tokenizer.encode("my lord <extra_id_0> king").ids[-1] == 1  # texts end with </s>, as T5's do

    model = our_model(vocab_size=size)
    export_t5(model, tmp_path / "hf", tokenizer)
    auto = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in ("First Citizen: <extra_id_0> proceed", "All that <extra_id_1> gold, my lord <extra_id_0>"):
        assert auto(text)["input_ids"] == tokenizer.encode(text).ids
    assert auto.convert_tokens_to_ids("<extra_id_0>") == size - 1 and auto.pad_token_id == 0 and auto.eos_token_id == 1
