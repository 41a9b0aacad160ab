"""The results reproduce.py re-measures, one job each, in the README's order of importance:
a job is one script, and its ladder that script's flags, largest rung first. The estimates are
made of the rungs' networks' training steps timed on the machine at hand (`Costs`)."""
import glob
import json
import os
import statistics
from dataclasses import dataclass
from typing import NamedTuple

import torch

from evaluate import TTA_LEVELS
from presets import PRESETS

SRC = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = {"train": "train.py", "conv": "benchmark.py", "weights": "inference.py"}
TTA_VIEWS = {0: 1, 1: 2, 2: 6}      # forward passes per image at each TTA level (evaluate.py)
FORWARD_SHARE = 1 / 3               # a forward pass as a share of a training step (fwd + bwd)


def job(name, label, kind, *ladder, dataset="cifar10"):
    return {"name": name, "label": label, "kind": kind, "ladder": ladder, "dataset": dataset}


JOBS = [
    job("fast94", "fast94, 12 epochs", "train", *({"preset": "fast94", "runs": runs}
                                                  for runs in (5, 3, 1))),
    # Every layer shape of the networks, then one epoch and training steps of each whole
    # network, hand-written in both layouts against native channels_last (at batch 8: a
    # check for a layout cliff, not a ratio).
    job("conv", "hand-written conv / nn.Conv2d, per layer shape", "conv",
        {"models": "seed,fast94,fast95,fast96,resnet18", "repeats": 20, "epoch_images": 4096},
        {"models": "seed,fast94", "repeats": 10, "epoch_images": 2048, "step_batch": 8},
        {"models": "seed", "repeats": 10, "epoch_images": 0, "step_batch": 8}),
    job("seed", "seed net, 25 epochs", "train", {"preset": "seed"}),
    job("fast95", "fast95, 15 epochs", "train", {"preset": "fast95"}),
    job("fast96", "fast96, 40 epochs", "train", {"preset": "fast96"}),
    job("finetune", "EfficientNet-Lite0 fine-tuned", "train",
        *({"preset": "finetune", "pretrained": "efficientnet_lite0", "image_size": size,
           "epochs": epochs} for size, epochs in ((224, 3), (224, 1), (160, 1), (128, 1)))),
    job("weights-seed", "seed net, shipped weights", "weights",
        {"weights": "seed_cifar10.pt", "tta": 0}),
    job("weights-fast94", "fast94, shipped weights", "weights",
        {"weights": "fast94_cifar10.pt", "tta": 2}),
    job("weights-fast95", "fast95, shipped weights", "weights",
        {"weights": "fast95_cifar10.pt", "tta": 2}),
    job("weights-lite0", "EfficientNet-Lite0, shipped weights", "weights",
        {"weights": "efficientnet_lite0_cifar10.pt", "tta": 1}),
    job("cifar100-fast96", "fast96 on CIFAR-100, 40 epochs", "train",
        {"preset": "fast96", "dataset": "cifar100"}, dataset="cifar100"),
    job("cifar100-resnet18", "ResNet-18 on CIFAR-100, 200 epochs", "train",
        {"preset": "resnet18", "dataset": "cifar100"}, dataset="cifar100"),
]
NAMES = [j["name"] for j in JOBS]
WEIGHTS = {"seed_cifar10.pt": ("seed", 32, "seed"), "fast94_cifar10.pt": ("fast94", 32, "fast94"),
           "fast95_cifar10.pt": ("fast95", 32, "fast95"),      # network, image size, preset
           "efficientnet_lite0_cifar10.pt": ("efficientnet_lite0", 128, "finetune")}


def networks(job_, flags):
    """The (network, image size) pairs a rung of a job runs, each with its preset's batch."""
    if job_["kind"] == "train":
        preset = PRESETS[flags["preset"]]
        return [((flags.get("pretrained") or preset["model"], flags.get("image_size", 32)),
                 preset["batch_size"])]
    if job_["kind"] == "weights":
        name, size, preset = WEIGHTS[flags["weights"]]
        return [((name, size), PRESETS[preset]["batch_size"])]
    return [((name, 32), PRESETS[name]["batch_size"]) for name in flags["models"].split(",")]


class Target(NamedTuple):
    """Where and how the jobs run; each job writes in OUT/jobs/<job> of the results folder."""
    device: str
    precision: str
    data_dir: str
    out: str


def command(job_, flags, target):
    """The command of one rung of a job (the arguments after `python`), run as `target` says,
    runnable from the folder reproduce.py was started in."""
    kind, out = job_["kind"], os.path.join(target.out, "jobs", job_["name"])
    args = [arg for key, value in flags.items() for arg in (
        f"--{key.replace('_', '-')}",
        os.path.relpath(os.path.join(SRC, os.pardir, "weights", value)) if key == "weights"
        else str(value))]
    if kind == "conv":      # the whole-network steps of the same networks
        args += ["--conv", "--step-models", flags["models"], "--json", f"{out}/ratios.json"]
    else:
        args += ["--data-dir", target.data_dir] + (["--out", out] if kind == "train" else
                                                   ["--json"])
    return [os.path.relpath(os.path.join(SRC, SCRIPTS[kind]))] + args + \
        ["--device", target.device, "--precision", target.precision]


# Estimates ------------------------------------------------------------------------------------

@dataclass
class Costs:
    """What reproduce.py measured on this machine, which every estimate is made of."""
    device: str            # the device type
    start: float           # seconds for a script to start and read the dataset
    images: tuple          # (training images, test images) of CIFAR-10, as many as CIFAR-100's
    step: dict             # {(network, image size): seconds of a training step at its batch}
    first: dict            # the same for a network's first step (its warm-up included)


def estimate(job_, flags, costs):
    """Expected seconds of one rung of a job on this machine: the process start, and each
    network's steps and first-step warm-ups; None where a network of it has no timed step."""
    nets = networks(job_, flags)
    if any(net not in costs.step for net, _ in nets):
        return None
    total = costs.start
    for net, batch in nets:
        steps, warmups = STEPS[job_["kind"]](flags, batch, costs)
        total += steps * costs.step[net] + warmups * max(costs.first[net] - costs.step[net], 0)
    return total


def train_steps(flags, batch, costs):
    """(training steps, warm-ups) of a training rung: its epochs, then the validation images
    each epoch and the test set with TTA and without, a forward a third of a step."""
    preset, (n_train, n_test) = PRESETS[flags["preset"]], costs.images
    val = min(preset["val_size"], n_train)
    epochs, runs = flags.get("epochs", preset["epochs"]), flags.get("runs", 1)
    views = TTA_VIEWS[preset["tta"]] + (1 if preset["tta"] else 0)
    forwards = (val * epochs + n_test * views) / batch * FORWARD_SHARE
    return runs * ((n_train - val) // batch * epochs + forwards), runs


def conv_steps(flags, batch, costs):
    """Per network: 3 warm-up and the repeated calls of an inference and a training step, hand
    and native, of its layer shapes (two steps of the network in all); on a CPU 4 more for peak
    memory; an epoch hand and native; 4 steps in 3 forms and 2 precisions at the step batch."""
    calls = 3 + flags["repeats"]
    return (calls * 2 * (1 + FORWARD_SHARE) + 4 * (costs.device == "cpu") + 2 * (
        flags["epoch_images"] // batch) + 24 * flags.get("step_batch", batch) / batch), 2


def weights_steps(flags, batch, costs):
    return costs.images[1] * TTA_VIEWS[flags["tta"]] / batch * FORWARD_SHARE, 1


STEPS = {"train": train_steps, "conv": conv_steps, "weights": weights_steps}


# Results: (metric, value, text) from what a job's command wrote in its folder and stdout -------

def read_result(job_, flags, out, stdout):
    return {"train": train_result, "conv": conv_result,
            "weights": weights_result}[job_["kind"]](flags, out, stdout)


def percent(values):
    spread = f" ± {100 * statistics.stdev(values):.2f}" if len(values) > 1 else ""
    return f"{100 * statistics.mean(values):.2f}{spread} %"


def train_result(flags, out, stdout):
    """The test accuracy of the run's weights.pt (or the mean ± std over OUT/run*/weights.pt)."""
    files = sorted(glob.glob(os.path.join(out, "**", "weights.pt"), recursive=True))
    runs = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
    if not runs:
        raise ValueError(f"no weights.pt in {out}")
    first, accuracy = runs[0], [r["test_accuracy"] for r in runs]
    tta = (f" with TTA ({percent([r['test_accuracy_without_tta'] for r in runs])} without)"
           if first["tta"] else "")
    size = f" at {first['image_size']} px" if first.get("image_size") else ""
    several = f", {len(runs)} runs (mean ± std)" if len(runs) > 1 else ""
    seconds = statistics.mean(r["train_seconds"] for r in runs)
    text = (f"{percent(accuracy)}{tta}, {first['epochs']} epoch{'s' * (first['epochs'] != 1)}"
            f"{size}{several}; {seconds:.1f} s a run (training + test evaluation)")
    return "test accuracy" + (" with TTA" if tta else ""), statistics.mean(accuracy), text


def conv_result(flags, out, stdout):
    """The geomean ratios over the layer shapes, then each whole network's."""
    with open(f"{out}/ratios.json") as f:
        r = json.load(f)
    text = (f"{r['train']:.2f}x training step, {r['infer']:.2f}x inference (geomean of "
            f"{r['layers']} layer shapes of {flags['models'].replace(',', ', ')}, "
            f"{r['precision']})")
    if r["networks"]:
        text += "; whole-network epochs: " + ", ".join(f"{net} {v:.2f}x"
                                                       for net, v in r["networks"].items())
    if r["steps"]:    # the slowest: (ratio, network and precision, hand-written layout)
        worst = max((v, net, layout) for net, layouts in r["steps"].items()
                    for layout, v in layouts.items())
        batch = f"batch {flags['step_batch']}" if "step_batch" in flags else "preset batches"
        text += (f"; whole-network training steps at {batch}, hand / native channels_last: at "
                 f"most {worst[0]:.2f}x ({worst[1]}, {worst[2]})")
    return "hand / native time, training step (geomean)", r["train"], text


def weights_result(flags, out, stdout):
    accuracy = json.loads(stdout)["accuracy"]
    tta = f" with TTA ({TTA_LEVELS[flags['tta']]})" if flags["tta"] else ""
    return "test accuracy" + (" with TTA" if tta else ""), accuracy, f"{100 * accuracy:.2f} %{tta}"
