"""The results reproduce.py re-measures, one job each, in the README's order of importance.

A job has a ladder of flags, largest first (more runs, more epochs, more layers): reproduce.py
runs the first rung whose estimate fits what is left of the budget. The estimates come from
training steps of the job's networks timed on the machine at hand (`Costs`). For each kind of
job, three functions: the command of a rung, its expected seconds, and its row from the files
the command wrote.
"""
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
WEIGHTS = os.path.join(SRC, os.pardir, "weights")
TTA_VIEWS = {0: 1, 1: 2, 2: 6}      # forward passes per image at each TTA level (evaluate.py)
# About what a first compiled call costs (the timing study's torch.compile and torch.export
# variants, and its compiled epoch): 199 s was measured on a 2-core Xeon; GPUs compile faster.
COMPILE_SECONDS = {"cpu": 200, "cuda": 60}
FORWARD_SHARE = 1 / 3               # a forward pass as a share of a training step (fwd + bwd)


def job(name, label, kind, *ladder, dataset="cifar10"):
    return {"name": name, "label": label, "kind": kind, "ladder": ladder, "dataset": dataset}


LITE0 = "efficientnet_lite0"
CONV_ALL = "seed,fast94,fast95,fast96,resnet18"
JOBS = [
    job("fast94", "fast94, 12 epochs", "train", {"preset": "fast94", "runs": 5},
        {"preset": "fast94", "runs": 3}, {"preset": "fast94", "runs": 1}),
    # Then whole-network training steps, hand-written in both layouts against native
    # channels_last; at batch 8 (Lite0 at 64 px) they are a cliff check, not a ratio.
    job("conv", "hand-written conv / nn.Conv2d, per layer shape", "conv",
        {"models": CONV_ALL, "repeats": 20, "warmup": 3, "epoch_images": 4096,
         "step_models": "all"},
        {"models": "seed,fast94", "repeats": 10, "warmup": 2, "epoch_images": 2048,
         "step_models": "all", "step_batch": 8},
        {"models": "seed", "repeats": 10, "warmup": 2, "epoch_images": 0,
         "step_models": "seed,fast94", "step_batch": 8}),
    job("seed", "seed net, 25 epochs", "train", {"preset": "seed"}),
    job("fast95", "fast95, 15 epochs", "train", {"preset": "fast95"}),
    job("fast96", "fast96, 40 epochs", "train", {"preset": "fast96"}),
    job("finetune", "EfficientNet-Lite0 fine-tuned", "train",
        *({"pretrained": LITE0, "image_size": size, "epochs": epochs}
          for size, epochs in ((224, 3), (224, 1), (160, 1), (128, 1)))),
    job("timing", "seed net: torch.compile / eager, forward", "timing",
        {"epoch_images": 45000}, {"epoch_images": 0}),
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
WEIGHTS_NETWORKS = {"seed_cifar10.pt": ("seed", 32), "fast94_cifar10.pt": ("fast94", 32),
                    "fast95_cifar10.pt": ("fast95", 32),
                    "efficientnet_lite0_cifar10.pt": (LITE0, 128)}


def preset_of(flags):
    return PRESETS[flags.get("preset", "finetune")]


def networks(job_, flags):
    """The (network, image size) pairs a rung of a job trains or runs, with their batch size."""
    if job_["kind"] == "train":
        name = flags.get("pretrained") or preset_of(flags)["model"]
        return [((name, flags.get("image_size", 32)), preset_of(flags)["batch_size"])]
    if job_["kind"] == "conv":
        layers = layer_networks(flags)
        return layers + [step for step in step_networks(flags) if step not in layers]
    if job_["kind"] == "timing":
        return [(("seed", 32), 128)]
    net = WEIGHTS_NETWORKS[flags["weights"]]
    return [(net, PRESETS["finetune" if net[0] == LITE0 else net[0]]["batch_size"])]


def layer_networks(flags):
    """The (network, image size) pairs, with their preset batch, of a conv job's layer table."""
    return [((name, 32), PRESETS[name]["batch_size"]) for name in flags["models"].split(",")]


def step_networks(flags):
    """The (network, image size) pairs, with their preset batch, of a conv job's
    whole-network steps (benchmark.py --step-models; all: every preset's network)."""
    if flags["step_models"] != "all":
        return [((name, 32), PRESETS[name]["batch_size"])
                for name in flags["step_models"].split(",")]
    step_image = 64 if flags.get("step_batch") else 224
    return [((name, 32), PRESETS[name]["batch_size"]) for name in CONV_ALL.split(",")] + \
        [((LITE0, step_image), PRESETS["finetune"]["batch_size"])]


# ----------------------------------------------------------------------------------------------
# Commands: each a list of arguments after the Python interpreter.

class Target(NamedTuple):
    """Where and how the jobs run: the device type, the precision, the data folder, and the
    folder a job's command writes to."""
    device: str
    precision: str
    data_dir: str
    out: str


def command(job_, flags, target):
    """The command of one rung of a job, run as `target` says."""
    # The timing study runs float32 only; the shipped weights' rows were measured in float32.
    precision = target.precision if job_["kind"] in ("train", "conv") else "fp32"
    common = ["--device", target.device, "--precision", precision]
    script = {"train": "train.py", "conv": "benchmark.py", "timing": "benchmark.py",
              "weights": "inference.py"}[job_["kind"]]
    return [os.path.relpath(os.path.join(SRC, script))] + \
        COMMANDS[job_["kind"]](flags, target) + common


def train_args(flags, target):
    args = ["--preset", flags.get("preset", "finetune"), "--data-dir", target.data_dir,
            "--out", target.out]
    for key in ("pretrained", "image_size", "epochs", "runs", "dataset"):
        if key in flags:
            args += [f"--{key.replace('_', '-')}", str(flags[key])]
    return args


def conv_args(flags, target):
    steps = (["--step-batch", str(flags["step_batch"]), "--image-size", "64"]
             if flags.get("step_batch") else [])
    return ["--conv", "--models", flags["models"], "--repeats", str(flags["repeats"]),
            "--warmup", str(flags["warmup"]), "--epoch-images", str(flags["epoch_images"]),
            "--step-models", flags["step_models"], *steps,
            "--json", os.path.join(target.out, "ratios.json")]


def timing_args(flags, target):
    return ["--epoch-images", str(flags["epoch_images"]),
            "--json", os.path.join(target.out, "ratios.json")]


def weights_args(flags, target):
    return ["--weights", os.path.relpath(os.path.join(WEIGHTS, flags["weights"])),
            "--data-dir", target.data_dir, "--json", "--tta", str(flags["tta"])]


COMMANDS = {"train": train_args, "conv": conv_args, "timing": timing_args,
            "weights": weights_args}


# ----------------------------------------------------------------------------------------------
# Estimates

@dataclass
class Costs:
    """What reproduce.py measured on this machine, which every estimate is made of."""
    device: str            # the device type
    start: float           # seconds for a script to start and read the dataset
    images: dict           # {dataset: (training images, test images)}
    step: dict             # {(network, image size): seconds of a training step at its batch}
    first: dict            # the same for a network's first step (its warm-up included)


def estimate(job_, flags, costs):
    """Expected seconds of one rung of a job on this machine; None where a network of it has
    no timed step."""
    if any(net not in costs.step for net, _ in networks(job_, flags)):
        return None
    return costs.start + ESTIMATES[job_["kind"]](job_, flags, costs)


def warmup(costs, net):
    return max(costs.first[net] - costs.step[net], 0)


def train_seconds(job_, flags, costs):
    preset = preset_of(flags)
    (net, batch), = networks(job_, flags)
    n_train, n_test = costs.images[flags.get("dataset", "cifar10")]
    val = min(preset["val_size"], n_train)
    epochs = flags.get("epochs", preset["epochs"])
    steps = (n_train - val) // batch * epochs
    forward = costs.step[net] / batch * FORWARD_SHARE        # per image
    views = TTA_VIEWS[preset["tta"]] + (1 if preset["tta"] else 0)   # with TTA and without
    evaluation = (val * epochs + n_test * views) * forward
    return flags.get("runs", 1) * (steps * costs.step[net] + evaluation + warmup(costs, net))


def conv_seconds(job_, flags, costs):
    """Per layer shape: warm-up and repeats of an inference and a training step, hand and
    native (about two training steps of the network in all); on a CPU a process measures
    their peak memory (a warm-up and a measured step of each). Then one epoch of each whole
    network, hand and native; then 4 steps of every preset's network in each of 3 forms and
    2 precisions, at the rung's step batch."""
    total = 0
    for net, batch in step_networks(flags):
        total += 3 * 4 * 2 * costs.step[net] * (flags.get("step_batch") or batch) / batch
    for net, batch in layer_networks(flags):
        calls = flags["warmup"] + flags["repeats"]
        total += calls * 2 * (1 + FORWARD_SHARE) * costs.step[net] + 2 * warmup(costs, net)
        total += 2 * (flags["epoch_images"] // batch) * costs.step[net]
        if costs.device == "cpu":     # the peak-memory process: its start, 2 steps a conv
            total += costs.start / len(layer_networks(flags)) + 4 * costs.step[net]
    return total


def timing_seconds(job_, flags, costs):
    """Five ways of running the seed net's forward (2 of them compiled), 24 calls each; then
    an epoch eager and one compiled."""
    step = costs.step[("seed", 32)]
    compile_s = COMPILE_SECONDS.get(costs.device, COMPILE_SECONDS["cuda"])
    total = 5 * 24 * step * FORWARD_SHARE + 2 * compile_s
    if flags["epoch_images"]:
        total += 2 * flags["epoch_images"] / 128 * step + compile_s
    return total + warmup(costs, ("seed", 32))


def weights_seconds(job_, flags, costs):
    (net, batch), = networks(job_, flags)
    n_test = costs.images["cifar10"][1]
    forward = costs.step[net] / batch * FORWARD_SHARE
    return n_test * TTA_VIEWS[flags["tta"]] * forward + warmup(costs, net)


ESTIMATES = {"train": train_seconds, "conv": conv_seconds, "timing": timing_seconds,
             "weights": weights_seconds}


# ----------------------------------------------------------------------------------------------
# Results: (metric, value, text) from what a job's command wrote in its folder (and stdout).

def read_result(job_, flags, out, stdout):
    return READERS[job_["kind"]](flags, out, stdout)


def percent(values):
    if len(values) == 1:
        return f"{100 * values[0]:.2f} %"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f} %"


def train_result(flags, out, stdout):
    files = sorted(glob.glob(os.path.join(out, "weights.pt")) +
                   glob.glob(os.path.join(out, "run*", "weights.pt")))
    runs = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
    if not runs:
        raise ValueError(f"no weights.pt in {out}")
    first = runs[0]
    accuracy = [r["test_accuracy"] for r in runs]
    text = percent(accuracy)
    if first["tta"]:
        text += (f" with TTA ({percent([r['test_accuracy_without_tta'] for r in runs])} "
                 f"without)")
    text += f", {first['epochs']} epoch" + ("s" if first["epochs"] != 1 else "")
    if first.get("image_size"):
        text += f" at {first['image_size']} px"
    if len(runs) > 1:
        text += f", {len(runs)} runs (mean ± std)"
    seconds = statistics.mean(r["train_seconds"] for r in runs)
    text += f"; {seconds:.1f} s a run (training + test evaluation)"
    metric = "test accuracy" + (" with TTA" if first["tta"] else "")
    return metric, statistics.mean(accuracy), text


def conv_result(flags, out, stdout):
    with open(os.path.join(out, "ratios.json")) as f:
        r = json.load(f)
    text = (f"{r['train']:.2f}x training step, {r['infer']:.2f}x inference (geomean of "
            f"{r['layers']} layer shapes of {flags['models'].replace(',', ', ')}, "
            f"{r['precision']})")
    if r["networks"]:
        text += "; whole-network epochs: " + ", ".join(f"{k} {v:.2f}x"
                                                       for k, v in r["networks"].items())
    if r["steps"]:
        worst = max(((v, f"{net}, {layout}") for net, ratios in r["steps"].items()
                     for layout, v in ratios.items()))
        batch = f"batch {flags['step_batch']}" if flags.get("step_batch") else "preset batches"
        text += (f"; whole-network training steps ({len(r['steps'])}, {batch}), hand / native "
                 f"channels_last: at most {worst[0]:.2f}x ({worst[1]})")
    return "hand / native time, training step (geomean)", r["train"], text


def timing_result(flags, out, stdout):
    with open(os.path.join(out, "ratios.json")) as f:
        r = json.load(f)

    def ratios(d):
        return ", ".join(f"{k} {'failed' if v is None else f'{v:.2f}x'}" for k, v in d.items()
                         if k != "eager")
    if r["forward"].get("torch.compile") is None:
        raise ValueError("torch.compile failed (the job's log says why)")
    text = f"forward time / eager: {ratios(r['forward'])}"
    if r["epoch"]:
        text += f"; training epoch: {ratios(r['epoch'])}"
    return "torch.compile / eager time, forward", r["forward"].get("torch.compile"), text


def weights_result(flags, out, stdout):
    accuracy = json.loads(stdout)["accuracy"]
    tta = f" with TTA ({TTA_LEVELS[flags['tta']]})" if flags["tta"] else ""
    return "test accuracy" + (" with TTA" if tta else ""), accuracy, \
        f"{100 * accuracy:.2f} %{tta}"


READERS = {"train": train_result, "conv": conv_result, "timing": timing_result,
           "weights": weights_result}
