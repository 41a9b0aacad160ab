"""Re-measure the README's results on the machine at hand, within a time budget.

A training step of each network the jobs need is timed first, within a twentieth of the
budget; then each job of src/jobs.py runs as a process at the largest rung of its ladder whose
estimate fits what is left (or is skipped with the reason), stopped when the budget runs out.
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

def get_args(argv=None):
    p = cli.parser(__file__, __doc__)
    p.add_argument("--budget", type=float, default=600,
                   help="seconds for everything, calibration included (default 600)")
    cli.add_device_flags(p, "Every job runs at it, and the steps that make the estimates")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--out", default=os.path.join("runs", time.strftime("reproduce-%Y%m%d-%H%M%S")),
                   help="results folder (default: runs/reproduce-<timestamp>)")
    p.add_argument("--only", metavar="NAMES",
                   help=f"comma-separated jobs, from: {', '.join(jobs.NAMES)}")
    args = p.parse_args(argv)
    if not 0 < args.budget < math.inf:
        p.error("--budget must be a positive number of seconds")
    only = set((args.only or "").split(",")) - {""}
    if args.only is not None and (not only or only - set(jobs.NAMES)):
        p.error(f"unknown jobs: {', '.join(sorted(only - set(jobs.NAMES))) or repr(args.only)}; "
                f"choose from {', '.join(jobs.NAMES)}")
    if not args.out:
        p.error("--out must name a folder")
    if os.path.exists(os.path.join(args.out, "results.json")):
        p.error(f"{args.out} holds the results of an earlier run; give another --out")
    return args


def start_seconds():
    """Seconds for a script of this repo to start (train.py's imports, no device set-up)."""
    begin = time.perf_counter()
    started = subprocess.run([sys.executable, os.path.join(jobs.SRC, "train.py"), "--help"],
                             capture_output=True, text=True)
    if started.returncode != 0:
        raise ValueError(f"the repo's scripts do not start with {sys.executable}: "
                         f"{(started.stderr.strip().splitlines() or ['?'])[-1]}")
    return time.perf_counter() - begin


def calibrate(selected, args, device, dtype, spent):
    """(the `jobs.Costs` of this machine, {job: why it cannot run here}). The networks of the
    jobs are built, and their steps timed in the jobs' order (the smallest rung first), none
    started once `spent()` seconds exceed the calibration's share of the budget."""
    begin = time.perf_counter()
    data = load_cifar(args.data_dir, "cifar10")
    read = time.perf_counter() - begin      # a job's process starts, then reads the dataset
    costs = jobs.Costs(device.type, start_seconds() + read,
                       (len(data["train_x"]), len(data["test_x"])), {}, {})
    reasons = {j["name"]: reason for j in selected if (reason := missing(j, args.data_dir))}
    batches = {net: batch for j in selected if j["name"] not in reasons
               for flags in reversed(j["ladder"]) for net, batch in jobs.networks(j, flags)}
    models = {}
    for net in batches:
        try:
            torch.manual_seed(0)
            models[net] = network(net[0], "hand", net[1])
        except (PretrainedError, ImportError, RuntimeError) as e:     # every job that runs it
            reasons.update({j["name"]: f"{net[0]}: {str(e).splitlines()[0]}" for j in selected
                            if any(n == net for f in j["ladder"] for n, _ in jobs.networks(j, f))})
    for net in tqdm(list(models), desc="calibration", file=sys.stderr, leave=False):
        if costs.step and spent() > args.budget / 20:        # the calibration's share
            break
        batch = batches[net]         # a first step, then the mean of two more
        epoch, costs.first[net] = train_epoch_seconds(
            models.pop(net).to(device), *random_epoch(3 * batch, device), batch, device, dtype)
        costs.step[net] = epoch / 3
        if device.type == "cuda":
            torch.cuda.empty_cache()     # the jobs' processes need the memory
    return costs, reasons


def missing(job, data_dir):
    """Why the job cannot run here (its ImageNet weights or dataset are not found), or None."""
    try:
        for flags in job["ladder"]:
            if "package" in BACKBONES.get(flags.get("pretrained"), {}):
                lite_weights_file(flags["pretrained"])
        if job["dataset"] != "cifar10":
            load_cifar(data_dir, job["dataset"], download=False)
    except (PretrainedError, DataError) as e:
        return str(e)


def choose(job, costs, left):
    """(flags, estimate, fits): the job's largest rung whose estimate fits in `left` seconds;
    else its smallest rung with an estimate (or with None: no rung has one) and False."""
    estimates = [(flags, jobs.estimate(job, flags, costs)) for flags in job["ladder"]]
    known = [(flags, seconds) for flags, seconds in estimates if seconds is not None]
    fitting = [(flags, seconds) for flags, seconds in known if seconds <= left]
    return (*fitting[0], True) if fitting else (*(known or estimates)[-1], False)


def run_command(argv, log_prefix, name, expected, deadline, clock):
    """Run `python argv` (stdout, stderr: log_prefix.out, .log) with a bar, its process group
    killed at `deadline` (clock() time) or on an interrupt: (exit code or None, seconds)."""
    started = clock()
    with open(log_prefix + ".out", "w") as out, open(log_prefix + ".log", "w") as err:
        proc = subprocess.Popen([sys.executable] + argv, stdout=out, stderr=err,
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


def run_job(job, flags, estimate, target, deadline, clock):
    """Run one rung of a job: its row's status, seconds, and metric, value and text or note."""
    out = os.path.join(target.out, "jobs", job["name"])
    os.makedirs(out, exist_ok=True)
    code, seconds = run_command(jobs.command(job, flags, target), out, job["name"], estimate,
                                deadline, clock)
    row = {"seconds": round(seconds, 1), "status": "failed"}
    if code is None:
        return {**row, "note": f"stopped when the budget ran out, after {seconds:.0f} s "
                               f"(estimated {estimate:.0f} s)"}
    if code != 0:       # the script's last `error: ...` line, else its last line
        with open(out + ".log", errors="replace") as f:
            lines = [line.strip() for line in f.read().splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error: ")] or lines or [
            f"exit code {code}"]
        return {**row, "note": errors[-1].removeprefix("error: ")}
    try:
        with open(out + ".out") as f:
            metric, value, text = jobs.read_result(job, flags, out, f.read())
    except (OSError, ValueError, KeyError) as e:
        return {**row, "note": f"no result: {e}"}
    return {**row, "status": "measured", "metric": metric, "value": value, "text": text}


def run_jobs(selected, costs, target, reasons, deadline, clock, write):
    """Each job in turn: skipped if it cannot run here (`reasons`: {job: why}) or does not fit
    what is left, else run at the largest rung that fits; `write(rows)` after each. A row's
    command runs as it stands from the folder reproduce.py was started in."""
    rows, path = [], os.environ.get("PYTHONPATH")
    pythonpath = [f"PYTHONPATH={path}"] if path else []    # the jobs' processes inherit it
    for job in selected:
        flags, estimate, fits = choose(job, costs, deadline - clock())
        reason = reasons.get(job["name"])
        if reason:              # the command it would have run
            flags, estimate = job["ladder"][0], None
        left = f"{max(deadline - clock(), 0):.0f} s left"
        command = pythonpath + ["python"] + jobs.command(job, flags, target)
        row = {"job": job["name"], "run": job["label"], "command": shlex.join(command),
               "metric": None, "value": None, "text": "", "seconds": None, "status": "skipped",
               "estimate": None if estimate is None else round(estimate, 1)}
        if reason or estimate is None:
            row["note"] = reason or (f"its networks' steps were not timed within the "
                                     f"calibration's share of the budget; {left}")
        elif not fits:
            row["note"] = f"needs about {row['estimate']:,.0f} s here, {left}"  # as kept
        else:
            row.update(run_job(job, flags, estimate, target, deadline, clock))
        rows.append(row)
        tqdm.write(f"{job['name']}: {row['status']}, {row['text'] or row['note']}",
                   file=sys.stderr)
        write(rows)
    return rows


def write_results(out, header, rows):
    """OUT/results.json (header + rows) and OUT/results.md (the README's table), each written
    to a temporary file and renamed."""
    table = [f"# Results on {header['device']}", "",
             f"torch {header['torch']}, {header['precision']} ({header['precision_reason']}), "
             f"budget {header['budget']:.0f} s, `{header['command']}`. Times are the job's "
             f"whole process; skipped rows give an estimate, never a measurement.", "",
             "| run | result | time | machine | command |", "|---|---|---|---|---|"]
    for r in rows:
        result = r["text"] if r["status"] == "measured" else f"{r['status']}: {r['note']}"
        seconds = f"{r['seconds']:.0f} s" if r["seconds"] is not None else ""
        table.append(f"| {r['run']} | {result} | {seconds} | {header['device']}, "
                     f"{header['precision']} | `{r['command']}` |")
    for name, text in (("results.json", json.dumps({**header, "rows": rows}, indent=1)),
                       ("results.md", "\n".join(table))):
        with open(os.path.join(out, name + ".tmp"), "w") as f:
            f.write(text + "\n")
        os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))


def main(argv=None, clock=time.monotonic):
    started = clock()
    args = get_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)   # as Ctrl-C: stops the job too
    try:
        device = pick_device(args.device, verbose=False)
        keep_freed_memory(device)         # as train.py and benchmark.py: the steps timed here
        dtype, why = pick_precision(args.precision, device)
        selected = [j for j in jobs.JOBS if not args.only or j["name"] in args.only.split(",")]
        os.makedirs(args.out, exist_ok=True)
        costs, reasons = calibrate(selected, args, device, dtype, lambda: clock() - started)
        precision = "bf16" if dtype is not None else "fp32"
        header = {"device": machine(device), "torch": torch.__version__,
                  "python": platform.python_version(), "precision": precision,
                  "precision_reason": why, "budget": args.budget, "command": shlex.join(
                      ["./reproduce.sh"] + (argv if argv is not None else sys.argv[1:])),
                  "calibration_seconds": round(clock() - started, 1),
                  "steps": [{"network": net[0], "image_size": net[1], "seconds": round(s, 4)}
                            for net, s in costs.step.items()]}
        target = jobs.Target(device.type, precision, args.data_dir, args.out)
        rows = run_jobs(selected, costs, target, reasons, started + args.budget, clock,
                        lambda rows: write_results(args.out, header, rows))
    except (DataError, ValueError, OSError) as e:
        cli.fail(str(e))
    except KeyboardInterrupt:
        cli.fail(f"interrupted; the jobs that ended are in {args.out}/results.md", 130)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("measured", "skipped", "failed")}
    print(f"reproduce: {counts['measured']} measured, {counts['skipped']} skipped, "
          f"{counts['failed']} failed in {clock() - started:.0f} s on {header['device']}; "
          f"{os.path.join(args.out, 'results.md')}")


if __name__ == "__main__":
    main()
