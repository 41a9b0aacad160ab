"""Timing studies: the seed net's execution modes, and the hand-written conv against native.

    python src/benchmark.py --device cpu           # eager vs compile vs TorchScript vs export
    python src/benchmark.py --conv --device cpu    # hand-written Conv2d vs F.conv2d

Default study: the seed net's forward (inference, batch --batch-size) for each way of running
it, then one training epoch (--epoch-images random images; no dataset needed) eager vs
compiled. The first call of a compiled variant is reported on its own as its compile time.

--conv: every conv layer shape of every network in model.py at its training batch size, timed
forward (inference) and forward+backward (a training step) with the hand-written conv and with
the native one on the same inputs, alternating the two; then one training epoch of each whole
network with either conv. `--models` also takes the pretrained backbones (pretrained.py, at
--image-size; their TensorFlow 'SAME' convs are timed with the symmetric padding that gives
the same output size). --precision picks float32 or bf16 autocast as training does (auto:
bf16 on CUDA and on CPUs with AMX or AVX512-BF16); in bf16 the inputs and the native convs are
channels_last, the native network's best form, on CPU and CUDA alike. Every number is a
median of --repeats after --warmup calls; every ratio is hand / native from the same run.
"""
import argparse
import json
import sys
import time
import warnings

import torch
from tqdm import tqdm

import cli
import conv_benchmark
from conv import plans as conv_plans
from device import describe, keep_freed_memory, pick_device
from model import MODELS, build_model
from precision import pick_precision
from pretrained import BACKBONES
from timing import median_seconds, random_epoch, timed, train_epoch_seconds


VARIANTS = ("eager", "torch.compile", "torch.jit.trace", "torch.jit.script", "torch.export")


def forward_variants(model, example):
    """name -> a function building the runnable variant (so its build time can be measured)."""
    def script():
        with warnings.catch_warnings():   # TorchScript is deprecated; it works while it exists
            warnings.simplefilter("ignore")
            return torch.jit.script(model)

    def trace():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.jit.trace(model, example)

    return {
        "eager": lambda: model,
        "torch.compile": lambda: torch.compile(model),
        "torch.jit.trace": trace,
        "torch.jit.script": script,
        "torch.export": lambda: torch.export.export(model, (example,)).module(),
    }


def forward_study(model, x, variants, device, warmup, repeats):
    rows = []
    builders = forward_variants(model, x)
    for name in tqdm(variants, desc="forward", file=sys.stderr):
        build = builders[name]
        try:
            with torch.no_grad():
                start = time.perf_counter()
                runner = build()
                timed(lambda: runner(x), device)
                first = time.perf_counter() - start          # build + first call (compiles)
                seconds = median_seconds(lambda: runner(x), device, warmup, repeats)
            rows.append((name, seconds, first, ""))
        except Exception as e:
            rows.append((name, None, None, failure_note(e)))
    return rows


def failure_note(e):
    """One short table cell for a variant this PyTorch cannot run (reported, not fatal)."""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:60]}"


def markdown(rows, unit_scale, unit, baseline):
    """The table of a study's rows (name, seconds, first call's seconds, note); ratios to
    `baseline` (eager's seconds; n/a where eager failed)."""
    lines = [f"| variant | {unit} | ratio to eager | first call s | note |",
             "|---|---:|---:|---:|---|"]
    for name, seconds, first, note in rows:
        if seconds is None:
            lines.append(f"| {name} | n/a | n/a | n/a | {note} |")
        else:
            ratio = "n/a" if baseline is None else f"{seconds / baseline:.2f}"
            lines.append(f"| {name} | {seconds * unit_scale:.2f} | {ratio} | {first:.2f} | "
                         f"{note} |")
    return "\n".join(lines)


def fastest_line(rows):
    """The study's last line: the fastest forward variant, and its ratio to eager."""
    ran = [r for r in rows if r[1] is not None]
    if not ran:
        return "fastest forward: none ran"
    best = min(ran, key=lambda r: r[1])
    eager = rows[0][1]
    return (f"fastest forward: {best[0]}" +
            (f" at {best[1] / eager:.2f}x eager" if eager is not None else " (eager failed)"))


def timing_study(args, device):
    batch = args.batch_size or 128
    variants = ["eager"] + [v for v in args.variants.split(",") if v and v != "eager"]
    torch.manual_seed(0)
    model = build_model("seed", 10).to(device).eval()
    x = torch.randn(batch, 3, 32, 32, device=device)
    rows = forward_study(model, x, variants, device, args.warmup, args.repeats)
    print(f"Seed net forward, batch {batch}, float32, {describe(device)}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print(markdown(rows, 1e3, "median ms/batch", rows[0][1]))

    if args.epoch_images:
        images, labels = random_epoch(args.epoch_images, device)
        epoch_rows = []
        for name in [v for v in ("eager", "torch.compile") if v in variants]:
            torch.manual_seed(0)
            net = build_model("seed", 10).to(device)
            net = torch.compile(net) if name == "torch.compile" else net
            try:
                seconds, first = train_epoch_seconds(net, images, labels, batch, device)
                epoch_rows.append((name, seconds, first, ""))
            except Exception as e:
                epoch_rows.append((name, None, None, failure_note(e)))
        print(f"\nSeed net, one training epoch of {args.epoch_images} images, "
              f"batch {batch}\n")
        print(markdown(epoch_rows, 1, "s/epoch (first step excluded)", epoch_rows[0][1]))
    print(f"\n{fastest_line(rows)}")
    return {"forward": ratios_to_first(rows), "epoch": ratios_to_first(epoch_rows)
            if args.epoch_images else {}}


def ratios_to_first(rows):
    """{variant: its time / the first row's (eager), None where it failed}."""
    return {name: None if seconds is None or rows[0][1] is None else seconds / rows[0][1]
            for name, seconds, _, _ in rows}


def make_parser():
    p = cli.parser(__file__, __doc__)
    cli.add_device_flags(p, "With --conv, bf16 runs with channels_last, after the float32 "
                            "network steps; the timing study runs float32")
    p.add_argument("--conv", action="store_true",
                   help="benchmark the hand-written conv against the native one")
    p.add_argument("--batch-size", type=int,
                   help="default: 128 for the timing study, each model's preset for --conv")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20,
                   help="calls timed per variant (--conv: per layer shape; 0: no layer table)")
    p.add_argument("--step-repeats", type=int, default=3,
                   help="--conv: training steps timed per whole network, in fp32 and in the "
                        "precision picked, hand-written (both layouts) against native "
                        "channels_last (0: none)")
    p.add_argument("--step-models", default="all",
                   help="--conv: the networks of those steps (all: every preset's, finetune's "
                        "backbone at --image-size included)")
    p.add_argument("--step-batch", type=int, help="--conv: their batch (default: the preset's)")
    p.add_argument("--epoch-images", type=int, default=45000,
                   help="images in the timed training epochs (45,000 = a real epoch; 0: time "
                        "no epoch)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"timing study: comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--models", default="all",
                   help="--conv: comma-separated models (or pretrained backbones), or all "
                        "(every model of model.py)")
    p.add_argument("--image-size", type=int,
                   help="--conv, pretrained backbones: input resolution (default: theirs)")
    p.add_argument("--json", metavar="FILE",
                   help="also write the ratios (hand/native, or each variant/eager) as JSON")
    p.add_argument("--peak-of", help=argparse.SUPPRESS)   # internal: cpu_peak_bytes' child
    p.add_argument("--hand-variant", default="function",
                   choices=sorted(conv_benchmark.HAND_VARIANTS),
                   help="--conv: which formulation of the hand-written conv to time per layer")
    return p


def main(argv=None):
    p = make_parser()
    args = p.parse_args(argv)
    unknown = set(args.variants.split(",")) - set(VARIANTS) - {""}
    if unknown:
        p.error(f"unknown variants: {', '.join(sorted(unknown))}")
    for models in (args.models, args.step_models):
        if models != "all" and set(models.split(",")) - set(MODELS) - set(BACKBONES):
            p.error(f"unknown models: {models}; choose from "
                    f"{', '.join(sorted(MODELS) + sorted(BACKBONES))}")
    if min(args.repeats, args.step_repeats, args.warmup, args.epoch_images) < 0 or (
            args.repeats == 0 and not args.conv):
        p.error("--repeats, --step-repeats, --warmup and --epoch-images must be at least 0, "
                "--repeats at least 1 without --conv")
    if args.precision == "bf16" and not args.conv:
        p.error("--precision bf16 goes with --conv (the timing study runs float32)")
    if args.peak_of:
        return conv_benchmark.print_cpu_peaks(args.peak_of)
    try:
        device = pick_device(args.device)
        keep_freed_memory(device)
        precision = pick_precision(args.precision, device) if args.conv else None
        conv_plans.measuring()              # a bad CIFAR_CONV_MEASURE: its one line, now
    except ValueError as e:
        cli.fail(str(e))
    if args.conv:
        ratios = conv_benchmark.study(args, device, *precision)
    else:
        ratios = timing_study(args, device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": describe(device), "torch": torch.__version__, **ratios}, f,
                      indent=1)


if __name__ == "__main__":
    main()
