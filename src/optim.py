"""The optimisers: SGD parameter groups (airbench's decoupled LR and weight decay, faster
BatchNorm shifts, a pretrained backbone slower than its new head), torch.optim.Muon for the
conv filters, the LR schedule, and airbench's lookahead."""
import functools
import math

import torch

from model import FastNet
from pretrained import classifier


LOOKAHEAD_EVERY = 5          # steps between lookahead pulls (airbench)
MUON_MOMENTUM = 0.6          # --optimizer muon: airbench94_muon's momentum for the conv filters


def sgd_rates(lr, weight_decay, batch_size, momentum, decoupled):
    """(LR, weight decay) as SGD takes them. With `decoupled` (airbench), lr and weight decay
    are per 1024 examples and divided by 1 + 1/(1 - momentum), as airbench does (1/(1 -
    momentum) is how much momentum amplifies a step): the LR scales with the batch size, and
    the fraction of each weight decayed per step does not depend on the LR."""
    if not decoupled:
        return lr, weight_decay
    return lr * batch_size / 1024 / (1 + 1 / (1 - momentum)), weight_decay / lr


def optimizer_groups(params, lr, wd, bias_lr_scale, head=(), backbone_lr_scale=1.0,
                     frozen_later=(), trains_epochs=0):
    """SGD parameter groups from (module, parameter) pairs: BatchNorm shifts at `bias_lr_scale`
    times the LR (with the same decay per step), everything else at the LR. With `head` (the
    new classifier of a pretrained backbone), the head trains at the LR and everything else at
    `backbone_lr_scale` times it. `frozen_later` get a group of their own, marked to train for
    `trains_epochs` (see make_schedulers)."""
    head_ids, later_ids = {id(p) for p in head}, {id(p) for p in frozen_later}
    body = [(m, p) for m, p in params if id(p) not in head_ids | later_ids]
    shifts = [p for module, p in body if isinstance(module, torch.nn.BatchNorm2d)]
    others = [p for module, p in body if not isinstance(module, torch.nn.BatchNorm2d)]
    scale = backbone_lr_scale if head_ids else 1.0
    groups = [{"params": others, "lr": lr * scale, "weight_decay": wd},
              {"params": shifts, "lr": lr * scale * bias_lr_scale,
               "weight_decay": wd / bias_lr_scale}]
    if head_ids:
        groups.append({"params": [p for _, p in params if id(p) in head_ids], "lr": lr,
                       "weight_decay": wd, "head": True})
    if later_ids:
        groups.append({"params": list(frozen_later), "lr": lr, "weight_decay": wd,
                       "trains_epochs": trains_epochs})
    return groups


class FilterMuon(torch.optim.Muon):
    """torch.optim.Muon for conv filters. Muon takes matrices only, so each filter
    (O, C, kh, kw) steps as a matrix (O, C*kh*kw) sharing its storage: Muon's in-place update
    of the matrix is the update of the filter, and `step` hands it the filter's gradient."""

    def __init__(self, filters, **kwargs):
        self.filters = list(filters)
        super().__init__([torch.nn.Parameter(f.detach().view(f.shape[0], -1))
                          for f in self.filters], **kwargs)

    def zero_grad(self, set_to_none=True):
        super().zero_grad(set_to_none)
        for f in self.filters:                 # the filters are no optimiser's parameters
            if set_to_none:
                f.grad = None
            elif f.grad is not None:
                f.grad.zero_()

    @torch.no_grad()
    def step(self, closure=None):
        for f, matrix in zip(self.filters, self.param_groups[0]["params"]):
            matrix.grad = None if f.grad is None else f.grad.view_as(matrix)
        return super().step(closure)


def make_optimizers(model, args):
    """[SGD], or with --optimizer muon [SGD, FilterMuon] (Muon for the conv filters); the one
    reader of the run's optimiser flags."""
    params = [(model.get_submodule(name.rpartition(".")[0]), p)
              for name, p in model.named_parameters() if p.requires_grad]
    filters = []
    if args.optimizer == "muon":
        filters = [p for _, p in params if p.ndim == 4]
        params = [(module, p) for module, p in params if p.ndim != 4]
    # A pretrained backbone's new classifier trains at the full LR, the rest slower.
    head = list(classifier(model.net).parameters()) if args.pretrained else []
    # The fast nets' whitening bias trains for whiten_bias_epochs, then stops (make_schedulers).
    frozen_later = [dict(model.named_parameters())["whiten.bias"]] \
        if args.whiten_bias_epochs and isinstance(model, FastNet) else []
    lr, wd = sgd_rates(args.lr, args.weight_decay, args.batch_size, args.momentum,
                       args.decoupled)
    groups = optimizer_groups(params, lr, wd, args.bias_lr_scale, head, args.backbone_lr_scale,
                              frozen_later, args.whiten_bias_epochs)
    optimizers = [torch.optim.SGD(groups, momentum=args.momentum, nesterov=True)]
    if filters:
        optimizers.append(FilterMuon(filters, lr=args.muon_lr, momentum=MUON_MOMENTUM,
                                     nesterov=True, weight_decay=0.0))
    return optimizers


def logged_lr(optimizers):
    """The LR a run logs: the one --lr sets, as scheduled now. With --pretrained that is the
    new head's; the backbone's is backbone_lr_scale of it."""
    groups = optimizers[0].param_groups
    return next((g["lr"] for g in groups if g.get("head")), groups[0]["lr"])


def make_schedulers(optimizers, steps_per_epoch, factor):
    """One LambdaLR per optimiser: every group's LR is `factor(step)` times its peak, except a
    group marked `trains_epochs`, whose LR drops to 0 after that many epochs (its weights stay
    as they are; airbench freezes the whitening bias this way)."""
    def factor_for(group):
        last = group.get("trains_epochs", math.inf) * steps_per_epoch
        return lambda step: factor(step) if step < last else 0.0
    return [torch.optim.lr_scheduler.LambdaLR(opt, [factor_for(g) for g in opt.param_groups])
            for opt in optimizers]


def stop_ended_gradients(optimizers, epoch):
    """A group marked `trains_epochs` stops getting gradients once that many epochs are done
    (its LR is 0 from then on, `make_schedulers`, so its weights come out the same): the
    backward then skips what only it needs. For the fast nets' whitening bias that is the
    whitening conv's backward and the grad x of the conv after it, about a tenth of fast94's
    epoch on the CPU (docs/conv_performance.md). Call it as each epoch starts, in one process
    only: DistributedDataParallel expects a gradient for every parameter it wraps."""
    for opt in optimizers:
        for group in opt.param_groups:
            if "trains_epochs" in group:
                for p in group["params"]:
                    p.requires_grad_(epoch < group["trains_epochs"])


def gradient_epochs(optimizers, start, end):
    """The epochs of start..end-1 from which `stop_ended_gradients` gives another set of
    parameters gradients, `start` first: a compiled step is another graph from each on."""
    ends = {g["trains_epochs"] for opt in optimizers for g in opt.param_groups
            if "trains_epochs" in g}
    return [start] + sorted(e for e in ends if start < e < end)


def lr_schedule(args, total):
    """`lr_factor` over `total` steps with the run's --warmup, --lr-start, --lr-end, --decay."""
    return functools.partial(lr_factor, total=total, warmup=args.warmup,
                             lr_start=args.lr_start, lr_end=args.lr_end, decay=args.decay)


def lr_factor(step, total, warmup, lr_start, lr_end, decay):
    """The LR schedule, as a fraction of the peak: lr_start -> 1 linearly over the `warmup`
    fraction of the `total` steps, then 1 -> lr_end at the last step, linearly or along a half
    cosine (decay "linear" or "cosine")."""
    warmup = max(1, int(total * warmup))
    if step < warmup:
        return lr_start + (1 - lr_start) * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
    if decay == "cosine":
        return lr_end + (1 - lr_end) * (1 + math.cos(math.pi * progress)) / 2
    return 1 + (lr_end - 1) * progress


class Lookahead:
    """airbench's lookahead: every LOOKAHEAD_EVERY steps a slow copy of the floating-point
    state (weights and BatchNorm statistics) moves toward the model's (an EMA whose decay rises
    as (step/total)^3), and the model is reset to it; the final weights are the slow ones."""

    def __init__(self, model, total_steps):
        self.model, self.total = model, total_steps
        self.slow = [t.clone() for t in lookahead_state(model)]

    def step(self, global_step):
        """After optimiser step number `global_step` (counted from 1)."""
        if global_step % LOOKAHEAD_EVERY == 0:
            lookahead_pull(self.model, self.slow, lookahead_decay(global_step, self.total))

    def finish(self):
        lookahead_pull(self.model, self.slow, 1.0)

    def state_dict(self):
        return {"slow": [t.cpu() for t in self.slow]}

    def load_state_dict(self, state):
        torch._foreach_copy_(self.slow, [t.to(self.slow[0].device) for t in state["slow"]])


def lookahead_state(model):
    """The floating-point tensors of the state dict (weights and BatchNorm statistics)."""
    return [t for t in model.state_dict().values() if t.is_floating_point()]


@torch.no_grad()
def lookahead_pull(model, slow, decay):
    """Lookahead: the slow copy moves toward the weights (an EMA with this decay), then the
    weights are reset to it. Decay 1 returns the weights to the slow copy unchanged."""
    fast = lookahead_state(model)
    torch._foreach_lerp_(slow, fast, 1 - decay)
    torch._foreach_copy_(fast, slow)


def lookahead_decay(step, total):
    """airbench's schedule: no averaging early on, rising as (step/total)^3 to 0.95^5."""
    return 0.95 ** LOOKAHEAD_EVERY * (step / total) ** 3
