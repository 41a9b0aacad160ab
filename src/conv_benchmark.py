"""The hand-written conv against the native one, `python src/benchmark.py --conv`: every conv
layer shape of the networks at its training batch size (inference and training step), whole
networks' training epochs and steps. Ratios are hand / native from the same run, alternating
the two; in bf16 the native convs run channels_last, their best form.
"""
import functools
import json
import os
import subprocess
import sys
from statistics import geometric_mean

import torch
from tqdm import tqdm

from conv import Conv2d, conv2d_unfold_autograd
from conv.functions import UnfoldMatmulConv
from conv.plans import plan_for
from device import describe
from model import MODELS, build_model
from precision import autocast, disable_tf32
from precision import describe as describe_precision
from presets import PRESETS
from pretrained import load_backbone
from timing import (alternating_medians, peak_bytes, random_epoch, sgd_step,
                    train_epoch_seconds)


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


def cpu_peak_bytes(specs):
    """[{impl: peak bytes of one training step}] for a list of layer specs, measured in one
    child process whose glibc returns every large block to the system when freed (a fixed mmap
    threshold), so that its resident set follows the live tensors. Timing stays here, with the
    normal allocator: fresh mappings cost page faults on every allocation."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    benchmark = os.path.join(os.path.dirname(os.path.abspath(__file__)), "benchmark.py")
    result = subprocess.run([sys.executable, benchmark, "--peak-of", json.dumps(specs)],
                            capture_output=True, text=True, env=env)
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
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}  # JSON's
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
        medians = alternating_medians({impl: f[index] for impl, f in fns.items()}, device,
                                      repeats)
        result.update({f"{impl}_{kind}": seconds for impl, seconds in medians.items()})
    if peaks is None:
        peaks = {impl: peak_bytes(fns[impl][1], device) for impl in fns}
    result.update({f"{impl}_mem": peaks[impl] for impl in fns})
    return result


def print_cpu_peaks(specs_json):
    """The --peak-of child: for each layer spec and impl, a warm-up step, then the measured one."""
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
    return f"{'x'.join(map(str, in_shape))} -> {kwargs['out_channels']}, {k}{s}{g}"


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
          "train hand ms | native ms | ratio | peak hand MiB | native MiB | ratio |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
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
    layout, name = (torch.channels_last, "channels_last") if dtype is not None else (
        torch.contiguous_format, "contiguous")
    print(f"\n| network | epoch of {args.epoch_images} images, hand s | native ({name}) s | "
          f"ratio |\n|---|---:|---:|---:|")
    images, labels = random_epoch(args.epoch_images, device)
    images = images.contiguous(memory_format=layout)
    ratios = {}
    for name in names:
        batch = args.batch_size or default_batch_size(name)
        seconds = {}
        for conv in ("hand", "native"):
            torch.manual_seed(0)
            net = network(name, conv, args.image_size).to(
                device, memory_format=layout if conv == "native" else torch.contiguous_format)
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
    return alternating_medians(steps, device, repeats)


def step_table(args, device, precisions):
    """One training step of each whole network, hand-written (both layouts) against
    nn.Conv2d in channels_last, in each of `precisions` [(dtype, why)]; returns
    {"network precision": {"hand": ratio, "hand channels_last": ratio}}."""
    print(f"\nWhole networks, one training step (SGD), median of {args.step_repeats}:\n")
    print("| network | precision | batch | hand ms | hand channels_last ms | native "
          "channels_last ms | ratio | ratio channels_last |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|")
    ratios = {}
    for dtype, why in precisions:
        precision = "bf16" if dtype is not None else "fp32"
        # all: every network a preset trains, finetune's backbone included
        names = sorted(MODELS) + [PRESETS["finetune"]["model"]] if args.step_models == "all" \
            else args.step_models.split(",")
        for name in tqdm(names, desc=f"networks, {precision}", file=sys.stderr):
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


def study(args, device, dtype, why):
    """The three tables; {"precision", "layers", "networks", "steps", and the layers' geomean
    ratios "infer" and "train"}."""
    names = sorted(MODELS) if args.models == "all" else args.models.split(",")
    mode = "bf16 autocast, channels_last" if dtype is not None else "float32"
    tf32 = disable_tf32(device)        # every float32 row: true float32 on both sides
    print(f"Hand-written Conv2d ({args.hand_variant}) vs native, {describe(device)}, {mode} "
          f"({describe_precision(dtype, why)}{'; float32 rows: ' + tf32 if tf32 else ''}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of "
          f"{args.repeats} after {args.warmup} warm-up\n")
    infer_ratios, train_ratios = layer_table(args, device, dtype, conv_shapes(
        names, args.batch_size, args.image_size)) if args.repeats else ([], [])
    precisions = [(None, why if dtype is None else "--precision fp32")] + (
        [(dtype, why)] if dtype is not None else [])
    result = {"precision": mode, "layers": len(train_ratios),
              "networks": network_table(args, device, dtype, names) if args.epoch_images else {},
              "steps": step_table(args, device, precisions) if args.step_repeats else {}}
    if train_ratios:
        result.update(infer=geometric_mean(infer_ratios), train=geometric_mean(train_ratios))
        print(f"\ngeomean inference ratio (hand/native): {result['infer']:.2f}\n"
              f"geomean train-step ratio (hand/native): {result['train']:.2f}")
    return result
