"""How the benchmarks measure: one clock for every device (`device.stopwatch`, which waits for
the work queued on the device), medians of it, an SGD training step and epoch to time, and
peak memory."""
import os
import re
import statistics

import torch
import torch.nn.functional as F
from tqdm import tqdm

from device import stopwatch, synchronize
from precision import autocast


def timed(fn, device):
    """Seconds `fn()` takes on `device` (its queued work included)."""
    clock = stopwatch(device)
    fn()
    return clock()


def median_seconds(fn, device, warmup, repeats):
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn, device) for _ in range(repeats))


def alternating_medians(fns, device, repeats):
    """{name: median seconds of fns[name]()} over `repeats` rounds that call each in turn, so
    that drift (clocks, heat, other load) hits them all alike."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


def random_epoch(n, device):
    """(images, labels) of random data for timing training without a dataset."""
    return (torch.randn(n, 3, 32, 32, device=device),
            torch.randint(0, 10, (n,), device=device))


def sgd_step(model, device, dtype=None):
    """A function (x, y) -> None taking one SGD training step of `model` on a batch, under
    autocast to `dtype` (None: float32)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    model.train()

    def step(x, y):
        with autocast(device, dtype):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def train_epoch_seconds(model, images, labels, batch_size, device, dtype=None):
    """Seconds for one epoch of SGD steps over `images` (the first step excluded: it is where
    torch.compile compiles), and the seconds of that first step; under autocast to `dtype`
    (None: float32)."""
    train = sgd_step(model, device, dtype)

    def step(i):
        train(images[i:i + batch_size], labels[i:i + batch_size])

    first = timed(lambda: step(0), device)
    starts = range(batch_size, len(images) - batch_size + 1, batch_size)
    rest = timed(lambda: [step(i) for i in tqdm(starts, leave=False)], device)
    # Scaled to the full epoch, so that eager and compiled compare over the same steps.
    return rest * (len(starts) + 1) / max(len(starts), 1), first


def peak_bytes(fn, device):
    """Peak memory that `fn` adds over what is allocated before it runs.

    CUDA and XPU: the caching allocator's own peak counter. CPU (Linux): the process's
    resident-set high-water mark, reset through /proc/self/clear_refs; it tracks tensors
    exactly only in a process started with a fixed glibc mmap threshold (see
    conv_benchmark.cpu_peak_bytes). None elsewhere."""
    if device.type in ("cuda", "xpu"):
        backend = getattr(torch, device.type)
        synchronize(device)
        base = backend.memory_allocated(device)
        backend.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return backend.max_memory_allocated(device) - base
    if device.type != "cpu" or not os.path.exists("/proc/self/clear_refs"):
        return None

    def status(key):
        with open("/proc/self/status") as f:
            return int(re.search(key + r":\s+(\d+) kB", f.read()).group(1)) * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status("VmRSS")
    fn()
    return status("VmHWM") - base
