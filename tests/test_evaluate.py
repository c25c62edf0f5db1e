"""Evaluation scores several training micro-batches per forward pass; the metrics stay those of every
window of the evaluated batches, and the pretrain command says where its time went."""

import re

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from conftest import tiny_config_dict
from lmforge.cli import main
from lmforge.config import config_from_dict
from lmforge.data.loader import loader_for
from lmforge.data.prepare import prepare
from lmforge.data.store import TokenStore
from lmforge.model import build_model
from lmforge.train import evaluate as evaluate_module
from lmforge.train.evaluate import evaluate


def _val_loader_and_model(corpus_file, batch_size):
    config = config_from_dict(tiny_config_dict(corpus_file, batch_size=batch_size))
    store = TokenStore(prepare(config.data, "gpt", progress=False))
    config.model.vocab_size = store.manifest["vocab_size"]
    torch.manual_seed(0)
    return loader_for(config, store, "val", training=False), build_model(config.model)


def test_grouped_evaluation_equals_the_mean_over_every_window_in_float64(corpus_file, monkeypatch):
    loader, model = _val_loader_and_model(corpus_file, batch_size=3)
    batches = loader.batches_per_epoch - 1  # not the whole split: exactly the first `batches` global batches
    assert batches >= 4
    grouped = evaluate(model, loader, batches, torch.device("cpu"), "fp32")
    monkeypatch.setattr(evaluate_module, "EVAL_ROWS_FACTOR", 1)  # one micro-batch per forward, as training
    one_by_one = evaluate(model, loader, batches, torch.device("cpu"), "fp32")

    windows = loader.examples(np.arange(batches * loader.batch_size))
    with torch.no_grad():
        logits = model.double()(windows["input_ids"]).logits
    reference = F.cross_entropy(logits.flatten(0, 1), windows["labels"].flatten(), reduction="mean").item()
    assert abs(grouped["val_loss"] - reference) < 1e-5
    assert abs(one_by_one["val_loss"] - reference) < 1e-5


def test_pretrain_reports_where_its_time_went(tmp_path, corpus_file, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(corpus_file)))
    assert main(["pretrain", "--config", str(config), "--out", str(tmp_path / "run")]) == 0
    line = [line for line in capsys.readouterr().out.splitlines() if line.startswith("time: ")][-1]
    total = float(re.match(r"time: ([\d.]+) s = ", line).group(1))
    parts = {name: float(value) for name, value in re.findall(r"([a-z-]+) ([\d.]+)", line.split(" = ", 1)[1])}
    assert list(parts)[:8] == ["start-up", "store", "set-up", "steps", "evaluations", "checkpoints", "plots",
                               "sample"]
    assert parts["steps"] > 0 and all(seconds >= 0 for seconds in parts.values())
    # the parts are measured one after the other: together (with "other") they are the whole command
    assert abs(sum(parts.values()) - total) <= 0.05 * len(parts) + 0.05
