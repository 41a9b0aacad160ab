"""What the tests share: synthetic datasets in the official CIFAR python layouts (written to a
temp dir per test), and two ways to run a script: as a process, or its main() in this one."""
import contextlib
import importlib
import io
import os
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch

from conv import plans
from data import write_pickle, write_synthetic_cifar10

SRC = os.path.join(os.path.dirname(__file__), os.pardir, "src")
# The flags of every script run whose result is compared with a reference: float32 on the CPU.
CPU_FP32 = ["--device", "cpu", "--precision", "fp32"]


def write_cifar10(root, per_file=40, n_test=30, seed=0):
    """data_batch_1..5 + test_batch + batches.meta with random pixels and cycling labels."""
    return write_synthetic_cifar10(root, per_file, n_test, seed)


def write_cifar100(root, n_train=300, n_test=100, seed=0):
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder, exist_ok=True)
    for name, n in (("train", n_train), ("test", n_test)):
        fine = [j % 100 for j in range(n)]
        write_pickle(os.path.join(folder, name), {
            b"filenames": [f"{j}.png".encode() for j in range(n)], b"batch_label": name.encode(),
            b"fine_labels": fine, b"coarse_labels": [f // 5 for f in fine],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)})
    write_pickle(os.path.join(folder, "meta"), {
        b"fine_label_names": [f"class_{i:02d}".encode() for i in range(100)],
        b"coarse_label_names": [f"super_{i:02d}".encode() for i in range(20)]})
    return folder


@pytest.fixture(autouse=True, scope="session")
def fixed_arithmetic():
    """--precision auto means fp32 in every test, on every CPU, and every hand-written conv
    runs its default variant (measured ones would round float32 by the machine's timings, and
    runs compared with torch.equal must round alike); the scripts the tests start inherit both.
    The tests of bf16 and of measuring ask for them by name. Set for the whole session, before
    the shared runs of the session and module fixtures."""
    with pytest.MonkeyPatch.context() as session:
        session.setenv("CIFAR_CPU_BF16", "none")
        session.setenv("CIFAR_CONV_MEASURE", "0")
        yield


@pytest.fixture
def cifar10_dir(tmp_path):
    root = tmp_path / "data"
    write_cifar10(str(root))
    return str(root)


@pytest.fixture
def cifar100_dir(tmp_path):
    root = tmp_path / "data100"
    write_cifar100(str(root))
    return str(root)


def run_main(script, *args, cwd=None, env=None):
    """Run a script's main(argv) in this process, as `run_script` runs it in another one: the
    same CompletedProcess (exit code from SystemExit, stdout and stderr captured, warnings
    printed to that stderr as a process would), about two seconds faster a call (no interpreter
    start, no imports). What a run changes in this process is put back: the environment, the
    working directory, the global RNG, the SIGINT/SIGTERM handlers and the conv variants
    chosen (conv/plans.py). An uncaught exception
    propagates: where a process would print a traceback, the test fails with it. For what only
    a process shows (signals, torchrun, environment read at import), use `run_script`."""
    module = importlib.import_module(os.path.splitext(script)[0])
    choices = plans.chosen()           # the conv variants a run chooses for its process
    out, err, code = io.StringIO(), io.StringIO(), 0
    saved_env = dict(os.environ)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    os.environ.update({k: str(v) for k, v in (env or {}).items()})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                contextlib.chdir(cwd or os.getcwd()), torch.random.fork_rng(devices=[]), \
                warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.filterwarnings("ignore", category=DeprecationWarning)   # as Python does
            warnings.showwarning = lambda message, category, filename, lineno, file=None, \
                line=None: sys.stderr.write(warnings.formatwarning(message, category, filename,
                                                                    lineno, line))
            module.main([str(a) for a in args])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if not isinstance(e.code, (int, type(None))):
            err.write(f"{e.code}\n")
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        for s, handler in handlers.items():
            signal.signal(s, handler)
        plans.use(choices)
        plans.set_measuring(None)
    return subprocess.CompletedProcess([script, *map(str, args)], code, out.getvalue(),
                                       err.getvalue())


def run_script(script, *args, cwd=None, env=None):
    """Run a script of src/ as the user would, with `env` added to the environment; returns
    the CompletedProcess (text)."""
    return subprocess.run([sys.executable, os.path.join(SRC, script), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=600,
                          env={**os.environ, **(env or {})})


def two_epoch_run(tmp_path, env=None, precision="fp32"):
    """A seed run of 2 epochs of 4 steps on the CPU; (its CompletedProcess, run folder,
    checkpoint of its first epoch (checkpoint.prev.pt), that checkpoint)."""
    data = str(tmp_path / "data")
    write_cifar10(data, per_file=20, n_test=10)
    out = tmp_path / "run"
    result = run_main("train.py", "--preset", "seed", "--epochs", "2", "--batch-size", "25",
                      "--val-size", "0", "--device", "cpu", "--precision", precision,
                      "--data-dir", data, "--out", out, env=env)
    assert result.returncode == 0, result.stderr
    prev = out / "checkpoint.prev.pt"
    return result, out, prev, torch.load(prev, weights_only=True)


# A fast94 run on 200 synthetic images, 4 steps of 50 an epoch; 4 epochs: the whitening bias
# trains for 3 of them, then stops.
FAST94_RUN = ["--preset", "fast94", "--epochs", "4", "--batch-size", "50", *CPU_FP32]


@pytest.fixture(scope="session")
def fast94_run(tmp_path_factory):
    """One FAST94_RUN, shared by the tests that read it or compare with it: (its
    CompletedProcess, the run folder, the data folder)."""
    root = tmp_path_factory.mktemp("fast94")
    data = str(root / "data")
    write_cifar10(data, per_file=40, n_test=30)
    result = run_main("train.py", *FAST94_RUN, "--data-dir", data, "--out", root / "run")
    assert result.returncode == 0, result.stderr
    return result, root / "run", data


@pytest.fixture(scope="session")
def resumed_fast94_run(fast94_run, tmp_path_factory):
    """The FAST94_RUN killed (SIGKILL, as hard an interruption as there is) once its first
    checkpoint is written, and resumed to its end: its run folder."""
    _, _, data = fast94_run
    out = tmp_path_factory.mktemp("resumed") / "run"
    proc = subprocess.Popen([sys.executable, os.path.join(SRC, "train.py"), *FAST94_RUN,
                             "--data-dir", data, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (out / "checkpoint.pt").exists() and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 0
    assert not (out / "weights.pt").exists()
    result = run_main("train.py", "--resume", out, *CPU_FP32)
    assert result.returncode == 0, result.stderr
    assert f"resuming {out} after epoch 1" in result.stderr
    return out
