"""bench/linear_probe.py: its features are the fine-tuning classifier's mean pooling, example by example; its
geometry numbers equal a pairwise count; end to end it prints a probe score per init, and bad input is one line."""

import json

import numpy as np
import pytest
import torch

from conftest import load_bench
from lmforge.data.tokenizer import load_tokenizer
from lmforge.model import build_model
from lmforge.run import load_run_config
from lmforge.tasks.batches import encode_examples, pad_id, task_tokenizer
from lmforge.tasks.datasets import load_task
from lmforge.tasks.models import SequenceClassifier
from test_finetune import SENTIMENT, make_base_run, make_task

probe = load_bench("linear_probe")


@pytest.mark.parametrize("family", ["bert", "gpt"])
def test_batched_features_equal_the_classifiers_mean_pooling_one_example_at_a_time(tmp_path, family):
    run = make_base_run(tmp_path, family)
    config = load_run_config(run).model
    tokenizer = task_tokenizer(load_tokenizer(run / "tokenizer.json"), family, 64)
    examples = load_task(make_task(tmp_path, SENTIMENT)).train
    encoded = encode_examples(tokenizer, examples)
    assert len({len(e.ids) for e in encoded}) > 1  # batches are padded
    torch.manual_seed(0)
    model = build_model(config)
    batched = probe.features(model, family, encoded, pad_id(tokenizer, family), batch_size=5)
    classifier = SequenceClassifier(model.bert if family == "bert" else model, 2, 0.0, "mean").eval()
    with torch.no_grad():
        for row, item in enumerate(encoded):
            ids = torch.tensor([item.ids])
            types, mask = torch.tensor([item.type_ids]), torch.ones_like(ids)
            if family == "bert":
                hidden, _ = classifier.backbone(ids, types, mask)
            else:
                hidden = classifier.backbone.hidden_states(ids)
            np.testing.assert_allclose(batched[row], hidden[0].mean(0).double().numpy(), atol=1e-5)


def test_geometry_equals_a_pairwise_count():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 5)) + np.array([3.0, 0, 0, 0, 0])
    pairs = [x[i] @ x[j] / np.linalg.norm(x[i]) / np.linalg.norm(x[j]) for i in range(7) for j in range(7) if i != j]
    got = probe.geometry(x)
    assert got["mean_cosine"] == pytest.approx(np.mean(pairs), abs=1e-12)
    assert got["top_dimension_ratio"] == pytest.approx(np.abs(x).mean(0).max() / np.abs(x).mean(0).mean())


def test_probe_scores_the_tasks_selection_metric(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4))
    labels = (x[:, 0] > 0.8).astype(float)  # a minority class, as CoLA's
    task = load_task(make_task(tmp_path, SENTIMENT, yaml_text="metrics: [mcc, accuracy]\n"))
    assert task.config.select_metric == "mcc"
    assert probe.probe(x[:150], labels[:150], x[150:], labels[150:], task) > 0.7
    noise = rng.normal(size=(200, 4))  # nothing to learn: Matthews near 0 (accuracy would be ~0.5 or more)
    assert abs(probe.probe(noise[:150], labels[:150], noise[150:], labels[150:], task)) < 0.3
    score = 2 * x[:, 1] + 0.1 * rng.normal(size=200)
    regression = load_task(make_task(tmp_path, [("a", 1.0), ("b", 2.5), ("c", 0.5)], name="sim",
                                     yaml_text="kind: regression\n"))
    assert regression.config.select_metric == "spearman"
    assert probe.probe(x[:150], score[:150], x[150:], score[150:], regression) > 0.9


def test_end_to_end_json_and_one_line_errors(tmp_path, capsys):
    run = make_base_run(tmp_path)
    task = make_task(tmp_path, SENTIMENT)
    assert probe.main([str(run), "--task", str(task), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["task"], result["metric"], result["train_examples"]) == ("sent", "accuracy", 16)
    for init in ("pretrained", "random"):
        assert 0 <= result[init]["probe"] <= 1 and -1 <= result[init]["mean_cosine"] <= 1
    # the checkpoint's weights (seed 0) and a fresh init (seed 1) are different models
    assert result["pretrained"]["mean_cosine"] != result["random"]["mean_cosine"]
    assert probe.main([str(tmp_path / "missing"), "--task", str(task)]) == 2
    err = capsys.readouterr().err
    assert "run directory not found" in err and err.count("\n") == 1
    assert probe.main([str(run), "--task", str(task), "--pooling", "siamese"]) == 2
    err = capsys.readouterr().err
    assert "compares the two sentences of a pair task" in err and err.count("\n") == 1


@pytest.mark.parametrize("family", ["bert", "gpt"])
def test_siamese_features_are_the_fine_tuning_heads_input(tmp_path, family, capsys):
    run = make_base_run(tmp_path, family)
    config = load_run_config(run).model
    tokenizer = task_tokenizer(load_tokenizer(run / "tokenizer.json"), family, 64)
    rows = [(a, b, "same" if i % 2 else "other") for i, (a, b) in enumerate(zip(SENTIMENT, SENTIMENT[3:]))]
    pairs = make_task(tmp_path, [(a[0], b[0], label) for a, b, label in rows], name="pairs",
                      yaml_text="text: text\ntext_pair: pair\n")
    encoded = encode_examples(tokenizer, load_task(pairs).train)
    torch.manual_seed(0)
    model = build_model(config)
    batched = probe.features(model, family, encoded, pad_id(tokenizer, family), batch_size=5, pooling="siamese")
    classifier = SequenceClassifier(model.bert if family == "bert" else model, 2, 0.0, "siamese").eval()
    with torch.no_grad():
        for row, item in enumerate(encoded):  # one pair at a time, unpadded
            ids, types = torch.tensor([item.ids]), torch.tensor([item.type_ids])
            alone = classifier.siamese_features(ids, types, torch.ones_like(ids))[0]
            np.testing.assert_allclose(batched[row], alone.double().numpy(), atol=1e-5)
    assert probe.main([str(run), "--task", str(pairs), "--pooling", "siamese", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["pooling"] == "siamese" and 0 <= result["pretrained"]["probe"] <= 1
