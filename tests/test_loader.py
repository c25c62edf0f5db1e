import numpy as np
import torch

from lmforge.data.loader import CLMLoader
from lmforge.data.store import SplitReader


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
    split, block, per_rank = _split(16 * 41), 16, 5  # 40 blocks per epoch
    ranks = [CLMLoader(split, block, per_rank, seed=0, rank=r, world_size=2) for r in range(2)]
    single = CLMLoader(split, block, 2 * per_rank, seed=0)
    starts = []
    for _ in range(4):  # 4 global batches of 10 = one epoch
        parts = [r.next()["input_ids"] for r in ranks]
        assert torch.equal(torch.cat(parts), single.next()["input_ids"])  # same global batch for any world size
        starts += [int(row[0]) for part in parts for row in part]
    offsets = {s % block for s in starts}
    assert len(offsets) == 1  # one shift per epoch
    assert sorted(s // block for s in starts) == sorted(set(s // block for s in starts))  # no repeats
    assert len(starts) == 40


def test_unshuffled_loader_reads_consecutive_blocks_from_the_start():
    loader = CLMLoader(_split(16 * 10), 16, 3, seed=5, order="sequential")
    x = loader.batch(1)["input_ids"]
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
