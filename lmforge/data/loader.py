"""Deterministic, resumable, rank-sharded batches from a token store split.

The run reads one stream of samples, a pure function of (seed, sample index), in global batches of
`batch_size` consecutive samples. Of each global batch, rank r of W takes the r-th of W equal
consecutive parts, read in micro-batches of `micro_batch_size`: so the sequence of global batches is
the same for any number of processes and any micro-batch size. The position is the index of the
sample that starts the next global batch, so `state_dict()` is tiny, resumption is exact, and a run
may resume with another world size. Each loader turns the sample indices of a micro-batch into
examples, all at once with array operations: CLMLoader blocks of the token stream, MLMLoader masked
BERT sentence pairs, SpanLoader T5's denoising examples (corrupted blocks of the stream).

With `workers` > 0, micro-batches are built ahead in that many background processes (a torch
DataLoader over the same (start, micro-batch) keys, in order, `PREFETCH_PER_WORKER` each ahead, pinned
when the batches go to a CUDA device). A micro-batch is a pure function of its key, so the batches are
the same for any number of workers, and the position advances only when `next()` hands a batch over:
`state_dict()` describes what the trainer consumed, never what the workers prefetched.
"""

from __future__ import annotations

import math
import signal
import sys
from typing import Iterator, Optional

import numpy as np
import torch
import torch.utils.data

from lmforge.data.objectives.clm import epoch_starts, inputs_and_labels, num_blocks
from lmforge.data.objectives.mlm import (BertVocab, MaskingSpec, PlanStats, SentenceIndex, build_pairs,
                                         check_whole_word, mask_batch, mask_draws, plan_epoch)
from lmforge.data.objectives.span import Denoiser, SpanLengths, SpanVocab, denoise_rows, mixture_lengths, span_counts
from lmforge.data.store import SplitReader
from lmforge.errors import LmforgeError

Batch = dict[str, torch.Tensor]
PREFETCH_PER_WORKER = 4  # micro-batches each worker builds ahead of the trainer


def batch_layout(batch_size: int, micro_batch_size: int, world_size: int, prefix: str = "train") -> tuple[int, int]:
    """(micro-batch, accumulation steps) per process for a global batch of `batch_size` over `world_size` processes.

    micro_batch_size 0 means batch_size / world_size (no accumulation). The global batch must split
    evenly, so that every process does the same work and the math is the same for any world size.
    """
    processes = f"{world_size} process{'es' if world_size > 1 else ''}"
    if micro_batch_size == 0:
        if batch_size % world_size:
            raise LmforgeError(f"{prefix}.batch_size={batch_size} (the global batch) does not split evenly over "
                               f"{processes}; use a multiple of {world_size}")
        return batch_size // world_size, 1
    if batch_size % (micro_batch_size * world_size):
        raise LmforgeError(f"{prefix}.batch_size={batch_size} (the global batch) is not a multiple of "
                           f"{prefix}.micro_batch_size x processes = {micro_batch_size} x {world_size} = "
                           f"{micro_batch_size * world_size}")
    return micro_batch_size, batch_size // (micro_batch_size * world_size)


class _Loader:
    """Position bookkeeping shared by the loaders; subclasses define examples_per_epoch and examples()."""

    examples_per_epoch: int

    def __init__(self, batch_size: int, seed: int, rank: int, world_size: int, micro_batch_size: int = 0,
                 workers: int = 0, pin_memory: bool = False):
        """batch_size: the global batch; micro_batch_size: samples per micro-batch on this rank (0: its whole part);
        workers: processes that build micro-batches ahead (0: built in next()); pin_memory: page-locked batches."""
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.configured_micro_batch_size = micro_batch_size
        self.micro_batch_size, self.accum_steps = batch_layout(batch_size, micro_batch_size, world_size)
        self.workers, self.pin_memory = workers, pin_memory
        self.position = 0  # the sample index where the next global batch starts
        self._micro = 0  # micro-batches of that global batch this rank has read
        self._prefetched: Optional[Iterator] = None  # the workers' batches, from the position on

    def sample_indices(self, start: int, micro: int = 0) -> np.ndarray:
        """This rank's sample indices in micro-batch `micro` of the global batch that starts at sample `start`."""
        first = start + self.rank * (self.batch_size // self.world_size) + micro * self.micro_batch_size
        return np.arange(first, first + self.micro_batch_size, dtype=np.int64)

    def examples(self, samples: np.ndarray) -> Batch:
        raise NotImplementedError

    def micro_batch(self, start: int, micro: int = 0) -> Batch:
        """This rank's micro-batch `micro` of the global batch that starts at sample `start`."""
        return self.examples(self.sample_indices(start, micro))

    def next(self) -> Batch:
        """This rank's next micro-batch; after accum_steps of them the position moves to the next global batch."""
        if self.workers:
            batch = self._next_prefetched()
        else:
            batch = self.micro_batch(self.position, self._micro)
            if self.pin_memory:
                batch = {k: v.pin_memory() for k, v in batch.items()}
        self._micro += 1
        if self._micro == self.accum_steps:
            self._micro, self.position = 0, self.position + self.batch_size
        return batch

    @property
    def batches_per_epoch(self) -> int:
        """Whole global batches in one epoch."""
        return self.examples_per_epoch // self.batch_size

    @property
    def epoch(self) -> float:
        return self.position / self.examples_per_epoch

    def state_dict(self) -> dict:
        if self._micro:
            raise RuntimeError("loader state asked for in the middle of a global batch")  # a bug in the caller
        return {"samples": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.close()  # batches prefetched from the old position are not the ones wanted now
        if "samples" in state:
            self.position = int(state["samples"])
        else:  # written before global batches: batch_index counted one process's micro-batches, which
            # upgrade_train_section (lmforge/config.py) made micro_batch_size, or batch_size without accumulation
            self.position = int(state["batch_index"]) * (self.configured_micro_batch_size or self.batch_size)
        seed = int(state["seed"])
        if seed != self.seed:
            self.seed = seed
            self._forget_epochs()
        self._micro = 0

    def _forget_epochs(self) -> None:
        """Drop what was derived from the old seed (called when a loaded state brings another seed)."""

    def _next_prefetched(self) -> Batch:
        if self._prefetched is None:
            self._prefetched = iter(torch.utils.data.DataLoader(
                _MicroBatches(self), batch_size=None, sampler=_Keys(self), num_workers=self.workers,
                prefetch_factor=PREFETCH_PER_WORKER, pin_memory=self.pin_memory, worker_init_fn=_leave_interrupts,
                # fork: the workers share the memory-mapped store and the epoch plans instead of pickling them
                multiprocessing_context="fork" if sys.platform.startswith("linux") else None))
        # A worker's exception is raised here with its traceback; a worker that dies (killed, out of memory)
        # makes torch raise RuntimeError "DataLoader worker (pid N) exited unexpectedly" (SIGCHLD, or its
        # liveness check every 5 s while waiting), so a run stops instead of hanging.
        key, packed, layout = next(self._prefetched)
        assert tuple(key) == (self.position, self._micro), (key, self.position, self._micro)  # in order
        return _unpack(packed, layout)

    def close(self) -> None:
        """Stop the background workers, if any (they start again at the position on the next next())."""
        self._prefetched = None  # the DataLoader iterator shuts its workers down when dropped

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_prefetched": None}  # a worker gets the loader, not its own pipeline


class _Keys(torch.utils.data.Sampler):
    """(start, micro) of this rank's micro-batches, from the loader's position on, for ever."""

    def __init__(self, loader: _Loader):
        self.start, self.micro = loader.position, loader._micro
        self.batch_size, self.accum_steps = loader.batch_size, loader.accum_steps

    def __iter__(self) -> Iterator[tuple[int, int]]:
        start, micro = self.start, self.micro
        while True:
            yield start, micro
            micro += 1
            if micro == self.accum_steps:
                start, micro = start + self.batch_size, 0


class _MicroBatches(torch.utils.data.Dataset):
    """A loader's micro-batches by key, built in whichever worker process is asked."""

    def __init__(self, loader: _Loader):
        self.loader = loader

    def __getitem__(self, key: tuple[int, int]) -> tuple[tuple[int, int], torch.Tensor, list]:
        return key, *_pack(self.loader.micro_batch(*key))


def _leave_interrupts(worker_id: int) -> None:
    """Ctrl-C reaches the whole process group: the training process handles it (checkpoint, stop) and
    stops the workers, which must not die first under a batch it still wants."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _pack(batch: Batch) -> tuple[torch.Tensor, list[tuple[str, tuple[int, ...]]]]:
    """A batch of int64 tensors as one flat tensor and its layout: one shared-memory block (and one pinned
    copy) per batch between processes instead of one per tensor."""
    layout = [(name, tuple(t.shape)) for name, t in batch.items()]
    return torch.cat([t.reshape(-1) for t in batch.values()]), layout


def _unpack(packed: torch.Tensor, layout: list[tuple[str, tuple[int, ...]]]) -> Batch:
    """The tensors of a packed batch, as views of it."""
    sizes = [math.prod(shape) for _, shape in layout]
    return {name: piece.view(shape) for (name, shape), piece in zip(layout, packed.split(sizes))}


class CLMLoader(_Loader):
    """Causal-LM blocks: {"input_ids", "labels"}, labels being the inputs shifted by one."""

    def __init__(self, split: SplitReader, block_size: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, order: str = "blocks", micro_batch_size: int = 0,
                 workers: int = 0, pin_memory: bool = False):
        super().__init__(batch_size, seed, rank, world_size, micro_batch_size, workers, pin_memory)
        self.split, self.block_size, self.order = split, block_size, order
        self.examples_per_epoch = self.blocks_per_epoch = num_blocks(split.num_tokens, block_size)
        self._forget_epochs()

    def _forget_epochs(self) -> None:
        self._epoch = -1
        self._epoch_starts = np.zeros(0, dtype=np.int64)

    def _starts(self, sample_indices: np.ndarray) -> np.ndarray:
        starts = np.empty(len(sample_indices), dtype=np.int64)
        epochs, positions = np.divmod(sample_indices, self.blocks_per_epoch)
        for epoch in np.unique(epochs):
            if epoch != self._epoch:
                self._epoch_starts = epoch_starts(self.seed, int(epoch), self.split.num_tokens, self.block_size,
                                                  self.order)
                self._epoch = int(epoch)
            mask = epochs == epoch
            starts[mask] = self._epoch_starts[positions[mask]]
        return starts

    def examples(self, samples: np.ndarray) -> Batch:
        """Inputs and labels of these samples, as int64 tensors."""
        windows = self.split.take(self._starts(samples)[:, None] + np.arange(self.block_size + 1))
        x, y = inputs_and_labels(windows)
        return {"input_ids": torch.from_numpy(np.ascontiguousarray(x)),
                "labels": torch.from_numpy(np.ascontiguousarray(y))}


class MLMLoader(_Loader):
    """BERT examples: {"input_ids", "token_type_ids", "attention_mask", "mlm_labels", "nsp_labels"}.

    Each epoch re-plans the sentence pairs (fresh A/B cuts and random partners) and every example draws
    its masks afresh (dynamic masking), both from (seed, epoch, position). Every epoch has as many
    examples as the first, so the position of any sample index is known without planning the epochs
    before it. shuffle=False keeps document order and the same masks forever: a fixed evaluation set.
    """

    def __init__(self, split: SplitReader, vocab: BertVocab, seq_len: int, batch_size: int, seed: int,
                 masking: MaskingSpec, short_seq_prob: float = 0.1, next_sentence: bool = True,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True, micro_batch_size: int = 0,
                 workers: int = 0, pin_memory: bool = False):
        super().__init__(batch_size, seed, rank, world_size, micro_batch_size, workers, pin_memory)
        special = 3 if next_sentence else 2
        if seq_len < special + 2:
            raise LmforgeError(f"model.block_size={seq_len} leaves no room for text after the {special} special "
                               f"tokens of [CLS] A [SEP]{' B [SEP]' if next_sentence else ''}; use at least "
                               f"{special + 2}")
        self.split, self.vocab, self.seq_len, self.masking = split, vocab, seq_len, masking
        self.short_seq_prob, self.next_sentence, self.shuffle = short_seq_prob, next_sentence, shuffle
        self.max_tokens = seq_len - special
        self.sentences = SentenceIndex.build(split, vocab.sep)
        if self.sentences.num_sentences == 0:
            raise LmforgeError("the split has no sentences (is this a bert token store? prepare it with "
                               "model.family=bert)")
        if masking.whole_word:
            check_whole_word(vocab)
        self.random_pool = vocab.random_pool
        self._forget_epochs()

    def _forget_epochs(self) -> None:
        self._plans: dict[int, np.ndarray] = {}
        self.examples_per_epoch = len(self._plan(0))  # the seed's first epoch sets every epoch's length
        if self.examples_per_epoch == 0:
            raise LmforgeError("no sentence-pair examples could be formed: every document has a single sentence")

    def _plan(self, epoch: int) -> np.ndarray:
        if epoch not in self._plans:
            rng = np.random.default_rng([self.seed, epoch, 0])
            rows, self.plan_stats = plan_epoch(self.sentences, self.max_tokens, rng, self.short_seq_prob,
                                               self.next_sentence)
            if self.shuffle:
                rows = rows[rng.permutation(len(rows))]
            self._plans = {0: self._plans.get(0, rows), epoch: rows}  # keep epoch 0 and the current one
        return self._plans[epoch]

    def examples(self, samples: np.ndarray) -> Batch:
        """Masked sentence pairs of these samples, as int64 tensors; each draws from (seed, epoch, position)."""
        epochs, positions = np.divmod(samples, self.examples_per_epoch)
        if not self.shuffle:
            epochs = np.zeros_like(epochs)  # a fixed set: the same pairs and masks however many times it is read
        rows = np.empty((len(samples), 5), dtype=np.int64)
        for epoch in np.unique(epochs):
            plan = self._plan(int(epoch))
            here = epochs == epoch
            rows[here] = plan[positions[here] % len(plan)]
        rngs = [np.random.default_rng([self.seed, int(e), int(p), 1]) for e, p in zip(epochs, positions)]
        ids, types, attention = build_pairs(self.split, self.sentences, rows, self.seq_len, self.vocab, rngs,
                                            self.next_sentence)
        draws = np.stack([mask_draws(rng, self.seq_len) for rng in rngs])
        masked, labels = mask_batch(ids, types, self.vocab, self.masking, draws, self.random_pool)
        return {"input_ids": torch.from_numpy(masked), "token_type_ids": torch.from_numpy(types),
                "attention_mask": torch.from_numpy(attention), "mlm_labels": torch.from_numpy(labels),
                "nsp_labels": torch.from_numpy(rows[:, 4].copy())}

    @property
    def stats(self) -> Optional[PlanStats]:
        return getattr(self, "plan_stats", None)


class SpanLoader(CLMLoader):
    """T5 denoising examples: {"input_ids", "attention_mask", "labels"} (the model shifts labels right for
    its decoder inputs).

    Samples are blocks of the token stream, taken as CLMLoader takes them (a fresh shift and order each epoch,
    or random offsets), of the raw length whose corrupted input fills block_size (`mixture_lengths`). Each
    sample is corrupted with a Generator of (seed, epoch, position) alone, so a sample's example is the same
    in any micro-batch, world size or resumed run. With one denoiser every example has the same widths (no
    padding); a mixture pads to the widest. fixed=True: the first blocks in order, corrupted the same way
    at every reading (an evaluation set).
    """

    def __init__(self, split: SplitReader, vocab: SpanVocab, denoisers: list[Denoiser], block_size: int,
                 batch_size: int, seed: int, rank: int = 0, world_size: int = 1, fixed: bool = False,
                 order: str = "blocks", micro_batch_size: int = 0, workers: int = 0, pin_memory: bool = False,
                 sentinels_key: str = "data.tokenizer.sentinels"):
        """order: blocks | random, as CLMLoader's (train.windows); fixed overrides it with sequential."""
        self.vocab, self.denoisers, self.fixed = vocab, list(denoisers), fixed
        self.lengths = check_sentinels(block_size, self.denoisers, vocab, sentinels_key)
        super().__init__(split, self.lengths.tokens, batch_size, seed, rank, world_size,
                         "sequential" if fixed else order, micro_batch_size, workers, pin_memory)

    def examples(self, samples: np.ndarray) -> Batch:
        """Corrupted blocks of these samples, as int64 tensors."""
        rows = self.split.take(self._starts(samples)[:, None] + np.arange(self.block_size))
        epochs, positions = np.divmod(samples, self.blocks_per_epoch)
        if self.fixed:
            epochs = np.zeros_like(epochs)
        out = denoise_rows(rows, example_generators(self.seed, epochs, positions, 2), self.vocab, self.denoisers)
        return {key: torch.from_numpy(getattr(out, key).astype(np.int64))
                for key in ("input_ids", "attention_mask", "labels")}


def example_generators(seed: int, epochs: np.ndarray, positions: np.ndarray, stream: int) -> list[np.random.Generator]:
    """One Generator per example: numpy.random.default_rng([seed, epoch, position, stream]), made cheaper.

    SeedSequence turns each int of a list into its 32-bit words and hashes them; an int below 2**32 is one
    word, so a uint32 array of the same numbers is the same entropy, and it skips the per-int conversion (a
    third of the cost). Anything else (a seed of 2**32 or more, a negative one) takes the list, as before.
    """
    small = [v.size == 0 or (v.min() >= 0 and v.max() < 2**32) for v in (epochs, positions)]
    if 0 <= seed < 2**32 and 0 <= stream < 2**32 and all(small):
        keys = np.empty((len(epochs), 4), dtype=np.uint32)
        keys[:, 0], keys[:, 1], keys[:, 2], keys[:, 3] = seed, epochs, positions, stream
        return [np.random.default_rng(key) for key in keys]
    return [np.random.default_rng([seed, int(e), int(p), stream]) for e, p in zip(epochs, positions)]


def check_sentinels(block_size: int, denoisers: list[Denoiser], vocab: SpanVocab,
                    sentinels_key: str = "data.tokenizer.sentinels") -> SpanLengths:
    """The row lengths of the objective at block_size; an error if a row gets more spans than `vocab` has sentinels."""
    lengths = mixture_lengths(block_size, denoisers)
    for d in denoisers:
        spans = span_counts(lengths.tokens, d.noise_density, d.mean_span_length)[1] if d.kind == "span" else 0
        if spans > vocab.num_sentinels:
            raise LmforgeError(f"rows of {lengths.tokens} tokens get {spans} noise spans but the tokenizer has "
                               f"{vocab.num_sentinels} sentinels ({sentinels_key}); lower span.noise_density or "
                               f"model.block_size, or raise span.mean_span_length")
    return lengths


def span_denoisers(config) -> list[Denoiser]:
    """The denoisers a Config's span section names (one, or the mixture)."""
    return [Denoiser(*setting[1:]) for setting in config.span.denoisers()]


def check_objective(config) -> None:
    """Refuse, before any work, a t5 run whose rows cannot be corrupted at model.block_size or get more
    spans than the tokenizer has (or will have) sentinels; config: an lmforge Config."""
    from lmforge.data.tokenizer import load_tokenizer

    if config.model.family != "t5":
        return
    tok, denoisers = config.data.tokenizer, span_denoisers(config)
    if config.model.block_size < 2:
        raise LmforgeError(f"model.block_size={config.model.block_size} is too short for a t5 objective "
                           f"(use at least 2)")
    if tok.path:
        check_sentinels(config.model.block_size, denoisers, span_vocab(load_tokenizer(tok.path), denoisers),
                        f"data.tokenizer.path={tok.path}")
        return
    if tok.sentinels == 0 and any(d.kind == "span" for d in denoisers):
        raise LmforgeError(f"span.objective={config.span.objective} drops spans into sentinel tokens but "
                           f"data.tokenizer.sentinels is 0; give it at least one (T5: 100)")
    planned = SpanVocab(eos=1, pad=0, sentinel_start=tok.sentinels, num_sentinels=tok.sentinels)
    check_sentinels(config.model.block_size, denoisers, planned)


def span_vocab(tokenizer, denoisers: list[Denoiser]) -> SpanVocab:
    """The ids the objective writes; prefix LM alone needs no sentinels."""
    if any(d.kind == "span" for d in denoisers):
        return SpanVocab.from_tokenizer(tokenizer)
    from lmforge.data.tokenizer import T5_EOS, T5_PAD, special_id

    why = "the t5 objectives need (train the tokenizer with model.family t5)"
    return SpanVocab(special_id(tokenizer, T5_EOS, why), special_id(tokenizer, T5_PAD, why), 0, 0)


def loader_for(config, store, split: str, training: bool, rank: int = 0, world_size: int = 1,
               pin_memory: Optional[bool] = None) -> _Loader:
    """The loader of the run's objective over `split` of `store`: shuffled for training, fixed for evaluation.

    config: an lmforge Config; store: a TokenStore prepared for config.model.family. Both read global
    batches of train.batch_size in micro-batches of train.micro_batch_size; the training loader builds
    them in train.loader_workers background processes. pin_memory: page-locked batches (default: when
    train.device is, or auto-selects, CUDA).
    """
    from lmforge.data.tokenizer import load_tokenizer

    family, tc = config.model.family, config.train
    built_for = store.manifest.get("family", "gpt")
    if built_for != family:
        raise LmforgeError(f"token store {store.path} was prepared for model.family={built_for}, "
                           f"not {family}; prepare it again for this model")
    workers = tc.loader_workers if training else 0  # evaluation reads micro_batch() directly
    if workers < 0:
        raise LmforgeError(f"train.loader_workers must be >= 0 (0 builds batches in the training process), "
                           f"got {workers}")
    if pin_memory is None:
        pin_memory = torch.cuda.is_available() and (tc.device == "auto" or tc.device.startswith("cuda"))
    layout = dict(rank=rank, world_size=world_size, micro_batch_size=tc.micro_batch_size, workers=workers,
                  pin_memory=pin_memory)
    if family == "bert":
        m = config.mlm
        vocab = BertVocab.from_tokenizer(load_tokenizer(store.tokenizer_path))
        spec = MaskingSpec(m.mask_rate, m.mask_token_fraction, m.random_token_fraction, m.whole_word)
        return MLMLoader(store.split(split), vocab, config.model.block_size, tc.batch_size,
                         tc.seed if training else 0, spec, m.short_seq_prob, m.next_sentence,
                         shuffle=training, **layout)
    if family == "t5":
        denoisers = span_denoisers(config)
        tok = config.data.tokenizer
        vocab = span_vocab(load_tokenizer(store.tokenizer_path), denoisers)
        return SpanLoader(store.split(split), vocab, denoisers, config.model.block_size, tc.batch_size,
                          tc.seed if training else 0, fixed=not training, order=tc.windows, **layout,
                          sentinels_key=f"data.tokenizer.path={tok.path}" if tok.path else "data.tokenizer.sentinels")
    return CLMLoader(store.split(split), config.model.block_size, tc.batch_size, tc.seed if training else 0,
                     order=tc.windows if training else "sequential", **layout)
