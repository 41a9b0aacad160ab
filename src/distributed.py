"""Data-parallel training under torchrun: one process per device, one global batch.

`torchrun --nproc_per_node=N src/train.py ...` starts N copies of train.py with RANK,
LOCAL_RANK and WORLD_SIZE in their environment; without them every function here is the
single-process no-op, so train.py has one loop for both. Each process holds the whole dataset,
draws the same permutation and the same augmentation of each global batch (same seed), and
trains on its share of it (every N-th image); DistributedDataParallel averages the gradients,
so N processes take the steps one process would take with the same --batch-size.
"""
import contextlib
import datetime
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

# The process-group backend for each device type.
BACKENDS = {"cuda": "nccl", "xpu": "xccl", "cpu": "gloo"}


def launched_by_torchrun():
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def log(*line):
    """A line on stderr from rank 0; the other ranks train silently beside it."""
    if is_main():
        print(*line, file=sys.stderr)


def init(device, timeout_s):
    """Join the process group if torchrun launched us; returns the device this process uses
    (cuda:LOCAL_RANK / xpu:LOCAL_RANK on accelerators, the CPU otherwise). A collective that
    waits longer than `timeout_s` for another rank fails instead of hanging."""
    if not launched_by_torchrun():
        return device
    if device.type not in BACKENDS:
        raise ValueError(f"torchrun: distributed training runs on {', '.join(BACKENDS)}, "
                         f"not {device.type}")
    if device.type != "cpu":
        device = torch.device(device.type, int(os.environ.get("LOCAL_RANK", 0)))
        getattr(torch, device.type).set_device(device)
    if not dist.is_initialized():              # --runs N trains N times in one group
        dist.init_process_group(BACKENDS[device.type],
                                timeout=datetime.timedelta(seconds=timeout_s))
    return device


def lost_contact(error):
    """Whether an exception is a collective that failed: another rank died, or did not answer
    within the process group's timeout (gloo raises these as plain RuntimeErrors)."""
    return world_size() > 1 and (isinstance(error, dist.DistError) or any(
        marker in str(error) for marker in ("Timed out", "timed out", "Connection closed",
                                            "Connection reset")))


def close(together=False):
    """Leave the process group. together: every rank got here (a finished or stopped run), so
    they first wait for each other. Without that wait, a rank that exits right after its last
    all-reduce can abort ("terminate called without an active exception"): a gloo worker
    thread frees that all-reduce's tensors while the interpreter shuts down. A barrier's work
    holds no tensors, and by the time it returns the earlier work is long freed."""
    if dist.is_initialized():
        if together:
            # A rank that failed meanwhile (a write on rank 0) makes the barrier fail: the run's
            # outcome is decided already, and each rank's own line says it.
            with contextlib.suppress(RuntimeError):
                dist.barrier()
        dist.destroy_process_group()


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main():
    """Rank 0 alone writes logs, checkpoints, weights and the console output."""
    return rank() == 0


def share():
    """This rank's share of any sequence, as a slice: every world_size()-th item from rank().
    Equal shares when the length divides by the world size (train.py asks that of the batch)."""
    return slice(rank(), None, world_size())


def all_reduce_sum(tensor):
    """In place, the sum over all ranks (identity in one process)."""
    if world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def all_gather(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank (any picklable object)."""
    if world_size() == 1:
        return [obj]
    objects = [None] * world_size()
    dist.all_gather_object(objects, obj)
    return objects


def from_rank0(obj):
    """Rank 0's `obj` on every rank (any picklable object; `obj` itself in one process)."""
    if world_size() == 1:
        return obj
    objects = [obj]
    dist.broadcast_object_list(objects, src=0)
    return objects[0]


def wrap(model, device):
    """The model in DistributedDataParallel (the model itself in one process). DDP reduces the
    gradients of the parameters that require one when it is built; the set never changes
    during a run (a parameter stops training by a zero LR, see optim.make_schedulers)."""
    if world_size() == 1:
        return model
    device_ids = None if device.type == "cpu" else [device.index]
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


class _SumOverRanks(torch.autograd.Function):
    """y = the sum of x over all ranks. Every rank's y depends on every rank's x with
    derivative 1, so the gradient of x is the sum of the gradients of y over all ranks."""

    @staticmethod
    def forward(ctx, x):
        return all_reduce_sum(x.clone())

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_sum(grad.clone())


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch over all ranks.

    torch.nn.SyncBatchNorm runs only on GPUs; this reduction runs on every backend. Mean and
    variance are two all-reduces (the variance of the deviations from the global mean, as
    F.batch_norm computes it, rather than E[x^2] - mean^2, which cancels badly in float32);
    the all-reduces are differentiable, so the backward sums the gradient terms of all ranks
    exactly as one process's BatchNorm over the whole batch would."""

    def forward(self, x):
        if not (self.training and world_size() > 1):
            return super().forward(x)
        # Statistics in float32 at least, even when autocast hands over bf16 activations.
        xs = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        dims = (0, 2, 3)
        local_count = xs.new_full((1,), x.numel() // x.shape[1])     # values per channel
        sums = _SumOverRanks.apply(torch.cat([xs.sum(dims), local_count]))   # one all-reduce
        count = sums[-1].detach()
        mean = sums[:-1] / count
        centred = xs - mean.view(1, -1, 1, 1)
        var = _SumOverRanks.apply(centred.square().sum(dims)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                # momentum None: PyTorch's cumulative average over the batches seen
                m = (self.momentum if self.momentum is not None
                     else 1 / self.num_batches_tracked.item())
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
                unbiased = var * count / (count - 1)                  # as PyTorch keeps it
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        y = centred * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return y.to(x.dtype)


def global_batchnorm(model):
    """Replace every BatchNorm2d of `model` (in place) by a GlobalBatchNorm2d sharing its
    parameters and buffers: same state-dict keys, same optimiser parameters. Returns the names
    of the BatchNorm subclasses left alone (timm's BatchNormAct2d adds an activation to its
    forward): those keep each process's own batch statistics."""
    others = sorted({type(m).__name__ for m in model.modules()
                     if isinstance(m, nn.BatchNorm2d) and type(m) is not nn.BatchNorm2d})
    for name, module in list(model.named_modules()):
        if type(module) is nn.BatchNorm2d:
            synced = GlobalBatchNorm2d(module.num_features, module.eps, module.momentum,
                                       module.affine, module.track_running_stats)
            for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                setattr(synced, key, getattr(module, key))     # the same tensors, not copies
            synced.train(module.training)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, synced)
    return others

