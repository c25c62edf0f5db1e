"""Plots and summaries of a run (loss curves, learning rate, throughput) and of a token store (curation)."""

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

    scored = [r for r in val if r.get("val_mlm_acc") is not None]
    if scored:  # BERT: the two tasks' validation accuracies
        fig, ax = plt.subplots(figsize=(8, 3.5))
        _series(ax, scored, "val_mlm_acc", "validation accuracy", "o-", label="MLM (masked positions)")
        nsp = [r for r in scored if r.get("val_nsp_acc") is not None]
        _series(ax, nsp, "val_nsp_acc", "validation accuracy", "o-", label="NSP")
        ax.set_title(run_dir.name)
        ax.legend()
        written.append(_save(fig, out / "accuracy.png"))

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
        last = val[-1]
        if last.get("val_mlm_acc") is not None:
            nsp = f", NSP accuracy {last['val_nsp_acc']:.1%}" if last.get("val_nsp_acc") is not None else ""
            lines.append(f"final MLM accuracy {last['val_mlm_acc']:.1%}{nsp}")
    return "\n".join(lines)


def summarize_store(store_dir: Path) -> str:
    """A token store's splits, its corpus, and what each curation step removed, as a table."""
    from lmforge.data.store import TokenStore

    manifest = TokenStore(store_dir).manifest
    corpus = manifest.get("corpus", {})
    lines = [f"token store: {store_dir}",
             f"corpus: {corpus.get('documents', 0):,} documents, {corpus.get('bytes', 0) / 1e6:,.1f} MB from "
             f"{corpus.get('files', 0):,} files ({len(corpus.get('skipped_files', []))} skipped)"]
    for name, info in manifest["splits"].items():
        lines.append(f"{name}: {info['tokens']:,} tokens, {info['documents']:,} documents, "
                     f"{len(info['shards'])} shards")
    steps = (manifest.get("curation") or {}).get("steps", [])
    if not steps:
        lines.append("curation: none")
        return "\n".join(lines)
    first = steps[0]
    header = (f"{'step':<20} {'docs removed':>13} {'%':>6} {'bytes removed':>14} {'%':>6} "
              f"{'docs left':>11} {'bytes left':>11}")
    lines += ["curation (% of what was read):", header, "-" * len(header)]
    for step in steps:
        docs, size = step.get("removed_documents", 0), step.get("removed_bytes", 0)
        lines.append(f"{step['step']:<20} {docs:>13,} {_percent(docs, first['documents']):>6} "
                     f"{_size(size):>14} {_percent(size, first['bytes']):>6} "
                     f"{step['documents']:>11,} {_size(step['bytes']):>11}")
    return "\n".join(lines)


def _percent(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}" if whole else "-"


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            break
        n /= 1000
    return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"


def plot_store(store_dir: Path) -> list[Path]:
    """plots/curation.png: documents and bytes removed by each curation step (nothing without curation)."""
    from lmforge.data.store import TokenStore

    steps = (TokenStore(store_dir).manifest.get("curation") or {}).get("steps", [])[1:]
    if not steps:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = store_dir / "plots"
    out.mkdir(exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    names = [s["step"] for s in steps]
    for ax, key, label in ((axes[0], "removed_documents", "documents removed"),
                           (axes[1], "removed_bytes", "MB removed")):
        values = [s[key] / (1e6 if key == "removed_bytes" else 1) for s in steps]
        ax.barh(names[::-1], values[::-1], color="tab:red")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle(f"curation of {store_dir.name}")
    return [_save(fig, out / "curation.png")]
