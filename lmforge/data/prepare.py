"""`lmforge prepare`: corpus -> tokenizer -> token store, built under a temporary name and renamed when whole."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from lmforge.config import DataConfig
from lmforge.data.corpus import CorpusStats, Document, iter_documents, resolve_corpus_files
from lmforge.data.store import SplitWriter, TokenStore, dtype_for_vocab, move_tail, write_manifest
from lmforge.data.encode import boundary_token, encode_documents
from lmforge.data.tokenizer import load_tokenizer, tokenizer_sha256, train_tokenizer
from lmforge.errors import LmforgeError

ENCODE_BATCH_BYTES = 4 << 20  # hand the Rust tokenizer this much text at a time; it parallelises inside


def cache_dir() -> Path:
    return Path(os.environ.get("LMFORGE_CACHE", Path.home() / ".cache" / "lmforge"))


def data_fingerprint(config: DataConfig, family: str) -> str:
    """Hash of everything that determines the store's content: the data config and the input files."""
    files = resolve_corpus_files(config.corpus)
    described = [(str(p), p.stat().st_size, int(p.stat().st_mtime)) for p in files]
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "store"}
    if config.tokenizer.path:
        if not Path(config.tokenizer.path).is_file():
            raise LmforgeError(f"data.tokenizer.path: file not found: {config.tokenizer.path}")
        settings["tokenizer_sha256"] = hashlib.sha256(Path(config.tokenizer.path).read_bytes()).hexdigest()
    blob = json.dumps({"family": family, "settings": settings, "files": described}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def is_validation(text: str, val_fraction: float) -> bool:
    """A document's split depends only on its text, so it never changes with file order or workers."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


def _batches(docs: Iterator[Document], max_bytes: int) -> Iterator[list[Document]]:
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc.text)
        if size >= max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def prepare(config: DataConfig, family: str = "gpt", out: str | Path | None = None,
            progress: bool = True) -> Path:
    """Build (or reuse) the token store for `config` and return its directory."""
    fingerprint = data_fingerprint(config, family)
    target = Path(out or config.store or cache_dir() / "stores" / fingerprint[:20])
    if (target / "manifest.json").is_file():
        existing = TokenStore(target).manifest.get("fingerprint")
        if existing == fingerprint:
            if progress:
                print(f"token store up to date: {target}", file=sys.stderr)
            return target
        raise LmforgeError(f"{target} holds a token store built from other data or settings; "
                           f"remove it or choose another data.store")
    if target.exists() and any(target.iterdir()):
        raise LmforgeError(f"{target} exists and is not a token store; refusing to write into it")

    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        manifest = _build(config, family, partial, progress)
        manifest["fingerprint"] = fingerprint
        write_manifest(partial, manifest)
        if target.exists():
            target.rmdir()
        os.replace(partial, target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return target


def _build(config: DataConfig, family: str, root: Path, progress: bool) -> dict:
    started = time.time()

    def documents(stats: CorpusStats | None = None) -> Iterator[Document]:
        return iter_documents(config.corpus, config.format, config.text_field, config.txt_documents,
                              config.encoding_errors, stats)

    by_document = config.split.by == "document"
    if config.tokenizer.path:
        tokenizer = load_tokenizer(config.tokenizer.path)
    else:
        if progress:
            print(f"training a {config.tokenizer.kind} tokenizer ...", file=sys.stderr)
        train_texts = (d.text for d in documents()
                       if not (by_document and is_validation(d.text, config.split.val_fraction)))
        tokenizer = train_tokenizer(train_texts, config.tokenizer, family, show_progress=progress)
    boundary = boundary_token(tokenizer, family)
    vocab_size = tokenizer.get_vocab_size()
    dtype = dtype_for_vocab(vocab_size)
    tokenizer.save(str(root / "tokenizer.json"))

    stats = CorpusStats()
    writers = {name: SplitWriter(root, name, dtype, config.shard_tokens) for name in ("train", "val")}
    total_bytes = sum(p.stat().st_size for p in resolve_corpus_files(config.corpus))
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    for batch in _batches(documents(stats), ENCODE_BATCH_BYTES):
        for doc, ids in zip(batch, encode_documents(tokenizer, [d.text for d in batch], family)):
            if len(ids) == 0:
                continue
            split = "val" if by_document and is_validation(doc.text, config.split.val_fraction) else "train"
            writers[split].add(ids)
        bar.update(stats.bytes - bar.n)  # the corpus reader already counted the bytes it yielded
        bar.set_postfix(docs=stats.documents)
    bar.close()
    if stats.documents == 0:
        raise LmforgeError(f"the corpus {config.corpus} has no text (every file was empty or skipped)")
    writers["train"].flush()
    if not by_document:
        train_tokens = sum(s["tokens"] for s in writers["train"].shards)
        move_tail(writers["train"], writers["val"], int(round(train_tokens * config.split.val_fraction)))
    writers["val"].flush()

    splits = {name: w.summary() for name, w in writers.items()}
    for name, info in splits.items():
        if info["tokens"] == 0:
            hint = ("; with few documents use data.split.by=tail" if by_document else "")
            raise LmforgeError(f"the {name} split is empty ({stats.documents} documents, "
                               f"val_fraction={config.split.val_fraction}){hint}")
    manifest = {
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
        "vocab_size": vocab_size,
        # gpt: end-of-text after each document; bert: [SEP] after each sentence
        "boundary_id": boundary,
        **({"eos_id": boundary} if family == "gpt" else {"sentence_end_id": boundary}),
        "dtype": dtype.name,
        "family": family,
        "splits": splits,
        "corpus": {"inputs": config.corpus, **stats.to_dict()},
        "data_config": dataclasses.asdict(config),
        "seconds": round(time.time() - started, 2),
    }
    if progress:
        parts = ", ".join(f"{n}: {i['tokens']:,} tokens / {i['documents']:,} docs" for n, i in splits.items())
        skipped = f", {len(stats.skipped_files)} files skipped" if stats.skipped_files else ""
        print(f"prepared {stats.documents:,} documents ({stats.bytes / 1e6:.1f} MB{skipped}) -> {parts} "
              f"in {manifest['seconds']:.1f}s", file=sys.stderr)
    return manifest
