"""train.compile on a platform where compiling fails: a warning and eager training, or with
train.compile_strict an LmforgeError (exit 2). The failure is real: inductor's C++ compiler (CXX) is
pointed at a path that does not exist, so building the first block's kernels fails as it would on a
machine without a compiler."""

import copy
import logging
import os
import subprocess
import sys

import pytest
import torch
import yaml

from lmforge.config import ParallelConfig
from lmforge.errors import LmforgeError
from lmforge.model import GPT, ModelConfig
from lmforge.train.distributed import parallelize, transformer_blocks

from conftest import tiny_config_dict

MISSING_CXX = "/nonexistent/bin/g++"


@pytest.fixture
def no_cpp_compiler(tmp_path, monkeypatch):
    """Inductor with no working C++ compiler and empty caches (a cached kernel would need no compiler)."""
    import torch._dynamo
    import torch._inductor.config as inductor_config

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    with inductor_config.patch({"cpp.cxx": (None, MISSING_CXX), "fx_graph_cache": False}):
        yield
    torch._dynamo.reset()


def _model_and_batch():
    torch.manual_seed(0)
    # an odd width no other test compiles, so no in-process kernel cache can stand in for the compiler
    model = GPT(ModelConfig(vocab_size=19, n_layer=2, n_head=3, d_model=24, block_size=8))
    ids = torch.randint(0, 19, (2, 9), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}


def _loss_and_grads(train_model, model, batch):
    loss = train_model(batch)
    ran_compiled = "CompiledFunctionBackward" in _autograd_nodes(loss)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads, ran_compiled


def _autograd_nodes(loss) -> set[str]:
    """The names of the backward graph's nodes: compiled code shows as CompiledFunctionBackward."""
    seen, todo, names = set(), [loss.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(next_node for next_node, _ in node.next_functions)
    return names


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_a_failing_compile_warns_once_and_trains_exactly_as_eager(no_cpp_compiler):
    model, batch = _model_and_batch()
    reference = copy.deepcopy(model)
    compiled = parallelize(model, lambda m, b: m(**b).loss, ParallelConfig(), None, torch.device("cpu"), "fp32",
                           compile_blocks=True)
    # a handler of its own: the CLI, run in-process by other tests, stops the lmforge logger's propagation
    collect, logger = _Collect(), logging.getLogger("lmforge.train.distributed")
    logger.addHandler(collect)
    try:
        loss, grads, ran_compiled = _loss_and_grads(compiled, model, batch)
        loss_again, _, _ = _loss_and_grads(compiled, model, batch)  # later steps: no second warning
    finally:
        logger.removeHandler(collect)
    warnings = [m for m in collect.messages if "train.compile" in m]
    assert len(warnings) == 1
    assert "InvalidCxxCompiler" in warnings[0] and "train.compile: false" in warnings[0]
    assert all(block._compiled_call_impl is None for block in transformer_blocks(model))
    eager = parallelize(reference, lambda m, b: m(**b).loss, ParallelConfig(), None, torch.device("cpu"), "fp32")
    ref_loss, ref_grads, _ = _loss_and_grads(eager, reference, batch)
    assert not ran_compiled
    assert torch.equal(loss, ref_loss) and torch.equal(loss_again, ref_loss)
    assert all(torch.equal(g, r) for g, r in zip(grads, ref_grads))


def test_a_failing_compile_with_compile_strict_raises_one_line(no_cpp_compiler):
    model, batch = _model_and_batch()
    compiled = parallelize(model, lambda m, b: m(**b).loss, ParallelConfig(), None, torch.device("cpu"), "fp32",
                           compile_blocks=True, compile_strict=True)
    with pytest.raises(LmforgeError, match=r"train.compile failed on this platform \(InductorError: "
                                           r"InvalidCxxCompiler") as info:
        compiled(batch)
    assert "\n" not in str(info.value) and "train.compile_strict: false" in str(info.value)


@pytest.mark.parametrize("strict", [False, True])
def test_pretrain_with_a_failing_compile(strict, corpus_file, tmp_path):
    """The whole command: eager with a warning, or exit 2 with one line and no traceback."""
    config = tiny_config_dict(corpus_file, steps=2, eval_every=2, checkpoint_every=2, sample_tokens=0,
                              compile=True, compile_strict=strict)
    config_path = tmp_path / "c.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "CXX": MISSING_CXX, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
           "TORCHINDUCTOR_FX_GRAPH_CACHE": "0"}
    proc = subprocess.run([sys.executable, "-m", "lmforge", "pretrain", "--config", str(config_path),
                           "--out", str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=120)
    assert "Traceback" not in proc.stderr
    if strict:
        assert proc.returncode == 2
        errors = [line for line in proc.stderr.splitlines() if "train.compile failed" in line]
        assert len(errors) == 1 and "InvalidCxxCompiler" in errors[0]
    else:
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr.count("train.compile failed on this platform") == 1
        assert (tmp_path / "run" / "checkpoints" / "step-000002").is_dir()


def test_a_working_compile_is_kept_and_matches_eager(tmp_path, monkeypatch):
    """The guard costs nothing where compiling works: no warning, the blocks stay compiled, the same numbers."""
    import torch._dynamo

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    model, batch = _model_and_batch()
    reference = copy.deepcopy(model)
    compiled = parallelize(model, lambda m, b: m(**b).loss, ParallelConfig(), None, torch.device("cpu"), "fp32",
                           compile_blocks=True, compile_strict=True)
    collect, logger = _Collect(), logging.getLogger("lmforge.train.distributed")
    logger.addHandler(collect)
    try:
        loss, grads, ran_compiled = _loss_and_grads(compiled, model, batch)
    finally:
        logger.removeHandler(collect)
        torch._dynamo.reset()
    assert collect.messages == []
    assert ran_compiled and all(block._compiled_call_impl is not None for block in transformer_blocks(model))
    eager = parallelize(reference, lambda m, b: m(**b).loss, ParallelConfig(), None, torch.device("cpu"), "fp32")
    ref_loss, ref_grads, ran_eager_compiled = _loss_and_grads(eager, reference, batch)
    assert not ran_eager_compiled
    assert torch.allclose(loss, ref_loss, atol=1e-5)
    assert all(torch.allclose(g, r, atol=1e-5) for g, r in zip(grads, ref_grads))
