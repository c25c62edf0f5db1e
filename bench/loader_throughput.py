"""Training-loader throughput: sequences/s of each family's training loader at length 128.

Each family reads a token store prepared from the shared English corpus (english-nltk, 14.9 MB) with
its recipe's tokenizer: GPT (configs/gpt-tiny-bpe.yaml: byte-level BPE 8,192, causal-LM blocks) and
BERT (configs/bert-tiny.yaml: WordPiece 8,192, MLM + NSP sentence pairs). The stores are built once
in lmforge's cache and reused. Every measurement runs in a fresh process that builds the training
loader (`loader_for`, as the trainer does) with `train.loader_workers` = 0, 1, 2, takes one batch
(start-up: worker start, epoch plan), then calls `next()` for --seconds and reports sequences/s.

--baseline REF also measures the lmforge package as of git commit REF (exported to a temporary
directory), interleaved with the working tree's, so before/after come from the same run. A version
without `train.loader_workers` is measured at 0 workers only.

    python bench/loader_throughput.py                              # this tree, 0/1/2 workers
    python bench/loader_throughput.py --baseline 1c42f70           # before (that commit) and after

Last line: `min seq/s at 2 workers X` = the slower family's sequences/s with 2 workers (goal: 5,000).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPES = {"gpt": "gpt-tiny-bpe.yaml", "bert": "bert-tiny.yaml"}
CORPUS_CANDIDATES = [ROOT.parent / "shared" / "data" / "english-nltk" / "corpus.jsonl",
                     ROOT.parent.parent / "shared" / "data" / "english-nltk" / "corpus.jsonl"]


def family_config(family: str, corpus: str, batch_size: int, workers: int):
    """The family's recipe on `corpus`, with this batch size and loader workers (when the code has the key)."""
    from lmforge.config import load_config

    config = load_config(str(ROOT / "configs" / RECIPES[family]))
    config.data.corpus = [corpus]
    config.data.workers = 2
    config.train.batch_size = batch_size
    if workers and not hasattr(config.train, "loader_workers"):
        raise SystemExit("this lmforge has no train.loader_workers")
    if hasattr(config.train, "loader_workers"):
        config.train.loader_workers = workers
    return config


def prepare_stores(corpus: str) -> dict[str, str]:
    """Build (or reuse) each family's token store; returns family -> store directory."""
    from lmforge.data.prepare import prepare

    stores = {}
    for family in RECIPES:
        start = time.perf_counter()
        stores[family] = str(prepare(family_config(family, corpus, 64, 0).data, family, progress=False))
        print(f"store {family}: {stores[family]} ({time.perf_counter() - start:.1f}s)", file=sys.stderr)
    return stores


def measure(family: str, corpus: str, store_dir: str, batch_size: int, workers: int, seconds: float) -> dict:
    """Start-up seconds and steady sequences/s of the family's training loader (run in a fresh process)."""
    from lmforge.data.loader import loader_for
    from lmforge.data.store import TokenStore

    config = family_config(family, corpus, batch_size, workers)
    store = TokenStore(store_dir)
    start = time.perf_counter()
    loader = loader_for(config, store, "train", training=True)
    batch = loader.next()
    startup = time.perf_counter() - start
    assert batch["input_ids"].shape == (batch_size, 128), batch["input_ids"].shape
    sequences, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        sequences += len(loader.next()["input_ids"])
    elapsed = time.perf_counter() - start
    return {"startup_s": startup, "seq_per_s": sequences / elapsed, "sequences": sequences}


def export_commit(ref: str, into: Path) -> Path:
    """The lmforge package as of git `ref`, extracted under `into`."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "lmforge"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def run_child(code_root: Path, args, family: str, store: str, workers: int) -> dict | None:
    env = {**os.environ, "PYTHONPATH": str(code_root)}
    command = [sys.executable, __file__, "--child", family, "--store", store, "--corpus", args.corpus,
               "--batch-size", str(args.batch_size), "--seconds", str(args.seconds), "--workers", str(workers)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        if "no train.loader_workers" in done.stderr:
            return None
        raise SystemExit(f"measurement {family}/{workers} workers at {code_root} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="git commit whose lmforge is measured as 'before'")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--families", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--batch-size", type=int, default=64, help="sequences per batch (global = micro here)")
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per measurement")
    parser.add_argument("--corpus", default=next((str(p) for p in CORPUS_CANDIDATES if p.is_file()), None))
    parser.add_argument("--child", choices=list(RECIPES), help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.corpus is None:
        raise SystemExit("english-nltk corpus not found beside the repository; give --corpus")
    if args.child:
        result = measure(args.child, args.corpus, args.store, args.batch_size, args.workers[0], args.seconds)
        print(json.dumps(result))
        return

    sys.path.insert(0, str(ROOT))
    stores = prepare_stores(args.corpus)
    with tempfile.TemporaryDirectory() as tmp:
        codes = {"after": ROOT}
        if args.baseline:
            codes = {"before": export_commit(args.baseline, Path(tmp)), **codes}
        results: dict[tuple[str, str, int], dict | None] = {}
        for family in args.families:
            for workers in args.workers:
                for name, code_root in codes.items():  # interleaved, so machine noise hits both alike
                    results[name, family, workers] = run_child(code_root, args, family, stores[family], workers)

    print(f"loader throughput, sequences of 128 tokens per second; batches of {args.batch_size}; "
          f"{os.cpu_count()} CPUs (shared machine: compare within this run)")
    header = f"{'family':<6} {'workers':>7} " + " ".join(f"{name + ' seq/s':>13} {'start s':>7}" for name in codes)
    print(header + ("   after/before" if args.baseline else ""))
    for family in args.families:
        for workers in args.workers:
            cells, rates = [], {}
            for name in codes:
                r = results[name, family, workers]
                cells.append(f"{r['seq_per_s']:>13,.0f} {r['startup_s']:>7.2f}" if r else f"{'n/a':>13} {'':>7}")
                rates[name] = r["seq_per_s"] if r else None
            ratio = ""
            if args.baseline:
                base = rates["before"] or (results["before", family, 0] or {}).get("seq_per_s")
                ratio = f"   {rates['after'] / base:>8.2f}x" + ("" if rates["before"] else " (vs 0 workers)")
            print(f"{family:<6} {workers:>7} " + " ".join(cells) + ratio)
    if 2 in args.workers:
        worst = min(results["after", f, 2]["seq_per_s"] for f in args.families)
        print(f"min seq/s at 2 workers {worst:,.0f}")


if __name__ == "__main__":
    main()
