import pytest

from lmforge.config import load_config, parse_override
from lmforge.errors import LmforgeError


def test_default_recipe_is_nanogpt_baby_gpt():
    cfg = load_config()
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.d_model, cfg.model.block_size) == (4, 4, 128, 64)
    assert (cfg.train.steps, cfg.train.batch_size, cfg.train.lr, cfg.train.min_lr) == (2000, 12, 1e-3, 1e-4)


def test_overrides_are_typed():
    cfg = load_config(None, ["train.lr=3e-4", "model.dropout=0.1", "train.compile=true", "data.corpus=a.txt"])
    assert cfg.train.lr == 3e-4 and cfg.model.dropout == 0.1 and cfg.train.compile is True
    assert cfg.data.corpus == ["a.txt"]
    assert parse_override("train.steps=10") == (["train", "steps"], 10)


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "unknown config key 'train.lrr'"),
    ("train.steps=ten", "'train.steps' must be an integer"),
    ("train.lr=-1", "train.lr must be positive"),
    ("model.n_head=5", "model.n_head (5) must divide model.d_model (128)"),
    ("train.precision=fp8", "'train.precision' must be one of"),
    ("data.split.val_fraction=1.5", "val_fraction must be in (0, 1)"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(LmforgeError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_unknown_recipe_lists_the_shipped_ones():
    with pytest.raises(LmforgeError, match="shakespeare-char"):
        load_config("no-such-recipe")
