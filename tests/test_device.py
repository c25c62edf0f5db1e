"""The matmul-peak measurement (the MFU denominator) must not disturb training state."""

import torch

from lmforge.train import device as device_module
from lmforge.train.device import measured_matmul_flops


def test_measuring_the_peak_leaves_the_global_rng_alone(monkeypatch):
    monkeypatch.setattr(device_module, "_PEAK_CACHE", {})
    torch.manual_seed(1)
    before = torch.get_rng_state()
    first = measured_matmul_flops(torch.device("cpu"), "fp32", seconds=0.05)
    again = measured_matmul_flops(torch.device("cpu"), "fp32", seconds=0.05, fresh=True)
    # dropout masks after a resume depend on this state: measuring must not consume it
    assert torch.equal(before, torch.get_rng_state())
    assert first > 0 and again > 0


def test_a_fresh_peak_keeps_the_better_of_the_old_and_the_new(monkeypatch):
    key = (str(torch.device("cpu")), "fp32")
    monkeypatch.setattr(device_module, "_PEAK_CACHE", {key: 1e30})  # an old reading no machine reaches
    assert measured_matmul_flops(torch.device("cpu"), "fp32", seconds=0.05) == 1e30  # cached: not measured
    assert measured_matmul_flops(torch.device("cpu"), "fp32", seconds=0.05, fresh=True) == 1e30  # kept
    monkeypatch.setattr(device_module, "_PEAK_CACHE", {key: 1.0})  # an old reading taken under load
    measured = measured_matmul_flops(torch.device("cpu"), "fp32", seconds=0.05, fresh=True)
    assert measured > 1e6 and device_module._PEAK_CACHE[key] == measured
