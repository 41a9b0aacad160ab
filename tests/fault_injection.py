"""Fault injection: break short training runs in the ways train.py promises to survive, resume
them, and check that every run ends with the weights of an uninterrupted run and loses nothing.

    python tests/fault_injection.py [--kills 20] [--stops 6] [--seed 0]

Every trial trains the same short run (the seed net, 2 epochs of 500 synthetic images, float32
on the CPU) and compares its final weights bit for bit with an uninterrupted run's:
- kill: SIGKILL at a random moment, or as soon as a checkpoint write has begun (every other
  trial); then --resume, or a new start where no checkpoint was written yet.
- stop: SIGTERM or SIGINT at a random step, every other time twice in quick succession (the
  second one while the first one's checkpoint is written): exit code 128+signal, a checkpoint
  of that step, then --resume.
- full disk: a resume whose checkpoint write fails (a file-size limit: EFBIG); the checkpoint
  before it must stay byte for byte, then a resume without the limit ends the run.
- corrupt checkpoint: a finished run's, truncated; the resume names it in one line and offers
  the previous one, which trains the last epoch again.
- flags a resume cannot change, and a second run on a live run's folder: one line each, and
  the run they aimed at is untouched.
"Nothing lost" means: after every fault, the checkpoint on disk (if any) reads. The last line
counts faults injected, runs recovered, weights identical and checkpoints lost.
tests/test_faults.py runs a few trials of each kind (marked slow: ./test.sh -m slow).
"""
import argparse
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(__file__))
from conftest import CPU_FP32, write_cifar10  # noqa: E402

TRAIN = os.path.join(os.path.dirname(__file__), os.pardir, "src", "train.py")
RUN = ["--preset", "seed", "--epochs", "2", "--val-size", "20", "--batch-size", "32", *CPU_FP32]


def launch(*args, limit_bytes=None):
    """train.py with these flags, in the background; limit_bytes: a file-size limit on the
    child, with SIGXFSZ ignored so that a write past it fails (EFBIG) as on a full disk."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    # The default variant of every conv: runs compared bit for bit must round alike.
    return subprocess.Popen([sys.executable, TRAIN, *map(str, args)], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "CIFAR_CONV_MEASURE": "0"},
                            preexec_fn=limit if limit_bytes else None)


def finish(*args, limit_bytes=None):
    """(exit code, stderr) of train.py run to its end."""
    proc = launch(*args, limit_bytes=limit_bytes)
    _, stderr = proc.communicate(timeout=900)
    return proc.returncode, stderr


def final_weights(run):
    return torch.load(run / "weights.pt", weights_only=True)["state_dict"]


def identical(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def checkpoint_reads(run):
    """Whether the run's checkpoint, if it has one, loads."""
    path = run / "checkpoint.pt"
    try:
        return not path.exists() or isinstance(torch.load(path, weights_only=True), dict)
    except Exception:
        return False


def wait_for(condition, proc, timeout=600):
    """Poll (every millisecond) until condition() holds or the process has ended."""
    deadline = time.monotonic() + timeout
    while not condition() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)


def resume_to_the_end(run, straight):
    """Resume the run (or start it anew where no checkpoint was written): (recovered, same)."""
    if (run / "checkpoint.pt").exists():
        code, _ = finish("--resume", run, *CPU_FP32)
    else:
        code, _ = finish(*RUN, "--data-dir", run.parent / "data", "--out", run)
    return code == 0, code == 0 and identical(final_weights(run), straight)


def kill_trial(run, straight, seconds, rng, in_write):
    """SIGKILL at a random moment, or as soon as a checkpoint write has begun."""
    proc = launch(*RUN, "--data-dir", run.parent / "data", "--out", run)
    if in_write:
        wait_for(lambda: (run / "checkpoint.pt.tmp").exists(), proc)
    else:
        time.sleep(rng.uniform(0.05, 0.95) * seconds)
    if proc.poll() is not None:                    # it ended before the fault
        return None if proc.returncode == 0 else ("SIGKILL: the run failed before it", False,
                                                  False, False)
    proc.kill()
    proc.wait()
    if in_write:   # the temp file left behind says whether the kill fell inside the write
        where = "inside" if (run / "checkpoint.pt.tmp").exists() else "right after"
        fault = f"SIGKILL {where} a checkpoint write"
    else:
        fault = "SIGKILL at a random moment"
    return fault, not checkpoint_reads(run), *resume_to_the_end(run, straight)


def stop_trial(run, straight, seconds, rng, twice):
    """SIGTERM or SIGINT at a random step once training runs (twice: a second one while the
    first one's checkpoint is written)."""
    signum = rng.choice([signal.SIGTERM, signal.SIGINT])
    proc = launch(*RUN, "--data-dir", run.parent / "data", "--out", run)
    wait_for(lambda: any(run.glob("events.*")), proc)     # training has started
    time.sleep(rng.uniform(0, 0.6) * seconds)
    if proc.poll() is not None:
        return None
    proc.send_signal(signum)
    if twice:
        wait_for(lambda: (run / "checkpoint.pt.tmp").exists(), proc, timeout=60)
        proc.send_signal(signum)
    proc.communicate(timeout=120)
    if proc.returncode == 0:
        return None                                # the signal came after the last step
    stopped = proc.returncode == 128 + signum and (run / "checkpoint.pt").exists()
    recovered, same = resume_to_the_end(run, straight) if stopped else (False, False)
    return (f"{signal.Signals(signum).name}{' twice' if twice else ''} at a random step",
            not checkpoint_reads(run), recovered, same)


def one_epoch_then_stopped(run):
    """A run stopped by SIGTERM once its first epoch's checkpoint is on disk."""
    proc = launch(*RUN, "--data-dir", run.parent / "data", "--out", run)
    wait_for(lambda: (run / "checkpoint.pt").exists(), proc)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    return proc.returncode == 128 + signal.SIGTERM


def disk_full_trial(run, straight):
    """A resume whose next checkpoint write fails: the one before it stays byte for byte."""
    if not one_epoch_then_stopped(run):
        return None
    before = (run / "checkpoint.pt").read_bytes()
    code, stderr = finish("--resume", run, *CPU_FP32, limit_bytes=len(before) // 2)
    last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    failed_cleanly = (code == 2 and "Traceback" not in stderr and not list(run.glob("*.tmp"))
                      and last.startswith("error: could not write ")
                      and last.endswith("the previous one is kept"))
    lost = (run / "checkpoint.pt").read_bytes() != before
    recovered, same = resume_to_the_end(run, straight)
    return "a checkpoint write failing (EFBIG)", lost, failed_cleanly and recovered, same


def corrupt_trial(run, straight):
    """A finished run's checkpoint truncated: the resume names it in one line and offers the
    previous one, which trains the last epoch again."""
    if finish(*RUN, "--data-dir", run.parent / "data", "--out", run)[0] != 0:
        return "a truncated checkpoint: the run before it failed", False, False, False
    (run / "weights.pt").unlink()
    path = run / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    code, stderr = finish("--resume", run, *CPU_FP32)
    offered = f"python src/train.py --resume {run / 'checkpoint.prev.pt'} continues from it"
    named = (code == 2 and len(stderr.strip().splitlines()) == 1
             and stderr.startswith(f"error: cannot read checkpoint {path}: ")
             and stderr.strip().endswith(offered))
    code, _ = finish("--resume", run / "checkpoint.prev.pt", *CPU_FP32)
    # The truncated file is set aside, not made the previous checkpoint: both that remain read.
    kept = checkpoint_reads(run) and isinstance(
        torch.load(run / "checkpoint.prev.pt", weights_only=True), dict)
    return ("a truncated checkpoint", not kept, named and code == 0,
            code == 0 and identical(final_weights(run), straight))


def flags_trial(run, straight):
    """A resume asked to change --epochs: refused in one line, the checkpoint untouched."""
    if finish(*RUN, "--data-dir", run.parent / "data", "--out", run)[0] != 0:
        return "--epochs changed on a resume: the run before it failed", False, False, False
    (run / "weights.pt").unlink()
    before = (run / "checkpoint.pt").read_bytes()
    code, stderr = finish("--resume", run, "--epochs", "5", *CPU_FP32)
    refused = (code == 2 and len(stderr.strip().splitlines()) == 1
               and stderr.startswith("error: a resumed run keeps its own flags: --epochs 5 ")
               and (run / "checkpoint.pt").read_bytes() == before)
    code, _ = finish("--resume", run, *CPU_FP32)
    return ("--epochs changed on a resume", not checkpoint_reads(run), refused and code == 0,
            code == 0 and identical(final_weights(run), straight))


def second_run_trial(run, straight):
    """A second run on a live run's folder (held still meanwhile, lock and all): refused in
    one line, and the live run ends as if nothing had happened."""
    proc = launch(*RUN, "--data-dir", run.parent / "data", "--out", run)
    wait_for(lambda: (run / "checkpoint.pt").exists(), proc)
    proc.send_signal(signal.SIGSTOP)
    before = (run / "checkpoint.pt").read_bytes()
    code, stderr = finish(*RUN, "--data-dir", run.parent / "data", "--out", run)
    refused = (code == 2 and len(stderr.strip().splitlines()) == 1
               and stderr.startswith("error: another run (process ")
               and (run / "checkpoint.pt").read_bytes() == before)
    proc.send_signal(signal.SIGCONT)
    proc.communicate(timeout=600)
    done = proc.returncode == 0
    return ("a second run on a live run's folder", not checkpoint_reads(run), refused and done,
            done and identical(final_weights(run), straight))


def until_injected(trial, run, seconds, attempts=5):
    """A trial whose random moment fell after its run had ended injected nothing (the other
    work on the machine changes how long a run takes): again, afresh, with the moments halved."""
    for attempt in range(attempts):
        outcome = trial(seconds * 0.5 ** attempt)
        if outcome is not None:
            return outcome
        shutil.rmtree(run, ignore_errors=True)
    return "no fault: every run ended before its moment", False, False, False


def plan(kills, stops, rng):
    """The trials in a shuffled order: (name, function of (run, straight, seconds))."""
    trials = [(f"kill{i}", lambda r, s, t, w=i % 2 == 1: until_injected(
        lambda seconds: kill_trial(r, s, seconds, rng, w), r, t)) for i in range(kills)]
    trials += [(f"stop{i}", lambda r, s, t, w=i % 2 == 1: until_injected(
        lambda seconds: stop_trial(r, s, seconds, rng, w), r, t)) for i in range(stops)]
    trials += [("disk-full", lambda r, s, t: disk_full_trial(r, s)),
               ("corrupt", lambda r, s, t: corrupt_trial(r, s)),
               ("resume-flags", lambda r, s, t: flags_trial(r, s)),
               ("second-run", lambda r, s, t: second_run_trial(r, s))]
    rng.shuffle(trials)
    return trials


def inject(workdir, kills=20, stops=6, seed=0, progress=True):
    """Run every trial in `workdir`; returns one (fault, lost, recovered, same) per fault that
    was injected (a random moment that fell after the run had ended injects none)."""
    workdir = Path(workdir)
    write_cifar10(str(workdir / "data"), per_file=100, n_test=20)
    started = time.perf_counter()
    code, stderr = finish(*RUN, "--data-dir", workdir / "data", "--out", workdir / "straight")
    if code != 0:
        raise RuntimeError(f"the uninterrupted run failed: {stderr.strip().splitlines()[-1]}")
    seconds = time.perf_counter() - started
    straight = final_weights(workdir / "straight")
    results = []
    for name, trial in tqdm(plan(kills, stops, random.Random(seed)), desc="faults",
                            disable=not progress, file=sys.stderr):
        outcome = trial(workdir / name, straight, seconds)
        if outcome is not None:
            results.append(outcome)
            if progress:
                fault, lost, recovered, same = outcome
                tqdm.write(f"{name}: {fault}: {'recovered' if recovered else 'NOT RECOVERED'}"
                           f", weights {'identical' if same else 'DIFFERENT'}"
                           f"{', CHECKPOINT LOST' if lost else ''}", file=sys.stderr)
    return results


def summary(results):
    return (f"{len(results)} faults injected, {sum(r[2] for r in results)} runs recovered, "
            f"{sum(r[3] for r in results)} with weights identical to an uninterrupted run, "
            f"{sum(r[1] for r in results)} checkpoints lost")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=20, help="SIGKILL trials")
    p.add_argument("--stops", type=int, default=6, help="SIGTERM/SIGINT trials")
    p.add_argument("--seed", type=int, default=0, help="seed of the random moments")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="faults-") as workdir:
        results = inject(workdir, args.kills, args.stops, args.seed)
    print(summary(results))
    sys.exit(0 if all(r[2] and r[3] and not r[1] for r in results) else 1)


if __name__ == "__main__":
    main()
