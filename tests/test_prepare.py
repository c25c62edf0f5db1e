import bz2
import dataclasses
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lmforge.cli import main
from lmforge.config import DataConfig, SplitConfig, TokenizerConfig
from lmforge.data import prepare as prepare_module
from lmforge.data.prepare import prepare
from lmforge.data.store import TokenStore
from lmforge.data.tokenizer import tokenizer_sha256, train_tokenizer
from lmforge.errors import LmforgeError

ROOT = Path(__file__).resolve().parent.parent


def _corpus(path: Path, docs: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    words = ["river", "stone", "bridge", "baker", "morning", "valley", "the", "a", "of", "and", "went", "saw",
             "children", "water", "field", "wheat", "said", "storm", "home", "bread"]
    lines = [json.dumps({"text": " ".join(rng.choice(words, size=int(rng.integers(20, 200)))) + "."})
             for _ in range(docs)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpus_and_tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    corpus = _corpus(root / "docs.jsonl", 3000)
    texts = (json.loads(line)["text"] for line in corpus.read_text().splitlines()[:500])
    tokenizer = train_tokenizer(texts, TokenizerConfig(kind="bpe", vocab_size=300), show_progress=False)
    tokenizer.save(str(root / "tokenizer.json"))
    return corpus, root / "tokenizer.json"


def _config(corpus, store, tokenizer=None, by="document", shard_tokens=8000):
    return DataConfig(corpus=[str(corpus)], store=str(store), shard_tokens=shard_tokens,
                      tokenizer=TokenizerConfig(kind="bpe", vocab_size=300, path=tokenizer and str(tokenizer),
                                                train_max_bytes=300_000),
                      split=SplitConfig(by=by, val_fraction=0.1))


def _files(store: Path) -> dict[str, bytes]:
    """Every file of a store, the manifest without its `build` record (how long it took, with how many workers)."""
    out = {}
    for path in sorted(store.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            if path.name == "manifest.json":
                manifest = json.loads(data)
                manifest.pop("build")
                data = json.dumps(manifest, sort_keys=True).encode()
            out[str(path.relative_to(store))] = data
    return out


def test_one_and_two_workers_build_identical_stores(tmp_path, corpus_and_tokenizer):
    corpus, tokenizer = corpus_and_tokenizer
    one = prepare(_config(corpus, tmp_path / "one", tokenizer), progress=False, workers=1)
    two = prepare(_config(corpus, tmp_path / "two", tokenizer), progress=False, workers=2)
    files = _files(one)
    assert len([f for f in files if f.endswith(".bin")]) > 5
    assert files == _files(two)
    store = TokenStore(two)
    assert store.verify() == []
    assert store.manifest["build"]["workers"] == 2


def test_resume_after_kill_is_byte_identical_to_an_unbroken_run(tmp_path, corpus_and_tokenizer):
    corpus, tokenizer = corpus_and_tokenizer
    reference = prepare(_config(corpus, tmp_path / "ref", tokenizer), progress=False, workers=1)
    config = _config(corpus, tmp_path / "store", tokenizer)
    script = (f"from lmforge.config import *; from lmforge.data.prepare import prepare; "
              f"prepare(DataConfig(corpus=[{str(corpus)!r}], store={config.store!r}, shard_tokens=8000, "
              f"tokenizer=TokenizerConfig(vocab_size=300, path={str(tokenizer)!r}, train_max_bytes=300000), split=SplitConfig(val_fraction=0.1)), "
              f"progress=False, workers=2)")
    child = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    progress = tmp_path / "store.partial" / "progress.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if len(json.loads(progress.read_text())["splits"]["train"]) >= 3:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL, "the prepare finished before it could be interrupted"
    assert not (tmp_path / "store").exists()  # nothing presented as a store
    with pytest.raises(LmforgeError):
        TokenStore(tmp_path / "store")

    path = prepare(config, progress=False, workers=2)
    assert TokenStore(path).manifest["build"]["resumed_shards"] >= 3
    assert _files(path) == _files(reference)
    assert not (tmp_path / "store.partial").exists()


@pytest.mark.parametrize("by", ["document", "tail"])
def test_interrupted_prepare_resumes_and_redoes_a_damaged_shard(tmp_path, corpus_and_tokenizer, monkeypatch, by):
    corpus, _ = corpus_and_tokenizer  # the tokenizer is trained here, and must be reused, not retrained
    reference = prepare(_config(corpus, tmp_path / "ref", by=by), progress=False)
    config = _config(corpus, tmp_path / "store", by=by)
    save = prepare_module._save_progress
    calls = []

    def interrupt_after_four_shards(root, state):
        save(root, state)
        calls.append(1)
        if len(calls) == 5:  # the tokenizer's record, then four shards
            raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "_save_progress", interrupt_after_four_shards)
    with pytest.raises(KeyboardInterrupt):
        prepare(config, progress=False)
    monkeypatch.setattr(prepare_module, "_save_progress", save)
    partial = tmp_path / "store.partial"
    state = json.loads((partial / "progress.json").read_text())
    damaged = partial / state["splits"]["train"][2]["bin"]
    damaged.write_bytes(b"\x00\x00" + damaged.read_bytes()[2:])

    path = prepare(config, progress=False)
    assert TokenStore(path).manifest["build"]["resumed_shards"] == 2  # shards 0, 1 kept; 2 re-encoded
    assert _files(path) == _files(reference)


def test_bad_inputs_are_counted_and_named_not_tracebacks(tmp_path, caplog):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    good = "A plain sentence about rivers and stones. " * 40
    (corpus / "good.txt").write_text(good, encoding="utf-8")
    (corpus / "latin1.txt").write_bytes("caf\xe9 au lait, tr\xe8s bien. ".encode("latin-1") * 20)
    (corpus / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    (corpus / "empty.txt").write_bytes(b"")
    (corpus / "broken.txt.gz").write_bytes(gzip.compress(good.encode())[:-20])  # truncated archive
    (corpus / "notes.jsonl").write_text(json.dumps({"text": good}) + "\n{not json\n" + json.dumps({"text": good}) + "\n")
    (corpus / "more.txt.bz2").write_bytes(bz2.compress(good.encode()))
    config = DataConfig(corpus=[str(corpus)], tokenizer=TokenizerConfig(kind="char"), store=str(tmp_path / "s"),
                        split=SplitConfig(by="tail", val_fraction=0.1))
    store = TokenStore(prepare(config, progress=False))
    stats = store.manifest["corpus"]
    err = caplog.text  # the library logs its warnings; the CLI shows them on stderr
    assert stats["files_with_replaced_bytes"] == 1 and stats["bad_json_lines"] == 1
    assert f"{corpus / 'notes.jsonl'}:2: malformed JSON line skipped" in err
    skipped = " ".join(stats["skipped_files"])
    assert "image.txt (binary file)" in skipped and "broken.txt.gz (unreadable" in skipped
    assert "image.txt" in err
    assert stats["documents"] == 5  # good, latin1 (replaced), two JSONL records, more; empty.txt has none


def _cli_error(args, capsys) -> str:
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err
    return err.splitlines()[-1]


def test_parquet_column_is_read_and_a_missing_column_is_one_line(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    texts = [f"row {i}: the baker went to the river with bread." for i in range(300)]
    pq.write_table(pa.table({"body": texts, "n": list(range(300))}), tmp_path / "t.parquet", row_group_size=64)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data:\n  corpus: [{tmp_path / 't.parquet'}]\n  text_field: body\n  store: {tmp_path / 's'}\n"
                      f"  tokenizer: {{kind: char}}\n  split: {{val_fraction: 0.2}}\n")
    assert main(["prepare", "--config", str(recipe), "--workers", "2"]) == 0
    store = TokenStore(tmp_path / "s")
    assert store.manifest["corpus"]["documents"] == 300

    recipe.write_text(recipe.read_text().replace("body", "content").replace(str(tmp_path / "s"), str(tmp_path / "x")))
    err = _cli_error(["prepare", "--config", str(recipe)], capsys)
    assert err.startswith("lmforge prepare: error:") and "no column 'content' (found: body, n)" in err
    assert not (tmp_path / "x").exists()


def test_missing_jsonl_field_names_file_and_line(tmp_path, capsys):
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data:\n  corpus: [{tmp_path / 'c.jsonl'}]\n  store: {tmp_path / 's'}\n"
                      f"  tokenizer: {{kind: char}}\n")
    err = _cli_error(["prepare", "--config", str(recipe)], capsys)
    assert f"{tmp_path / 'c.jsonl'}:2: no field 'text'" in err
    assert not (tmp_path / "s").exists()
    assert not (tmp_path / "s.partial").exists()  # a build stopped by bad input leaves nothing behind


def test_a_long_document_is_stored_as_if_encoded_whole(tmp_path, corpus_and_tokenizer):
    """Documents beyond data.max_document_chars go in pieces; the store is the same byte for byte."""
    corpus, tokenizer = corpus_and_tokenizer
    lines = corpus.read_text().splitlines()
    long_doc = json.dumps({"text": " ".join(json.loads(line)["text"] for line in lines[:400])})  # ~250k chars
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("\n".join(lines[400:700] + [long_doc] + lines[700:900]) + "\n")

    def build(name, max_chars, workers):
        config = dataclasses.replace(_config(mixed, tmp_path / name, tokenizer), max_document_chars=max_chars)
        return prepare(config, progress=False, workers=workers)

    whole = _files(build("whole", 10**7, 1))
    manifest = json.loads(whole.pop("manifest.json"))
    assert manifest["corpus"]["documents"] == 501
    for name, workers in (("pieces1", 1), ("pieces2", 2)):
        pieces = _files(build(name, 3000, workers))
        pieces_manifest = json.loads(pieces.pop("manifest.json"))
        assert pieces == whole
        assert pieces_manifest["splits"] == manifest["splits"]


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_no_tmp_shard(tmp_path, corpus_and_tokenizer,
                                                                         monkeypatch, capsys):
    import errno

    from lmforge.data import store as store_module

    corpus, tokenizer = corpus_and_tokenizer
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data:\n  corpus: [{corpus}]\n  store: {tmp_path / 's'}\n  shard_tokens: 8000\n"
                      f"  tokenizer: {{path: {tokenizer}}}\n")
    real_fsync, calls = os.fsync, []

    def full_at_the_third_shard(fd):
        calls.append(fd)
        if len(calls) == 5:  # tokenizer record, two shards with their .idx, then the third shard's .bin
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(store_module.os, "fsync", full_at_the_third_shard)
    err = _cli_error(["prepare", "--config", str(recipe)], capsys)
    assert "cannot write" in err and "No space left on device" in err and str(tmp_path / "s.partial") in err
    assert not list((tmp_path / "s.partial").rglob("*.tmp"))
    assert not (tmp_path / "s").exists()
    monkeypatch.setattr(store_module.os, "fsync", real_fsync)
    assert main(["prepare", "--config", str(recipe)]) == 0  # space freed: the build resumes and completes
    assert TokenStore(tmp_path / "s").verify() == []


def test_a_tokenizer_trained_on_a_long_document_is_the_one_trained_on_it_whole(tmp_path, corpus_and_tokenizer):
    """Training sees long documents in pieces cut at spaces: the same words, so the same tokenizer."""
    corpus, _ = corpus_and_tokenizer
    text = " ".join(json.loads(line)["text"] for line in corpus.read_text().splitlines()[:1500])  # ~1 MB, one line
    (tmp_path / "one.txt").write_text(text)
    config = DataConfig(corpus=[str(tmp_path / "one.txt")], store=str(tmp_path / "s"), max_document_chars=20_000,
                        tokenizer=TokenizerConfig(kind="bpe", vocab_size=300), split=SplitConfig(by="tail"))
    store = TokenStore(prepare(config, progress=False))
    whole = train_tokenizer([text], config.tokenizer, show_progress=False)
    assert store.manifest["tokenizer_sha256"] == tokenizer_sha256(whole)
