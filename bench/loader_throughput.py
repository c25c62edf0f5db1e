"""Training-loader throughput: sequences/s of each family's training loader at length 128.

Each loader reads a token store prepared from the shared English corpus (english-nltk, 14.9 MB) with
its recipe's tokenizer: GPT (configs/gpt-tiny-bpe.yaml: byte-level BPE 8,192, causal-LM blocks), BERT
(configs/bert-tiny.yaml: WordPiece 8,192, MLM + NSP sentence pairs) and T5 (configs/t5-tiny.yaml:
Unigram 8,192 with 100 sentinels, 128-token encoder inputs) with each of its objectives: `t5` span
corruption (noise 0.15, mean span 3: 141 raw tokens -> 128 inputs, 29 targets), `t5-prefix` prefix LM,
`t5-mix` the UL2-style mixture (span.objective mixture, its default denoisers). The stores are built
once in lmforge's cache and reused. Every measurement runs in a fresh process that builds the training
loader (`loader_for`, as the trainer does) with `train.loader_workers` = 0, 1, 2, takes one batch
(start-up: worker start, epoch plan), then calls `next()` for --seconds and reports sequences/s.

--baseline REF also measures the lmforge package as of git commit REF (exported to a temporary
directory), interleaved with the working tree's, so before/after come from the same run. A version
without `train.loader_workers` is measured at 0 workers only, one without a loader at all (n/a) not.

    python bench/loader_throughput.py                              # this tree, 0/1/2 workers
    python bench/loader_throughput.py --baseline 1c42f70           # before (that commit) and after
    python bench/loader_throughput.py --loaders t5 t5-mix          # some loaders only

Last line: `min seq/s at 2 workers X` = the slowest loader's sequences/s with 2 workers (goal: 5,000).
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
# loader -> (recipe, span.objective for t5); the t5 loaders share one store
LOADERS = {"gpt": ("gpt-tiny-bpe.yaml", None), "bert": ("bert-tiny.yaml", None), "t5": ("t5-tiny.yaml", "span"),
           "t5-prefix": ("t5-tiny.yaml", "prefix_lm"), "t5-mix": ("t5-tiny.yaml", "mixture")}
CORPUS_CANDIDATES = [ROOT.parent / "shared" / "data" / "english-nltk" / "corpus.jsonl",
                     ROOT.parent.parent / "shared" / "data" / "english-nltk" / "corpus.jsonl"]


def loader_config(name: str, corpus: str, batch_size: int, workers: int):
    """The loader's recipe on `corpus`, with this batch size and loader workers (when the code has the key)."""
    from lmforge.config import load_config
    from lmforge.errors import LmforgeError

    recipe, objective = LOADERS[name]
    try:  # the recipe from this tree, read by the lmforge being measured (maybe an older one)
        config = load_config(str(ROOT / "configs" / recipe))
    except LmforgeError as e:
        raise SystemExit(f"this lmforge has no {name} loader: {e}")
    if objective:
        config.span.objective = objective
    config.model.block_size = 128  # the recipes' length today; fixed here so that the measurement stays one of 128
    config.data.corpus = [corpus]
    config.data.workers = 2
    config.train.batch_size = batch_size
    if workers and not hasattr(config.train, "loader_workers"):
        raise SystemExit("this lmforge has no train.loader_workers")
    if hasattr(config.train, "loader_workers"):
        config.train.loader_workers = workers
    return config


def prepare_stores(corpus: str, names: list[str]) -> dict[str, str]:
    """Build (or reuse) each loader's token store; returns loader -> store directory."""
    from lmforge.data.prepare import prepare

    stores: dict[str, str] = {}
    for name in names:
        start = time.perf_counter()
        config = loader_config(name, corpus, 64, 0)
        stores[name] = str(prepare(config.data, config.model.family, progress=False))
        print(f"store {name}: {stores[name]} ({time.perf_counter() - start:.1f}s)", file=sys.stderr)
    return stores


def measure(name: str, corpus: str, store_dir: str, batch_size: int, workers: int, seconds: float) -> dict:
    """Start-up seconds and steady sequences/s of the training loader (run in a fresh process)."""
    from lmforge.data.loader import loader_for
    from lmforge.data.store import TokenStore

    config = loader_config(name, corpus, batch_size, workers)
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


def run_child(code_root: Path, args, name: str, store: str, workers: int) -> dict | None:
    env = {**os.environ, "PYTHONPATH": str(code_root)}
    command = [sys.executable, __file__, "--child", name, "--store", store, "--corpus", args.corpus,
               "--batch-size", str(args.batch_size), "--seconds", str(args.seconds), "--workers", str(workers)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        if "this lmforge has no" in done.stderr:
            return None
        raise SystemExit(f"measurement {name}/{workers} workers at {code_root} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", help="git commit whose lmforge is measured as 'before'")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--loaders", nargs="+", default=list(LOADERS), choices=list(LOADERS))
    parser.add_argument("--batch-size", type=int, default=64, help="sequences per batch (global = micro here)")
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per measurement")
    parser.add_argument("--corpus", default=next((str(p) for p in CORPUS_CANDIDATES if p.is_file()), None))
    parser.add_argument("--child", choices=list(LOADERS), help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.corpus is None:
        raise SystemExit("english-nltk corpus not found beside the repository; give --corpus")
    if args.child:
        result = measure(args.child, args.corpus, args.store, args.batch_size, args.workers[0], args.seconds)
        print(json.dumps(result))
        return

    sys.path.insert(0, str(ROOT))
    stores = prepare_stores(args.corpus, args.loaders)
    with tempfile.TemporaryDirectory() as tmp:
        codes = {"after": ROOT}
        if args.baseline:
            codes = {"before": export_commit(args.baseline, Path(tmp)), **codes}
        results: dict[tuple[str, str, int], dict | None] = {}
        for loader in args.loaders:
            for workers in args.workers:
                for code, code_root in codes.items():  # interleaved, so machine noise hits both alike
                    results[code, loader, workers] = run_child(code_root, args, loader, stores[loader], workers)

    print(f"loader throughput, sequences of 128 tokens per second; batches of {args.batch_size}; "
          f"{os.cpu_count()} CPUs (shared machine: compare within this run)")
    header = f"{'loader':<9} {'workers':>7} " + " ".join(f"{code + ' seq/s':>13} {'start s':>7}" for code in codes)
    print(header + ("   after/before" if args.baseline else ""))
    for loader in args.loaders:
        for workers in args.workers:
            cells, rates = [], {}
            for code in codes:
                r = results[code, loader, workers]
                cells.append(f"{r['seq_per_s']:>13,.0f} {r['startup_s']:>7.2f}" if r else f"{'n/a':>13} {'':>7}")
                rates[code] = r["seq_per_s"] if r else None
            ratio = ""
            if args.baseline:
                base = rates["before"] or (results["before", loader, 0] or {}).get("seq_per_s")
                ratio = (f"   {rates['after'] / base:>8.2f}x" + ("" if rates["before"] else " (vs 0 workers)")
                         if base else f"   {'n/a':>8}")
            print(f"{loader:<9} {workers:>7} " + " ".join(cells) + ratio)
    if 2 in args.workers:
        worst = min(results["after", loader, 2]["seq_per_s"] for loader in args.loaders)
        print(f"min seq/s at 2 workers {worst:,.0f}")

if __name__ == "__main__":
    main()
