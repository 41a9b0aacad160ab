"""What a training run shows in TensorBoard, all in the run folder's event files:

- TEXT, "run": a card with the command, the git commit, the machine, the precision and seed;
- SCALARS at the global step (the optimiser steps so far): `step/loss` (under torchrun,
  rank 0's share of the batch) and `step/lr`, every step;
- SCALARS at the epoch (1, 2, ...): `train/loss`, `train/accuracy` and `lr` over the epoch,
  `val/loss` and `val/accuracy` where the run keeps a validation split, otherwise `test/loss`
  and `test/accuracy` every few epochs (`held_out_every`): a curve to look at, never to
  choose a recipe by (train.py's `finish` touches the test set for its result once, at the
  end); at the last epoch `test/loss` and `test/accuracy` are that result without TTA,
  and `test/accuracy_tta` with it;
- HPARAMS: the run's flags with its final test accuracies and training seconds;
- IMAGES, at the end: the test set's confusion matrix and a grid of misclassified test
  images.

The steps' scalars are held back and written (and flushed) just before the checkpoint that
covers them, the epoch's scalars just before the epoch's checkpoint, so a resumed run
continues its curves with no gap and no step twice. Only a process killed in the moment
between those writes and the checkpoint's leaves steps that its resume writes again, with
the same values (a resume is exact); plot.py keeps one of each.
"""
import math
import os
import shlex
import subprocess

import torch

from evaluate import confusion_matrix
from plot import pyplot

FORWARD_SHARE = 1 / 3        # a forward pass costs about a third of a training step per image
HELD_OUT_BUDGET = 0.05       # the test-set curve may cost this share of the training time


def held_out_every(n_test, n_train):
    """Every how many epochs the test set is evaluated for its curve: as often as keeps the
    estimated cost (n_test forward passes against n_train training steps' worth of images)
    within HELD_OUT_BUDGET of an epoch; every 2 epochs for CIFAR's 10,000 / 50,000."""
    return max(1, math.ceil(n_test * FORWARD_SHARE / (HELD_OUT_BUDGET * n_train)))


def git_commit():
    """The commit of the checkout src/ is in, "+ uncommitted changes" where it has any; or
    why there is none to name."""
    here = os.path.dirname(os.path.abspath(__file__))

    def git(*args):
        return subprocess.run(["git", "-C", here, *args], capture_output=True, text=True,
                              timeout=10)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode:
            return "not a git checkout"
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (git did not run)"
    return head.stdout.strip() + (" + uncommitted changes" if dirty else "")


def run_card(args, argv, world, machine, precision, steps_per_epoch):
    """The TEXT card of a run, in Markdown: how to repeat it and where it ran. plot.py reads
    its steps per epoch back."""
    launcher = f"torchrun --nproc_per_node={world}" if world > 1 else "python"
    rows = [("command", f"`{launcher} {shlex.join(['src/train.py', *argv])}`"),
            ("commit", git_commit()), ("machine", machine), ("precision", precision),
            ("seed", str(args.seed)), ("steps per epoch", str(steps_per_epoch)),
            ("torch", torch.__version__)]
    return "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def write_card(writer, card, step):
    """The card at the global step the run starts (or resumes) from: a resumed run adds its
    own."""
    writer.add_text("run", card, step)


def write_steps(writer, steps):
    """Write held-back steps [(global step, loss tensor, lr)] (one device sync for them all)
    and empty the list. Called as the checkpoint that covers them is written."""
    if not steps:
        return
    losses = torch.stack([loss for _, loss, _ in steps]).float().tolist()
    for (step, _, lr), loss in zip(steps, losses):
        writer.add_scalar("step/loss", loss, step)
        writer.add_scalar("step/lr", lr, step)
    writer.flush()
    steps.clear()


def write_scalars(writer, scalars, epoch):
    for name, value in scalars.items():
        writer.add_scalar(name, value, epoch)
    writer.flush()


def hparams(flags):
    """The run's flags ({name: value}) as TensorBoard takes them: numbers, strings and booleans
    (None as "none", lists as text)."""
    values = {}
    for name, value in sorted(flags.items()):
        if value is None:
            value = "none"
        elif not isinstance(value, (bool, int, float, str)):
            value = str(value)
        values[name] = value
    return values


def write_hparams(writer, flags, metrics):
    """The HPARAMS entry: the flags ({name: value}), and `metrics` ({name: number}) as its
    columns, in this run's own event file (SummaryWriter.add_hparams would open a second run
    folder)."""
    from torch.utils.tensorboard.summary import hparams as hparams_summary
    metric_tags = {f"hparams/{name}": value for name, value in metrics.items()}
    for summary in hparams_summary(hparams(flags), metric_tags):
        writer._get_file_writer().add_summary(summary)
    for tag, value in metric_tags.items():
        writer.add_scalar(tag, value, flags["epochs"])


def confusion_figure(confusion, classes, title):
    plt = pyplot()
    share = confusion.double() / confusion.sum(1, keepdim=True).clamp(min=1)
    fig, ax = plt.subplots(figsize=(6.4, 5.6), dpi=110)
    ax.imshow(share.numpy(), cmap="Blues", vmin=0, vmax=1)
    n = len(classes)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{int(confusion[i, j])}", ha="center", va="center", fontsize=7,
                    color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set(xlabel="predicted", ylabel="true class", title=title)
    fig.tight_layout()
    return fig


def misclassified_figure(images, labels, predictions, classes, count=32):
    """The first `count` misclassified images (uint8, N x 3 x H x W), each titled
    "true -> predicted"."""
    plt = pyplot()
    wrong = (labels != predictions).nonzero().flatten()[:count].cpu()
    cols = 8
    rows = max(1, math.ceil(len(wrong) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.3, rows * 1.5), dpi=110,
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, wrong.tolist()):
        ax.imshow(images[i].cpu().permute(1, 2, 0).numpy())
        ax.set_title(f"{classes[labels[i]]}\n-> {classes[predictions[i]]}", fontsize=7)
    fig.tight_layout()
    return fig


def write_test_figures(writer, data, predictions, epoch, title):
    """The confusion matrix and the misclassified images of the test set's predictions."""
    labels, classes = data["test_y"], data["classes"]
    confusion = confusion_matrix(labels, predictions, len(classes))
    writer.add_figure("test/confusion_matrix", confusion_figure(confusion, classes, title),
                      epoch)
    writer.add_figure("test/misclassified", misclassified_figure(
        data["test_x"], labels.cpu(), predictions.cpu(), classes), epoch)
    writer.flush()
