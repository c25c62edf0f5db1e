"""Multi-task text-to-text fine-tuning: T5's examples-proportional mixing with a cap, end to end on a tiny t5."""

import json

import numpy as np
import pytest

from lmforge.cli import main
from lmforge.tasks.mixture import MixingPlan, split_task_list
from test_finetune import SENTIMENT, make_base_run, make_task
from test_finetune_kinds import finetune_cli, make_seq2seq_task, make_t5_base_run, sets


def test_each_epoch_holds_capped_shares_of_each_task_without_repeats():
    plan = MixingPlan((10, 200, 37), cap=50)
    assert plan.per_epoch == (10, 50, 37) and plan.epoch_size == 97
    assert plan.rates() == pytest.approx([10 / 97, 50 / 97, 37 / 97])
    seen_big = []
    for epoch in range(4):
        order = plan.epoch_order(seed=3, epoch=epoch)
        assert len(order) == 97 and len(set(order.tolist())) == 97  # no example twice in an epoch
        small, big, mid = order[order < 10], order[(order >= 10) & (order < 210)], order[order >= 210]
        assert sorted(small.tolist()) == list(range(10)) and sorted(mid.tolist()) == list(range(210, 247))
        assert len(big) == 50
        seen_big.extend(big.tolist())
    # the capped task reads its stream on: four epochs of 50 are its 200 examples, each once
    assert sorted(seen_big) == list(range(10, 210))


def test_mixing_is_a_pure_function_of_seed_and_step_and_covers_each_epoch():
    plan = MixingPlan((7, 30), cap=12)
    steps = [plan.batch_indices(4, seed=5, step=s) for s in range(5)]  # epoch of 19: batches 4,4,4,4,3
    assert [len(s) for s in steps] == [4, 4, 4, 4, 3]
    assert sorted(np.concatenate(steps).tolist()) == sorted(plan.epoch_order(5, 0).tolist())
    again = [plan.batch_indices(4, seed=5, step=s) for s in range(5)]
    assert all((a == b).all() for a, b in zip(steps, again))
    assert not (plan.epoch_order(5, 1) == plan.epoch_order(5, 0)).all()
    # an epoch that wraps into the task's next pass: positions 24..35 of its stream = the last 6 of one
    # permutation of 30 and the first 6 of the next (as a repeated, reshuffled dataset reads)
    window = plan.epoch_order(5, 2)
    big = np.sort(window[window >= 7]) - 7
    first, second = np.random.default_rng([5, 1, 0, 2]).permutation(30), np.random.default_rng([5, 1, 1, 2]).permutation(30)
    assert len(window) == 19 and big.tolist() == sorted(first[24:].tolist() + second[:6].tolist())


def test_task_lists_split_on_comma_or_plus():
    assert split_task_list("sst2,stsb") == ["sst2", "stsb"]
    assert split_task_list("sst2+stsb+cola") == ["sst2", "stsb", "cola"]
    assert split_task_list("path/to/task") == ["path/to/task"]


def two_tasks(root):
    """A tiny t5 base run, a classification task (sent) and a seq2seq task (swap)."""
    return make_t5_base_run(root), make_task(root, SENTIMENT), make_seq2seq_task(root)


def test_two_tasks_in_one_t5_run_each_scored_and_predicted(tmp_path, capsys):
    base, sentiment, swap = two_tasks(tmp_path)
    run = tmp_path / "ft"
    summary = finetune_cli(base, f"{sentiment},{swap}", run,
                           ["finetune.steps=120", "finetune.eval_every=120", "task.max_target_length=40"])
    assert summary["task"] == "sent+swap" and summary["select_metric"] == "average"
    dev = summary["dev"]
    assert dev["sent_accuracy"] == 1.0 and dev["swap_bleu"] == pytest.approx(1.0)
    assert dev["average"] == pytest.approx((dev["sent_accuracy"] + dev["swap_bleu"]) / 2)
    assert summary["tasks"]["sent"]["train_examples"] == len(SENTIMENT)
    rates = [summary["tasks"][name]["rate"] for name in ("sent", "swap")]
    assert sum(rates) == pytest.approx(1.0)
    capsys.readouterr()
    assert main(["evaluate", str(run), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["task"] == "sent+swap" and evaluated["average"] == pytest.approx(dev["average"])
    assert main(["predict", str(run), "a great film"]) == 0  # the first task's prefix by default
    assert capsys.readouterr().out.strip() == "pos"
    assert main(["predict", str(run), "dave oslo", "--task", "swap"]) == 0
    assert capsys.readouterr().out.strip() == "in oslo lives dave now"
    assert main(["predict", str(run), "dave oslo", "--task", "nope"]) == 2
    assert "fine-tuned on sent, swap" in capsys.readouterr().err


def test_mixture_cap_changes_the_epoch_and_is_validated(tmp_path, capsys):
    base, sentiment, swap = two_tasks(tmp_path)
    run = tmp_path / "ft"
    summary = finetune_cli(base, f"{sentiment}+{swap}", run, ["finetune.epochs=1", "finetune.mixing_cap=4"])
    assert summary["total_steps"] == 1  # 4 + 4 examples per epoch, batches of 8
    assert summary["tasks"]["sent"]["rate"] == pytest.approx(0.5)
    assert main(["finetune", str(base), "--task", f"{sentiment},{swap}", "--out", str(tmp_path / "bad"),
                 "--set", "finetune.mixing_cap=0"]) == 2
    assert "finetune.mixing_cap" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("tasks,message", [
    ("{sent},nosuchtask", "'nosuchtask' is neither a directory nor a GLUE task name"),
    ("{sent},", "an empty task name"),
    ("{sent},{sent}", "names a task twice"),
])
def test_a_bad_task_list_is_one_line_naming_it(tmp_path, capsys, tasks, message):
    base = make_t5_base_run(tmp_path)
    sentiment = make_task(tmp_path, SENTIMENT)
    assert main(["finetune", str(base), "--task", tasks.format(sent=sentiment), "--out", str(tmp_path / "ft")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "ft").exists()


def test_several_tasks_need_a_t5_run(tmp_path, capsys):
    base = make_base_run(tmp_path)
    sentiment = make_task(tmp_path, SENTIMENT)
    other = make_task(tmp_path, SENTIMENT, name="other")
    assert main(["finetune", str(base), "--task", f"{sentiment},{other}", "--out", str(tmp_path / "ft")]) == 2
    assert "text-to-text, for a t5 run" in capsys.readouterr().err


def test_experiment_on_a_mixture_reports_each_task(tmp_path, capsys):
    base, sentiment, swap = two_tasks(tmp_path)
    out = tmp_path / "exp"
    assert main(["experiment", str(base), "--tasks", f"{sentiment}+{swap}", "--fractions", "1.0", "--out", str(out),
                 *sets(["finetune.steps=20", "finetune.eval_every=20", "finetune.batch_size=8",
                        "finetune.dropout=0", "finetune.warmup=0"])]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {(r["task"], r["init"]) for r in rows} == {(t, i) for t in ("sent+swap", "sent", "swap")
                                                     for i in ("pretrained", "random")}
    table = (out / "results.md").read_text()
    assert "| sent+swap | 100% |" in table and "| swap | 100% |" in table and "| bleu |" in table
