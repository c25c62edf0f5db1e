"""Cleaning before tokenization, as datatrove pipelines: normalisation, quality filters, exact / MinHash dedup.

datatrove (the library behind FineWeb) does the work: its formatters, the Gopher / C4 / FineWeb filters,
its exact and MinHash deduplication stages, and its executor, which runs each stage as parallel tasks
and skips tasks already completed, so an interrupted prepare resumes here too. lmforge adds only:

- the input stage: lmforge's own corpus reader (txt paragraphs/lines, JSONL, parquet, compression,
  binary and bad-UTF-8 handling) cut into chunks of `chunk_bytes` of text. The chunks, not the input
  files, are the tasks, so one big file is still cleaned in parallel, and since their size is fixed the
  cleaned documents and their order never depend on the number of workers;
- `Tally` steps between datatrove's steps, which count the documents and UTF-8 bytes that get past
  each one (datatrove's own stats count dropped documents but not their bytes, and nothing for
  formatters), so the manifest can say what every step removed.

Layout under `workdir`: input/ (chunks), logs/<stage>/ (datatrove's logs, stats and completion
markers), filtered/, dedup/, output/ (the cleaned documents, one JSONL file per chunk).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from lmforge.config import DataConfig
from lmforge.data.corpus import CorpusStats, iter_documents, resolve_corpus_files
from lmforge.errors import LmforgeError

# Filters offered (datatrove's class names). Left out on purpose: C4BadWordsFilter, LanguageFilter,
# FastTextClassifierFilter and URLFilter download word lists or models at run time, or need URLs.
FILTERS = {
    "gopher_repetition": "GopherRepetitionFilter",
    "gopher_quality": "GopherQualityFilter",
    "c4": "C4QualityFilter",
    "fineweb": "FineWebQualityFilter",
}


@dataclass
class Curated:
    files: list[Path]  # cleaned documents: JSONL with a "text" field, in order (chunks left empty are not listed)
    corpus: dict  # CorpusStats of the raw input
    steps: list[dict]  # per step: step, documents and bytes after it, removed_documents, removed_bytes
    seconds: float


CURATE_LIBRARIES = ("datatrove", "spacy", "orjson")  # what the `curate` extra installs (see pyproject.toml)


def _installed(module: str) -> bool:
    """Whether `module` can be imported, without importing it (spaCy alone takes a second)."""
    if module in sys.modules:
        return sys.modules[module] is not None  # None: its import is blocked
    return importlib.util.find_spec(module) is not None


def require_curation_libraries() -> None:
    """Refuse, in one line naming the extra, a curation whose libraries are not installed."""
    missing = [m for m in CURATE_LIBRARIES if not _installed(m)]
    if missing:
        raise LmforgeError(f"data.curate needs {', '.join(missing)}, which are not installed: "
                           f"pip install 'lmforge[curate]'")


def _datatrove():
    require_curation_libraries()
    from datatrove.pipeline.base import PipelineStep

    return PipelineStep


def _text(doc) -> str:  # ExactDedupConfig reads the hash input type from this annotation
    return doc.text


def _tally_class():
    PipelineStep = _datatrove()

    class Tally(PipelineStep):
        """Counts the documents and UTF-8 bytes that reach this point; optionally reports progress to a file."""

        type = "📏 - TALLY"

        def __init__(self, after: str, progress_dir: str | None = None):
            self.name = after  # before PipelineStep.__init__, which names the stats after it
            super().__init__()
            self.progress_dir = progress_dir

        def run(self, data, rank: int = 0, world_size: int = 1):
            seen, last = 0, time.monotonic()
            for doc in data:
                size = len(doc.text.encode("utf-8"))
                self.stat_update("documents")
                self.stat_update("bytes", value=size)
                seen += size
                if self.progress_dir and time.monotonic() - last > 0.5:
                    _report(self.progress_dir, rank, seen)
                    last = time.monotonic()
                yield doc
            if self.progress_dir:
                _report(self.progress_dir, rank, seen)

    return Tally


def _read_count(path: Path) -> int:
    try:
        return int(path.read_text() or 0)
    except (OSError, ValueError):  # replaced while we read it
        return 0


def _report(progress_dir: str, rank: int, seen: int) -> None:
    path = Path(progress_dir) / f"{rank:05d}"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(str(seen))
    os.replace(tmp, path)


def curate(config: DataConfig, workdir: Path, workers: int, progress: bool = True) -> Curated:
    """Clean `config.corpus` as `config.curate` says, in `workdir`; resumes what an earlier call left."""
    _datatrove()
    started = time.time()
    cc = config.curate
    chunks, corpus = _chunk_corpus(config, workdir / "input", progress)
    if not chunks:
        return Curated([], corpus, [], 0.0)
    n = len(chunks)
    Tally = _tally_class()
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    def reader(folder: Path):
        return JsonlReader(str(folder), glob_pattern="*.jsonl", compression=None, text_key="text", id_key="id")

    def writer(folder: Path):
        return JsonlWriter(str(folder), output_filename="${rank}.jsonl", compression=None)

    filtered = workdir / "filtered"
    first = [reader(workdir / "input"), Tally("read", str(_progress_dir(workdir, "clean")))]
    if cc.normalize:
        from datatrove.pipeline.formatters import FTFYFormatter

        first += [FTFYFormatter(), Tally("normalize")]
    for name in cc.filters:
        first += [_make_filter(name, cc.language), Tally(name)]
    first.append(writer(filtered))
    dedup = workdir / "dedup"
    if cc.dedup == "exact":
        from datatrove.pipeline.dedup import ExactDedupConfig, ExactDedupFilter, ExactDedupSignature, ExactFindDedups

        exact = ExactDedupConfig(content_getter=_text)
        first.append(ExactDedupSignature(output_folder=str(dedup / "signatures"), config=exact))
        later = [("find duplicates", [ExactFindDedups(str(dedup / "signatures"), str(dedup / "duplicates"),
                                                     config=exact)], 1),
                 ("dedup", [ExactDedupFilter(str(dedup / "duplicates"), config=exact)], n)]
    elif cc.dedup == "minhash":
        from datatrove.pipeline.dedup import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                              MinhashDedupFilter, MinhashDedupSignature)

        mh = MinhashConfig(n_grams=cc.minhash_ngrams, num_buckets=cc.minhash_buckets,
                           hashes_per_bucket=cc.minhash_hashes_per_bucket)
        first.append(MinhashDedupSignature(output_folder=str(dedup / "signatures"), config=mh, language=cc.language))
        later = [("buckets", [MinhashDedupBuckets(str(dedup / "signatures"), str(dedup / "buckets"), config=mh)],
                  cc.minhash_buckets),
                 ("clusters", [MinhashDedupCluster(str(dedup / "buckets"), str(dedup / "remove"), config=mh)], 1),
                 ("dedup", [MinhashDedupFilter(str(dedup / "remove"))], n)]
    else:
        later = []

    total = corpus["bytes"]
    _run_stage(workdir, "clean", first, n, workers, progress, total)
    _fill_missing(filtered, n)  # a task whose documents were all removed writes no file
    output = filtered
    for stage, steps, tasks in later:
        if stage == "dedup":
            output = workdir / "output"
            steps = [reader(filtered), Tally("dedup input", str(_progress_dir(workdir, stage))), *steps,
                     Tally(f"{cc.dedup}_dedup"), writer(output)]
            size = _stage_tally(workdir / "logs" / "clean", n)[-1]["bytes"]
            _run_stage(workdir, stage, steps, tasks, workers, progress, size)
            _fill_missing(output, n)
        else:
            _run_stage(workdir, stage, steps, tasks, workers, progress, None)
    tallies = _stage_tally(workdir / "logs" / "clean", n)
    if later:
        tallies.append(_stage_tally(workdir / "logs" / "dedup", n)[-1])
    # a chunk that lost every document is left out: the corpus reader would call it an empty input file
    kept = [path for path in (output / f"{rank:05d}.jsonl" for rank in range(n)) if path.stat().st_size]
    return Curated(kept, corpus, _removed(tallies), round(time.time() - started, 2))


def _make_filter(name: str, language: str):
    import datatrove.pipeline.filters as filters

    return getattr(filters, FILTERS[name])(language=language)


def _removed(tallies: list[dict]) -> list[dict]:
    """Per step: what got past it, and what it removed relative to the step before."""
    steps = []
    for before, after in zip([None, *tallies], tallies):
        row = {"step": after["step"], "documents": after["documents"], "bytes": after["bytes"]}
        if before is not None:
            row["removed_documents"] = before["documents"] - after["documents"]
            row["removed_bytes"] = before["bytes"] - after["bytes"]
        steps.append(row)
    return steps


def _stage_tally(logs: Path, tasks: int) -> list[dict]:
    """Sum the Tally counters of every task of a stage from datatrove's per-task stats files."""
    import json

    totals: dict[str, dict] = {}
    for rank in range(tasks):
        path = logs / "stats" / f"{rank:05d}.json"
        for step in json.loads(path.read_text(encoding="utf-8")):
            if not step["name"].startswith("📏"):
                continue
            name = step["name"].split(": ", 1)[1]
            row = totals.setdefault(name, {"step": name, "documents": 0, "bytes": 0})
            for key in ("documents", "bytes"):
                value = step["stats"].get(key, 0)
                row[key] += value["total"] if isinstance(value, dict) else value
    return list(totals.values())


def _progress_dir(workdir: Path, stage: str) -> Path:
    path = workdir / "progress" / stage
    path.mkdir(parents=True, exist_ok=True)
    return path


def _fill_missing(folder: Path, tasks: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for rank in range(tasks):
        (folder / f"{rank:05d}.jsonl").touch(exist_ok=True)


def _chunk_corpus(config: DataConfig, folder: Path, progress: bool) -> tuple[list[Path], dict]:
    """Cut the corpus into JSONL chunks of about chunk_bytes of text each (the parallel tasks)."""
    import json

    import orjson

    done = folder / "done.json"
    if done.is_file():
        info = json.loads(done.read_text(encoding="utf-8"))
        return [folder / f"{i:05d}.jsonl" for i in range(info["chunks"])], info["corpus"]
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    stats = CorpusStats()
    limit = config.curate.chunk_bytes
    chunks: list[Path] = []
    fh, size = None, 0
    total = sum(p.stat().st_size for p in resolve_corpus_files(config.corpus))
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="reading", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    try:
        for doc in iter_documents(config.corpus, config.format, config.text_field, config.txt_documents,
                                  config.encoding_errors, stats):
            if fh is None:
                chunks.append(folder / f"{len(chunks):05d}.jsonl")
                fh = open(chunks[-1], "wb")
            line = orjson.dumps({"text": doc.text, "id": doc.source})
            fh.write(line + b"\n")
            size += len(line)
            bar.update(stats.bytes - bar.n)
            if size >= limit:
                fh.close()
                fh, size = None, 0
    finally:
        if fh is not None:
            fh.close()
        bar.close()
    done.write_text(json.dumps({"chunks": len(chunks), "corpus": stats.to_dict()}), encoding="utf-8")
    return chunks, stats.to_dict()


def _run_stage(workdir: Path, stage: str, pipeline: list, tasks: int, workers: int, progress: bool,
               total_bytes: int | None) -> None:
    """Run one datatrove stage with a progress bar; datatrove's own logs go to logs/<stage>/."""
    from datatrove.executor import LocalPipelineExecutor

    logs = workdir / "logs" / stage
    executor = LocalPipelineExecutor(pipeline, tasks=tasks, workers=max(1, min(workers, tasks)),
                                     logging_dir=str(logs), start_method="fork")
    if executor.get_incomplete_ranks() == []:
        return
    failure: list[BaseException] = []

    def run() -> None:
        try:
            executor.run()
        except BaseException as exc:  # re-raised in the calling thread
            failure.append(exc)

    with stderr_to(logs / "console.log") as console:
        bar = tqdm(total=total_bytes or tasks, unit="B" if total_bytes else "task", unit_scale=bool(total_bytes),
                   desc=stage, disable=not progress, file=console, dynamic_ncols=True)
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.5)
            if total_bytes:
                seen = sum(_read_count(p) for p in (workdir / "progress" / stage).glob("[0-9]????"))
                bar.update(min(seen, bar.total) - bar.n)
            else:
                bar.update(len(list((logs / "completions").glob("*"))) - bar.n)
        bar.close()
    if failure or executor.get_incomplete_ranks():
        why = f": {failure[0]}" if failure else ""
        raise LmforgeError(f"curation stage {stage!r} failed{why} (datatrove's log: {logs / 'logs'})")


@contextmanager
def stderr_to(path: Path) -> Iterator:
    """Send file descriptor 2 (datatrove's chatty loguru output, in every worker) to `path`; yield the
    real stderr for our own progress bar."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 2)
    console = os.fdopen(os.dup(saved), "w")
    try:
        yield console
    finally:
        console.flush()
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        console.close()
