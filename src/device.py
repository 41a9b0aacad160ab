"""Pick the compute device: cuda, then Intel xpu, then Apple mps, then cpu."""
import sys
import time

import torch

CHOICES = ("auto", "cpu", "cuda", "xpu", "mps")


def available(kind):
    if kind == "cpu":
        return True
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "xpu":  # native torch.xpu (PyTorch >= 2.4); IPEX is optional
        return hasattr(torch, "xpu") and torch.xpu.is_available()
    if kind == "mps":
        return hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    return False


def pick_device(requested="auto", verbose=True):
    """The torch.device for a --device flag; ValueError (one line) if it is not there."""
    if requested not in CHOICES:
        raise ValueError(f"unknown device {requested!r}; choose from {', '.join(CHOICES)}")
    if requested == "auto":
        kind = next(k for k in ("cuda", "xpu", "mps", "cpu") if available(k))
    elif available(requested):
        kind = requested
    else:
        raise ValueError(f"device {requested!r} was asked for but is not available here")
    device = torch.device(kind)
    if verbose:
        print(f"device: {describe(device)}", file=sys.stderr)
    return device


def describe(device):
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "xpu":
        return f"xpu ({torch.xpu.get_device_name(device)})"
    return device.type


def optimize_for_device(model, optimizer, device):
    """On XPU, apply Intel Extension for PyTorch where it is installed (it is end-of-life
    upstream, so plain torch.xpu is the normal path); elsewhere a no-op."""
    if device.type != "xpu":
        return model, optimizer
    try:
        import intel_extension_for_pytorch as ipex
    except ImportError:
        return model, optimizer
    if optimizer is None:
        return ipex.optimize(model), None
    return ipex.optimize(model, optimizer=optimizer)


def stopwatch(device):
    """A function that returns the seconds since this call; on CUDA read from device events,
    i.e. the GPU's own clock once all work queued so far has run."""
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        start.record()

        def elapsed():
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000
        return elapsed
    begin = time.perf_counter()
    return lambda: time.perf_counter() - begin
