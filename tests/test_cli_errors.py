"""Bad input gives one clear line and exit code 2, never a traceback, and leaves nothing half-written."""

import subprocess
import sys


from lmforge.cli import main


def _run(args, capsys):
    code = main(args)
    err = capsys.readouterr().err
    return code, err


def test_missing_corpus_file(tmp_path, capsys):
    code, err = _run(["prepare", "--set", f"data.corpus={tmp_path / 'nope.txt'}"], capsys)
    assert code == 2
    assert err.strip() == f"lmforge prepare: error: corpus file not found: {tmp_path / 'nope.txt'}"


def test_directory_without_text_files(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, err = _run(["prepare", "--set", f"data.corpus={tmp_path / 'empty'}"], capsys)
    assert code == 2 and "holds no text files" in err


def test_empty_corpus_leaves_no_store(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    store = tmp_path / "store"
    code, err = _run(["prepare", "--set", f"data.corpus={empty}", "--set", f"data.store={store}"], capsys)
    assert code == 2 and "has no text" in err
    assert not store.exists() and not (tmp_path / "store.partial").exists()


def test_binary_and_undecodable_files_are_handled(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "good.txt").write_text("plain words " * 500)
    (corpus / "latin1.txt").write_bytes("caf\xe9 cr\xe8me ".encode("latin-1") * 300)
    (corpus / "image.bin").write_bytes(b"\x89PNG\x00\x00\x01" * 100)
    store = tmp_path / "store"
    code = main(["prepare", "--set", f"data.corpus={corpus}", "--set", f"data.store={store}",
                 "--set", "data.split.by=tail", "--set", "data.tokenizer.kind=char"])
    captured = capsys.readouterr()
    assert code == 0
    assert "skipping" in captured.err and "image.bin" in captured.err and "binary" in captured.err
    import json
    corpus_stats = json.loads((store / "manifest.json").read_text())["corpus"]
    assert corpus_stats["files_with_replaced_bytes"] == 1 and len(corpus_stats["skipped_files"]) == 1


def test_bad_config_key_and_impossible_values(capsys):
    code, err = _run(["pretrain", "--set", "train.lrr=0.1"], capsys)
    assert code == 2 and "unknown config key 'train.lrr'" in err and len(err.strip().splitlines()) == 1
    code, err = _run(["pretrain", "--set", "model.n_head=3"], capsys)
    assert code == 2 and "must divide" in err


def test_missing_run_directory(tmp_path, capsys):
    for verb in (["evaluate"], ["generate"], ["pretrain", "--resume"]):
        code, err = _run([*verb, str(tmp_path / "nothing")], capsys)
        assert code == 2 and "run directory not found" in err


def test_real_process_prints_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: [1\n")
    proc = subprocess.run([sys.executable, "-m", "lmforge", "pretrain", "--config", str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "not valid YAML" in proc.stderr
