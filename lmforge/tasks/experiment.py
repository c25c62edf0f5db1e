"""Does pretraining pay? The same model fine-tuned from the pretrained checkpoint and from random init,
at several label budgets, on several tasks: a table and a plot of dev metric against labels used.

Every cell is an ordinary fine-tuned run under OUT/ (TASK-fFRACTION-INIT/), so any of them can be
evaluated, predicted with or resumed on its own; re-running the command skips finished cells and
continues an interrupted one. Each cell trains the same number of optimizer steps, so the budget
changes only how many distinct labeled examples those steps draw from. With several seeds every cell
is repeated per seed (the seed draws the label sample, the head and, for random init, every weight),
and the table reports the mean, the spread and how many seeds the pretrained model won.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from lmforge.config import apply_overrides, check_seed, from_dict, read_yaml, resolve_recipe
from lmforge.errors import LmforgeError
from lmforge.tasks.config import FinetuneConfig, FinetuneRunConfig, resolve_task_config
from lmforge.tasks.datasets import TaskData, load_task
from lmforge.tasks.finetune import finetune, is_finetune_run, load_finetune_config, plan_finetune
from lmforge.tasks.mixture import mixture_name, split_task_list
from lmforge.train.rundir import CONFIG_FILE

log = logging.getLogger(__name__)

INITS = ("pretrained", "random")


@dataclass
class ExperimentConfig:
    name: str = "pretrain-value"
    # task directories, GLUE names or task recipes; "a+b": one multi-task (text-to-text, t5) fine-tune of a and b
    tasks: list[str] = field(default_factory=lambda: ["sst2", "mrpc"])
    fractions: list[float] = field(default_factory=lambda: [0.1, 0.3, 1.0])  # label budgets, of each class
    seeds: list[int] = field(default_factory=lambda: [42])  # each cell once per seed (finetune.seed is ignored)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)  # every cell's, unless task_finetune says
    # per task (as named in `tasks`): finetune keys that differ for that task's cells, e.g. {stsb: {lr: 3e-4}};
    # both inits of a task share them, so each comparison stays one recipe against itself
    task_finetune: dict[str, dict[str, Any]] = field(default_factory=dict)

    def finetune_for(self, task: str) -> FinetuneConfig:
        """The finetune settings of `task`'s cells: `finetune` with the task's own keys over it."""
        overrides = self.task_finetune.get(task)
        if not overrides:
            return self.finetune
        prefix = f"task_finetune.{task}"
        for key in overrides:
            if key in ("init", "label_fraction", "seed"):
                raise LmforgeError(f"{prefix}.{key}: the experiment sets {key} per cell")
        merged = {**dataclasses.asdict(self.finetune), **overrides}
        return from_dict(FinetuneConfig, merged, prefix).validate(prefix)

    def validate(self) -> "ExperimentConfig":
        if not self.tasks:
            raise LmforgeError("tasks: give at least one task")
        if not self.fractions or not all(0 < f <= 1 for f in self.fractions):
            raise LmforgeError(f"fractions must be in (0, 1], got {self.fractions}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise LmforgeError(f"seeds: give one or more distinct seeds, got {self.seeds}")
        for i, seed in enumerate(self.seeds):
            check_seed(seed, f"seeds[{i}]")
        self.finetune.validate()
        # Checked now, not when the task's first cell starts. A task not in `tasks` (the recipe tunes stsb,
        # --tasks leaves it out) is not used; the table's header names the settings each task did use.
        for task in self.task_finetune:
            self.finetune_for(task)
        return self


def load_experiment(recipe: str, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """A recipe (path or shipped name, e.g. finetune-pretrain-value) with `--set` overrides."""
    path = resolve_recipe(recipe)
    data = apply_overrides(read_yaml(path), list(overrides))
    data.setdefault("name", path.stem)
    return from_dict(ExperimentConfig, data).validate()


def _cell_name(task: str, fraction: float, init: str, seed: int) -> str:
    return f"{task}-f{fraction:g}-{init}-s{seed}"


def _finished(run_dir: Path) -> Optional[dict[str, Any]]:
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text(encoding="utf-8"))
    return None if summary.get("interrupted") else summary


def run_experiment(pretrained: str | Path, config: ExperimentConfig, out: Path,
                   data_root: Optional[str] = None, progress: bool = True) -> list[dict[str, Any]]:
    """Fine-tune every (task, fraction, seed, init) cell into out/; returns one result row per cell."""
    if is_finetune_run(pretrained):
        raise LmforgeError(f"{pretrained} is a fine-tuned run; the experiment starts from a pretraining run")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for task_name in config.tasks:
        task: Optional[TaskData] = None  # loaded once per task, and only if a cell still has to run
        parts = [resolve_task_config(name, data_root) for name in split_task_list(task_name)]
        short_name = mixture_name([part.name for part in parts])
        # sentence tasks are read once for all cells; the structured kinds and mixtures read their own files
        preload = len(parts) == 1 and parts[0].kind in ("classification", "regression", "generation")
        for fraction, seed, init in itertools.product(config.fractions, config.seeds, INITS):
            run_dir = out / _cell_name(short_name, fraction, init, seed)
            recipe = dataclasses.replace(config.finetune_for(task_name), init=init, label_fraction=fraction, seed=seed)
            if (run_dir / CONFIG_FILE).is_file():  # an earlier run of OUT left this cell: trained the same way?
                _check_cell_matches(run_dir, plan_finetune(pretrained, task_name, data_root=data_root,
                                                           finetune=recipe))
            summary = _finished(run_dir)
            if summary is None:
                if preload:
                    task = task or load_task(parts[0])
                summary = _run_cell(pretrained, task_name, task, recipe, run_dir, data_root, progress)
            cell = {"fraction": fraction, "seed": seed, "init": init, "dev": summary["dev"], "steps": summary["step"],
                    "seconds": summary["seconds"], "run": str(run_dir)}
            metric = summary["select_metric"]
            rows.append({"task": summary["task"], "labels": summary["train_examples"], "metric": metric,
                         "score": summary["dev"][metric], **cell})
            if len(parts) > 1:  # a multi-task cell: each task's own score too (not counted twice in the time)
                rows.extend({"task": part.name, "labels": summary["tasks"][part.name]["train_examples"],
                             "metric": part.select_metric, "score": summary["dev"][f"{part.name}_{part.select_metric}"],
                             **cell, "seconds": 0.0} for part in parts)
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (out / "results.md").write_text(results_table(rows, config, pretrained) + "\n", encoding="utf-8")
    plot_results(rows, out / "results.png")
    return rows


# Settings that do not change what a cell learns: a cell may be finished on another device.
_IRRELEVANT = {"device", "log_every", "keep_checkpoints"}


def _check_cell_matches(run_dir: Path, planned: FinetuneRunConfig) -> None:
    """Refuse to reuse (or continue) a cell that an earlier run of OUT trained differently: its score
    would stand in the table for a recipe it was not trained with."""
    cell = load_finetune_config(run_dir)
    differences = [f"finetune.{f.name}={getattr(cell.finetune, f.name)} (now {getattr(planned.finetune, f.name)})"
                   for f in dataclasses.fields(FinetuneConfig) if f.name not in _IRRELEVANT
                   and getattr(cell.finetune, f.name) != getattr(planned.finetune, f.name)]
    if Path(cell.base_run).resolve() != Path(planned.base_run).resolve() or \
            cell.base_checkpoint != planned.base_checkpoint:
        differences.append(f"base {cell.base_run} {cell.base_checkpoint} (now {planned.base_run} "
                           f"{planned.base_checkpoint})")
    if Path(cell.task.path).resolve() != Path(planned.task.path).resolve():
        differences.append(f"task {cell.task.path} (now {planned.task.path})")
    if differences:
        raise LmforgeError(f"{run_dir} was fine-tuned with {', '.join(differences)}; give the experiment "
                           f"another --out, or remove that cell to train it again")


def _run_cell(pretrained: str | Path, task_name: str, task: Optional[TaskData], recipe: FinetuneConfig, run_dir: Path,
              data_root: Optional[str], progress: bool) -> dict[str, Any]:
    """One fine-tune (continued if an earlier attempt left a checkpoint); its summary."""
    resume = (run_dir / "checkpoints" / "latest").is_file()
    if resume:
        cell = load_finetune_config(run_dir)
    else:
        cell = plan_finetune(pretrained, task_name, data_root=data_root, finetune=recipe)
    if progress:
        log.info(f"[{run_dir.name}]")
    result = finetune(cell, run_dir, resume=resume, progress=progress, task=task)
    if result.interrupted_by is not None:
        raise KeyboardInterrupt
    summary = _finished(run_dir)
    assert summary is not None  # finetune() writes summary.json when it completes
    return summary


def _spread(scores: Sequence[float]) -> str:
    """'0.812' for one seed, '0.812 ± 0.010' (sample standard deviation) for several."""
    mean = statistics.fmean(scores)
    return f"{mean:.3f}" if len(scores) == 1 else f"{mean:.3f} ± {statistics.stdev(scores):.3f}"


def _setting(key: str, value: Any) -> str:
    return f"{key} {value:g}" if isinstance(value, float) else f"{key} {value}"


def results_table(rows: Sequence[dict[str, Any]], config: ExperimentConfig, pretrained: str | Path) -> str:
    """Markdown: per task and budget, the dev metric from pretrained and from random init (mean ± sd over
    seeds), the mean gain, and on how many seeds the pretrained model scored higher."""
    ft = config.finetune
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"Dev metric after fine-tuning from `{pretrained}` vs from random init (same shape, tokenizer and "
             f"recipe: {f'{ft.steps} steps' if ft.steps else f'{ft.epochs:g} epoch(s)'} of {ft.batch_size}, lr {ft.lr:g}, "
             f"max_length {ft.max_length}, pooling {ft.pooling}, best dev checkpoint"
             + "".join(f"; {task}: " + ", ".join(_setting(k, getattr(config.finetune_for(task), k)) for k in overrides)
                       for task, overrides in config.task_finetune.items() if task in config.tasks)
             + f"); seeds {', '.join(map(str, seeds))}"
             + (" (mean ± sample standard deviation)." if len(seeds) > 1 else "."), "",
             "| task | budget | labels | metric | pretrained | random init | gain | pretrained higher |",
             "|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, float], dict[int, dict[str, dict[str, Any]]]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["fraction"]), {}).setdefault(r["seed"], {})[r["init"]] = r
    for (task, fraction), by_seed in groups.items():
        pairs = [(cells["pretrained"], cells["random"]) for cells in by_seed.values() if len(cells) == 2]
        if not pairs:
            continue
        ours, theirs = [p["score"] for p, _ in pairs], [q["score"] for _, q in pairs]
        wins = sum(a > b for a, b in zip(ours, theirs))
        lines.append(f"| {task} | {fraction:.0%} | {pairs[0][0]['labels']:,} | {pairs[0][0]['metric']} | "
                     f"{_spread(ours)} | {_spread(theirs)} | {statistics.fmean(ours) - statistics.fmean(theirs):+.3f} | "
                     f"{wins} of {len(pairs)} |")
    total = sum(r["seconds"] for r in rows)
    lines += ["", f"{len({r['run'] for r in rows})} fine-tunes, {total / 60:.1f} minutes in all."]
    return "\n".join(lines)


def plot_results(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """One panel per task: dev metric against labels used (log scale), pretrained vs random init;
    the mean over seeds with the sample standard deviation as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for init, style in zip(INITS, ("o-", "s--")):
            by_labels: dict[int, list[float]] = {}
            for r in rows:
                if r["task"] == task and r["init"] == init:
                    by_labels.setdefault(r["labels"], []).append(r["score"])
            labels = sorted(by_labels)
            means = [statistics.fmean(by_labels[n]) for n in labels]
            spreads = [statistics.stdev(by_labels[n]) if len(by_labels[n]) > 1 else 0.0 for n in labels]
            ax.errorbar(labels, means, yerr=spreads, fmt=style, capsize=3, label=f"{init} init")
        metric = next(r["metric"] for r in rows if r["task"] == task)
        ax.set(xscale="log", xlabel="labeled examples used", ylabel=f"dev {metric}", title=task)
        counts = sorted({r["labels"] for r in rows if r["task"] == task})
        ax.set_xticks(counts, [f"{n:,}" for n in counts])  # the budgets themselves, not crowded log ticks
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
