"""Pick the arithmetic precision: bf16 autocast where the hardware multiplies bf16 fast.

Mixed precision in the usual sense: under `autocast` the matrix products (the hand-written
conv's, the linear layers') run in bf16 with float32 accumulation, while the master weights,
the optimiser state, BatchNorm's statistics, the loss and the saved weights stay float32.
"""
import os

import torch

CHOICES = ("auto", "fp32", "bf16")
# Set to 1 or 0 to say whether this CPU has AMX, whatever torch detects (tests use it to take
# both branches of `auto` on any machine; ONEDNN_MAX_CPU_ISA changes oneDNN's kernels, not what
# torch reports about the hardware).
AMX_OVERRIDE = "CIFAR_CPU_AMX"


def cpu_has(feature):
    """Whether this CPU has `feature` ("amx_tile" or "avx512_bf16"), as torch detects it
    (torch.cpu._is_<feature>_supported, present in torch 2.3 and later)."""
    check = getattr(torch.cpu, f"_is_{feature}_supported", None)
    return bool(check()) if check is not None else False


def cpu_has_amx():
    override = os.environ.get(AMX_OVERRIDE)
    if override:
        if override not in ("0", "1"):
            raise ValueError(f"{AMX_OVERRIDE} must be 0 or 1, got {override!r}")
        return override == "1"
    return cpu_has("amx_tile")


def pick_precision(flag, device):
    """(autocast dtype or None for float32, the reason in a few words) for a --precision flag.

    auto is bf16 on CUDA (tensor cores) and on CPUs with AMX (bf16 matmuls several times
    float32's rate), float32 elsewhere: with AVX512-BF16 alone bf16 gains less, and without it
    bf16 is emulated, many times slower than float32."""
    if flag not in CHOICES:
        raise ValueError(f"unknown precision {flag!r}; choose from {', '.join(CHOICES)}")
    if flag == "fp32":
        return None, "--precision fp32"
    if flag == "bf16":
        if device.type not in ("cpu", "cuda", "xpu"):
            raise ValueError(f"--precision bf16 is not supported on {device.type}")
        if device.type == "cpu" and not (cpu_has_amx() or cpu_has("avx512_bf16")):
            return torch.bfloat16, "--precision bf16; no AMX or AVX512-BF16 here: slow"
        return torch.bfloat16, "--precision bf16"
    if device.type == "cuda":
        return torch.bfloat16, "CUDA"
    if device.type == "cpu" and cpu_has_amx():
        return torch.bfloat16, "AMX"
    where = "this CPU has no AMX" if device.type == "cpu" else device.type
    return None, where


def describe(dtype, reason):
    """The start line's words: "precision: bf16 (AMX)"."""
    return f"precision: {'bf16' if dtype == torch.bfloat16 else 'fp32'} ({reason})"


def autocast(device, dtype):
    """The autocast context for a precision picked by `pick_precision` (off for float32)."""
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
