"""Pick the arithmetic precision: bf16 autocast where the hardware multiplies bf16 fast.

Mixed precision in the usual sense: under `autocast` the matrix products (the hand-written
conv's, the linear layers') run in bf16 with float32 accumulation, while the master weights,
the optimiser state, BatchNorm's statistics, the loss and the saved weights stay float32.
"""
import os

import torch

CHOICES = ("auto", "fp32", "bf16")
# Set to amx, avx512_bf16 or none to say which bf16 matrix unit this CPU has, whatever torch
# detects (tests use it to take every branch of `auto` on any machine; ONEDNN_MAX_CPU_ISA
# changes oneDNN's kernels, not what torch reports about the hardware).
BF16_OVERRIDE = "CIFAR_CPU_BF16"
BF16_UNITS = {"amx": "AMX", "avx512_bf16": "AVX512-BF16", "none": None}


def cpu_has(feature):
    """Whether this CPU has `feature` ("amx_tile" or "avx512_bf16"), as torch detects it
    (torch.cpu._is_<feature>_supported, present in torch 2.3 and later)."""
    check = getattr(torch.cpu, f"_is_{feature}_supported", None)
    return bool(check()) if check is not None else False


def cpu_bf16_unit():
    """"AMX", "AVX512-BF16" or None: the fastest unit this CPU multiplies bf16 matrices with
    (AMX's tiles several times float32's rate; AVX512-BF16's dot products about twice)."""
    override = os.environ.get(BF16_OVERRIDE)
    if override:
        if override not in BF16_UNITS:
            raise ValueError(f"{BF16_OVERRIDE} must be one of {', '.join(BF16_UNITS)}, "
                             f"got {override!r}")
        return BF16_UNITS[override]
    if cpu_has("amx_tile"):
        return "AMX"
    return "AVX512-BF16" if cpu_has("avx512_bf16") else None


def pick_precision(flag, device):
    """(autocast dtype or None for float32, the reason in a few words) for a --precision flag.

    auto is bf16 on CUDA (tensor cores) and on CPUs that multiply bf16 natively (AMX or
    AVX512-BF16: a fast94 training step in bf16 took 0.44x float32's time on an AMD EPYC with
    AVX512-BF16), float32 elsewhere: without those units bf16 is emulated, many times slower
    than float32."""
    if flag not in CHOICES:
        raise ValueError(f"unknown precision {flag!r}; choose from {', '.join(CHOICES)}")
    if flag == "fp32":
        return None, "--precision fp32"
    unit = cpu_bf16_unit() if device.type == "cpu" else None
    if flag == "bf16":
        if device.type not in ("cpu", "cuda", "xpu"):
            raise ValueError(f"--precision bf16 is not supported on {device.type}")
        if device.type == "cpu" and unit is None:
            return torch.bfloat16, "--precision bf16; no AMX or AVX512-BF16 here: slow"
        return torch.bfloat16, "--precision bf16"
    if device.type == "cuda":
        return torch.bfloat16, "CUDA"
    if unit is not None:
        return torch.bfloat16, unit
    where = "this CPU has no AMX or AVX512-BF16" if device.type == "cpu" else device.type
    return None, where


def disable_tf32(device):
    """Switch TF32 off for this process on CUDA, so that float32 means float32 in both convs;
    the words that say so, or "" elsewhere.

    By default cuDNN computes float32 convolutions in TF32 (a 10-bit mantissa) while cuBLAS,
    which runs the hand-written conv's matmuls, computes in true float32: a comparison of the
    two would not be like for like. bf16 runs are untouched."""
    if device.type != "cuda":
        return ""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return "TF32 off in cuBLAS and cuDNN"


def describe(dtype, reason):
    """The start line's words: "precision: bf16 (AVX512-BF16)"."""
    return f"precision: {'bf16' if dtype == torch.bfloat16 else 'fp32'} ({reason})"


def autocast(device, dtype):
    """The autocast context for a precision picked by `pick_precision` (off for float32)."""
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
