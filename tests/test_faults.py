"""Faults during training: damaged checkpoints, non-finite losses, a full disk."""

import errno
import json

import torch
import yaml

from conftest import tiny_config_dict
from lmforge.cli import main
from lmforge.train import checkpoint as checkpoint_module
from lmforge.train import pretrain as trainer_module


def _config(tmp_path, corpus, **train):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(corpus, **train)))
    return str(path)


def _poison_losses(monkeypatch, bad_calls):
    """Make the model's training loss NaN on the given (1-based) training forward calls."""
    real_build = trainer_module.build_model

    def build(config):
        model = real_build(config)
        forward, calls = model.forward, {"n": 0}

        def poisoned(input_ids, labels=None, **kwargs):
            out = forward(input_ids, labels, **kwargs)
            if labels is not None and model.training:
                calls["n"] += 1
                if calls["n"] in bad_calls:
                    out.loss = out.loss * float("nan")
            return out

        model.forward = poisoned
        return model

    monkeypatch.setattr(trainer_module, "build_model", build)


def test_damaged_latest_checkpoint_falls_back_to_the_previous(tmp_path, corpus_file, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", "--config", _config(tmp_path, corpus_file), "--out", str(run)]) == 0
    weights = run / "checkpoints" / "step-000030" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["evaluate", str(run), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["checkpoint"] == "step-000020"
    assert "step-000030 is damaged (model.safetensors checksum mismatch)" in captured.err


def test_a_non_finite_loss_skips_the_update_and_is_counted(tmp_path, corpus_file, monkeypatch, capsys):
    _poison_losses(monkeypatch, bad_calls={5})
    run = tmp_path / "run"
    assert main(["pretrain", "--config", _config(tmp_path, corpus_file, steps=10, checkpoint_every=10),
                 "--out", str(run)]) == 0
    assert "step 5: non-finite loss or gradient norm; update skipped" in capsys.readouterr().err
    state = json.loads((run / "checkpoints" / "step-000010" / "trainer_state.json").read_text())
    assert state["bad_steps_total"] == 1
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(str(run / "checkpoints/step-000010/model.safetensors")).values())


def test_consecutive_non_finite_steps_stop_the_run(tmp_path, corpus_file, monkeypatch, capsys):
    _poison_losses(monkeypatch, bad_calls=set(range(12, 100)))
    run = tmp_path / "run"
    code = main(["pretrain", "--config", _config(tmp_path, corpus_file, max_bad_steps=3), "--out", str(run)])
    err = capsys.readouterr().err
    assert code == 2
    assert "3 consecutive non-finite steps ending at step 14" in err and "step-000010" in err
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000010"


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, corpus_file, monkeypatch, capsys):
    real_save, calls = checkpoint_module.save_file, {"n": 0}

    def save_file(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_file", save_file)
    run = tmp_path / "run"
    code = main(["pretrain", "--config", _config(tmp_path, corpus_file), "--out", str(run)])
    err = capsys.readouterr().err
    assert code == 2 and "No space left on device" in err and "(step-000010) is intact" in err
    assert checkpoint_module.verify_checkpoint(run / "checkpoints" / "step-000010") is None
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")] == []
    assert main(["evaluate", str(run)]) == 0


def test_resuming_with_a_changed_model_shape_is_refused(tmp_path, corpus_file, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", "--config", _config(tmp_path, corpus_file, steps=10), "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["pretrain", "--resume", str(run), "--set", "model.d_model=64", "--set", "train.steps=20"]) == 2
    err = capsys.readouterr().err
    assert "does not fit this model" in err and "shape differs" in err and "Traceback" not in err
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["d_model"] == 32  # run left as it was
