"""End-to-end pretraining through the CLI on a tiny corpus: run files, evaluate, generate, resume."""

import json
import os
import signal
import subprocess
import sys
import time

import yaml

from conftest import assert_resume_reproduces, tiny_config_dict
from lmforge.cli import main


def _write_config(tmp_path, corpus, **train):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(corpus, **train)))
    return path


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_pretrain_writes_a_complete_run_and_learns(tmp_path, corpus_file, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", "--config", str(_write_config(tmp_path, corpus_file)), "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "validation loss:" in out and str(run) in out
    for name in ("config.yaml", "tokenizer.json", "metrics.jsonl", "samples.txt", "plots/loss.png",
                 "checkpoints/latest", "checkpoints/step-000030/model.safetensors",
                 "checkpoints/step-000030/optimizer.pt", "checkpoints/step-000030/trainer_state.json"):
        assert (run / name).is_file(), name
    assert list((run / "tb").iterdir()), "TensorBoard events expected"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "tokens", "loss", "lr", "tokens_per_s"} <= set(rows[0])
    assert any("val_loss" in r for r in rows)
    losses = _losses(run)
    assert losses[30] < 0.8 * losses[1]  # 3.55 -> ~2.7 nats in 30 steps; an untrained model stays near 3.5
    assert (run / "checkpoints/latest").read_text().strip() == "step-000030"

    assert main(["evaluate", str(run), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["checkpoint"] == "step-000030" and evaluated["loss"] > 0

    assert main(["generate", str(run), "--prompt", "The ", "--max-new-tokens", "12", "--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert main(["generate", str(run), "--prompt", "The ", "--max-new-tokens", "12", "--seed", "3"]) == 0
    assert capsys.readouterr().out == first and first.startswith("The ")


def test_resume_from_a_checkpoint_continues_identically(tmp_path, corpus_file):
    config = _write_config(tmp_path, corpus_file)
    full, partial = tmp_path / "full", tmp_path / "partial"
    assert main(["pretrain", "--config", str(config), "--out", str(full)]) == 0
    # A run that died after its step-20 checkpoint: later checkpoints and log lines are gone or stale.
    assert_resume_reproduces(full, partial, died_after=20, last=30)


def test_sigterm_checkpoints_and_exits_with_a_resume_hint(tmp_path, corpus_file):
    config = _write_config(tmp_path, corpus_file, steps=100000, checkpoint_every=100000)
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "pretrain", "--config", str(config), "--out", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.jsonl").is_file():
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert f"lmforge pretrain --resume {run}" in out
    latest = (run / "checkpoints" / "latest").read_text().strip()
    state = json.loads((run / "checkpoints" / latest / "trainer_state.json").read_text())
    assert state["step"] >= 1 and "Traceback" not in err


def test_existing_run_is_not_overwritten(tmp_path, corpus_file):
    config = _write_config(tmp_path, corpus_file, steps=10)
    run = tmp_path / "run"
    assert main(["pretrain", "--config", str(config), "--out", str(run)]) == 0
    assert main(["pretrain", "--config", str(config), "--out", str(run)]) == 2
