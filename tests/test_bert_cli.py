"""BERT end to end through the CLI: prepare a sentence store, pretrain, evaluate, fill-mask, resume."""

import json
import shutil

import torch
import yaml
from safetensors.torch import load_file

from conftest import sentence_documents
from lmforge.cli import main


def _corpus(tmp_path):
    return sentence_documents(tmp_path / "docs.jsonl")


def _config(tmp_path, **train):
    config = {
        "name": "bert-mini-test",
        "data": {"corpus": [str(_corpus(tmp_path))], "format": "jsonl",
                 "tokenizer": {"kind": "wordpiece", "vocab_size": 120},
                 "split": {"by": "document", "val_fraction": 0.1}},
        "model": {"family": "bert", "n_layer": 2, "n_head": 2, "d_model": 32, "block_size": 48},
        "train": {"steps": 16, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "eval_every": 8,
                  "eval_batches": 3, "checkpoint_every": 8, "log_every": 4,
                  "sample_prompt": "The red [MASK] runs.", **train},
    }
    path = tmp_path / "bert.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _nsp_accuracy_by_hand(run, batches):
    """NSP accuracy of the run's final model over the validation batches the trainer scores, counted here."""
    from lmforge.data.loader import loader_for
    from lmforge.run import load_run, run_store

    loaded = load_run(run)
    loader = loader_for(loaded.config, run_store(run, loaded.config), "val", training=False)
    correct = total = 0
    with torch.no_grad():
        for index in range(min(batches, loader.batches_per_epoch)):
            batch = loader.micro_batch(index * loader.batch_size)
            logits = loaded.model(**batch).nsp_logits
            keep = batch["nsp_labels"] != -100
            correct += int((logits[keep].argmax(-1) == batch["nsp_labels"][keep]).sum())
            total += int(keep.sum())
    return correct / total


def test_bert_pretrain_evaluate_fill_mask_and_resume(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", "--config", str(_config(tmp_path)), "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "MLM loss" in out and "NSP" in out and "[MASK]" in out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r for r in rows if "val_mlm_acc" in r]
    assert len(evaluated) == 2
    assert evaluated[-1]["val_nsp_acc"] == _nsp_accuracy_by_hand(run, batches=3)

    assert main(["evaluate", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"loss", "mlm_loss", "mlm_acc", "nsp_loss", "nsp_acc"} <= set(result)
    assert abs(result["loss"] - evaluated[-1]["val_loss"]) < 1e-6  # the same fixed validation set

    assert main(["fill-mask", str(run), "The [MASK] cat sleeps.", "--top-k", "3", "--json"]) == 0
    (candidates,) = json.loads(capsys.readouterr().out)
    assert len(candidates) == 3 and candidates[0]["probability"] >= candidates[1]["probability"]
    assert main(["fill-mask", str(run), "no mask here"]) == 2
    assert main(["generate", str(run), "--prompt", "x"]) == 2  # generate is for decoders
    assert "fill-mask" in capsys.readouterr().err

    # a run that died after its step-8 checkpoint continues bit-identically (data order, masks, RNG)
    partial = tmp_path / "partial"
    shutil.copytree(run, partial)
    shutil.rmtree(partial / "checkpoints" / "step-000016")
    (partial / "checkpoints" / "latest").write_text("step-000008\n")
    assert main(["pretrain", "--resume", str(partial)]) == 0
    capsys.readouterr()
    losses = [{r["step"]: r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
               if "loss" in r} for d in (run, partial)]
    assert losses[0] == losses[1]
    a, b = (load_file(str(d / "checkpoints/step-000016/model.safetensors")) for d in (run, partial))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bert_config_errors_name_the_key(tmp_path, capsys):
    config = _config(tmp_path)
    for override, key in (("mlm.mask_rate=1.5", "mlm.mask_rate"), ("model.block_size=4", "block_size=4"),
                          ("mlm.mask_token_fraction=0.95", "mask_token_fraction")):
        assert main(["pretrain", "--config", str(config), "--out", str(tmp_path / "x"), "--set", override]) == 2
        assert key in capsys.readouterr().err
