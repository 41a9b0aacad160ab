"""A training run from its command line: train.py's flags (what each means, the preset's
values filled in wherever a flag is not given, argparse's one-line error for a bad
combination), then the run's state (`Run`) and its set-up: the flags (a resumed run's own),
device and precision, the data on the device, the model and optimisers, where a resumed run
continues, the conv variants, and TensorBoard's writer. train.py runs the epochs over it."""
import argparse
import os
import time
from dataclasses import dataclass, field

import torch

import cli
import distributed
import logs
from checkpoint import (accelerator_rng, lock_run_folder, no_seconds, restore, resumed_run,
                        set_aside_other_checkpoint)
from conv import plans as conv_plans
from data import DATASETS, DataError, Split, device_split, load_cifar, normalize
from device import describe, keep_freed_memory, machine, optimize_for_device, pick_device, stopwatch
from distributed import log
from evaluate import TTA_LEVELS
from model import MODELS, FastNet, build_model
from optim import (Lookahead, gradient_epochs, lr_schedule, make_optimizers, make_schedulers,
                   stop_ended_gradients)
from precision import autocast as precision_autocast, disable_tf32, pick_precision
from precision import describe as describe_precision
from presets import PRESETS
from pretrained import BACKBONES, backbone_stats, load_backbone

# ----------------------------------------------------------------------------------------------
# The flags

TRAIN_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
DESCRIPTION = "Train a CIFAR network whose convolutions are written by hand."


def make_parser():
    p = cli.parser(TRAIN_SCRIPT, DESCRIPTION)
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
                   help="training images held out for validation, stratified (0: none); the "
                        "run ends with their accuracy with --tta, the figure to tune on")
    p.add_argument("--test-every", type=int, metavar="EPOCHS",
                   help="without a validation split: evaluate the test set every EPOCHS epochs "
                        "for TensorBoard's test/accuracy curve, for display only (default: as "
                        "often as keeps it within 5 %% of the training time, every 2 epochs "
                        "on CIFAR; 0: never)")
    p.add_argument("--data-dir", default="data")
    cli.add_device_flags(p, "Weights, optimiser, BatchNorm statistics and loss stay float32; "
                            "default auto, with --resume the run's own", precision_default=None)
    p.add_argument("--no-conv-measure", action="store_true",
                   help="run every hand-written conv in its default variant instead of the "
                        "fastest measured at start-up (also: CIFAR_CONV_MEASURE=0); a resumed "
                        "run keeps its own")
    p.add_argument("--out", help="run folder (default: runs/<preset>-<timestamp>)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run saved in RUN_DIR (or from a checkpoint file in it, "
                        "such as the previous one kept as checkpoint.prev.pt)")
    p.add_argument("--dist-timeout", type=float, default=300,
                   help="under torchrun: seconds a rank waits for the others before the whole "
                        "job fails")
    return p


def get_args(argv=None):
    """The run's flags: those given, the preset's values for the rest and what follows from
    them (`resolved`), in a namespace of their own; read, never written, from here on."""
    p = make_parser()
    parsed = p.parse_args(argv)
    # The flags the command line set, even to their default value (argparse fills in only what
    # a namespace lacks): a resumed run refuses to change its own (see check_resume_flags).
    unset = object()
    typed = p.parse_args(argv, argparse.Namespace(**{k: unset for k in vars(parsed)}))
    given = sorted(k for k, v in vars(typed).items() if v is not unset)
    args = argparse.Namespace(**(vars(parsed) | resolved(parsed)), given=given)
    check_args(p, args)
    return args


def resolved(parsed):
    """The values the flags given imply: the preset (that of --model, finetune with
    --pretrained, else seed), its value of every flag left out, the backbone, the precision
    and the run folder."""
    pretrained = parsed.pretrained
    model = pretrained or parsed.model
    preset = parsed.preset or ("finetune" if pretrained else
                               model if model in PRESETS else "seed")
    values = {"preset": preset, "model": model}
    for key, value in PRESETS[preset].items():
        # --resume keeps the run's clipping unless --grad-clip is given (see train())
        if values.get(key, getattr(parsed, key, None)) is None and not (
                parsed.resume and key == "grad_clip"):
            values[key] = value
    if values["model"] not in MODELS:      # --preset finetune alone: the preset's backbone
        values["pretrained"] = values["model"]
    if parsed.precision is None and not parsed.resume:   # a resume keeps its run's, unless given
        values["precision"] = "auto"
    if parsed.out is None:
        values["out"] = os.path.join("runs", f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    return values


def check_args(p, args):
    """argparse's one-line error for values no `choices` or `type` rules out."""
    if args.image_size is not None and not args.pretrained:
        p.error("--image-size goes with --pretrained")
    if min(args.epochs, args.batch_size, args.runs) < 1 or min(args.val_size, args.cutout,
                                                                   args.test_every or 0) < 0:
        p.error("--epochs, --batch-size and --runs must be at least 1, --val-size, --cutout "
                "and --test-every at least 0")
    if args.test_every is not None and args.val_size and not args.resume:
        p.error("--test-every is for runs without a validation split (--val-size 0): with one, "
                "the validation accuracy is the held-out curve")
    if args.resume and args.runs != 1:
        p.error("--resume continues one run; it cannot be combined with --runs")
    if (args.grad_clip or 0) < 0:
        p.error("--grad-clip must be at least 0")
    if not 0 <= args.label_smoothing < 1:
        p.error("--label-smoothing must be in [0, 1)")


# ----------------------------------------------------------------------------------------------
# The run

@dataclass
class Run:
    """One training run as `set_up` makes it. The training loop trains its model, optimisers
    and generators in place; of its own fields it reassigns only the tallies at the end."""
    args: argparse.Namespace      # the run's flags (a resumed run's own): read, never written
    device: torch.device          # where the model, the images and every batch live
    world: int                    # processes under torchrun, 1 without
    is_main: bool                 # rank 0: the one process that prints and writes files
    dtype: torch.dtype | None     # the autocast dtype (bf16), None for float32
    precision: str                # the start line's words, "precision: bf16 (AVX512-BF16)"
    autocast: object              # the context every forward pass runs in
    data: dict                    # load_cifar's (classes; the host's test images for figures)
    split: Split                  # the images on the device (data.py)
    steps_per_epoch: int          # training images // batch size: the partial last batch dropped
    data_gen: torch.Generator     # on the device: each epoch's order and the augmentations
    model: torch.nn.Module        # the network, whose weights checkpoints and weights.pt keep
    step_model: torch.nn.Module   # what a step calls: the model, in DDP under torchrun,
    #                               compiled with --compile
    optimizers: list              # [SGD], or [SGD, Muon] with --optimizer muon
    schedulers: list              # one LR schedule per optimiser
    lookahead: Lookahead | None   # the slow weights (--lookahead: the fast presets), else None
    image_size: int | None        # --pretrained: the resolution the backbone runs at
    start_epoch: int              # 0, or for a resumed run the epoch after its checkpoint's
    partial: dict | None          # a resumed run stopped within an epoch: steps, order, sums
    test_every: int               # epochs between the test curve's evaluations (0: never)
    signals: list                 # the stop signals received (`deferred_stop_signals`)
    writer: object                # TensorBoard's SummaryWriter on rank 0, None elsewhere
    started: float                # time.perf_counter() at the end of the set-up, less the
    #                               wall seconds of the run's earlier starts
    timed_seconds: float          # tally: whitening, training steps and test evaluations
    held_out_seconds: float       # tally: the test curve's evaluations, apart
    starts: int                   # this process and every one the run was resumed from
    pending_steps: list = field(default_factory=list)  # tally: (step, loss, lr) of the steps
    #                                                    the next checkpoint covers


def run_label(args):
    """The preset, and the network where it is not the preset's namesake."""
    return args.preset if args.preset == args.model else f"{args.preset} ({args.model})"


def set_up(args, argv, signals, closing):
    """The `Run`: its flags (a resumed run's own), device and precision, data on the device,
    model, optimisers, where a resumed run continues from, and TensorBoard's writer. `closing`
    closes the run folder's lock and the writer however the run ends."""
    ckpt, resume_file, args = resumed_run(args)
    device, dtype, why = set_up_device(args, ckpt)
    data = load_cifar(args.data_dir, args.dataset)
    if distributed.is_main():   # once the data is there, before anything is written
        os.makedirs(args.out, exist_ok=True)
        lock = lock_run_folder(args.out)
        if lock is not None:
            closing.callback(lock.close)
        if ckpt is not None:
            set_aside_other_checkpoint(args.out, resume_file)
    world = distributed.world_size()
    log(f"device: {describe(device)}" + (f", {world} processes" if world > 1 else "")
        + f", {describe_precision(dtype, why)}")
    torch.manual_seed(args.seed)
    data_gen = torch.Generator(device=device).manual_seed(args.seed)
    split = device_split(data, args.val_size, args.seed, args.flip == "alternating", device,
                         backbone_stats(args.pretrained))
    if len(split.train_x) < args.batch_size:
        raise DataError(f"only {len(split.train_x)} training images for batch size "
                        f"{args.batch_size}")
    if ckpt is not None and ckpt.train_size != len(split.train_x):
        raise DataError(f"{args.data_dir} holds {len(split.train_x)} training images, the run "
                        f"trained on {ckpt.train_size}: resume it with its data")
    steps_per_epoch = len(split.train_x) // args.batch_size   # the partial last batch: dropped
    autocast = precision_autocast(device, dtype)
    model, image_size, timed_seconds = set_up_model(args, len(data["classes"]), split, device,
                                                    ckpt is not None)
    model, optimizers, note = optimize_for_device(model, make_optimizers(model, args), device)
    if note:
        log(f"note: {note}")
    schedulers = make_schedulers(optimizers, steps_per_epoch,
                                 lr_schedule(args, args.epochs * steps_per_epoch))
    lookahead = Lookahead(model, args.epochs * steps_per_epoch) if args.lookahead else None
    start_epoch, partial = resume(ckpt, args, model, optimizers, schedulers, lookahead,
                                  data_gen, device) if ckpt is not None else (0, None)
    choose_conv_plans(args, ckpt, model, split, device, autocast)
    before = ckpt.seconds if ckpt is not None else no_seconds()
    run = Run(args=args, device=device, world=world, is_main=distributed.is_main(), dtype=dtype,
              precision=describe_precision(dtype, why), autocast=autocast, data=data,
              split=split, steps_per_epoch=steps_per_epoch, data_gen=data_gen, model=model,
              step_model=step_model(args, model, split, device, autocast, optimizers,
                                    start_epoch),
              optimizers=optimizers, schedulers=schedulers, lookahead=lookahead,
              image_size=image_size, start_epoch=start_epoch, partial=partial,
              test_every=test_curve_every(args, split), signals=signals, writer=None,
              started=0.0, timed_seconds=before["timed"] + timed_seconds,
              held_out_seconds=before["held_out"], starts=before["starts"] + 1)
    run.writer = open_writer(run, argv, closing)
    log(f"{run_label(args)}: {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{len(split.train_x)} train / {len(split.val_x)} val images, {steps_per_epoch} steps "
        f"per epoch" + (f" of {world} x {args.batch_size // world} images" if world > 1 else "")
        + f", logs in {args.out}")
    run.started = time.perf_counter() - before["wall"]
    return run


def set_up_device(args, ckpt):
    """The device (a bad --device fails with its one line before anything is printed), the
    process group under torchrun, and the precision: (device, autocast dtype, why)."""
    device = distributed.init(pick_device(args.device, verbose=False), args.dist_timeout)
    keep_freed_memory(device)
    if args.batch_size % distributed.world_size():
        raise ValueError(f"--batch-size {args.batch_size} (the global batch) does not split "
                         f"evenly over {distributed.world_size()} processes")
    # A resumed run's `auto` is the precision it ran in, not what `auto` means here today.
    flag = ckpt.precision if ckpt is not None and args.precision == "auto" else args.precision
    dtype, why = pick_precision(flag, device)
    tf32 = disable_tf32(device) if dtype is None else ""
    if tf32:
        why += f"; {tf32}"
    if flag != args.precision:      # "--precision bf16; ...: slow" -> "the run's; ...: slow"
        why = why.replace(f"--precision {flag}", "the resumed run's")
    conv_plans.measuring()                  # a bad CIFAR_CONV_MEASURE: its one line, now
    return device, dtype, why


def test_curve_every(args, split):
    """Every how many epochs TensorBoard's test curve is evaluated (0: never): only without a
    validation split, as --test-every says or within 5 % of the training time (logs.py). Its
    seconds are counted apart from the training's."""
    if len(split.val_x):
        return 0
    if args.test_every is not None:
        return args.test_every
    return logs.held_out_every(len(split.test_x), len(split.train_x))


def set_up_model(args, num_classes, split, device, resumed):
    """The network (an ImageNet backbone with --pretrained, whose weights a resumed run loads
    its own over), its whitening filters: (model, the backbone's image size or None, seconds
    the whitening took)."""
    image_size = None
    if args.pretrained:
        model = load_backbone(args.pretrained, num_classes, args.conv, args.image_size,
                              imagenet=not resumed).to(device)
        image_size = model.image_size
    else:
        model = build_model(args.model, num_classes, args.conv).to(device)
    if distributed.world_size() > 1:   # BatchNorm statistics of the whole global batch
        for kind in distributed.global_batchnorm(model):
            log(f"note: {kind} layers keep per-process batch statistics under torchrun")
        torch.manual_seed(args.seed + distributed.rank())   # each rank its own dropout masks
    clock = stopwatch(device)
    # From (at most) 5000 normalised training images; a resumed run loads its filters instead.
    if isinstance(model, FastNet) and not resumed:
        model.init_whitening(normalize(split.train_x[:5000], split.mean, split.std))
    return model, image_size, clock()


def resume(ckpt, args, model, optimizers, schedulers, lookahead, data_gen, device):
    """A resumed run's states restored (checkpoint.restore), said in a line or two; (the epoch
    it continues in, the stopped epoch's state or None)."""
    try:
        notes = restore(ckpt, model, optimizers, schedulers, lookahead, data_gen, device,
                        reseed=args.seed * 1_000_003 + ckpt.epoch + 1)
    except ValueError as e:
        raise ValueError(f"{args.out}: {e}") from None
    if notes:
        log(f"note: resumed on another machine: {'; '.join(notes)}; the run goes on, with "
            f"other random draws than an uninterrupted one")
    partial = ckpt.partial          # a run stopped by a signal within an epoch
    log(f"resuming {args.out} in epoch {ckpt.epoch + 2} after step {partial['steps']}"
        if partial else f"resuming {args.out} after epoch {ckpt.epoch + 1}")
    return ckpt.epoch + 1, partial


def choose_conv_plans(args, ckpt, model, split, device, autocast):
    """Which variant of the hand-written conv each layer shape runs (conv/plans.py): a resumed
    run's own; else the fastest, measured by rank 0 on one forward of a batch (the model in
    eval mode: no statistic or RNG changes) and handed to every rank; else, with
    --no-conv-measure or CIFAR_CONV_MEASURE=0, the default ones. Measuring is off afterwards,
    so every rank runs the same variants for the whole run, and a resume runs those too."""
    conv_plans.set_measuring(None)          # as CIFAR_CONV_MEASURE says (a second --runs run)
    if ckpt is not None:
        kept = {key: plan for key, plan in ckpt.conv_plans.items()
                if key.endswith(f" {device.type}")}
        if len(kept) < len(ckpt.conv_plans):
            log(f"note: the run's conv variants were measured on another device type; on "
                f"{device.type} every conv runs its default variant")
        conv_plans.use(kept)
    elif distributed.from_rank0(args.conv == "hand" and device.type == "cpu" and
                                not args.no_conv_measure and conv_plans.measuring()):
        conv_plans.use({})          # every rank as rank 0 decides (its environment may differ)
        clock = stopwatch(device)
        if distributed.is_main():
            model.eval()
            with torch.enable_grad(), autocast:
                model(normalize(split.train_x[:args.batch_size // distributed.world_size()],
                                split.mean, split.std))
            model.train()
        conv_plans.use(distributed.from_rank0(conv_plans.chosen()))
        log(f"conv variants: {len(conv_plans.chosen())} layer shapes measured in "
            f"{clock():.1f}s (not counted in the times below)")
    else:
        conv_plans.use({})
    conv_plans.set_measuring(False)


def step_model(args, model, split, device, autocast, optimizers, start_epoch):
    """What the training step calls: the model, in DDP under torchrun, compiled with --compile
    (on one batch before the clock runs, every weight and statistic put back after)."""
    wrapped = distributed.wrap(model, device)
    if not args.compile:
        return wrapped
    compiled = torch.compile(wrapped)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    compile_clock = stopwatch(device)
    # In one process each epoch from which other parameters get gradients (train_epoch calls
    # optim.stop_ended_gradients) is another graph: all are compiled here, none on the clock.
    one_process = distributed.world_size() == 1
    firsts = gradient_epochs(optimizers, start_epoch, args.epochs) if one_process \
        else [start_epoch]
    # The warm-up's dropout draws leave the RNG as they found it: a resume stays exact.
    with torch.random.fork_rng(devices=[device] if accelerator_rng(device) else [],
                               device_type=device.type), autocast:
        for epoch in firsts:
            if one_process:
                stop_ended_gradients(optimizers, epoch)
            compiled(normalize(split.train_x[:args.batch_size // distributed.world_size()],
                               split.mean, split.std)).float().sum().backward()
    model.zero_grad(set_to_none=True)
    model.load_state_dict(saved)
    log(f"compiled in {compile_clock():.1f}s (not counted in the times below)")
    return compiled


def open_writer(run, argv, closing):
    """TensorBoard's writer on rank 0 (None elsewhere), the run's card written first."""
    if not run.is_main:
        return None
    from torch.utils.tensorboard import SummaryWriter  # slow import: only when training
    writer = closing.enter_context(SummaryWriter(run.args.out))
    card = logs.run_card(run.args, argv, run.world, machine(run.device),
                         run.precision.removeprefix("precision: "), run.steps_per_epoch)
    partial_steps = run.partial["steps"] if run.partial is not None else 0
    logs.write_card(writer, card, run.start_epoch * run.steps_per_epoch + partial_steps)
    return writer
