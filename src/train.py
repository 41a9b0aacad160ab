"""Train a CIFAR network whose convolutions are written by hand.

    python src/train.py --preset seed --data-dir data      # or fast94, fast95, fast96

The whole dataset sits on the training device as one uint8 tensor; each step indexes a batch
out of this epoch's permutation, normalises and augments it there, and takes one SGD step
(the fast presets add airbench's whitening init, lookahead and test-time augmentation).
Every epoch logs to TensorBoard (in the run folder) and writes a checkpoint atomically, so
`--resume RUN_DIR` continues exactly where an interrupted run stopped. The same script runs
data-parallel under `torchrun --nproc_per_node=N` (see distributed.py).
"""
import math
import os
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from tqdm import tqdm

import cli
import distributed
import logs
from checkpoint import (accelerator_rng, atomic_save, flags_of_resumed_run, lock_run_folder,
                        process_rng_state, rng_states, set_aside_other_checkpoint,
                        set_rng_states)
from conv import plans as conv_plans
from data import (DataError, augment, channel_stats, load_cifar, normalize, one_hot,
                  stratified_split)
from device import (describe, keep_freed_memory, machine, optimize_for_device, pick_device,
                    stopwatch)
from evaluate import evaluate
from model import FastNet, build_model
from optim import Lookahead, logged_lr, make_optimizers, make_schedulers
from preemption import Stopped, deferred_stop_signals, stop_error, stop_signalled
from precision import (autocast as precision_autocast, cpu_bf16_unit, pick_precision,
                       disable_tf32)
from precision import describe as describe_precision
from pretrained import BACKBONES, PretrainedError, load_backbone
from train_flags import get_args


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


def run_label(args):
    """The preset, and the network where it is not the preset's namesake."""
    return args.preset if args.preset == args.model else f"{args.preset} ({args.model})"


def train(args, argv=()):
    """One training run, stopping at a step boundary on SIGTERM or SIGINT (see `Stopped`):
    set up, train epoch after epoch (each ending in a checkpoint), evaluate on the test set.
    `argv`: the command line's flags, for TensorBoard's card of the run."""
    with deferred_stop_signals() as signals:
        run = SimpleNamespace(args=args, signals=signals, lock=None, writer=None,
                              argv=list(argv))
        try:
            set_up(run)
            for epoch in range(run.start_epoch, args.epochs):
                end_epoch(run, epoch, train_epoch(run, epoch))
            return finish(run)
        finally:   # however the run ends: the folder's lock, and the events written so far
            if run.writer is not None:
                run.writer.close()
            if run.lock is not None:
                run.lock.close()


def set_up(run):
    """Everything a run holds, into the namespace `run`: its flags (a resumed run's own),
    device, data on the device, model, optimisers, and where a resumed run continues from."""
    args = run.args
    run.ckpt, resume_file = flags_of_resumed_run(args)
    set_up_device(run)
    set_up_data(run, resume_file)
    set_up_model(run)
    run.start_epoch, run.partial = 0, None
    if run.ckpt is not None:
        restore(run)
    choose_conv_plans(run)
    set_up_step_model(run)
    if run.is_main:
        from torch.utils.tensorboard import SummaryWriter  # slow import: only when training
        run.writer = SummaryWriter(args.out)
        card = logs.run_card(args, run.argv, run.world, machine(run.device),
                             describe_precision(run.dtype, run.precision_reason)
                             .removeprefix("precision: "), run.steps_per_epoch)
        partial_steps = run.partial["steps"] if run.partial is not None else 0
        logs.write_card(run.writer, card, run.start_epoch * run.steps_per_epoch + partial_steps)
    world = run.world
    run.log(f"{run_label(args)}: {sum(p.numel() for p in run.model.parameters()):,} "
            f"parameters, {len(run.train_x)} train / {len(run.val_x)} val images, "
            f"{run.steps_per_epoch} steps per epoch"
            + (f" of {world} x {args.batch_size // world} images" if world > 1 else "")
            + f", logs in {args.out}")
    run.started = time.perf_counter()


def set_up_device(run):
    """The device (a bad --device fails with its one line before anything is printed), the
    process group under torchrun, and the precision."""
    args = run.args
    run.device = distributed.init(pick_device(args.device, verbose=False), args.dist_timeout)
    keep_freed_memory(run.device)
    run.world, run.is_main = distributed.world_size(), distributed.is_main()
    # Only rank 0 talks (and writes files); the other ranks train silently beside it.
    run.log = (lambda *a: print(*a, file=sys.stderr)) if run.is_main else (lambda *a: None)
    if args.batch_size % run.world:
        raise ValueError(f"--batch-size {args.batch_size} (the global batch) does not split "
                         f"evenly over {run.world} processes")
    flag = resumed_precision(run)
    run.dtype, run.precision_reason = pick_precision(flag, run.device)
    tf32 = disable_tf32(run.device) if run.dtype is None else ""
    if tf32:
        run.precision_reason += f"; {tf32}"
    if flag != args.precision:      # "--precision bf16; ...: slow" -> "the run's; ...: slow"
        run.precision_reason = run.precision_reason.replace(f"--precision {flag}",
                                                            "the resumed run's")
    conv_plans.measuring()                  # a bad CIFAR_CONV_MEASURE: its one line, now
    run.autocast = precision_autocast(run.device, run.dtype)


def resumed_precision(run):
    """The --precision to run with: a resumed run's `auto` is the precision it ran in (saved
    in its checkpoint), not what `auto` means on this machine today; a checkpoint without it
    is from before `auto` took AVX512-BF16, where such a CPU ran float32."""
    flag = run.args.precision
    if run.ckpt is None or flag != "auto":
        return flag
    if "precision" in run.ckpt:
        return run.ckpt["precision"]
    return "fp32" if run.device.type == "cpu" and cpu_bf16_unit() != "AMX" else flag


def set_up_data(run, resume_file):
    """The dataset read (then the run folder locked), the seeds set, the train/val split as
    tensors on the device, its normalisation, and the alternating flip's bits."""
    args, device = run.args, run.device
    run.data = load_cifar(args.data_dir, args.dataset)
    if run.is_main:   # once the data is there, before anything is written
        os.makedirs(args.out, exist_ok=True)
        run.lock = lock_run_folder(args.out)
        if run.ckpt is not None:
            set_aside_other_checkpoint(args.out, resume_file)
    run.log(f"device: {describe(device)}" + (f", {run.world} processes" if run.world > 1 else "")
            + f", {describe_precision(run.dtype, run.precision_reason)}")
    torch.manual_seed(args.seed)
    run.data_gen = torch.Generator(device=device).manual_seed(args.seed)
    train_y = run.data["train_y"]
    if args.val_size:
        train_idx, val_idx = stratified_split(train_y, args.val_size, seed=args.seed)
    else:
        train_idx, val_idx = torch.arange(len(train_y)), torch.arange(0)
    run.mean, run.std = normalisation(run.data["train_x"][train_idx], device, args.pretrained)
    # The whole split as one tensor on the device; batches are gathered by index from it.
    run.train_x, run.train_y = (run.data[k][train_idx].to(device) for k in ("train_x", "train_y"))
    run.val_x, run.val_y = (run.data[k][val_idx].to(device) for k in ("train_x", "train_y"))
    run.test_x, run.test_y = run.data["test_x"].to(device), run.data["test_y"].to(device)
    run.test_every = test_curve_every(run)
    run.held_out_seconds, run.pending_steps = 0.0, []
    run.steps_per_epoch = len(run.train_x) // args.batch_size   # the partial last batch: dropped
    if run.steps_per_epoch == 0:
        raise DataError(f"only {len(run.train_x)} training images for batch size "
                        f"{args.batch_size}")
    if run.ckpt is not None and run.ckpt.get("train_size", len(run.train_x)) != len(run.train_x):
        raise DataError(f"{args.data_dir} holds {len(run.train_x)} training images, the run "
                        f"trained on {run.ckpt['train_size']}: resume it with its data")
    # Which images the alternating flip mirrors in even epochs: fixed by the seed alone, so a
    # resumed run flips exactly as an uninterrupted one.
    run.flip_bits = None
    if args.flip == "alternating":
        bit_gen = torch.Generator().manual_seed(args.seed + 1)
        run.flip_bits = (torch.rand(len(run.train_x), generator=bit_gen) < 0.5).to(device)


def normalisation(images, device, pretrained=None):
    """The per-channel mean and std that batches are normalised with, on the training device
    (a copy from the host every batch would wait for a GPU): the training images', or with
    --pretrained the backbone's, as in its ImageNet training."""
    if pretrained:
        mean, std = (torch.tensor(BACKBONES[pretrained][k]) for k in ("mean", "std"))
    else:
        mean, std = channel_stats(images)
    return mean.to(device), std.to(device)


def test_curve_every(run):
    """Every how many epochs TensorBoard's test curve is evaluated (0: never): only without a
    validation split, as --test-every says or within 5 % of the training time (logs.py). Its
    seconds are counted apart from the training's."""
    if len(run.val_x):
        return 0
    if run.args.test_every is not None:
        return run.args.test_every
    return logs.held_out_every(len(run.test_x), len(run.train_x))


def set_up_model(run):
    """The network (an ImageNet backbone with --pretrained), its whitening filters, the
    optimisers, LR schedules and lookahead."""
    args, device = run.args, run.device
    num_classes = len(run.data["classes"])
    if args.pretrained:     # ImageNet weights (a resumed run loads its own over them)
        model = load_backbone(args.pretrained, num_classes, args.conv, args.image_size,
                              imagenet=run.ckpt is None).to(device)
        args.image_size = model.image_size
    else:
        model = build_model(args.model, num_classes, args.conv).to(device)
    if run.world > 1:   # BatchNorm statistics of the whole global batch
        for kind in distributed.global_batchnorm(model):
            run.log(f"note: {kind} layers keep per-process batch statistics under torchrun")
        torch.manual_seed(args.seed + distributed.rank())   # each rank its own dropout masks
    timed = stopwatch(device)
    # From (at most) 5000 normalised training images; a resumed run loads its filters instead.
    if isinstance(model, FastNet) and run.ckpt is None:
        model.init_whitening(normalize(run.train_x[:5000], run.mean, run.std))
    run.timed_seconds = timed()
    run.model, run.optimizers, note = optimize_for_device(model, make_optimizers(model, args),
                                                          device)
    if note:
        run.log(f"note: {note}")
    optimizers = run.optimizers
    run.schedulers = make_schedulers(optimizers, run.steps_per_epoch, args)
    run.lookahead = Lookahead(run.model, args.epochs * run.steps_per_epoch) \
        if args.lookahead else None


def restore(run):
    """A resumed run's weights, optimiser, schedule, RNG and lookahead states, and where in
    which epoch it continues."""
    ckpt = run.ckpt
    run.model.load_state_dict(ckpt["model"])
    # Older files hold one SGD's state rather than a list of them.
    optimizers, schedulers = ([s] if isinstance(s, dict) else s
                              for s in (ckpt["optimizer"], ckpt["scheduler"]))
    if [len(s["param_groups"]) for s in optimizers] != [len(o.param_groups)
                                                       for o in run.optimizers]:
        raise ValueError(f"{run.args.out}'s checkpoint was written by an older version of this "
                         f"repo (other optimiser parameter groups): it cannot resume here; "
                         f"start a new run")
    for obj, state in zip(run.optimizers + run.schedulers, optimizers + schedulers):
        obj.load_state_dict(state)
    notes = set_rng_states(ckpt["rng"], run.data_gen, run.device, distributed.rank(),
                           run.world, reseed=run.args.seed * 1_000_003 + ckpt["epoch"] + 1)
    if notes:
        run.log(f"note: resumed on another machine: {'; '.join(notes)}; the run goes on, "
                f"with other random draws than an uninterrupted one")
    if run.lookahead is not None:
        run.lookahead.load_state_dict(ckpt["lookahead"])
    run.start_epoch = ckpt["epoch"] + 1
    run.partial = ckpt.get("partial")   # a run stopped by a signal within an epoch
    run.log(f"resuming {run.args.out} in epoch {run.start_epoch + 1} after step "
            f"{run.partial['steps']}" if run.partial else
            f"resuming {run.args.out} after epoch {run.start_epoch}")


def choose_conv_plans(run):
    """Which variant of the hand-written conv each layer shape runs (conv/plans.py): a resumed
    run's own; else the fastest, measured by rank 0 on one forward of a batch (the model in
    eval mode: no statistic or RNG changes) and handed to every rank; else, with
    --no-conv-measure or CIFAR_CONV_MEASURE=0, the default ones. Measuring is off afterwards,
    so every rank runs the same variants for the whole run, and a resume runs those too."""
    args = run.args
    conv_plans.set_measuring(None)          # as CIFAR_CONV_MEASURE says (a second --runs run)
    if run.ckpt is not None:
        saved = run.ckpt.get("conv_plans", {})
        kept = {key: plan for key, plan in saved.items() if key.endswith(f" {run.device.type}")}
        if len(kept) < len(saved):
            run.log(f"note: the run's conv variants were measured on another device type; "
                    f"on {run.device.type} every conv runs its default variant")
        conv_plans.use(kept)
    elif distributed.from_rank0(args.conv == "hand" and run.device.type == "cpu" and
                                not args.no_conv_measure and conv_plans.measuring()):
        conv_plans.use({})          # every rank as rank 0 decides (its environment may differ)
        clock = stopwatch(run.device)
        if run.is_main:
            run.model.eval()
            with torch.enable_grad(), run.autocast:
                run.model(normalize(run.train_x[:args.batch_size // run.world], run.mean,
                                    run.std))
            run.model.train()
        conv_plans.use(distributed.from_rank0(conv_plans.chosen()))
        run.log(f"conv variants: {len(conv_plans.chosen())} layer shapes measured in "
                f"{clock():.1f}s (not counted in the times below)")
    else:
        conv_plans.use({})
    conv_plans.set_measuring(False)


def set_up_step_model(run):
    """What the training step calls: the model, in DDP under torchrun, compiled with --compile
    (on one batch before the clock runs, every weight and statistic put back after)."""
    args = run.args
    wrapped = distributed.wrap(run.model, run.device)
    run.step_model = torch.compile(wrapped) if args.compile else wrapped
    if not args.compile:
        return
    saved = {k: v.clone() for k, v in run.model.state_dict().items()}
    compile_clock = stopwatch(run.device)
    # The warm-up's dropout draws leave the RNG as they found it: a resume stays exact.
    with torch.random.fork_rng(devices=[run.device] if accelerator_rng(run.device) else [],
                               device_type=run.device.type), \
            run.autocast:
        run.step_model(normalize(run.train_x[:args.batch_size // run.world], run.mean, run.std)
                       ).float().sum().backward()
    run.model.zero_grad(set_to_none=True)
    run.model.load_state_dict(saved)
    run.log(f"compiled in {compile_clock():.1f}s (not counted in the times below)")


CHECK_IN_EVERY = 20   # steps between the epoch loop's reads from the device (loss, stop flag)


def train_epoch(run, epoch):
    """One epoch of steps (from where a stopped run left it); its sums (loss, hits) and the LR
    of its last step. A stop signal ends it early: checkpoint, then `Stopped`."""
    args, device, n_steps = run.args, run.device, run.steps_per_epoch
    run.epoch_clock = stopwatch(device)
    run.model.train()
    first = 0
    if run.partial is not None and epoch == run.start_epoch:   # this epoch's order and sums
        first, perm = run.partial["steps"], run.partial["perm"].to(device)
        loss_sum, correct = (t.to(device) for t in run.partial["sums"])
    else:
        perm = torch.randperm(len(run.train_x), generator=run.data_gen, device=device)
        loss_sum, correct = torch.zeros((), device=device), torch.zeros((), device=device)
    bar = tqdm(range(first, n_steps), desc=f"epoch {epoch + 1}/{args.epochs}", initial=first,
               total=n_steps, leave=False, file=sys.stderr, dynamic_ncols=True,
               disable=not run.is_main)
    for step in bar:
        x, y = training_batch(run.train_x, run.train_y,
                              perm[step * args.batch_size:(step + 1) * args.batch_size],
                              run.mean, run.std, run.data_gen, epoch, augmentation(args),
                              run.flip_bits)
        lr_used, loss, hits = train_step(run.step_model, run.optimizers, run.schedulers, x, y,
                                         len(run.data["classes"]), args.label_smoothing,
                                         args.grad_clip, run.autocast)
        if run.lookahead is not None:
            run.lookahead.step(epoch * n_steps + step + 1)
        if run.writer is not None:   # held back until a checkpoint covers the step
            run.pending_steps.append((epoch * n_steps + step + 1, loss, lr_used))
        loss_sum += loss
        correct += hits
        check_in = step % CHECK_IN_EVERY == CHECK_IN_EVERY - 1 or step == n_steps - 1
        if check_in:                 # the loop's only reads from the device
            running = loss_sum.item() / (step + 1)
            check_finite(run, running, epoch)
            bar.set_postfix(loss=f"{running:.3f}")
        if step < n_steps - 1 and stop_signalled(run.signals, run.device, check_in):
            bar.close()
            check_finite(run, loss_sum.item() / (step + 1), epoch)
            save_checkpoint(run, epoch - 1, {"steps": step + 1, "perm": perm.cpu(),
                                             "sums": [loss_sum.cpu(), correct.cpu()]})
            raise stop_error(run.signals, args.out,
                          f"in epoch {epoch + 1} after step {step + 1}/{n_steps}")
    bar.close()
    return loss_sum, correct, lr_used


def training_batch(images, labels, idx, mean, std, gen, epoch, augmentation, flip_bits=None):
    """This rank's share of `images[idx]` (uint8, on the device), normalised and augmented as
    `augmentation` (`augment`'s keyword arguments) says with draws from `gen`, and its labels.
    Every rank augments the whole global batch (the same random draws as one process: cheap
    next to the network) and trains on its share of it."""
    flips = None if flip_bits is None else flip_bits[idx]
    x = augment(normalize(images[idx], mean, std), gen, flip_bits=flips, epoch=epoch,
                **augmentation)
    return x[distributed.share()], labels[idx][distributed.share()]


def augmentation(args):
    """`augment`'s keyword arguments for the flags of a run."""
    return {"crop_pad": args.crop_pad, "pad_mode": args.pad_mode, "cutout_size": args.cutout}


def train_step(model, optimizers, schedulers, x, y, num_classes, smoothing, grad_clip,
               autocast):
    """One optimiser step on the batch (x, y); (LR used, loss, hits), the last two left on the
    device: nothing here reads from it."""
    with autocast:
        logits = model(x)
    loss = F.cross_entropy(logits.float(), one_hot(y, num_classes, smoothing))
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(training_parameters(model, optimizers), grad_clip)
    lr_used = logged_lr(optimizers)
    for opt, sched in zip(optimizers, schedulers):
        opt.step()
        sched.step()
    return lr_used, loss.detach(), (logits.argmax(1) == y).sum()


def training_parameters(model, optimizers):
    """The model's parameters but those whose training has ended (a group marked
    `trains_epochs` whose LR is 0 now): what gradient clipping measures."""
    ended = {id(p) for opt in optimizers for g in opt.param_groups
             if "trains_epochs" in g and g["lr"] == 0 for p in g["params"]}
    return [p for p in model.parameters() if id(p) not in ended]


def end_epoch(run, epoch, sums):
    """The epoch's figures (train loss and accuracy over every rank, held-out data), logged
    and written to TensorBoard, then its checkpoint; a stop signal ends the run here."""
    args, (loss_sum, correct, lr_used) = run.args, sums
    if run.lookahead is not None and epoch == args.epochs - 1:
        run.lookahead.finish()      # the final weights are the slow ones
    run.timed_seconds += run.epoch_clock()
    # Each rank summed the mean losses and the hits of its shares: add up over ranks.
    totals = distributed.all_reduce_sum(torch.stack([loss_sum, correct.float()]))
    train_loss = totals[0].item() / (run.steps_per_epoch * run.world)
    train_acc = totals[1].item() / (run.steps_per_epoch * args.batch_size)
    scalars = {"train/loss": train_loss, "train/accuracy": train_acc, "lr": lr_used}
    line = f"epoch {epoch + 1:3d}/{args.epochs}  train loss {train_loss:.4f} acc {train_acc:.4f}"
    held_out = held_out_scalars(run, epoch)
    scalars.update(held_out)
    for split in ("val", "test"):
        if f"{split}/loss" in held_out:
            line += (f"  {split} loss {held_out[f'{split}/loss']:.4f} "
                     f"acc {held_out[f'{split}/accuracy']:.4f}")
    run.log(f"{line}  {time.perf_counter() - run.started:.0f}s")
    if run.writer is not None:
        logs.write_scalars(run.writer, scalars, epoch + 1)
    save_checkpoint(run, epoch)
    if stop_signalled(run.signals, run.device):
        raise stop_error(run.signals, run.args.out, f"after epoch {epoch + 1}")


def held_out_scalars(run, epoch):
    """{"val/loss", "val/accuracy"} every epoch where the run keeps a validation split; else
    {"test/loss", "test/accuracy"} every `run.test_every` epochs but the last (`finish` logs
    that one), for TensorBoard's curve only."""
    if len(run.val_x):
        with run.autocast:
            loss, acc = evaluate(run.model, run.val_x, run.val_y, run.mean, run.std)
        return {"val/loss": loss, "val/accuracy": acc}
    if not run.test_every or (epoch + 1) % run.test_every or epoch + 1 == run.args.epochs:
        return {}
    clock = stopwatch(run.device)
    with run.autocast:
        loss, acc = evaluate(run.model, run.test_x, run.test_y, run.mean, run.std)
    run.held_out_seconds += clock()
    return {"test/loss": loss, "test/accuracy": acc}


def save_checkpoint(run, completed_epoch, partial=None):
    """Everything a resume needs (every rank calls it; rank 0 writes). `partial`: the steps,
    batch order and loss sums of a stopped epoch."""
    rng = rng_states(run.data_gen, distributed.all_gather(process_rng_state(run.device)))
    if not run.is_main:
        return
    ckpt = {"model": run.model.state_dict(),
            "optimizer": [opt.state_dict() for opt in run.optimizers],
            "scheduler": [sched.state_dict() for sched in run.schedulers],
            "epoch": completed_epoch, "rng": rng, "args": vars(run.args),
            "train_size": len(run.train_x),
            "lookahead": run.lookahead.state_dict() if run.lookahead is not None else {},
            "conv_plans": conv_plans.chosen(),
            "precision": "bf16" if run.dtype == torch.bfloat16 else "fp32",
            **({"partial": partial} if partial else {})}
    logs.write_steps(run.writer, run.pending_steps)    # the steps this checkpoint covers
    atomic_save(ckpt, os.path.join(run.args.out, "checkpoint.pt"), keep_previous=True)


def check_finite(run, running, epoch):
    if not math.isfinite(running):
        raise FloatingPointError(
            diverged_message(f"training loss became {running}", run.args, epoch))
    # The loss is that of the weights before the epoch's last update: check those too.
    if not torch.stack([p.isfinite().all() for p in run.model.parameters()]).all():
        raise FloatingPointError(diverged_message("the weights became inf or nan", run.args,
                                                  epoch))


def finish(run):
    """The test set, touched once here after every choice has been made (with and without
    TTA), the weights file, TensorBoard's last entries and the run's one-line summary."""
    args, device, model = run.args, run.device, run.model
    eval_clock = stopwatch(device)
    with run.autocast:
        tta_loss, test_acc, predictions = evaluate(model, run.test_x, run.test_y, run.mean,
                                                   run.std, tta=args.tta, predictions=True)
    run.timed_seconds += eval_clock()
    with run.autocast:
        test_loss, test_acc_plain = evaluate(model, run.test_x, run.test_y, run.mean, run.std) \
            if args.tta else (tta_loss, test_acc)
    weights_path = os.path.join(args.out, "weights.pt")
    if run.is_main:
        atomic_save({"model": args.model, "dataset": args.dataset,
                     "classes": run.data["classes"], "mean": run.mean.tolist(),
                     "std": run.std.tolist(),
                     "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
                     "test_accuracy": test_acc, "tta": args.tta,
                     "test_accuracy_without_tta": test_acc_plain, "epochs": args.epochs,
                     "train_seconds": run.timed_seconds,
                     "pretrained": bool(args.pretrained), "image_size": args.image_size},
                    weights_path)
        write_final_logs(run, {"test/loss": test_loss, "test/accuracy": test_acc_plain,
                               **({"test/accuracy_tta": test_acc} if args.tta else {})},
                         predictions)
        tta_note = f" with TTA {args.tta} ({test_acc_plain:.4f} without)" if args.tta else ""
        processes = f" x {run.world} processes" if run.world > 1 else ""
        curve = (f"; the test curve's evaluations took {run.held_out_seconds:.1f}s more"
                 if run.held_out_seconds else "")
        print(f"done: {run_label(args)} on {args.dataset}, {args.epochs} epochs in "
              f"{time.perf_counter() - run.started:.0f}s on {describe(device)}{processes} "
              f"({run.timed_seconds:.1f}s of whitening, training steps and test evaluation"
              f"{curve}); test accuracy {test_acc:.4f}{tta_note}; weights {weights_path}")
    return {"accuracy": test_acc, "accuracy_without_tta": test_acc_plain,
            "seconds": run.timed_seconds}


def write_final_logs(run, scalars, predictions):
    """TensorBoard's last entries: the test set's figures (the end of its curve), the hparams
    with them, the confusion matrix and misclassified images of its `predictions` (with the
    run's TTA)."""
    args, epoch = run.args, run.args.epochs
    final = scalars.get("test/accuracy_tta", scalars["test/accuracy"])
    logs.write_scalars(run.writer, scalars, epoch)
    logs.write_hparams(run.writer, args, {"test_accuracy": final,
                                          "test_accuracy_without_tta": scalars["test/accuracy"],
                                          "train_seconds": run.timed_seconds})
    logs.write_test_figures(run.writer, run.data, predictions, epoch,
                            f"{run_label(args)}: test set, {final:.2%}")


def train_runs(args, argv):
    """--runs N: N trainings with seeds seed..seed+N-1 in RUN_DIR/run<i>, then the mean and
    standard deviation of their test accuracies (as airbench reports)."""
    if args.runs == 1:
        return [train(args, argv)]
    results, out, seed = [], args.out, args.seed
    for i in range(args.runs):
        args.out, args.seed = os.path.join(out, f"run{i}"), seed + i
        results.append(train(args, argv))
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
        train_runs(args, sys.argv[1:] if argv is None else argv)
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
