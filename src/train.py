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
import math
import os
import sys
import time
from contextlib import ExitStack

import torch
import torch.nn.functional as F
from tqdm import tqdm

import cli
import distributed
import logs
from checkpoint import (Checkpoint, atomic_save, process_rng_state, rng_states, save_checkpoint,
                        saved_flags)
from conv import plans as conv_plans
from data import DataError, augment, normalize, one_hot
from device import describe, stopwatch
from distributed import log
from evaluate import evaluate
from optim import logged_lr, stop_ended_gradients
from preemption import Stopped, deferred_stop_signals, stop_error, stop_signalled
from pretrained import PretrainedError
from run_setup import get_args, run_label, set_up


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


def train(args, argv=()):
    """One training run, stopping at a step boundary on SIGTERM or SIGINT (see `Stopped`):
    set up, train epoch after epoch (each ending in a checkpoint), evaluate on the test set.
    `argv`: the command line's flags, for TensorBoard's card of the run."""
    with deferred_stop_signals() as signals, ExitStack() as closing:
        run = set_up(args, list(argv), signals, closing)
        for epoch in range(run.start_epoch, run.args.epochs):
            end_epoch(run, epoch, train_epoch(run, epoch))
        return finish(run)


CHECK_IN_EVERY = 20   # steps between the epoch loop's reads from the device (loss, stop flag)


def train_epoch(run, epoch):
    """One epoch of steps (from where a stopped run left it): the sums of its losses and hits,
    the LR of its last step, and its clock (`stopwatch`, still running). A stop signal ends it
    early: checkpoint, `Stopped`."""
    args, split, n_steps = run.args, run.split, run.steps_per_epoch
    clock = stopwatch(run.device)
    run.model.train()
    if run.world == 1:
        stop_ended_gradients(run.optimizers, epoch)
    first, perm, loss_sum, correct = epoch_start(run, epoch)
    bar = tqdm(range(first, n_steps), desc=f"epoch {epoch + 1}/{args.epochs}", initial=first,
               total=n_steps, leave=False, file=sys.stderr, dynamic_ncols=True,
               disable=not run.is_main)
    for step in bar:
        idx = perm[step * args.batch_size:(step + 1) * args.batch_size]
        x, y = training_batch(split.train_x, split.train_y, idx, split.mean, split.std,
                              run.data_gen, epoch, augmentation(args), split.flip_bits)
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
            save(run, epoch - 1, {"steps": step + 1, "perm": perm.cpu(),
                                  "sums": [loss_sum.cpu(), correct.cpu()]}, clock())
            raise stop_error(run.signals, args.out,
                             f"in epoch {epoch + 1} after step {step + 1}/{n_steps}")
    bar.close()
    return loss_sum, correct, lr_used, clock


def epoch_start(run, epoch):
    """(first step, batch order, loss sum, hit count) of an epoch: a new order and zero sums,
    or those of the epoch a resumed run stopped in."""
    device = run.device
    if run.partial is not None and epoch == run.start_epoch:
        loss_sum, correct = (t.to(device) for t in run.partial["sums"])
        return run.partial["steps"], run.partial["perm"].to(device), loss_sum, correct
    perm = torch.randperm(len(run.split.train_x), generator=run.data_gen, device=device)
    return 0, perm, torch.zeros((), device=device), torch.zeros((), device=device)


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
    args, (loss_sum, correct, lr_used, clock) = run.args, sums
    if run.lookahead is not None and epoch == args.epochs - 1:
        run.lookahead.finish()      # the final weights are the slow ones
    run.timed_seconds += clock()
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
    log(f"{line}  {time.perf_counter() - run.started:.0f}s")
    if run.writer is not None:
        logs.write_scalars(run.writer, scalars, epoch + 1)
    save(run, epoch)
    if stop_signalled(run.signals, run.device):
        raise stop_error(run.signals, run.args.out, f"after epoch {epoch + 1}")


def held_out_scalars(run, epoch):
    """{"val/loss", "val/accuracy"} every epoch where the run keeps a validation split; else
    {"test/loss", "test/accuracy"} every `run.test_every` epochs but the last (`finish` logs
    that one), for TensorBoard's curve only."""
    split = run.split
    if len(split.val_x):
        with run.autocast:
            loss, acc = evaluate(run.model, split.val_x, split.val_y, split.mean, split.std)
        return {"val/loss": loss, "val/accuracy": acc}
    if not run.test_every or (epoch + 1) % run.test_every or epoch + 1 == run.args.epochs:
        return {}
    clock = stopwatch(run.device)
    with run.autocast:
        loss, acc = evaluate(run.model, split.test_x, split.test_y, split.mean, split.std)
    run.held_out_seconds += clock()
    return {"test/loss": loss, "test/accuracy": acc}


def save(run, completed_epoch, partial=None, partial_seconds=0.0):
    """The run's checkpoint after `completed_epoch` (`partial`: the steps, batch order and loss
    sums of a stopped epoch, whose steps took `partial_seconds`). Every rank calls it (each
    one's random states are kept); rank 0 writes it, just after the TensorBoard scalars of the
    steps it covers."""
    rng = rng_states(run.data_gen, distributed.all_gather(process_rng_state(run.device)))
    if not run.is_main:
        return
    logs.write_steps(run.writer, run.pending_steps)
    save_checkpoint(Checkpoint(
        model=run.model.state_dict(), optimizer=[opt.state_dict() for opt in run.optimizers],
        scheduler=[sched.state_dict() for sched in run.schedulers], epoch=completed_epoch,
        rng=rng, args=run_flags(run), train_size=len(run.split.train_x),
        lookahead=run.lookahead.state_dict() if run.lookahead is not None else {},
        conv_plans=conv_plans.chosen(), partial=partial,
        precision="bf16" if run.dtype == torch.bfloat16 else "fp32",
        seconds={"wall": time.perf_counter() - run.started,
                 "timed": run.timed_seconds + partial_seconds,
                 "held_out": run.held_out_seconds, "starts": run.starts}), run.args.out)


def run_flags(run):
    """The flags checkpoints and TensorBoard keep: all but which were typed, with a backbone's
    resolution as it ran."""
    return saved_flags(run.args) | ({"image_size": run.image_size} if run.image_size else {})


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
    args, device, model, split = run.args, run.device, run.model, run.split
    test_acc, test_acc_plain, test_loss, predictions, seconds = with_and_without_tta(
        run, split.test_x, split.test_y)
    run.timed_seconds += seconds
    val_note, val_acc = final_validation(run)
    weights_path = os.path.join(args.out, "weights.pt")
    if run.is_main:
        atomic_save({"model": args.model, "dataset": args.dataset,
                     "classes": run.data["classes"], "mean": split.mean.tolist(),
                     "std": split.std.tolist(),
                     "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
                     "test_accuracy": test_acc, "tta": args.tta,
                     "test_accuracy_without_tta": test_acc_plain, "epochs": args.epochs,
                     "train_seconds": run.timed_seconds,
                     "pretrained": bool(args.pretrained), "image_size": run.image_size},
                    weights_path)
        write_final_logs(run, {"test/loss": test_loss, "test/accuracy": test_acc_plain,
                               **({"test/accuracy_tta": test_acc} if args.tta else {})},
                         predictions)
        tta_note = f" with TTA {args.tta} ({test_acc_plain:.4f} without)" if args.tta else ""
        processes = f" x {run.world} processes" if run.world > 1 else ""
        curve = (f"; the test curve's evaluations took {run.held_out_seconds:.1f}s more"
                 if run.held_out_seconds else "")
        print(f"done: {run_label(args)} on {args.dataset}, {args.epochs} epochs in "
              f"{time.perf_counter() - run.started:.0f}s{over_starts(run.starts)} on "
              f"{describe(device)}{processes} "
              f"({run.timed_seconds:.1f}s of whitening, training steps and test evaluation"
              f"{curve}); {val_note}test accuracy {test_acc:.4f}{tta_note}; weights "
              f"{weights_path}")
    return {"accuracy": test_acc, "accuracy_without_tta": test_acc_plain,
            "seconds": run.timed_seconds, "val_accuracy": val_acc}


def final_validation(run):
    """("validation accuracy A with TTA t (B without); ", A) for a run that holds a validation
    split: the figure to tune on, with the TTA the test gets. ("", None) without one."""
    args, split = run.args, run.split
    if not len(split.val_x):
        return "", None
    acc, plain, *_ = with_and_without_tta(run, split.val_x, split.val_y)
    tta = f" with TTA {args.tta} ({plain:.4f} without)" if args.tta else ""
    return f"validation accuracy {acc:.4f}{tta}; ", acc


def with_and_without_tta(run, images, labels):
    """The final model's (accuracy with the run's TTA, accuracy and loss without, predictions
    with TTA, seconds of the evaluation with TTA): one evaluation where the run has no TTA."""
    split, tta = run.split, run.args.tta
    clock = stopwatch(run.device)
    with run.autocast:
        tta_loss, acc, predictions = evaluate(run.model, images, labels, split.mean, split.std,
                                              tta=tta, predictions=True)
    seconds = clock()
    with run.autocast:
        loss, plain = evaluate(run.model, images, labels, split.mean,
                               split.std) if tta else (tta_loss, acc)
    return acc, plain, loss, predictions, seconds


def over_starts(starts):
    """A resumed run's times are summed over its processes: "" or " over 3 starts (the run
    and its 2 resumes)"."""
    if starts == 1:
        return ""
    resumes = "its resume" if starts == 2 else f"its {starts - 1} resumes"
    return f" over {starts} starts (the run and {resumes})"


def write_final_logs(run, scalars, predictions):
    """TensorBoard's last entries: the test set's figures (the end of its curve), the hparams
    with them, the confusion matrix and misclassified images of its `predictions` (with the
    run's TTA)."""
    args, epoch = run.args, run.args.epochs
    final = scalars.get("test/accuracy_tta", scalars["test/accuracy"])
    logs.write_scalars(run.writer, scalars, epoch)
    logs.write_hparams(run.writer, run_flags(run), {
        "test_accuracy": final, "test_accuracy_without_tta": scalars["test/accuracy"],
        "train_seconds": run.timed_seconds})
    logs.write_test_figures(run.writer, run.data, predictions, epoch,
                            f"{run_label(args)}: test set, {final:.2%}")


def train_runs(args, argv):
    """--runs N: N trainings with seeds seed..seed+N-1 in RUN_DIR/run<i>, then the mean and
    standard deviation of their test accuracies (as airbench reports)."""
    if args.runs == 1:
        return [train(args, argv)]
    results = [train(argparse.Namespace(**{**vars(args), "out": os.path.join(args.out, f"run{i}"),
                                            "seed": args.seed + i}), argv)
               for i in range(args.runs)]

    def mean_std(key, digits):
        values = torch.tensor([r[key] for r in results], dtype=torch.float64)
        return f"{values.mean():.{digits}f} ± {values.std():.{digits}f}"
    line = f"{args.runs} runs of {args.preset}: test accuracy {mean_std('accuracy', 4)}"
    if args.tta:
        line += f" with TTA {args.tta}, {mean_std('accuracy_without_tta', 4)} without"
    if results[0]["val_accuracy"] is not None:
        line += f"; validation accuracy {mean_std('val_accuracy', 4)}"
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
