"""Training end to end on tiny synthetic CIFAR files: logs, checkpoints, weights, resume."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import SRC, run_script, write_cifar10

TINY = ["--val-size", "20", "--batch-size", "32", "--device", "cpu"]


def test_one_epoch_writes_logs_checkpoint_and_weights(cifar10_dir, tmp_path):
    out = tmp_path / "run"
    result = run_script("train.py", "--epochs", "1", "--data-dir", cifar10_dir, "--out", out,
                        *TINY)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("done: seed on cifar10, 1 epochs in ")
    assert "test accuracy" in result.stdout and "epoch   1/1  train loss" in result.stderr

    events = EventAccumulator(str(out))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"train/loss", "train/accuracy", "val/loss",
                                             "val/accuracy", "lr"}
    assert [e.step for e in events.Scalars("val/accuracy")] == [1]

    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["args"]["epochs"] == 1
    assert {"model", "optimizer", "scheduler", "rng"} <= ckpt.keys()
    weights = torch.load(out / "weights.pt", weights_only=True)
    assert weights["model"] == "seed" and len(weights["classes"]) == 10
    assert len(weights["mean"]) == 3 and 0 <= weights["test_accuracy"] <= 1
    assert weights["state_dict"]["conv1.weight"].shape == (64, 3, 3, 3)
    assert not list(out.glob("*.tmp"))


def test_killed_and_resumed_run_ends_with_the_same_weights(tmp_path):
    data = str(tmp_path / "data")
    write_cifar10(data, per_file=200, n_test=20)    # ~30 steps per epoch: time to kill it
    args = ["--epochs", "2", "--data-dir", data, *TINY]

    straight = tmp_path / "straight"
    assert run_script("train.py", *args, "--out", straight).returncode == 0

    resumed = tmp_path / "resumed"
    proc = subprocess.Popen([sys.executable, os.path.join(SRC, "train.py"), *args,
                             "--out", str(resumed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (resumed / "checkpoint.pt").exists() and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)                # as hard an interruption as there is
    assert proc.wait() == -signal.SIGKILL
    assert torch.load(resumed / "checkpoint.pt", weights_only=True)["epoch"] == 0
    assert not (resumed / "weights.pt").exists()

    result = run_script("train.py", "--resume", resumed, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert f"resuming {resumed} after epoch 1" in result.stderr
    a = torch.load(straight / "weights.pt", weights_only=True)["state_dict"]
    b = torch.load(resumed / "weights.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_diverging_loss_stops_with_a_clear_message(cifar10_dir, tmp_path):
    result = run_script("train.py", "--epochs", "1", "--lr", "1e12", "--data-dir", cifar10_dir,
                        "--out", tmp_path / "run", *TINY)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].startswith("error: training loss became ")
    assert "in epoch 1; try a lower --lr (now 1000000000000.0)" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "error: train.py: unrecognized arguments: --bogus (see --help)"),
    (["--epochs", "two"], "error: train.py: argument --epochs: invalid int value: 'two' "
                          "(see --help)"),
    (["--epochs", "0"], "error: train.py: --epochs, --batch-size and --val-size must be at "
                        "least 1 (see --help)"),
    (["--model", "vgg"], "error: train.py: argument --model: invalid choice: 'vgg' "
                         "(choose from {0}seed{0}) (see --help)"),
    (["--device", "tpu"], "error: unknown device 'tpu'; choose from auto, cpu, cuda, xpu, mps"),
])
def test_bad_flags_are_one_line(args, message, tmp_path):
    result = run_script("train.py", *args, cwd=tmp_path)   # no data/ there: flags fail first
    assert result.returncode == 2
    # Python 3.12 started quoting the choices in argparse's message; both forms are one line.
    assert result.stderr.strip() in {message.format(""), message.format("'")}


def test_missing_dataset_is_one_line(tmp_path):
    result = run_script("train.py", "--data-dir", tmp_path / "nowhere", "--device", "cpu",
                        "--out", tmp_path / "run", cwd=tmp_path)
    assert result.returncode == 2
    line, = result.stderr.splitlines()
    assert line.startswith(f"error: CIFAR-10 not found in {tmp_path / 'nowhere'}")
    assert "put the extracted python version there" in line


def test_resume_without_checkpoint(tmp_path):
    result = run_script("train.py", "--resume", tmp_path, "--device", "cpu")
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: no checkpoint at {tmp_path / 'checkpoint.pt'}"


def test_corrupt_checkpoint_is_one_line(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    result = run_script("train.py", "--resume", tmp_path, "--device", "cpu")
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: cannot read checkpoint {tmp_path / 'checkpoint.pt'}: ")
    assert len(result.stderr.splitlines()) == 1


def test_cifar100_trains_end_to_end(cifar100_dir, tmp_path):
    out = tmp_path / "run100"
    result = run_script("train.py", "--dataset", "cifar100", "--epochs", "1", "--val-size", "100",
                        "--batch-size", "50", "--device", "cpu", "--data-dir", cifar100_dir,
                        "--out", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("done: seed on cifar100, 1 epochs")
    weights = torch.load(out / "weights.pt", weights_only=True)
    assert len(weights["classes"]) == 100 and weights["classes"][0] == "class_00"
    assert weights["state_dict"]["fc3.weight"].shape == (100, 256)


def test_foreign_checkpoint_is_one_line(tmp_path):
    torch.save({"model": {}}, tmp_path / "checkpoint.pt")
    result = run_script("train.py", "--resume", tmp_path, "--device", "cpu")
    assert result.returncode == 2
    assert result.stderr == (f"error: {tmp_path / 'checkpoint.pt'} is not a checkpoint of "
                             f"this repo (expected keys model, optimizer, scheduler, epoch, rng, "
                             f"args)\n")
