"""T5 as a trainable family end to end: span-corruption pretraining through the CLI on the shared loop,
evaluation, span filling, transformers export / import, bit-exact resume, the loader, and bad input."""

import json
import re

import numpy as np
import pytest
import torch
import yaml

from conftest import TEXT, assert_resume_reproduces
from lmforge.cli import main
from lmforge.config import load_config
from lmforge.data.loader import SpanLoader
from lmforge.data.objectives.span import Denoiser, SpanVocab
from lmforge.data.store import SplitReader
from lmforge.errors import LmforgeError

PROMPT = "The quick <extra_id_0> fox jumps <extra_id_1> the lazy dog."


def t5_config_dict(corpus, dropout=0.1, **train) -> dict:
    """A t5 recipe that trains in seconds: char tokenizer (with T5's specials and 100 sentinels)."""
    return {
        "name": "t5-test",
        "data": {"corpus": [str(corpus)], "tokenizer": {"kind": "char"}, "split": {"by": "tail", "val_fraction": 0.1}},
        "model": {"family": "t5", "n_layer": 2, "n_head": 2, "d_model": 32, "d_ff": 64, "block_size": 32,
                  "dropout": dropout, "layer_norm_eps": 1e-6},
        "span": {"objective": "span", "noise_density": 0.15, "mean_span_length": 3.0},
        "train": {"steps": 12, "batch_size": 8, "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2, "eval_every": 6,
                  "eval_batches": 2, "checkpoint_every": 6, "log_every": 1, "sample_tokens": 12,
                  "sample_prompt": PROMPT, **train},
    }


def _losses(run) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def t5_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5")
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT * 40, encoding="utf-8")
    config = root / "t5.yaml"
    config.write_text(yaml.safe_dump(t5_config_dict(corpus)))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LMFORGE_CACHE", str(root / "cache"))
        assert main(["pretrain", "--config", str(config), "--out", str(root / "run")]) == 0
    return root, config


@pytest.fixture
def in_cache(t5_run, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(t5_run[0] / "cache"))
    return t5_run


def test_t5_pretrains_through_the_cli_and_evaluates_the_same_fixed_set(in_cache, capsys):
    root, _ = in_cache
    run = root / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    assert len(losses) == 12 and losses[-1] < 0.6 * losses[0]  # 5.51 -> 2.80 in 12 steps (ALiBi start)
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [6, 12] and 0 < evals[-1]["val_token_acc"] <= 1
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert main(["evaluate", str(run), "--json"]) == 0
    measured = json.loads(capsys.readouterr().out)
    # the validation set is corrupted the same way at every reading: evaluate repeats the run's last numbers
    assert measured["loss"] == pytest.approx(evals[-1]["val_loss"], rel=1e-6)
    assert measured["token_acc"] == pytest.approx(evals[-1]["val_token_acc"], rel=1e-9)
    sample = (run / "samples.txt").read_text()
    assert sample.startswith(PROMPT + "\n<extra_id_0>: ") and "\n<extra_id_1>: " in sample


def _hf_greedy(export_dir, prompt: str, max_new_tokens: int, **kwargs) -> tuple[list[int], str]:
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    model = T5ForConditionalGeneration.from_pretrained(export_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, **kwargs)[0].tolist()
    return out, tokenizer.decode(out, skip_special_tokens=False)


def _spans_from_text(decoded: str) -> dict[str, str]:
    """Independent reading of a T5 answer: the text after each sentinel, up to the next sentinel or </s>."""
    body = decoded.removeprefix("<pad>").split("</s>")[0]
    pieces = re.split(r"(<extra_id_\d+>)", body)
    return {pieces[i]: pieces[i + 1].replace("<pad>", "") for i in range(1, len(pieces) - 1, 2)}


def test_export_matches_transformers_and_generate_fills_the_spans_it_decodes(in_cache, tmp_path, capsys):
    from lmforge.run import load_run
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    root, _ = in_cache
    out = tmp_path / "hf"
    assert main(["export", str(root / "run"), "--to", "hf", str(out)]) == 0
    capsys.readouterr()
    ours = load_run(root / "run")
    theirs = T5ForConditionalGeneration.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer(PROMPT).input_ids == ours.tokenizer.encode(PROMPT).ids
    # a padded batch with decoder inputs: logits equal within 1e-4
    batch = tokenizer([PROMPT, "A journey <extra_id_0> miles."], return_tensors="pt", padding=True)
    labels = torch.tensor([[ours.tokenizer.token_to_id("<extra_id_0>"), 5, 6, 1], [7, 8, 1, -100]])
    with torch.no_grad():
        a = ours.model(batch.input_ids, batch.attention_mask, labels=labels)
        b = theirs(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels)
    assert (a.logits - b.logits).abs().max() < 1e-4 and abs(float(a.loss) - float(b.loss)) < 1e-5

    hf_ids, hf_text = _hf_greedy(out, PROMPT, 12)
    assert main(["generate", str(root / "run"), "--prompt", PROMPT, "--temperature", "0",
                 "--max-new-tokens", "12"]) == 0
    printed = capsys.readouterr().out.splitlines()
    expected = _spans_from_text(hf_text)
    for line, sentinel in zip(printed, ("<extra_id_0>", "<extra_id_1>")):
        assert line == f"{sentinel}: {expected.get(sentinel, '')!r}"
    filled = PROMPT.replace("<extra_id_0>", expected.get("<extra_id_0>", ""))
    assert printed[2] == filled.replace("<extra_id_1>", expected.get("<extra_id_1>", ""))
    # beam search through the CLI: the spans transformers' beam search writes
    _, beam_text = _hf_greedy(out, PROMPT, 12, num_beams=3, length_penalty=0.8)
    assert main(["generate", str(root / "run"), "--prompt", PROMPT, "--beams", "3", "--length-penalty", "0.8",
                 "--max-new-tokens", "12"]) == 0
    beams = capsys.readouterr().out.splitlines()
    assert beams[0] == f"<extra_id_0>: {_spans_from_text(beam_text).get('<extra_id_0>', '')!r}"
    # sampling: reproducible with a seed
    args = ["generate", str(root / "run"), "--prompt", PROMPT, "--temperature", "1.0", "--max-new-tokens", "12",
            "--seed", "3", "--num-samples", "2"]
    assert main(args) == 0 and main(args) == 0
    first, second = capsys.readouterr().out.split("--- sample 1\n")[1:]
    assert first == second and first.count("--- sample 2\n") == 1


def test_import_of_the_export_evaluates_to_the_same_loss(in_cache, tmp_path, capsys):
    root, config = in_cache
    hf, imported = tmp_path / "hf", tmp_path / "imported"
    assert main(["export", str(root / "run"), "--to", "hf", str(hf)]) == 0
    assert main(["import", str(hf), str(imported), "--config", str(config)]) == 0
    saved = load_config(str(imported / "config.yaml"))
    assert saved.model.family == "t5" and saved.data.tokenizer.sentinels == 100
    capsys.readouterr()
    assert main(["evaluate", str(root / "run"), "--json"]) == 0
    assert main(["evaluate", str(imported), "--json"]) == 0
    original, again = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert again["loss"] == pytest.approx(original["loss"], rel=1e-5)
    assert again["token_acc"] == original["token_acc"]


def test_a_t5_run_resumes_bit_identically(in_cache, tmp_path):
    root, _ = in_cache
    assert_resume_reproduces(root / "run", tmp_path / "resumed", died_after=6, last=12)  # dropout 0.1 included


# ---------------------------------------------------------------------------------------------
# The loader

VOCAB = SpanVocab(eos=1, pad=0, sentinel_start=1_000_000, num_sentinels=100)


def _split(n_tokens: int) -> SplitReader:
    tokens = np.arange(10, 10 + n_tokens, dtype=np.uint32)  # every token names its place in the stream
    return SplitReader([tokens], np.asarray([0, n_tokens]), np.asarray([0]))


def _reconstruct(inputs: list[int], labels: list[int]) -> list[int]:
    """The original row from a span-corrupted example (plain Python, sentinel by sentinel)."""
    spans, current = {}, None
    for t in labels:
        if t in (VOCAB.eos, -100):
            break
        if VOCAB.is_sentinel(t):
            current = spans.setdefault(t, [])
        else:
            current.append(t)
    out = []
    for t in inputs:
        if t in (VOCAB.eos, VOCAB.pad):
            break
        out.extend(spans[t] if VOCAB.is_sentinel(t) else [t])
    return out


def _global_batches(loaders, steps: int) -> list[dict]:
    """The global batches `loaders` (one per rank) produce, ranks' micro-batches joined in rank order."""
    out = []
    for _ in range(steps):
        parts = [[loader.next() for _ in range(loader.accum_steps)] for loader in loaders]
        out.append({k: torch.cat([b[k] for rank in parts for b in rank]) for k in parts[0][0]})
    return out


def test_span_examples_are_whole_blocks_of_the_stream_each_once_per_epoch():
    split = _split(40 * 36)
    loader = SpanLoader(split, VOCAB, [Denoiser()], block_size=32, batch_size=8, seed=3)
    length = loader.lengths.tokens  # 34 raw tokens: 5 noise in 2 spans -> 29 + 2 sentinels + </s> = 32
    assert (length, loader.lengths.inputs) == (34, 32) and loader.examples_per_epoch == (40 * 36 - 34) // 34
    rows = []
    for batch in _global_batches([loader], 5):  # 40 of the epoch's 41 blocks
        assert batch["input_ids"].shape == (8, 32) and batch["labels"].shape == (8, loader.lengths.targets)
        assert bool(batch["attention_mask"].all())
        for x, y in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
            row = _reconstruct(x, y)
            assert row == list(range(row[0], row[0] + length))  # a contiguous block of the stream
            rows.append(row[0])
    assert len(set(rows)) == len(rows)


def test_span_batches_are_the_same_for_any_world_size_micro_batch_and_workers():
    split = _split(50 * 36)
    mixture = [Denoiser("span", 2.0), Denoiser("span", 1.0, 0.5, 8.0), Denoiser("prefix_lm", 1.0)]
    one = _global_batches([SpanLoader(split, VOCAB, mixture, 32, 8, seed=7)], 8)  # crosses an epoch
    two = _global_batches([SpanLoader(split, VOCAB, mixture, 32, 8, seed=7, rank=r, world_size=2,
                                      micro_batch_size=2) for r in range(2)], 8)
    workers = _global_batches([SpanLoader(split, VOCAB, mixture, 32, 8, seed=7, workers=2)], 8)
    for a, b, c in zip(one, two, workers):
        assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    kinds = {(x[-1] == 0, y[0] >= 1_000_000 - 100) for batch in one
             for x, y in zip(batch["input_ids"].tolist(), batch["labels"].tolist())}
    assert len(kinds) >= 2  # both padded (prefix LM) and sentinel-led (span) examples occur


def test_span_loader_resumes_from_its_state_exactly():
    split = _split(30 * 36)
    full = SpanLoader(split, VOCAB, [Denoiser()], 32, 8, seed=11)
    reference = _global_batches([full], 6)
    first = SpanLoader(split, VOCAB, [Denoiser()], 32, 8, seed=11)
    _global_batches([first], 3)
    again = SpanLoader(split, VOCAB, [Denoiser()], 32, 8, seed=0)
    again.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for a, b in zip(reference[3:], _global_batches([again], 3)):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_validation_set_is_fixed_and_reshuffled_training_masks_are_not():
    split = _split(20 * 36)
    val = SpanLoader(split, VOCAB, [Denoiser()], 32, 4, seed=0, fixed=True)
    assert all(torch.equal(val.micro_batch(0)[k], val.micro_batch(0)[k]) for k in ("input_ids", "labels"))
    # each sample position draws its noise pattern from (seed, epoch, position): another epoch, other patterns
    train = SpanLoader(split, VOCAB, [Denoiser()], 32, 4, seed=0)
    n = train.examples_per_epoch
    patterns = [train.examples(np.arange(e * n, (e + 1) * n))["input_ids"] >= 1_000_000 - 100 for e in (0, 1)]
    assert patterns[0].sum() == patterns[1].sum() == 2 * n  # two sentinels per row
    assert not torch.equal(patterns[0], patterns[1])
    again = SpanLoader(split, VOCAB, [Denoiser()], 32, 4, seed=0)
    assert torch.equal(again.examples(np.arange(n))["input_ids"] >= 1_000_000 - 100, patterns[0])


def test_span_loader_refuses_more_spans_than_sentinels():
    few = SpanVocab(eos=1, pad=0, sentinel_start=1_000_000, num_sentinels=1)
    with pytest.raises(LmforgeError, match=r"rows of 34 tokens get 2 noise spans but the tokenizer has 1 sentinels"):
        SpanLoader(_split(40 * 36), few, [Denoiser()], 32, 8, seed=0)


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the key, exit code 2, nothing written


@pytest.mark.parametrize("overrides, message", [
    (["model.block_size=2"], "sequences of 2 tokens are too short to corrupt at span.noise_density=0.15"),
    (["span.noise_density=1.5"], "span.noise_density must be in (0, 1), got 1.5"),
    (["span.mean_span_length=0.5"], "span.mean_span_length must be >= 1, got 0.5"),
    (["data.tokenizer.sentinels=1"], "rows of 34 tokens get 2 noise spans but the tokenizer has 1 sentinels "
                                     "(data.tokenizer.sentinels)"),
    (["data.tokenizer.sentinels=0"], "span.objective=span drops spans into sentinel tokens but "
                                     "data.tokenizer.sentinels is 0"),
    (["span.objective=mixture", "span.mixture=[{kind: span, weight: 0}]"],
     "span.mixture[0].weight must be positive, got 0.0"),
    (["span.objective=mixture", "span.mixture=[{kind: span, noise_density: 0}]"],
     "span.mixture[0].noise_density must be in (0, 1), got 0.0"),
    (["span.objective=denoise"], "config key 'span.objective' must be one of 'span' | 'prefix_lm' | 'mixture'"),
])
def test_bad_span_settings_are_one_line_errors_before_any_work(tmp_path, corpus_file, monkeypatch, capsys,
                                                               overrides, message):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    config = tmp_path / "t5.yaml"
    config.write_text(yaml.safe_dump(t5_config_dict(corpus_file)))
    run = tmp_path / "run"
    args = ["pretrain", "--config", str(config), "--out", str(run), *sum((["--set", o] for o in overrides), [])]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not run.exists() and not (tmp_path / "cache").exists()


def test_a_given_tokenizer_without_sentinels_is_refused_before_the_run_starts(tmp_path, corpus_file, monkeypatch,
                                                                              capsys):
    from lmforge.config import TokenizerConfig
    from lmforge.data.tokenizer import train_tokenizer

    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    tokenizer = train_tokenizer([TEXT], TokenizerConfig(kind="char", sentinels=0), "t5", show_progress=False)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    config = tmp_path / "t5.yaml"
    config.write_text(yaml.safe_dump(t5_config_dict(corpus_file)))
    run = tmp_path / "run"
    assert main(["pretrain", "--config", str(config), "--out", str(run), "--set",
                 f"data.tokenizer.path={tmp_path / 'tokenizer.json'}"]) == 2
    err = capsys.readouterr().err
    assert "the tokenizer has no <extra_id_0> token, which the span objectives need" in err
    assert len(err.strip().splitlines()) == 1 and not run.exists()
    # and a tokenizer of another family has no </s> to end documents with: refused while preparing
    gpt = train_tokenizer([TEXT], TokenizerConfig(kind="char"), "gpt", show_progress=False)
    gpt.save(str(tmp_path / "gpt.json"))
    assert main(["pretrain", "--config", str(config), "--out", str(run), "--set",
                 f"data.tokenizer.path={tmp_path / 'gpt.json'}"]) == 2
    err = capsys.readouterr().err
    assert "the tokenizer has no </s> token" in err and not run.exists()


def test_family_t5_picks_a_unigram_tokenizer_unless_told():
    assert load_config(None, ["model.family=t5", "data.tokenizer.kind=auto"]).data.tokenizer.kind == "unigram"
    assert load_config(None, ["data.tokenizer.kind=auto"]).data.tokenizer.kind == "bpe"
    assert load_config("t5-tiny").data.tokenizer.kind == "unigram"


def test_generate_flags_for_beams_are_checked(in_cache, capsys):
    root, _ = in_cache
    assert main(["generate", str(root / "run"), "--prompt", PROMPT, "--beams", "0"]) == 2
    assert "--beams must be >= 1" in capsys.readouterr().err


def test_adafactor_steps_are_relative_to_each_parameters_scale():
    from lmforge.config import TrainConfig
    from lmforge.train.optim import build_optimizer

    steps = {}
    for optimizer in ("adafactor", "adamw"):
        small, large = torch.nn.Parameter(torch.full((4, 4), 0.01)), torch.nn.Parameter(torch.full((4, 4), 1.0))
        model = torch.nn.ParameterList([small, large])
        opt = build_optimizer(model, TrainConfig(optimizer=optimizer, lr=1e-2, weight_decay=0.0), torch.device("cpu"))
        small.grad, large.grad = torch.ones(4, 4), torch.ones(4, 4)
        opt.step()
        steps[optimizer] = ((0.01 - small).abs().max().item(), (1.0 - large).abs().max().item())
    assert steps["adafactor"][1] == pytest.approx(100 * steps["adafactor"][0], rel=1e-3)  # step ~ lr * RMS(param)
    assert steps["adamw"][1] == pytest.approx(steps["adamw"][0], rel=1e-3)  # AdamW: the same step at any scale


def test_an_adafactor_t5_run_resumes_bit_identically(in_cache, tmp_path):
    root, _ = in_cache
    config = tmp_path / "adafactor.yaml"
    config.write_text(yaml.safe_dump(t5_config_dict(root / "corpus.txt", optimizer="adafactor", weight_decay=0.0)))
    assert main(["pretrain", "--config", str(config), "--out", str(tmp_path / "full")]) == 0
    assert_resume_reproduces(tmp_path / "full", tmp_path / "resumed", died_after=6, last=12)
