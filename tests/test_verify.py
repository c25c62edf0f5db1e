"""`lmforge verify STORE|RUN`: every checksum of a store, or of a run's checkpoints and its store."""

import yaml

from conftest import tiny_config_dict
from lmforge.cli import main


def _flip_a_byte(path, at=7):
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_verify_passes_a_whole_run_and_names_a_damaged_checkpoint_and_store_shard(tmp_path, corpus_file, capsys):
    config = tiny_config_dict(corpus_file, steps=20)
    config["data"]["store"] = str(tmp_path / "store")
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    assert main(["pretrain", "--config", str(recipe), "--out", str(run)]) == 0
    capsys.readouterr()

    assert main(["verify", str(run)]) == 0
    out = capsys.readouterr().out
    assert "2 checkpoints" in out and f"token store {tmp_path / 'store'}" in out and "every checksum matches" in out
    assert main(["verify", str(tmp_path / "store")]) == 0
    capsys.readouterr()

    _flip_a_byte(run / "checkpoints" / "step-000010" / "model.safetensors", at=-5)
    _flip_a_byte(next((tmp_path / "store" / "train").glob("shard-*.bin")))
    assert main(["verify", str(run)]) == 2
    captured = capsys.readouterr()
    bad = [line for line in captured.out.splitlines() if line.startswith("BAD:")]
    assert len(bad) == 2
    assert "step-000010" in bad[0] and "model.safetensors checksum mismatch" in bad[0]
    assert "train/shard-00000.bin is corrupt" in bad[1]
    assert captured.err.strip().splitlines() == [f"lmforge verify: error: {run}: 2 problems found (listed above)"]

    assert main(["verify", str(tmp_path / "store")]) == 2
    assert main(["verify", str(tmp_path)]) == 2
    assert "neither a token store" in capsys.readouterr().err
