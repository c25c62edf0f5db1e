"""Tokenization throughput and peak memory of `lmforge prepare` vs two Hugging Face `datasets` peers.

One run: builds a corpus of at least --mb MB by replicating ../shared/data/gcide/gcide.txt into a temp
directory, trains one byte-level BPE tokenizer (vocab 8192) that every side uses, then measures, each in
its own process: lmforge prepare with 1 and 2 workers (read, split, encode, write shards), the same at
half the corpus (memory must stay flat as the corpus doubles), and two peers, each datasets' text loader
then `.map`: (a) `.map(batched=True)` with the `tokenizers` tokenizer; (b) nanoGPT's way,
`.map(num_proc=2)` with a tiktoken encoder of the same ranks (`encode_ordinary` + end-of-text).
Peak RSS is the largest sum of PSS (resident memory, pages shared between processes counted once)
over the process and its children, sampled every 0.1 s.
Last line: `ratio X.XX` = ours at 2 workers / peer (a)'s `.map` alone (its loading not counted).

    flock /tmp/lmforge-heavy.lock .venv/bin/python bench/prepare_throughput.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import GCIDE as SOURCE, ROOT, gcide_bpe_tokenizer, gcide_text

OURS = """
import json, sys, time
from lmforge.config import DataConfig, SplitConfig, TokenizerConfig
from lmforge.data.prepare import prepare
corpus, tokenizer, store, workers = sys.argv[1:5]
config = DataConfig(corpus=[corpus], txt_documents="paragraph", store=store,
                    tokenizer=TokenizerConfig(path=tokenizer), split=SplitConfig(by="document", val_fraction=0.005))
started = time.time()
prepare(config, progress=False, workers=int(workers))
print(json.dumps({"seconds": time.time() - started}))
"""

PEER = """
import json, sys, time
from datasets import disable_progress_bars, load_dataset
from tokenizers import Tokenizer
disable_progress_bars()
corpus, tokenizer, cache = sys.argv[1:4]
tok = Tokenizer.from_file(tokenizer)
eos = tok.token_to_id("<|endoftext|>")
files = sorted(str(p) for p in __import__("pathlib").Path(corpus).glob("*.txt"))
started = time.time()
ds = load_dataset("text", data_files=files, sample_by="paragraph", split="train", cache_dir=cache,
                  encoding_errors="replace")  # gcide has a few non-UTF-8 bytes; lmforge replaces them too
loaded = time.time()

def encode(batch):
    return {"input_ids": [e.ids + [eos] for e in tok.encode_batch(batch["text"], add_special_tokens=False)]}

ds = ds.map(encode, batched=True, batch_size=1000, remove_columns=["text"])
print(json.dumps({"seconds": time.time() - loaded, "load_seconds": loaded - started}))
"""

# nanoGPT's data/openwebtext/prepare.py way: one document per call, processes from datasets' num_proc.
PEER_TIKTOKEN = """
import json, sys, time
from datasets import disable_progress_bars, load_dataset
from tokenizers import Tokenizer
from lmforge.data.fast_encoder import tiktoken_encoding
disable_progress_bars()
corpus, tokenizer, cache = sys.argv[1:4]
enc = tiktoken_encoding(Tokenizer.from_file(tokenizer))  # the same ranks as the tokenizers peer's
eot = enc.encode_single_token("<|endoftext|>")
files = sorted(str(p) for p in __import__("pathlib").Path(corpus).glob("*.txt"))
started = time.time()
ds = load_dataset("text", data_files=files, sample_by="paragraph", split="train", cache_dir=cache,
                  encoding_errors="replace")
loaded = time.time()

def process(example):
    ids = enc.encode_ordinary(example["text"])
    ids.append(eot)
    return {"ids": ids, "len": len(ids)}

ds = ds.map(process, remove_columns=["text"], num_proc=2)
print(json.dumps({"seconds": time.time() - loaded, "load_seconds": loaded - started}))
"""


def _tree_rss(pid: int) -> int:
    """Resident bytes (PSS) of `pid` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:  # proportional set size: pages a forked worker shares with its parent count once
            with open(f"/proc/{p}/smaps_rollup") as fh:
                total += next(int(line.split()[1]) * 1024 for line in fh if line.startswith("Pss:"))
        except (OSError, StopIteration):
            pass
    return total


def measure(code: str, *args: str) -> dict:
    """Run `code` in a fresh interpreter; its JSON result plus the peak RSS of its process tree."""
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            time.sleep(0.1)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, _ = proc.communicate()
    thread.join()
    if proc.returncode != 0:
        raise SystemExit(f"benchmark step failed ({proc.returncode})")
    return {**json.loads(out.decode().strip().splitlines()[-1]), "rss": peak[0]}


def build_corpus(folder: Path, megabytes: int) -> int:
    folder.mkdir(parents=True)
    copies = -(-megabytes * 10**6 // SOURCE.stat().st_size)
    for i in range(copies):
        shutil.copyfile(SOURCE, folder / f"gcide-{i:02d}.txt")
    return sum(p.stat().st_size for p in folder.glob("*.txt"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=200, help="corpus size, at least (MB)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-") as tmp:
        tmp = Path(tmp)
        full = build_corpus(tmp / "full", args.mb)
        half = build_corpus(tmp / "half", args.mb // 2)
        tokenizer = gcide_bpe_tokenizer(gcide_text())
        tokenizer.save(str(tmp / "tokenizer.json"))
        tok = str(tmp / "tokenizer.json")
        print(f"corpus: {full / 1e6:.0f} MB ({SOURCE.name} replicated; paragraphs as documents), "
              f"byte-level BPE vocab {tokenizer.get_vocab_size()}, {os.cpu_count()} CPUs")
        rows = []
        for label, size, code, extra in (
            ("datasets .map(batched=True) + tokenizers", full, PEER, [str(tmp / "full"), tok, str(tmp / "hf")]),
            ("datasets .map(num_proc=2) + tiktoken", full, PEER_TIKTOKEN, [str(tmp / "full"), tok, str(tmp / "hf")]),
            ("lmforge prepare, 1 worker", full, OURS, [str(tmp / "full"), tok, str(tmp / "s1"), "1"]),
            ("lmforge prepare, 2 workers", full, OURS, [str(tmp / "full"), tok, str(tmp / "s2"), "2"]),
            ("lmforge prepare, 2 workers, half corpus", half, OURS, [str(tmp / "half"), tok, str(tmp / "s3"), "2"]),
        ):
            result = measure(code, *extra)
            rate = size / 1e6 / result["seconds"]
            rows.append((label, rate, result))
            load = (f" (+ {result['load_seconds']:.0f}s loading text into arrow, not counted)"
                    if "load_seconds" in result else "")
            print(f"{label:<44} {rate:6.2f} MB/s  {result['seconds']:7.1f}s  peak RSS {result['rss'] / 2**20:6.0f} MiB"
                  f"{load}", flush=True)
            for leftover in ("s1", "s2", "s3", "hf"):  # keep the temp disk use to one store at a time
                shutil.rmtree(tmp / leftover, ignore_errors=True)
        peer, tiktoken_peer, two, half_run = rows[0], rows[1], rows[3], rows[4][2]
        print(f"peak RSS at 2 workers: {half_run['rss'] / 2**20:.0f} MiB for {half / 1e6:.0f} MB, "
              f"{two[2]['rss'] / 2**20:.0f} MiB for {full / 1e6:.0f} MB")
        print(f"lmforge at 2 workers / datasets + tiktoken: {two[1] / tiktoken_peer[1]:.2f}")
        print(f"ratio {two[1] / peer[1]:.2f}")


if __name__ == "__main__":
    main()
