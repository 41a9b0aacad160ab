"""Train a CIFAR network whose convolutions are written by hand.

    python src/train.py --preset seed --data-dir data      # or fast94, fast95, fast96

The whole dataset sits on the training device as one uint8 tensor; each step indexes a batch
out of this epoch's permutation, normalises and augments it there, and takes one SGD step
(the fast presets add airbench's whitening init, lookahead and test-time augmentation).
Every epoch logs to TensorBoard (in the run folder) and writes a checkpoint atomically, so
`--resume RUN_DIR` continues exactly where an interrupted run stopped. The same script runs
data-parallel under `torchrun --nproc_per_node=N` (see distributed.py).
"""
import argparse
import contextlib
import math
import os
import shutil
import signal
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import cli
import distributed
from data import (DATASETS, DataError, augment, channel_stats, load_cifar, load_torch_file,
                  normalize, one_hot, stratified_split)
from device import CHOICES as DEVICES, describe, optimize_for_device, pick_device
from precision import CHOICES as PRECISIONS, autocast as precision_autocast, pick_precision
from precision import describe as describe_precision
from model import MODELS, TTA_LEVELS, build_model, predict_logits
from pretrained import BACKBONES, PretrainedError, classifier, load_backbone

# Hyperparameters per preset, in one place. Flags given on the command line override them.
# "decoupled": lr and weight decay are given per 1024 examples as airbench does, so that they
# hold whatever the batch size (see `optimizer_groups`); otherwise they are PyTorch's own.
PRESETS = {
    "seed": {
        "model": "seed",
        "epochs": 25,
        "batch_size": 128,
        "lr": 0.05,              # peak learning rate (SGD, Nesterov momentum 0.9)
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "decoupled": False,
        "bias_lr_scale": 1.0,
        "label_smoothing": 0.1,  # soft one-hot targets: a little less over-confidence
        "warmup": 0.15,          # fraction of all steps spent ramping the LR up; the rest decays
        # Without BatchNorm the first steps' gradients are large, and short runs diverged at
        # the peak LR on some CPUs; clipped, they train at 4x the LR (README, seed network).
        "grad_clip": 5.0,        # gradient-norm clipping (0: none)
        "lr_start": 0.1,         # LR at the first step and at the last, as fractions of the peak
        "lr_end": 0.001,
        "decay": "linear",       # the shape of the decay after the warm-up: linear or cosine
        "backbone_lr_scale": 1.0,  # --pretrained: the backbone's LR as a fraction of the head's
        "crop_pad": 4,           # random crops from a 4-pixel zero-padded image, plus flips
        "pad_mode": "constant",
        "flip": "random",
        "cutout": 0,
        "lookahead": False,
        "whiten_bias_epochs": 0,
        "val_size": 5000,
        "tta": 0,
        "optimizer": "sgd",
    },
    # airbench94's recipe (94.01 % on the official test set in 9.9 epochs), run for 12 epochs:
    # the JPEG copy costs about 3 points, and two more epochs win a little of that back.
    "fast94": {
        "model": "fast94",
        "epochs": 12,
        "batch_size": 1024,
        "lr": 11.5,              # per 1024 examples, decoupled (an SGD LR of 1.5 at batch 1024)
        "momentum": 0.85,
        "weight_decay": 0.0153,  # per 1024 examples, decoupled from the LR
        "decoupled": True,
        "bias_lr_scale": 64.0,   # BatchNorm shifts learn 64x faster (no extra decay)
        "label_smoothing": 0.2,
        "warmup": 0.23,
        "lr_start": 0.2,
        "lr_end": 0.07,
        "decay": "linear",
        "backbone_lr_scale": 1.0,
        "crop_pad": 2,           # translations of up to 2 pixels, reflect-padded
        "pad_mode": "reflect",
        "flip": "alternating",   # each image mirrored in every other epoch
        "cutout": 0,
        "lookahead": True,       # every 5 steps the weights move to an EMA of themselves
        "whiten_bias_epochs": 3,  # the whitening conv's bias trains this long, then freezes
        "val_size": 0,           # all 50,000 training images train, as in airbench
        "tta": 2,                # mirror + translations at test time
        "optimizer": "sgd",
        "grad_clip": 0.0,
    },
}
# Wider (airbench95: widths 128/384/384, 15 epochs, a lower LR) and residual (airbench96:
# 10 convs, 12-pixel cutout, 4-pixel translations, LR x 0.78, 40 epochs) variants.
PRESETS["fast95"] = {**PRESETS["fast94"], "model": "fast95", "epochs": 15, "lr": 10.0}
PRESETS["fast96"] = {**PRESETS["fast94"], "model": "fast96", "epochs": 40, "lr": 9.0,
                     "cutout": 12, "crop_pad": 4}
# ResNet-18 for CIFAR-100 (the usual 200-epoch recipe: SGD 0.1, weight decay 5e-4, cosine
# decay) with an 8-pixel cutout (DeVries & Taylor's size for CIFAR-100), on all 50,000 images.
PRESETS["resnet18"] = {**PRESETS["seed"], "model": "resnet18", "epochs": 200, "lr": 0.1,
                       "label_smoothing": 0.0, "warmup": 0.01, "lr_end": 0.0,
                       "decay": "cosine", "cutout": 8, "val_size": 0, "grad_clip": 0.0}
# Fine-tuning an ImageNet backbone (--pretrained): a short warm-up, the new head at the full
# LR and the pretrained layers at a fifth of it, cosine decay, label smoothing, translations
# and flips. The backbone's own BatchNorm statistics adapt with the default momentum.
PRESETS["finetune"] = {**PRESETS["seed"], "model": "efficientnet_lite0", "epochs": 10,
                       "batch_size": 128, "lr": 0.05, "weight_decay": 5e-5, "warmup": 0.05,
                       "lr_start": 0.1, "lr_end": 0.0, "decay": "cosine",
                       "backbone_lr_scale": 0.2, "tta": 1, "grad_clip": 0.0}

LOOKAHEAD_EVERY = 5          # steps between lookahead pulls (airbench)
MUON_MOMENTUM = 0.6          # --optimizer muon: airbench94_muon's momentum for the conv filters

CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "epoch", "rng", "args")


def get_args(argv=None):
    p = cli.parser(__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="hyperparameters and network (default: that of --model, else seed)")
    p.add_argument("--model", choices=sorted(MODELS), help="default: the preset's")
    p.add_argument("--pretrained", choices=sorted(BACKBONES),
                   help="fine-tune this ImageNet backbone (preset finetune unless --preset)")
    p.add_argument("--image-size", type=int,
                   help="--pretrained: resolution the 32x32 images are resized to (default: "
                        "the backbone's, 224; 260 for efficientnet_lite2)")
    p.add_argument("--conv", default="hand", choices=("hand", "native"),
                   help="hand: every convolution is the hand-written one; native: nn.Conv2d "
                        "(for comparison)")
    p.add_argument("--dataset", default="cifar10", choices=sorted(DATASETS))
    p.add_argument("--epochs", type=int, help="default: the preset's (25 for seed)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--label-smoothing", type=float)
    p.add_argument("--grad-clip", type=float,
                   help="clip the gradients' global norm to this (0: no clipping; default: the "
                        "preset's, 5 for seed)")
    p.add_argument("--cutout", type=int, help="side of the cutout square (0: none)")
    p.add_argument("--tta", type=int, choices=sorted(TTA_LEVELS),
                   help="test-time augmentation for the final test accuracy: "
                        + ", ".join(f"{k} {v}" for k, v in TTA_LEVELS.items()))
    p.add_argument("--optimizer", choices=("sgd", "muon"),
                   help="muon: torch.optim.Muon for the conv filters, SGD for the rest")
    p.add_argument("--muon-lr", type=float, default=0.24,
                   help="Muon's LR (airbench94_muon's value; follows the same schedule)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training step (compile time reported apart)")
    p.add_argument("--runs", type=int, default=1,
                   help="train N times (seeds seed..seed+N-1), report mean ± std")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-size", type=int,
                   help="training images held out for validation, stratified (0: none)")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--precision", choices=PRECISIONS,
                   help="bf16: matmuls in bf16 under autocast (weights, optimiser, BatchNorm "
                        "statistics and loss stay float32); auto (default): bf16 on CUDA and on "
                        "CPUs with AMX, fp32 elsewhere; --resume: the run's own unless given")
    p.add_argument("--out", help="run folder (default: runs/<preset>-<timestamp>)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run saved in RUN_DIR (or from a checkpoint file in it, "
                        "such as the previous one kept as checkpoint.prev.pt)")
    p.add_argument("--dist-timeout", type=float, default=300,
                   help="under torchrun: seconds a rank waits for the others before the whole "
                        "job fails")
    args = p.parse_args(argv)
    # The flags the command line set, even to their default value (argparse fills in only what
    # a namespace lacks): a resumed run refuses to change its own (see check_resume_flags).
    unset = object()
    typed = p.parse_args(argv, argparse.Namespace(**{k: unset for k in vars(args)}))
    args.given = sorted(k for k, v in vars(typed).items() if v is not unset)
    if args.pretrained:
        args.model = args.pretrained
        args.preset = args.preset or "finetune"
    if args.preset is None:
        args.preset = args.model if args.model in PRESETS else "seed"
    for key, value in PRESETS[args.preset].items():
        # --resume keeps the run's clipping unless --grad-clip is given (see train())
        if getattr(args, key, None) is None and not (args.resume and key == "grad_clip"):
            setattr(args, key, value)
    if args.model not in MODELS:      # --preset finetune alone: the preset's backbone
        args.pretrained = args.model
    if args.image_size is not None and not args.pretrained:
        p.error("--image-size goes with --pretrained")
    if min(args.epochs, args.batch_size, args.runs) < 1 or min(args.val_size, args.cutout) < 0:
        p.error("--epochs, --batch-size and --runs must be at least 1, --val-size and --cutout "
                "at least 0")
    if args.resume and args.runs != 1:
        p.error("--resume continues one run; it cannot be combined with --runs")
    if (args.grad_clip or 0) < 0:
        p.error("--grad-clip must be at least 0")
    if not 0 <= args.label_smoothing < 1:
        p.error("--label-smoothing must be in [0, 1)")
    if args.out is None:
        args.out = os.path.join("runs", f"{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    return args


def atomic_save(obj, path, keep_previous=False):
    """Write to a temp file beside `path`, then rename: a crash or a failed write (disk full,
    file-size limit, read-only folder) never leaves half a file, and a file already at `path`
    stays as it was. keep_previous: that file stays on as `previous_path(path)` (a hard link,
    not a copy), so that a checkpoint found corrupt later has a good one beside it."""
    tmp = f"{path}.tmp"
    try:
        torch.save(obj, tmp)
        if keep_previous and os.path.exists(path):
            keep_as(path, previous_path(path))
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:   # torch.save reports a failed write as RuntimeError
        with contextlib.suppress(OSError):
            os.remove(tmp)
        why = e.strerror if isinstance(e, OSError) and e.strerror else \
            f"the write failed: disk full or a file-size limit? {str(e).splitlines()[0]}"
        kept = "the previous one is kept" if os.path.exists(path) else "nothing was written"
        raise OSError(f"could not write {path} ({why}); {kept}") from None


def previous_path(path):
    root, ext = os.path.splitext(path)
    return f"{root}.prev{ext}"


def keep_as(path, kept):
    """`kept` becomes another name of the file at `path` (a copy where the filesystem has no
    hard links), in one rename: it is never half there."""
    tmp = f"{kept}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.remove(tmp)                        # left by a run killed right here
    try:
        os.link(path, tmp)
    except OSError:
        shutil.copyfile(path, tmp)
    os.replace(tmp, kept)


class Stopped(Exception):
    """Training stopped on a signal after saving a checkpoint; the message says how to resume."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.exit_code = 128 + signum   # the shell's code for a process ended by that signal


@contextlib.contextmanager
def deferred_stop_signals():
    """While training runs, SIGTERM and SIGINT (a cluster preempting the job, Ctrl-C) only
    record themselves in the yielded list: the loop stops at the next step boundary, once a
    checkpoint of that step is on disk. A second signal while it saves changes nothing, nor
    one on the way out: once a signal has come, the process ignores them until it exits."""
    received = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum))
                for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_IGN if received else handler)


def lock_run_folder(folder):
    """Hold an exclusive lock on FOLDER/.lock while the returned file stays open, so that a
    second run on the same folder refuses to start. The OS drops the lock when the process
    ends, however it ends: a killed run leaves none behind, and no process id is trusted.
    Where there is no flock (Windows, some network filesystems), runs go unlocked (None)."""
    try:
        import fcntl
    except ImportError:
        return None
    f = open(os.path.join(folder, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip()
        f.close()
        raise OSError(f"another run (process {holder}) is writing {folder}; wait for it to "
                      f"end or give another --out") from None
    except OSError:   # the filesystem has no locks
        f.close()
        return None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def rng_states(data_gen):
    states = {"torch": torch.get_rng_state(), "data": data_gen.get_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states, data_gen):
    torch.set_rng_state(states["torch"])
    data_gen.set_state(states["data"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def evaluate(model, images, labels, mean, std, tta=0):
    """(cross-entropy against the hard labels, accuracy) over a whole split. Under torchrun
    each rank predicts its share and the sums are added up: every rank gets the whole split's
    figures."""
    mine = distributed.share()
    logits = predict_logits(model, images[mine], mean, std, tta=tta)
    sums = torch.stack([F.cross_entropy(logits.float(), labels[mine], reduction="sum"),
                        (logits.argmax(1) == labels[mine]).sum().float()])
    loss_sum, correct = distributed.all_reduce_sum(sums).tolist()
    return loss_sum / len(images), correct / len(images)


def optimizer_groups(params, args, head=()):
    """SGD parameter groups from (module, parameter) pairs: BatchNorm shifts at `bias_lr_scale`
    times the LR (with the same decay per step), everything else at the LR. With `head` (the
    new classifier of a pretrained backbone), the head trains at the LR and everything else at
    `backbone_lr_scale` times it.

    With `decoupled` (airbench), lr and weight decay are per 1024 examples and divided by
    1 + 1/(1 - momentum), as airbench does (1/(1 - momentum) is how much momentum amplifies a
    step): the LR scales with the batch size, and the fraction of each weight decayed per step
    does not depend on the LR."""
    lr, wd = args.lr, args.weight_decay
    if args.decoupled:
        scale = args.batch_size / 1024 / (1 + 1 / (1 - args.momentum))
        lr, wd = args.lr * scale, args.weight_decay / args.lr
    head_ids = {id(p) for p in head}
    body = [(m, p) for m, p in params if id(p) not in head_ids]
    shifts = [p for module, p in body if isinstance(module, torch.nn.BatchNorm2d)]
    others = [p for module, p in body if not isinstance(module, torch.nn.BatchNorm2d)]
    scale = args.backbone_lr_scale if head_ids else 1.0
    groups = [{"params": others, "lr": lr * scale, "weight_decay": wd},
              {"params": shifts, "lr": lr * scale * args.bias_lr_scale,
               "weight_decay": wd / args.bias_lr_scale}]
    if head_ids:
        groups.append({"params": [p for _, p in params if id(p) in head_ids], "lr": lr,
                       "weight_decay": wd})
    return groups


def make_optimizers(model, args):
    """[SGD] or, with --optimizer muon, [SGD, Muon] and the conv filters Muon updates.

    torch.optim.Muon takes matrices only, so each trainable conv filter (O, C, kh, kw) gets a
    matrix (O, C*kh*kw) that shares its storage: Muon's in-place update of the matrix is the
    update of the filter. `muon_pairs` lists (filter, matrix) so that each step can hand the
    filter's gradient to its matrix."""
    # What trains now (a bias frozen later stays in its group: without a grad it takes no step).
    params = [(model.get_submodule(name.rpartition(".")[0]), p)
              for name, p in model.named_parameters() if p.requires_grad]
    muon_pairs = []
    if args.optimizer == "muon":
        muon_pairs = [(p, torch.nn.Parameter(p.detach().view(p.shape[0], -1)))
                      for _, p in params if p.ndim == 4]
        params = [(module, p) for module, p in params if p.ndim != 4]
    # A pretrained backbone's new classifier trains at the full LR, the rest slower.
    head = list(classifier(model.net).parameters()) if args.pretrained else []
    optimizers = [torch.optim.SGD(optimizer_groups(params, args, head), momentum=args.momentum,
                                  nesterov=True)]
    if muon_pairs:
        optimizers.append(torch.optim.Muon([m for _, m in muon_pairs], lr=args.muon_lr,
                                           momentum=MUON_MOMENTUM, nesterov=True,
                                           weight_decay=0.0))
    return optimizers, muon_pairs


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


def lr_factor(step, total, args):
    """The LR schedule, as a fraction of the peak: lr_start -> 1 linearly over the warm-up
    fraction of the steps, then 1 -> lr_end at the last step, linearly or along a half cosine
    (args.decay)."""
    warmup = max(1, int(total * args.warmup))
    if step < warmup:
        return args.lr_start + (1 - args.lr_start) * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
    if args.decay == "cosine":
        return args.lr_end + (1 - args.lr_end) * (1 + math.cos(math.pi * progress)) / 2
    return 1 + (args.lr_end - 1) * progress


def diverged_message(what, args, epoch):
    """The last line of a run whose loss or weights stopped being finite in `epoch`: a lower
    LR, or (after epoch 1) the kept checkpoint resumed with stronger gradient clipping."""
    message = f"{what} in epoch {epoch + 1}; try a lower --lr (now {args.lr})"
    if epoch == 0:
        return message
    clip = args.grad_clip / 5 if args.grad_clip else 1.0
    return (f"{message}, or continue from {os.path.join(args.out, 'checkpoint.pt')} (kept, "
            f"from epoch {epoch}) with gradient clipping: python src/train.py --resume "
            f"{args.out} --grad-clip {clip:g}")


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


def run_label(args):
    """The preset, and the network where it is not the preset's namesake."""
    return args.preset if args.preset == args.model else f"{args.preset} ({args.model})"


def read_checkpoint(resume):
    """The checkpoint --resume names (RUN_DIR/checkpoint.pt, or a checkpoint file) and the run
    folder it continues. One that cannot be read names the previous one kept beside it, when
    that one reads."""
    path = resume if resume.endswith(".pt") else os.path.join(resume, "checkpoint.pt")
    try:
        return (load_torch_file(path, "checkpoint", CHECKPOINT_KEYS),
                os.path.dirname(path) or ".")
    except DataError as error:
        previous = previous_path(path)
        kept = intact_checkpoint(previous) if os.path.isfile(path) else None
        if kept is None:
            raise
        raise DataError(f"{error}; the previous checkpoint ({checkpoint_position(kept)}) is "
                        f"intact: python src/train.py --resume {previous} continues from it"
                        ) from None


def set_aside_other_checkpoint(run_dir, resume_file):
    """A run resumed from another file (checkpoint.prev.pt) keeps the checkpoint.pt it leaves
    behind as checkpoint.set-aside.pt: its first save would otherwise make that one (corrupt,
    maybe) the previous checkpoint, and the file it resumed from would be gone."""
    current = os.path.join(run_dir, "checkpoint.pt")
    if resume_file and os.path.exists(current) and not os.path.samefile(resume_file, current):
        os.replace(current, os.path.join(run_dir, "checkpoint.set-aside.pt"))


def intact_checkpoint(path):
    """The checkpoint at `path` if there is one that reads, else None."""
    try:
        return load_torch_file(path, "checkpoint", CHECKPOINT_KEYS)
    except DataError:
        return None


# The flags a resume may set: where and how it runs, not what it trains.
RESUME_FLAGS = ("resume", "device", "precision", "grad_clip", "data_dir", "dist_timeout")


def check_resume_flags(args, given, saved):
    """A resumed run continues with the flags it was started with: one given on the command
    line with another value is an error, not silently ignored."""
    changed = [f"--{k.replace('_', '-')} {getattr(args, k)} (the run's: {saved[k]})"
               for k in given if k not in RESUME_FLAGS and k in saved
               and getattr(args, k) != saved[k]]
    if changed:
        raise ValueError(f"a resumed run keeps its own flags: {', '.join(changed)}; a resume "
                         f"takes only --device, --precision, --grad-clip, --data-dir and "
                         f"--dist-timeout (start a new run in another --out to change the rest)")


def checkpoint_position(ckpt):
    epochs = ckpt["args"].get("epochs", "?")
    if "partial" in ckpt:
        return f"epoch {ckpt['epoch'] + 2}/{epochs}, step {ckpt['partial']['steps']}"
    return f"after epoch {ckpt['epoch'] + 1}/{epochs}"


def train(args):
    """One training run, stopping at a step boundary on SIGTERM or SIGINT (see `Stopped`)."""
    with deferred_stop_signals() as received:
        return train_until_stopped(args, received)


def train_until_stopped(args, received):
    from torch.utils.tensorboard import SummaryWriter  # slow import: only when training

    resume_ckpt = None
    given = vars(args).pop("given", [])
    if args.resume:
        resume_ckpt, run_dir = read_checkpoint(args.resume)
        resume_file = args.resume if args.resume.endswith(".pt") else None
        check_resume_flags(args, given, resume_ckpt["args"])
        device_flag = args.device
        precision_flag, clip_flag = args.precision, args.grad_clip
        # The run continues with its own flags, and in its own precision and clipping unless
        # told otherwise (--grad-clip on a resume is the way on after a NaN); a checkpoint from
        # before these flags existed ran float32 on the CPU, without clipping.
        args.__dict__.update({"precision": "fp32", "grad_clip": 0.0, **resume_ckpt["args"]})
        args.resume, args.out, args.device = run_dir, run_dir, device_flag
        args.precision = precision_flag or args.precision
        args.grad_clip = args.grad_clip if clip_flag is None else clip_flag
    args.precision = args.precision or "auto"

    # A bad --device or dataset fails with its one line before anything else is printed.
    device = distributed.init(pick_device(args.device, verbose=False), args.dist_timeout)
    world, main_process = distributed.world_size(), distributed.is_main()
    # Only rank 0 talks (and writes files); the other ranks train silently beside it.
    log = (lambda *a: print(*a, file=sys.stderr)) if main_process else (lambda *a: None)
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} (the global batch) does not split "
                         f"evenly over {world} processes")
    dtype, why = pick_precision(args.precision, device)
    data = load_cifar(args.data_dir, args.dataset)
    lock = None
    if main_process:   # once the data is there, before anything is written
        os.makedirs(args.out, exist_ok=True)
        lock = lock_run_folder(args.out)   # held until this function returns
        if resume_ckpt is not None:
            set_aside_other_checkpoint(args.out, resume_file)
    log(f"device: {describe(device)}" + (f", {world} processes" if world > 1 else "")
        + f", {describe_precision(dtype, why)}")
    torch.manual_seed(args.seed)
    data_gen = torch.Generator(device=device).manual_seed(args.seed)
    num_classes = len(data["classes"])
    if args.val_size:
        train_idx, val_idx = stratified_split(data["train_y"], args.val_size, seed=args.seed)
    else:
        train_idx, val_idx = torch.arange(len(data["train_y"])), torch.arange(0)
    mean, std = channel_stats(data["train_x"][train_idx])
    if args.pretrained:     # the backbone sees inputs normalised as in its ImageNet training
        mean, std = (torch.tensor(BACKBONES[args.pretrained][k]) for k in ("mean", "std"))
    # The whole split as one tensor on the device; batches are gathered by index from it.
    train_x, train_y = data["train_x"][train_idx].to(device), data["train_y"][train_idx].to(device)
    val_x, val_y = data["train_x"][val_idx].to(device), data["train_y"][val_idx].to(device)
    steps_per_epoch = len(train_x) // args.batch_size   # the partial last batch is dropped
    if steps_per_epoch == 0:
        raise DataError(f"only {len(train_x)} training images for batch size {args.batch_size}")
    total_steps = args.epochs * steps_per_epoch
    # Which images the alternating flip mirrors in even epochs: fixed by the seed alone, so a
    # resumed run flips exactly as an uninterrupted one.
    flip_bits = None
    if args.flip == "alternating":
        bit_gen = torch.Generator().manual_seed(args.seed + 1)
        flip_bits = (torch.rand(len(train_x), generator=bit_gen) < 0.5).to(device)

    if args.pretrained:     # ImageNet weights (a resumed run loads its own over them)
        model = load_backbone(args.pretrained, num_classes, args.conv, args.image_size,
                              imagenet=resume_ckpt is None).to(device)
        args.image_size = model.image_size
    else:
        model = build_model(args.model, num_classes, args.conv).to(device)
    if world > 1:   # BatchNorm statistics of the whole global batch
        for kind in distributed.global_batchnorm(model):
            log(f"note: {kind} layers keep per-process batch statistics under torchrun")
        torch.manual_seed(args.seed + distributed.rank())   # each rank its own dropout masks
    # Under bf16 autocast the hand-written conv's matmuls run in bf16; its outputs are
    # channels-last already (the im2col matmul writes (N, H, W, C) rows), so BatchNorm, GELU and
    # pooling run channels-last without converting the model.
    autocast = precision_autocast(device, dtype)
    timed = stopwatch(device)
    # From (at most) 5000 normalised training images; a resumed run loads its filters instead.
    if hasattr(model, "init_whitening") and resume_ckpt is None:
        model.init_whitening(normalize(train_x[:5000], mean, std))
    timed_seconds = timed()
    optimizers, muon_pairs = make_optimizers(model, args)
    model, optimizers[0] = optimize_for_device(model, optimizers[0], device)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: lr_factor(step, total_steps, args)) for opt in optimizers]
    slow = [t.clone() for t in lookahead_state(model)] if args.lookahead else None

    start_epoch, partial = 0, None
    if resume_ckpt is not None:
        model.load_state_dict(resume_ckpt["model"])
        for key, objects in (("optimizer", optimizers), ("scheduler", schedulers)):
            states = resume_ckpt[key]
            for obj, state in zip(objects, states if isinstance(states, list) else [states]):
                obj.load_state_dict(state)
        set_rng_states(resume_ckpt["rng"], data_gen)
        if len(resume_ckpt["rng"].get("torch_ranks", [])) == world:
            torch.set_rng_state(resume_ckpt["rng"]["torch_ranks"][distributed.rank()])
        if slow is not None:
            torch._foreach_copy_(slow, [t.to(device) for t in resume_ckpt["lookahead"]])
        start_epoch = resume_ckpt["epoch"] + 1
        partial = resume_ckpt.get("partial")   # a run stopped by a signal within an epoch
        if resume_ckpt.get("train_size", len(train_x)) != len(train_x):
            raise DataError(f"{args.data_dir} holds {len(train_x)} training images, the run "
                            f"trained on {resume_ckpt['train_size']}: resume it with its data")
        log(f"resuming {args.out} in epoch {start_epoch + 1} after step {partial['steps']}"
            if partial else f"resuming {args.out} after epoch {start_epoch}")

    def step_model_for(model):
        """What the training step calls: the model, in DDP under torchrun, compiled with
        --compile. DDP reduces the gradients of the parameters that train when it is built."""
        wrapped = distributed.wrap(model, device)
        return torch.compile(wrapped) if args.compile else wrapped

    def trainable():
        return [p.requires_grad for p in model.parameters()]

    step_model, trains = step_model_for(model), trainable()
    if args.compile:
        # Compile on one batch before the clock runs, then put every weight and statistic back.
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        compile_clock = stopwatch(device)
        with autocast:
            step_model(normalize(train_x[:args.batch_size // world], mean, std)
                       ).float().sum().backward()
        model.zero_grad(set_to_none=True)
        model.load_state_dict(saved)
        log(f"compiled in {compile_clock():.1f}s (not counted in the times below)")

    writer = None
    if main_process:
        writer = SummaryWriter(args.out)
    local_batch = args.batch_size // world
    log(f"{run_label(args)}: {sum(p.numel() for p in model.parameters()):,} "
        f"parameters, {len(train_x)} train / {len(val_x)} val images, {steps_per_epoch} "
        f"steps per epoch" + (f" of {world} x {local_batch} images" if world > 1 else "")
        + f", logs in {args.out}")

    def save_checkpoint(completed_epoch, partial=None):
        """Everything a resume needs (every rank calls it; rank 0 writes). `partial`: the
        steps, batch order and loss sums of a stopped epoch."""
        rng = rng_states(data_gen)
        if world > 1:    # the dropout streams differ per rank; a resume restores each
            rng["torch_ranks"] = distributed.all_gather(torch.get_rng_state())
        if main_process:
            atomic_save({"model": model.state_dict(),
                         "optimizer": [opt.state_dict() for opt in optimizers],
                         "scheduler": [sched.state_dict() for sched in schedulers],
                         "epoch": completed_epoch, "rng": rng, "args": vars(args),
                         "train_size": len(train_x),
                         "lookahead": [t.cpu() for t in slow] if slow is not None else [],
                         **({"partial": partial} if partial else {})},
                        os.path.join(args.out, "checkpoint.pt"), keep_previous=True)

    def stop_requested():
        """Whether a signal asked to stop; under torchrun, whether any rank got one (an
        all-reduce of one number a step), so that all ranks stop after the same step."""
        if world == 1:
            return bool(received)
        return distributed.all_reduce_sum(
            torch.tensor(float(len(received)), device=device)).item() > 0

    def stopped(where):
        name = signal.Signals(received[0]).name if received else "a signal to another rank"
        return Stopped(f"stopped by {name} {where}; {os.path.join(args.out, 'checkpoint.pt')} "
                       f"holds it: python src/train.py --resume {args.out} continues",
                       received[0] if received else signal.SIGTERM)

    def check_finite(running, epoch):
        if not math.isfinite(running):
            raise FloatingPointError(
                diverged_message(f"training loss became {running}", args, epoch))
        # The loss is that of the weights before the epoch's last update: check those too.
        if not torch.stack([p.isfinite().all() for p in model.parameters()]).all():
            raise FloatingPointError(diverged_message("the weights became inf or nan", args,
                                                      epoch))

    started = time.perf_counter()
    for epoch in range(start_epoch, args.epochs):
        epoch_clock = stopwatch(device)
        model.train()
        if args.whiten_bias_epochs and hasattr(model, "whiten"):
            model.whiten.bias.requires_grad_(epoch < args.whiten_bias_epochs)
        if world > 1 and trains != trainable():   # DDP tracks what trained when it was built
            step_model, trains = step_model_for(model), trainable()
        first = 0
        if partial is not None and epoch == start_epoch:   # this epoch's order and sums so far
            first, perm = partial["steps"], partial["perm"].to(device)
            loss_sum, correct = (t.to(device) for t in partial["sums"])
        else:
            perm = torch.randperm(len(train_x), generator=data_gen, device=device)
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device)
        bar = tqdm(range(first, steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}",
                   initial=first, total=steps_per_epoch, leave=False, file=sys.stderr,
                   dynamic_ncols=True, disable=not main_process)
        for step in bar:
            idx = perm[step * args.batch_size:(step + 1) * args.batch_size]
            # Every rank augments the whole global batch (the same random draws as one
            # process: cheap next to the network) and trains on its share of it.
            x = augment(normalize(train_x[idx], mean, std), data_gen, args.crop_pad,
                        args.pad_mode, None if flip_bits is None else flip_bits[idx], epoch,
                        args.cutout)[distributed.share()]
            y = train_y[idx][distributed.share()]
            with autocast:
                logits = step_model(x)
            loss = F.cross_entropy(logits.float(),
                                   one_hot(y, num_classes, args.label_smoothing))
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            for weight, matrix in muon_pairs:
                matrix.grad = None if weight.grad is None else weight.grad.view_as(matrix)
            lr_used = optimizers[0].param_groups[0]["lr"]
            for opt, sched in zip(optimizers, schedulers):
                opt.step()
                sched.step()
            global_step = epoch * steps_per_epoch + step + 1
            if slow is not None and global_step % LOOKAHEAD_EVERY == 0:
                lookahead_pull(model, slow, lookahead_decay(global_step, total_steps))
            loss_sum += loss.detach()
            correct += (logits.argmax(1) == y).sum()
            if step % 50 == 49 or step == steps_per_epoch - 1:   # one device sync per 50 steps
                running = loss_sum.item() / (step + 1)
                check_finite(running, epoch)
                bar.set_postfix(loss=f"{running:.3f}")
            if step < steps_per_epoch - 1 and stop_requested():
                bar.close()
                check_finite(loss_sum.item() / (step + 1), epoch)
                save_checkpoint(epoch - 1, {"steps": step + 1, "perm": perm.cpu(),
                                            "sums": [loss_sum.cpu(), correct.cpu()]})
                raise stopped(f"in epoch {epoch + 1} after step {step + 1}/{steps_per_epoch}")
        bar.close()
        if slow is not None and epoch == args.epochs - 1:
            lookahead_pull(model, slow, 1.0)      # the final weights are the slow ones
        timed_seconds += epoch_clock()

        # Each rank summed the mean losses and the hits of its shares: add up over ranks.
        sums = distributed.all_reduce_sum(torch.stack([loss_sum, correct.float()]))
        train_loss = sums[0].item() / (steps_per_epoch * world)
        train_acc = sums[1].item() / (steps_per_epoch * args.batch_size)
        scalars = {"train/loss": train_loss, "train/accuracy": train_acc,
                   "lr": lr_used}   # the LR of the epoch's last step
        line = f"epoch {epoch + 1:3d}/{args.epochs}  train loss {train_loss:.4f} " \
               f"acc {train_acc:.4f}"
        if len(val_x):
            with autocast:
                val_loss, val_acc = evaluate(model, val_x, val_y, mean, std)
            scalars.update({"val/loss": val_loss, "val/accuracy": val_acc})
            line += f"  val loss {val_loss:.4f} acc {val_acc:.4f}"
        log(f"{line}  {time.perf_counter() - started:.0f}s")
        if main_process:
            for name, value in scalars.items():
                writer.add_scalar(name, value, epoch + 1)
            writer.flush()
        save_checkpoint(epoch)
        if stop_requested():
            raise stopped(f"after epoch {epoch + 1}")
    if writer is not None:
        writer.close()

    # The test set is touched once, here, after every choice has been made.
    test_x, test_y = data["test_x"].to(device), data["test_y"].to(device)
    eval_clock = stopwatch(device)
    with autocast:
        test_acc = evaluate(model, test_x, test_y, mean, std, tta=args.tta)[1]
    timed_seconds += eval_clock()
    with autocast:
        test_acc_plain = evaluate(model, test_x, test_y, mean, std)[1] if args.tta else test_acc
    weights_path = os.path.join(args.out, "weights.pt")
    if main_process:
        atomic_save({"model": args.model, "dataset": args.dataset, "classes": data["classes"],
                     "mean": mean.tolist(), "std": std.tolist(),
                     "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
                     "test_accuracy": test_acc, "tta": args.tta,
                     "test_accuracy_without_tta": test_acc_plain,
                     "pretrained": bool(args.pretrained), "image_size": args.image_size},
                    weights_path)
        tta_note = f" with TTA {args.tta} ({test_acc_plain:.4f} without)" if args.tta else ""
        processes = f" x {world} processes" if world > 1 else ""
        print(f"done: {run_label(args)} on {args.dataset}, {args.epochs} epochs in "
              f"{time.perf_counter() - started:.0f}s on {describe(device)}{processes} "
              f"({timed_seconds:.1f}s of whitening, training steps and test evaluation); test "
              f"accuracy {test_acc:.4f}{tta_note}; weights {weights_path}")
    if lock is not None:
        lock.close()
    return {"accuracy": test_acc, "accuracy_without_tta": test_acc_plain,
            "seconds": timed_seconds}


def train_runs(args):
    """--runs N: N trainings with seeds seed..seed+N-1 in RUN_DIR/run<i>, then the mean and
    standard deviation of their test accuracies (as airbench reports)."""
    if args.runs == 1:
        return [train(args)]
    results, out, seed = [], args.out, args.seed
    for i in range(args.runs):
        args.out, args.seed = os.path.join(out, f"run{i}"), seed + i
        results.append(train(args))
    def mean_std(key, digits):
        values = torch.tensor([r[key] for r in results], dtype=torch.float64)
        return f"{values.mean():.{digits}f} ± {values.std():.{digits}f}"
    line = f"{args.runs} runs of {args.preset}: test accuracy {mean_std('accuracy', 4)}"
    if args.tta:
        line += f" with TTA {args.tta}, {mean_std('accuracy_without_tta', 4)} without"
    if distributed.is_main():
        print(f"{line}; {mean_std('seconds', 1)} s each")
    return results


def main(argv=None):
    args = get_args(argv)
    try:
        train_runs(args)
        distributed.close(together=True)
    except Stopped as e:
        distributed.close(together=True)        # every rank stopped after the same step
        cli.fail(str(e), e.exit_code)
    except (DataError, ValueError, FloatingPointError, OSError, PretrainedError) as e:
        cli.fail(str(e))
    except RuntimeError as e:
        if not distributed.lost_contact(e):
            raise
        cli.fail(f"rank {distributed.rank()}: lost contact with the other processes (one "
                 f"died, or did not answer within --dist-timeout {args.dist_timeout:g} s): "
                 f"{str(e).splitlines()[0]}")
    finally:
        distributed.close()


if __name__ == "__main__":
    main()
