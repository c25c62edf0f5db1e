"""bench/gpu_throughput.py keeps working: its tiny shapes train on a CPU in a subprocess, as a user runs it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_throughput.py"


def test_tiny_run_reports_both_models_with_throughput_and_mfu(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--steps", "2", "--warmup", "1",
                           "--json", str(out)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    models = {r["model"]: r for r in report["models"]}
    assert set(models) == {"gpt-tiny", "bert-tiny"}
    assert report["measured_peak_flops"] > 0 and report["published_peak_flops"] is None  # no published CPU peak
    for name, r in models.items():
        assert r["tokens_per_s"] > 0 and 0 < r["mfu_measured"] <= 1, r
        # the MFU is tokens/s x the model's own FLOPs per token over the measured peak
        assert abs(r["mfu_measured"] - r["tokens_per_s"] * r["flops_per_token"] / report["measured_peak_flops"]) < 1e-9
        assert r["step_ms"] * 1e-3 * r["tokens_per_s"] == pytest.approx(r["batch"] * r["seq_len"])
    assert 0.1 < models["bert-tiny"]["mask_rate"] < 0.2  # lmforge's masking selects ~15% of the non-special tokens
    lines = proc.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines[-2:]] == ["gpt-tiny", "bert-tiny"]
    assert all(line.split()[1] == "mfu" and line.split()[2].endswith("%") for line in lines[-2:])
    table = next(i for i, line in enumerate(lines) if line.startswith("model"))
    assert lines[table + 1].split()[0] == "gpt-tiny" and lines[table + 2].split()[0] == "bert-tiny"


def test_full_shapes_on_a_cpu_are_refused_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu"], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1 and "--tiny" in proc.stderr
