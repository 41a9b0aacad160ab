"""Which variant of the conv runs for a layer: a fixed default, or the fastest, measured once
per (layer shape, dtype, device) on the machine at hand, the way
`torch.backends.cudnn.benchmark` picks among cuDNN's algorithms.

Every variant computes the same convolution (the tests hold each one to `nn.Conv2d`); they
differ in speed, which differs from CPU to CPU and from layer to layer, and in how float32
rounds. So a run that must repeat another bit for bit uses the other's choices (`chosen` and
`use`: train.py keeps them in its checkpoint and gives rank 0's to every rank under torchrun),
or measures nothing (`CIFAR_CONV_MEASURE=0`, `set_measuring(False)`, train.py's
--no-conv-measure): then every layer runs `default_plan`.

The choices live in this process, like cuDNN's: `_CHOSEN` and `_SETTINGS` below are the
conv package's mutable globals, filled as layers are first met (and by `use` and
`set_measuring`), read by `chosen` and `measuring`.
"""
import functools
import os
import time
from typing import NamedTuple

import torch

from .im2col import onednn_matmul_available, output_hw
from .regions import output_regions, skips_padding

MEASURE_SWITCH = "CIFAR_CONV_MEASURE"   # 0: no measuring, every layer runs its default plan
CHUNK_MIB = (1, 4, 16)                  # the im2col chunk caps tried (4 is the default)
MEASURE_IMAGES = 128                    # a layer is timed on at most this many images
BETTER_BY = 0.95                        # a variant replaces the best so far only if 5 % faster


class Plan(NamedTuple):
    """The variant of the conv that runs for one layer shape."""
    onednn: bool      # products through oneDNN's matmul op (else torch.mm/addmm, MKL on CPUs)
    split: bool       # the output split by the kernel taps that read padding (else one padded
    #                   copy of the input; regions.py), in the forward and grad W; the grad x
    #                   correlation splits by its own padding's share, as `conv_source` rules
    correlate: bool   # stride-1 grad x as a correlation of grad y (else grad y @ W, then fold)
    chunk_mib: int    # the cap on one chunk's im2col matrix, MiB (im2col.images_per_chunk)
    whole: bool = False   # the accelerator form: chunks as large as chunk_mib allows (else
    #                   no larger than the input, for the CPU's caches), and no split in grad x
    #                   either where `split` is off (else as its own padding's share rules)


_CHOSEN = {}          # key (`plan_key`) -> Plan, for this process; see the module docstring
_SETTINGS = {"measure": None}   # None: as MEASURE_SWITCH says (on unless it is 0)


@functools.lru_cache(maxsize=4096)
def default_plan(x_shape, weight_shape, stride, pads, dilation, dtype, device):
    """The fixed choice. On the CPU, from rules measured on an AMD EPYC
    (docs/conv_performance.md): oneDNN's matmul where it runs this dtype, the region split
    where it skips 10 % of the products, grad x by correlation unless the layer widens more
    than 2x, 4 MiB chunks. On accelerators (and `meta`), the fewest kernel launches: one
    padded copy, no split, and chunks as large as `accelerator_chunk_mib` allows (the whole
    batch, as a rule), since each launch costs microseconds of the host's time whatever the
    GPU's speed, while caches matter less."""
    out_c, kernel = weight_shape[0], tuple(weight_shape[2:])
    correlate = stride == (1, 1) and out_c <= 2 * x_shape[1]
    if device.type != "cpu":
        return Plan(onednn=False, split=False, correlate=correlate,
                    chunk_mib=accelerator_chunk_mib(device), whole=True)
    out_hw = output_hw(x_shape, kernel, stride, pads, dilation)
    regions = output_regions(x_shape[2:], kernel, stride, pads, dilation, out_hw)
    return Plan(onednn=onednn_matmul_available(dtype),
                split=skips_padding(regions, kernel, out_hw), correlate=correlate, chunk_mib=4)


ACCELERATOR_SHARE = 8        # an im2col chunk takes at most 1/8 of the free device memory
UNKNOWN_FREE_MIB = 8 * 1024   # assumed free where the device cannot say (meta, mps)


@functools.lru_cache(maxsize=None)
def accelerator_chunk_mib(device):
    """The cap on one im2col chunk on an accelerator: ACCELERATOR_SHARE of the memory free on
    `device` when its first conv runs (fast94's largest whole-batch im2col is 405 MiB at batch
    1024 in bf16, fast96's 506 MiB). Read once per device and process: the caching allocator
    keeps what it took, so later readings would mostly see the run's own tensors."""
    backend = getattr(torch, device.type, None)
    free = None
    if hasattr(backend, "mem_get_info"):
        try:
            free = backend.mem_get_info(device)[0]
        except (RuntimeError, AssertionError):   # a build or driver that cannot tell
            free = None
    free_mib = UNKNOWN_FREE_MIB if free is None else free // 2 ** 20
    return max(4, free_mib // ACCELERATOR_SHARE)


def plan_key(x, weight, stride, pads, dilation, groups):
    """What a choice is kept under: the layer's shape but the batch size, the input's layout
    (" cl": channels_last), its dtype and the device type, as one string (a checkpoint stores
    it as such)."""
    layout = " cl" if channels_last(x) else ""
    return (f"x{tuple(x.shape[1:])}{layout} w{tuple(weight.shape)} s{tuple(stride)} "
            f"p{tuple(pads)} d{tuple(dilation)} g{groups} "
            f"{str(x.dtype).replace('torch.', '')} {x.device.type}")


def channels_last(x):
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def measuring():
    """Whether layers met for the first time are measured (else they run `default_plan`)."""
    if _SETTINGS["measure"] is not None:
        return _SETTINGS["measure"]
    switch = os.environ.get(MEASURE_SWITCH, "1")
    if switch not in ("0", "1"):
        raise ValueError(f"{MEASURE_SWITCH} must be 0 or 1, got {switch!r}")
    return switch == "1"


def set_measuring(enabled):
    """Turn measuring on or off for this process (None: back to MEASURE_SWITCH)."""
    _SETTINGS["measure"] = enabled


def chosen():
    """This process's choices, {key: [onednn, split, correlate, chunk_mib, whole]}: plain
    values, so that a checkpoint loads them with weights_only=True."""
    return {key: list(plan) for key, plan in _CHOSEN.items()}


def use(choices):
    """Replace this process's choices by `choices` (as from `chosen`); layers not in them run
    their default plan unless measuring is on."""
    _CHOSEN.clear()
    _CHOSEN.update({key: Plan(*plan) for key, plan in choices.items()})


def plan_for(x, weight, bias, stride, pads, dilation, groups, conv):
    """The plan for this call of `conv` (UnfoldMatmulConv.apply): the one chosen for its key, or
    measured now (CPU only, not while torch.jit.trace traces), or the default; torch.compile and
    torch.export never get here (`functions._apply_conv`)."""
    key = plan_key(x, weight, stride, pads, dilation, groups)
    if key in _CHOSEN:
        return _CHOSEN[key]
    default = default_plan(tuple(x.shape), tuple(weight.shape), tuple(stride), tuple(pads),
                           tuple(dilation), x.dtype, x.device)
    if x.device.type != "cpu" or torch.jit.is_tracing() or not measuring():
        return default
    _CHOSEN[key] = fastest_plan(default, x, weight, bias, stride, pads, dilation, groups, conv)
    return _CHOSEN[key]


def variations(default, stride, pads, groups, grad_x):
    """(field, values) of the plan worth trying for a layer: the others change nothing."""
    fields = []
    if default.onednn and groups == 1:   # oneDNN where it runs this dtype; grouped: bmm
        fields.append(("onednn", (True, False)))
    if min(pads) >= 0 and max(pads) > 0:
        fields.append(("split", (True, False)))
    if stride == (1, 1) and grad_x:
        fields.append(("correlate", (True, False)))
    fields.append(("chunk_mib", CHUNK_MIB))
    return fields


def fastest_plan(default, x, weight, bias, stride, pads, dilation, groups, conv):
    """Time the variants on random data of the layer's shape (at most MEASURE_IMAGES images,
    the RNG of the process untouched) and return the fastest. One field at a time, from the
    default: each value is tried against the best plan so far (2-5 trials, not 24 plans)."""
    call = timed_call(x, weight, bias, stride, pads, dilation, groups, conv)
    grad_x = torch.is_grad_enabled() and x.requires_grad
    best = default
    for field, values in variations(default, stride, pads, groups, grad_x):
        for value in values:
            plan = best._replace(**{field: value})
            if plan != best and faster(call, plan, best):
                best = plan
    return best


def faster(call, plan, best):
    """Whether `plan` beats `best` by BETTER_BY: one warm-up call each, then three calls of
    each in alternation (so that a machine's drift hits both), their fastest compared."""
    call(plan)
    call(best)
    times = {plan: [], best: []}
    for _ in range(3):
        for p in (plan, best):
            times[p].append(call(p))
    return min(times[plan]) < BETTER_BY * min(times[best])


def timed_call(x, weight, bias, stride, pads, dilation, groups, conv):
    """A function plan -> seconds of one call of the conv with that plan on random data of the
    layer's shape: forward and backward for a call that builds a graph, else forward."""
    gen = torch.Generator(x.device).manual_seed(0)
    shape = (min(x.shape[0], MEASURE_IMAGES), *x.shape[1:])
    layout = torch.channels_last if channels_last(x) else torch.contiguous_format
    xs = torch.randn(shape, generator=gen, dtype=x.dtype, device=x.device).contiguous(
        memory_format=layout)
    training = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    xs.requires_grad_(training and x.requires_grad)
    ws = weight.detach().clone().requires_grad_(training and weight.requires_grad)
    bs = None if bias is None else bias.detach().clone().requires_grad_(
        training and bias.requires_grad)

    def call(plan):
        start = time.perf_counter()
        with torch.enable_grad() if training else torch.no_grad():
            y = conv(xs, ws, bs, stride, pads, dilation, groups, plan)
            if training:
                y.backward(torch.ones_like(y))
        return time.perf_counter() - start
    return call
