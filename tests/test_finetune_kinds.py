"""Fine-tuning the structured kinds end to end through the CLI on tiny runs: tokens (NER), span (QA),
seq2seq (GPT and T5): overfit, evaluate, predict, resume, label budget."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.cli import main
from lmforge.tasks.finetune import evaluate_finetuned, finetune, load_finetuned, plan_finetune, predict
from lmforge.tasks.kinds import stsb_text, text_to_label
from test_finetune import NEGATIVE, POSITIVE, SENTIMENT, make_base_run, make_task

FAST = ["finetune.dropout=0", "finetune.lr=3e-3", "finetune.batch_size=8", "finetune.warmup=0",
        "finetune.log_every=1"]

PEOPLE = ["alice", "bob", "carol", "dave"]
PLACES = ["paris", "rome", "oslo", "lima"]


def ner_sentences() -> list[tuple[list[str], list[str]]]:
    out = []
    for i, person in enumerate(PEOPLE):
        for j, place in enumerate(PLACES):
            if (i + j) % 2:
                out.append(([person, "went", "to", place], ["B-PER", "O", "O", "B-LOC"]))
            else:
                out.append((["the", "film", "in", place, "with", person, "smith"],
                            ["O", "O", "O", "B-LOC", "O", "B-PER", "I-PER"]))
    return out


def make_ner_task(root, fmt: str = "conll", dev=None):
    folder = root / "ner"
    folder.mkdir()
    for split, rows in (("train", ner_sentences()), ("dev", dev or ner_sentences())):
        if fmt == "conll":
            text = "-DOCSTART- -X- O\n\n" + "\n\n".join(
                "\n".join(f"{w} X {t}" for w, t in zip(words, tags)) for words, tags in rows) + "\n"
            (folder / f"{split}.conll").write_text(text, encoding="utf-8")
        else:
            (folder / f"{split}.jsonl").write_text("\n".join(json.dumps({"tokens": w, "tags": t}) for w, t in rows)
                                                  + "\n", encoding="utf-8")
    (folder / "task.yaml").write_text("kind: tokens\n", encoding="utf-8")
    return folder


def sets(overrides):
    return sum((["--set", o] for o in overrides), [])


def finetune_cli(base, task, run, overrides) -> dict:
    """`lmforge finetune BASE --task TASK --out RUN` with the FAST settings and `overrides`; its summary."""
    assert main(["finetune", str(base), "--task", str(task), "--out", str(run), *sets([*FAST, *overrides])]) == 0
    return json.loads((run / "summary.json").read_text())


def test_tagger_overfits_tiny_ner_and_predicts_entities(tmp_path, capsys):
    base = make_base_run(tmp_path)
    task = make_ner_task(tmp_path)
    run = tmp_path / "ft"
    summary = finetune_cli(base, task, run, ["finetune.steps=60", "finetune.eval_every=20"])
    assert summary["kind"] == "tokens" and summary["select_metric"] == "entity_f1"
    assert summary["dev"]["entity_f1"] == 1.0  # dev = train: every entity found (fractions, not x100)
    assert summary["dev"]["f1_PER"] == summary["dev"]["f1_LOC"] == 1.0
    assert summary["counts"]["train_windows"] == len(ner_sentences())
    capsys.readouterr()
    assert main(["evaluate", str(run), "--json"]) == 0
    measured = json.loads(capsys.readouterr().out)
    assert measured["checkpoint"] == summary["best_checkpoint"]
    assert measured["entity_f1"] == summary["dev"]["entity_f1"]
    assert main(["predict", str(run), "bob went to oslo"]) == 0
    assert capsys.readouterr().out.strip() == "PER: bob  LOC: oslo\tbob went to oslo"
    assert main(["predict", str(run), "the film in rome with carol smith", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [(e["type"], e["text"]) for e in result["entities"]] == [("LOC", "rome"), ("PER", "carol smith")]


def test_tagger_entity_f1_is_seqevals_on_the_dev_predictions(tmp_path):
    from seqeval.metrics import f1_score

    base = make_base_run(tmp_path)
    task = make_ner_task(tmp_path, fmt="jsonl")
    run = tmp_path / "ft"
    finetune(plan_finetune(base, str(task), [*FAST, "finetune.steps=6"]), run, progress=False)
    loaded = load_finetuned(run)
    sentences = ner_sentences()
    predicted = [r["tags"] for r in predict(loaded, [(" ".join(words), None) for words, _ in sentences])]
    _, measured = evaluate_finetuned(run)
    assert measured["val_entity_f1"] == pytest.approx(f1_score([t for _, t in sentences], predicted), abs=1e-12)


def test_tagger_label_budget_trains_on_a_nested_fraction(tmp_path):
    base = make_base_run(tmp_path)
    task = make_ner_task(tmp_path)
    half = finetune(plan_finetune(base, str(task), [*FAST, "finetune.steps=1", "finetune.label_fraction=0.5"]),
                    tmp_path / "half", progress=False)
    assert half.train_examples == len(ner_sentences()) // 2


def test_tagger_resume_continues_identically(tmp_path):
    base = make_base_run(tmp_path)
    task = make_ner_task(tmp_path)
    overrides = ["finetune.steps=8", "finetune.eval_every=4", "finetune.keep_checkpoints=0", "finetune.lr=3e-3",
                 "finetune.batch_size=6", "finetune.log_every=1"]  # dropout on: its RNG must resume too
    full, partial = tmp_path / "full", tmp_path / "partial"
    finetune(plan_finetune(base, str(task), overrides), full, progress=False)
    shutil.copytree(full, partial)
    shutil.rmtree(partial / "checkpoints" / "step-000008")
    (partial / "checkpoints" / "latest").write_text("step-000004\n")
    assert main(["finetune", "--resume", str(partial)]) == 0
    read = lambda run: [{k: v for k, v in json.loads(line).items() if k != "examples_per_s"}  # noqa: E731
                        for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert read(partial) == read(full)
    a = load_file(str(full / "checkpoints/step-000008/model.safetensors"))
    b = load_file(str(partial / "checkpoints/step-000008/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_dev_tag_outside_the_label_set_is_a_one_line_error(tmp_path, capsys):
    base = make_base_run(tmp_path)
    task = make_ner_task(tmp_path, dev=[(["bob", "went"], ["B-ORG", "O"])])
    assert main(["finetune", str(base), "--task", str(task), "--out", str(tmp_path / "ft"),
                 *sets(["finetune.steps=1"])]) == 2
    err = capsys.readouterr().err.strip()
    assert "dev.conll:3" in err and "'B-ORG'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "ft").exists()


def squad_json(articles: list[tuple[str, str, list[tuple[str, str]]]]) -> dict:
    data = []
    for title, context, questions in articles:
        qas = [{"id": f"{title}-{k}", "question": q, "answers": [{"text": a, "answer_start": context.index(a)}]}
               for k, (q, a) in enumerate(questions)]
        data.append({"title": title, "paragraphs": [{"context": context, "qas": qas}]})
    return {"version": "1.1", "data": data}


def make_qa_task(root):
    articles = []
    for i, (person, place) in enumerate(zip(PEOPLE, PLACES)):
        context = f"{person} lives in {place} . the film was good and {PEOPLE[i - 1]} went to {PLACES[i - 2]} ."
        articles.append((f"a{i}", context, [(f"where does {person} live", place),
                                            (f"who went to {PLACES[i - 2]}", PEOPLE[i - 1])]))
    folder = root / "qa"
    folder.mkdir()
    text = json.dumps(squad_json(articles))
    (folder / "train.json").write_text(text, encoding="utf-8")
    (folder / "dev.json").write_text(text, encoding="utf-8")
    (folder / "task.yaml").write_text("kind: span\nstride: 4\n", encoding="utf-8")
    return folder


def test_span_extractor_overfits_tiny_qa_and_answers_questions(tmp_path, capsys):
    base = make_base_run(tmp_path)
    task = make_qa_task(tmp_path)
    run = tmp_path / "ft"
    # max_length 24 cuts every passage into windows: answers are found across them
    summary = finetune_cli(base, task, run, ["finetune.steps=400", "finetune.eval_every=50", "finetune.max_length=24"])
    assert summary["kind"] == "span" and summary["select_metric"] == "span_f1"
    assert summary["counts"]["dev_windows"] > 8  # more windows than questions
    # 400 steps at lr 3e-3 learn the 8 questions (chance is ~0); 6 of 8 is the floor. This test has failed
    # in full-suite runs (once at 7 of 8) while passing alone: the summary in the message says what moved.
    assert summary["dev"]["exact_match"] >= 0.75 and summary["dev"]["span_f1"] >= 0.75, summary
    capsys.readouterr()
    assert main(["evaluate", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["span_f1"] == pytest.approx(summary["dev"]["span_f1"]), summary
    # the dev passage itself: with every dev question right, predict (same windows) must answer it too
    assert main(["predict", str(run), "where does carol live",
                 "carol lives in oslo . the film was good and bob went to paris ."]) == 0
    answer = capsys.readouterr().out.strip()
    assert answer == "oslo" or summary["dev"]["exact_match"] < 1.0
    assert main(["predict", str(run), "where does carol live"]) == 2
    assert "give both" in capsys.readouterr().err


SWAPS = [(f"{p} {q}", f"in {q} lives {p} now") for p in PEOPLE for q in PLACES]  # 4-grams: BLEU is defined


def make_seq2seq_task(root, rows=SWAPS, yaml_text="kind: seq2seq\nmetrics: [bleu, rougeL]\nmax_target_length: 40\n"):
    folder = root / "swap"
    folder.mkdir()
    text = "\n".join(json.dumps({"input": a, "target": b}) for a, b in rows) + "\n"
    (folder / "train.jsonl").write_text(text, encoding="utf-8")
    (folder / "dev.jsonl").write_text(text, encoding="utf-8")
    (folder / "task.yaml").write_text(yaml_text, encoding="utf-8")
    return folder


def make_t5_base_run(root) -> Path:
    """A t5 'pretraining' run: a unigram tokenizer with sentinels and one random-weight checkpoint."""
    from conftest import TEXT
    from lmforge.config import TokenizerConfig, config_from_dict, dump_config
    from lmforge.data.tokenizer import train_tokenizer
    from lmforge.model import build_model
    from lmforge.train.checkpoint import TrainerState, save_checkpoint

    run = root / "base-t5"
    run.mkdir()
    corpus = root / "corpus-t5.txt"
    corpus.write_text(TEXT + "\n".join([a + " " + b for a, b in SWAPS] + POSITIVE + NEGATIVE + ["positive negative"]),
                      encoding="utf-8")
    tokenizer = train_tokenizer(corpus.read_text().split("\n"), TokenizerConfig(kind="unigram", vocab_size=220), "t5",
                                show_progress=False)
    tokenizer.save(str(run / "tokenizer.json"))
    shape = {"family": "t5", "n_layer": 2, "n_decoder_layer": 2, "n_head": 2, "d_model": 32, "d_kv": 16,
             "d_ff": 64, "block_size": 64, "vocab_size": tokenizer.get_vocab_size()}
    config = config_from_dict({"name": "base", "data": {"corpus": [str(corpus)]}, "model": shape})
    dump_config(config, run / "config.yaml")
    torch.manual_seed(0)
    save_checkpoint(run / "checkpoints", build_model(config.model), None, TrainerState(step=1))
    return run


@pytest.mark.parametrize("family,steps", [("gpt", 300), ("t5", 100)])
def test_seq2seq_overfits_tiny_pairs_scored_by_bleu_of_decoded_outputs(tmp_path, capsys, family, steps):
    base = make_t5_base_run(tmp_path) if family == "t5" else make_base_run(tmp_path, "gpt")
    task = make_seq2seq_task(tmp_path)
    run = tmp_path / "ft"
    summary = finetune_cli(base, task, run, [f"finetune.steps={steps}", f"finetune.eval_every={steps}"])
    assert summary["kind"] == "seq2seq" and summary["select_metric"] == "bleu"
    assert summary["dev"]["bleu"] == pytest.approx(1.0) and summary["dev"]["rougeL"] == pytest.approx(1.0)  # exact
    capsys.readouterr()
    assert main(["predict", str(run), "dave oslo"]) == 0
    assert capsys.readouterr().out.strip() == "in oslo lives dave now"


def test_t5_text_to_text_classification_learns_label_words(tmp_path, capsys):
    base = make_t5_base_run(tmp_path)
    task = make_task(tmp_path, SENTIMENT)
    run = tmp_path / "ft"
    summary = finetune_cli(base, task, run, ["finetune.steps=60", "finetune.eval_every=60", "task.max_target_length=8"])
    assert summary["dev"]["accuracy"] == 1.0 and summary["dev"]["invalid_outputs"] == 0.0
    capsys.readouterr()
    assert main(["predict", str(run), "a great film"]) == 0
    assert capsys.readouterr().out.strip() == "pos"


def test_text_to_text_targets_and_decoded_labels():
    assert [stsb_text(v) for v in (3.8, 3.75, 3.69, 0.0, 5.0, 2.1)] == ["3.8", "3.8", "3.6", "0.0", "5.0", "2.0"]
    assert text_to_label(["positive", " negative", "maybe"], ["negative", "positive"], False).tolist() == [1, 0, -1]
    scores = text_to_label(["3.8", "x"], [], True)
    assert scores[0] == 3.8 and scores[1] != scores[1]  # NaN: no number
