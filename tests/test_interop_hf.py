"""Export to and import from Hugging Face transformers: equal outputs both ways, identical token ids,
identical greedy generations, and clear refusals of what cannot be converted. Tiny random models, no network."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lmforge.config import Config, DataConfig, TokenizerConfig, dump_config
from lmforge.data.tokenizer import EOS, train_tokenizer
from lmforge.errors import LmforgeError
from lmforge.infer.generate import generate
from lmforge.interop.hf_export import export_run
from lmforge.interop.hf_import import import_hf
from lmforge.interop.hf_tokenizer import read_hf_tokenizer, write_tokenizer_files
from lmforge.model import ModelConfig, build_model
from lmforge.run import load_run
from lmforge.train.checkpoint import TrainerState, save_checkpoint

transformers = pytest.importorskip("transformers")

MULTILINGUAL = ("Héllo wörld! Zwölf Boxkämpfer jagen Viktor — naïve café, ÇA VA? 日本語のテキスト, "
                "Привет, мир. Ελληνικά γράμματα. مرحبا 🙂 tabs\tand  spaces\n")
TRAIN_TEXT = [MULTILINGUAL, "The quick brown fox jumps over the lazy dog. " * 4,
              "A journey of a thousand miles begins with a single step. All that glitters is not gold."] * 10
GPT2_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "data" / "models" / "gpt2-tokenizer"
MINILM_FILES = Path(__file__).resolve().parents[2] / "shared" / "data" / "models" / "all-MiniLM-L6-v2"
TOL = 1e-4


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


_TOKENIZERS = {}


def _tokenizer(family, kind=None):
    kind = kind or ("bpe" if family == "gpt" else "wordpiece")
    if (family, kind) not in _TOKENIZERS:
        _TOKENIZERS[family, kind] = train_tokenizer(TRAIN_TEXT, TokenizerConfig(kind=kind, vocab_size=320), family,
                                                    show_progress=False)
    return _TOKENIZERS[family, kind]


def _model_config(family, vocab_size, **kw):
    extra = {"layer_norm_eps": 1e-12} if family == "bert" else {}
    return ModelConfig(family=family, n_layer=2, n_head=4, d_model=32, block_size=24, vocab_size=vocab_size,
                       **{**extra, **kw})


def _randomise(model, std=0.2, seed=0):
    """Weights beyond the init, so every tensor (biases and norms too) changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if p.dim() == 1 and p.shape[0] == 32 else 0.0))
    return model


def _make_run(tmp_path, family, kind=None, **model_kw):
    """A run directory (config, tokenizer, one checkpoint) holding a random tiny model."""
    tokenizer = _tokenizer(family, kind)
    config = Config(name="tiny", data=DataConfig(corpus=["builtin:tinyshakespeare"]),
                    model=_model_config(family, tokenizer.get_vocab_size(), **model_kw))
    run = tmp_path / f"run-{family}"
    run.mkdir()
    dump_config(config, run / "config.yaml")
    tokenizer.save(str(run / "tokenizer.json"))
    torch.manual_seed(0)
    save_checkpoint(run / "checkpoints", _randomise(build_model(config.model)), None, TrainerState(step=10))
    return run


def _padded_batch(vocab, seed=1, length=24):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (3, length), generator=g)
    types = torch.zeros_like(ids)
    types[:, length // 2:] = 1
    attention = torch.ones_like(ids)
    attention[1, 17:] = 0
    attention[2, 9:] = 0
    ids[attention == 0] = 0
    types[attention == 0] = 0
    return ids, types, attention


def _max_diff(a, b, real):
    return (a[real] - b[real]).abs().max().item()


# ---------------------------------------------------------------------------------------------
# Export: our run -> transformers


LLAMA_GQA_UNTIED = {"layout": "llama", "n_kv_head": 2, "tie_embeddings": False}
LLAMA_BIAS_THETA = {"layout": "llama", "n_kv_head": 1, "bias": True, "rope_theta": 500000.0, "ffn_hidden": 72}
LLAMA_QK_NORM = {"layout": "llama", "n_kv_head": 2, "qk_norm": True, "tie_embeddings": False}


@pytest.mark.parametrize("architecture,model_kw", [("GPT2LMHeadModel", {}), ("LlamaForCausalLM", LLAMA_GQA_UNTIED),
                                                   ("LlamaForCausalLM", LLAMA_BIAS_THETA),
                                                   ("Qwen3ForCausalLM", LLAMA_QK_NORM)])
def test_gpt_export_gives_transformers_equal_logits_and_identical_greedy_generation(tmp_path, architecture, model_kw):
    run = _make_run(tmp_path, "gpt", **model_kw)
    exported = export_run(run, tmp_path / "hf")
    assert exported.architecture == architecture
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "generation_config.json"} <= set(exported.files)
    ours = load_run(run).model
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(theirs).__name__ == architecture
    ids, _, attention = _padded_batch(ours.config.vocab_size)
    with torch.no_grad():
        diff = _max_diff(ours(ids).logits, theirs(input_ids=ids, attention_mask=attention).logits, attention.bool())
    assert diff < TOL

    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    eos = tokenizer.convert_tokens_to_ids(EOS)
    for prompt in ("The quick", "Привет"):
        prompt_ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        mine = generate(ours, prompt_ids, 14, temperature=0, stop_token=eos)
        with torch.no_grad():
            reference = theirs.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), do_sample=False,
                                        max_new_tokens=14)
        assert mine.tolist() == reference.tolist()


def test_bert_export_loads_as_pretraining_masked_lm_and_classification_models(tmp_path):
    run = _make_run(tmp_path, "bert")
    export_run(run, tmp_path / "hf")
    ours = load_run(run).model
    ids, types, attention = _padded_batch(ours.config.vocab_size)
    real = attention.bool()
    with torch.no_grad():
        mine = ours(ids, types, attention)
        hidden, pooled = ours.bert(ids, types, attention)
        pre = transformers.AutoModelForPreTraining.from_pretrained(tmp_path / "hf").eval()
        out = pre(input_ids=ids, token_type_ids=types, attention_mask=attention)
        assert type(pre).__name__ == "BertForPreTraining"
        assert _max_diff(mine.mlm_logits, out.prediction_logits, real) < TOL
        assert (mine.nsp_logits - out.seq_relationship_logits).abs().max() < TOL
        mlm = transformers.BertForMaskedLM.from_pretrained(tmp_path / "hf").eval()
        assert _max_diff(mine.mlm_logits, mlm(input_ids=ids, token_type_ids=types, attention_mask=attention).logits,
                         real) < TOL
        cls = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "hf", num_labels=3).eval()
        base = cls.bert(input_ids=ids, token_type_ids=types, attention_mask=attention)
        assert _max_diff(hidden, base.last_hidden_state, real) < TOL
        assert (pooled - base.pooler_output).abs().max() < TOL


@pytest.mark.parametrize("family,kind", [("gpt", "bpe"), ("gpt", "char"), ("bert", "wordpiece"), ("bert", "unigram")])
def test_exported_tokenizer_gives_identical_ids_through_auto_tokenizer(tmp_path, family, kind):
    ours = _tokenizer(family, kind)
    write_tokenizer_files(ours, family, tmp_path, model_max_length=64)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = MULTILINGUAL + (f" {EOS} more" if family == "gpt" else " [MASK] more")
    assert theirs(text)["input_ids"] == ours.encode(text).ids
    ids = ours.encode(text).ids
    assert theirs.decode(ids, skip_special_tokens=True) == ours.decode(ids)
    assert theirs.decode(ids) == ours.decode(ids, skip_special_tokens=False)
    if family == "bert":
        mine, reference = ours.encode(text, "Второе предложение."), theirs(text, "Второе предложение.")
        assert reference["input_ids"] == mine.ids and reference["token_type_ids"] == mine.type_ids
        assert mine.ids[0] == theirs.cls_token_id and theirs.mask_token_id == ours.token_to_id("[MASK]")
        assert theirs.pad_token_id == 0
    else:
        assert theirs.eos_token_id == ours.token_to_id(EOS)


def test_pre_layernorm_bert_and_existing_output_are_refused(tmp_path):
    with pytest.raises(LmforgeError, match="pre-LayerNorm"):
        export_run(_make_run(tmp_path, "bert", norm="pre"), tmp_path / "hf")
    run = _make_run(tmp_path, "gpt")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(LmforgeError, match="not empty"):
        export_run(run, tmp_path / "full")


def test_bias_free_gpt_exports_with_zero_biases(tmp_path):
    run = _make_run(tmp_path, "gpt", bias=False)
    export_run(run, tmp_path / "hf")
    ours = load_run(run).model
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ids, _, attention = _padded_batch(ours.config.vocab_size)
    with torch.no_grad():
        assert _max_diff(ours(ids).logits, theirs(input_ids=ids).logits, attention.bool()) < TOL


# ---------------------------------------------------------------------------------------------
# Import: transformers -> our run


def _hf_dir(tmp_path, model, family, name="hf"):
    """A transformers checkpoint directory: save_pretrained + our tokenizer files."""
    out = tmp_path / name
    model.save_pretrained(out)
    write_tokenizer_files(_tokenizer(family), family, out, model_max_length=24)
    return out


def _gpt2(cls_name="GPT2LMHeadModel", **kw):
    vocab = _tokenizer("gpt").get_vocab_size()
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=24, vocab_size=vocab,
                                     bos_token_id=0, eos_token_id=0, **kw)
    torch.manual_seed(0)
    return _randomise(getattr(transformers, cls_name)(config)).eval()


def _llama(cls_name="Llama", **kw):
    """A tiny random LlamaForCausalLM, or Qwen3ForCausalLM (cls_name="Qwen3": Llama + query/key norms)."""
    vocab = _tokenizer("gpt").get_vocab_size()
    config = getattr(transformers, f"{cls_name}Config")(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=32, intermediate_size=80,
        max_position_embeddings=24, vocab_size=vocab, bos_token_id=0, eos_token_id=0,
        **({"head_dim": 8} if cls_name == "Qwen3" else {}), **kw)
    torch.manual_seed(0)
    return _randomise(getattr(transformers, f"{cls_name}ForCausalLM")(config)).eval()


def _bert(cls_name="BertForPreTraining", **kw):
    vocab = _tokenizer("bert").get_vocab_size()
    config = transformers.BertConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=32,
                                     intermediate_size=64, max_position_embeddings=24, vocab_size=vocab, **kw)
    torch.manual_seed(0)
    return _randomise(getattr(transformers, cls_name)(config)).eval()


@pytest.mark.parametrize("cls_name", ["GPT2LMHeadModel", "GPT2Model"])
def test_gpt2_import_gives_equal_logits(tmp_path, cls_name):
    theirs = _gpt2(cls_name, activation_function="gelu_new")
    result = import_hf(_hf_dir(tmp_path, theirs, "gpt"), tmp_path / "run")
    assert result.architecture == cls_name and result.initialised == []
    run = load_run(tmp_path / "run")
    assert run.checkpoint.path.name == "step-000000"
    ids, _, attention = _padded_batch(run.config.model.vocab_size)
    with torch.no_grad():
        out = theirs(input_ids=ids, attention_mask=attention)
        logits = out.logits if cls_name == "GPT2LMHeadModel" else out.last_hidden_state @ theirs.wte.weight.T
        assert _max_diff(run.model(ids).logits, logits, attention.bool()) < TOL


@pytest.mark.parametrize("cls_name,kw", [
    ("Llama", {"tie_word_embeddings": True}),
    ("Llama", {"tie_word_embeddings": False, "rope_parameters": {"rope_type": "default", "rope_theta": 1000.0}}),
    ("Qwen3", {"tie_word_embeddings": False})])
def test_llama_import_through_the_cli_gives_equal_logits_and_greedy_generations(tmp_path, capsys, cls_name, kw):
    from lmforge.cli import main

    theirs = _llama(cls_name, **kw)
    assert main(["import", str(_hf_dir(tmp_path, theirs, "gpt")), str(tmp_path / "run")]) == 0
    assert f"imported {cls_name}ForCausalLM" in capsys.readouterr().out
    run = load_run(tmp_path / "run")
    c = run.config.model
    assert (c.layout, c.n_kv_head, c.ffn_hidden, c.bias, c.qk_norm) == ("llama", 2, 80, False, cls_name == "Qwen3")
    assert c.tie_embeddings == kw["tie_word_embeddings"] and c.rope_theta == theirs.config.rope_parameters["rope_theta"]
    ids, _, attention = _padded_batch(c.vocab_size)
    with torch.no_grad():
        assert _max_diff(run.model(ids).logits, theirs(input_ids=ids, attention_mask=attention).logits,
                         attention.bool()) < TOL
        prompt = ids[:1, :5]
        reference = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                    max_new_tokens=15, eos_token_id=None)
    assert generate(run.model, prompt, 15, temperature=0).tolist() == reference.tolist()


def test_llama_export_and_import_refuse_what_does_not_map(tmp_path, capsys):
    from lmforge.cli import main

    run = _make_run(tmp_path, "gpt", layout="llama", qk_norm=True, bias=True)
    assert main(["export", str(run), "--to", "hf", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "exports as Qwen3ForCausalLM, whose feed-forward has no biases" in err
    assert not (tmp_path / "out").exists()

    qwen3 = _hf_dir(tmp_path, _llama("Qwen3"), "gpt", name="qwen3")
    for change, message in (({"use_sliding_window": True}, "use_sliding_window=True: sliding-window attention"),
                            ({"attention_bias": True}, "attention_bias=True: attention biases beside a feed-forward")):
        _edit_config(qwen3, **change)
        with pytest.raises(LmforgeError, match=re.escape(message)):
            import_hf(qwen3, tmp_path / "run")
        _edit_config(qwen3, **{key: False for key in change})

    directory = _hf_dir(tmp_path, _llama(), "gpt")
    original = (directory / "config.json").read_text()
    for change, message in (
            ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
             "rope type 'llama3': scaled rotary embeddings have no lmforge equivalent"),
            ({"attention_bias": True}, "attention_bias=True and mlp_bias=False differ"),
            ({"hidden_act": "gelu"}, "hidden_act='gelu': a gated feed-forward with another activation"),
            ({"num_key_value_heads": 3}, "config.json describes a model lmforge cannot build: config.json.n_head (4) "
                                         "must be a multiple of config.json.n_kv_head (3)"),
            ({"head_dim": 16}, "head_dim=16 is not hidden_size / num_attention_heads (8)")):
        (directory / "config.json").write_text(original)
        _edit_config(directory, **change)
        with pytest.raises(LmforgeError, match=re.escape(message)):
            import_hf(directory, tmp_path / "run")
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("cls_name,initialised", [("BertForPreTraining", []),
                                                  ("BertForMaskedLM", ["pooler", "nsp head"]),
                                                  ("BertModel", ["mlm head", "nsp head"])])
def test_bert_import_gives_equal_outputs_and_initialises_missing_heads(tmp_path, cls_name, initialised):
    theirs = _bert(cls_name)
    result = import_hf(_hf_dir(tmp_path, theirs, "bert"), tmp_path / "run")
    assert result.initialised == initialised
    ours = load_run(tmp_path / "run").model
    ids, types, attention = _padded_batch(ours.config.vocab_size)
    real = attention.bool()
    with torch.no_grad():
        out = theirs(input_ids=ids, token_type_ids=types, attention_mask=attention, output_hidden_states=True)
        mine = ours(ids, types, attention)
        hidden, pooled = ours.bert(ids, types, attention)
        their_hidden = out.last_hidden_state if cls_name == "BertModel" else out.hidden_states[-1]
        assert _max_diff(hidden, their_hidden, real) < TOL
        if cls_name == "BertForPreTraining":
            assert _max_diff(mine.mlm_logits, out.prediction_logits, real) < TOL
            assert (mine.nsp_logits - out.seq_relationship_logits).abs().max() < TOL
        elif cls_name == "BertForMaskedLM":
            assert _max_diff(mine.mlm_logits, out.logits, real) < TOL
        else:
            assert (pooled - out.pooler_output).abs().max() < TOL


@pytest.mark.parametrize("family,model_kw", [("gpt", {}), ("bert", {}), ("gpt", LLAMA_GQA_UNTIED),
                                             ("gpt", LLAMA_BIAS_THETA)])
def test_export_then_import_restores_the_same_weights(tmp_path, family, model_kw):
    run = _make_run(tmp_path, family, **model_kw)
    export_run(run, tmp_path / f"hf-{family}")
    import_hf(tmp_path / f"hf-{family}", tmp_path / f"back-{family}")
    back = load_run(tmp_path / f"back-{family}")
    before, after = load_run(run).model.state_dict(), back.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert {k: getattr(back.config.model, k) for k in model_kw} == model_kw


def test_import_reads_a_weights_only_bin_converts_half_precision_and_cuts_positions(tmp_path):
    theirs = _gpt2()
    directory = _hf_dir(tmp_path, theirs, "gpt")
    state = {k: v.half() for k, v in theirs.state_dict().items()}
    (directory / "model.safetensors").unlink()
    torch.save(state, directory / "pytorch_model.bin")
    result = import_hf(directory, tmp_path / "run", overrides=["model.block_size=16", "model.dropout=0.0"])
    assert any("float16" in n for n in result.notes) and any("first 16 of 24" in n for n in result.notes)
    run = load_run(tmp_path / "run")
    assert run.config.model.block_size == 16 and run.model.wpe.weight.shape == (16, 32)
    assert torch.equal(run.model.wpe.weight, state["transformer.wpe.weight"][:16].float())


# ---------------------------------------------------------------------------------------------
# Tokenizers from transformers directories


@pytest.mark.skipif(not GPT2_TOKENIZER.is_dir(), reason="shared GPT-2 tokenizer files absent")
def test_real_gpt2_tokenizer_files_give_gpt2_tokenizer_fast_ids(tmp_path):
    ours, notes = read_hf_tokenizer(GPT2_TOKENIZER, "gpt")
    assert notes == ["tokenizer from vocab.json + merges.txt"]
    reference = transformers.GPT2TokenizerFast.from_pretrained(GPT2_TOKENIZER)
    hello = "Hello world! The quick brown fox"
    assert ours.encode(hello).ids[:7] == [15496, 995, 0, 383, 2068, 7586, 21831]
    for text in (hello, MULTILINGUAL, f"one{EOS}two  {EOS}", " leading space and trailing "):
        assert ours.encode(text).ids == reference(text)["input_ids"]
        assert ours.decode(ours.encode(text).ids, skip_special_tokens=False) == text
    write_tokenizer_files(ours, "gpt", tmp_path, model_max_length=1024)  # and the same once exported
    assert transformers.AutoTokenizer.from_pretrained(tmp_path)(MULTILINGUAL)["input_ids"] == ours.encode(MULTILINGUAL).ids


@pytest.mark.skipif(not MINILM_FILES.is_dir(), reason="shared MiniLM tokenizer files absent")
def test_bert_tokenizer_from_tokenizer_json_or_vocab_txt_matches_transformers(tmp_path):
    reference = transformers.AutoTokenizer.from_pretrained(MINILM_FILES)
    only_vocab = tmp_path / "vocab-only"
    only_vocab.mkdir()
    for name in ("vocab.txt", "tokenizer_config.json", "config.json"):
        shutil.copy(MINILM_FILES / name, only_vocab)
    long_text = MULTILINGUAL * 20  # longer than the file's fixed truncation (128): that setting is dropped
    for directory, source in ((MINILM_FILES, "tokenizer.json"), (only_vocab, "vocab.txt")):
        ours, notes = read_hf_tokenizer(directory, "bert")
        assert notes[0] == f"tokenizer from {source}"
        for text, pair in ((long_text, None), (MULTILINGUAL, "Second [MASK] sentence.")):
            mine, theirs = ours.encode(text, pair), reference(text, pair)
            assert mine.ids == theirs["input_ids"] and mine.type_ids == theirs["token_type_ids"]


# ---------------------------------------------------------------------------------------------
# Bad input


def _edit_config(directory, **changes):
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


class _Payload:
    def __reduce__(self):
        return (print, ("this would run on load",))


def test_import_refuses_bad_input_with_clear_messages(tmp_path):
    directory = _hf_dir(tmp_path, _bert(), "bert")

    def refused(match, **kw):
        with pytest.raises(LmforgeError, match=match) as info:
            import_hf(directory, tmp_path / "run", **kw)
        assert not (tmp_path / "run").exists()
        return str(info.value)

    original = (directory / "config.json").read_text()
    _edit_config(directory, architectures=["BertForMultipleChoice"])
    message = refused("unsupported architecture BertForMultipleChoice")
    assert "GPT2LMHeadModel" in message and "BertModel" in message
    _edit_config(directory, model_type="bart", architectures=["BartForConditionalGeneration"])
    assert "BertForPreTraining" in refused("model_type='bart' \\(BartForConditionalGeneration\\)")
    _edit_config(directory, model_type="t5", architectures=["T5ForConditionalGeneration"])  # read as T5
    refused("config.json: config key 'd_model' is missing")
    (directory / "config.json").write_text(original)
    _edit_config(directory, intermediate_size=80)
    refused("intermediate_size=80 is not a whole multiple of the width 32")
    (directory / "config.json").write_text(original)
    _edit_config(directory, hidden_act="relu")
    refused("hidden_act='relu' is not supported; supported: gelu, gelu_new")
    (directory / "config.json").write_text(original)
    _edit_config(directory, num_hidden_layers=3)
    refused(r"do not match config.json \(missing: bert.encoder.layer.2.attention.self.query.weight")
    _edit_config(directory, num_hidden_layers=1)
    refused(r"not described by config.json: bert.encoder.layer.1")
    _edit_config(directory, num_hidden_layers=2, hidden_size=64, intermediate_size=128)
    refused(r"shape differs: bert.embeddings.word_embeddings.weight is \(\d+, 32\), config.json implies \(\d+, 64\)")
    (directory / "config.json").write_text(original)
    refused("model.n_layer comes from the checkpoint", overrides=["model.n_layer=4"])
    refused("exceeds the checkpoint's 24 position embeddings", overrides=["model.block_size=48"])

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (directory / name).rename(tmp_path / name)
    refused(r"no tokenizer files in .*hf \(found: config.json, model.safetensors\); supported: tokenizer.json, "
            r"or vocab.txt \(BERT\)")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / name).rename(directory / name)

    state = dict(transformers.BertModel(transformers.BertConfig(**json.loads(original))).state_dict())
    (directory / "model.safetensors").unlink()
    torch.save({**state, "extra": _Payload()}, directory / "pytorch_model.bin")
    message = refused(r"pytorch_model.bin holds more than tensors and was not loaded: "
                      r"torch.load\(weights_only=True\) refuses it")
    assert "safetensors" in message
    (directory / "pytorch_model.bin").unlink()
    refused(r"no PyTorch weights in .* \(found: config.json, special_tokens_map.json, tokenizer.json, "
            r"tokenizer_config.json\); supported: model.safetensors")
    (directory / "model.safetensors").write_bytes(b"not safetensors")
    refused("is not a readable safetensors file")


def test_import_refuses_untied_output_layer_and_missing_special_tokens(tmp_path):
    theirs = _gpt2(tie_word_embeddings=False)
    directory = tmp_path / "hf"
    directory.mkdir()
    theirs.config.to_json_file(directory / "config.json")
    state = {k: v.contiguous() for k, v in theirs.state_dict().items()}
    state["lm_head.weight"] = state["lm_head.weight"].clone() + 1
    save_file(state, str(directory / "model.safetensors"))
    write_tokenizer_files(_tokenizer("gpt"), "gpt", directory, 24)
    with pytest.raises(LmforgeError, match="lm_head.weight differs from transformer.wte.weight"):
        import_hf(directory, tmp_path / "run")
    write_tokenizer_files(_tokenizer("bert"), "bert", directory, 24)  # a tokenizer with no <|endoftext|>
    with pytest.raises(LmforgeError, match=r"has no <\|endoftext\|>, which lmforge's gpt runs need"):
        import_hf(directory, tmp_path / "run")


# ---------------------------------------------------------------------------------------------
# Imported runs through the CLI


def test_imported_runs_generate_evaluate_fill_mask_and_continue_pretraining(tmp_path, corpus_file, capsys):
    from safetensors.torch import load_file

    from lmforge.cli import main

    settings = [f"data.corpus={corpus_file}", "train.steps=2", "train.batch_size=2", "train.lr=1e-6",
                "train.min_lr=1e-7", "train.warmup_steps=0", "train.eval_every=2", "train.eval_batches=1",
                "train.checkpoint_every=2", "train.sample_tokens=0", "mlm.next_sentence=false"]
    sets = sum((["--set", s] for s in settings), [])
    for family, model in (("gpt", _gpt2("GPT2Model")), ("bert", _bert("BertModel"))):
        run = tmp_path / f"run-{family}"
        assert main(["import", str(_hf_dir(tmp_path, model, family, f"hf-{family}")), str(run), *sets]) == 0
        printed = capsys.readouterr().out
        assert f"lmforge pretrain --resume {run}" in printed
        if family == "gpt":
            assert main(["generate", str(run), "--prompt", "The quick", "--max-new-tokens", "5",
                         "--temperature", "0"]) == 0
            assert capsys.readouterr().out.startswith("The quick")
        else:
            assert "initialised at random: mlm head, nsp head" in printed
            assert main(["fill-mask", str(run), "the quick [MASK] fox", "--top-k", "2", "--json"]) == 0
            assert len(json.loads(capsys.readouterr().out)[0]) == 2
        assert main(["evaluate", str(run), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["loss"] > 0
        assert main(["pretrain", "--resume", str(run)]) == 0
        before = load_file(run / "checkpoints" / "step-000000" / "model.safetensors")
        after = load_file(run / "checkpoints" / "step-000002" / "model.safetensors")
        # two AdamW steps at lr 1e-6 from the imported weights, not from a new initialisation
        assert before.keys() == after.keys()
        assert max((before[k] - after[k]).abs().max().item() for k in before) < 1e-4
        assert any(not torch.equal(before[k], after[k]) for k in before)


def test_finetuned_runs_export_as_classifier_with_label_names_or_as_gpt2(tmp_path, capsys):
    finetune = pytest.importorskip("lmforge.tasks.finetune")
    import yaml

    from lmforge.cli import main
    from lmforge.tasks.config import FinetuneRunConfig, TaskConfig
    from lmforge.tasks.models import build_task_model

    # a fine-tuned run as `lmforge finetune` leaves it: config.yaml with a finetune section, a classifier checkpoint
    labels = ["neg", "neutral", "pos"]
    tokenizer = _tokenizer("bert")
    config = FinetuneRunConfig(name="sent", base_run=str(tmp_path / "base"), base_checkpoint="step-000010",
                               model=_model_config("bert", tokenizer.get_vocab_size()),
                               task=TaskConfig(name="sent", path=str(tmp_path), labels=labels))
    run = tmp_path / "ft"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    tokenizer.save(str(run / "tokenizer.json"))
    save_checkpoint(run / "checkpoints", _randomise(build_task_model(config.model, "classification", 3, 0.0)),
                    None, TrainerState(step=2))

    assert main(["export", str(run), "--to", "hf", str(tmp_path / "hf")]) == 0
    assert "AutoModelForSequenceClassification" in capsys.readouterr().out
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = finetune.load_finetuned(run)
    assert theirs.config.id2label == dict(enumerate(labels))
    batch = hf_tokenizer(["a great film", "Превосходно!", "naïve café"], ["yes", "no", "maybe not"], padding=True,
                         return_tensors="pt")
    with torch.no_grad():
        mine = ours.model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
        assert (mine - theirs(**batch).logits).abs().max() < TOL

    # a generation fine-tune is a GPT: it exports as GPT2LMHeadModel
    tokenizer = _tokenizer("gpt")
    config = FinetuneRunConfig(name="qa", base_run=str(tmp_path / "base"), base_checkpoint="step-000010",
                               model=_model_config("gpt", tokenizer.get_vocab_size()),
                               task=TaskConfig(name="qa", path=str(tmp_path), kind="generation"))
    run = tmp_path / "ft-gpt"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    tokenizer.save(str(run / "tokenizer.json"))
    save_checkpoint(run / "checkpoints", _randomise(build_task_model(config.model, "generation", 0, 0.0)), None, TrainerState(step=2))
    assert main(["export", str(run), "--to", "hf", str(tmp_path / "hf-gpt")]) == 0
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf-gpt").eval()
    ids, _, attention = _padded_batch(config.model.vocab_size)
    with torch.no_grad():
        assert _max_diff(finetune.load_finetuned(run).model(ids).logits, theirs(input_ids=ids).logits,
                         attention.bool()) < TOL
