"""The same run on several processes: real 2-process gloo runs through torchrun on CPU, against one process.

Losses are compared with a tolerance (1e-5 relative): the processes add up gradients in another order
than one process does, which moves float32 results in the last bits. Dropout is 0 where runs on
different numbers of processes are compared, and 0.1 where a resumed run must repeat every random draw.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from conftest import TEXT, tiny_config_dict
from lmforge.cli import main
from lmforge.config import load_config, upgrade_train_section
from lmforge.data.loader import CLMLoader
from lmforge.errors import LmforgeError
from lmforge.train.checkpoint import Checkpoint, TrainerState, load_training_state
from lmforge.train.distributed import fsdp_units

RTOL = 1e-5


def _env(cache: Path) -> dict:
    return {**os.environ, "LMFORGE_CACHE": str(cache), "OMP_NUM_THREADS": "1"}


def _torchrun(*args: str, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "lmforge", *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def _one_process(*args: str, env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "lmforge", *args], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert len(steps) == len(set(steps)), "a step logged twice: only rank 0 may write metrics"
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _val_losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}


def _assert_close(a: dict[int, float], b: dict[int, float]) -> None:
    assert sorted(a) == sorted(b)
    worst = max(abs(a[k] - b[k]) / abs(a[k]) for k in a)
    assert worst < RTOL, f"largest relative difference {worst:.2e}"


def assert_pretrain_matches_on_two_processes(config: dict, root: Path, *torchrun_sets: str) -> None:
    """Pretrain `config` in this process and on 2 torchrun processes (with `--set` overrides) under
    `root`; the per-step losses must agree within RTOL."""
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = _env(root / "cache")
    one, two = root / "one", root / "two"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LMFORGE_CACHE", env["LMFORGE_CACHE"])
        assert main(["pretrain", "--config", str(path), "--out", str(one)]) == 0
    sets = [arg for kv in torchrun_sets for arg in ("--set", kv)]
    _torchrun("pretrain", "--config", str(path), "--out", str(two), *sets, env=env)
    _assert_close(_losses(one), _losses(two))


def _cut_back(run: Path, to: Path, step: int) -> Path:
    """A copy of `run` as if it had died right after its checkpoint at `step`."""
    shutil.copytree(run, to)
    for later in (to / "checkpoints").glob("step-*"):
        if int(later.name.split("-")[1]) > step:
            shutil.rmtree(later)
    (to / "checkpoints" / "latest").write_text(f"step-{step:06d}\n")
    return to


@pytest.fixture(scope="module")
def gpt_runs(tmp_path_factory):
    """One GPT recipe trained for 20 steps (global batch 8) by 1 process, 2 DDP processes with gradient
    accumulation (micro-batches of 2) and 2 FSDP processes with activation checkpointing."""
    root = tmp_path_factory.mktemp("gpt")
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT * 40, encoding="utf-8")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(corpus, steps=20, checkpoint_every=10, eval_every=10,
                                                      sample_tokens=0)))
    env = _env(root / "cache")
    runs = {name: root / name for name in ("one", "ddp", "fsdp")}
    with pytest.MonkeyPatch.context() as patch:  # the reference run in this process: no start-up to pay
        patch.setenv("LMFORGE_CACHE", env["LMFORGE_CACHE"])
        assert main(["pretrain", "--config", str(config), "--out", str(runs["one"])]) == 0
    _torchrun("pretrain", "--config", str(config), "--out", str(runs["ddp"]), "--set", "train.micro_batch_size=2",
              env=env)
    _torchrun("pretrain", "--config", str(config), "--out", str(runs["fsdp"]), "--set", "parallel.strategy=fsdp",
              "--set", "parallel.activation_checkpointing=true", env=env)
    return runs, env


def test_ddp_and_fsdp_runs_match_one_process_step_for_step(gpt_runs):
    runs, _ = gpt_runs
    one = _losses(runs["one"])
    assert len(one) == 20
    for name in ("ddp", "fsdp"):
        _assert_close(one, _losses(runs[name]))
        _assert_close(_val_losses(runs["one"]), _val_losses(runs[name]))
        a = load_file(str(runs["one"] / "checkpoints/step-000020/model.safetensors"))
        b = load_file(str(runs[name] / "checkpoints/step-000020/model.safetensors"))
        # Adam turns last-bit differences in tiny gradients into differences of up to ~1e-5 in weights that
        # moved ~20 x 3e-3 from their initial values (measured: at most 1.0e-5)
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=5e-5) for k in a)


def test_distributed_checkpoints_hold_shards_whole_weights_and_every_rank_rng(gpt_runs):
    runs, _ = gpt_runs
    ckpt = runs["fsdp"] / "checkpoints/step-000020"
    shards = sorted(p.name for p in (ckpt / "dcp").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # each process wrote its own shards
    assert not (ckpt / "optimizer.pt").exists() and (ckpt / "model.safetensors").is_file()
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert set(state["files"]) == {"model.safetensors", "dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp"}
    assert len(state["rng"]) == 2 and state["rng"][0] != state["rng"][1]  # ranks draw dropout masks of their own
    assert state["loader"] == {"samples": 160, "seed": 1337}  # 20 global batches of 8, for any world size


def test_a_two_process_checkpoint_resumes_in_one_process_identically(gpt_runs, tmp_path):
    runs, env = gpt_runs
    resumed = _cut_back(runs["fsdp"], tmp_path / "resumed", step=10)
    done = _one_process("pretrain", "--resume", str(resumed), env=env)
    assert "RNG streams re-derived" in done.stderr
    _assert_close(_losses(runs["fsdp"]), _losses(resumed))


def test_single_process_tools_read_distributed_checkpoints(gpt_runs, monkeypatch, capsys):
    runs, env = gpt_runs
    monkeypatch.setenv("LMFORGE_CACHE", env["LMFORGE_CACHE"])
    for name in ("one", "fsdp"):
        assert main(["evaluate", str(runs[name]), "--json"]) == 0
    one, fsdp = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert abs(one["loss"] - fsdp["loss"]) / one["loss"] < RTOL
    assert main(["generate", str(runs["fsdp"]), "--prompt", "The ", "--max-new-tokens", "8", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("The ")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_t5_on_two_processes_matches_one_process(tmp_path, monkeypatch, strategy):
    """Encoder and decoder blocks are FSDP units (and checkpointed); DDP with accumulation; same losses."""
    from test_t5_pretrain import t5_config_dict

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 40, encoding="utf-8")
    config = tmp_path / "t5.yaml"
    config.write_text(yaml.safe_dump(t5_config_dict(corpus, dropout=0.0, steps=8, eval_every=4, checkpoint_every=4,
                                                     sample_tokens=0)))
    env = _env(tmp_path / "cache")
    monkeypatch.setenv("LMFORGE_CACHE", env["LMFORGE_CACHE"])
    assert main(["pretrain", "--config", str(config), "--out", str(tmp_path / "one")]) == 0
    extra = (["--set", "parallel.strategy=fsdp", "--set", "parallel.activation_checkpointing=true"]
             if strategy == "fsdp" else ["--set", "train.micro_batch_size=2"])
    _torchrun("pretrain", "--config", str(config), "--out", str(tmp_path / "two"), *extra, env=env)
    _assert_close(_losses(tmp_path / "one"), _losses(tmp_path / "two"))
    _assert_close(_val_losses(tmp_path / "one"), _val_losses(tmp_path / "two"))
    if strategy == "fsdp":
        shards = sorted(p.name for p in (tmp_path / "two/checkpoints/step-000008/dcp").iterdir())
        assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]


def test_fsdp_units_of_t5_are_its_encoder_and_decoder_blocks():
    from lmforge.model import build_model
    from lmforge.model.config import ModelConfig

    model = build_model(ModelConfig(family="t5", n_layer=3, n_decoder_layer=2, vocab_size=16))
    units = fsdp_units(model, "t5")
    assert units == [*model.encoder.blocks, *model.decoder.blocks]


def _bert_config(root: Path, **train) -> Path:
    from test_bert_cli import _config

    path = _config(root, log_every=1, steps=6, checkpoint_every=3, eval_every=3, **train)
    data = yaml.safe_load(path.read_text())
    data["model"]["dropout"] = 0.1
    path.write_text(yaml.safe_dump(data))
    return path


def test_bert_on_two_processes_resumes_with_every_rank_rng_restored(tmp_path):
    """With dropout, a resumed run repeats its steps bit for bit only if each process gets its own RNG back."""
    config = _bert_config(tmp_path)
    env = _env(tmp_path / "cache")
    full = tmp_path / "full"
    _torchrun("pretrain", "--config", str(config), "--out", str(full), "--set", "parallel.strategy=fsdp",
              "--set", "train.micro_batch_size=2", env=env)
    resumed = _cut_back(full, tmp_path / "resumed", step=3)
    done = _torchrun("pretrain", "--resume", str(resumed), env=env)
    assert "re-derived" not in done.stderr
    assert _losses(resumed) == _losses(full)
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert any("val_nsp_acc" in r for r in rows) and (full / "samples.txt").is_file()  # rank 0 filled the mask


# pooling=mean leaves BERT's [CLS] pooler unused: DDP and FSDP must not wait for its gradient.
def _finetune_one_and_two(tmp_path, monkeypatch, env, base, task, strategy, steps, extra=()) -> tuple[dict, dict]:
    """The same fine-tune in one process and on 2 (micro-batches of 1, batches of 6, dev every 3 steps);
    asserts equal per-step losses and returns both runs' summaries."""
    common = ["finetune", str(base), "--task", str(task), "--set", "finetune.dropout=0", "--set", "finetune.lr=3e-3",
              "--set", "finetune.batch_size=6", "--set", "finetune.warmup=0", "--set", "finetune.log_every=1",
              "--set", f"finetune.steps={steps}", "--set", "finetune.eval_every=3", *extra]
    monkeypatch.setenv("LMFORGE_CACHE", env["LMFORGE_CACHE"])
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    _torchrun(*common, "--out", str(tmp_path / "two"), "--set", f"parallel.strategy={strategy}",
              "--set", "finetune.micro_batch_size=1", env=env)
    _assert_close(_losses(tmp_path / "one"), _losses(tmp_path / "two"))
    return tuple(json.loads((tmp_path / r / "summary.json").read_text()) for r in ("one", "two"))


@pytest.mark.parametrize("strategy, pooling", [("fsdp", "auto"), ("ddp", "mean"), ("fsdp", "mean")])
def test_finetune_on_two_processes_matches_one_process(tmp_path, monkeypatch, strategy, pooling):
    from test_finetune import SENTIMENT, make_base_run, make_task

    # A dev set of 144 is 3 evaluation batches (64, 64, 16): rank 0 scores two, rank 1 one and a discarded repeat.
    base, task = make_base_run(tmp_path), make_task(tmp_path, SENTIMENT, dev=SENTIMENT * 9)
    env = _env(tmp_path / "cache")
    # 16 examples in batches of 6: each epoch ends with a batch of 4, which leaves one of each
    # process's 3 micro-batches empty.
    one, two = _finetune_one_and_two(tmp_path, monkeypatch, env, base, task, strategy, steps=9,
                                     extra=["--set", f"finetune.pooling={pooling}"])
    assert one["best_checkpoint"] == two["best_checkpoint"]
    assert abs(one["dev"]["loss"] - two["dev"]["loss"]) / one["dev"]["loss"] < RTOL
    assert one["dev"]["accuracy"] == two["dev"]["accuracy"]


def _make_kind_run(tmp_path, kind: str) -> tuple[Path, Path]:
    """A tiny base run and task of a structured kind: tokens (NER) on bert, seq2seq on t5."""
    from test_finetune import make_base_run
    from test_finetune_kinds import make_ner_task, make_seq2seq_task, make_t5_base_run

    if kind == "tokens":
        return make_base_run(tmp_path), make_ner_task(tmp_path)
    return make_t5_base_run(tmp_path), make_seq2seq_task(tmp_path)


@pytest.mark.parametrize("kind, strategy", [("tokens", "ddp"), ("seq2seq", "ddp"), ("seq2seq", "fsdp")])
def test_structured_finetune_kinds_on_two_processes_match_one_process(tmp_path, monkeypatch, kind, strategy):
    """Token classification on a bert run and seq2seq on a t5 run under DDP (and FSDP2, whose dev decoding
    needs the whole model): the same per-step losses and dev scores (entity F1 of the tagged words; BLEU and
    ROUGE of the decoded targets) as one process."""
    base, task = _make_kind_run(tmp_path, kind)
    env = _env(tmp_path / "cache")
    # 16 examples in batches of 6 split over 2 processes x 3 micro-batches of 1: the batch of 4 that ends
    # each epoch leaves one micro-batch of each process empty.
    one, two = _finetune_one_and_two(tmp_path, monkeypatch, env, base, task, strategy, steps=6)
    assert one["kind"] == two["kind"] == kind
    assert one["best_checkpoint"] == two["best_checkpoint"]
    assert abs(one["dev"]["loss"] - two["dev"]["loss"]) / one["dev"]["loss"] < RTOL
    scores = {k: v for k, v in one["dev"].items() if k != "loss"}
    assert scores and scores == {k: v for k, v in two["dev"].items() if k != "loss"}
    assert one["select_metric"] in scores


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2, before any work


@pytest.fixture
def two_processes(monkeypatch):
    """What torchrun puts in rank 0's environment for a 2-process run (no process group is formed here)."""
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)


@pytest.mark.parametrize("overrides, message", [
    (["train.batch_size=7"], "train.batch_size=7 (the global batch) does not split evenly over 2 processes"),
    (["train.micro_batch_size=3"], "train.batch_size=8 (the global batch) is not a multiple of "
                                   "train.micro_batch_size x processes = 3 x 2 = 6"),
    (["parallel.strategy=fsdp", "parallel.cpu_offload=true"], "parallel.cpu_offload moves FSDP's shards"),
    (["train.device=cuda:0"], "names one GPU"),
])
def test_bad_parallel_settings_are_refused_before_any_work(tmp_path, corpus_file, two_processes, capsys,
                                                           overrides, message):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(corpus_file)))
    run = tmp_path / "run"
    args = ["pretrain", "--config", str(config), "--out", str(run), *sum((["--set", o] for o in overrides), [])]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not run.exists() and not (tmp_path / "cache").exists()  # no run directory, no token store


def test_only_rank_0_reports_an_error_all_processes_share(tmp_path, corpus_file, two_processes, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(corpus_file, batch_size=7)))
    assert main(["pretrain", "--config", str(config)]) == 2
    assert capsys.readouterr().err == ""


def test_unknown_strategy_is_a_config_error(corpus_file):
    with pytest.raises(LmforgeError, match=r"'parallel.strategy' must be one of 'ddp' \| 'fsdp', got 'zero'"):
        load_config(None, ["parallel.strategy=zero"])
    with pytest.raises(LmforgeError, match="parallel.param_dtype applies to parallel.strategy=fsdp only"):
        load_config(None, ["parallel.param_dtype=bf16"])


def test_fsdp_refuses_a_model_without_transformer_blocks():
    with pytest.raises(LmforgeError, match="parallel.strategy=fsdp cannot wrap a model.family=mlp model"):
        fsdp_units(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), "mlp")


def test_torchrun_with_a_bad_global_batch_fails_fast_with_one_line(tmp_path, corpus_file):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(corpus_file, batch_size=7)))
    done = _torchrun("pretrain", "--config", str(config), "--out", str(tmp_path / "run"),
                     env=_env(tmp_path / "cache"), check=False)
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("lmforge pretrain")]
    assert ours == ["lmforge pretrain: error: train.batch_size=7 (the global batch) does not split evenly over "
                    "2 processes; use a multiple of 2"], done.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# Pieces


def test_recipes_with_grad_accum_keep_their_meaning():
    train = {"batch_size": 8, "grad_accum": 4}
    upgrade_train_section(train)
    assert train == {"batch_size": 32, "micro_batch_size": 8}
    train = {"batch_size": 12, "grad_accum": 1}
    upgrade_train_section(train)
    assert train == {"batch_size": 12}


def test_no_sample_is_read_twice_in_an_epoch_by_any_process():
    from test_loader import _split

    split, block = _split(16 * 65), 16  # 64 blocks per epoch
    ranks = [CLMLoader(split, block, 16, seed=5, rank=r, world_size=2, micro_batch_size=4) for r in range(2)]
    starts = [int(row[0]) for _ in range(4) for loader in ranks for _ in range(loader.accum_steps)
              for row in loader.next()["input_ids"]]
    assert len(starts) == 64 == len(set(starts))


def test_crafted_dcp_metadata_is_refused_not_unpickled(tmp_path):
    import pickle

    class Exploit:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    ckpt = tmp_path / "step-000001"
    (ckpt / "dcp").mkdir(parents=True)
    (ckpt / "dcp" / ".metadata").write_bytes(pickle.dumps(Exploit()))
    model = nn.Linear(2, 2)
    with pytest.raises(LmforgeError, match="posix.system is not allowed|os.system is not allowed"):
        load_training_state(Checkpoint(ckpt, TrainerState()), model, torch.optim.AdamW(model.parameters()))
    assert not (tmp_path / "pwned").exists()
