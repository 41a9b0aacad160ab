"""Pick the compute device: cuda, then Intel xpu, then Apple mps, then cpu."""
import ctypes
import importlib.metadata
import os
import platform
import sys
import time

import torch

from precision import cpu_has

CHOICES = ("auto", "cpu", "cuda", "xpu", "mps")
KEEP_SWITCH = "CIFAR_KEEP_FREED_MEMORY"   # 0: glibc's malloc as it comes (keep_freed_memory)


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


# mallopt's parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def keep_freed_memory(device):
    """On the CPU, tell glibc's malloc to keep the memory a training step frees for the next
    step; whether it did.

    By default glibc serves every block above 32 MiB from a fresh mapping and unmaps it when
    it is freed, so every step faults in (and the kernel zeroes) the pages of its large
    tensors again: a quarter of the hand-written fast94's step on one CPU
    (docs/conv_performance.md, "Memory kept"). With no mappings (M_MMAP_MAX 0) and a trim
    threshold of 2 GiB, freed blocks stay in the heap and are reused. The cost: the process
    keeps its peak memory until it exits, which is why only train.py, benchmark.py and
    reproduce.py ask for it. Nothing changes on other devices, where the C library is not
    glibc (macOS, musl), or with CIFAR_KEEP_FREED_MEMORY=0."""
    if (device.type != "cpu" or os.environ.get(KEEP_SWITCH) == "0"
            or not hasattr(os, "confstr") or "glibc" not in gnu_libc()):
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))


def gnu_libc():
    """"glibc 2.36" and the like where the C library is glibc, else ""."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):
        return ""


def describe(device):
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "xpu":
        return f"xpu ({torch.xpu.get_device_name(device)})"
    return device.type


def machine(device):
    """The GPU's name, or the CPU's model with what it has for bf16, and its threads."""
    if device.type != "cpu":
        return describe(device)
    model = platform.processor() or "CPU"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), model)
    has = [name for name, flag in (("AMX", "amx_tile"), ("AVX512-BF16", "avx512_bf16"))
           if cpu_has(flag)]
    return (f"{model}, {torch.get_num_threads()} threads, "
            + (" and ".join(has) if has else "no AMX, no AVX512-BF16"))


def optimize_for_device(model, optimizers, device):
    """On XPU, Intel Extension for PyTorch's `ipex.optimize` where a build for this torch is
    installed (IPEX is end-of-life upstream, so plain torch.xpu is the normal path): (the model
    it returns, the optimisers, a note or None). It takes one optimiser and returns a copy of
    the model, so with two (--optimizer muon) it is skipped: the second would go on stepping
    the old model's filters. Elsewhere the model and optimisers as they are."""
    if device.type != "xpu":
        return model, optimizers, None
    problem = ipex_problem()
    if problem == "not installed":
        return model, optimizers, None
    if problem is None and len(optimizers) > 1:
        problem = f"it takes one optimiser, this run has {len(optimizers)}"
    if problem is None:
        try:
            import intel_extension_for_pytorch as ipex
        except (ImportError, OSError) as e:     # a runtime library missing, say
            problem = f"its import failed: {type(e).__name__}: {str(e).splitlines()[0]}"
    if problem is not None:
        return model, optimizers, f"intel_extension_for_pytorch not used: {problem}"
    model, optimizer = ipex.optimize(model, optimizer=optimizers[0])
    return model, [optimizer], None


def ipex_problem():
    """Why IPEX cannot be used here (not installed, or built for another torch: importing such
    a build ends the process, exit 127, rather than raising), or None. Read from the installed
    packages' metadata, before anything is imported."""
    try:
        ipex_version = importlib.metadata.version("intel_extension_for_pytorch")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
    if ipex_version.split(".")[:2] != torch.__version__.split(".")[:2]:
        return (f"version {ipex_version} is built for torch "
                f"{'.'.join(ipex_version.split('.')[:2])}, this is torch {torch.__version__}")
    return None


def synchronize(device):
    """Wait until the work queued on `device` has run (cuda, xpu, mps; a no-op on the CPU)."""
    if device.type in ("cuda", "xpu"):
        getattr(torch, device.type).synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()            # one device, no argument


def stopwatch(device):
    """A function that returns the seconds since this call, once the work queued on the device
    by then has run (see `synchronize`): the device's time, not only the host's."""
    synchronize(device)
    begin = time.perf_counter()

    def elapsed():
        synchronize(device)
        return time.perf_counter() - begin
    return elapsed
