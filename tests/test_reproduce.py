"""reproduce.py: calibrate, plan within the budget, run, skip, fail and go on, write the files."""
import json
import os
import subprocess
import sys

import pytest

import jobs
import reproduce
from conftest import CPU_FP32, run_main
from test_jobs import costs_of, job

REPO = os.path.join(os.path.dirname(__file__), os.pardir)


class StepClock:
    """A clock that moves `step` seconds on at every reading: each call to it is a known time."""

    def __init__(self, step):
        self.now, self.step = -step, step

    def __call__(self):
        self.now += self.step
        return self.now


def test_each_job_takes_its_largest_rung_that_fits():
    costs = costs_of(0.01)
    fast94 = job("fast94")
    estimates = [jobs.estimate(fast94, flags, costs) for flags in fast94["ladder"]]
    for left, runs, fits in ((estimates[0], 5, True), (estimates[0] - 0.1, 3, True),
                             (estimates[2], 1, True), (estimates[2] - 0.1, 1, False)):
        flags, estimate, fit = reproduce.choose(fast94, costs, left)
        assert (flags["runs"], fit) == (runs, fits)
        assert estimate == estimates[[5, 3, 1].index(runs)]
    del costs.step[("fast94", 32)]
    assert reproduce.choose(fast94, costs, 1e9) == (fast94["ladder"][-1], None, False)


def test_a_job_past_the_budget_is_stopped_and_the_next_one_skipped(tmp_path, cifar10_dir):
    costs = costs_of(0.001, device="cpu", images=(200, 30))
    target = jobs.Target("cpu", "fp32", cifar10_dir, str(tmp_path))
    written = []
    # Readings 60 s apart: the first job is chosen at 0 s (100 s left) and starts at 60 s; the
    # next reading, 120 s, is past the deadline: it is stopped, after 180 - 60 = 120 s. The
    # second job is then chosen with nothing left.
    rows = reproduce.run_jobs([job("weights-seed"), job("weights-fast94")], costs, target, {},
                              deadline=100, clock=StepClock(60), write=written.append)
    first, second = rows
    assert first["status"] == "failed" and first["seconds"] == 120
    assert first["note"] == f"stopped when the budget ran out, after 120 s (estimated " \
                            f"{first['estimate']:.0f} s)"
    assert second["status"] == "skipped" and second["seconds"] is None
    assert second["note"] == f"needs about {second['estimate']:,.0f} s here, 0 s left"
    assert written[-1] == rows and len(written) == 2     # the files after each job


@pytest.mark.slow    # 10 s on 2 cores: ./test.sh -m slow
def test_reproduce_measures_skips_fails_and_writes_both_files(tmp_path, cifar10_dir):
    out = tmp_path / "results"
    names = "seed,weights-seed,cifar100-fast96"
    result = run_main("reproduce.py", "--budget", "120", "--data-dir", cifar10_dir, "--out",
                      out, "--only", names, *CPU_FP32)
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    rows = {r["job"]: r for r in results["rows"]}
    assert list(rows) == names.split(",")                   # in the jobs' order
    # The seed preset holds out 5,000 validation images: the synthetic 200 fail, in one line.
    assert (rows["seed"]["status"], rows["seed"]["note"]) == \
        ("failed", "validation size must be in 0..199, got 5000")
    # No CIFAR-100 in the data folder.
    assert rows["cifar100-fast96"]["status"] == "skipped"
    assert rows["cifar100-fast96"]["value"] is None
    inference = run_main("inference.py", "--weights", os.path.join(REPO, "weights",
                         "seed_cifar10.pt"), "--data-dir", cifar10_dir, "--json", *CPU_FP32)
    assert rows["weights-seed"]["status"] == "measured"
    assert rows["weights-seed"]["value"] == json.loads(inference.stdout)["accuracy"]
    assert rows["weights-seed"]["command"].startswith("python src/inference.py --weights "
                                                      "weights/seed_cifar10.pt --tta 0 "
                                                      "--data-dir ")
    assert results["device"] == reproduce.machine(reproduce.pick_device("cpu"))
    assert results["budget"] == 120 and results["precision"] == "fp32"
    table = (out / "results.md").read_text().splitlines()
    assert table[0] == f"# Results on {results['device']}"
    assert sum(line.startswith("|") for line in table) == 2 + 3       # header, rule, 3 rows
    assert f"| seed net, shipped weights | {rows['weights-seed']['text']} |" in \
        "\n".join(table)
    assert result.stdout.splitlines()[-1].startswith("reproduce: 1 measured, 1 skipped, "
                                                     "1 failed in ")
    again = run_main("reproduce.py", "--data-dir", cifar10_dir, "--out", out)
    assert (again.returncode, again.stderr) == (2, f"error: reproduce.py: {out} holds the "
                                                   f"results of an earlier run; give another "
                                                   f"--out (see --help)\n")


def test_a_job_whose_steps_were_not_timed_is_skipped_and_says_why(tmp_path, cifar10_dir):
    """A budget of 1 s: the calibration's share is spent on the first network timed (the seed
    net's, of the conv table's smallest rung), which leaves fast95 untimed."""
    result = run_main("reproduce.py", "--budget", "1", "--data-dir", cifar10_dir, "--out",
                      tmp_path / "r", "--only", "fast95,conv", *CPU_FP32)
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert [step["network"] for step in results["steps"]] == ["seed"]
    conv, fast95 = results["rows"]                      # in the jobs' order
    assert conv["status"] == "skipped"
    assert conv["note"].startswith(f"needs about {conv['estimate']:,.0f} s here, ")
    assert (fast95["status"], fast95["estimate"]) == ("skipped", None)
    assert fast95["note"].startswith("its networks' steps were not timed within the "
                                     "calibration's share of the budget; ")


def test_a_missing_dataset_skips_its_jobs(tmp_path, cifar10_dir):
    result = run_main("reproduce.py", "--budget", "30", "--data-dir", cifar10_dir, "--out",
                      tmp_path / "r", "--only", "cifar100-fast96", *CPU_FP32)
    assert result.returncode == 0, result.stderr
    row, = json.loads((tmp_path / "r" / "results.json").read_text())["rows"]
    folder = os.path.join(cifar10_dir, "cifar-100-python")
    assert (row["status"], row["note"]) == \
        ("skipped", f"CIFAR-100 not found in {folder}; put the extracted python version there")


@pytest.mark.parametrize("flags, message", [
    (["--only", "fast94,nope"], "reproduce.py: unknown jobs: nope; choose from "
                                + ", ".join(jobs.NAMES) + " (see --help)"),
    (["--only", ","], "reproduce.py: unknown jobs: ','; choose from "
                      + ", ".join(jobs.NAMES) + " (see --help)"),
    (["--budget", "0"], "reproduce.py: --budget must be a positive number of seconds "
                        "(see --help)"),
    (["--budget", "inf"], "reproduce.py: --budget must be a positive number of seconds "
                          "(see --help)"),
    (["--out", ""], "reproduce.py: --out must name a folder (see --help)"),
])
def test_bad_flags_are_one_line(flags, message):
    result = run_main("reproduce.py", *flags)
    assert (result.returncode, result.stderr) == (2, f"error: {message}\n")


def test_system_python_runs_without_a_venv(tmp_path):
    """CIFAR_SYSTEM_PYTHON=1: the scripts use $PYTHON as it is, and say so if it lacks torch."""
    env = {**os.environ, "CIFAR_SYSTEM_PYTHON": "1", "PYTHON": sys.executable}
    ok = subprocess.run(["bash", os.path.join(REPO, "reproduce.sh"), "--help"], env=env,
                        capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.startswith("usage: reproduce.py"), ok.stderr
    bare = subprocess.run(["bash", os.path.join(REPO, "run.sh"), "--help"],
                          env={**env, "PYTHON": "/bin/false"}, capture_output=True, text=True)
    assert (bare.returncode, bare.stderr) == (1, "error: CIFAR_SYSTEM_PYTHON=1, but /bin/false "
                                                 "cannot import torch, torchvision, tqdm and "
                                                 "tensorboard; install them, or unset "
                                                 "CIFAR_SYSTEM_PYTHON to use .venv\n")
