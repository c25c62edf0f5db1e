"""Fine-tuning: inputs, heads, loss masking, best-checkpoint selection, resume, and the finetune / evaluate /
predict verbs, on tiny runs built in-process (a tokenizer + one random-weight checkpoint)."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from conftest import TEXT
from lmforge.cli import main
from lmforge.config import TokenizerConfig, config_from_dict, dump_config
from lmforge.data.tokenizer import EOS, load_tokenizer, train_tokenizer
from lmforge.model import IGNORE_INDEX, build_model
from lmforge.tasks.batches import collate, encode_examples, encode_generation, task_tokenizer
from lmforge.tasks.datasets import Example
from lmforge.tasks.finetune import (evaluate_finetuned, finetune, load_finetuned, plan_finetune, predict,
                                    write_samples)
from lmforge.tasks.models import build_task_model
from lmforge.train.checkpoint import TrainerState, save_checkpoint

POSITIVE = ["a great film", "good and fine", "great acting", "a good story", "fine and great", "good fun",
            "great great", "a fine cast"]
NEGATIVE = ["a bad film", "awful and dull", "bad acting", "a dull story", "awful and bad", "dull fun",
            "bad bad", "an awful cast"]


def make_base_run(root: Path, family: str = "bert", **model) -> Path:
    """A 'pretraining' run: config.yaml, tokenizer.json and one checkpoint of a tiny random model."""
    run = root / f"base-{family}"
    run.mkdir()
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT + "\n".join(POSITIVE + NEGATIVE + ["what is two", "two", "what is one", "one"]),
                      encoding="utf-8")
    kind = "wordpiece" if family == "bert" else "char"
    tokenizer = train_tokenizer([corpus.read_text()], TokenizerConfig(kind=kind, vocab_size=200), family,
                                show_progress=False)
    tokenizer.save(str(run / "tokenizer.json"))
    shape = {"family": family, "n_layer": 2, "n_head": 2, "d_model": 32, "block_size": 64,
             "vocab_size": tokenizer.get_vocab_size(), **model}
    config = config_from_dict({"name": "base", "data": {"corpus": [str(corpus)]}, "model": shape})
    dump_config(config, run / "config.yaml")
    torch.manual_seed(0)
    save_checkpoint(run / "checkpoints", build_model(config.model), None, TrainerState(step=1))
    return run


def make_task(root: Path, train: list[tuple], dev: list[tuple] | None = None, name: str = "sent",
              yaml_text: str | None = None) -> Path:
    """A JSONL task: each row (text, label) or (text, pair, label)."""
    folder = root / name
    folder.mkdir()
    for split, rows in (("train", train), ("dev", dev or train)):
        lines = [json.dumps({"text": r[0], "label": r[-1], **({"pair": r[1]} if len(r) == 3 else {})}) for r in rows]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if yaml_text:
        (folder / "task.yaml").write_text(yaml_text, encoding="utf-8")
    return folder


SENTIMENT = [(t, "pos") for t in POSITIVE] + [(t, "neg") for t in NEGATIVE]
FAST = ["finetune.dropout=0", "finetune.lr=3e-3", "finetune.batch_size=8", "finetune.warmup=0",
        "finetune.log_every=1"]


def test_tiny_finetune_overfits_a_tiny_labeled_set(tmp_path, capsys):
    base = make_base_run(tmp_path)
    task = make_task(tmp_path, SENTIMENT)
    run = tmp_path / "ft"
    assert main(["finetune", str(base), "--task", str(task), "--out", str(run), *sum(
        (["--set", o] for o in [*FAST, "finetune.steps=40", "finetune.eval_every=10"]), [])]) == 0
    assert "best dev: loss" in capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["dev"]["accuracy"] == 1.0  # dev is the train set here: 100% train accuracy
    loaded = load_finetuned(run)
    assert loaded.config.task.labels == ["neg", "pos"]
    answers = predict(loaded, [(t, None) for t, _ in SENTIMENT])
    assert [a["label"] for a in answers] == [label for _, label in SENTIMENT]
    assert all(abs(sum(a["probabilities"].values()) - 1) < 1e-5 for a in answers)

    assert main(["evaluate", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == 1.0
    assert main(["predict", str(run), "a great story", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["label"] == "pos"
    inputs = tmp_path / "inputs.txt"
    inputs.write_text("a great story\n\nan awful cast\n", encoding="utf-8")
    assert main(["predict", str(run), "--file", str(inputs)]) == 0
    assert [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()] == ["pos", "neg"]
    assert main(["predict", str(run), "one", "two"]) == 2  # a single-text task given a pair
    assert "takes one text" in capsys.readouterr().err


def test_pair_inputs_get_correct_token_types(tmp_path):
    for family in ("bert", "gpt"):  # a WordPiece and a character tokenizer
        (tmp_path / family).mkdir()
        raw = load_tokenizer(make_base_run(tmp_path / family, family) / "tokenizer.json")
        tok = task_tokenizer(raw, family, max_length=40)
        a, b = "a great film", "bad acting"
        (item,) = encode_examples(tok, [Example(a, b, 1, "x")])
        ids_a = raw.encode(a, add_special_tokens=False).ids
        ids_b = raw.encode(b, add_special_tokens=False).ids
        if family == "bert":
            cls, sep = raw.token_to_id("[CLS]"), raw.token_to_id("[SEP]")
            assert item.ids == [cls, *ids_a, sep, *ids_b, sep]
        else:
            eos = raw.token_to_id(EOS)
            assert item.ids == [*ids_a, eos, *ids_b, eos]
        assert item.type_ids == [0] * (len(ids_a) + 1 + (family == "bert")) + [1] * (len(ids_b) + 1)
        # Too long: the longer text is cut first, the template's special tokens always stay.
        (cut,) = encode_examples(task_tokenizer(raw, family, max_length=len(item.ids)),
                                 [Example(f"{a} {a} {a}", b, 1, "x")])
        assert cut.ids == item.ids and cut.type_ids == item.type_ids


LENGTHS = [10, 6, 3]


def padded_batch(vocab_size: int, low: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids (ids >= low: no special tokens) of LENGTHS real tokens, right-padded, and their attention mask."""
    ids = torch.randint(low, vocab_size, (len(LENGTHS), max(LENGTHS)))
    mask = (torch.arange(ids.shape[1]) < torch.tensor(LENGTHS).unsqueeze(1)).long()
    return ids, mask


def test_gpt_classification_reads_the_last_real_token_whatever_the_padding(tmp_path):
    torch.manual_seed(0)
    base = make_base_run(tmp_path, "gpt")
    config = config_from_dict(yaml.safe_load((base / "config.yaml").read_text())).model
    model = build_task_model(config, "classification", 3, 0.0).eval()
    ids, mask = padded_batch(config.vocab_size, low=1)
    lengths = LENGTHS
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)
        other_pads = model(torch.where(mask.bool(), ids, torch.full_like(ids, 7)), attention_mask=mask)
        alone = torch.cat([model(ids[row:row + 1, :n]) for row, n in enumerate(lengths)])
    assert torch.allclose(batched, alone, atol=1e-5) and torch.allclose(batched, other_pads, atol=1e-5)
    # ... and it is the last real token that counts: changing it changes the output.
    changed = ids.clone()
    changed[1, 5] = (changed[1, 5] % (config.vocab_size - 1)) + 1
    with torch.no_grad():
        assert not torch.allclose(model(changed, attention_mask=mask)[1], batched[1])


@pytest.mark.parametrize("family", ["bert", "gpt"])
def test_mean_pooling_averages_the_real_tokens_whatever_the_padding(tmp_path, family):
    base = make_base_run(tmp_path, family)
    config = config_from_dict(yaml.safe_load((base / "config.yaml").read_text())).model
    torch.manual_seed(0)
    model = build_task_model(config, "classification", 3, 0.0, pooling="mean").eval()
    ids, mask = padded_batch(config.vocab_size, low=5)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)
        other_pads = model(torch.where(mask.bool(), ids, torch.full_like(ids, 7)), attention_mask=mask)
        # Reference: each text alone, its final hidden states averaged in float64, through the same head.
        expected = []
        for row, n in enumerate(LENGTHS):
            alone = ids[row:row + 1, :n]
            hidden = model.backbone.hidden_states(alone)
            expected.append(model.head(hidden.double().mean(1).float()))
    assert torch.allclose(batched, torch.cat(expected), atol=1e-5)
    assert torch.allclose(batched, other_pads, atol=1e-5)
    # Unlike last-token pooling, an early token counts for a GPT too.
    changed = ids.clone()
    changed[1, 0] = (changed[1, 0] % (config.vocab_size - 6)) + 5
    with torch.no_grad():
        assert not torch.allclose(model(changed, attention_mask=mask)[1], batched[1])


def test_mean_pooled_finetune_is_evaluated_and_exported_as_trained(tmp_path, capsys):
    base = make_base_run(tmp_path, "gpt")
    task = make_task(tmp_path, SENTIMENT)
    run = tmp_path / "ft"
    finetune(plan_finetune(base, str(task), [*FAST, "finetune.steps=30", "finetune.pooling=mean"]), run,
             progress=False)
    summary = json.loads((run / "summary.json").read_text())
    loaded, metrics = evaluate_finetuned(run)
    assert loaded.model.pooling == "mean" and metrics["val_accuracy"] == summary["dev"]["accuracy"]
    assert abs(metrics["val_loss"] - summary["dev"]["loss"]) < 1e-5
    (tmp_path / "b").mkdir()
    bert = make_base_run(tmp_path / "b")
    finetune(plan_finetune(bert, str(task), [*FAST, "finetune.steps=2", "finetune.pooling=mean"]),
             tmp_path / "bert-ft", progress=False)
    assert main(["export", str(tmp_path / "bert-ft"), "--to", "hf", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "finetune.pooling=mean" in err and "Traceback" not in err and not (tmp_path / "hf").exists()


def test_prompt_response_loss_covers_only_the_response(tmp_path):
    base = make_base_run(tmp_path, "gpt")
    tok = load_tokenizer(base / "tokenizer.json")
    eos = tok.token_to_id(EOS)
    (item,) = encode_generation(tok, [Example("what is two", None, "two", "x")], max_length=32)
    prompt, response = tok.encode("what is two").ids, tok.encode("two").ids
    assert item.ids == prompt + response  # input: the sequence but its last token (<eos>)
    assert item.target == [IGNORE_INDEX] * (len(prompt) - 1) + response + [eos]
    config = config_from_dict(yaml.safe_load((base / "config.yaml").read_text())).model
    torch.manual_seed(0)
    model = build_model(config).eval()
    batch = collate([item], eos)
    logits = model(batch["input_ids"]).logits[0]
    start = len(prompt) - 1  # the position that predicts the first response token
    expected = F.cross_entropy(logits[start:], torch.tensor(response + [eos]))
    assert torch.allclose(model(batch["input_ids"], labels=batch["labels"]).loss, expected, atol=1e-6)


def test_generation_finetune_learns_responses_and_predicts_them(tmp_path, capsys):
    base = make_base_run(tmp_path, "gpt")
    task = make_task(tmp_path, [("what is one", "one"), ("what is two", "two")], name="qa",
                     yaml_text="kind: generation\ntext: text\nlabel: label\n")
    run = tmp_path / "ft"
    config = plan_finetune(base, str(task), [*FAST, "finetune.steps=60", "finetune.eval_every=20",
                                             "finetune.generate_tokens=6"])
    finetune(config, run, progress=False)
    write_samples(run, torch.device("cpu"))  # what `lmforge finetune` does after a generation fine-tune
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert [s["response"] for s in samples] == ["one", "two"]
    assert main(["predict", str(run), "what is two"]) == 0
    assert capsys.readouterr().out.strip() == "two"


def test_best_checkpoint_is_the_best_dev_score(tmp_path, capsys):
    base = make_base_run(tmp_path)
    # dev labels disagree with train for half the examples, so the dev score rises and then falls.
    dev = [(t, "pos" if i % 2 else label) for i, (t, label) in enumerate(SENTIMENT)]
    task = make_task(tmp_path, SENTIMENT, dev)
    run = tmp_path / "ft"
    config = plan_finetune(base, str(task), [*FAST, "finetune.steps=24", "finetune.eval_every=2",
                                             "finetune.keep_checkpoints=0"])
    finetune(config, run, progress=False)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    scored = [(r["val_accuracy"], -r["step"]) for r in rows if "val_accuracy" in r]
    best_accuracy, best_step = max(scored)[0], -max(scored)[1]  # the first step reaching the best score
    assert len({a for a, _ in scored}) > 1, "the dev score should vary for this test to mean anything"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_checkpoint"] == f"step-{best_step:06d}" == (run / "checkpoints/best").read_text().strip()
    _, measured = evaluate_finetuned(run)
    assert measured["val_accuracy"] == best_accuracy == summary["dev"]["accuracy"]


def test_finetune_resume_continues_identically(tmp_path):
    base = make_base_run(tmp_path)
    task = make_task(tmp_path, SENTIMENT)
    overrides = ["finetune.steps=12", "finetune.eval_every=4", "finetune.keep_checkpoints=0", "finetune.lr=3e-3",
                 "finetune.batch_size=6", "finetune.log_every=1"]  # dropout stays on: its RNG must resume too
    full, partial = tmp_path / "full", tmp_path / "partial"
    finetune(plan_finetune(base, str(task), overrides), full, progress=False)
    # A fine-tune that died after its step-4 checkpoint: later checkpoints gone, later log lines stale.
    shutil.copytree(full, partial)
    for name in ("step-000008", "step-000012"):
        shutil.rmtree(partial / "checkpoints" / name, ignore_errors=True)
    (partial / "checkpoints" / "latest").write_text("step-000004\n")
    assert main(["finetune", "--resume", str(partial)]) == 0
    read = lambda run: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    strip = lambda rows: [{k: v for k, v in r.items() if k != "examples_per_s"} for r in rows]  # noqa: E731
    assert strip(read(partial)) == strip(read(full))
    a = load_file(str(full / "checkpoints/step-000012/model.safetensors"))
    b = load_file(str(partial / "checkpoints/step-000012/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_label_count_mismatch_with_a_finetuned_head_is_a_clear_error(tmp_path, capsys):
    base = make_base_run(tmp_path)
    two = make_task(tmp_path, SENTIMENT)
    run = tmp_path / "ft"
    finetune(plan_finetune(base, str(two), [*FAST, "finetune.steps=2"]), run, progress=False)
    three = make_task(tmp_path, [*SENTIMENT, ("so so", "meh"), ("meh", "meh")], name="three")
    assert main(["finetune", str(run), "--task", str(three), "--out", str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err
    assert "head predicts 2 labels (neg, pos)" in err and "has 3 (meh, neg, pos)" in err and "Traceback" not in err
    assert not (tmp_path / "again").exists()
    # The same label count continues from the fine-tuned head.
    assert main(["finetune", str(run), "--task", str(two), "--out", str(tmp_path / "more"),
                 "--set", "finetune.steps=2"]) == 0


@pytest.mark.parametrize("family", ["bert", "gpt"])
def test_siamese_pooling_encodes_each_sentence_alone(tmp_path, family):
    base = make_base_run(tmp_path, family)
    config = config_from_dict(yaml.safe_load((base / "config.yaml").read_text())).model
    tok = task_tokenizer(load_tokenizer(base / "tokenizer.json"), family, max_length=40)
    torch.manual_seed(0)
    model = build_task_model(config, "regression", 1, 0.0, pooling="siamese").eval()
    pairs = [("a great film", "bad acting"), ("good", "an awful cast and a dull story"), ("fine and great", "good")]
    batch = collate(encode_examples(tok, [Example(a, b, 0.0, "x") for a, b in pairs]), pad=0, regression=True)
    with torch.no_grad():
        features = model.siamese_features(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
        # Reference: each sentence encoded alone as a single-sentence input, its final states averaged in float64.
        expected = []
        for a, b in pairs:
            u, v = [model.backbone(item["input_ids"], item["token_type_ids"])[0].double().mean(1)
                    if family == "bert" else model.backbone.hidden_states(item["input_ids"]).double().mean(1)
                    for item in (collate(encode_examples(tok, [Example(t, None, 0.0, "x")]), pad=0)
                                 for t in (a, b))]
            expected.append(torch.cat([u, v, (u - v).abs(), u * v], dim=-1))
        assert torch.allclose(features.double(), torch.cat(expected), atol=1e-5)
        assert torch.allclose(model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]),
                              model.head(features))


def test_siamese_finetune_learns_a_pair_task_and_predicts_pairs(tmp_path, capsys):
    base = make_base_run(tmp_path)
    rows = [(a, b, "same" if (a in POSITIVE) == (b in POSITIVE) else "other")
            for a in POSITIVE[:4] + NEGATIVE[:4] for b in POSITIVE[4:] + NEGATIVE[4:]]
    pairs = make_task(tmp_path, rows, name="pairs", yaml_text="text: text\ntext_pair: pair\n")
    finetune(plan_finetune(base, str(pairs), [*FAST, "finetune.steps=80", "finetune.pooling=siamese"]),
             tmp_path / "ft", progress=False)
    summary = json.loads((tmp_path / "ft" / "summary.json").read_text())
    run, metrics = evaluate_finetuned(tmp_path / "ft")
    assert run.model.pooling == "siamese" and summary["dev"]["accuracy"] >= 0.9
    assert metrics["val_accuracy"] == summary["dev"]["accuracy"]
    assert predict(run, [(POSITIVE[0], POSITIVE[5])])[0]["label"] == "same"
    assert main(["export", str(tmp_path / "ft"), "--to", "hf", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "finetune.pooling=siamese" in err and "Traceback" not in err and not (tmp_path / "hf").exists()


@pytest.mark.parametrize("argv, message", [
    (["finetune", "{base}"], "usage: lmforge finetune RUN --task"),
    (["finetune", "{base}", "--task", "{task}", "--set", "model.n_layer=3"], "a fine-tune takes name=..."),
    (["finetune", "{base}", "--task", "{task}", "--set", "finetune.lrr=3"], "unknown config key 'finetune.lrr'"),
    (["finetune", "{base}", "--task", "{task}", "--set", "finetune.label_fraction=0"], "label_fraction must be"),
    (["finetune", "{base}", "--task", "{task}", "--set", "task.labels=[a, b]"], "which is not in the label set"),
    (["finetune", "{base}", "--task", "nosuchtask"], "neither a directory nor a GLUE task name"),
    (["finetune", "--resume", "{base}"], "not a fine-tuned run"),
    (["predict", "{base}", "text"], "predict needs a fine-tuned run"),
    (["experiment", "{base}", "--seeds", ""], "seeds: give one or more distinct seeds"),
    (["finetune", "{base}", "--task", "{task}", "--set", "finetune.pooling=last"], "finetune.pooling: pooling 'last'"),
    (["finetune", "{base}", "--task", "{task}", "--set", "finetune.pooling=max"], "finetune.pooling"),
    (["experiment", "{base}", "--fractions", "0.5,1.5"], "fractions must be in (0, 1]"),
    (["finetune", "{base}", "--task", "{task}", "--set", "finetune.pooling=siamese"],
     "'siamese' compares the two sentences of a pair task; sent has no text_pair"),
])
def test_user_mistakes_are_one_line_errors(tmp_path, capsys, argv, message):
    base = make_base_run(tmp_path)
    task = make_task(tmp_path, SENTIMENT)
    argv = [a.format(base=base, task=task) for a in argv] + (["--out", str(tmp_path / "o")] if "--task" in argv
                                                              else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_experiment_task_finetune_gives_one_task_its_own_settings(tmp_path, capsys):
    from lmforge.errors import LmforgeError
    from lmforge.tasks.experiment import load_experiment

    shipped = load_experiment("finetune-pretrain-value")
    assert shipped.finetune_for("stsb").lr == 3e-4 and shipped.finetune_for("sst2") is shipped.finetune
    tuned = load_experiment("finetune-pretrain-value", ["task_finetune.cola.dropout=0", "task_finetune.cola.lr=2e-3"])
    assert (tuned.finetune_for("cola").dropout, tuned.finetune_for("cola").lr) == (0.0, 2e-3)
    assert tuned.finetune_for("cola").steps == shipped.finetune.steps  # the rest is the shared recipe
    for override, message in (("task_finetune.stsb.lrr=1", "unknown config key 'task_finetune.stsb.lrr'"),
                              ("task_finetune.stsb.lr=-1", "task_finetune.stsb.lr and task_finetune.stsb.head_lr "
                                                           "must be positive"),
                              ("task_finetune.stsb.seed=3", "task_finetune.stsb.seed: the experiment sets seed per cell"),
                              ("task_finetune.stsb=3", "config key 'task_finetune.stsb' must be a mapping")):
        with pytest.raises(LmforgeError, match=re.escape(message)):
            load_experiment("finetune-pretrain-value", [override])

    # end to end: the task's cells train with its lr, and the table's header says so
    base = make_base_run(tmp_path)
    task = make_task(tmp_path, SENTIMENT)
    out = tmp_path / "exp"
    assert main(["experiment", str(base), "--tasks", str(task), "--fractions", "1", "--seeds", "1", "--out", str(out),
                 "--set", "finetune.steps=2", "--set", "finetune.batch_size=4",
                 "--set", f"task_finetune.{task}.lr=2e-3"]) == 0
    assert "; " + str(task) + ": lr 0.002)" in capsys.readouterr().out
    for init in ("pretrained", "random"):
        cell = yaml.safe_load((out / f"sent-f1-{init}-s1" / "config.yaml").read_text())
        assert cell["finetune"]["lr"] == 2e-3


def test_experiment_compares_pretrained_and_random_init_per_budget(tmp_path, capsys):
    base = make_base_run(tmp_path)
    task = make_task(tmp_path, SENTIMENT)
    out = tmp_path / "exp"
    argv = ["experiment", str(base), "--tasks", str(task), "--fractions", "0.5,1.0", "--seeds", "1,2",
            "--out", str(out), "--set", "finetune.steps=3", "--set", "finetune.batch_size=4"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["fraction"], r["seed"], r["init"], r["labels"]) for r in rows] == [
        (f, s, init, n) for f, n in ((0.5, 8), (1.0, 16)) for s in (1, 2) for init in ("pretrained", "random")]
    assert (out / "results.png").is_file() and "| sent | 50% | 8 | accuracy |" in printed
    # Two seeds per budget: the table gives mean ± sd and counts the seeds where pretrained scored higher.
    row = next(line for line in printed.splitlines() if line.startswith("| sent | 50% |"))
    assert row.count("±") == 2 and row.endswith("of 2 |")
    cell = yaml.safe_load((out / "sent-f0.5-random-s2" / "config.yaml").read_text())
    assert (cell["finetune"]["init"], cell["finetune"]["steps"], cell["finetune"]["seed"]) == ("random", 3, 2)
    # Re-running reuses the finished cells.
    stamp = (out / "sent-f1-pretrained-s1" / "summary.json").stat().st_mtime_ns
    assert main(argv) == 0
    assert (out / "sent-f1-pretrained-s1" / "summary.json").stat().st_mtime_ns == stamp
    # ... but not cells trained with another recipe: their scores would stand for this one.
    capsys.readouterr()
    assert main([*argv, "--set", "finetune.pooling=cls"]) == 2
    err = capsys.readouterr().err
    assert "sent-f0.5-pretrained-s1 was fine-tuned with finetune.pooling=mean (now cls)" in err
    assert "Traceback" not in err and (out / "sent-f1-pretrained-s1" / "summary.json").stat().st_mtime_ns == stamp


def test_gpt_pairs_and_regression_fine_tune_end_to_end(tmp_path):
    gpt = make_base_run(tmp_path, "gpt")
    pairs = make_task(tmp_path, [(a, b, "same" if i % 2 else "other") for i, (a, b) in
                                 enumerate(zip(POSITIVE, NEGATIVE))], name="pairs",
                      yaml_text="text: text\ntext_pair: pair\nmetrics: [accuracy, f1_macro]\n")
    finetune(plan_finetune(gpt, str(pairs), [*FAST, "finetune.steps=4"]), tmp_path / "p", progress=False)
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert set(summary["dev"]) == {"loss", "accuracy", "f1_macro"} and summary["select_metric"] == "accuracy"
    scores = make_task(tmp_path, [(t, i / 4) for i, t in enumerate(POSITIVE)], name="scores",
                       yaml_text="kind: regression\n")
    (tmp_path / "b").mkdir()
    bert = make_base_run(tmp_path / "b")
    finetune(plan_finetune(bert, str(scores), [*FAST, "finetune.steps=60"]), tmp_path / "r", progress=False)
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["select_metric"] == "spearman" and summary["dev"]["spearman"] > 0.9  # fits 8 training scores
    run = load_finetuned(tmp_path / "r")
    assert isinstance(predict(run, [(POSITIVE[0], None)])[0]["score"], float)
