"""Fine-tuned BERT taggers and span extractors to and from transformers: BertForTokenClassification and
BertForQuestionAnswering with equal logits on padded batches both ways, label names in config.json, and an
imported run that predicts and evaluates as the original. Tiny runs fine-tuned here; no network."""

import json

import pytest
import torch
from safetensors.torch import load_file

from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.interop.hf_import import import_hf
from lmforge.interop.hf_tokenizer import write_tokenizer_files
from lmforge.tasks.finetune import finetune, load_finetuned, plan_finetune
from test_finetune import make_base_run
from test_finetune_kinds import FAST, make_ner_task, make_qa_task, sets

transformers = pytest.importorskip("transformers")

TOL = 1e-4
TAGS = {"B-LOC", "B-PER", "I-PER", "O"}  # the tags of make_ner_task
SENTENCES = ["bob went to oslo", "the film in rome with carol smith", "alice"]  # padded to the longest
QUESTIONS = [("where does carol live", "carol lives in oslo . the film was good and bob went to alice ."),
             ("who went to rome", "dave lives in lima . the film was good and carol went to rome ."),
             ("where", "bob lives in rome .")]


# QA passages cut into windows of 24 tokens (answers found across them), as in test_finetune_kinds
WINDOWS = {"tokens": [], "span": ["finetune.max_length=24"]}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _finetuned(tmp_path, kind: str, steps: int):
    """A tiny BERT fine-tuned for NER (tokens) or QA (span) through finetune(), and its task directory."""
    base = make_base_run(tmp_path)
    task = make_ner_task(tmp_path) if kind == "tokens" else make_qa_task(tmp_path)
    run = tmp_path / f"ft-{kind}"
    finetune(plan_finetune(base, str(task), [*FAST, f"finetune.steps={steps}", f"finetune.eval_every={steps}",
                                             *WINDOWS[kind]]), run, progress=False)
    return run, task


def _batch(hf_dir, kind: str):
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    if kind == "tokens":
        batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    else:
        batch = tokenizer([q for q, _ in QUESTIONS], [p for _, p in QUESTIONS], padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()  # padding present: the mask matters
    return batch


def _ours(run_dir, batch, kind):
    """Our logits for the batch: (batch, length, labels) for tokens, (batch, length, 2) = start, end for span."""
    model = load_finetuned(run_dir).model
    with torch.no_grad():
        out = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    return out if kind == "tokens" else torch.stack(out, -1)


def _theirs(hf_dir, batch, kind):
    cls = transformers.BertForTokenClassification if kind == "tokens" else transformers.BertForQuestionAnswering
    model, info = cls.from_pretrained(hf_dir, output_loading_info=True)
    assert all(not v for v in info.values()), info  # every tensor given, none left at random
    with torch.no_grad():
        out = model.eval()(**batch)
    return (out.logits if kind == "tokens" else torch.stack([out.start_logits, out.end_logits], -1)), model.config


def _predictions(run_dir, kind, capsys):
    lines = []
    for item in SENTENCES if kind == "tokens" else QUESTIONS:
        texts = [item] if kind == "tokens" else list(item)
        assert main(["predict", str(run_dir), *texts, "--json"]) == 0
        lines.append(json.loads(capsys.readouterr().out))
    return lines


@pytest.mark.parametrize("kind,architecture,steps", [("tokens", "BertForTokenClassification", 60),
                                                     ("span", "BertForQuestionAnswering", 60)])
def test_finetuned_heads_export_and_import_with_equal_logits_and_predictions(tmp_path, capsys, kind, architecture,
                                                                              steps):
    run, task = _finetuned(tmp_path, kind, steps)
    hf = tmp_path / "hf"
    capsys.readouterr()
    assert main(["export", str(run), "--to", "hf", str(hf)]) == 0
    out = capsys.readouterr().out
    assert f"as {architecture}" in out and ("AutoModelForTokenClassification" if kind == "tokens"
                                             else "AutoModelForQuestionAnswering") in out

    # export: transformers' class computes our logits on a padded batch
    batch = _batch(hf, kind)
    ours = _ours(run, batch, kind)
    theirs, hf_config = _theirs(hf, batch, kind)
    assert theirs.shape == ours.shape
    assert ours.std() > 0.1  # trained logits that differ across tokens and labels, not a flat output
    assert (ours - theirs).abs().max() < TOL
    assert hf_config.architectures == [architecture]
    labels = load_finetuned(run).config.task.labels  # the head's class order
    if kind == "tokens":
        assert set(labels) == TAGS and hf_config.num_labels == len(TAGS)
        assert hf_config.id2label == dict(enumerate(labels))
        assert hf_config.label2id == {t: i for i, t in enumerate(labels)}

    # import: a fine-tuned run of the same kind whose logits are transformers' again (config.json does not
    # say the window length the model was fine-tuned with: --set gives it)
    back = tmp_path / "back"
    assert main(["import", str(hf), str(back), "--task", str(task), *sets(WINDOWS[kind])]) == 0
    assert "lmforge predict" in capsys.readouterr().out
    imported = load_finetuned(back)
    assert imported.config.task.kind == kind and imported.config.task.labels == labels
    assert (_ours(back, batch, kind) - theirs).abs().max() < TOL
    # the round trip keeps every tensor but the per-token classes' unused pooler, which they do not have
    original = load_file(str(load_finetuned(run).checkpoint.model_path))
    restored = load_file(str(imported.checkpoint.model_path))
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original if ".pooler." not in k)

    # predict and evaluate read the imported run as the original
    expected = _predictions(run, kind, capsys)
    assert _predictions(back, kind, capsys) == expected
    if kind == "tokens":
        assert [(e["type"], e["text"]) for e in expected[0]["entities"]] == [("PER", "bob"), ("LOC", "oslo")]
    assert main(["evaluate", str(run), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert main(["evaluate", str(back), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert {k: v for k, v in again.items() if k != "checkpoint"} == pytest.approx(
        {k: v for k, v in scores.items() if k != "checkpoint"})

    # and it is a base run like any fine-tuned one: fine-tuning it further starts from its head
    further = finetune(plan_finetune(back, str(task), [*FAST, "finetune.steps=1", *WINDOWS[kind]]),
                       tmp_path / "further", progress=False)
    assert further.step == 1
    head = "classifier.weight" if kind == "tokens" else "qa_outputs.weight"
    moved = load_file(str(load_finetuned(tmp_path / "further").checkpoint.model_path))[head] - restored[head]
    assert moved.abs().max() < 0.005  # one AdamW step of lr 3e-3 away, not a new head (init std 0.02)


@pytest.mark.parametrize("cls_name,kw", [
    ("BertForTokenClassification", {"id2label": {0: "O", 1: "B-PER", 2: "I-PER", 3: "S-LOC", 4: "E-LOC"}}),
    ("BertForQuestionAnswering", {}),
    ("BertForSequenceClassification", {"id2label": {0: "neg", 1: "pos", 2: "mixed"}}),
])
def test_transformers_task_models_import_with_equal_logits(tmp_path, capsys, cls_name, kw):
    from lmforge.data.tokenizer import load_tokenizer

    base = make_base_run(tmp_path)
    tokenizer = load_tokenizer(base / "tokenizer.json")
    config = transformers.BertConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=48, **kw)
    torch.manual_seed(0)
    theirs = getattr(transformers, cls_name)(config).eval()
    with torch.no_grad():  # weights well away from the init, so every tensor changes the output
        for p in theirs.parameters():
            p.add_(torch.randn(p.shape) * 0.1)
    hf = tmp_path / "hf"
    theirs.save_pretrained(hf)
    write_tokenizer_files(tokenizer, "bert", hf, model_max_length=48)

    assert main(["import", str(hf), str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    assert "evaluate reads the task's dev split: import with --task" in printed
    assert main(["evaluate", str(tmp_path / "run")]) == 2
    assert "names no task data (task.path is empty)" in capsys.readouterr().err
    run = load_finetuned(tmp_path / "run")
    kind = {"BertForTokenClassification": "tokens", "BertForQuestionAnswering": "span"}.get(cls_name, "classification")
    assert run.config.task.kind == kind
    if kw:
        assert run.config.task.labels == list(kw["id2label"].values())
    if kind == "tokens":
        assert run.config.task.scheme == "BIOES"  # S- / E- tags
    batch = transformers.AutoTokenizer.from_pretrained(hf)(["bob went to oslo today", "the film"],
                                                           ["in rome", "was good and carol went"], padding=True,
                                                           return_tensors="pt")
    with torch.no_grad():
        ours = run.model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
        out = theirs(**batch)
    if kind == "span":
        ours, reference = torch.stack(ours, -1), torch.stack([out.start_logits, out.end_logits], -1)
    else:
        reference = out.logits
    assert reference.abs().max() > 0.5 and (ours - reference).abs().max() < TOL
    args = ["predict", str(tmp_path / "run"), "where does bob live", "bob lives in oslo ."][:3 + (kind == "span")]
    assert main(args) == 0


def test_export_and_import_refuse_what_has_no_counterpart(tmp_path, capsys):
    # a GPT tagger: transformers has no class computing it
    base = make_base_run(tmp_path, "gpt")
    task = make_ner_task(tmp_path)
    run = tmp_path / "ft-gpt"
    assert main(["finetune", str(base), "--task", str(task), "--out", str(run),
                 *sets([*FAST, "finetune.steps=1"])]) == 0
    capsys.readouterr()
    assert main(["export", str(run), "--to", "hf", str(tmp_path / "hf-gpt")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no transformers export for a gpt run fine-tuned for task.kind=tokens" in err
    assert "BertForTokenClassification" in err and "BertForQuestionAnswering" in err
    assert not (tmp_path / "hf-gpt").exists()

    # a BERT QA export, imported with the wrong task, the wrong labels, or model keys
    (tmp_path / "qa").mkdir()
    qa_run, _ = _finetuned(tmp_path / "qa", "span", 2)
    hf = tmp_path / "hf-qa"
    assert main(["export", str(qa_run), "--to", "hf", str(hf)]) == 0

    def refused(match, **kw):
        with pytest.raises(LmforgeError, match=match):
            import_hf(hf, tmp_path / "back", **kw)
        assert not (tmp_path / "back").exists()

    refused(r"is a tokens task; the BertForQuestionAnswering checkpoint holds a span head", task=str(task))
    refused(r"--set 'model.n_layer=1': importing a BertForQuestionAnswering takes task.KEY",
            overrides=["model.n_layer=1"])
    refused(r"--config names a pretraining recipe", recipe="bert-tiny")
    hf_config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**hf_config, "architectures": ["BertForTokenClassification"],
                                                "id2label": {"0": "O", "1": "B-PER"}, "num_labels": 2}))
    (task / "task.yaml").write_text("kind: tokens\nlabels: [O, B-LOC, B-PER, I-PER]\n")
    refused(r"names the labels \['O', 'B-LOC', 'B-PER', 'I-PER'\]; the checkpoint's head predicts \['O', 'B-PER'\]",
            task=str(task))
    (hf / "config.json").write_text(json.dumps({**hf_config, "architectures": ["BertForTokenClassification"],
                                                "id2label": {"0": "O", "2": "B-PER"}}))
    refused(r"id2label must number the classes 0..1")
    (hf / "config.json").write_text(json.dumps({**hf_config, "architectures": ["BertForTokenClassification"],
                                                "id2label": {"0": "O", "1": "B-PER", "2": "I-PER"}}))
    refused(r"missing: classifier.weight, classifier.bias \| not described by config.json: qa_outputs")
