"""prepare as datatrove tasks (--executor local): the same store as a local prepare, for any task count."""

import json

import pytest

from lmforge.cli import main
from lmforge.data.prepare import prepare
from lmforge.data.prepare_tasks import EncodeFiles
from lmforge.data.store import TokenStore
from lmforge.errors import LmforgeError
from test_prepare import _config, _files, corpus_and_tokenizer  # noqa: F401  (a fixture)

pytest.importorskip("datatrove")


@pytest.fixture(scope="module")
def split_corpus(tmp_path_factory, corpus_and_tokenizer):
    """The test corpus as five files (one with a document longer than max_document_chars)."""
    corpus, tokenizer = corpus_and_tokenizer
    folder = tmp_path_factory.mktemp("split") / "corpus"
    folder.mkdir()
    lines = corpus.read_text().splitlines()
    for i in range(5):
        chunk = lines[i * 300:(i + 1) * 300]
        if i == 2:
            chunk.append(json.dumps({"text": " ".join(json.loads(line)["text"] for line in lines[:100])}))
        (folder / f"part-{i}.jsonl").write_text("\n".join(chunk) + "\n")
    return folder, tokenizer


def _build(folder, tokenizer, store, by="document", **data):
    config = _config(folder, store, tokenizer, by=by)
    for key, value in {"max_document_chars": 5000, **data}.items():
        setattr(config, key, value)
    return prepare(config, progress=False, workers=2)


@pytest.mark.parametrize("by", ["document", "tail"])
def test_tasks_build_the_store_a_local_prepare_builds_for_any_task_count(tmp_path, split_corpus, by):
    folder, tokenizer = split_corpus
    reference = _files(_build(folder, tokenizer, tmp_path / "local", by=by))
    assert len([f for f in reference if f.endswith(".bin")]) > 3
    for tasks in (1, 2, 5):
        store = _build(folder, tokenizer, tmp_path / f"tasks{tasks}", by=by, executor="local", tasks=tasks)
        assert _files(store) == reference, f"{tasks} tasks"
        assert TokenStore(store).verify() == []


def test_a_failed_task_reruns_alone_and_the_store_still_verifies(tmp_path, split_corpus, monkeypatch):
    folder, tokenizer = split_corpus
    reference = _files(_build(folder, tokenizer, tmp_path / "local"))
    encode_file = EncodeFiles._encode_file

    def fail_on_file_three(self, number, *args):
        if number == 3:
            raise RuntimeError("pre-empted")
        return encode_file(self, number, *args)

    monkeypatch.setattr(EncodeFiles, "_encode_file", fail_on_file_three)
    with pytest.raises(LmforgeError, match="not complete"):
        _build(folder, tokenizer, tmp_path / "store", executor="local", tasks=5)
    assert not (tmp_path / "store").exists()  # nothing presented as a store
    parts = tmp_path / "store.partial" / "parts"
    done = {p.name: p.stat().st_mtime_ns for p in parts.glob("*.json")}
    assert "000003.json" not in done and len(done) >= 1
    missing = sorted(n for n in range(5) if f"{n:06d}.json" not in done)

    monkeypatch.setattr(EncodeFiles, "_encode_file", encode_file)
    rerun = []
    monkeypatch.setattr("lmforge.data.prepare_tasks.read_parts", _recording(rerun))
    store = _build(folder, tokenizer, tmp_path / "store", executor="local", tasks=5)
    # finished parts were kept as they were; only the unfinished tasks' files were encoded again
    assert {name: mtime for name, mtime in rerun[0].items() if name in done} == done
    assert sorted(name for name in rerun[0] if name not in done) == [f"{n:06d}.json" for n in missing]
    assert _files(store) == reference
    assert TokenStore(store).verify() == []


def _recording(seen):
    """read_parts, noting the parts' .json files (name -> mtime) the merge found."""
    from lmforge.data import prepare_tasks

    read_parts = prepare_tasks.read_parts

    def record(parts, count, dtype):
        seen.append({p.name: p.stat().st_mtime_ns for p in parts.glob("*.json")})
        return read_parts(parts, count, dtype)

    return record


def test_an_executor_that_is_not_installed_names_the_extra(tmp_path, split_corpus, capsys, monkeypatch):
    import sys

    folder, tokenizer = split_corpus
    monkeypatch.setitem(sys.modules, "ray", None)  # as if ray were not installed
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data:\n  corpus: [{folder}]\n  store: {tmp_path / 's'}\n  tokenizer: {{path: {tokenizer}}}\n")
    assert main(["prepare", "--config", str(recipe), "--executor", "ray"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("lmforge prepare: error: data.executor=ray needs packages that are not installed: "
                       "pip install 'lmforge[cluster]' (ray)")
