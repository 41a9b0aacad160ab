"""The results reproduce.py re-measures, one job each, in the README's order of importance.

A job has sizes, largest first (more runs, more epochs, more layers): reproduce.py runs the
first whose estimate fits what is left of the budget. For each kind of job, three functions:
the command of a size, its expected seconds from the calibration, and its row from the files
the command wrote.
"""
import glob
import json
import os
import statistics

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


def job(name, label, kind, *sizes, dataset="cifar10"):
    return {"name": name, "label": label, "kind": kind, "sizes": sizes, "dataset": dataset}


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
    job("weights-lite0", "EfficientNet-Lite0, shipped weights", "weights",
        {"weights": "efficientnet_lite0_cifar10.pt", "tta": 1}),
    job("cifar100-fast96", "fast96 on CIFAR-100, 40 epochs", "train",
        {"preset": "fast96", "dataset": "cifar100"}, dataset="cifar100"),
    job("cifar100-resnet18", "ResNet-18 on CIFAR-100, 200 epochs", "train",
        {"preset": "resnet18", "dataset": "cifar100"}, dataset="cifar100"),
]
NAMES = [j["name"] for j in JOBS]
WEIGHTS_NETWORKS = {"seed_cifar10.pt": ("seed", 32), "fast94_cifar10.pt": ("fast94", 32),
                    "efficientnet_lite0_cifar10.pt": (LITE0, 128)}


def preset_of(size):
    return PRESETS[size.get("preset", "finetune")]


def networks(job_, size):
    """The (network, image size) pairs a size of a job trains or runs, with their batch size."""
    if job_["kind"] == "train":
        name = size.get("pretrained") or preset_of(size)["model"]
        return [((name, size.get("image_size", 32)), preset_of(size)["batch_size"])]
    if job_["kind"] == "conv":
        layers = layer_networks(size)
        return layers + [step for step in step_networks(size) if step not in layers]
    if job_["kind"] == "timing":
        return [(("seed", 32), 128)]
    net = WEIGHTS_NETWORKS[size["weights"]]
    return [(net, PRESETS["finetune" if net[0] == LITE0 else net[0]]["batch_size"])]


def layer_networks(size):
    """The (network, image size) pairs, with their preset batch, of a conv job's layer table."""
    return [((name, 32), PRESETS[name]["batch_size"]) for name in size["models"].split(",")]


def step_networks(size):
    """The (network, image size) pairs, with their preset batch, of a conv job's
    whole-network steps (benchmark.py --step-models; all: every preset's network)."""
    if size["step_models"] != "all":
        return [((name, 32), PRESETS[name]["batch_size"])
                for name in size["step_models"].split(",")]
    step_image = 64 if size.get("step_batch") else 224
    return [((name, 32), PRESETS[name]["batch_size"]) for name in CONV_ALL.split(",")] + \
        [((LITE0, step_image), PRESETS["finetune"]["batch_size"])]


# ----------------------------------------------------------------------------------------------
# Commands: each a list of arguments after the Python interpreter.

def command(job_, size, ctx):
    """The command of one size of a job; ctx: dict(device, precision, data_dir, out)."""
    # The timing study runs float32 only; the shipped weights' rows were measured in float32.
    precision = ctx["precision"] if job_["kind"] in ("train", "conv") else "fp32"
    common = ["--device", ctx["device"], "--precision", precision]
    script = {"train": "train.py", "conv": "benchmark.py", "timing": "benchmark.py",
              "weights": "inference.py"}[job_["kind"]]
    return [os.path.relpath(os.path.join(SRC, script))] + COMMANDS[job_["kind"]](size, ctx) \
        + common


def train_args(size, ctx):
    args = ["--preset", size.get("preset", "finetune"), "--data-dir", ctx["data_dir"],
            "--out", ctx["out"]]
    for key in ("pretrained", "image_size", "epochs", "runs", "dataset"):
        if key in size:
            args += [f"--{key.replace('_', '-')}", str(size[key])]
    return args


def conv_args(size, ctx):
    steps = (["--step-batch", str(size["step_batch"]), "--image-size", "64"]
             if size.get("step_batch") else [])
    return ["--conv", "--models", size["models"], "--repeats", str(size["repeats"]),
            "--warmup", str(size["warmup"]), "--epoch-images", str(size["epoch_images"]),
            "--step-models", size["step_models"], *steps,
            "--json", os.path.join(ctx["out"], "ratios.json")]


def timing_args(size, ctx):
    return ["--epoch-images", str(size["epoch_images"]),
            "--json", os.path.join(ctx["out"], "ratios.json")]


def weights_args(size, ctx):
    return ["--weights", os.path.relpath(os.path.join(WEIGHTS, size["weights"])), "--data-dir",
            ctx["data_dir"], "--json", "--tta", str(size["tta"])]


COMMANDS = {"train": train_args, "conv": conv_args, "timing": timing_args,
            "weights": weights_args}


# ----------------------------------------------------------------------------------------------
# Estimates. cal: {"step": {(network, image size): seconds of one training step at its batch
# size}, "first": the same for a first step (its warm-up), "process": seconds a script takes
# to start and read the dataset, "images": {dataset: (train, test) counts}, "device": type}.

def estimate(job_, size, cal):
    """Expected seconds of one size of a job on this machine."""
    return cal["process"] + ESTIMATES[job_["kind"]](job_, size, cal)


def warmup(cal, net):
    return max(cal["first"][net] - cal["step"][net], 0)


def train_seconds(job_, size, cal):
    preset = preset_of(size)
    (net, batch), = networks(job_, size)
    n_train, n_test = cal["images"][size.get("dataset", "cifar10")]
    val = min(preset["val_size"], n_train)
    epochs = size.get("epochs", preset["epochs"])
    steps = (n_train - val) // batch * epochs
    forward = cal["step"][net] / batch * FORWARD_SHARE        # per image
    views = TTA_VIEWS[preset["tta"]] + (1 if preset["tta"] else 0)   # with TTA and without
    evaluation = (val * epochs + n_test * views) * forward
    return size.get("runs", 1) * (steps * cal["step"][net] + evaluation + warmup(cal, net))


def conv_seconds(job_, size, cal):
    """Per layer shape: warm-up and repeats of an inference and a training step, hand and
    native (about two training steps of the network in all); on a CPU a process per shape
    measures peak memory. Then one epoch of each whole network, hand and native; then 4 steps
    of every preset's network in each of 3 forms and 2 precisions, at the size's step batch."""
    total = 0
    for net, batch in step_networks(size):
        total += 3 * 4 * 2 * cal["step"][net] * (size.get("step_batch") or batch) / batch
    for net, batch in layer_networks(size):
        calls = size["warmup"] + size["repeats"]
        total += calls * 2 * (1 + FORWARD_SHARE) * cal["step"][net] + 2 * warmup(cal, net)
        total += 2 * (size["epoch_images"] // batch) * cal["step"][net]
        if cal["device"] == "cpu":
            total += cal["layers"][net[0]] * cal["process"]
    return total


def timing_seconds(job_, size, cal):
    """Five ways of running the seed net's forward (2 of them compiled), 24 calls each; then
    an epoch eager and one compiled."""
    step = cal["step"][("seed", 32)]
    compile_s = COMPILE_SECONDS.get(cal["device"], COMPILE_SECONDS["cuda"])
    total = 5 * 24 * step * FORWARD_SHARE + 2 * compile_s
    if size["epoch_images"]:
        total += 2 * size["epoch_images"] / 128 * step + compile_s
    return total + warmup(cal, ("seed", 32))


def weights_seconds(job_, size, cal):
    (net, batch), = networks(job_, size)
    n_test = cal["images"]["cifar10"][1]
    forward = cal["step"][net] / batch * FORWARD_SHARE
    return n_test * TTA_VIEWS[size["tta"]] * forward + warmup(cal, net)


ESTIMATES = {"train": train_seconds, "conv": conv_seconds, "timing": timing_seconds,
             "weights": weights_seconds}


# ----------------------------------------------------------------------------------------------
# Results: (metric, value, text) from what a job's command wrote in its folder (and stdout).

def read_result(job_, size, out, stdout):
    return READERS[job_["kind"]](size, out, stdout)


def percent(values):
    if len(values) == 1:
        return f"{100 * values[0]:.2f} %"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f} %"


def train_result(size, out, stdout):
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


def conv_result(size, out, stdout):
    with open(os.path.join(out, "ratios.json")) as f:
        r = json.load(f)
    text = (f"{r['train']:.2f}x training step, {r['infer']:.2f}x inference (geomean of "
            f"{r['layers']} layer shapes of {size['models'].replace(',', ', ')}, {r['precision']})")
    if r["networks"]:
        text += "; whole-network epochs: " + ", ".join(f"{k} {v:.2f}x"
                                                       for k, v in r["networks"].items())
    if r["steps"]:
        worst = max(((v, f"{net}, {layout}") for net, ratios in r["steps"].items()
                     for layout, v in ratios.items()))
        batch = f"batch {size['step_batch']}" if size.get("step_batch") else "preset batches"
        text += (f"; whole-network training steps ({len(r['steps'])}, {batch}), hand / native "
                 f"channels_last: at most {worst[0]:.2f}x ({worst[1]})")
    return "hand / native time, training step (geomean)", r["train"], text


def timing_result(size, out, stdout):
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


def weights_result(size, out, stdout):
    accuracy = json.loads(stdout)["accuracy"]
    tta = f" with TTA ({TTA_LEVELS[size['tta']]})" if size["tta"] else ""
    return "test accuracy" + (" with TTA" if tta else ""), accuracy, \
        f"{100 * accuracy:.2f} %{tta}"


READERS = {"train": train_result, "conv": conv_result, "timing": timing_result,
           "weights": weights_result}
