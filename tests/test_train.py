"""Training on tiny synthetic CIFAR files: logs, checkpoints, weights, exact resume after a
kill or a stop signal, the one-line errors, every preset. One run goes through a process as a
user's would; the others call main() in this one (conftest.run_main)."""
import contextlib
import copy
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils._python_dispatch import TorchDispatchMode

import distributed
import train
from conftest import (CPU_FP32, SRC, run_main, run_script, two_epoch_run, write_cifar10,
                      write_cifar100)
from data import load_cifar, normalize
from gpu_check import preset_step
from model import build_model, whitening_filters
from optim import lr_schedule, make_optimizers, make_schedulers
from preemption import deferred_stop_signals, stop_signalled
from conv import plans
from train import training_parameters
from run_setup import get_args

TINY = ["--val-size", "20", "--batch-size", "32", *CPU_FP32]
HPARAM_METRICS = ("hparams/test_accuracy", "hparams/test_accuracy_without_tta",
                  "hparams/train_seconds")


def test_one_epoch_writes_logs_checkpoint_and_weights(cifar10_dir, tmp_path):
    out = tmp_path / "run"
    result = run_script("train.py", "--epochs", "1", "--data-dir", cifar10_dir, "--out", out,
                        *TINY)                    # the smoke test: a process, as a user runs it
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("done: seed on cifar10, 1 epochs in ")
    assert "test accuracy" in result.stdout and "epoch   1/1  train loss" in result.stderr
    # A run with a validation split reports it at the end too: the figure to tune on (the seed
    # preset has no TTA, so it is the last epoch's).
    val_acc = re.search(r"val loss \S+ acc (\S+)", result.stderr).group(1)
    assert f"; validation accuracy {val_acc}; test accuracy " in result.stdout

    events = EventAccumulator(str(out))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {
        "train/loss", "train/accuracy", "val/loss", "val/accuracy", "lr", "step/loss",
        "step/lr", "test/loss", "test/accuracy", *HPARAM_METRICS}    # seed: no TTA
    assert [e.step for e in events.Scalars("val/accuracy")] == [1]
    assert [e.step for e in events.Scalars("step/loss")] == [1, 2, 3, 4, 5]   # 180 / 32

    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["args"]["epochs"] == 1
    assert {"model", "optimizer", "scheduler", "rng"} <= ckpt.keys()
    weights = torch.load(out / "weights.pt", weights_only=True)
    assert weights["model"] == "seed" and len(weights["classes"]) == 10
    assert len(weights["mean"]) == 3 and 0 <= weights["test_accuracy"] <= 1
    assert weights["state_dict"]["conv1.weight"].shape == (64, 3, 3, 3)
    assert not list(out.glob("*.tmp"))


def test_killed_and_resumed_run_ends_with_the_same_weights(fast94_run, resumed_fast94_run):
    # fast94: lookahead, the alternating flip, the whitening bias stopping after epoch 3
    # (the seed net: tests/fault_injection.py). The kill: conftest.resumed_fast94_run.
    _, straight, _ = fast94_run
    a = torch.load(straight / "weights.pt", weights_only=True)["state_dict"]
    b = torch.load(resumed_fast94_run / "weights.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_diverging_loss_stops_with_a_clear_message(cifar10_dir, tmp_path):
    result = run_main("train.py", "--epochs", "1", "--lr", "1e12", "--data-dir", cifar10_dir,
                        "--out", tmp_path / "run", *TINY)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].startswith("error: training loss became ")
    assert "in epoch 1; try a lower --lr (now 1000000000000.0)" in result.stderr
    assert "Traceback" not in result.stderr


# fast94 (lookahead, alternating flip) stops mid-epoch in test_distributed; SIGINT's way in
# is tested below in-process; tests/fault_injection.py tries both on random steps. In the
# default suite, the GPU check's dry run (test_gpu_check.py) stops fast94 mid-epoch, resumes it
# and compares the weights with the uninterrupted run's, as this test does with the seed net.
@pytest.mark.slow      # 12 s
@pytest.mark.parametrize("preset, signum", [("seed", signal.SIGTERM)])
def test_stopped_by_a_signal_mid_epoch_and_resumed_ends_with_the_same_weights(preset, signum,
                                                                               tmp_path):
    data = str(tmp_path / "data")
    write_cifar10(data, per_file=60, n_test=20)     # 8 steps per epoch
    args = ["--preset", preset, "--epochs", "2", "--data-dir", data, *TINY]
    straight = tmp_path / "straight"
    assert run_main("train.py", *args, "--out", straight).returncode == 0

    out = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, os.path.join(SRC, "train.py"), *args,
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    while not list(out.glob("events.*")) and proc.poll() is None:   # training starts
        time.sleep(0.01)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, stderr
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    steps = ckpt["partial"]["steps"]
    assert ckpt["epoch"] == -1 and 1 <= steps < 8      # within epoch 1
    assert 0 < ckpt["seconds"]["timed"] < ckpt["seconds"]["wall"]   # its steps' time kept
    assert stderr.splitlines()[-1] == (
        f"error: stopped by {signal.Signals(signum).name} in epoch 1 after step {steps}/"
        f"{len(ckpt['partial']['perm']) // 32}; {out / 'checkpoint.pt'} holds it: "
        f"python src/train.py --resume {out} continues")
    assert not (out / "weights.pt").exists() and not list(out.glob("*.tmp"))

    result = run_main("train.py", "--resume", out, *CPU_FP32)
    assert result.returncode == 0, result.stderr
    assert f"resuming {out} in epoch 1 after step {steps}" in result.stderr
    a = torch.load(straight / "weights.pt", weights_only=True)["state_dict"]
    b = torch.load(out / "weights.pt", weights_only=True)["state_dict"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_once_a_signal_has_stopped_the_run_later_ones_are_ignored_until_exit():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with deferred_stop_signals() as received:
            assert received == []
        assert {s: signal.getsignal(s) for s in before} == before   # no signal: restored
        with deferred_stop_signals() as received:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
            assert received == [signal.SIGINT, signal.SIGTERM]
        os.kill(os.getpid(), signal.SIGINT)     # a second Ctrl-C on the way out: nothing
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert all(signal.getsignal(s) is signal.SIG_IGN for s in before)
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def test_nan_in_a_later_epoch_keeps_the_last_checkpoint_and_says_how_to_resume(cifar10_dir,
                                                                            tmp_path):
    out = tmp_path / "run"
    assert run_main("train.py", "--epochs", "1", "--data-dir", cifar10_dir, "--out", out,
                      *TINY).returncode == 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    ckpt["args"]["epochs"] = 2                   # one more epoch, from poisoned weights
    ckpt["model"]["fc3.bias"][0] = float("nan")
    torch.save(ckpt, out / "checkpoint.pt")
    before = (out / "checkpoint.pt").read_bytes()
    result = run_main("train.py", "--resume", out, *CPU_FP32)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        f"error: training loss became nan in epoch 2; try a lower --lr (now 0.05), or continue "
        f"from {out / 'checkpoint.pt'} (kept, from epoch 1) with gradient clipping: python "
        f"src/train.py --resume {out} --grad-clip 1")
    assert (out / "checkpoint.pt").read_bytes() == before
    # --grad-clip is the one training flag a resume takes; the run keeps it.
    ckpt["model"]["fc3.bias"][0] = 0.0
    torch.save(ckpt, out / "checkpoint.pt")
    assert run_main("train.py", "--resume", out, "--grad-clip", "1", *CPU_FP32).returncode == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["args"]["grad_clip"] == 1.0


def test_a_second_run_on_a_live_run_folder_refuses(cifar10_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(   # a live run's lock, held by another process
        [sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
         "import checkpoint; lock = checkpoint.lock_run_folder(sys.argv[2]); print(flush=True); "
         "time.sleep(600)", SRC, str(out)], stdout=subprocess.PIPE)
    try:
        holder.stdout.readline()                      # it holds the lock now
        args = ["--epochs", "1", "--data-dir", cifar10_dir, "--out", out, *TINY]
        refused = run_main("train.py", *args)
        assert refused.returncode == 2
        assert refused.stderr.splitlines()[-1] == (
            f"error: another run (process {holder.pid}) is writing {out}; wait for it to end "
            f"or give another --out")
        assert not list(out.glob("events.*"))         # nothing written
    finally:
        holder.kill()
        holder.wait()
    # A killed run leaves no stale lock.
    result = run_main("train.py", *args)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "error: train.py: unrecognized arguments: --bogus (see --help)"),
    (["--epochs", "two"], "error: train.py: argument --epochs: invalid int value: 'two' "
                          "(see --help)"),
    (["--epochs", "0"], "error: train.py: --epochs, --batch-size and --runs must be at least "
                        "1, --val-size, --cutout and --test-every at least 0 (see --help)"),
    (["--model", "vgg"], "error: train.py: argument --model: invalid choice: 'vgg' (choose from "
                         "{0}fast94{0}, {0}fast95{0}, {0}fast96{0}, {0}resnet18{0}, {0}seed{0}) "
                         "(see --help)"),
    (["--preset", "fast99"], "error: train.py: argument --preset: invalid choice: 'fast99' "
                             "(choose from {0}fast94{0}, {0}fast95{0}, {0}fast96{0}, "
                             "{0}finetune{0}, {0}resnet18{0}, {0}seed{0}) (see --help)"),
    (["--tta", "3"], "error: train.py: argument --tta: invalid choice: 3 (choose from 0, 1, 2) "
                     "(see --help)"),
    (["--resume", "x", "--runs", "2"], "error: train.py: --resume continues one run; it cannot "
                                       "be combined with --runs (see --help)"),
    (["--device", "tpu"], "error: train.py: argument --device: invalid choice: 'tpu' (choose from "
                          "{0}auto{0}, {0}cpu{0}, {0}cuda{0}, {0}xpu{0}, {0}mps{0}) (see --help)"),
    (["--grad-clip", "-1"], "error: train.py: --grad-clip must be at least 0 (see --help)"),
    (["--test-every", "2"], "error: train.py: --test-every is for runs without a validation "
                            "split (--val-size 0): with one, the validation accuracy is the "
                            "held-out curve (see --help)"),
    (["--precision", "fp8"], "error: train.py: argument --precision: invalid choice: 'fp8' "
                             "(choose from {0}auto{0}, {0}fp32{0}, {0}bf16{0}) (see --help)"),
])
def test_bad_flags_are_one_line(args, message, tmp_path):
    result = run_main("train.py", *args, cwd=tmp_path)   # no data/ there: flags fail first
    assert result.returncode == 2
    # Python 3.12 started quoting the choices in argparse's message; both forms are one line.
    assert result.stderr.strip() in {message.format(""), message.format("'")}


def test_missing_dataset_is_one_line(tmp_path):
    result = run_main("train.py", "--data-dir", tmp_path / "nowhere", *CPU_FP32,
                        "--out", tmp_path / "run", cwd=tmp_path)
    assert result.returncode == 2
    line, = result.stderr.splitlines()
    assert line.startswith(f"error: CIFAR-10 not found in {tmp_path / 'nowhere'}")
    assert "put the extracted python version of the dataset there" in line


def test_resume_without_checkpoint(tmp_path):
    result = run_main("train.py", "--resume", tmp_path, *CPU_FP32)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: no checkpoint at {tmp_path / 'checkpoint.pt'}"


def test_a_resumed_run_sums_its_times_over_its_starts(tmp_path):
    first, out, prev, ckpt = two_epoch_run(tmp_path)
    assert re.search(r"2 epochs in \d+s on cpu \(", first.stdout), first.stdout
    after_one, after_two = ckpt["seconds"], torch.load(out / "checkpoint.pt",
                                                       weights_only=True)["seconds"]
    assert after_one["starts"] == after_two["starts"] == 1
    assert 0 < after_one["timed"] < after_two["timed"] <= after_two["wall"]
    # Resumed from its first epoch as if two starts had taken 5000 s (4000 s timed, 300 s of
    # the test curve): the second epoch's seconds are added to those.
    torch.save({**ckpt, "seconds": {"wall": 5000.0, "timed": 4000.0, "held_out": 300.0,
                                    "starts": 2}}, prev)
    resumed = run_main("train.py", "--resume", prev)
    assert resumed.returncode == 0, resumed.stderr
    wall, timed, held_out = map(float, re.search(
        r"^done: seed on cifar10, 2 epochs in (\d+)s over 3 starts \(the run and its 2 "
        r"resumes\) on cpu \(([\d.]+)s of whitening, training steps and test evaluation; the "
        r"test curve's evaluations took ([\d.]+)s more\)", resumed.stdout, re.M).groups())
    assert 5000 < wall < 5060 and 4000 < timed < wall and 300 <= held_out < 360
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["seconds"]
    assert saved["starts"] == 3 and 4000 < saved["timed"] <= timed + 0.05   # printed: .1f
    assert torch.load(out / "weights.pt", weights_only=True)["train_seconds"] == \
        pytest.approx(timed, abs=0.05)


def test_corrupt_checkpoint_is_one_line(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    result = run_main("train.py", "--resume", tmp_path, *CPU_FP32)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: cannot read checkpoint {tmp_path / 'checkpoint.pt'}: ")
    assert len(result.stderr.splitlines()) == 1


@pytest.mark.slow    # 11 s on 2 cores (test_data reads CIFAR-100): ./test.sh -m slow
def test_cifar100_trains_end_to_end(cifar100_dir, tmp_path):
    out = tmp_path / "run100"
    result = run_main("train.py", "--dataset", "cifar100", "--epochs", "1", "--val-size", "100",
                        "--batch-size", "50", *CPU_FP32, "--data-dir", cifar100_dir,
                        "--out", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("done: seed on cifar100, 1 epochs")
    weights = torch.load(out / "weights.pt", weights_only=True)
    assert len(weights["classes"]) == 100 and weights["classes"][0] == "class_00"
    assert weights["state_dict"]["fc3.weight"].shape == (100, 256)


@pytest.mark.slow    # over 10 s each on 2 cores: ./test.sh -m slow
@pytest.mark.parametrize("preset, head", [("resnet18", "fc.weight"),
                                          ("fast96", "head.weight")])
def test_cifar100_presets_take_a_step_and_report_per_class(preset, head, tmp_path):
    """The CIFAR-100 presets (ResNet-18 with cutout; the residual fast96), 100-way heads, and
    inference's report under the meta file's class names: one step on 20 images (the presets'
    hyperparameters are checked in test_presets)."""
    data = str(tmp_path / "data")
    write_cifar100(data, n_train=20, n_test=10)
    out = tmp_path / "run100"
    result = run_main("train.py", "--preset", preset, "--dataset", "cifar100", "--epochs", "1",
                      "--batch-size", "20", *CPU_FP32, "--data-dir", data, "--out", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"done: {preset} on cifar100, 1 epochs")
    assert "20 train / 0 val images, 1 steps per epoch" in result.stderr
    weights = torch.load(out / "weights.pt", weights_only=True)
    assert weights["state_dict"][head].shape[0] == 100
    report = run_main("inference.py", "--weights", out / "weights.pt", "--data-dir", data,
                      *CPU_FP32, "--json")
    assert report.returncode == 0, report.stderr
    per_class = json.loads(report.stdout)["per_class"]
    assert list(per_class) == [f"class_{i:02d}" for i in range(100)]


def test_foreign_checkpoint_is_one_line(tmp_path):
    torch.save({"model": {}}, tmp_path / "checkpoint.pt")
    result = run_main("train.py", "--resume", tmp_path, *CPU_FP32)
    assert result.returncode == 2
    assert result.stderr == (f"error: {tmp_path / 'checkpoint.pt'} is not a checkpoint of "
                             f"this repo (expected keys model, optimizer, scheduler, epoch, rng, "
                             f"args)\n")


# ----------------------------------------------------------------------------------------------
# The fast presets' recipe

def test_fast94_trains_end_to_end_with_whitening_and_tta(fast94_run):
    result, out, data = fast94_run
    assert result.stdout.startswith("done: fast94 on cifar10, 4 epochs in ")
    assert " with TTA 2 (" in result.stdout and "200 train / 0 val images" in result.stderr

    weights = torch.load(out / "weights.pt", weights_only=True)
    assert weights["model"] == "fast94" and weights["tta"] == 2
    assert 0 <= weights["test_accuracy_without_tta"] <= 1
    # The frozen whitening filters are those of the (all 200) normalised training images.
    images = load_cifar(data, "cifar10", download=False)["train_x"]
    mean, std = torch.tensor(weights["mean"]), torch.tensor(weights["std"])
    expected = whitening_filters(normalize(images, mean, std))
    assert torch.allclose(weights["state_dict"]["whiten.weight"], expected, atol=1e-6)


def test_short_seed_run_logs_the_lr_each_epoch_used(cifar10_dir, tmp_path):
    out = tmp_path / "run"   # 2 epochs of 5 steps: the linear decay ends at the last step
    result = run_main("train.py", "--epochs", "2", "--data-dir", cifar10_dir, "--out", out,
                        *TINY)
    assert result.returncode == 0, result.stderr
    events = EventAccumulator(str(out))
    events.Reload()
    args = get_args(["--epochs", "2"])
    expected = [0.05 * lr_schedule(args, 10)(s) for s in (4, 9)]
    assert [e.value for e in events.Scalars("lr")] == pytest.approx(expected, rel=1e-6)
    assert expected[1] == pytest.approx(0.05 * 0.001)


def test_gradient_clipping_keeps_a_high_lr_seed_run_finite(tmp_path):
    # Without clipping, the seed net diverged at its own LR on some CPUs in runs this short;
    # at 4x the LR it diverged within a few steps for every seed tried, with gradient norms of
    # 1e4-1e7. Clipped (the preset's default), it trains.
    data = str(tmp_path / "data")
    write_cifar10(data, per_file=200, n_test=20)
    args = ["--epochs", "1", "--lr", "0.2", "--data-dir", data, *TINY]
    unclipped = run_main("train.py", *args, "--grad-clip", "0", "--out", tmp_path / "a")
    assert unclipped.returncode == 2
    assert re.search(r"error: (training loss became (nan|inf)|the weights became inf or nan) "
                     r"in epoch 1", unclipped.stderr)
    clipped = run_main("train.py", *args, "--out", tmp_path / "b")
    assert clipped.returncode == 0, clipped.stderr
    ckpt = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert ckpt["args"]["grad_clip"] == 5.0


def test_runs_report_mean_and_std_over_seeds_and_never_write_the_flags(cifar10_dir, tmp_path):
    """--runs gives each run its folder and seed, --resume the run's own flags: as values of
    their own, the parsed flags stay as they were."""
    out = tmp_path / "runs"
    runs = get_args(["--epochs", "1", "--runs", "2", "--data-dir", cifar10_dir, "--out",
                     str(out), *TINY])
    resumed = get_args(["--resume", str(out / "run1"), "--device", "cpu"])
    before = [copy.deepcopy(vars(args)) for args in (runs, resumed)]
    try:
        with contextlib.redirect_stdout(io.StringIO()) as printed, contextlib.redirect_stderr(
                io.StringIO()) as err, torch.random.fork_rng(devices=[]):
            train.train_runs(runs, [])
            last = printed.getvalue().splitlines()[-1]
            train.train(resumed)          # after its last epoch: the test set and weights.pt
    finally:
        plans.use({})
        plans.set_measuring(None)
    assert last.startswith("2 runs of seed: test accuracy ") and last.endswith(" s each")
    accs = [torch.load(out / f"run{i}" / "weights.pt", weights_only=True)["test_accuracy"]
            for i in range(2)]
    assert f"test accuracy {sum(accs) / 2:.4f} ± " in last
    # The two runs' done lines, then the resumed run1's (its weights.pt written again).
    val_accs = [float(v) for v in re.findall(r"validation accuracy (\S+);", printed.getvalue())]
    assert len(val_accs) == 3 and val_accs[2] == val_accs[1]
    assert f"; validation accuracy {sum(val_accs[:2]) / 2:.4f} ± " in last
    assert f"resuming {out / 'run1'} after epoch 1" in err.getvalue()
    assert [vars(args) for args in (runs, resumed)] == before
    saved = torch.load(out / "run1" / "checkpoint.pt", weights_only=True)["args"]
    assert saved == {k: v for k, v in before[0].items() if k != "given"} | {
        "out": str(out / "run1"), "seed": 1}          # which flags were typed: not kept


@pytest.mark.parametrize("preset", ["fast95", "fast96"])
def test_wider_and_residual_presets_take_a_step(preset, tmp_path):
    data = str(tmp_path / "data")
    write_cifar10(data, per_file=4, n_test=10)
    result = run_main("train.py", "--preset", preset, "--epochs", "1", "--batch-size", "20",
                      *CPU_FP32, "--data-dir", data, "--out", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"done: {preset} on cifar10, 1 epochs in ")
    assert torch.load(tmp_path / "run" / "weights.pt", weights_only=True)["model"] == preset


def test_gradient_clipping_leaves_out_a_parameter_whose_training_has_ended():
    model = build_model("fast94")
    args = get_args(["--preset", "fast94", "--epochs", "4"])
    optimizers = make_optimizers(model, args)
    schedulers = make_schedulers(optimizers, 2, lr_schedule(args, args.epochs * 2))
    assert any(p is model.whiten.bias for p in training_parameters(model, optimizers))
    for _ in range(6):                               # 3 epochs of 2 steps (without gradients)
        for opt, sched in zip(optimizers, schedulers):
            opt.step()
            sched.step()
    assert not any(p is model.whiten.bias for p in training_parameters(model, optimizers))
    assert len(training_parameters(model, optimizers)) == len(list(model.parameters())) - 1


class HostReads(TorchDispatchMode):
    """Records the calls that make a GPU wait: reading a value back to the host
    (`_local_scalar_dense`: .item(), bool(), .tolist()), ops whose output size depends on the
    data, copies from the device (here `meta`) to the CPU, and copies of floating-point values
    from the CPU's pageable memory to the device (the augmentation's random offsets are
    integers drawn on the CPU here, since `meta` has no generator; on a GPU they are drawn
    there)."""
    DATA_DEPENDENT = {"aten.nonzero", "aten.masked_select", "aten.unique",
                      "aten._unique2", "aten.repeat_interleave", "aten.aminmax"}

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        devices = {a.device.type for a in args if isinstance(a, torch.Tensor)}
        crossing = isinstance(out, torch.Tensor) and len(devices | {out.device.type}) > 1
        if (name == "aten._local_scalar_dense" or name in self.DATA_DEPENDENT or
                crossing and (out.device.type == "cpu" or out.is_floating_point())):
            self.reads.append(name)
        return out


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_a_training_step_reads_nothing_back_from_the_device(device, monkeypatch):
    """fast94 (batch, step, lookahead pull, with train.py's normalisation constants), and on
    `meta` the epoch loop's stop check at a step that is not a check-in. On the CPU every value
    read to the host is seen (F.one_hot read the labels' range, two reads a step); on `meta`,
    standing in for a GPU, every copy between it and the host. The stop check runs as under
    torchrun with 2 ranks (a world size no process has in a test here; on the CPU that check
    all-reduces every step, reading no device)."""
    step = preset_step("fast94", device, 16)
    step()
    with HostReads() as seen:
        step()
        if device == "meta":
            monkeypatch.setattr(distributed, "world_size", lambda: 2)
            assert not stop_signalled([], torch.device(device), check_in=False)
    assert seen.reads == []


@pytest.fixture(scope="module")
def two_epoch_seed_run(tmp_path_factory):
    """A finished 2-epoch seed run on synthetic data: (its folder, the data folder)."""
    root = tmp_path_factory.mktemp("two-epochs")
    data = str(root / "data")
    write_cifar10(data)
    result = run_main("train.py", "--epochs", "2", "--data-dir", data, "--out", root / "run",
                      *TINY)
    assert result.returncode == 0, result.stderr
    return root / "run", data


def resumed_from_epoch_1(run, tmp_path, rng):
    """`run` resumed after its first epoch, in a copy, with its checkpoint's random states
    replaced by `rng(states)`: (the CompletedProcess, the copy's folder)."""
    out = tmp_path / "run"
    shutil.copytree(run, out, ignore=shutil.ignore_patterns(".lock", "weights.pt"))
    ckpt = torch.load(out / "checkpoint.prev.pt", weights_only=True)      # after epoch 1
    ckpt["rng"] = rng(ckpt["rng"])
    torch.save(ckpt, out / "checkpoint.pt")
    return run_main("train.py", "--resume", out, *CPU_FP32), out


def test_a_checkpoint_of_another_layout_is_refused_in_one_line(two_epoch_seed_run, tmp_path):
    """Its random states as the repo wrote them until 2026-12 (the CPU's and the batch order's
    alone): not resumed, and no previous checkpoint offered (it has that layout too)."""
    run, _ = two_epoch_seed_run
    result, out = resumed_from_epoch_1(run, tmp_path, lambda states: {
        "torch": states["processes"][0]["cpu"], "data": states["data"]})
    assert result.returncode == 2
    assert result.stderr == (f"error: {out / 'checkpoint.pt'} was written by another version "
                             f"of train.py (another checkpoint layout): it cannot resume here; "
                             f"start a new run\n")
    assert not (out / "weights.pt").exists()


@pytest.mark.parametrize("processes, note", [
    (1, "the batch order's generator (saved on cuda) re-seeded; the cuda generator left behind"),
    (3, "the batch order's generator (saved on cuda) re-seeded; the generators of 3 processes, "
        "now 1, re-seeded")])
def test_a_run_saved_on_gpus_resumes_on_the_cpu_and_says_what_it_reseeded(processes, note,
                                                                         two_epoch_seed_run,
                                                                         tmp_path):
    """The checkpoint of a run on 1 or 3 GPUs, crafted from a CPU run's: the batch-order
    generator and each process's GPU generator in CUDA's format (16 bytes). A CUDA machine must
    still confirm the other way round (a CPU run resumed with --device cuda, the GPU generators
    re-seeded: gpu_check.py's cpu-resume part) and that a GPU run's own states load there
    (a run with dropout: fast94, which gpu_check.py resumes, draws nothing from them)."""
    cuda_state = torch.zeros(16, dtype=torch.uint8)
    result, _ = resumed_from_epoch_1(two_epoch_seed_run[0], tmp_path, lambda states: {
        **states, "data": cuda_state, "data_device": "cuda", "processes": [
            {"cpu": states["processes"][0]["cpu"], "device_type": "cuda",
             "device": cuda_state}] * processes})
    assert result.returncode == 0, result.stderr
    assert (f"note: resumed on another machine: {note}; the run goes on, with other random "
            f"draws than an uninterrupted one\n") in result.stderr
    assert "epoch   2/2" in result.stderr
