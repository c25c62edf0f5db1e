import os
import time

import numpy as np
import pytest
import torch
import torch.utils.data

from lmforge.data.loader import CLMLoader, SpanLoader, batch_layout, example_generators
from lmforge.data.objectives.span import Denoiser, SpanVocab, denoise, denoise_mixture
from lmforge.data.store import SplitReader
from lmforge.errors import LmforgeError


def _split(n_tokens: int) -> SplitReader:
    tokens = np.arange(n_tokens, dtype=np.uint32)
    return SplitReader([tokens], np.asarray([0, n_tokens]), np.asarray([0]))


def test_labels_are_inputs_shifted_by_one():
    loader = CLMLoader(_split(1000), block_size=16, batch_size=4, seed=0)
    batch = loader.next()
    x, y = batch["input_ids"], batch["labels"]
    assert x.shape == y.shape == (4, 16)
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y[:, -1], x[:, -1] + 1)


def test_order_is_a_pure_function_of_seed_and_position():
    a = CLMLoader(_split(5000), 16, 4, seed=3)
    b = CLMLoader(_split(5000), 16, 4, seed=3)
    c = CLMLoader(_split(5000), 16, 4, seed=4)
    batches_a = [a.next()["input_ids"] for _ in range(5)]
    assert all(torch.equal(p, b.next()["input_ids"]) for p in batches_a)
    assert not torch.equal(batches_a[0], c.next()["input_ids"])


def test_state_round_trip_continues_the_same_sequence():
    loader = CLMLoader(_split(5000), 16, 4, seed=1)
    for _ in range(7):
        loader.next()
    state = loader.state_dict()
    expected = [loader.next()["input_ids"] for _ in range(3)]
    fresh = CLMLoader(_split(5000), 16, 4, seed=99)
    fresh.load_state_dict(state)
    assert all(torch.equal(e, fresh.next()["input_ids"]) for e in expected)


def test_an_epoch_covers_every_block_once_and_ranks_are_disjoint():
    split, block, global_batch = _split(16 * 41), 16, 10  # 40 blocks per epoch
    ranks = [CLMLoader(split, block, global_batch, seed=0, rank=r, world_size=2) for r in range(2)]
    single = CLMLoader(split, block, global_batch, seed=0)
    starts = []
    for _ in range(4):  # 4 global batches of 10 = one epoch
        parts = [r.next()["input_ids"] for r in ranks]
        assert torch.equal(torch.cat(parts), single.next()["input_ids"])  # same global batch for any world size
        starts += [int(row[0]) for part in parts for row in part]
    offsets = {s % block for s in starts}
    assert len(offsets) == 1  # one shift per epoch
    assert sorted(s // block for s in starts) == sorted(set(s // block for s in starts))  # no repeats
    assert len(starts) == 40


def test_global_batches_do_not_depend_on_world_size_or_micro_batch_size():
    """Rank r reads the r-th part of each global batch in micro-batches; concatenated, the parts are the batch."""
    split = _split(16 * 200)
    reference = CLMLoader(split, 16, 12, seed=7)
    layouts = [(1, 3), (2, 0), (2, 2), (3, 4), (4, 1)]  # (world size, micro-batch size)
    loaders = {layout: [CLMLoader(split, 16, 12, seed=7, rank=r, world_size=layout[0], micro_batch_size=layout[1])
                        for r in range(layout[0])] for layout in layouts}
    for _ in range(5):
        expected = reference.next()["input_ids"]
        for (world, micro), ranks in loaders.items():
            got = torch.cat([r.next()["input_ids"] for r in ranks for _ in range(r.accum_steps)])
            assert torch.equal(got, expected), (world, micro)


def test_position_is_in_samples_so_a_run_resumes_with_another_world_size():
    split = _split(16 * 200)
    two = [CLMLoader(split, 16, 8, seed=3, rank=r, world_size=2, micro_batch_size=2) for r in range(2)]
    for _ in range(3 * two[0].accum_steps):  # three global batches
        for r in two:
            r.next()
    state = two[0].state_dict()
    assert state == {"samples": 24, "seed": 3} == two[1].state_dict()
    one = CLMLoader(split, 16, 8, seed=0)
    one.load_state_dict(state)
    assert torch.equal(one.next()["input_ids"], CLMLoader(split, 16, 8, seed=3).micro_batch(24)["input_ids"])


def test_checkpoints_from_before_global_batches_resume_at_the_same_sample():
    # then: batch_index counted micro-batches of train.batch_size, now micro_batch_size (see upgrade_train_section)
    loader = CLMLoader(_split(16 * 200), 16, 8, seed=3, micro_batch_size=2)
    loader.load_state_dict({"batch_index": 12, "seed": 3})
    assert loader.state_dict()["samples"] == 24


def test_a_global_batch_that_does_not_split_evenly_is_refused():
    with pytest.raises(LmforgeError, match=r"train.batch_size=10 .*train.micro_batch_size x processes = 3 x 2 = 6"):
        CLMLoader(_split(1000), 16, 10, seed=0, rank=0, world_size=2, micro_batch_size=3)
    with pytest.raises(LmforgeError, match="does not split evenly over 4 processes"):
        batch_layout(10, 0, 4)
    assert batch_layout(12, 2, 3) == (2, 2) and batch_layout(12, 0, 3) == (4, 1)


def test_unshuffled_loader_reads_consecutive_blocks_from_the_start():
    loader = CLMLoader(_split(16 * 10), 16, 3, seed=5, order="sequential")
    x = loader.micro_batch(1 * loader.batch_size)["input_ids"]
    assert x[:, 0].tolist() == [48, 64, 80]  # blocks 3, 4, 5
    assert loader.batches_per_epoch == 3  # 9 blocks fit (one block of slack for the label shift)


def test_random_windows_are_reproducible_and_in_range():
    a = CLMLoader(_split(1000), 16, 8, seed=2, order="random")
    b = CLMLoader(_split(1000), 16, 8, seed=2, order="random")
    for _ in range(20):
        batch = a.next()
        xa, ya = batch["input_ids"], batch["labels"]
        assert torch.equal(xa, b.next()["input_ids"])
        assert int(ya.max()) < 1000 and torch.equal(ya[:, -1], xa[:, -1] + 1)


def _batches(loader, count: int) -> list[dict]:
    return [loader.next() for _ in range(count)]


def _same(first: list[dict], second: list[dict]) -> bool:
    return len(first) == len(second) and all(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
                                             for a, b in zip(first, second))


@pytest.mark.parametrize("workers", [1, 2])
def test_background_workers_give_the_same_batches_as_the_training_process(workers):
    # 8 micro-batches of 3 per global batch of 24; 25 global batches per epoch: the run crosses 2 epochs
    split = _split(16 * 601)
    reference = _batches(CLMLoader(split, 16, 24, seed=4, micro_batch_size=3), 8 * 60)
    loader = CLMLoader(split, 16, 24, seed=4, micro_batch_size=3, workers=workers)
    assert _same(_batches(loader, 8 * 60), reference)
    loader.close()


def test_state_describes_consumed_batches_not_prefetched_ones_and_resumes_exactly():
    split = _split(16 * 301)  # 18 global batches of 16 per epoch
    uninterrupted = _batches(CLMLoader(split, 16, 16, seed=2, micro_batch_size=4), 4 * 40)
    loader = CLMLoader(split, 16, 16, seed=2, micro_batch_size=4, workers=2)
    taken = _batches(loader, 4 * 7)  # mid-epoch; the workers have built batches beyond these
    state = loader.state_dict()
    assert state == {"samples": 7 * 16, "seed": 2}
    resumed = CLMLoader(split, 16, 16, seed=0, micro_batch_size=4, workers=2)
    resumed.load_state_dict(state)
    assert _same(taken + _batches(resumed, 4 * 33), uninterrupted)
    # loading a state into a loader whose workers are running drops what they prefetched
    loader.load_state_dict({"samples": 3 * 16, "seed": 2})
    assert _same(_batches(loader, 4 * 2), uninterrupted[4 * 3: 4 * 5])
    loader.close(), resumed.close()


def test_ranks_with_workers_stay_disjoint_and_make_the_global_batch():
    split = _split(16 * 201)
    single = CLMLoader(split, 16, 8, seed=6)
    ranks = [CLMLoader(split, 16, 8, seed=6, rank=r, world_size=2, micro_batch_size=2, workers=2) for r in range(2)]
    for _ in range(30):
        parts = [r.next()["input_ids"] for r in ranks for _ in range(r.accum_steps)]
        assert torch.equal(torch.cat(parts), single.next()["input_ids"])
    for r in ranks:
        r.close()


class _DiesOnSixthBatch:
    """A loader whose worker process dies (no Python exception, as when it is killed) on one micro-batch."""

    def micro_batch(self, start: int, micro: int = 0):
        if start == 5 * self.batch_size and torch.utils.data.get_worker_info() is not None:
            os._exit(3)
        return super().micro_batch(start, micro)


class _FailsOnSixthBatch:
    def micro_batch(self, start: int, micro: int = 0):
        if start == 5 * self.batch_size:
            raise ValueError(f"shard unreadable at sample {start}")
        return super().micro_batch(start, micro)


class _DyingLoader(_DiesOnSixthBatch, CLMLoader):
    pass


class _FailingLoader(_FailsOnSixthBatch, CLMLoader):
    pass


class _DyingSpanLoader(_DiesOnSixthBatch, SpanLoader):
    pass


class _FailingSpanLoader(_FailsOnSixthBatch, SpanLoader):
    pass


SPAN_VOCAB = SpanVocab(eos=1, pad=0, sentinel_start=1_000_000, num_sentinels=100)


def _broken(family: str, dies: bool, workers: int):
    """A gpt (causal LM) or t5 (span corruption) loader of 4-sample batches whose sixth batch goes wrong."""
    if family == "gpt":
        return (_DyingLoader if dies else _FailingLoader)(_split(16 * 200), 16, 4, seed=0, workers=workers)
    cls = _DyingSpanLoader if dies else _FailingSpanLoader
    return cls(_split(16 * 200), SPAN_VOCAB, [Denoiser()], 16, 4, seed=0, workers=workers)


@pytest.mark.parametrize("family", ["gpt", "t5"])
def test_a_worker_that_dies_stops_the_run_with_its_error_not_a_hang(family):
    loader = _broken(family, dies=True, workers=2)
    began = time.monotonic()
    with pytest.raises(RuntimeError, match=r"DataLoader worker \(pid.*\) exited unexpectedly"):
        for _ in range(20):
            loader.next()
    assert time.monotonic() - began < 30
    assert loader.position <= 5 * 4  # only batches before the dead one were delivered
    loader.close()
    failing = _broken(family, dies=False, workers=1)
    with pytest.raises(ValueError, match="shard unreadable at sample 20"):
        for _ in range(20):
            failing.next()
    assert failing.position == 5 * 4  # a worker's exception arrives in order, with the batch it spoiled
    failing.close()


def test_pinned_batches_equal_unpinned_ones():
    if not torch.cuda.is_available():
        pytest.skip("pinning memory needs CUDA")
    split = _split(16 * 100)
    for workers in (0, 2):
        pinned = CLMLoader(split, 16, 4, seed=1, workers=workers, pin_memory=True)
        batches = _batches(pinned, 5)
        assert all(b["input_ids"].is_pinned() for b in batches)
        assert _same(batches, _batches(CLMLoader(split, 16, 4, seed=1), 5))
        pinned.close()


def test_split_take_gathers_across_shards_like_read():
    rng = np.random.default_rng(0)
    pieces = [rng.integers(0, 60000, n).astype(np.uint16) for n in (50, 7, 120)]
    split = SplitReader(pieces, np.asarray([0, 50, 57, 177]), np.asarray([0]))
    starts = rng.integers(0, 177 - 30, 40)
    expected = np.stack([split.read(int(s), 30) for s in starts]).astype(np.int64)
    got = split.take(starts[:, None] + np.arange(30))
    assert got.dtype == np.int64 and np.array_equal(got, expected)
    with pytest.raises(IndexError):
        split.take(np.asarray([177]))


def test_pretraining_with_loader_workers_learns_the_same_and_resumes_identically(tmp_path, corpus_file):
    import json
    import shutil

    import yaml

    from conftest import tiny_config_dict
    from lmforge.cli import main

    def losses(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    runs = {}
    for workers in (0, 2):
        config = tmp_path / f"tiny-{workers}.yaml"
        config.write_text(yaml.safe_dump(tiny_config_dict(corpus_file, micro_batch_size=4, loader_workers=workers)))
        runs[workers] = tmp_path / f"run-{workers}"
        assert main(["pretrain", "--config", str(config), "--out", str(runs[workers])]) == 0
    assert losses(runs[2]) == losses(runs[0]) and len(losses(runs[0])) == 30
    # a run with workers that died after its step-20 checkpoint resumes into the same steps
    partial = tmp_path / "partial"
    shutil.copytree(runs[2], partial)
    shutil.rmtree(partial / "checkpoints" / "step-000030")
    (partial / "checkpoints" / "latest").write_text("step-000020\n")
    assert main(["pretrain", "--resume", str(partial)]) == 0
    assert losses(partial) == losses(runs[0])


def test_negative_loader_workers_is_refused(tmp_path, corpus_file, capsys):
    import yaml

    from conftest import tiny_config_dict
    from lmforge.cli import main

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(corpus_file, loader_workers=-1)))
    assert main(["pretrain", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    assert "train.loader_workers must be >= 0" in capsys.readouterr().err


@pytest.mark.parametrize("seed,epoch,position", [(0, 0, 0), (7, 3, 123_456), (2**32 - 1, 2**32 - 1, 2**32 - 1),
                                                 (2**32, 1, 5), (3, 0, 2**33 + 9)])
def test_example_generators_draw_as_default_rng_of_seed_epoch_position_stream(seed, epoch, position):
    (made,) = example_generators(seed, np.asarray([epoch]), np.asarray([position]), 2)
    assert np.array_equal(made.random(50), np.random.default_rng([seed, epoch, position, 2]).random(50))
    assert example_generators(seed, np.zeros(0, np.int64), np.zeros(0, np.int64), 2) == []


@pytest.mark.parametrize("denoisers", [[Denoiser()], [Denoiser("prefix_lm")],
                                       [Denoiser("span", 2.0), Denoiser("span", 1.0, 0.5, 8.0), Denoiser("prefix_lm")]])
@pytest.mark.parametrize("fixed", [False, True])
def test_span_batches_are_each_block_corrupted_alone_with_the_generator_of_its_seed_epoch_position(denoisers, fixed):
    """The batched loader makes, bit for bit, what corrupting each sample alone with
    default_rng([seed, epoch, position, 2]) makes (as the loader did sample by sample before batching)."""
    split = _split(60 * 36)
    loader = SpanLoader(split, SPAN_VOCAB, denoisers, 32, 8, seed=5, fixed=fixed)
    samples = np.arange(loader.examples_per_epoch - 4, loader.examples_per_epoch + 4)  # across an epoch's end
    got = loader.examples(samples)
    epochs, positions = np.divmod(samples, loader.examples_per_epoch)
    expected = []
    for sample, epoch, position in zip(samples, epochs, positions):
        start = loader._starts(np.asarray([sample]))  # which block: as CLMLoader picks it (tested above)
        row = split.take(start[:, None] + np.arange(loader.block_size))
        rng = np.random.default_rng([5, 0 if fixed else int(epoch), int(position), 2])
        expected.append(denoise(row, rng, SPAN_VOCAB, denoisers[0]) if len(denoisers) == 1 else
                        denoise_mixture(row, rng, SPAN_VOCAB, denoisers))
    for key in ("input_ids", "attention_mask", "labels"):
        want = np.concatenate([getattr(e, key) for e in expected]).astype(np.int64)
        assert np.array_equal(got[key].numpy(), want)
