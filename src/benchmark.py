"""Timing study of the seed net: eager vs torch.compile vs TorchScript vs torch.export.

    python src/benchmark.py --device cpu

Forward (inference, batch --batch-size) for each way of running the model, then one training
epoch (--epoch-images random images; no dataset needed) eager vs compiled. Each measurement
warms up first and reports the median of repeats; the first call of a compiled variant is
reported on its own as its compile time. Prints a Markdown table with ratios to eager.
"""
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from tqdm import tqdm

import cli
from device import describe, pick_device
from model import build_model


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "xpu":
        torch.xpu.synchronize()


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


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
        except Exception as e:   # a variant this PyTorch cannot build is reported, not fatal
            rows.append((name, None, None, f"{type(e).__name__}: {str(e).splitlines()[0][:60]}"))
    return rows


def train_epoch_seconds(model, images, labels, batch_size, device):
    """Seconds for one epoch of SGD steps over `images` (the first step excluded: it is where
    torch.compile compiles), and the seconds of that first step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)

    def step(i):
        x, y = images[i:i + batch_size], labels[i:i + batch_size]
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    model.train()
    first = timed(lambda: step(0), device)
    starts = range(batch_size, len(images) - batch_size + 1, batch_size)
    rest = timed(lambda: [step(i) for i in tqdm(starts, leave=False, file=sys.stderr)], device)
    # Scale to the full epoch so eager and compiled are compared over the same number of steps.
    return rest * (len(starts) + 1) / max(len(starts), 1), first


def markdown(rows, unit_scale, unit, baseline):
    lines = [f"| variant | {unit} | ratio to eager | first call s | note |",
             "|---|---:|---:|---:|---|"]
    for name, seconds, first, note in rows:
        if seconds is None:
            lines.append(f"| {name} | n/a | n/a | n/a | {note} |")
        else:
            lines.append(f"| {name} | {seconds * unit_scale:.2f} | {seconds / baseline:.2f} | "
                         f"{first:.2f} | {note} |")
    return "\n".join(lines)


def main(argv=None):
    p = cli.parser(__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--epoch-images", type=int, default=45000,
                   help="images in the timed training epoch (45,000 = the real seed epoch)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated subset of {','.join(VARIANTS)} (eager always runs)")
    p.add_argument("--skip-epoch", action="store_true", help="time only the forward pass")
    args = p.parse_args(argv)
    variants = ["eager"] + [v for v in args.variants.split(",") if v and v != "eager"]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants: {', '.join(sorted(unknown))}")
    try:
        device = pick_device(args.device)
    except ValueError as e:
        cli.fail(str(e))

    torch.manual_seed(0)
    model = build_model("seed", 10).to(device).eval()
    x = torch.randn(args.batch_size, 3, 32, 32, device=device)
    rows = forward_study(model, x, variants, device, args.warmup, args.repeats)
    print(f"Seed net forward, batch {args.batch_size}, float32, {describe(device)}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print(markdown(rows, 1e3, "median ms/batch", rows[0][1]))

    if not args.skip_epoch:
        images = torch.randn(args.epoch_images, 3, 32, 32, device=device)
        labels = torch.randint(0, 10, (args.epoch_images,), device=device)
        epoch_rows = []
        for name in [v for v in ("eager", "torch.compile") if v in variants]:
            torch.manual_seed(0)
            net = build_model("seed", 10).to(device)
            net = torch.compile(net) if name == "torch.compile" else net
            try:
                seconds, first = train_epoch_seconds(net, images, labels, args.batch_size, device)
                epoch_rows.append((name, seconds, first, ""))
            except Exception as e:
                epoch_rows.append((name, None, None,
                                   f"{type(e).__name__}: {str(e).splitlines()[0][:60]}"))
        print(f"\nSeed net, one training epoch of {args.epoch_images} images, "
              f"batch {args.batch_size}\n")
        print(markdown(epoch_rows, 1, "s/epoch (first step excluded)", epoch_rows[0][1]))
    best = min((r for r in rows if r[1] is not None), key=lambda r: r[1])
    print(f"\nfastest forward: {best[0]} at {best[1] / rows[0][1]:.2f}x eager")


if __name__ == "__main__":
    main()
