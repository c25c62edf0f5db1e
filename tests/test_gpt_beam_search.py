"""Beam search for decoder-only (GPT) runs, both layouts: transformers' generate(num_beams=...) on the exported
model writes the same tokens; width 1 is greedy; the KV cache changes nothing; the CLI and seq2seq decoding use it."""

import pytest
import torch

from lmforge.cli import main
from lmforge.config import TokenizerConfig
from lmforge.data.tokenizer import EOS, train_tokenizer
from lmforge.infer.generate import beam_search, generate
from lmforge.interop.hf_export import export_model
from lmforge.model import ModelConfig, build_model

transformers = pytest.importorskip("transformers")

TEXT = ["the cat sat on the mat. a dog ran far away!"] * 5
LAYOUTS = {"gpt2": {}, "llama": dict(layout="llama", n_kv_head=1, tie_embeddings=False)}
SETTINGS = [dict(num_beams=2), dict(num_beams=4), dict(num_beams=4, length_penalty=0.0, early_stopping=True),
            dict(num_beams=3, length_penalty=2.0), dict(num_beams=5, length_penalty=-0.5, early_stopping=True)]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def tokenizer():
    return train_tokenizer(TEXT, TokenizerConfig(kind="char"), "gpt", show_progress=False)


def tilted_model(layout: str, vocab: int, eos: int, scale: float, block_size: int = 40):
    """A random GPT with peaked next-token distributions whose end-of-text logit is raised by `scale`, so that
    hypotheses end at different lengths (scale 0: some never end within the limit)."""
    config = ModelConfig(family="gpt", n_layer=2, n_head=2, d_model=32, block_size=block_size, vocab_size=vocab,
                         dropout=0.0, **LAYOUTS[layout])
    torch.manual_seed(0)
    model = build_model(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)
        hidden = model.hidden_states(torch.randint(0, vocab, (4, 12), generator=torch.Generator().manual_seed(9)))
        model.lm_head.weight[eos] += scale * hidden.mean((0, 1))
    return model


def prompts(vocab: int):
    return [torch.randint(0, vocab, (2, 4 + seed % 3), generator=torch.Generator().manual_seed(seed))
            for seed in range(4)]


def generated_end(row: list[int], prompt_length: int, eos: int):
    """Index of the first end-of-text among the generated tokens, None if there is none."""
    tail = row[prompt_length:]
    return tail.index(eos) if eos in tail else None


@pytest.mark.parametrize("layout", LAYOUTS)
def test_beam_search_equals_transformers_generate_on_the_exported_model(layout, tmp_path):
    tok = tokenizer()
    vocab, eos = tok.get_vocab_size(), tok.token_to_id(EOS)
    ends = set()
    for scale in (0.0, 0.1, 0.5):
        ours = tilted_model(layout, vocab, eos, scale)
        export_model(ours.config, ours.state_dict(), tok, tmp_path / f"hf-{scale}")
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / f"hf-{scale}").eval()
        for prompt in prompts(vocab):
            for s in SETTINGS:
                a = beam_search(ours, prompt, 14, stop_token=eos, **s)
                with torch.no_grad():
                    b = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=14,
                                        do_sample=False, **s)
                assert a.tolist() == b.tolist(), (scale, s)  # padding after the end included
                ends.update(generated_end(row, prompt.shape[1], eos) for row in a.tolist())
    # hypotheses ended at once, later, and not within the limit: every stopping rule was exercised
    assert None in ends and 0 in ends and max(e for e in ends if e is not None) > 1


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("early_stopping", [True, False])
def test_beam_width_one_equals_greedy(layout, early_stopping):
    tok = tokenizer()
    vocab, eos = tok.get_vocab_size(), tok.token_to_id(EOS)
    ended = 0
    for scale in (0.0, 0.1):
        model = tilted_model(layout, vocab, eos, scale)
        for prompt in prompts(vocab):
            for row in prompt:
                greedy = generate(model, row[None], 14, temperature=0.0, stop_token=eos)
                beam = beam_search(model, row[None], 14, num_beams=1, early_stopping=early_stopping, stop_token=eos)
                assert beam.tolist() == greedy.tolist()
                ended += generated_end(greedy[0].tolist(), row.shape[0], eos) is not None
    assert ended > 0


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("settings", [dict(num_beams=3), dict(num_beams=4, length_penalty=0.5, early_stopping=True)])
def test_cached_beam_search_equals_uncached_even_past_the_context_window(layout, settings):
    tok = tokenizer()
    vocab, eos = tok.get_vocab_size(), tok.token_to_id(EOS)
    model = tilted_model(layout, vocab, eos, 0.1, block_size=16)
    for prompt in prompts(vocab):
        for stop, new in ((eos, 14), (None, 20)):  # 20 new tokens after a prompt of 4-6 pass block_size 16
            cached = beam_search(model, prompt, new, stop_token=stop, **settings)
            plain = beam_search(model, prompt, new, stop_token=stop, use_cache=False, **settings)
            assert torch.equal(cached, plain)
            if stop is None:
                assert cached.shape[1] == prompt.shape[1] + new > 16


def test_generate_cli_writes_transformers_beam_output_for_a_gpt_run(tmp_path, capsys):
    from test_interop_hf import _make_run

    run = _make_run(tmp_path, "gpt")
    assert main(["export", str(run), "--to", "hf", str(tmp_path / "hf")]) == 0
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    prompt = torch.tensor([hf_tok("The quick")["input_ids"]])
    with torch.no_grad():
        reference = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                    do_sample=False, num_beams=3, length_penalty=0.8, early_stopping=True)
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "The quick", "--max-new-tokens", "8", "--beams", "3",
                 "--length-penalty", "0.8", "--early-stopping"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == hf_tok.decode(reference[0], skip_special_tokens=True)


def test_seq2seq_decoding_of_a_gpt_run_uses_beam_search_when_num_beams_is_set(tmp_path):
    from lmforge.tasks.kinds import decode_gpt

    tok = tokenizer()
    vocab, eos = tok.get_vocab_size(), tok.token_to_id(EOS)
    model = tilted_model("gpt2", vocab, eos, 0.0)  # outputs that end at <eos> and outputs cut at 10 tokens
    texts = ["the cat", "a dog ran", "mat.", "far away", "on the"]
    decoded = {}
    for beams in (1, 3):
        expected = []
        for text in texts:
            ids = torch.tensor([tok.encode(text, add_special_tokens=False).ids])
            out = (beam_search(model, ids, 10, beams, stop_token=eos) if beams > 1 else
                   generate(model, ids, 10, temperature=0.0, stop_token=eos))[0, ids.shape[1]:].tolist()
            expected.append(tok.decode(out[: out.index(eos)] if eos in out else out))
        decoded[beams] = decode_gpt(model, tok, texts, 40, 10, torch.device("cpu"), num_beams=beams)
        assert decoded[beams] == expected
    assert decoded[1] != decoded[3]  # beam search finds other outputs here, so the setting is seen to matter
