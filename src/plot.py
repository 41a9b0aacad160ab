"""Draw validation (and training) accuracy per epoch from a run's TensorBoard event files.

    python src/plot.py runs/seed-cifar10 --out docs/resources/validation_accuracy_graph.png
"""
import os

import cli


def read_scalars(run_dir, tag):
    """[(epoch, value)] of one scalar tag across all event files of a run folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(run_dir)
    events.Reload()
    if tag not in events.Tags()["scalars"]:
        raise ValueError(f"no '{tag}' scalars in the TensorBoard events of {run_dir}")
    # A resumed run may log an epoch twice: the last value written wins.
    return sorted({e.step: e.value for e in events.Scalars(tag)}.items())


def plot(run_dir, out, title=None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    val = read_scalars(run_dir, "val/accuracy")
    train = read_scalars(run_dir, "train/accuracy")
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.plot(*zip(*train), label="train (augmented batches)", color="tab:gray", linestyle="--")
    ax.plot(*zip(*val), label="validation (held-out split)", color="tab:blue", marker="o",
            markersize=3)
    best_epoch, best = max(val, key=lambda p: p[1])
    ax.annotate(f"{best:.2%}", (best_epoch, best), textcoords="offset points", xytext=(-20, 8))
    ax.set(xlabel="epoch", ylabel="accuracy", title=title or os.path.basename(run_dir.rstrip("/")))
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return val


def main(argv=None):
    p = cli.parser(__file__, __doc__)
    p.add_argument("run_dir")
    p.add_argument("--out", default="docs/resources/validation_accuracy_graph.png")
    p.add_argument("--title")
    args = p.parse_args(argv)
    if not os.path.isdir(args.run_dir):
        cli.fail(f"no run folder at {args.run_dir}")
    try:
        val = plot(args.run_dir, args.out, args.title)
    except ValueError as e:
        cli.fail(str(e))
    print(f"wrote {args.out}: {len(val)} epochs, best validation accuracy "
          f"{max(v for _, v in val):.4f}")


if __name__ == "__main__":
    main()
