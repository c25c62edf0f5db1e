import json

import numpy as np
import pytest

from lmforge.config import DataConfig, SplitConfig, TokenizerConfig
from lmforge.data.prepare import prepare
from lmforge.data.store import SplitWriter, TokenStore, move_tail
from lmforge.errors import LmforgeError


def _write_split(root, docs, shard_tokens):
    writer = SplitWriter(root, "train", np.dtype(np.uint16), shard_tokens)
    for doc in docs:
        writer.add(np.asarray(doc))
    writer.flush()
    return writer


def _manifest(root, writers):
    manifest = {"format": "lmforge-token-store", "version": 1, "dtype": "uint16",
                "splits": {w.name: w.summary() for w in writers}}
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_store_round_trip_across_shards(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 60000, size=rng.integers(1, 50)) for _ in range(40)]
    writer = _write_split(tmp_path, docs, shard_tokens=100)
    assert len(writer.shards) > 3
    _manifest(tmp_path, [writer])
    split = TokenStore(tmp_path).split("train")
    flat = np.concatenate(docs)
    assert split.num_tokens == len(flat)
    assert np.array_equal(split.read(0, len(flat)), flat)
    assert np.array_equal(split.read(95, 30), flat[95:125])  # crosses a shard boundary
    assert np.array_equal(split.doc_starts, np.cumsum([0] + [len(d) for d in docs[:-1]]))
    assert TokenStore(tmp_path).verify() == []


def test_move_tail_splits_the_stream_exactly(tmp_path):
    docs = [np.arange(i * 10, i * 10 + 10) for i in range(10)]  # 100 tokens in 10 docs
    train = _write_split(tmp_path, docs, shard_tokens=25)
    val = SplitWriter(tmp_path, "val", np.dtype(np.uint16), 25)
    move_tail(train, val, 35)
    _manifest(tmp_path, [train, val])
    store = TokenStore(tmp_path)
    assert np.array_equal(store.split("train").read(0, 65), np.arange(65))
    assert np.array_equal(store.split("val").read(0, 35), np.arange(65, 100))
    # the document cut at 65 continues as the first validation document
    assert store.split("val").doc_starts.tolist() == [0, 5, 15, 25]
    assert store.verify() == []


def test_corrupted_shard_is_detected(tmp_path):
    writer = _write_split(tmp_path, [np.arange(50)], shard_tokens=100)
    _manifest(tmp_path, [writer])
    path = tmp_path / writer.shards[0]["bin"]
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))
    problems = TokenStore(tmp_path).verify()
    assert len(problems) == 1 and writer.shards[0]["bin"] in problems[0] and "sha256" in problems[0]


def _one_shard_store(root, ids, vocab_size):
    writer = _write_split(root, [np.asarray(ids)], shard_tokens=1000)
    manifest = {"format": "lmforge-token-store", "version": 1, "dtype": "uint16", "vocab_size": vocab_size,
                "splits": {"train": writer.summary()}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root / writer.shards[0]["bin"]


def test_a_same_size_corruption_is_refused_at_first_open_in_one_line(tmp_path):
    path = _one_shard_store(tmp_path, np.arange(100) % 50, vocab_size=50)
    data = bytearray(path.read_bytes())
    data[10] ^= 0x01  # same size, different content: only the checksum can tell
    path.write_bytes(bytes(data))
    with pytest.raises(LmforgeError, match="corrupt .*sha256") as info:
        TokenStore(tmp_path).split("train")
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_ids_outside_the_vocabulary_are_refused_even_with_a_matching_checksum(tmp_path):
    _one_shard_store(tmp_path, [1, 2, 3, 60_000], vocab_size=50)  # a manifest that does not fit its shards
    with pytest.raises(LmforgeError, match="token id 60000, outside the vocabulary of 50"):
        TokenStore(tmp_path).split("train")
    assert any("outside the vocabulary" in p for p in TokenStore(tmp_path).verify())


def test_a_shard_is_hashed_once_per_process(tmp_path, monkeypatch):
    from lmforge.data import store as store_module

    _one_shard_store(tmp_path, np.arange(100) % 50, vocab_size=50)
    calls = []
    check = store_module.shard_problem
    monkeypatch.setattr(store_module, "shard_problem", lambda *a: calls.append(1) or check(*a))
    for _ in range(3):
        TokenStore(tmp_path).split("train")
    assert len(calls) == 1


def test_unknown_store_version_is_refused(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "lmforge-token-store", "version": 99}))
    with pytest.raises(LmforgeError, match="version"):
        TokenStore(tmp_path)


def test_prepare_splits_by_document_and_reuses_the_store(tmp_path):
    corpus = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": f"document number {i} " + "word " * (i % 7 + 3)}) for i in range(400)]
    corpus.write_text("\n".join(lines) + "\n")
    config = DataConfig(corpus=[str(corpus)], tokenizer=TokenizerConfig(kind="bpe", vocab_size=300),
                        split=SplitConfig(by="document", val_fraction=0.2), store=str(tmp_path / "store"))
    path = prepare(config, progress=False)
    store = TokenStore(path)
    train_docs = store.manifest["splits"]["train"]["documents"]
    val_docs = store.manifest["splits"]["val"]["documents"]
    assert train_docs + val_docs == 400
    assert 40 <= val_docs <= 120  # about 20%
    assert not (tmp_path / "store.partial").exists()
    mtime = (path / "manifest.json").stat().st_mtime_ns
    assert prepare(config, progress=False) == path  # up to date: nothing rebuilt
    assert (path / "manifest.json").stat().st_mtime_ns == mtime
    # every document ends with the end-of-text token
    split = store.split("train")
    eos = store.manifest["eos_id"]
    ends = np.append(split.doc_starts[1:], split.num_tokens) - 1
    assert all(split.read(int(e), 1)[0] == eos for e in ends)
