"""Check the repo on a GPU in about five minutes: what only an accelerator can show.

    ./gpu_check.sh                                  # synthetic data, the first GPU
    ./gpu_check.sh --data-dir data --device cuda    # with CIFAR-10 where it is there
    CIFAR_SYSTEM_PYTHON=1 ./gpu_check.sh            # no venv, no pip: the Python there

The parts, each recorded (with the error that ended it, if any) in OUT/gpu_check.json:
  conv        every conv layer shape of the presets' networks and a depthwise conv, the
              hand-written conv and F.conv2d against a float64 reference, forward and
              gradients, in float32 (TF32 off on both sides) and in bf16;
  memory      peak memory of one fast96 training step at batch 1024, hand-written and native;
  steps       timed training steps of fast94 and fast96, hand-written against native;
  syncs       torch.cuda.set_sync_debug_mode("warn") over three fast94 training steps;
  train       one epoch of fast94 with TTA (train.py), then inference.py on its weights;
  resume      the same run stopped by SIGTERM mid-epoch, resumed, against the uninterrupted one;
  cpu-resume  a run checkpointed on the CPU, resumed on the device;
  compile     one epoch with --compile;
  muon        one epoch with --optimizer muon.
--tiny runs every part at a toy size: the test suite's dry run on the CPU.
"""
import contextlib
import importlib
import io
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

import cli
from conv import conv2d_unfold
from conv.layers import explicit_padding
from conv_benchmark import conv_shapes, network, network_steps
from data import DataError, channel_stats, load_cifar, write_synthetic_cifar10
from device import describe, pick_device
from model import build_model
from optim import Lookahead, lr_schedule, make_optimizers, make_schedulers
from precision import autocast, disable_tf32, pick_precision
from run_setup import get_args as train_args
from timing import peak_bytes, sgd_step
from train import augmentation, train_step, training_batch

PARTS = ("conv", "memory", "steps", "syncs", "train", "resume", "cpu-resume", "compile", "muon")


class Size(NamedTuple):
    """How large each part runs."""
    batch: int              # of the training steps and runs
    repeats: int            # timed steps per network
    conv_images: int        # per conv shape of the conv part
    per_file: int           # synthetic images per CIFAR data file
    networks: tuple         # whose steps are timed; the last one's memory is measured
    cpu_batch: int          # of the cpu-resume part's run on the CPU
    step_bound: float       # hand-written / native past which a step is a cliff (as the tests'
    #                         guard); none at a toy batch, where the conv's fixed costs weigh


SIZES = {"full": Size(1024, 5, 8, 10_000, ("fast94", "fast96"), 32, 3.0),
         "tiny": Size(8, 1, 2, 8, ("fast94",), 16, float("inf"))}
# A part fails where the hand-written conv is further from float64 than this many times the
# native conv's error, or than the dtype's floor, whichever is larger.
ERROR_FACTOR, ERROR_FLOOR = 4, {torch.float32: 1e-5, torch.bfloat16: 1e-2}
# Float32 convolutions on CUDA stay within this of float64 (the CPU's oneDNN: 2e-5); TF32, with
# its 10-bit mantissa, is far off.
FP32_NATIVE_BOUND = 1e-4
# A resumed run's weights against the uninterrupted run's, relative to their largest: 0 on the
# CPU (exact); a GPU's atomics may reorder sums.
RESUME_BOUND = {"cpu": 0.0, "accelerator": 1e-2}


def get_args(argv=None):
    p = cli.parser(__file__, __doc__)
    cli.add_device_flags(p, "It applies to the training parts, memory and steps; the conv "
                            "part runs both")
    p.add_argument("--data-dir",
                   help="CIFAR-10 in its python layout (default: synthetic files in OUT)")
    p.add_argument("--out", default=os.path.join("runs", time.strftime("gpu-check-%Y%m%d-%H%M%S")),
                   help="results folder (default: runs/gpu-check-<timestamp>)")
    p.add_argument("--tiny", action="store_true", help="every part at a toy size (a dry run)")
    p.add_argument("--skip", default="", metavar="PARTS",
                   help=f"comma-separated parts to leave out, from: {', '.join(PARTS)}")
    args = p.parse_args(argv)
    if not args.out:
        p.error("--out must name a folder")
    unknown = set(args.skip.split(",")) - set(PARTS) - {""}
    if unknown:
        p.error(f"unknown parts: {', '.join(sorted(unknown))}")
    return args


def rel_err(a, b):
    """max |a - b| / max |b|, computed on the CPU in float64: the tolerance measure of the
    conv part and of the tests."""
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def conv_errors(kwargs, in_shape, device, dtype):
    """(hand-written, native) errors against float64 of a conv's output and gradients (input,
    weight, bias): the largest relative error of the four."""
    gen = torch.Generator().manual_seed(0)
    out_c, k = kwargs["out_channels"], kwargs["kernel_size"]
    k = (k, k) if isinstance(k, int) else k
    w_shape = (out_c, kwargs["in_channels"] // kwargs["groups"], *k)
    x, w, b = (torch.randn(s, generator=gen, dtype=torch.float64)
               for s in (in_shape, w_shape, (out_c,)))
    x, w, b = (t.to(dtype).double() for t in (x, w, b))      # the values both sides see
    # F.conv2d takes the layer's padding as it is ('same' too), the hand-written conv as
    # (left, right, top, bottom).
    padding = {F.conv2d: kwargs["padding"],
               conv2d_unfold: explicit_padding(kwargs["padding"], k, kwargs["dilation"])}

    def outputs(conv, on, of):
        leaves = [t.to(on, of, copy=True).requires_grad_() for t in (x, w, b)]
        y = conv(*leaves, kwargs["stride"], padding[conv], kwargs["dilation"], kwargs["groups"])
        y.backward(torch.ones_like(y) / y.numel() ** 0.5)
        return [y.detach()] + [t.grad for t in leaves]
    reference = outputs(F.conv2d, "cpu", torch.float64)
    return tuple(max(rel_err(a, r) for a, r in zip(outputs(conv, device, dtype), reference))
                 for conv in (conv2d_unfold, F.conv2d))


def check_convs(device, size):
    """Every distinct conv layer of the presets' networks and one depthwise conv, in float32
    and bf16: the largest errors, and the shapes where the hand-written conv is off."""
    shapes = [(kwargs, (size.conv_images, *in_shape[1:])) for _, kwargs, in_shape, _ in conv_shapes(
        ["seed", "fast94", "fast95", "fast96", "resnet18"], size.conv_images, None)]
    depthwise = dict(in_channels=32, out_channels=32, kernel_size=3, stride=(1, 1),
                     padding=(1, 1), dilation=(1, 1), groups=32)
    shapes.append((depthwise, (size.conv_images, 32, 16, 16)))
    result = {"shapes": len(shapes), "off": []}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        errors = [conv_errors(kwargs, in_shape, device, dtype) for kwargs, in_shape in shapes]
        result[name] = {"hand": max(e[0] for e in errors), "native": max(e[1] for e in errors)}
        result["off"] += [f"{name} {kwargs} {in_shape}: {hand:.2e} (native {native:.2e})"
                          for (kwargs, in_shape), (hand, native) in zip(shapes, errors)
                          if hand > max(ERROR_FACTOR * native, ERROR_FLOOR[dtype])]
    if result["off"]:
        raise AssertionError(f"{len(result['off'])} conv shapes off: {result['off'][0]}")
    tf32 = [name for name, on in (("cuBLAS", torch.backends.cuda.matmul.allow_tf32),
                                  ("cuDNN", torch.backends.cudnn.allow_tf32)) if on]
    if device.type == "cuda" and (tf32 or result["float32"]["native"] > FP32_NATIVE_BOUND):
        raise AssertionError(f"float32 is not true float32: TF32 on in {tf32 or 'neither'}, "
                             f"native error {result['float32']['native']:.1e}")
    return result


def preset_step(preset, device, batch, autocast_ctx=contextlib.nullcontext()):
    """A function that takes one training step of train.py's loop (its batch function, step and
    lookahead pull) for `preset`'s network on `device`, on random images; `meta` stands in for
    an accelerator in the tests (no data, the same dispatch)."""
    device = torch.device(device)
    args = train_args(["--preset", preset, "--batch-size", str(batch)])
    model = build_model(args.model, 10).to(device)
    optimizers = make_optimizers(model, args)
    schedulers = make_schedulers(optimizers, 10, lr_schedule(args, args.epochs * 10))
    lookahead = Lookahead(model, 10 * args.epochs) if args.lookahead else None
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8)
    mean, std = (t.to(device) for t in channel_stats(images))
    images, labels = images.to(device), torch.randint(0, 10, (batch,)).to(device)
    flip_bits = torch.zeros(batch, dtype=torch.bool, device=device)
    gen = torch.Generator("cpu" if device.type == "meta" else device).manual_seed(0)
    idx = torch.arange(batch, device=device)

    def step():
        x, y = training_batch(images, labels, idx, mean, std, gen, 0, augmentation(args),
                              flip_bits)
        train_step(model, optimizers, schedulers, x, y, 10, args.label_smoothing,
                   args.grad_clip, autocast_ctx)
        if lookahead is not None:
            lookahead.step(5)      # a step that pulls
    return step


def check_memory(device, size, dtype):
    """Peak memory (MiB) of one training step of fast96 (--tiny: fast94), hand-written and
    native."""
    images = torch.randn(size.batch, 3, 32, 32, device=device)
    labels = torch.randint(0, 10, (size.batch,), device=device)
    peaks = {}
    for conv in ("hand", "native"):
        step = sgd_step(network(size.networks[-1], conv).to(device), device, dtype)
        step(images, labels)
        peak = peak_bytes(lambda: step(images, labels), device)
        peaks[conv] = None if peak is None else round(peak / 2 ** 20, 1)
    return {"network": size.networks[-1], "batch": size.batch, "peak_mib": peaks}


def check_steps(device, size, dtype):
    """Median training-step times (ms) of fast94 and fast96 (--tiny: fast94), and hand /
    native."""
    result = {}
    for name in size.networks:
        ms = {k: round(v * 1e3, 2) for k, v in
              network_steps(name, size.batch, device, dtype, size.repeats).items()}
        result[name] = {**ms, "ratio": round(ms["hand"] / ms["native channels_last"], 3)}
    cliffs = [f"{name} {label}: {ms:.0f} ms against {r['native channels_last']:.0f} ms native"
              for name, r in result.items() for label, ms in r.items()
              if label.startswith("hand") and ms > size.step_bound * r["native channels_last"]]
    if cliffs:
        raise AssertionError(f"past {size.step_bound}x native: {'; '.join(cliffs)}")
    return result


def check_syncs(device, size, dtype):
    """Host-device syncs over three fast94 training steps, as CUDA's debug mode warns them."""
    if device.type != "cuda":
        return {"skipped": "CUDA only"}
    step = preset_step("fast94", device, size.batch, autocast(device, dtype))
    step()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(3):
                step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message).splitlines()[0] for w in caught
             if "synchroniz" in str(w.message)]
    if syncs:
        raise AssertionError(f"{len(syncs)} syncs in 3 steps: {syncs[0]}")
    return {"syncs": 0}


def script(name, *args, stop_when=None):
    """Run src/NAME.py's main(args) in this process (each part's CUDA context and imports once,
    not per run); (exit code, stdout, stderr, seconds). stop_when: a function that another
    thread checks every 10 ms; once it is true, this process gets SIGTERM, as from a cluster
    (a late one is ignored: the check goes on)."""
    out, err, done = io.StringIO(), io.StringIO(), threading.Event()

    def send_stop():
        while not done.is_set():
            if stop_when():
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.01)
    # train.py leaves both signals ignored after it stopped on one: put them back after each run.
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    if stop_when is not None:
        threading.Thread(target=send_stop, daemon=True).start()
    start, code = time.perf_counter(), 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            importlib.import_module(name).main([str(a) for a in args])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        done.set()
        for s, handler in previous.items():
            signal.signal(s, handler)
    if code == 128 + signal.SIGINT:     # Ctrl-C: the user stops the check, not just this run
        raise KeyboardInterrupt
    return code, out.getvalue(), err.getvalue(), round(time.perf_counter() - start, 1)


def last_line(text):
    """The last line a terminal would show of `text`: progress bars' carriage returns and
    cursor moves taken out."""
    lines = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text).replace("\r", "\n").split("\n")
    return next((line.strip() for line in reversed(lines) if line.strip()), "(no output)")


def run_ok(name, *args):
    """`script`, which must succeed: (stdout, stderr, seconds), else an error with its last
    line."""
    code, out, err, seconds = script(name, *args)
    if code != 0:
        raise RuntimeError(f"{name}.py exited {code}: {last_line(err)}")
    return out, err, seconds


def training(data, device, precision, size, out, *flags):
    """The flags of a one-epoch fast94 run on `data` writing to `out`. The conv's variants are
    not measured (they are on the CPU only): the resume part compares two runs bit for bit, and
    runs that measured apart may round float32 differently."""
    return ("--preset", "fast94", "--epochs", "1", "--batch-size", size.batch, "--data-dir", data,
            "--device", device.type, "--precision", precision, "--no-conv-measure", "--out", out,
            *flags)


def check_train(data, device, precision, size, out):
    """One epoch of fast94 with TTA, then the test-set report of inference.py on its weights."""
    summary, _, seconds = run_ok("train", *training(data, device, precision, size, out))
    report, _, _ = run_ok("inference", "--weights", os.path.join(out, "weights.pt"),
                          "--data-dir", data, "--device", device.type, "--precision",
                          precision, "--tta", "--json")
    return {"train": summary.strip(), "seconds": seconds,
            "inference_accuracy": json.loads(report)["accuracy"]}


def check_resume(data, device, precision, size, out, straight):
    """The `check_train` run stopped by SIGTERM once training has begun, resumed, and its final
    weights compared with the uninterrupted run's (`straight`, its folder)."""
    def started():      # TensorBoard's file: written once the run is set up
        return os.path.isdir(out) and any(f.startswith("events.") for f in os.listdir(out))
    code, _, err, _ = script("train", *training(data, device, precision, size, out),
                             stop_when=started)
    stopped = last_line(err)
    if code != 128 + signal.SIGTERM:
        raise RuntimeError(f"the stopped run exited {code}: {stopped}")
    _, err, _ = run_ok("train", "--resume", out, "--device", device.type)
    if "note: resumed on another machine" in err:
        raise AssertionError("a resume on the same device re-seeded: " + next(
            line for line in err.splitlines() if line.startswith("note: resumed")))
    a, b = (torch.load(os.path.join(d, "weights.pt"), weights_only=True)["state_dict"]
            for d in (straight, out))
    diff = max(rel_err(b[k], a[k]) for k in a if a[k].is_floating_point())
    bound = RESUME_BOUND["cpu" if device.type == "cpu" else "accelerator"]
    if diff > bound:
        raise AssertionError(f"the resumed run's weights differ from the uninterrupted run's "
                             f"by {diff:.1e} (relative), over {bound:g}")
    return {"stopped": stopped, "weight_difference": diff}


def check_cpu_resume(device, size, out):
    """A fast94 run of 2 short epochs on the CPU (at most 320 images, batch 32), put back to its
    checkpoint after epoch 1 and resumed on `device`: its notes on what was re-seeded."""
    data = os.path.join(out, "data")
    write_synthetic_cifar10(data, per_file=min(size.per_file, 64), n_test=32)
    run_ok("train", "--preset", "fast94", "--epochs", "2", "--batch-size", size.cpu_batch,
           "--data-dir", data, "--device", "cpu", "--out", out)
    shutil.copyfile(os.path.join(out, "checkpoint.prev.pt"), os.path.join(out, "checkpoint.pt"))
    summary, err, seconds = run_ok("train", "--resume", out, "--device", device.type)
    notes = [line for line in err.splitlines() if line.startswith("note: ")]
    if device.type != "cpu" and not any("re-seeded" in line for line in notes):
        raise AssertionError("the resume on the device did not say what it re-seeded")
    return {"train": summary.strip(), "notes": notes, "seconds": seconds}


def run_part(part, args, device, dtype, size, data):
    """The figures of one part (a dict)."""
    runs = os.path.join(args.out, "runs")
    if part == "conv":
        return check_convs(device, size)
    if part == "memory":
        return check_memory(device, size, dtype)
    if part == "steps":
        return check_steps(device, size, dtype)
    if part == "syncs":
        return check_syncs(device, size, dtype)
    if part == "train":
        return check_train(data, device, args.precision, size, os.path.join(runs, "train"))
    if part == "resume":
        return check_resume(data, device, args.precision, size, os.path.join(runs, "resume"),
                            os.path.join(runs, "train"))
    if part == "cpu-resume":
        return check_cpu_resume(device, size, os.path.join(runs, "cpu-resume"))
    flags = ("--compile",) if part == "compile" else ("--optimizer", "muon")
    summary, _, seconds = run_ok("train", *training(data, device, args.precision, size,
                                                    os.path.join(runs, part), *flags))
    return {"train": summary.strip(), "seconds": seconds}


def main(argv=None):
    args = get_args(argv)
    try:
        device = pick_device(args.device, verbose=False)
        dtype, _ = pick_precision(args.precision, device)
        size = SIZES["tiny" if args.tiny else "full"]
        os.makedirs(args.out, exist_ok=True)
        data = args.data_dir or os.path.join(args.out, "data")
        if args.data_dir:
            load_cifar(data, download=False)        # a missing copy: its one line, now
        else:
            write_synthetic_cifar10(data, per_file=size.per_file, n_test=size.per_file // 5)
    except (ValueError, DataError, OSError) as e:
        cli.fail(str(e))
    tf32 = disable_tf32(device)
    results = {"device": describe(device), "torch": torch.__version__,
               "precision": "bf16" if dtype is not None else "fp32", "fp32": tf32 or "float32",
               "data": args.data_dir or "synthetic", "parts": {}}
    path = os.path.join(args.out, "gpu_check.json")
    parts = [p for p in PARTS if p not in args.skip.split(",")]
    try:
        for part in tqdm(parts, desc="gpu check", file=sys.stderr):
            results["parts"][part] = timed_part(part, parts, args, device, dtype, size, data)
            with open(path, "w") as f:
                json.dump(results, f, indent=1)
    except KeyboardInterrupt:
        cli.fail(f"interrupted; the parts run so far are in {path}", 128 + signal.SIGINT)
    failed = [p for p, r in results["parts"].items() if not r["ok"]]
    skipped = [p for p, r in results["parts"].items() if "skipped" in r]
    print(f"gpu check on {describe(device)}: {len(parts) - len(failed) - len(skipped)} of "
          f"{len(parts)} parts passed"
          + (f", {len(skipped)} skipped ({', '.join(skipped)})" if skipped else "")
          + (f", failed: {', '.join(failed)}" if failed else "") + f"; {path}")
    if failed:
        sys.exit(1)


def timed_part(part, parts, args, device, dtype, size, data):
    """One part's figures, with "ok", its seconds, and the error that ended it, if one did."""
    start = time.perf_counter()
    try:
        if part == "resume" and "train" not in parts:
            raise RuntimeError("it compares with the train part's run: do not skip that")
        figures = {"ok": True, **run_part(part, args, device, dtype, size, data)}
    except Exception as e:          # recorded; the other parts still run
        figures = {"ok": False, "error": f"{type(e).__name__}: {e}".splitlines()[0]}
    figures["seconds_total"] = round(time.perf_counter() - start, 1)
    return figures


if __name__ == "__main__":
    main()
