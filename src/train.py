"""Train a CIFAR network whose convolutions are written by hand.

    python src/train.py --model seed --epochs 25 --data-dir data

The whole dataset sits on the training device as one uint8 tensor; each step indexes a batch
out of this epoch's permutation, normalises and augments it there, and takes one SGD step.
Every epoch logs to TensorBoard (in the run folder) and writes a checkpoint atomically, so
`--resume RUN_DIR` continues exactly where an interrupted run stopped.
"""
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import cli
from data import (DATASETS, DataError, augment, channel_stats, load_cifar, load_torch_file,
                  normalize, one_hot, stratified_split)
from device import describe, optimize_for_device, pick_device
from model import MODELS, build_model, predict_logits

# Hyperparameters per network, in one place. Flags given on the command line override them.
PRESETS = {
    "seed": {
        "epochs": 25,
        "batch_size": 128,
        "lr": 0.05,              # peak of the one-cycle schedule (SGD, Nesterov momentum 0.9)
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "label_smoothing": 0.1,  # soft one-hot targets: a little less over-confidence
        "warmup": 0.15,          # fraction of all steps spent ramping the LR up; the rest decays
        "crop_pad": 4,           # random crops from a 4-pixel zero-padded image, plus flips
    },
}


CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "epoch", "rng", "args")


def get_args(argv=None):
    p = cli.parser(__doc__.split("\n\n")[0])
    p.add_argument("--model", default="seed", choices=sorted(MODELS))
    p.add_argument("--dataset", default="cifar10", choices=sorted(DATASETS))
    p.add_argument("--epochs", type=int, help="default: the model's preset (25 for seed)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--label-smoothing", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-size", type=int, default=5000,
                   help="training images held out for validation (stratified)")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="run folder (default: runs/<model>-<timestamp>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run saved in RUN_DIR")
    args = p.parse_args(argv)
    for key, value in PRESETS[args.model].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.epochs < 1 or args.batch_size < 1 or args.val_size < 1:
        p.error("--epochs, --batch-size and --val-size must be at least 1")
    if not 0 <= args.label_smoothing < 1:
        p.error("--label-smoothing must be in [0, 1)")
    if args.out is None:
        args.out = os.path.join("runs", f"{args.model}-{time.strftime('%Y%m%d-%H%M%S')}")
    return args


def atomic_save(obj, path):
    """Write to a temp file beside `path`, then rename: a crash never leaves half a file."""
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


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


def evaluate(model, images, labels, mean, std):
    """(cross-entropy against the hard labels, accuracy) over a whole split."""
    logits = predict_logits(model, images, mean, std)
    loss = F.cross_entropy(logits, labels).item()
    return loss, (logits.argmax(1) == labels).float().mean().item()


def train(args):
    from torch.utils.tensorboard import SummaryWriter  # slow import: only when training

    resume_ckpt = None
    if args.resume:
        resume_ckpt = load_torch_file(os.path.join(args.resume, "checkpoint.pt"), "checkpoint",
                                      CHECKPOINT_KEYS)
        run_dir, device_flag = args.resume, args.device
        args.__dict__.update(resume_ckpt["args"])       # the run continues with its own flags
        args.resume, args.out, args.device = run_dir, run_dir, device_flag

    # A bad --device or dataset fails with its one line before anything else is printed.
    device = pick_device(args.device, verbose=False)
    data = load_cifar(args.data_dir, args.dataset)
    print(f"device: {describe(device)}", file=sys.stderr)
    torch.manual_seed(args.seed)
    data_gen = torch.Generator(device=device).manual_seed(args.seed)
    num_classes = len(data["classes"])
    train_idx, val_idx = stratified_split(data["train_y"], args.val_size, seed=args.seed)
    mean, std = channel_stats(data["train_x"][train_idx])
    # The whole split as one tensor on the device; batches are gathered by index from it.
    train_x, train_y = data["train_x"][train_idx].to(device), data["train_y"][train_idx].to(device)
    val_x, val_y = data["train_x"][val_idx].to(device), data["train_y"][val_idx].to(device)
    steps_per_epoch = len(train_x) // args.batch_size   # the partial last batch is dropped
    if steps_per_epoch == 0:
        raise DataError(f"only {len(train_x)} training images for batch size {args.batch_size}")

    model = build_model(args.model, num_classes).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                nesterov=True, weight_decay=args.weight_decay)
    model, optimizer = optimize_for_device(model, optimizer, device)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch,
        pct_start=args.warmup, anneal_strategy="linear", div_factor=10, final_div_factor=100,
        cycle_momentum=False)

    start_epoch = 0
    if resume_ckpt is not None:
        model.load_state_dict(resume_ckpt["model"])
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        scheduler.load_state_dict(resume_ckpt["scheduler"])
        set_rng_states(resume_ckpt["rng"], data_gen)
        start_epoch = resume_ckpt["epoch"] + 1
        print(f"resuming {args.out} after epoch {start_epoch}", file=sys.stderr)

    os.makedirs(args.out, exist_ok=True)
    writer = SummaryWriter(args.out)
    print(f"{args.model}: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{len(train_x)} train / {len(val_x)} val images, {steps_per_epoch} steps per epoch, "
          f"logs in {args.out}", file=sys.stderr)

    started = time.perf_counter()
    for epoch in range(start_epoch, args.epochs):
        model.train()
        perm = torch.randperm(len(train_x), generator=data_gen, device=device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}",
                   leave=False, file=sys.stderr, dynamic_ncols=True)
        for step in bar:
            idx = perm[step * args.batch_size:(step + 1) * args.batch_size]
            x = augment(normalize(train_x[idx], mean, std), data_gen, args.crop_pad)
            y = train_y[idx]
            logits = model(x)
            loss = F.cross_entropy(logits, one_hot(y, num_classes, args.label_smoothing))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach()
            correct += (logits.argmax(1) == y).sum()
            if step % 50 == 49 or step == steps_per_epoch - 1:   # one device sync per 50 steps
                running = loss_sum.item() / (step + 1)
                if not math.isfinite(running):
                    raise FloatingPointError(
                        f"training loss became {running} in epoch {epoch + 1}; "
                        f"try a lower --lr (now {args.lr})")
                bar.set_postfix(loss=f"{running:.3f}")
        bar.close()

        train_loss = loss_sum.item() / steps_per_epoch
        train_acc = correct.item() / (steps_per_epoch * args.batch_size)
        val_loss, val_acc = evaluate(model, val_x, val_y, mean, std)
        for name, value in (("train/loss", train_loss), ("train/accuracy", train_acc),
                            ("val/loss", val_loss), ("val/accuracy", val_acc),
                            ("lr", scheduler.get_last_lr()[0])):
            writer.add_scalar(name, value, epoch + 1)
        writer.flush()
        print(f"epoch {epoch + 1:3d}/{args.epochs}  train loss {train_loss:.4f} "
              f"acc {train_acc:.4f}  val loss {val_loss:.4f} acc {val_acc:.4f}  "
              f"{time.perf_counter() - started:.0f}s", file=sys.stderr)
        atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "epoch": epoch,
                     "rng": rng_states(data_gen), "args": vars(args)},
                    os.path.join(args.out, "checkpoint.pt"))
    writer.close()

    # The test set is touched once, here, after every choice has been made.
    test_x, test_y = data["test_x"].to(device), data["test_y"].to(device)
    _, test_acc = evaluate(model, test_x, test_y, mean, std)
    weights_path = os.path.join(args.out, "weights.pt")
    atomic_save({"model": args.model, "dataset": args.dataset, "classes": data["classes"],
                 "mean": mean.tolist(), "std": std.tolist(),
                 "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
                 "test_accuracy": test_acc}, weights_path)
    print(f"done: {args.model} on {args.dataset}, {args.epochs} epochs in "
          f"{time.perf_counter() - started:.0f}s on {describe(device)}; "
          f"test accuracy {test_acc:.4f}; weights {weights_path}")
    return test_acc


def main(argv=None):
    args = get_args(argv)
    try:
        train(args)
    except (DataError, ValueError, FloatingPointError, OSError) as e:
        cli.fail(str(e))


if __name__ == "__main__":
    main()
