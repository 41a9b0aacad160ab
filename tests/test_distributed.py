"""Data-parallel training under torchrun, on this machine's CPU (gloo), with 2 processes."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import CPU_FP32, FAST94_RUN, SRC, write_cifar10
from data import load_cifar
from evaluate import predict_logits
from model import build_model

# --standalone: a rendezvous on a free local port, so tests never collide on one.
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def torchrun(*args, timeout=600):
    return subprocess.run([*TORCHRUN, os.path.join(SRC, "train.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def load_weights(run_dir):
    return torch.load(os.path.join(run_dir, "weights.pt"), weights_only=True)


def test_two_processes_train_the_weights_one_process_trains(fast94_run, tmp_path):
    # fast94: BatchNorm (synchronised over the ranks), lookahead, the alternating flip,
    # translations, and the whitening bias stopping after 3 of the 4 epochs.
    _, one, data = fast94_run
    two = torchrun(*FAST94_RUN, "--data-dir", data, "--out", tmp_path / "two")
    assert two.returncode == 0, two.stderr
    a, b = load_weights(one), load_weights(tmp_path / "two")
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:    # float32 sums in another order: ~1e-6 apart measured
        torch.testing.assert_close(b["state_dict"][key], a["state_dict"][key], rtol=1e-4,
                                   atol=1e-5, msg=key)
    assert a["test_accuracy"] == b["test_accuracy"]


def child_with_rank(parent_pid, rank):
    """The pid of the process torchrun started for `rank`."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rpartition(")")[2].split()[1])
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:          # gone meanwhile
            continue
        if ppid == parent_pid and f"RANK={rank}".encode() in env:
            return int(pid)
    return None


def start_and_wait_for_a_checkpoint(args, run):
    """A 2-process torchrun job, once it has written its first checkpoint, and rank 1's pid."""
    job = subprocess.Popen([*TORCHRUN, os.path.join(SRC, "train.py"), *args, "--out", str(run)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (run / "checkpoint.pt").exists() and job.poll() is None:
        time.sleep(0.01)
    rank1 = child_with_rank(job.pid, 1)
    assert rank1 is not None
    return job, rank1


STEPS = 18     # per epoch of the interrupted runs below: time to interrupt one mid-run


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """(flags, CompletedProcess, run folder, data folder) of an uninterrupted 2-process seed
    run, which the interrupted ones below must end equal to."""
    root = tmp_path_factory.mktemp("straight")
    data = str(root / "data")
    write_cifar10(data, per_file=120, n_test=31)     # 31: shares of 16 and 15 test images
    args = ["--epochs", "2", "--val-size", "21", "--batch-size", "32", *CPU_FP32,
            "--data-dir", data]
    result = torchrun(*args, "--out", root / "run")
    assert result.returncode == 0, result.stderr
    return args, result, root / "run", data


@pytest.mark.slow    # 15 s on 2 cores (the 2-process run it reads): ./test.sh -m slow
def test_two_processes_write_one_set_of_logs_checkpoint_and_weights(straight_run):
    _, result, out, data = straight_run
    assert result.stdout.count("done: ") == 1 and " on cpu x 2 processes " in result.stdout
    assert result.stderr.count("epoch   2/2  train loss") == 1       # rank 0 alone prints
    assert f"579 train / 21 val images, {STEPS} steps per epoch of 2 x 16 images" in \
        result.stderr
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("events.")) == [
        ".lock", "checkpoint.prev.pt", "checkpoint.pt", "weights.pt"]
    assert len(list(out.glob("events.*"))) == 1
    events = EventAccumulator(str(out))
    events.Reload()
    assert [e.step for e in events.Scalars("val/accuracy")] == [1, 2]
    # The reported test accuracy is that of the whole test set, not of rank 0's share.
    weights = load_weights(out)
    model = build_model("seed")
    model.load_state_dict(weights["state_dict"])
    test = load_cifar(data, "cifar10", download=False)
    logits = predict_logits(model, test["test_x"], torch.tensor(weights["mean"]),
                            torch.tensor(weights["std"]))
    assert weights["test_accuracy"] == (logits.argmax(1) == test["test_y"]).sum().item() / 31


def resume_ends_equal(run, straight, message):
    result = subprocess.run([*TORCHRUN, os.path.join(SRC, "train.py"), "--resume", str(run),
                             *CPU_FP32], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count(message) == 1
    a, b = load_weights(straight)["state_dict"], load_weights(run)["state_dict"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow    # over 10 s on 2 cores: ./test.sh -m slow
def test_a_killed_rank_ends_the_job_and_the_run_resumes_under_torchrun(straight_run, tmp_path):
    args, _, straight, _ = straight_run
    run = tmp_path / "run"
    job, rank1 = start_and_wait_for_a_checkpoint([*args, "--dist-timeout", "60"], run)
    os.kill(rank1, signal.SIGKILL)
    killed = time.monotonic()
    _, stderr = job.communicate(timeout=120)
    assert job.returncode != 0
    assert time.monotonic() - killed < 60                # well inside --dist-timeout
    assert "Signal 9 (SIGKILL) received" in stderr       # torchrun names the failed rank
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 0
    assert not (run / "weights.pt").exists()
    resume_ends_equal(run, straight, f"resuming {run} after epoch 1")


@pytest.mark.slow    # over 10 s on 2 cores: ./test.sh -m slow
def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(straight_run, tmp_path):
    args, _, straight, _ = straight_run
    run = tmp_path / "run"
    job, rank1 = start_and_wait_for_a_checkpoint(args, run)
    os.kill(rank1, signal.SIGTERM)                  # rank 1 alone is told to stop
    _, stderr = job.communicate(timeout=120)
    assert job.returncode != 0
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    steps = ckpt["partial"]["steps"]                # rank 0 stopped too, in epoch 2
    assert ckpt["epoch"] == 0 and 1 <= steps < STEPS and len(ckpt["rng"]["processes"]) == 2
    assert f"error: stopped by SIGTERM in epoch 2 after step {steps}/{STEPS}; " in stderr
    resume_ends_equal(run, straight, f"resuming {run} in epoch 2 after step {steps}")


def test_a_global_batch_that_does_not_split_is_one_line(cifar10_dir, tmp_path):
    result = torchrun("--batch-size", "33", *CPU_FP32, "--data-dir", cifar10_dir,
                      "--out", tmp_path / "run")
    assert result.returncode != 0
    # Each rank that gets to say it says it on a line of its own (torchrun may stop one first).
    assert ("error: --batch-size 33 (the global batch) does not split evenly over 2 processes"
            in result.stderr.splitlines())
    assert 'train.py", line' not in result.stderr     # torchrun's own report follows them


def test_global_batchnorm_equals_batchnorm_over_the_whole_batch(tmp_path):
    # Each rank normalises its half of one batch; outputs, input gradients, running statistics
    # and the (summed) affine gradients must equal BatchNorm2d's over the whole batch.
    script = tmp_path / "check_bn.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {SRC!r})
        import torch
        import distributed
        distributed.init(torch.device("cpu"), 60)
        torch.manual_seed(0)
        x = torch.randn(8, 5, 4, 3, dtype=torch.float64) * 3 + 1
        grad = torch.randn_like(x)
        ref = torch.nn.BatchNorm2d(5, momentum=0.3).double()
        torch.nn.init.uniform_(ref.weight)
        torch.nn.init.uniform_(ref.bias)
        net = torch.nn.Sequential(torch.nn.BatchNorm2d(5)).double()
        assert distributed.global_batchnorm(net) == []
        net.load_state_dict({{"0." + k: v for k, v in ref.state_dict().items()}})
        net[0].momentum = 0.3
        assert type(net[0]) is distributed.GlobalBatchNorm2d
        mine = slice(4 * distributed.rank(), 4 * distributed.rank() + 4)
        xr, xm = x.clone().requires_grad_(), x[mine].clone().requires_grad_()
        ref(xr).backward(grad)
        y = net(xm)
        y.backward(grad[mine])
        ref_y = torch.nn.functional.batch_norm(x, None, None, ref.weight, ref.bias, True)
        checks = {{"output": (y, ref_y[mine]), "grad x": (xm.grad, xr.grad[mine]),
                  "running mean": (net[0].running_mean, ref.running_mean),
                  "running var": (net[0].running_var, ref.running_var),
                  "grad weight": (distributed.all_reduce_sum(net[0].weight.grad),
                                  ref.weight.grad),
                  "grad bias": (distributed.all_reduce_sum(net[0].bias.grad), ref.bias.grad)}}
        for name, (got, want) in checks.items():
            error = (got.detach() - want.detach()).abs().max().item()
            assert error < 1e-12, (name, error)
        sys.stdout.write(f"rank {{distributed.rank()}} equal\\n")   # one write: lines stay whole
        sys.stdout.flush()
        distributed.close(together=True)
    """))
    result = subprocess.run([*TORCHRUN, str(script)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "rank 0 equal" in result.stdout and "rank 1 equal" in result.stdout


@pytest.mark.slow    # waits out a timeout by design: ./test.sh -m slow
def test_a_rank_that_stops_answering_fails_the_job_after_the_timeout(tmp_path):
    data = str(tmp_path / "data")
    write_cifar10(data, per_file=120, n_test=20)
    job, rank1 = start_and_wait_for_a_checkpoint(
        ["--epochs", "3", "--val-size", "20", "--batch-size", "32", *CPU_FP32,
         "--data-dir", data, "--dist-timeout", "5"], tmp_path / "run")
    os.kill(rank1, signal.SIGSTOP)                 # alive, but never answers again
    started = time.monotonic()
    lines = []
    for line in job.stderr:                        # until rank 0 gives up on it
        lines.append(line)
        if line.startswith("error: "):
            break
    waited = time.monotonic() - started
    os.kill(rank1, signal.SIGKILL)   # torchrun would wait 30 s for the stopped rank's SIGTERM
    _, rest = job.communicate(timeout=120)
    assert job.returncode != 0
    assert 5 <= waited < 60
    assert lines[-1].startswith("error: rank 0: lost contact with the other processes (one "
                                "died, or did not answer within --dist-timeout 5 s): ")
    assert 'train.py", line' not in "".join(lines) + rest
