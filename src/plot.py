"""Figures from the TensorBoard events of training runs (what train.py logs: logs.py).

    python src/plot.py RUN_DIR                 # accuracy.png, loss_lr.png, confusion_matrix.png
    python src/plot.py RUN_DIR RUN_DIR ...     # comparison.png: the runs side by side

One run's figures go into its folder, a comparison into runs/comparison, unless --out-dir says
otherwise. The held-out curve is the validation split's where the run kept one, else the test
set's (evaluated every few epochs for display only).
"""
import os
import re

import cli

HELD_OUT = (("val", "validation (held-out split)"), ("test", "test set (display only)"))


def read_run(run_dir):
    """{tag: [(step, value)]} of every scalar of a run folder, the last value written winning
    where a step repeats (plus "steps per epoch" from the run's card, where it has one), and
    {tag: PNG bytes} of its images (the last of each)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(run_dir, size_guidance={"scalars": 0, "images": 0,
                                                      "tensors": 0})
    events.Reload()
    scalars = {tag: sorted({e.step: e.value for e in events.Scalars(tag)}.items())
               for tag in events.Tags()["scalars"]}
    if "train/accuracy" not in scalars:
        raise ValueError(f"no training scalars in the TensorBoard events of {run_dir}")
    if "run/text_summary" in events.Tags()["tensors"]:
        card = events.Tensors("run/text_summary")[-1].tensor_proto.string_val[0].decode()
        found = re.search(r"\| steps per epoch \| (\d+) \|", card)
        if found:
            scalars["steps per epoch"] = int(found.group(1))
    images = {tag: events.Images(tag)[-1].encoded_image_string
              for tag in events.Tags()["images"]}
    return scalars, images


def held_out(scalars):
    """(split, its label, [(epoch, accuracy)]): validation where logged, else the test set's
    curve, else (None, None, [])."""
    for split, label in HELD_OUT:
        if f"{split}/accuracy" in scalars:
            return split, label, scalars[f"{split}/accuracy"]
    return None, None, []


def step_epochs(scalars):
    """The per-step scalars' x in epochs: steps / the run card's steps per epoch (a card
    without them: the last step over the last whole epoch, right for a run that ended)."""
    per_epoch = scalars.get("steps per epoch")
    if per_epoch is None:
        steps, epochs = scalars.get("step/loss", []), scalars["train/loss"]
        per_epoch = max(1, round(steps[-1][0] / epochs[-1][0])) if steps else 1
    return lambda step: step / per_epoch


def pyplot():
    """matplotlib's pyplot drawing off-screen (imported when first drawn: it is slow)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def integer_epochs(ax):
    import matplotlib.ticker
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)


def accuracy_figure(scalars, title, out):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.plot(*zip(*scalars["train/accuracy"]), label="train (augmented batches)",
            color="tab:gray", linestyle="--")
    _, label, curve = held_out(scalars)
    if curve:
        ax.plot(*zip(*curve), label=label, color="tab:blue", marker="o", markersize=3)
        best_epoch, best = max(curve, key=lambda p: p[1])
        ax.annotate(f"{best:.2%}", (best_epoch, best), textcoords="offset points",
                    xytext=(-20, 8))
    if "test/accuracy_tta" in scalars:
        epoch, value = scalars["test/accuracy_tta"][-1]
        ax.plot([epoch], [value], "*", color="tab:red", markersize=10,
                label=f"test set with TTA: {value:.2%}")
    ax.set(ylabel="accuracy", title=title)
    integer_epochs(ax)
    ax.legend(loc="lower right")
    save(fig, out)
    return curve


def loss_lr_figure(scalars, title, out):
    plt = pyplot()
    fig, (loss_ax, lr_ax) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=120)
    to_epochs = step_epochs(scalars)
    if "step/loss" in scalars:
        steps = scalars["step/loss"]
        loss_ax.plot([to_epochs(s) for s, _ in steps], [v for _, v in steps], color="tab:gray",
                     alpha=0.5, linewidth=0.8, label="train, each step")
    loss_ax.plot(*zip(*scalars["train/loss"]), color="black", marker="o", markersize=3,
                 label="train, epoch mean")
    split, label, _ = held_out(scalars)
    if split and f"{split}/loss" in scalars:
        loss_ax.plot(*zip(*scalars[f"{split}/loss"]), color="tab:blue", marker="o",
                     markersize=3, label=label)
    loss_ax.set(ylabel="cross-entropy loss", title="loss")
    loss_ax.legend(loc="best")
    lr = scalars.get("step/lr") or scalars.get("lr", [])
    lr_x = [to_epochs(s) for s, _ in lr] if "step/lr" in scalars else [s for s, _ in lr]
    lr_ax.plot(lr_x, [v for _, v in lr], color="tab:green")
    lr_ax.set(ylabel="learning rate", title="learning rate")
    for ax in (loss_ax, lr_ax):
        integer_epochs(ax)
    fig.suptitle(title)
    save(fig, out)


def comparison_figure(runs, out):
    """Held-out accuracy and training loss per epoch of several runs [(name, scalars)], one
    colour each."""
    plt = pyplot()
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    for name, scalars in runs:
        _, _, curve = held_out(scalars)
        final = scalars.get("test/accuracy_tta", scalars.get("test/accuracy", [(0, None)]))[-1][1]
        label = name + (f" ({final:.2%})" if final is not None else "")
        line = acc_ax.plot(*zip(*(curve or scalars["train/accuracy"])), marker="o",
                           markersize=3, label=label + ("" if curve else ", train"))[0]
        loss_ax.plot(*zip(*scalars["train/loss"]), color=line.get_color(), label=name)
    acc_ax.set(ylabel="held-out accuracy (validation, else test)",
               title="accuracy (legend: final test accuracy)")
    loss_ax.set(ylabel="training loss (epoch mean)", title="training loss")
    for ax in (acc_ax, loss_ax):
        integer_epochs(ax)
    acc_ax.legend(loc="lower right", fontsize=8)
    loss_ax.legend(loc="upper right", fontsize=8)
    save(fig, out)


def save(fig, out):
    fig.tight_layout()
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    fig.savefig(out)
    fig.clf()
    pyplot().close(fig)


def plot_run(run_dir, out_dir, title=None):
    """A run's figures into out_dir; [paths written], and the held-out curve."""
    scalars, images = read_run(run_dir)
    title = title or os.path.basename(os.path.normpath(run_dir))
    written = [os.path.join(out_dir, name) for name in ("accuracy.png", "loss_lr.png")]
    curve = accuracy_figure(scalars, title, written[0])
    loss_lr_figure(scalars, title, written[1])
    if "test/confusion_matrix" in images:     # drawn by train.py at the end of the run
        written.append(os.path.join(out_dir, "confusion_matrix.png"))
        with open(written[-1], "wb") as f:
            f.write(images["test/confusion_matrix"])
    return written, curve


def run_names(run_dirs):
    """Each folder's name, or its path where two share a name (run0 of two --runs trainings)."""
    names = [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    return [n if names.count(n) == 1 else os.path.normpath(d) for n, d in zip(names, run_dirs)]


def main(argv=None):
    p = cli.parser(__file__, __doc__)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out-dir", help="where the PNGs go (default: the run's folder; "
                                     "runs/comparison for several runs)")
    p.add_argument("--title", help="one run: the figures' title (default: its folder's name)")
    args = p.parse_args(argv)
    for run_dir in args.run_dirs:
        if not os.path.isdir(run_dir):
            cli.fail(f"no run folder at {run_dir}")
    try:
        if len(args.run_dirs) == 1:
            out_dir = args.out_dir or args.run_dirs[0]
            written, curve = plot_run(args.run_dirs[0], out_dir, args.title)
            summary = (f"best held-out accuracy {max(v for _, v in curve):.4f} over "
                       f"{len(curve)} evaluations" if curve else "no held-out curve")
        else:
            runs = [(name, read_run(d)[0]) for name, d in zip(run_names(args.run_dirs),
                                                               args.run_dirs)]
            written = [os.path.join(args.out_dir or os.path.join("runs", "comparison"),
                                    "comparison.png")]
            comparison_figure(runs, written[0])
            summary = f"{len(runs)} runs compared"
    except ValueError as e:
        cli.fail(str(e))
    print(f"wrote {', '.join(written)}: {summary}")


if __name__ == "__main__":
    main()
