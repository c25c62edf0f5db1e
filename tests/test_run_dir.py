"""The run directory: one owner at a time, a format version with an upgrade path, the recorded token
store (a run outlives its corpus), and checkpoints that are good or not written at all."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import tiny_config_dict
from lmforge.cli import main

from lmforge.train import pretrain as pretrain_module
from lmforge.train.checkpoint import prune_checkpoints
from lmforge.train.loop import loss_weights, weighted_loss

FIXTURES = Path(__file__).parent / "fixtures" / "format-v0"


def _config(tmp_path, corpus, **train):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(corpus, **train)))
    return str(path)


def _cli(*args):
    return [sys.executable, "-m", "lmforge", *args]


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


def test_a_second_trainer_of_a_running_run_is_refused_and_nothing_is_lost(tmp_path, corpus_file, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", "--config", _config(tmp_path, corpus_file, steps=10), "--out", str(run)]) == 0
    env = {**os.environ, "LMFORGE_TEST_THREADS": "1"}
    first = subprocess.Popen(_cli("pretrain", "--resume", str(run), "--set", "train.steps=400",
                                  "--set", "train.eval_every=1000"), env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while f"process {first.pid}" not in (run / ".lock").read_text() and time.time() < deadline:
        time.sleep(0.05)
    capsys.readouterr()
    assert main(["pretrain", "--resume", str(run), "--set", "train.steps=400"]) == 2
    err = capsys.readouterr().err
    assert f"is in use: this run is owned by process {first.pid}" in err and "Traceback" not in err
    assert first.wait(timeout=300) == 0, first.stderr.read()
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    assert steps == sorted(set(steps)) and set(range(1, 401)) <= set(steps)  # every step once, none lost
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000400"


KILL_AT_FIRST_WEIGHTS = """
import os, signal, sys
from lmforge.train import checkpoint
def killed(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
checkpoint.save_file = killed
from lmforge.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("again", ["resume", "same command"])
def test_a_run_killed_during_its_first_checkpoint_starts_over(tmp_path, corpus_file, capsys, again):
    config = _config(tmp_path, corpus_file, steps=20)
    reference = tmp_path / "reference"
    assert main(["pretrain", "--config", config, "--out", str(reference)]) == 0
    run = tmp_path / "run"
    died = subprocess.run([sys.executable, "-c", KILL_AT_FIRST_WEIGHTS, "pretrain", "--config", config,
                           "--out", str(run)], capture_output=True, text=True)
    assert died.returncode == -signal.SIGKILL
    assert (run / "config.yaml").is_file() and not (run / "checkpoints" / "latest").exists()
    capsys.readouterr()
    args = ["pretrain", "--resume", str(run)] if again == "resume" else ["pretrain", "--config", config,
                                                                          "--out", str(run)]
    assert main(args) == 0
    assert "has no complete checkpoint" in capsys.readouterr().err
    final = "checkpoints/step-000020/model.safetensors"
    ours, theirs = load_file(str(run / final)), load_file(str(reference / final))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")] == []


def test_a_run_whose_corpus_was_deleted_evaluates_generates_and_resumes(tmp_path, corpus_file, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", "--config", _config(tmp_path, corpus_file, steps=10), "--out", str(run)]) == 0
    recorded = json.loads((run / "run.json").read_text())["store"]
    assert Path(recorded["path"], "manifest.json").is_file()
    corpus_file.unlink()
    capsys.readouterr()
    assert main(["evaluate", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"] == "step-000010"
    assert main(["generate", str(run), "--prompt", "The", "--max-new-tokens", "5"]) == 0
    assert main(["pretrain", "--resume", str(run), "--set", "train.steps=20"]) == 0
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000020"
    shutil.rmtree(recorded["path"])  # neither store nor corpus: one line that names both
    capsys.readouterr()
    assert main(["evaluate", str(run)]) == 2
    err = capsys.readouterr().err
    assert "its token store" in err and "is missing" in err and "corpus" in err and "Traceback" not in err


def test_a_changed_corpus_on_resume_is_said_and_the_recorded_store_is_kept(tmp_path, corpus_file, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", "--config", _config(tmp_path, corpus_file, steps=10), "--out", str(run)]) == 0
    before = json.loads((run / "run.json").read_text())["store"]
    corpus_file.write_text(corpus_file.read_text() + "A new line of text.\n")
    capsys.readouterr()
    assert main(["pretrain", "--resume", str(run), "--set", "train.steps=20"]) == 0
    assert "changed since" in capsys.readouterr().err
    assert json.loads((run / "run.json").read_text())["store"] == before


def _copy_v0(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "v0"
    shutil.copytree(FIXTURES, root)
    monkeypatch.chdir(root)  # run-v0's config names its corpus relative to where it was trained
    config = yaml.safe_load((root / "ft-v0" / "config.yaml").read_text())
    config["task"]["path"] = str(root / "task")
    (root / "ft-v0" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return root


def test_run_directories_of_format_0_keep_working(tmp_path, monkeypatch, capsys):
    """tests/fixtures/format-v0 was written by lmforge before run.json and typed trainer states."""
    root = _copy_v0(tmp_path, monkeypatch)
    assert not (root / "run-v0" / "run.json").exists()
    assert main(["evaluate", "run-v0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(3.4421, abs=1e-4)  # as when it was trained
    assert main(["generate", "run-v0", "--prompt", "The", "--max-new-tokens", "5"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "ft-v0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"] == "step-000002"  # its `best`
    assert main(["predict", "ft-v0", "a great film"]) == 0
    assert main(["pretrain", "--resume", "run-v0", "--set", "train.steps=6"]) == 0
    record = json.loads((root / "run-v0" / "run.json").read_text())
    assert record["version"] == 1 and record["kind"] == "pretrain" and "store" in record
    state = json.loads((root / "run-v0" / "checkpoints" / "step-000006" / "trainer_state.json").read_text())
    assert state["format"] == 1 and state["step"] == 6 and state["tokens_seen"] == 6 * 4 * 16
    assert main(["finetune", "--resume", "ft-v0", "--set", "finetune.steps=6"]) == 0


def test_a_run_of_a_newer_format_is_refused_and_left_untouched(tmp_path, monkeypatch, capsys):
    root = _copy_v0(tmp_path, monkeypatch)
    (root / "run-v0" / "run.json").write_text(json.dumps({"format": "lmforge-run", "version": 99}))
    before = _tree_digest(root / "run-v0")
    for args in (["pretrain", "--resume", "run-v0", "--set", "train.steps=6"], ["evaluate", "run-v0"]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "format version 99" in err and "upgrade lmforge" in err and "Traceback" not in err
    assert _tree_digest(root / "run-v0") == before


def test_an_unreadable_or_future_trainer_state_is_one_line(tmp_path, monkeypatch, capsys):
    root = _copy_v0(tmp_path, monkeypatch)
    (root / "run-v0" / "run.json").write_text("{not json")
    assert main(["evaluate", "run-v0"]) == 2
    assert "run.json is unreadable" in capsys.readouterr().err
    (root / "run-v0" / "run.json").unlink()
    state_path = root / "run-v0" / "checkpoints" / "step-000004" / "trainer_state.json"
    state = json.loads(state_path.read_text())
    state_path.write_text(json.dumps({**state, "format": 7}))
    assert main(["pretrain", "--resume", "run-v0", "--set", "train.steps=6"]) == 2
    err = capsys.readouterr().err
    assert "trainer-state format 7" in err and "Traceback" not in err


class _Planted:
    def __reduce__(self):
        return (os.system, (f"touch {Path(os.environ['PLANTED_MARKER'])}",))


def test_a_planted_pickle_in_a_checkpoint_is_skipped_like_damage(tmp_path, corpus_file, monkeypatch, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", "--config", _config(tmp_path, corpus_file), "--out", str(run)]) == 0
    marker = tmp_path / "executed"
    monkeypatch.setenv("PLANTED_MARKER", str(marker))
    newest = run / "checkpoints" / "step-000030"
    torch.save({"state": {0: _Planted()}, "param_groups": []}, newest / "optimizer.pt")
    state = json.loads((newest / "trainer_state.json").read_text())
    state["files"]["optimizer.pt"] = hashlib.sha256((newest / "optimizer.pt").read_bytes()).hexdigest()
    (newest / "trainer_state.json").write_text(json.dumps(state))  # a consistent checksum: only loading can tell
    capsys.readouterr()
    assert main(["pretrain", "--resume", str(run), "--set", "train.steps=40"]) == 0
    err = capsys.readouterr().err
    assert "optimizer.pt refused" in err and "trying the previous one" in err and "step-000020" in err
    assert not marker.exists()


def test_non_finite_weights_are_never_written_as_a_checkpoint(tmp_path, corpus_file, monkeypatch, capsys):
    real = pretrain_module.build_optimizer

    def poisoning(model, config, device):
        optimizer = real(model, config, device)
        step, calls = optimizer.step, {"n": 0}

        def poisoned_step(*args, **kwargs):
            calls["n"] += 1
            out = step(*args, **kwargs)
            if calls["n"] == 3:
                with torch.no_grad():
                    next(model.parameters()).fill_(float("inf"))
            return out

        optimizer.step = poisoned_step
        return optimizer

    monkeypatch.setattr(pretrain_module, "build_optimizer", poisoning)
    run = tmp_path / "run"
    code = main(["pretrain", "--config", _config(tmp_path, corpus_file, checkpoint_every=2), "--out", str(run)])
    err = capsys.readouterr().err
    assert code == 2 and "the weights are not finite" in err and "last good: step-000002" in err
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000002"
    assert not (run / "checkpoints" / "step-000004").exists()


def test_a_failed_check_leaves_no_run_directory(tmp_path, corpus_file, capsys):
    run = tmp_path / "run"
    config = _config(tmp_path, corpus_file)
    assert main(["pretrain", "--config", config, "--out", str(run), "--set", "model.vocab_size=3"]) == 2
    assert "model.vocab_size=3 is smaller" in capsys.readouterr().err
    assert not run.exists()


def test_an_unwritable_run_directory_is_one_line(tmp_path, corpus_file, monkeypatch, capsys):
    import errno

    def refuse(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    assert main(["pretrain", "--config", _config(tmp_path, corpus_file), "--out", str(tmp_path / "new" / "run")]) == 2
    err = capsys.readouterr().err
    assert "not writable (Permission denied)" in err and "Traceback" not in err


def test_loss_weights_make_the_exact_mean_over_the_global_batch():
    generator = torch.Generator().manual_seed(0)
    losses = torch.rand(64, generator=generator, dtype=torch.float64)  # per-target losses
    labels = torch.where(torch.rand(64, generator=generator) < 0.3, -100, 1)
    whole = losses[labels != -100].mean()
    for cuts in ([64], [32, 32], [10, 20, 34], [1] * 64):
        parts, start = [], 0
        for size in cuts:
            parts.append((losses[start:start + size], labels[start:start + size]))
            start += size
        weights = loss_weights([{"labels": float((lab != -100).sum())} for _, lab in parts])
        total = sum(weighted_loss({"labels": loss[lab != -100].mean() if (lab != -100).any() else loss.sum() * 0},
                                  w) for (loss, lab), w in zip(parts, weights))
        assert float(total) == pytest.approx(float(whole), rel=1e-12)


def test_fine_tuning_schedule_warms_up_then_decays_to_zero():
    from lmforge.tasks.finetune import lr_factor

    factors = [lr_factor(step, 20, 0.1) for step in range(20)]
    assert factors[:2] == [0.5, 1.0]  # 2 warm-up steps
    assert factors[2:] == pytest.approx([(20 - s) / 18 for s in range(2, 20)])
    assert all(a >= b for a, b in zip(factors[1:], factors[2:]))


def test_retention_keeps_the_newest_the_best_and_milestones(tmp_path):
    root = tmp_path / "checkpoints"
    for step in range(10, 110, 10):
        (root / f"step-{step:06d}").mkdir(parents=True)
    prune_checkpoints(root, keep_last=3, keep_every=50, newest="step-000100", best="step-000020")
    kept = sorted(p.name for p in root.iterdir())
    assert kept == ["step-000020", "step-000050", "step-000080", "step-000090", "step-000100"]
    prune_checkpoints(root, keep_last=0, keep_every=0, newest="step-000100")  # 0 keeps all
    assert len(list(root.iterdir())) == 5


def test_fine_tuning_skips_a_non_finite_update(tmp_path, monkeypatch):
    from test_finetune import FAST, NEGATIVE, POSITIVE, make_base_run, make_task

    from lmforge.tasks import finetune as finetune_module

    base = make_base_run(tmp_path, "bert")
    task = make_task(tmp_path, [(t, "pos") for t in POSITIVE] + [(t, "neg") for t in NEGATIVE])
    real, calls = finetune_module.task_loss, {"n": 0}

    def poisoned(model, batch, kind):
        loss = real(model, batch, kind)
        if model.training:
            calls["n"] += 1
            if calls["n"] == 3:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(finetune_module, "task_loss", poisoned)
    config = finetune_module.plan_finetune(base, str(task), [*FAST, "finetune.steps=6", "finetune.eval_every=6"])
    run = tmp_path / "ft"
    finetune_module.finetune(config, run, progress=False)
    state = json.loads((run / "checkpoints" / "step-000006" / "trainer_state.json").read_text())
    assert state["bad_steps_total"] == 1
    weights = load_file(str(run / "checkpoints" / "step-000006" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


HOLD_LOCK = """
import sys, time
from pathlib import Path
from lmforge.fileio import Owner
with Owner(Path(sys.argv[1]), "building this token store", Path(sys.argv[2])):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_token_store_has_one_builder_at_a_time(tmp_path, corpus_file, capsys):
    store = tmp_path / "store"
    config = _config(tmp_path, corpus_file)
    other = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(store), str(tmp_path / ".store.lock")],
                             stdout=subprocess.PIPE, text=True)  # another prepare of the same store, running
    try:
        assert other.stdout.readline().strip() == "held"
        assert main(["prepare", "--config", config, "--out", str(store)]) == 2
        err = capsys.readouterr().err
        assert f"is in use: building this token store is owned by process {other.pid}" in err
        assert not store.exists() and not (tmp_path / "store.partial").exists()
    finally:
        other.kill()
        other.wait()
    assert main(["prepare", "--config", config, "--out", str(store)]) == 0  # released: it builds
    assert (store / "manifest.json").is_file()
