"""`lmforge prepare`: corpus -> (curation) -> tokenizer -> token store, built under `NAME.partial` and renamed
when whole.

Resumable: `NAME.partial/progress.json` lists every finished shard with its sha256 and the position in the
document stream after it; a re-run keeps the shards that verify and encodes from there. Documents are
encoded by `workers` processes but shards are written by this one, in stream order, so the store is the
same byte for byte for any number of workers and any number of interruptions.
"""

from __future__ import annotations

import logging

import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections import deque
from pathlib import Path
from typing import Iterator

import numpy as np

from tokenizers import Tokenizer
from tqdm import tqdm

from lmforge.config import FAMILY_TOKENIZER, DataConfig
from lmforge.data.corpus import CorpusStats, Document, iter_documents, resolve_corpus_files
from lmforge.data.store import (SplitWriter, StoreWriteError, TokenStore, dtype_for_vocab, move_tail,
                                shard_is_intact, write_atomic, write_manifest, writing)
from lmforge.data.encode import boundary_token, encode_stream, is_validation, iter_pieces
from lmforge.data.fast_encoder import batch_encoder, joined_encoder
from lmforge.data.prepare_tasks import TasksUnfinished
from lmforge.data.tokenizer import EOS, load_tokenizer, tokenizer_sha256, train_tokenizer
from lmforge.errors import LmforgeError
from lmforge.fileio import Owner

log = logging.getLogger(__name__)

ENCODE_BATCH_BYTES = 1 << 20  # text per encoding task (a worker's unit of work)
TRAIN_PIECE_CHARS = 100_000  # longest text handed to the tokenizer trainer (measured: -150 MB on a 50 MB document)
PROGRESS = "progress.json"


def cache_dir() -> Path:
    return Path(os.environ.get("LMFORGE_CACHE", Path.home() / ".cache" / "lmforge"))


def with_tokenizer_kind(config: DataConfig, family: str) -> DataConfig:
    """`config` with data.tokenizer.kind auto resolved for `family` (a Config resolves it when loaded;
    a DataConfig made in Python may still say auto)."""
    if config.tokenizer.kind != "auto":
        return config
    return dataclasses.replace(config, tokenizer=dataclasses.replace(config.tokenizer,
                                                                     kind=FAMILY_TOKENIZER[family]))


def data_fingerprint(config: DataConfig, family: str) -> str:
    """Hash of everything that determines the store's content: the data config and the input files."""
    config = with_tokenizer_kind(config, family)
    files = resolve_corpus_files(config.corpus)
    described = [(str(p), p.stat().st_size, int(p.stat().st_mtime)) for p in files]
    settings = _content_settings(config)
    if config.tokenizer.path:
        if not Path(config.tokenizer.path).is_file():
            raise LmforgeError(f"data.tokenizer.path: file not found: {config.tokenizer.path}")
        settings["tokenizer_sha256"] = hashlib.sha256(Path(config.tokenizer.path).read_bytes()).hexdigest()
    blob = json.dumps({"family": family, "settings": settings, "files": described}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _content_settings(config: DataConfig) -> dict:
    """The data settings that decide what the store holds (not where it goes, nor how many workers build it)."""
    return {k: v for k, v in dataclasses.asdict(config).items()
            if k not in ("store", "workers", "executor", "tasks", "slurm_partition", "slurm_time")}


def store_location(config: DataConfig, family: str, fingerprint: str | None = None) -> Path:
    """Where the token store for `config` lives: data.store, or a cache directory keyed by the data's hash."""
    if config.store:
        return Path(config.store)
    return cache_dir() / "stores" / (fingerprint or data_fingerprint(config, family))[:20]


def resolve_workers(workers: int) -> int:
    return workers if workers > 0 else (os.cpu_count() or 1)


def prepare(config: DataConfig, family: str = "gpt", out: str | Path | None = None,
            progress: bool = True, workers: int | None = None) -> Path:
    """Build (or reuse, or finish an interrupted build of) the token store for `config`; return its directory.

    workers: encoding (and curation) processes; default data.workers. The store does not depend on it.
    """
    workers = resolve_workers(config.workers if workers is None else workers)
    config = with_tokenizer_kind(config, family)
    fingerprint = data_fingerprint(config, family)
    target = Path(out) if out else store_location(config, family, fingerprint)
    if (target / "manifest.json").is_file():
        existing = TokenStore(target).manifest.get("fingerprint")
        if existing == fingerprint:
            if progress:
                log.info(f"token store up to date: {target}")
            return target
        raise LmforgeError(f"{target} holds a token store built from other data or settings; "
                           f"remove it or choose another data.store")
    if target.exists() and any(target.iterdir()):
        raise LmforgeError(f"{target} exists and is not a token store; refusing to write into it")

    # One process builds a store at a time; the lock sits beside it, as the store does not exist yet.
    with Owner(target, "building this token store", target.with_name(f".{target.name}.lock")):
        return _prepare_owned(config, family, target, fingerprint, workers, progress)


def _prepare_owned(config: DataConfig, family: str, target: Path, fingerprint: str, workers: int,
                   progress: bool) -> Path:
    if (target / "manifest.json").is_file():  # finished by the process that held the lock before us
        return target
    partial = target.with_name(target.name + ".partial")
    state = _read_progress(partial, fingerprint)
    if state is None:
        shutil.rmtree(partial, ignore_errors=True)
        with writing(partial):
            partial.mkdir(parents=True)
        state = {"fingerprint": fingerprint}
    elif progress:
        log.info(f"resuming the interrupted prepare in {partial}")
    try:
        manifest = _build(config, family, partial, state, workers, progress)
    except (StoreWriteError, TasksUnfinished):  # a full disk, a read-only directory, failed or queued tasks:
        raise  # what is finished stays, for a re-run
    except LmforgeError:  # bad input or settings: a re-run would stop the same way, so nothing is kept
        shutil.rmtree(partial, ignore_errors=True)
        raise
    except KeyboardInterrupt:
        log.info(f"prepare interrupted; the same command resumes from {partial}")
        raise
    manifest["fingerprint"] = fingerprint
    write_manifest(partial, manifest)
    (partial / PROGRESS).unlink()
    for scratch in ("curate", "parts", "logs"):
        shutil.rmtree(partial / scratch, ignore_errors=True)
    with writing(target):
        if target.exists():
            target.rmdir()
        os.replace(partial, target)
    return target


def _read_progress(partial: Path, fingerprint: str) -> dict | None:
    """The progress record of an interrupted build of this very store, or None."""
    try:
        state = json.loads((partial / PROGRESS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and state.get("fingerprint") == fingerprint else None


def _save_progress(root: Path, state: dict) -> None:
    write_atomic(root / PROGRESS, json.dumps(state, indent=1).encode("utf-8"))


def _verified_shards(root: Path, split: str, entries: list[dict], dtype: np.dtype) -> list[dict]:
    """The finished shards of an interrupted run that are still intact (a prefix); stray files go."""
    kept: list[dict] = []
    for entry in entries:
        if entry.get("end_document", -1) < 0 or not shard_is_intact(root, entry, dtype):
            break
        kept.append(entry)
    names = {name for entry in kept for name in (entry["bin"], entry["idx"])}
    for path in (root / split).glob("shard-*"):
        if f"{split}/{path.name}" not in names:
            path.unlink()
    return kept


# --- encoding workers ---------------------------------------------------------------------------------
_worker: dict = {}


def _init_worker(tokenizer_json: str, family: str, dtype: str, max_chars: int) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json)
    _worker.update(tokenizer=tokenizer, encode=batch_encoder(tokenizer), family=family, dtype=np.dtype(dtype),
                   max_chars=max_chars, joined=joined_encoder(tokenizer, EOS) if family == "gpt" else None)


def _encode(texts: list[str], ends: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of `texts` back to back, and each text's length in tokens (ends: see encode_documents)."""
    w = _worker
    tokens, lengths = encode_stream(w["tokenizer"], texts, w["family"], w["max_chars"], w["encode"], ends, w["joined"])
    return tokens.astype(w["dtype"]), lengths


class _Encoder:
    """Encodes batches in order: in this process (workers=1) or in a pool, at most 2 batches per worker
    in flight, so memory does not grow with the corpus."""

    def __init__(self, tokenizer, family: str, dtype: np.dtype, workers: int, max_chars: int):
        self.workers = workers
        self.pending: deque = deque()
        self.pool = None
        args = (tokenizer.to_str(), family, dtype.name, max_chars)
        batch_encoder(Tokenizer.from_str(args[0]))  # converted (or refused, said once) here, before the fork
        if workers == 1:
            _init_worker(*args)
            return
        # Each worker is one core's worth of work; the Rust tokenizer's own threads would only oversubscribe.
        saved = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            self.pool = multiprocessing.get_context("fork").Pool(workers, _init_worker, args)
        finally:
            if saved is None:
                del os.environ["TOKENIZERS_PARALLELISM"]
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = saved

    def submit(self, texts: list[str], ends: list[bool], meta) -> Iterator[tuple]:
        """Queue a batch; yield (meta, tokens, lengths) of batches finished in submission order."""
        if self.pool is None:
            yield (meta, *_encode(texts, ends))
            return
        self.pending.append((meta, self.pool.apply_async(_encode, (texts, ends))))
        while len(self.pending) > 2 * self.workers:
            meta, result = self.pending.popleft()
            yield (meta, *result.get())

    def drain(self) -> Iterator[tuple]:
        while self.pending:
            meta, result = self.pending.popleft()
            yield (meta, *result.get())

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def _build(config: DataConfig, family: str, root: Path, state: dict, workers: int, progress: bool) -> dict:
    started = time.time()
    curated = None
    if config.curate.enabled:
        from lmforge.data.curate import curate

        curated = curate(config, root / "curate", workers, progress)
        sources, fmt, corpus = [str(p) for p in curated.files], "jsonl", curated.corpus
        if corpus["documents"] and not any(p.stat().st_size for p in curated.files):
            raise LmforgeError(f"curation removed every one of the {corpus['documents']:,} documents "
                               f"(see {root / 'curate' / 'logs'}); relax data.curate")
    else:
        sources, fmt, corpus = config.corpus, config.format, None

    def documents(stats: CorpusStats | None = None) -> Iterator[Document]:
        if curated is not None and not sources:
            return iter(())
        return iter_documents(sources, fmt, "text" if curated else config.text_field, config.txt_documents,
                              config.encoding_errors, stats)

    by_document = config.split.by == "document"
    tokenizer = _tokenizer(config, family, root, state, documents, progress)
    boundary = boundary_token(tokenizer, family)
    vocab_size = tokenizer.get_vocab_size()
    dtype = dtype_for_vocab(vocab_size)

    def record(_entry: dict) -> None:
        state["splits"] = {name: w.shards for name, w in writers.items()}
        _save_progress(root, state)

    done = state.get("splits", {})
    writers = {name: SplitWriter(root, name, dtype, config.shard_tokens,
                                 _verified_shards(root, name, done.get(name, []), dtype), on_shard=record)
               for name in ("train", "val")}
    resumed = sum(len(w.shards) for w in writers.values())
    if not by_document:  # the tail is moved to val at the end; shards from a move cut short are redone
        writers["val"] = SplitWriter(root, "val", dtype, config.shard_tokens, _verified_shards(root, "val", [], dtype))
    skip_until = {name: w.next_document for name, w in writers.items()} if by_document else \
        {"train": writers["train"].next_document, "val": 1 << 62}
    if progress and resumed:
        log.info(f"kept {resumed} finished shards; encoding from document "
              f"{min(skip_until.values()):,}")

    # made before the progress bar, so that its one log line (which encoder) stands on its own line
    encoder = None if config.executor else _Encoder(tokenizer, family, dtype, workers, config.max_document_chars)
    stats = CorpusStats()
    total_bytes = sum(p.stat().st_size for p in resolve_corpus_files(sources)) if sources else 0
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"tokenizing ({workers} worker"
               f"{'s' if workers > 1 else ''})", disable=not progress or bool(config.executor), file=sys.stderr,
               dynamic_ncols=True)
    if progress and config.executor:
        log.info(f"tokenizing as datatrove tasks (executor {config.executor}; logs in {root / 'logs' / 'encode'})")

    def write(meta, tokens: np.ndarray, lengths: np.ndarray) -> None:
        indices, to_val, ends = meta
        for name, mask in (("train", ~to_val), ("val", to_val)):
            keep = mask & (lengths > 0)
            if keep.all():
                writers[name].add_many(tokens, lengths, indices, ends)
            elif keep.any():
                writers[name].add_many(tokens[np.repeat(keep, lengths)], lengths[keep], indices[keep], ends[keep])

    try:
        if encoder is None:
            stats = _encode_as_tasks(config, family, root, tokenizer, dtype, sources, fmt, curated is not None,
                                     workers, skip_until, write)
            encoded_bytes = stats.bytes
        else:
            encoded_bytes = _encode_here(config, documents(stats), stats, by_document, skip_until, encoder, write, bar)
    finally:
        if encoder is not None:
            encoder.close()
        bar.set_postfix(docs=f"{stats.documents:,}")
        bar.close()
    if stats.documents == 0:
        raise LmforgeError(f"the corpus {config.corpus} has no text (every file was empty or skipped)")
    writers["train"].flush()
    if not by_document:
        for writer in writers.values():
            writer.on_shard = None  # progress.json keeps the state before the move
        train_tokens = sum(s["tokens"] for s in writers["train"].shards)
        move_tail(writers["train"], writers["val"], int(round(train_tokens * config.split.val_fraction)))
    writers["val"].flush()

    splits = {name: w.summary() for name, w in writers.items()}
    for name, info in splits.items():
        if info["tokens"] == 0:
            hint = ("; with few documents use data.split.by=tail" if by_document else "")
            raise LmforgeError(f"the {name} split is empty ({stats.documents} documents, "
                               f"val_fraction={config.split.val_fraction}){hint}")
    seconds = round(time.time() - started, 2)
    manifest = {
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
        "vocab_size": vocab_size,
        # gpt: end-of-text after each document; t5: </s> after each document; bert: [SEP] after each sentence
        "boundary_id": boundary,
        **({"sentence_end_id": boundary} if family == "bert" else {"eos_id": boundary}),
        "dtype": dtype.name,
        "family": family,
        "splits": splits,
        "corpus": {"inputs": config.corpus, **(corpus if corpus is not None else stats.to_dict())},
        "curation": ({"config": dataclasses.asdict(config.curate), "steps": curated.steps,
                      "documents_kept": stats.documents, "bytes_kept": stats.bytes} if curated else None),
        "data_config": _content_settings(config),
        # how this build went: the only part that differs between runs that built the same store
        "build": {"seconds": seconds, "workers": workers, "resumed_shards": resumed,
                  "curation_seconds": curated.seconds if curated else 0.0},
    }
    if progress:
        parts = ", ".join(f"{n}: {i['tokens']:,} tokens / {i['documents']:,} docs" for n, i in splits.items())
        source = corpus if corpus is not None else stats.to_dict()
        skipped = f", {len(source['skipped_files'])} files skipped" if source["skipped_files"] else ""
        kept = (f"; curation kept {stats.documents:,} documents ({stats.bytes / 1e6:.1f} MB)" if curated else "")
        rate = encoded_bytes / 1e6 / max(seconds - (curated.seconds if curated else 0.0), 1e-9)
        log.info(f"prepared {source['documents']:,} documents ({source['bytes'] / 1e6:.1f} MB{skipped}{kept}) -> "
              f"{parts} in {seconds:.1f}s ({rate:.1f} MB/s tokenizing, {workers} worker"
              f"{'s' if workers > 1 else ''})")
    return manifest


def _encode_here(config: DataConfig, docs: Iterator[Document], stats: CorpusStats, by_document: bool,
                 skip_until: dict, encoder: "_Encoder", write, bar) -> int:
    """Encode the document stream with this process's pool, in batches of ENCODE_BATCH_BYTES; return the
    characters encoded."""
    texts: list[str] = []
    indices: list[int] = []
    to_val: list[bool] = []
    ends: list[bool] = []

    def submit() -> Iterator[tuple]:
        meta = (np.asarray(indices, dtype=np.int64), np.asarray(to_val, dtype=bool), np.asarray(ends, dtype=bool))
        # copies: the pool pickles the submitted lists later, in its own thread, and these are reused
        yield from encoder.submit(texts.copy(), ends.copy(), meta)
        for values in (texts, indices, to_val, ends):
            values.clear()

    size = encoded_bytes = 0
    max_chars = config.max_document_chars
    for index, doc in enumerate(docs):
        val = by_document and is_validation(doc.text, config.split.val_fraction)
        if index >= skip_until["val" if val else "train"]:
            # a long document goes in pieces, each in the batch it fills: memory is bounded by a piece
            pieces = iter_pieces(doc.text, max_chars) if len(doc.text) > max_chars else iter((doc.text,))
            piece = next(pieces)
            while piece is not None:
                following = next(pieces, None)
                texts.append(piece)
                indices.append(index)
                to_val.append(val)
                ends.append(following is None)
                size += len(piece)
                if size >= ENCODE_BATCH_BYTES:
                    encoded_bytes += size
                    for done_batch in submit():
                        write(*done_batch)
                    size = 0
                piece = following
        if index % 1000 == 0:
            bar.update(stats.bytes - bar.n)  # the corpus reader already counted the bytes it yielded
            bar.set_postfix(docs=f"{stats.documents:,}", refresh=False)
    bar.update(stats.bytes - bar.n)
    if texts:
        encoded_bytes += size
        for done_batch in submit():
            write(*done_batch)
    for done_batch in encoder.drain():
        write(*done_batch)
    return encoded_bytes


def _encode_as_tasks(config: DataConfig, family: str, root: Path, tokenizer, dtype: np.dtype, sources, fmt: str,
                     curated: bool, workers: int, skip_until: dict, write) -> CorpusStats:
    """Encode the corpus as datatrove tasks (see prepare_tasks), then feed their parts to `write` in corpus
    order, with the document indices a local prepare gives; return the corpus statistics."""
    from lmforge.data.prepare_tasks import EncodeFiles, make_executor, read_parts, run_tasks

    files = [str(p) for p in resolve_corpus_files(sources)] if sources else []
    parts = root / "parts"
    with writing(parts):
        parts.mkdir(exist_ok=True)
    step = EncodeFiles(files, str(parts), tokenizer.to_str(), family, dtype.name, config.max_document_chars,
                       config.split.by == "document", config.split.val_fraction, fmt,
                       "text" if curated else config.text_field, config.txt_documents, config.encoding_errors)
    tasks = max(1, min(config.tasks or len(files), len(files)))
    batch_encoder(tokenizer)  # says here, once, when the tasks will encode with tokenizers
    logs = root / "logs" / "encode"
    executor = make_executor(config.executor, step, tasks, max(1, min(workers, tasks)), logs,
                             config.slurm_partition, config.slurm_time)
    run_tasks(executor, config.executor, logs)
    stats = CorpusStats()
    first = 0
    for tokens, lengths, to_val, part_stats in read_parts(parts, len(files), dtype):
        for key, value in part_stats.items():
            setattr(stats, key, getattr(stats, key) + value)
        stops = np.cumsum(lengths)
        # runs of documents of about 1M tokens: memory stays bounded whatever a part's size
        cuts = [0, *np.searchsorted(stops, np.arange(1 << 20, int(stops[-1]) if len(stops) else 0, 1 << 20)), len(lengths)]
        for a, b in zip(cuts, cuts[1:]):
            if b <= a:
                continue
            begin = int(stops[a - 1]) if a else 0
            indices = np.arange(first + a, first + b, dtype=np.int64)
            val, counts = to_val[a:b], lengths[a:b]
            run = np.asarray(tokens[begin:int(stops[b - 1])])
            fresh = indices >= np.where(val, skip_until["val"], skip_until["train"])  # resumed: not yet in shards
            if not fresh.all():
                run, counts, indices, val = run[np.repeat(fresh, counts)], counts[fresh], indices[fresh], val[fresh]
            write((indices, val, np.ones(len(counts), dtype=bool)), run, counts)
        first += len(lengths)
    return stats


def _tokenizer(config: DataConfig, family: str, root: Path, state: dict, documents, progress: bool):
    """The store's tokenizer: the one an interrupted run already saved, a given one, or trained now."""
    saved = root / "tokenizer.json"
    if state.get("tokenizer_sha256") and saved.is_file():
        tokenizer = load_tokenizer(saved)
        if tokenizer_sha256(tokenizer) == state["tokenizer_sha256"]:
            return tokenizer
    state.pop("splits", None)  # shards (and task parts) encoded by another tokenizer are worthless
    for scratch in ("parts", "logs"):
        shutil.rmtree(root / scratch, ignore_errors=True)
    if config.tokenizer.path:
        tokenizer = load_tokenizer(config.tokenizer.path)
    else:
        if progress:
            log.info(f"training a {config.tokenizer.kind} tokenizer ...")
        by_document = config.split.by == "document"
        # Long documents go to the trainer in pieces cut at spaces (the same words, so the same tokenizer): the
        # trainer buffers hundreds of texts at once, and one huge document must not blow its memory.
        piece_chars = min(config.max_document_chars, TRAIN_PIECE_CHARS)
        train_texts = (piece for d in documents()
                       if not (by_document and is_validation(d.text, config.split.val_fraction))
                       for piece in iter_pieces(d.text, piece_chars))
        tokenizer = train_tokenizer(train_texts, config.tokenizer, family, show_progress=progress)
    try:
        tokenizer.save(str(saved))
    except Exception as exc:  # the Rust side raises plain Exception for an OSError
        raise StoreWriteError(f"cannot write {saved}: {exc}; free space or fix the directory's permissions, "
                              f"then re-run") from None
    state["tokenizer_sha256"] = tokenizer_sha256(tokenizer)
    _save_progress(root, state)
    return tokenizer
