"""Hostile input (issue 21): config values, corpus files and CLI flags end in one line naming what was
wrong, or are read correctly; nothing is lost without a word."""

import codecs
import dataclasses
import json

import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from conftest import TEXT, tiny_config_dict
from lmforge.cli import main
from lmforge.config import Config, config_from_dict, from_dict, load_config
from lmforge.data.corpus import CorpusStats, iter_documents, resolve_corpus_files
from lmforge.errors import LmforgeError
from lmforge.tasks.config import FinetuneConfig
from lmforge.tasks.experiment import ExperimentConfig, load_experiment


def _one_line_error(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# --- item 4: an empty corpus path --------------------------------------------------------------------


@pytest.mark.parametrize("corpus, key", [("", "data.corpus[0]"), ("   ", "data.corpus[0]"),
                                         (["a.txt", ""], "data.corpus[1]")])
def test_empty_corpus_path_is_an_error_naming_the_key(tmp_path, corpus_file, corpus, key):
    data = tiny_config_dict(corpus_file)
    data["data"]["corpus"] = [str(corpus_file) if c == "a.txt" else c for c in corpus] \
        if isinstance(corpus, list) else corpus
    with pytest.raises(LmforgeError) as err:
        config_from_dict(data)
    assert key in str(err.value) and "empty" in str(err.value)


def test_empty_corpus_path_from_the_command_line_is_refused(tmp_path, capsys, monkeypatch):
    (tmp_path / "private.txt").write_text(TEXT * 50)
    monkeypatch.chdir(tmp_path)  # today's reading of "" is "this directory, recursively"
    err = _one_line_error(capsys, ["prepare", "--set", "data.corpus=", "--set", "data.tokenizer.kind=char"])
    assert "data.corpus[0]" in err
    assert not (tmp_path / "cache").exists()


def test_empty_corpus_pattern_is_refused_by_the_corpus_reader_too():
    with pytest.raises(LmforgeError, match="empty"):
        resolve_corpus_files([""])


# --- item 5: every float key must be finite ------------------------------------------------------------


def _float_keys(cls, prefix: str):
    """Every key of a config dataclass whose value is a float (or a list of floats), recursively."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            yield from _float_keys(tp, f"{key}.")
        elif tp is float or float in typing.get_args(tp):
            yield key


def _set(data: dict, dotted: str, value) -> dict:
    node = data
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return data


PRETRAIN_FLOATS = sorted(_float_keys(Config, ""))
FINETUNE_FLOATS = sorted(_float_keys(FinetuneConfig, ""))


def test_the_float_keys_are_found():
    assert {"train.lr", "train.min_lr", "train.weight_decay", "train.grad_clip", "train.beta1", "train.beta2",
            "train.eps", "model.dropout", "mlm.mask_rate", "data.split.val_fraction"} <= set(PRETRAIN_FLOATS)
    assert {"lr", "head_lr", "layer_lr_decay", "epochs", "warmup", "dropout", "label_fraction"} <= set(FINETUNE_FLOATS)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), "nan", "inf", "-Infinity"])
@pytest.mark.parametrize("key", PRETRAIN_FLOATS)
def test_non_finite_pretraining_float_is_refused(corpus_file, key, value):
    with pytest.raises(LmforgeError) as err:
        config_from_dict(_set(tiny_config_dict(corpus_file), key, value))
    message = str(err.value)
    assert f"'{key}'" in message and "finite" in message and "\n" not in message


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "-inf"])
@pytest.mark.parametrize("key", FINETUNE_FLOATS)
def test_non_finite_finetuning_float_is_refused(key, value):
    with pytest.raises(LmforgeError) as err:
        from_dict(FinetuneConfig, {key: value}, "finetune").validate()
    assert f"'finetune.{key}'" in str(err.value) and "finite" in str(err.value)


def test_infinite_lr_on_the_command_line_is_one_line(capsys):
    err = _one_line_error(capsys, ["pretrain", "--set", "train.lr=.inf"])
    assert "train.lr" in err and "finite" in err


def test_negative_seeds_are_refused(corpus_file):
    with pytest.raises(LmforgeError, match="train.seed"):
        config_from_dict(_set(tiny_config_dict(corpus_file), "train.seed", -1))
    with pytest.raises(LmforgeError, match="finetune.seed"):
        from_dict(FinetuneConfig, {"seed": -1}, "finetune").validate()
    with pytest.raises(LmforgeError, match="seeds"):
        from_dict(ExperimentConfig, {"seeds": [1, -2]}).validate()


# --- item 9: numbers written as strings, wherever they come from ---------------------------------------


def test_yaml_scientific_notation_is_read_as_the_same_number_as_set(tmp_path, corpus_file):
    recipe = tmp_path / "r.yaml"
    data = tiny_config_dict(corpus_file)
    recipe.write_text(yaml.safe_dump(data) + "", encoding="utf-8")
    text = recipe.read_text().replace("lr: 0.003", "lr: 3e-3").replace("min_lr: 0.0003", "min_lr: 3.0e-4")
    text = text.replace("steps: 30", "steps: 3e1")
    recipe.write_text(text, encoding="utf-8")
    assert yaml.safe_load(text)["train"]["lr"] == "3e-3"  # what PyYAML hands us
    from_yaml = load_config(str(recipe))
    from_set = load_config(str(recipe), ["train.lr=3e-3", "train.min_lr=3e-4", "train.steps=30"])
    assert (from_yaml.train.lr, from_yaml.train.min_lr, from_yaml.train.steps) == (3e-3, 3e-4, 30)
    assert from_yaml.to_dict() == from_set.to_dict()
    assert isinstance(from_yaml.train.steps, int)


@pytest.mark.parametrize("key, value, message", [
    ("train.steps", "2.5", "'train.steps' must be an integer"),
    ("train.steps", "1e400", "'train.steps' must be an integer"),
    ("train.lr", "3e-4x", "'train.lr' must be a number"),
    ("train.lr", "", "'train.lr' must be a number"),
])
def test_strings_that_are_not_exact_numbers_are_refused(corpus_file, key, value, message):
    with pytest.raises(LmforgeError, match=message.replace("(", r"\(")):
        config_from_dict(_set(tiny_config_dict(corpus_file), key, value))


def test_strings_stay_strings_where_text_is_accepted(corpus_file):
    config = config_from_dict(_set(tiny_config_dict(corpus_file), "name", "1e3"))
    assert config.name == "1e3"
    from lmforge.tasks.config import TaskConfig
    assert from_dict(TaskConfig, {"text": "3", "label": 1}).text == "3"  # a header named "3", an index 1


def test_experiment_and_finetune_recipes_accept_scientific_notation(tmp_path):
    recipe = tmp_path / "exp.yaml"
    recipe.write_text("tasks: [sst2]\nfractions: [1e-1, 5e-1, 1]\nfinetune:\n  lr: 2e-5\n  weight_decay: 1e-2\n",
                      encoding="utf-8")
    config = load_experiment(str(recipe))
    assert config.fractions == [0.1, 0.5, 1.0] and config.finetune.lr == 2e-5
    assert load_experiment(str(recipe), ["fractions=[2.5e-1]"]).fractions == [0.25]


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "nan"], "--temperature"),
    (["--temperature", "inf"], "--temperature"),
    (["--top-k", "-3"], "--top-k"),
    (["--top-p", "nan"], "--top-p"),
    (["--top-p", "0"], "--top-p"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2 ** 64)], "--seed"),
    (["--max-new-tokens", "-1"], "--max-new-tokens"),
    (["--num-samples", "0"], "--num-samples"),
])
def test_generate_flags_are_checked_before_anything_is_loaded(tmp_path, capsys, flags, message):
    err = _one_line_error(capsys, ["generate", str(tmp_path / "no-run"), *flags])
    assert message in err and "run directory not found" not in err


@pytest.mark.parametrize("flags, message", [(["--top-k", "0"], "--top-k"), (["--top-k", "-3"], "--top-k")])
def test_fill_mask_flags_are_checked_before_anything_is_loaded(tmp_path, capsys, flags, message):
    err = _one_line_error(capsys, ["fill-mask", str(tmp_path / "no-run"), "a [MASK]", *flags])
    assert message in err


@pytest.mark.parametrize("flags", [["--batches", "-3"], ["--batches", "0"]])
def test_evaluate_batches_must_be_positive(tmp_path, capsys, flags):
    # -3 used to evaluate one batch, 0 the recipe's default, both without a word
    err = _one_line_error(capsys, ["evaluate", str(tmp_path / "no-run"), *flags])
    assert "--batches must be >= 1" in err


@pytest.mark.parametrize("flags, message", [
    (["--fractions", "nan"], "fractions[0]"),
    (["--fractions", "0.1,,1"], "--fractions: item 2 of '0.1,,1' is empty"),
    (["--fractions", "0.1;0.3"], "'fractions[0]' must be a number, got '0.1;0.3'"),
    (["--fractions", "1.5"], "fractions"),
    (["--seeds", "1,-1"], "seeds"),
    (["--seeds", "1.5"], "seeds[0]"),
])
def test_experiment_flags_are_one_line_errors(tmp_path, capsys, flags, message):
    err = _one_line_error(capsys, ["experiment", str(tmp_path / "no-run"), *flags])
    assert message in err


def test_experiment_fractions_in_scientific_notation_are_accepted(tmp_path, capsys):
    # Accepted by the recipe: the run that is missing is the next thing refused.
    err = _one_line_error(capsys, ["experiment", str(tmp_path / "no-run"), "--fractions", "1e-1,1",
                                   "--tasks", str(tmp_path)])
    assert "config key" not in err and "no train file" in err


# --- item 8: corpus input that used to vanish without a word -------------------------------------------


def _documents(patterns, **kw):
    stats = CorpusStats()
    docs = list(iter_documents([str(p) for p in patterns], stats=stats, **kw))
    return docs, stats


def test_unreadable_subdirectory_is_named_in_a_warning(tmp_path, capsys, monkeypatch):
    corpus = tmp_path / "corpus"
    (corpus / "locked").mkdir(parents=True)
    (corpus / "a.txt").write_text("readable text")
    (corpus / "locked" / "b.txt").write_text("text behind a permission error")
    locked = corpus / "locked"
    os.chmod(locked, 0)
    if os.geteuid() == 0:  # root reads anything: give it the error an ordinary user gets
        real_scandir = os.scandir

        def scandir(path="."):
            if Path(path) == locked:
                raise PermissionError(13, "Permission denied", str(path))
            return real_scandir(path)

        monkeypatch.setattr(os, "scandir", scandir)
    try:
        docs, stats = _documents([corpus])
    finally:
        os.chmod(locked, 0o755)
    assert [d.text for d in docs] == ["readable text"]
    err = capsys.readouterr().err
    assert str(locked) in err and "Permission denied" in err
    assert any(str(locked) in s for s in stats.skipped_files)


def test_empty_files_are_named_in_a_warning(tmp_path, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("some text")
    (corpus / "empty.txt").write_text("")
    (corpus / "blank.txt").write_text("  \n\n ")
    (corpus / "empty.jsonl").write_text("")
    for mode in ("file", "paragraph", "line"):
        docs, stats = _documents([corpus], txt_documents=mode)
        assert [d.text for d in docs] == ["some text"]
        err = capsys.readouterr().err
        for name in ("empty.txt", "blank.txt", "empty.jsonl"):
            assert f"{corpus / name}" in err and "empty" in err, (mode, err)
        assert sorted(Path(s.split(" (")[0]).name for s in stats.skipped_files) == \
            ["blank.txt", "empty.jsonl", "empty.txt"]


TEXT_WITH_ACCENTS = "Café crème, naïve façade.\nSecond line — with a dash.\n\nA new paragraph: 東京.\n"


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be", "utf-8"])
@pytest.mark.parametrize("mode", ["file", "paragraph", "line"])
def test_files_with_a_byte_order_mark_are_decoded(tmp_path, capsys, encoding, mode):
    bom = {"utf-16-le": codecs.BOM_UTF16_LE, "utf-16-be": codecs.BOM_UTF16_BE, "utf-32-le": codecs.BOM_UTF32_LE,
           "utf-32-be": codecs.BOM_UTF32_BE, "utf-8": codecs.BOM_UTF8}[encoding]
    path = tmp_path / "text.txt"
    path.write_bytes(bom + TEXT_WITH_ACCENTS.encode(encoding))
    reference = tmp_path / "reference.txt"
    reference.write_text(TEXT_WITH_ACCENTS, encoding="utf-8")
    docs, stats = _documents([path], txt_documents=mode)
    expected, _ = _documents([reference], txt_documents=mode)
    assert [d.text for d in docs] == [d.text for d in expected] and docs
    assert not stats.skipped_files and stats.files_with_replaced_bytes == 0
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-32-le"])
def test_jsonl_with_a_byte_order_mark_is_decoded(tmp_path, encoding):
    records = [{"text": "première"}, {"text": "zweite Zeile"}]
    bom = codecs.BOM_UTF16_LE if encoding == "utf-16-le" else codecs.BOM_UTF32_LE
    path = tmp_path / "data.jsonl"
    path.write_bytes(bom + "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode(encoding))
    docs, stats = _documents([path])
    assert [d.text for d in docs] == ["première", "zweite Zeile"] and stats.bad_json_lines == 0


def test_utf8_jsonl_with_a_byte_order_mark_keeps_its_first_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(codecs.BOM_UTF8 + b'{"text": "one"}\n{"text": "two"}\n')
    docs, stats = _documents([path])
    assert [d.text for d in docs] == ["one", "two"] and stats.bad_json_lines == 0


@pytest.mark.parametrize("encoding, named", [("utf-16-le", "UTF-16-LE"), ("utf-16-be", "UTF-16-BE"),
                                             ("utf-32-le", "UTF-32-LE")])
def test_text_without_a_byte_order_mark_names_its_likely_encoding(tmp_path, capsys, encoding, named):
    path = tmp_path / "text.txt"
    path.write_bytes((TEXT * 3).encode(encoding))
    docs, stats = _documents([path])
    assert docs == []
    err = capsys.readouterr().err
    assert str(path) in err and named in err and "without a byte-order mark" in err
    assert len(stats.skipped_files) == 1


def test_real_binary_is_still_called_binary(tmp_path, capsys):
    path = tmp_path / "image.bin"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4)
    docs, _ = _documents([path])
    assert docs == [] and "binary file" in capsys.readouterr().err


# --- item 8: characters outside a char vocabulary ----------------------------------------------------


def _char_tokenizer(family: str):
    from lmforge.config import TokenizerConfig
    from lmforge.data.tokenizer import train_tokenizer

    return train_tokenizer(["hello world, the cat sat"], TokenizerConfig(kind="char"), family, show_progress=False)


def test_unknown_characters_are_counted_in_one_warning(capsys):
    from lmforge.data.tokenizer import warn_unknown

    tok = _char_tokenizer("gpt")
    texts = ["héllo €€ world", "cat", "naïve"]
    unseen = sum(1 for text in texts for ch in text if ch not in set("hello world, the cat sat"))
    encodings = tok.encode_batch(texts, add_special_tokens=False)
    assert warn_unknown(tok, texts, encodings, "the prompts") == unseen == 6
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("warning: 6 characters of the prompts are not in the tokenizer's vocabulary")
    assert "'€' x2" in err and "'é'" in err and "'ï'" in err and "'v'" in err and "'n'" in err
    assert warn_unknown(tok, ["cat"], tok.encode_batch(["cat"]), "the prompts") == 0
    assert capsys.readouterr().err == ""


def test_unknown_characters_in_finetuning_inputs_are_counted(capsys):
    from lmforge.tasks.batches import encode_examples, encode_generation, task_tokenizer
    from lmforge.tasks.datasets import Example

    for family in ("gpt", "bert"):
        tok = task_tokenizer(_char_tokenizer(family), family, 64)
        examples = [Example("hé", "wörld", 0, "train:1"), Example("cat", None, 1, "train:2")]
        encode_examples(tok, examples)
        err = capsys.readouterr().err
        assert "2 characters" in err and "'é'" in err and "'ö'" in err, err
    tok = _char_tokenizer("gpt")
    encode_generation(tok, [Example("sät", None, "ok ✓", "train:1")], 64)
    err = capsys.readouterr().err
    assert "3 characters" in err and "'ä'" in err and "'✓'" in err and "'k'" in err


def test_generate_warns_about_prompt_characters_outside_the_vocabulary(tmp_path, corpus_file, capsys):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_config_dict(corpus_file, steps=2, eval_every=2, checkpoint_every=2,
                                                      sample_tokens=0)))
    run = tmp_path / "run"
    assert main(["pretrain", "--config", str(recipe), "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "Thé quick ☃", "--max-new-tokens", "3"]) == 0
    err = capsys.readouterr().err
    assert "2 characters of the prompt are not in the tokenizer's vocabulary" in err and "'☃'" in err


# --- issue 15: curation is an extra ---------------------------------------------------------------------


def test_curation_libraries_are_an_extra_that_test_pulls_in():
    import tomllib

    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
    names = lambda reqs: {r.split("[")[0].split(">")[0].split("=")[0].strip() for r in reqs}  # noqa: E731
    assert not {"datatrove", "spacy", "orjson"} & names(project["dependencies"])
    assert {"datatrove", "spacy", "orjson"} <= names(project["optional-dependencies"]["curate"])
    assert "lmforge[curate]" in project["optional-dependencies"]["test"]


@pytest.mark.parametrize("blocked", ["datatrove", "spacy"])
def test_curation_without_its_libraries_names_the_extra(tmp_path, corpus_file, capsys, monkeypatch, blocked):
    monkeypatch.setitem(sys.modules, blocked, None)  # `import blocked` now fails, as when it is not installed
    store = tmp_path / "store"
    err = _one_line_error(capsys, ["prepare", "--set", f"data.corpus={corpus_file}", "--set", f"data.store={store}",
                                   "--set", "data.curate.dedup=exact", "--set", "data.tokenizer.kind=char"])
    assert "pip install 'lmforge[curate]'" in err and blocked in err and "data.curate" in err
    assert not store.exists() and not Path(f"{store}.partial").exists()


def test_default_path_never_imports_the_curation_libraries(tmp_path, corpus_file):
    code = ("import sys; from lmforge.cli import main; "
            f"code = main(['prepare', '--set', 'data.corpus={corpus_file}', '--set', 'data.tokenizer.kind=char', "
            f"'--set', 'data.store={tmp_path / 'store'}']); "
            "print(sorted(m for m in ('datatrove', 'spacy', 'orjson') if m in sys.modules)); sys.exit(code)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    help_run = subprocess.run([sys.executable, "-X", "importtime", "-m", "lmforge", "--help"], capture_output=True,
                              text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert help_run.returncode == 0
    imported = {line.split("|")[-1].strip().split(".")[0] for line in help_run.stderr.splitlines() if "|" in line}
    assert not {"datatrove", "spacy", "orjson"} & imported
