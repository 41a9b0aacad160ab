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
import functools
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from tqdm import tqdm

import cli
from device import describe, keep_freed_memory, pick_device, stopwatch, synchronize
from precision import autocast, disable_tf32, pick_precision
from precision import describe as describe_precision
from conv import Conv2d, conv2d_unfold_autograd
from conv.functions import UnfoldMatmulConv
from conv import plans as conv_plans
from conv.plans import plan_for
from model import MODELS, build_model
from pretrained import BACKBONES, load_backbone
from presets import PRESETS


def timed(fn, device):
    clock = stopwatch(device)
    fn()
    return clock()


def median_seconds(fn, device, warmup, repeats):
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn, device) for _ in range(repeats))


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


def sgd_step(model, device, dtype=None):
    """A function (x, y) -> None taking one SGD training step of `model` on a batch, under
    autocast to `dtype` (None: float32)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    model.train()

    def step(x, y):
        with autocast(device, dtype):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def train_epoch_seconds(model, images, labels, batch_size, device, dtype=None):
    """Seconds for one epoch of SGD steps over `images` (the first step excluded: it is where
    torch.compile compiles), and the seconds of that first step; under autocast to `dtype`
    (None: float32)."""
    train = sgd_step(model, device, dtype)

    def step(i):
        train(images[i:i + batch_size], labels[i:i + batch_size])

    first = timed(lambda: step(0), device)
    starts = range(batch_size, len(images) - batch_size + 1, batch_size)
    rest = timed(lambda: [step(i) for i in tqdm(starts, leave=False, file=sys.stderr)], device)
    # Scale to the full epoch so eager and compiled are compared over the same number of steps.
    return rest * (len(starts) + 1) / max(len(starts), 1), first


def failure_note(e):
    """One short table cell for a variant this PyTorch cannot run (reported, not fatal)."""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:60]}"


def random_epoch(n, device):
    """(images, labels) of random data for timing training epochs without a dataset."""
    return (torch.randn(n, 3, 32, 32, device=device),
            torch.randint(0, 10, (n,), device=device))


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
    variants = ["eager"] + [v for v in args.variants.split(",") if v and v != "eager"]
    torch.manual_seed(0)
    model = build_model("seed", 10).to(device).eval()
    x = torch.randn(args.batch_size, 3, 32, 32, device=device)
    rows = forward_study(model, x, variants, device, args.warmup, args.repeats)
    print(f"Seed net forward, batch {args.batch_size}, float32, {describe(device)}, "
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
                seconds, first = train_epoch_seconds(net, images, labels, args.batch_size, device)
                epoch_rows.append((name, seconds, first, ""))
            except Exception as e:
                epoch_rows.append((name, None, None, failure_note(e)))
        print(f"\nSeed net, one training epoch of {args.epoch_images} images, "
              f"batch {args.batch_size}\n")
        print(markdown(epoch_rows, 1, "s/epoch (first step excluded)", epoch_rows[0][1]))
    print(f"\n{fastest_line(rows)}")
    return {"forward": ratios_to_first(rows), "epoch": ratios_to_first(epoch_rows)
            if args.epoch_images else {}}


def ratios_to_first(rows):
    """{variant: its time / the first row's (eager), None where it failed}."""
    return {name: None if seconds is None or rows[0][1] is None else seconds / rows[0][1]
            for name, seconds, _, _ in rows}


# ----------------------------------------------------------------------------------------------
# Hand-written conv vs native conv

def network(name, conv, image_size=None):
    """A network of model.py, or a pretrained backbone's architecture (no weights needed)."""
    if name in MODELS:
        return build_model(name, 10, conv=conv)
    return load_backbone(name, 10, conv, image_size, imagenet=False)


def default_batch_size(name):
    return PRESETS[name if name in MODELS else "finetune"]["batch_size"]


def conv_layers(model_name, batch_size, image_size=None):
    """[(model name, layer name, conv kwargs, input shape, is_first)] seen in one forward."""
    model = network(model_name, "native", image_size)
    layers = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            padding = m.padding
            if type(m).__name__ == "Conv2dSame":     # timm pads at run time, TF style
                padding = tuple((k - 1) * d // 2 for k, d in zip(m.kernel_size, m.dilation))
            kwargs = dict(in_channels=m.in_channels, out_channels=m.out_channels,
                          kernel_size=m.kernel_size, stride=m.stride, padding=padding,
                          dilation=m.dilation, groups=m.groups, bias=m.bias is not None)
            m.register_forward_hook(lambda mod, inp, out, name=name, kwargs=kwargs: layers.append(
                (model_name, name, kwargs, tuple(inp[0].shape), not inp[0].requires_grad)))
    model(torch.zeros(batch_size, 3, 32, 32, requires_grad=False))
    return layers


def peak_bytes(fn, device):
    """Peak memory that `fn` adds over what is allocated before it runs.

    CUDA and XPU: the caching allocator's own peak counter. CPU (Linux): the process's
    resident-set high-water mark, reset through /proc/self/clear_refs; it tracks tensors
    exactly only in a process started with a fixed glibc mmap threshold (see cpu_peak_bytes).
    None elsewhere."""
    if device.type in ("cuda", "xpu"):
        backend = getattr(torch, device.type)
        synchronize(device)
        base = backend.memory_allocated(device)
        backend.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return backend.max_memory_allocated(device) - base
    if device.type != "cpu" or not os.path.exists("/proc/self/clear_refs"):
        return None

    def status(key):
        with open("/proc/self/status") as f:
            return int(re.search(key + r":\s+(\d+) kB", f.read()).group(1)) * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status("VmRSS")
    fn()
    return status("VmHWM") - base


def cpu_peak_bytes(specs):
    """[{impl: peak bytes of one training step}] for a list of layer specs, measured in one
    child process whose glibc returns every large block to the system when it is freed (a
    fixed mmap threshold), so that the resident set follows the live tensors. Timing runs in
    this process, with the normal allocator, because fresh mappings cost page faults on every
    allocation."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run([sys.executable, os.path.abspath(__file__), "--peak-of",
                             json.dumps(specs)], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        return [{"hand": None, "native": None} for _ in specs]
    return json.loads(result.stdout)


def conv_step_functions(conv, forward, x, grad, device, dtype):
    """(inference, training step) closures running `forward(x)` of one conv module under
    autocast to `dtype` (None: float32)."""
    def infer():
        with torch.no_grad(), autocast(device, dtype):
            forward(x)

    def train_step():
        with autocast(device, dtype):
            y = forward(x)
        y.backward(grad)
        conv.zero_grad(set_to_none=True)
        x.grad = None

    return infer, train_step


HAND_VARIANTS = {
    # What Conv2d runs: strided-view im2col + matmul, backward written out (autograd.Function).
    "function": lambda conv: conv,
    # The naive baseline, kept for comparison: F.unfold + matmul, autograd derives the backward.
    "unfold-autograd": lambda conv: lambda x: conv2d_unfold_autograd(
        x, conv.weight, conv.bias, conv.stride, conv.pads, conv.dilation, conv.groups),
    # im2col + matmul for every shape, depthwise convs included (which Conv2d runs as taps).
    "matmul-only": lambda conv: lambda x: UnfoldMatmulConv.apply(
        x, conv.weight, conv.bias, conv.stride, conv.pads, conv.dilation, conv.groups,
        plan_for(x, conv.weight, conv.bias, conv.stride, conv.pads, conv.dilation,
                 conv.groups, UnfoldMatmulConv.apply)),
}


def layer_step_functions(kwargs, in_shape, first, device, variant, dtype=None):
    """{"hand": (infer, train_step), "native": (...)} on the same weights and inputs."""
    kwargs = {**kwargs, "kernel_size": tuple(kwargs["kernel_size"]),
              "stride": tuple(kwargs["stride"]), "dilation": tuple(kwargs["dilation"]),
              "padding": kwargs["padding"] if isinstance(kwargs["padding"], str)
              else tuple(kwargs["padding"])}
    native = torch.nn.Conv2d(**kwargs).to(device)
    hand = Conv2d(**kwargs).to(device)
    hand.load_state_dict(native.state_dict())
    x = torch.randn(in_shape, device=device)
    if dtype is not None:   # the layout oneDNN and cuDNN run bf16 fastest in
        x = x.contiguous(memory_format=torch.channels_last)
        native = native.to(memory_format=torch.channels_last)
    x.requires_grad_(not first)  # the network's input needs no gradient
    with torch.no_grad(), autocast(device, dtype):
        grad = torch.randn_like(native(x))
    return {"hand": conv_step_functions(hand, HAND_VARIANTS[variant](hand), x, grad, device,
                                        dtype),
            "native": conv_step_functions(native, native, x, grad, device, dtype)}


def bench_conv_layer(kwargs, in_shape, first, device, warmup, repeats, variant="function",
                     dtype=None, peaks=None):
    """Median times of a layer's inference and training step, hand-written and native, and
    their peak memory: `peaks` where given (the CPU's, from `cpu_peak_bytes`), else measured
    here."""
    fns = layer_step_functions(kwargs, in_shape, first, device, variant, dtype)
    result = {}
    for kind, index in (("infer", 0), ("train", 1)):
        for impl in fns:
            for _ in range(warmup):
                fns[impl][index]()
        times = {impl: [] for impl in fns}
        for _ in range(repeats):                      # alternate: drift hits both alike
            for impl in fns:
                times[impl].append(timed(fns[impl][index], device))
        for impl in fns:
            result[f"{impl}_{kind}"] = statistics.median(times[impl])
    if peaks is None:
        peaks = {impl: peak_bytes(fns[impl][1], device) for impl in fns}
    result.update({f"{impl}_mem": peaks[impl] for impl in fns})
    return result


def print_cpu_peaks(specs_json):
    """The --peak-of child: for each layer spec, one warm-up step, then the measured one, for
    each impl."""
    results = []
    for spec in json.loads(specs_json):
        fns = layer_step_functions(spec["kwargs"], spec["in_shape"], spec["first"],
                                   torch.device("cpu"), spec["variant"],
                                   torch.bfloat16 if spec["bf16"] else None)
        peaks = {}
        for impl, (_, train_step) in fns.items():
            train_step()
            peaks[impl] = peak_bytes(train_step, torch.device("cpu"))
        results.append(peaks)
        del fns
    print(json.dumps(results))


def fmt_shape(kwargs, in_shape):
    k = "x".join(map(str, kwargs["kernel_size"]))
    s = "" if kwargs["stride"] == (1, 1) else f" s{kwargs['stride'][0]}"
    g = "" if kwargs["groups"] == 1 else f" g{kwargs['groups']}"
    n, c, h, w = in_shape
    return f"{n}x{c}x{h}x{w} -> {kwargs['out_channels']}, {k}{s}{g}"


def geomean(values):
    return math.exp(sum(map(math.log, values)) / len(values))


def conv_shapes(names, batch_size, image_size):
    """[(label, conv kwargs, input shape, is_first)]: each distinct conv layer of the networks."""
    rows, seen = [], set()
    for name in names:
        batch = batch_size or default_batch_size(name)
        for model_name, layer, kwargs, in_shape, first in conv_layers(name, batch, image_size):
            key = (repr(kwargs), in_shape, first)
            if key not in seen:
                seen.add(key)
                rows.append((f"{model_name}.{layer}", kwargs, in_shape, first))
    return rows


def layer_table(args, device, dtype, rows):
    """Print one row per conv shape; return the (inference, training-step) ratios."""
    print("| layer | input -> out, kernel | infer hand ms | native ms | ratio | "
          "train hand ms | native ms | ratio | peak hand MiB | native MiB | ratio |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    infer_ratios, train_ratios = [], []
    # On the CPU every shape's peak memory comes from one child process (see cpu_peak_bytes).
    peaks = cpu_peak_bytes([{"kwargs": kwargs, "in_shape": in_shape, "first": first,
                             "variant": args.hand_variant, "bf16": dtype is not None}
                            for _, kwargs, in_shape, first in rows]) \
        if device.type == "cpu" else [None] * len(rows)
    for (label, kwargs, in_shape, first), peak in tqdm(list(zip(rows, peaks)),
                                                       desc="conv shapes", file=sys.stderr):
        r = bench_conv_layer(kwargs, in_shape, first, device, args.warmup, args.repeats,
                             args.hand_variant, dtype, peak)
        infer_ratios.append(r["hand_infer"] / r["native_infer"])
        train_ratios.append(r["hand_train"] / r["native_train"])
        mem = ("n/a | n/a | n/a" if r["hand_mem"] is None else
               f"{r['hand_mem'] / 2**20:.1f} | {r['native_mem'] / 2**20:.1f} | "
               f"{r['hand_mem'] / max(r['native_mem'], 1):.2f}")
        print(f"| {label} | {fmt_shape(kwargs, in_shape)} | {r['hand_infer'] * 1e3:.2f} | "
              f"{r['native_infer'] * 1e3:.2f} | {infer_ratios[-1]:.2f} | "
              f"{r['hand_train'] * 1e3:.2f} | {r['native_train'] * 1e3:.2f} | "
              f"{train_ratios[-1]:.2f} | {mem} |", flush=True)
    return infer_ratios, train_ratios


def network_table(args, device, dtype, names):
    """One training epoch of each whole network, hand-written convs against nn.Conv2d. In bf16
    the native network runs in its best form (channels_last weights and inputs), and so do the
    inputs of ours."""
    layout = "channels_last" if dtype is not None else "contiguous"
    print(f"\n| network | epoch of {args.epoch_images} images, hand s | native ({layout}) s | "
          f"ratio |")
    print("|---|---:|---:|---:|")
    images, labels = random_epoch(args.epoch_images, device)
    if dtype is not None:
        images = images.contiguous(memory_format=torch.channels_last)
    ratios = {}
    for name in names:
        batch = args.batch_size or default_batch_size(name)
        seconds = {}
        for conv in ("hand", "native"):
            torch.manual_seed(0)
            net = network(name, conv, args.image_size).to(device)
            if conv == "native" and dtype is not None:
                net = net.to(memory_format=torch.channels_last)
            seconds[conv], _ = train_epoch_seconds(net, images, labels, batch, device, dtype)
        ratios[name] = seconds["hand"] / seconds["native"]
        print(f"| {name} (batch {batch}) | {seconds['hand']:.1f} | {seconds['native']:.1f} | "
              f"{ratios[name]:.2f} |", flush=True)
    return ratios


STEP_VARIANTS = (("hand", "hand", torch.contiguous_format),
                 ("hand channels_last", "hand", torch.channels_last),
                 ("native channels_last", "native", torch.channels_last))


def network_steps(name, batch, device, dtype, repeats, image_size=None):
    """{variant: median seconds of one SGD training step of network `name`} for the
    STEP_VARIANTS: the hand-written convs with weights and input in the default layout, the
    same in channels_last (where a layout cliff would show), and nn.Conv2d in channels_last,
    its best form. The three alternate, after one warm-up step each (where the hand-written
    convs measure the variants of layer shapes and layouts not measured before in this
    process, conv/plans.py)."""
    images, labels = random_epoch(batch, device)
    steps = {}
    for label, conv, layout in STEP_VARIANTS:
        torch.manual_seed(0)
        net = network(name, conv, image_size).to(device).to(memory_format=layout)
        steps[label] = functools.partial(sgd_step(net, device, dtype),
                                         images.contiguous(memory_format=layout), labels)
        steps[label]()
    times = {label: [] for label in steps}
    for _ in range(repeats):
        for label, step in steps.items():
            times[label].append(timed(step, device))
    return {label: statistics.median(t) for label, t in times.items()}


def step_names(models):
    """The networks of the whole-network step table (--step-models): all is every network a
    preset trains, finetune's backbone included."""
    if models != "all":
        return models.split(",")
    return sorted(MODELS) + [PRESETS["finetune"]["model"]]


def step_table(args, device, precisions):
    """One training step of each whole network, hand-written (both layouts) against
    nn.Conv2d in channels_last, in each of `precisions` [(dtype, why)]; returns
    {"network precision": {"hand": ratio, "hand channels_last": ratio}}."""
    print(f"\nWhole networks, one training step (SGD), median of {args.step_repeats}:\n")
    print("| network | precision | batch | hand ms | hand channels_last ms | native "
          "channels_last ms | ratio | ratio channels_last |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    ratios = {}
    for dtype, why in precisions:
        precision = "bf16" if dtype is not None else "fp32"
        for name in tqdm(step_names(args.step_models), desc=f"networks, {precision}",
                         file=sys.stderr):
            batch = args.step_batch or default_batch_size(name)
            ms = {k: v * 1e3 for k, v in network_steps(name, batch, device, dtype,
                                                       args.step_repeats, args.image_size).items()}
            native = ms["native channels_last"]
            ratios[f"{name} {precision}"] = {k: ms[k] / native for k, _, _ in STEP_VARIANTS[:2]}
            print(f"| {name} | {precision} ({why}) | {batch} | {ms['hand']:.1f} | "
                  f"{ms['hand channels_last']:.1f} | {native:.1f} | "
                  f"{ms['hand'] / native:.2f} | {ms['hand channels_last'] / native:.2f} |",
                  flush=True)
    return ratios


def conv_benchmark(args, device, dtype, why):
    names = sorted(MODELS) if args.models == "all" else args.models.split(",")
    mode = "bf16 autocast, channels_last" if dtype is not None else "float32"
    tf32 = disable_tf32(device)        # every float32 row: true float32 on both sides
    print(f"Hand-written Conv2d ({args.hand_variant}) vs native, {describe(device)}, {mode} "
          f"({describe_precision(dtype, why)}{'; float32 rows: ' + tf32 if tf32 else ''}), "
          f"torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; median of {args.repeats} after {args.warmup} "
          f"warm-up\n")
    infer_ratios, train_ratios = layer_table(args, device, dtype, conv_shapes(
        names, args.batch_size, args.image_size)) if args.repeats else ([], [])
    networks = network_table(args, device, dtype, names) if args.epoch_images else {}
    precisions = [(None, why if dtype is None else "--precision fp32")] + (
        [(dtype, why)] if dtype is not None else [])
    steps = step_table(args, device, precisions) if args.step_repeats else {}
    result = {"precision": mode, "layers": len(train_ratios), "networks": networks,
              "steps": steps}
    if train_ratios:
        result.update(infer=geomean(infer_ratios), train=geomean(train_ratios))
        print(f"\ngeomean inference ratio (hand/native): {result['infer']:.2f}")
        print(f"geomean train-step ratio (hand/native): {result['train']:.2f}")
    return result


def main(argv=None):
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
    p.add_argument("--hand-variant", default="function", choices=sorted(HAND_VARIANTS),
                   help="--conv: which formulation of the hand-written conv to time per layer")
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
        return print_cpu_peaks(args.peak_of)
    try:
        device = pick_device(args.device)
        keep_freed_memory(device)
        precision = pick_precision(args.precision, device) if args.conv else None
        conv_plans.measuring()              # a bad CIFAR_CONV_MEASURE: its one line, now
    except ValueError as e:
        cli.fail(str(e))
    if args.conv:
        ratios = conv_benchmark(args, device, *precision)
    else:
        args.batch_size = args.batch_size or 128
        ratios = timing_study(args, device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": describe(device), "torch": torch.__version__, **ratios}, f,
                      indent=1)


if __name__ == "__main__":
    main()
