import json
from collections import Counter
from pathlib import Path

import pytest

from lmforge.errors import LmforgeError
from lmforge.tasks import load_task, read_examples, resolve_task_config, subsample
from lmforge.tasks.datasets import Example

GLUE = (Path(__file__).resolve().parents[2] / "shared" / "data" / "glue").resolve()  # the loader reports real paths (shared/ may be a symlink)
needs_glue = pytest.mark.skipif(not GLUE.is_dir(), reason=f"GLUE data not at {GLUE}")


def make_task(root: Path, files: dict[str, str | bytes], yaml: str | None = None) -> Path:
    """A task directory holding `files` (name -> content) and, if given, a task.yaml."""
    folder = root / "mytask"
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        if isinstance(content, bytes):
            (folder / name).write_bytes(content)
        else:
            (folder / name).write_text(content, encoding="utf-8")
    if yaml is not None:
        (folder / "task.yaml").write_text(yaml, encoding="utf-8")
    return folder


# Figures from ../shared/data/glue/PROVENANCE.md: rows and label counts of train and dev.
@needs_glue
@pytest.mark.parametrize("name, folder, pair, metrics, train, dev", [
    ("cola", "CoLA", False, ["mcc"], {"1": 6023, "0": 2528}, {"1": 721, "0": 322}),
    ("SST-2", "SST-2", False, ["accuracy"], {"1": 37569, "0": 29780}, {"1": 444, "0": 428}),
    ("mrpc", "MRPC", True, ["f1", "accuracy"], {"1": 2474, "0": 1194}, {"1": 279, "0": 129}),
    ("wnli", "WNLI", True, ["accuracy"], {"1": 312, "0": 323}, {"0": 40, "1": 31}),
])
def test_glue_classification_tasks_load_by_name_with_provenance_counts(name, folder, pair, metrics, train, dev):
    task = load_task(name, GLUE)
    assert task.label_names == ["0", "1"] and task.num_outputs == 2 and task.positive_index == 1
    assert task.is_pair is pair and task.config.metrics == metrics and task.config.select_metric == metrics[0]
    for examples, expected in ((task.train, train), (task.dev, dev)):
        assert Counter(task.label_names[e.label] for e in examples) == expected
        assert all(e.text and (e.text_pair is not None) is pair for e in examples)
    assert Path(task.config.path) == GLUE / folder


@needs_glue
def test_glue_task_directory_is_recognised_by_its_folder_name():
    task = load_task(str(GLUE / "CoLA"))
    assert task.name == "cola" and len(task.train) == 8551 and len(task.dev) == 1043
    assert task.train[0].text == "Our friends won't buy this analysis, let alone the next one we propose."


@needs_glue
def test_glue_quotes_are_text_not_csv_quoting():
    task = load_task("mrpc", GLUE)
    assert task.train[0].text.startswith('Amrozi accused his brother , whom he called " the witness "')
    assert task.train[0].text_pair.startswith('Referring to him as only " the witness "')
    assert sum('"' in e.text for e in task.train) > 100


@needs_glue
def test_stsb_is_a_regression_task_with_float_scores():
    task = load_task("sts-b", GLUE)
    assert task.is_regression and task.num_outputs == 1 and task.label_names == []
    assert (len(task.train), len(task.dev)) == (5749, 1500)
    assert task.is_pair and task.config.metrics == ["spearman", "pearson"]
    assert task.train[0] == Example("A plane is taking off.", "An air plane is taking off.", 5.0,
                                    f"{GLUE / 'STS-B' / 'train.tsv'}:2")
    assert all(0.0 <= e.label <= 5.0 for e in task.train + task.dev)


def test_generic_task_dir_in_each_format_reads_the_same_examples(tmp_path):
    rows = [("a good film", "1"), ('the "so-called" plot, in short', "0"), ("fine", "1")]
    tsv = "text\tlabel\n" + "".join(f"{t}\t{l}\n" for t, l in rows)
    csv = "text,label\n" + "".join(('"' + t.replace('"', '""') + '"' if '"' in t or "," in t else t) + f",{l}\n"
                                   for t, l in rows)
    jsonl = "".join(json.dumps({"text": t, "label": int(l)}) + "\n" for t, l in rows)
    for fmt, content in (("tsv", tsv), ("csv", csv), ("jsonl", jsonl)):
        folder = make_task(tmp_path / fmt, {f"train.{fmt}": content, f"dev.{fmt}": content})
        task = load_task(folder)
        assert [(e.text, e.label) for e in task.train] == [(t, int(l)) for t, l in rows], fmt
        assert task.label_names == ["0", "1"] and task.name == "mytask" and task.config.metrics == ["accuracy"]


def test_task_yaml_sets_columns_by_index_labels_and_metrics(tmp_path):
    train = "x\tneg\tfirst one\tsecond one\nx\tpos\tthird\tfourth\nx\tneutral\ta\tb\n"
    yaml = ("format: tsv\nheader: false\ntext: 2\ntext_pair: 3\nlabel: 1\n"
            "labels: [neg, neutral, pos]\nmetrics: [accuracy, f1_macro]\nselect_metric: f1_macro\n")
    task = load_task(make_task(tmp_path, {"train.tsv": train, "dev.tsv": train}, yaml))
    assert task.label_names == ["neg", "neutral", "pos"]
    assert [(e.text, e.text_pair, e.label) for e in task.train] == [
        ("first one", "second one", 0), ("third", "fourth", 2), ("a", "b", 1)]
    assert task.config.select_metric == "f1_macro" and task.positive_index is None


def test_windows_line_endings_and_byte_order_mark_are_read(tmp_path):
    content = "\ufefftext\tlabel\r\nfine \t0\r\ngood\t1\r\n".encode("utf-8")
    task = load_task(make_task(tmp_path, {"train.tsv": content, "dev.tsv": content}))
    assert [(e.text, e.label) for e in task.dev] == [("fine", 0), ("good", 1)]


def test_inferred_labels_sort_numerically_and_yaml_integers_are_labels(tmp_path):
    train = "".join(json.dumps({"text": f"t{i}", "label": label}) + "\n" for i, label in enumerate([10, 2, 2, 1]))
    task = load_task(make_task(tmp_path, {"train.jsonl": train, "dev.jsonl": train}))
    assert task.label_names == ["1", "2", "10"] and [e.label for e in task.train] == [2, 1, 1, 0]
    task = load_task(make_task(tmp_path, {}, "labels: [10, 2, 1]\n"))
    assert [e.label for e in task.train] == [0, 1, 1, 2]


def test_overrides_change_the_resolved_config(tmp_path):
    folder = make_task(tmp_path, {"train.tsv": "s\ty\nhi\ta\nyo\tb\n", "dev.tsv": "s\ty\nhi\tb\n"})
    task = load_task(folder, overrides=["text=s", "label=y", "positive_label=a", "metrics=[f1]"])
    assert task.positive_index == 0 and task.dev[0].label == 1


def test_subsample_is_stratified_deterministic_and_nested():
    examples = [Example(f"t{i}", None, int(i % 10 < 3), f"f:{i}") for i in range(1000)]  # 300 of class 1
    tenth = subsample(examples, 0.1, seed=0)
    assert Counter(e.label for e in tenth) == {0: 70, 1: 30}
    assert tenth == subsample(examples, 0.1, seed=0)
    assert tenth != subsample(examples, 0.1, seed=1)
    assert set(tenth) <= set(subsample(examples, 0.3, seed=0))
    assert [e.source for e in tenth] == sorted((e.source for e in tenth), key=lambda s: int(s[2:]))
    assert subsample(examples, 1.0, seed=0) == examples
    rare = examples[:20] + [Example("rare", None, 2, "f:rare")]
    assert Counter(e.label for e in subsample(rare, 0.1, seed=0)) == {0: 1, 1: 1, 2: 1}  # no class vanishes
    scores = [Example(f"t{i}", None, i / 10, f"f:{i}") for i in range(50)]
    assert len(subsample(scores, 0.2, seed=3)) == 10
    with pytest.raises(LmforgeError, match=r"fraction must be in \(0, 1\]"):
        subsample(examples, 0.0, seed=0)


GOOD_TSV = "text\tlabel\nfine\t0\ngood\t1\n"


@pytest.mark.parametrize("files, yaml, message", [
    ({"train.tsv": GOOD_TSV + "odd\t2\n"}, "labels: ['0', '1']",
     r"train.tsv:4: column 'label': the label is '2', which is not in the label set \['0', '1'\]"),
    ({"train.tsv": GOOD_TSV, "dev.tsv": "text\tlabel\nnew\tmaybe\n"}, None,
     r"dev.tsv:2: column 'label': the label is 'maybe', which is not in the label set"),
    ({"train.tsv": GOOD_TSV + "blank\t\n"}, None, r"train.tsv:4: column 'label': the label is empty"),
    ({"train.tsv": "sentence\tlabel\nfine\t0\n"}, None,
     r"train.tsv:1: no column 'text' for text \(the header has: 'sentence', 'label'\)"),
    ({"train.tsv": "fine\t0\n"}, "header: false\ntext: 0\nlabel: 2", r"train.tsv:1: no column 2 for label"),
    ({"train.tsv": "fine\t0\n"}, "header: false", r"no header row; give a 0-based column index"),
    ({"train.tsv": GOOD_TSV + "a tab\tinside\t1\n"}, None,
     r"train.tsv:4: unparseable row: 3 fields where the header has 2 \(a tab inside a field\?\)"),
    ({"train.tsv": "text\tlabel\n\n"}, None, r"train.tsv: no examples \(the split is empty\)"),
    ({"dev.tsv": GOOD_TSV}, None, r"mytask: no train file \(looked for train.tsv, train.csv, train.jsonl"),
    ({"train.tsv": GOOD_TSV}, "dev_file: valid.tsv", r"valid.tsv: no such file \(set by dev_file\)"),
    ({"train.tsv": GOOD_TSV, "train.jsonl": ""}, None, r"mytask: more than one train file"),
    ({"train.csv": 'text,label\n"open quote,1\n'}, None, r"train.csv:\d+: unparseable row"),
    ({"train.csv": 'text,label\n"a" b,1\n'}, None, r"train.csv:2: unparseable row"),
    ({"train.jsonl": '{"text": "a", "label": 1}\n{"text": "b", label: 0}\n'}, None,
     r"train.jsonl:2: not valid JSON \(Expecting property name enclosed in double quotes at column 15\)"),
    ({"train.jsonl": '{"text": "a", "label": 1}\n{"sentence": "b", "label": 0}\n'}, None,
     r"train.jsonl:2: no field 'text' for text \(the object has: 'sentence', 'label'\)"),
    ({"train.jsonl": '{"text": "a", "label": [1]}\n'}, None,
     r"train.jsonl:1: field 'label' must be a string or number, got \[1\]"),
    ({"train.tsv": b"text\tlabel\nfine\t0\ncaf\xe9\t1\n"}, None,
     r"train.tsv:3: byte 4 of the line is not valid utf-8"),
    ({"train.tsv": GOOD_TSV}, "kind: regression\nlabel: label", None),  # fine: train reads as scores
    ({"train.tsv": GOOD_TSV + "x\tfive\n"}, "kind: regression",
     r"train.tsv:4: column 'label': 'five' is not a finite number"),
    ({"train.tsv": "text\tlabel\nfine\t1\ngood\t1\n"}, None, r"every example has the label '1'"),
    ({"train.tsv": GOOD_TSV}, "metrics: [f1]\nlabels: [a, b, c]", r"task.yaml: task.metrics: .*use 'f1_macro'"),
    ({"train.tsv": GOOD_TSV}, "positive_label: pos", r"train.tsv: positive_label 'pos' is not among the labels"),
    ({"train.tsv": GOOD_TSV}, "colums: 3", r"task.yaml: unknown config key 'colums'"),
    ({"train.tsv": GOOD_TSV}, "format: jsonl\ntext: 1", r"task.text: JSONL fields are named"),
])
def test_bad_task_input_names_file_line_and_column(tmp_path, files, yaml, message):
    folder = make_task(tmp_path, {"dev.tsv": GOOD_TSV, **files}, yaml)
    if message is None:
        assert load_task(folder).is_regression
        return
    with pytest.raises(LmforgeError, match=message):
        load_task(folder)


def test_unknown_task_name_lists_the_glue_tasks(tmp_path):
    with pytest.raises(LmforgeError, match=r"neither a directory nor a GLUE task name \(known: CoLA, SST-2"):
        resolve_task_config("no-such-task", tmp_path)
    with pytest.raises(LmforgeError, match=r"GLUE task 'cola': no directory .*CoLA"):
        resolve_task_config("cola", tmp_path)


def test_read_examples_uses_the_given_label_set(tmp_path):
    folder = make_task(tmp_path, {"train.tsv": GOOD_TSV, "dev.tsv": GOOD_TSV})
    config = resolve_task_config(folder)
    examples, names = read_examples(folder / "dev.tsv", config, ["1", "0"])
    assert names == ["1", "0"] and [e.label for e in examples] == [1, 0]
    assert examples[0].source == f"{folder / 'dev.tsv'}:2"
