"""The encoder peer benchmark end to end on a tiny corpus: the transformers BERT trains for a few seconds
and writes its curve, its held-out documents are lmforge's, its accuracy counts exactly the labelled
positions, and the plot script puts it beside a real lmforge BERT run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

from conftest import load_bench, sentence_documents
from lmforge.cli import main as lmforge_main
from lmforge.config import load_config

REPO = Path(__file__).resolve().parent.parent


def _config(tmp_path, family: str = "bert") -> Path:
    """A tiny BERT recipe on JSONL documents of several sentences each."""
    corpus = sentence_documents(tmp_path / "docs.jsonl")
    config = {
        "name": "bert-peer-test",
        "data": {"corpus": [str(corpus)], "format": "jsonl", "tokenizer": {"kind": "wordpiece", "vocab_size": 120},
                 "split": {"by": "document", "val_fraction": 0.1}},
        "model": {"family": family, "n_layer": 2, "n_head": 2, "d_model": 32, "block_size": 48},
        "train": {"steps": 16, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "eval_every": 8, "eval_batches": 3,
                  "checkpoint_every": 8, "log_every": 4},
    }
    path = tmp_path / f"{family}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_peer_trains_for_its_budget_and_plots_beside_an_lmforge_run(tmp_path, capsys):
    config = _config(tmp_path)
    curve = tmp_path / "peer.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(REPO / "bench" / "bert_peer_mlm.py"), "--config", str(config),
                           "--minutes", "0.1", "--eval-every-s", "2", "--out", str(curve)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith("peer: ")
    rows = [json.loads(line) for line in curve.read_text().splitlines()]
    assert len(rows) >= 3 and rows[0]["step"] == 0 and rows[-1]["step"] > rows[0]["step"]
    assert all({"elapsed_s", "step", "val_masked_acc", "val_loss"} <= set(r) for r in rows)
    assert all(0.0 <= r["val_masked_acc"] <= 1.0 and r["val_loss"] > 0 for r in rows)
    elapsed = [r["elapsed_s"] for r in rows]
    assert elapsed == sorted(elapsed) and 6.0 <= elapsed[-1] < 9.0  # 0.1 min of training, then the last evaluation
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]  # it learned something

    run = tmp_path / "run"
    assert lmforge_main(["pretrain", "--config", str(config), "--out", str(run)]) == 0
    plot = load_bench("plot_encoder_curves")
    seconds = plot.training_seconds([json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()])
    summary = json.loads((run / "summary.json").read_text())
    assert 0 < seconds[-1] <= summary["seconds"] + 0.1  # training windows only: within the run's wall time
    capsys.readouterr()
    png, table = tmp_path / "curves.png", tmp_path / "curves.md"
    assert plot.main(["--run", str(run), "--peer", str(curve), "--png", str(png), "--table", str(table),
                      "--at", "0.01", "0.05"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = table.read_text()
    assert "lmforge bert-peer-test" in text and "transformers BertForMaskedLM" in text
    # the peer's value at 0.05 min, interpolated by hand between its evaluations around 3 s
    before = max((r for r in rows if r["elapsed_s"] <= 3.0), key=lambda r: r["elapsed_s"])
    after = min((r for r in rows if r["elapsed_s"] >= 3.0), key=lambda r: r["elapsed_s"])
    share = (3.0 - before["elapsed_s"]) / max(after["elapsed_s"] - before["elapsed_s"], 1e-12)
    expected = before["val_masked_acc"] + share * (after["val_masked_acc"] - before["val_masked_acc"])
    assert text.splitlines()[3].startswith("| 0.05 | ") and f"| {expected:.1%} |" in text.splitlines()[3]


def test_peer_holds_out_lmforges_documents(tmp_path):
    config = load_config(str(_config(tmp_path)))
    train, val = load_bench("bert_peer_mlm").split_documents(config.data)
    from lmforge.data.prepare import prepare

    splits = json.loads((prepare(config.data, "bert") / "manifest.json").read_text())["splits"]
    assert (len(train), len(val)) == (splits["train"]["documents"], splits["val"]["documents"]) == (113, 7)


def test_peer_accuracy_counts_every_labelled_position_and_nothing_else(tmp_path):
    peer = load_bench("bert_peer_mlm")
    config = load_config(str(_config(tmp_path)))
    train, _ = peer.split_documents(config.data)
    tokenizer = peer.train_wordpiece(train, 120, lowercase=True)
    ids, special = peer.group_texts(tokenizer, train, 48)
    batches = [peer.collate(peer.collator_for(tokenizer, 0.15, seed=3), ids[i:i + 8], special[i:i + 8]) for i in (0, 8)]
    torch.manual_seed(0)
    model = peer.build_bert(config, tokenizer.get_vocab_size(), dropout=0.1)
    acc, loss = peer.evaluate(model, batches)

    correct = count = 0
    nll = 0.0
    unchanged = 0
    model.eval()
    with torch.no_grad():
        for batch in batches:
            logits = model(input_ids=batch["input_ids"]).logits.double()
            for b, t in zip(*np.nonzero(batch["labels"].numpy() != -100)):
                target = int(batch["labels"][b, t])
                correct += int(int(logits[b, t].argmax()) == target)
                nll -= float(torch.log_softmax(logits[b, t], -1)[target])
                count += 1
                unchanged += int(batch["input_ids"][b, t]) == target
    assert count > 0 and unchanged > 0  # the 10% left unchanged are scored too
    assert acc == correct / count
    assert abs(loss - nll / count) < 1e-4
    masked_special = sum(int(((batch["labels"] != -100) & torch.from_numpy(special[i * 8:(i + 1) * 8]).bool()).sum())
                         for i, batch in enumerate(batches))
    assert masked_special == 0  # [CLS] and [SEP] are never chosen


def test_peer_refuses_a_decoder_recipe_in_one_line(tmp_path, capsys):
    assert load_bench("bert_peer_mlm").main(["--config", str(_config(tmp_path, family="gpt")), "--minutes", "0.01",
                                         "--out", str(tmp_path / "x.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.family" in err[0]


def test_table_values_interpolate_inside_a_curve_and_star_a_mark_just_past_its_end():
    plot = load_bench("plot_encoder_curves")
    curve = (np.array([1.0, 2.0]), np.array([0.1, 0.3]))
    assert plot.accuracy_at(curve, 1.5) == (0.1 + 0.5 * (0.3 - 0.1), False)
    assert plot.accuracy_at(curve, 2.03) == (0.3, True)  # 1.5% of the mark past the last evaluation
    assert plot.accuracy_at(curve, 2.1) == (None, False)
    assert plot.accuracy_at(curve, 0.5) == (None, False)
    text = plot.table({"lmforge x": curve, "peer y": (np.array([0.0, 3.0]), np.array([0.0, 0.3]))}, [1.5, 2.03, 2.5])
    rows = text.splitlines()
    assert rows[2] == "| 1.5 | 20.0% | 15.0% | 1.33x |"
    assert rows[3] == "| 2.03 | 30.0%\\* | 20.3% | 1.48x |"
    assert rows[4] == "| 2.5 | - | 25.0% | - |"
