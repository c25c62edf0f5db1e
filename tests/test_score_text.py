"""`lmforge evaluate RUN --text FILE`: held-out text scored with the run's tokenizer and model."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmforge.cli import main
from lmforge.data.tokenizer import eos_id
from lmforge.run import load_run

FIXTURES = Path(__file__).parent / "fixtures" / "format-v0"


@pytest.fixture
def gpt_run(tmp_path):
    shutil.copytree(FIXTURES / "run-v0", tmp_path / "run")
    return tmp_path / "run"


def test_decoder_score_is_the_mean_over_its_windows_computed_by_hand(gpt_run, tmp_path, capsys):
    text = "The quick brown fox jumps over the lazy dog. " * 7 + "A journey of a thousand miles."
    path = tmp_path / "held-out.txt"
    path.write_text(text, encoding="utf-8")
    assert main(["evaluate", str(gpt_run), "--text", str(path), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)

    run = load_run(gpt_run)
    ids = run.tokenizer.encode(text, add_special_tokens=False).ids + [eos_id(run.tokenizer)]
    block = run.config.model.block_size
    nats, count = 0.0, 0
    for start in range(0, len(ids) - 1, block):  # each window predicts its tokens from the ones before, alone
        window = torch.tensor(ids[start:start + block + 1])
        with torch.no_grad():
            logits = run.model(window[None, :-1]).logits[0].double()
        nats += float(F.cross_entropy(logits, window[1:], reduction="sum"))
        count += len(window) - 1
    assert got["tokens"] == count == len(ids) - 1
    assert got["loss"] == pytest.approx(nats / count, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(nats / count), rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(nats / math.log(2) / len(text.encode()), rel=1e-5)


def test_jsonl_documents_each_end_with_the_end_of_text_token(gpt_run, tmp_path, capsys):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "The dog."}\n{"text": "A fox."}\n', encoding="utf-8")
    assert main(["evaluate", str(gpt_run), "--text", str(path), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["documents"] == 2 and got["tokens"] == len("The dog.") + len("A fox.") + 2 - 1


def test_unknown_characters_are_counted_and_said(gpt_run, tmp_path, capsys):
    path = tmp_path / "u.txt"
    path.write_text("The dög and the föx.", encoding="utf-8")
    assert main(["evaluate", str(gpt_run), "--text", str(path), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["unknown_characters"] == 2 and "'ö' x2" in captured.err


@pytest.mark.parametrize("content", [b"", b"\x00\x01\x02\x03binary\x00"])
def test_empty_or_binary_text_is_one_line(gpt_run, tmp_path, capsys, content):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    assert main(["evaluate", str(gpt_run), "--text", str(path)]) == 2
    err = capsys.readouterr().err
    assert "--text: no text to score in" in err and "Traceback" not in err


def test_encoder_reports_masked_accuracy_and_bits_per_byte(tmp_path, capsys):
    from test_finetune import make_base_run

    run = make_base_run(tmp_path, "bert")
    path = tmp_path / "held-out.txt"
    path.write_text("a great film and a good story. " * 20, encoding="utf-8")
    assert main(["evaluate", str(run), "--text", str(path), "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(["evaluate", str(run), "--text", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == first  # fixed masks: the same score every time
    assert 0 < first["tokens"] < 0.3 * first["bytes"] and 0.0 <= first["masked_accuracy"] <= 1.0
    assert first["bits_per_byte"] > 0 and "perplexity" not in first
