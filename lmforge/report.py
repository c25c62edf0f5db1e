"""Plots and summaries of a run: loss curves (train and validation), learning rate, throughput."""

from __future__ import annotations

from pathlib import Path

from lmforge.train.metrics import read_metrics


def plot_run(run_dir: Path) -> list[Path]:
    """Write plots/loss.png and plots/throughput.png from metrics.jsonl; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in rows if r.get("loss") is not None]
    val = [r for r in rows if r.get("val_loss") is not None]
    if not train and not val:
        return []
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    written = []

    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=[3, 1])
    _series(ax_loss, train, "loss", "loss (nats/token)", label="train", lw=1)
    _series(ax_loss, val, "val_loss", "loss (nats/token)", "o-", label="validation")
    ax_loss.set_title(run_dir.name)
    ax_loss.legend()
    _series(ax_lr, [r for r in train if r.get("lr") is not None], "lr", "learning rate", color="tab:green")
    written.append(_save(fig, out / "loss.png"))

    speed = [r for r in train if r.get("tokens_per_s")]
    if speed:
        fig, ax = plt.subplots(figsize=(8, 3))
        _series(ax, speed, "tokens_per_s", "tokens / s")
        written.append(_save(fig, out / "throughput.png"))
    return written


def _series(ax, rows: list[dict], key: str, ylabel: str, *style, **kwargs) -> None:
    if rows:
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], *style, **kwargs)
    ax.set_ylabel(ylabel)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summarize(run_dir: Path) -> str:
    rows = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in rows if r.get("loss") is not None]
    val = [r for r in rows if r.get("val_loss") is not None]
    lines = [f"run: {run_dir}"]
    if train:
        last = train[-1]
        lines.append(f"steps: {last['step']}  tokens seen: {last.get('tokens', 0):,}  last train loss: {last['loss']:.4f}")
        speeds = sorted(r["tokens_per_s"] for r in train if r.get("tokens_per_s"))
        if speeds:
            lines.append(f"median throughput: {speeds[len(speeds) // 2]:,.0f} tokens/s")
    if val:
        best = min(val, key=lambda r: r["val_loss"])
        lines.append(f"final val loss: {val[-1]['val_loss']:.4f} (best {best['val_loss']:.4f} at step {best['step']})")
    return "\n".join(lines)
