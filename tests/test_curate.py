import json

import numpy as np
import pytest

from lmforge.cli import main
from lmforge.config import CurateConfig, DataConfig, SplitConfig, TokenizerConfig
from lmforge.data.curate import curate
from lmforge.data.prepare import prepare
from lmforge.data.store import TokenStore

pytest.importorskip("datatrove")

GOOD = """The village sat at the edge of a wide valley, where the river turned slowly toward the sea.
Every morning the baker opened his shop before the sun had risen over the hills.
People came from the farms with baskets of eggs and jars of honey to trade for his bread.
In the evenings the children played by the old stone bridge until their parents called them home.
The school teacher told them stories about the storms that had flooded the valley long ago.
She said that the river was patient, and that it always remembered the paths it had taken.
When the spring rains came, the farmers watched the water rise with careful and worried eyes.
Most years it stayed within its banks, and the fields turned green with young wheat and barley."""
# One hand-made document per filter that only that filter's rule should catch in this pair.
BAD = {
    "gopher_repetition": "\n".join(["Buy cheap watches online today at the best price."] * 30),
    "gopher_quality": "Click here. Subscribe now. Great deals today.",  # far fewer than 50 words
    "c4": GOOD + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit.",
    "fineweb": "\n".join(f"Item number {i} in stock" for i in range(40)),  # no line ends in punctuation
}


def _jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def _texts(files):
    return [json.loads(line)["text"] for f in files for line in f.read_text(encoding="utf-8").splitlines()]


def _random_docs(n, words=120, seed=0):
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = ["".join(rng.choice(letters, size=6)) for _ in range(5000)]  # MinHash ignores digits
    return [" ".join(rng.choice(vocab, size=words)) + "." for _ in range(n)]


@pytest.mark.parametrize("name", sorted(BAD))
def test_each_quality_filter_drops_its_bad_example_and_keeps_the_good_one(tmp_path, name):
    config = DataConfig(corpus=[str(_jsonl(tmp_path / "c.jsonl", [GOOD, BAD[name]]))],
                        curate=CurateConfig(filters=[name]))
    result = curate(config, tmp_path / "work", workers=1, progress=False)
    assert _texts(result.files) == [GOOD]
    read, step = result.steps
    assert (read["step"], read["documents"]) == ("read", 2)
    assert step["step"] == name and step["removed_documents"] == 1
    assert step["removed_bytes"] == len(BAD[name].encode("utf-8"))


def _planted(tmp_path):
    originals = _random_docs(30)
    exact = [originals[3], originals[17]]
    near = []
    for i in (5, 11, 22):  # edited copies: one word replaced, one appended
        words = originals[i].split()
        words[40] = "changed"
        near.append(" ".join(words) + " again")
    corpus = _jsonl(tmp_path / "c.jsonl", originals + exact + near)
    return originals, exact, near, corpus


def test_minhash_removes_planted_exact_and_near_duplicates_and_keeps_the_rest(tmp_path):
    originals, exact, near, corpus = _planted(tmp_path)
    config = DataConfig(corpus=[str(corpus)], curate=CurateConfig(dedup="minhash", chunk_bytes=8000))
    result = curate(config, tmp_path / "work", workers=2, progress=False)
    assert len(result.files) > 2  # several tasks
    assert _texts(result.files) == originals
    assert result.steps[-1]["step"] == "minhash_dedup"
    assert result.steps[-1]["removed_documents"] == len(exact) + len(near)


def test_exact_dedup_removes_only_identical_copies(tmp_path):
    originals, exact, near, corpus = _planted(tmp_path)
    config = DataConfig(corpus=[str(corpus)], curate=CurateConfig(dedup="exact"))
    result = curate(config, tmp_path / "work", workers=1, progress=False)
    assert _texts(result.files) == originals + near
    assert result.steps[-1] == {"step": "exact_dedup", "documents": 33, "bytes": sum(len(t) for t in originals + near),
                                "removed_documents": 2, "removed_bytes": sum(len(t) for t in exact)}


def test_normalize_repairs_mojibake(tmp_path):
    config = DataConfig(corpus=[str(_jsonl(tmp_path / "c.jsonl", ["The cafÃ© was open.\n" + GOOD]))],
                        curate=CurateConfig(normalize=True))
    result = curate(config, tmp_path / "work", workers=1, progress=False)
    assert _texts(result.files) == ["The café was open.\n" + GOOD]
    assert result.steps[1]["removed_documents"] == 0
    assert result.steps[1]["removed_bytes"] == len("Ã©".encode()) - len("é".encode())


def test_prepare_records_curation_in_the_manifest_and_report_shows_it(tmp_path, capsys):
    docs = [GOOD.replace("village", f"village {i}") for i in range(40)] + [GOOD.replace("village", "village 3")]
    docs += [BAD["gopher_quality"]] * 2
    corpus = _jsonl(tmp_path / "c.jsonl", docs)
    config = DataConfig(corpus=[str(corpus)], tokenizer=TokenizerConfig(kind="bpe", vocab_size=300),
                        split=SplitConfig(by="tail", val_fraction=0.1), store=str(tmp_path / "store"),
                        curate=CurateConfig(filters=["gopher_quality"], dedup="exact"))
    store = TokenStore(prepare(config, progress=False))
    curation = store.manifest["curation"]
    steps = {s["step"]: s for s in curation["steps"]}
    assert steps["read"]["documents"] == 43 and steps["gopher_quality"]["removed_documents"] == 2
    assert steps["exact_dedup"]["removed_documents"] == 1 and curation["documents_kept"] == 40
    assert not (store.path / "curate").exists()  # intermediates are gone once the store is whole

    assert main(["report", str(store.path)]) == 0
    out = capsys.readouterr().out
    assert "gopher_quality" in out and "exact_dedup" in out
    assert (store.path / "plots" / "curation.png").is_file()


def test_chunks_that_curation_empties_are_not_reported_as_empty_input_files(tmp_path, capsys):
    # Three chunks of ~2 kB: the first keeps its documents, the other two lose every one to the filter.
    docs = [GOOD.replace("village", f"village {i}") for i in range(3)] + [BAD["gopher_quality"]] * 60
    config = DataConfig(corpus=[str(_jsonl(tmp_path / "c.jsonl", docs))], tokenizer=TokenizerConfig(kind="char"),
                        split=SplitConfig(by="tail", val_fraction=0.1), store=str(tmp_path / "store"),
                        curate=CurateConfig(filters=["gopher_quality"], chunk_bytes=2000))
    store = TokenStore(prepare(config, progress=False))
    assert store.manifest["curation"]["documents_kept"] == 3
    assert len(json.loads((tmp_path / "store" / "manifest.json").read_text())["curation"]["steps"]) == 2
    assert store.manifest["corpus"]["skipped_files"] == []
    assert "skipping" not in capsys.readouterr().err
