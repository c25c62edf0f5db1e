"""SIGKILL a real training process at random instants, resume it, and compare with an unbroken run."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import torch
import yaml
from safetensors.torch import load_file

from conftest import tiny_config_dict
from lmforge.train.checkpoint import step_dirs


def _cli(*args):
    return [sys.executable, "-m", "lmforge", *args]


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def _kill_resume_and_compare(command, verb, reference, tmp_path, env, rng, attempts, wait) -> int:
    """Start `command(run)`, SIGKILL it at a random instant after its first checkpoint, resume it, and
    check that it ends exactly as `reference` did (losses, final weights, no leftovers). Returns the kills."""
    kills = 0
    for attempt in range(attempts):
        run = tmp_path / f"killed-{attempt}"
        proc = subprocess.Popen(command(run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and not step_dirs(run / "checkpoints"):
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, wait))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        done = subprocess.run(_cli(verb, "--resume", str(run)), env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert _losses(run) == _losses(reference)
        a = load_file(str(reference / "checkpoints/step-000040/model.safetensors"))
        b = load_file(str(run / "checkpoints/step-000040/model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no leftovers
        best = reference / "checkpoints" / "best"
        assert not best.exists() or best.read_text() == (run / "checkpoints" / "best").read_text()
    return kills


def test_killed_runs_resume_bit_identically(tmp_path, corpus_file):
    # A checkpoint at every step makes checkpoint writing a large share of the run's time, so
    # random kill instants land inside checkpoint writes as well as inside training steps.
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(corpus_file, steps=40, checkpoint_every=1,
                                                      keep_checkpoints=2, eval_every=20)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = tmp_path / "reference"
    subprocess.run(_cli("pretrain", "--config", str(config), "--out", str(reference)), env=env, check=True,
                   capture_output=True)

    kills = _kill_resume_and_compare(lambda run: _cli("pretrain", "--config", str(config), "--out", str(run)),
                                     "pretrain", reference, tmp_path, env, random.Random(0), attempts=3, wait=1.5)
    assert kills >= 2  # the runs were really interrupted, not finished before the signal


def test_keep_every_retains_milestones(tmp_path, corpus_file):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(corpus_file, steps=30, checkpoint_every=5,
                                                      keep_checkpoints=2, keep_every=10)))
    run = tmp_path / "run"
    subprocess.run(_cli("pretrain", "--config", str(config), "--out", str(run)), check=True, capture_output=True)
    assert [p.name for p in step_dirs(run / "checkpoints")] == ["step-000010", "step-000020", "step-000025",
                                                                "step-000030"]


def test_killed_fine_tunes_resume_bit_identically(tmp_path):
    from test_finetune import NEGATIVE, POSITIVE, make_base_run, make_task

    base = make_base_run(tmp_path, "bert")
    task = make_task(tmp_path, [(t, "pos") for t in POSITIVE] + [(t, "neg") for t in NEGATIVE])
    common = ["--set", "finetune.steps=40", "--set", "finetune.eval_every=1", "--set", "finetune.batch_size=4",
              "--set", "finetune.keep_checkpoints=2", "--set", "finetune.log_every=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference = tmp_path / "reference"
    subprocess.run(_cli("finetune", str(base), "--task", str(task), "--out", str(reference), *common), env=env,
                   check=True, capture_output=True)
    kills = _kill_resume_and_compare(lambda run: _cli("finetune", str(base), "--task", str(task), "--out", str(run),
                                                     *common),
                                     "finetune", reference, tmp_path, env, random.Random(1), attempts=2, wait=1.0)
    assert kills >= 1


def test_killed_t5_runs_resume_bit_identically(tmp_path, corpus_file):
    """Span corruption redraws its masks from (seed, epoch, position): a killed T5 run (dropout 0.1) resumes exactly."""
    from test_t5_pretrain import t5_config_dict

    config = tmp_path / "t5.yaml"
    config.write_text(yaml.safe_dump(t5_config_dict(corpus_file, steps=40, checkpoint_every=1, keep_checkpoints=2,
                                                    eval_every=20, sample_tokens=0)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LMFORGE_CACHE": str(tmp_path / "cache")}
    reference = tmp_path / "reference"
    subprocess.run(_cli("pretrain", "--config", str(config), "--out", str(reference)), env=env, check=True,
                   capture_output=True)
    kills = _kill_resume_and_compare(lambda run: _cli("pretrain", "--config", str(config), "--out", str(run)),
                                     "pretrain", reference, tmp_path, env, random.Random(2), attempts=2, wait=1.5)
    assert kills >= 1
