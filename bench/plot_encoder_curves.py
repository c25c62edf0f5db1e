"""One plot of held-out masked-token accuracy against minutes of training time: an lmforge BERT run and
the transformers peer (`bert_peer_mlm.py`), plus a markdown table of both at fixed minutes.

    python bench/plot_encoder_curves.py --run runs/bert --peer runs/bert-peer.jsonl \\
        --png bench/results-encoder-curves.png --table bench/results-encoder-curves.md

lmforge's curve: `val_mlm_acc` of the run's metrics.jsonl. Its time axis is the row's `elapsed_s` where
the run logged one, else the training time summed from the throughput windows: each log row covers
(its `tokens` - the previous row's) / its `tokens_per_s` seconds, windows that exclude evaluation and
checkpoint writing; an evaluation at a step without a log row gets the time interpolated by step. The
peer's curve: `val_masked_acc` against `elapsed_s` (training time, evaluation excluded). A table value
at t minutes is interpolated linearly between the evaluations around t; a curve that ends less than
END_SLACK of t short of it gives its last value, starred (a run whose budget clock also counted
evaluation stops a little short of the mark in training time); "-" where t lies before a curve's first
evaluation or further past its last.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lmforge.errors import LmforgeError  # noqa: E402
from lmforge.train.metrics import read_metrics  # noqa: E402

Curve = tuple[np.ndarray, np.ndarray]  # (minutes, accuracy), minutes increasing
END_SLACK = 0.02


def training_seconds(rows: list[dict]) -> np.ndarray:
    """Seconds of training at each row of an lmforge metrics.jsonl: `elapsed_s` where logged, else summed
    from the throughput windows (rows without throughput fields get the time interpolated by step)."""
    if rows and all("elapsed_s" in r for r in rows):
        return np.array([float(r["elapsed_s"]) for r in rows])
    steps, seconds, total, tokens = [0.0], [0.0], 0.0, 0
    for r in rows:
        if r.get("tokens_per_s") and r.get("tokens") is not None:
            total += (r["tokens"] - tokens) / r["tokens_per_s"]
            tokens = r["tokens"]
            steps.append(float(r["step"]))
            seconds.append(total)
    if len(steps) == 1:
        raise LmforgeError("metrics.jsonl has neither elapsed_s nor tokens/tokens_per_s rows; cannot place it in time")
    return np.interp([float(r["step"]) for r in rows], steps, seconds)


def lmforge_curve(run_dir: Path) -> Curve:
    """(minutes, val_mlm_acc) of an lmforge BERT run."""
    rows = read_metrics(run_dir / "metrics.jsonl")
    if not rows:
        raise LmforgeError(f"{run_dir / 'metrics.jsonl'}: missing or empty; give --run an lmforge run directory")
    minutes = training_seconds(rows) / 60.0
    scored = [i for i, r in enumerate(rows) if r.get("val_mlm_acc") is not None]
    if not scored:
        raise LmforgeError(f"{run_dir / 'metrics.jsonl'}: no val_mlm_acc rows (not a BERT run, or not evaluated yet)")
    return minutes[scored], np.array([rows[i]["val_mlm_acc"] for i in scored])


def peer_curve(path: Path) -> Curve:
    """(minutes, val_masked_acc) of a bert_peer_mlm.py curve."""
    rows = read_metrics(path)
    if not rows or any("elapsed_s" not in r or "val_masked_acc" not in r for r in rows):
        raise LmforgeError(f"{path}: not a bert_peer_mlm.py curve (JSON lines with elapsed_s and val_masked_acc)")
    return np.array([r["elapsed_s"] / 60.0 for r in rows]), np.array([r["val_masked_acc"] for r in rows])


def accuracy_at(curve: Curve, minutes: float) -> tuple[float | None, bool]:
    """(the curve's accuracy at `minutes`, linear between its evaluations, or None outside them;
    whether it is the last evaluation standing in for a mark just past the curve's end)."""
    x, y = curve
    if minutes < x[0] or minutes > x[-1] + END_SLACK * minutes:
        return None, False
    return float(np.interp(minutes, x, y)), bool(minutes > x[-1])


def table(curves: dict[str, Curve], at: list[float]) -> str:
    """Markdown: accuracy of each curve at each minute mark, and the first curve's over the second's."""
    (name_a, a), (name_b, b) = curves.items()
    ratio_name = f"{name_a.split()[0]} / {name_b.split()[0]}"
    lines = [f"| minutes | {name_a} | {name_b} | {ratio_name} |", "|---:|---:|---:|---:|"]
    starred = False
    for t in at:
        (va, late_a), (vb, late_b) = accuracy_at(a, t), accuracy_at(b, t)
        starred |= late_a or late_b
        ratio = f"{va / vb:.2f}x" if va is not None and vb else "-"
        lines.append(f"| {t:g} | {_percent(va, late_a)} | {_percent(vb, late_b)} | {ratio} |")
    lines.append("")
    if starred:
        lines.append(f"\\* the curve's last evaluation, less than {END_SLACK:.0%} of the mark before it\n")
    for name, (x, y) in curves.items():
        lines.append(f"- {name}: last evaluation at {x[-1]:.2f} min, {y[-1]:.1%}; best {y.max():.1%}")
    return "\n".join(lines) + "\n"


def _percent(value: float | None, late: bool) -> str:
    return "-" if value is None else f"{value:.1%}" + ("\\*" if late else "")


def plot(curves: dict[str, Curve], png: Path, title: str) -> Path:
    """Both curves on one axis: minutes of training time vs held-out masked-token accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, (x, y) in curves.items():
        ax.plot(x, 100 * y, "o-", ms=3, label=name)
    ax.set_xlabel("minutes of training (evaluation excluded)")
    ax.set_ylabel("held-out masked-token accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return png


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="the lmforge BERT run directory")
    p.add_argument("--peer", required=True, help="bert_peer_mlm.py's JSONL curve")
    p.add_argument("--png", default="encoder-curves.png")
    p.add_argument("--table", default="", help="also write the markdown table here (always printed)")
    p.add_argument("--at", type=float, nargs="+", default=[5, 10, 15, 20], help="minute marks of the table")
    args = p.parse_args(argv)
    run = Path(args.run)
    try:
        config = run / "config.yaml"
        name = "lmforge"
        if config.is_file():
            import yaml

            name = f"lmforge {yaml.safe_load(config.read_text(encoding='utf-8')).get('name', run.name)}"
        curves = {name: lmforge_curve(run), "transformers BertForMaskedLM": peer_curve(Path(args.peer))}
    except LmforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    png = plot(curves, Path(args.png), "held-out masked-token accuracy at equal training time")
    text = table(curves, args.at)
    if args.table:
        Path(args.table).write_text(text, encoding="utf-8")
    print(text, end="")
    print(f"plot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
