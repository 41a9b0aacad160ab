"""Device picking. This machine has only a CPU, so CUDA, XPU and MPS availability is faked."""
import pytest
import torch

from device import optimize_for_device, pick_device


def fake_available(monkeypatch, cuda=False, xpu=False, mps=False):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    if hasattr(torch, "xpu"):
        monkeypatch.setattr(torch.xpu, "is_available", lambda: xpu)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


@pytest.mark.parametrize("flags, expected", [
    (dict(cuda=True, xpu=True, mps=True), "cuda"),
    (dict(xpu=True, mps=True), "xpu"),
    (dict(mps=True), "mps"),
    (dict(), "cpu"),
])
def test_auto_prefers_cuda_then_xpu_then_mps_then_cpu(monkeypatch, capsys, flags, expected):
    fake_available(monkeypatch, **flags)
    monkeypatch.setattr("device.describe", lambda d: d.type)   # no real device to name
    assert pick_device("auto") == torch.device(expected)
    assert capsys.readouterr().err == f"device: {expected}\n"


def test_explicit_device_that_is_missing_is_one_clear_error(monkeypatch):
    fake_available(monkeypatch)
    for kind in ("cuda", "xpu", "mps"):
        with pytest.raises(ValueError, match=f"^device '{kind}' was asked for but is not "
                                             f"available here$"):
            pick_device(kind)
    assert pick_device("cpu", verbose=False) == torch.device("cpu")


def test_unknown_device_name():
    with pytest.raises(ValueError, match="unknown device 'tpu'; choose from auto, cpu, cuda"):
        pick_device("tpu")


def test_optimize_is_a_no_op_off_xpu():
    model, opt = torch.nn.Linear(2, 2), None
    assert optimize_for_device(model, opt, torch.device("cpu")) == (model, opt)
