"""Training end to end on tiny synthetic CIFAR files: logs, checkpoints, weights, resume."""
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import CPU_FP32, SRC, run_script, write_cifar10
from data import load_cifar, normalize
from model import build_model, whitening_filters
from data import DataError
from train import (atomic_save, check_resume_flags, deferred_stop_signals, get_args,
                   lookahead_decay, lookahead_pull, lookahead_state, lr_factor, make_optimizers,
                   read_checkpoint, set_aside_other_checkpoint)

TINY = ["--val-size", "20", "--batch-size", "32", *CPU_FP32]


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


@pytest.mark.parametrize("preset", ["fast94"])   # lookahead, alternating flip (seed: test_faults)
def test_killed_and_resumed_run_ends_with_the_same_weights(preset, tmp_path):
    data = str(tmp_path / "data")
    write_cifar10(data, per_file=200, n_test=20)    # ~30 steps per epoch: time to kill it
    args = ["--preset", preset, "--epochs", "2", "--data-dir", data, *TINY]

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

    result = run_script("train.py", "--resume", resumed, *CPU_FP32)
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


@pytest.mark.parametrize("preset, signum", [("seed", signal.SIGTERM),
                                            ("fast94", signal.SIGINT)])
def test_stopped_by_a_signal_mid_epoch_and_resumed_ends_with_the_same_weights(preset, signum,
                                                                               tmp_path):
    data = str(tmp_path / "data")
    write_cifar10(data, per_file=200, n_test=20)    # ~30 steps per epoch
    args = ["--preset", preset, "--epochs", "2", "--data-dir", data, *TINY]
    straight = tmp_path / "straight"
    assert run_script("train.py", *args, "--out", straight).returncode == 0

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
    assert ckpt["epoch"] == -1 and 1 <= steps < 30     # within epoch 1
    assert stderr.splitlines()[-1] == (
        f"error: stopped by {signal.Signals(signum).name} in epoch 1 after step {steps}/"
        f"{len(ckpt['partial']['perm']) // 32}; {out / 'checkpoint.pt'} holds it: "
        f"python src/train.py --resume {out} continues")
    assert not (out / "weights.pt").exists() and not list(out.glob("*.tmp"))

    result = run_script("train.py", "--resume", out, *CPU_FP32)
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
    assert run_script("train.py", "--epochs", "1", "--data-dir", cifar10_dir, "--out", out,
                      *TINY).returncode == 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    ckpt["args"]["epochs"] = 2                   # one more epoch, from poisoned weights
    ckpt["model"]["fc3.bias"][0] = float("nan")
    torch.save(ckpt, out / "checkpoint.pt")
    before = (out / "checkpoint.pt").read_bytes()
    result = run_script("train.py", "--resume", out, *CPU_FP32)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        f"error: training loss became nan in epoch 2; try a lower --lr (now 0.05), or continue "
        f"from {out / 'checkpoint.pt'} (kept, from epoch 1) with gradient clipping: python "
        f"src/train.py --resume {out} --grad-clip 1")
    assert (out / "checkpoint.pt").read_bytes() == before
    # --grad-clip is the one training flag a resume takes; the run keeps it.
    ckpt["model"]["fc3.bias"][0] = 0.0
    torch.save(ckpt, out / "checkpoint.pt")
    assert run_script("train.py", "--resume", out, "--grad-clip", "1", *CPU_FP32).returncode == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["args"]["grad_clip"] == 1.0


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    # A file-size limit makes the write fail (SIGXFSZ ignored, as a full disk would).
    path = tmp_path / "checkpoint.pt"
    atomic_save({"epoch": 1}, str(path))
    before = path.read_bytes()
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, old_limit[1]))
    try:
        with pytest.raises(OSError, match=re.escape(
                f"could not write {path} (the write failed: disk full or a file-size "
                f"limit? ") + r".*\); the previous one is kept$"):
            atomic_save({"epoch": 2, "weights": torch.zeros(1 << 16)}, str(path))
        with pytest.raises(OSError, match=re.escape(
                f"could not write {tmp_path / 'new.pt'} (the write failed: disk full or a "
                f"file-size limit? ") + r".*\); nothing was written$"):
            atomic_save({"weights": torch.zeros(1 << 16)}, str(tmp_path / "new.pt"))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_a_checkpoint_write_keeps_the_one_before_as_prev(tmp_path):
    path = tmp_path / "checkpoint.pt"
    atomic_save({"epoch": 0}, str(path), keep_previous=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    (tmp_path / "checkpoint.prev.pt.tmp").write_bytes(b"left by a killed run")
    for epoch in (1, 2):
        atomic_save({"epoch": epoch}, str(path), keep_previous=True)
        assert torch.load(path, weights_only=True) == {"epoch": epoch}
        assert torch.load(tmp_path / "checkpoint.prev.pt", weights_only=True) == {
            "epoch": epoch - 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt"]


def test_a_corrupt_checkpoint_offers_the_previous_one(tmp_path):
    ckpt = {"model": {}, "optimizer": [], "scheduler": [], "epoch": 2, "rng": {},
            "args": {"epochs": 8}}
    path = tmp_path / "checkpoint.pt"
    atomic_save(ckpt, str(path), keep_previous=True)
    atomic_save({**ckpt, "epoch": 3}, str(path), keep_previous=True)
    assert read_checkpoint(str(tmp_path)) == ({**ckpt, "epoch": 3}, str(tmp_path))
    path.write_bytes(path.read_bytes()[:100])        # truncated
    previous = tmp_path / "checkpoint.prev.pt"
    with pytest.raises(DataError) as error:
        read_checkpoint(str(tmp_path))
    assert re.fullmatch(
        re.escape(f"cannot read checkpoint {path}: ") + r"\w+" + re.escape(
            f"; the previous checkpoint (after epoch 3/8) is intact: python src/train.py "
            f"--resume {previous} continues from it"), str(error.value)), str(error.value)
    assert read_checkpoint(str(previous)) == (ckpt, str(tmp_path))
    # Resumed from it, the run sets the truncated one aside instead of making it the previous.
    set_aside_other_checkpoint(str(tmp_path), str(previous))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.pt",
                                                          "checkpoint.set-aside.pt"]
    with pytest.raises(DataError, match=f"^no checkpoint at {re.escape(str(path))}$"):
        read_checkpoint(str(path))
    previous.write_bytes(b"")                          # both broken: no offer
    (tmp_path / "checkpoint.set-aside.pt").rename(path)
    with pytest.raises(DataError, match=r"^cannot read checkpoint \S+checkpoint.pt: \w+$"):
        read_checkpoint(str(tmp_path))


def test_a_resume_refuses_flags_that_change_the_run():
    saved = vars(get_args(["--epochs", "2", "--device", "cpu"]))
    args = get_args(["--resume", "run", "--epochs", "5", "--lr", "0.1", "--device", "cuda",
                     "--grad-clip", "1"])
    with pytest.raises(ValueError) as error:
        check_resume_flags(args, args.given, saved)
    assert str(error.value) == (
        "a resumed run keeps its own flags: --epochs 5 (the run's: 2), --lr 0.1 (the run's: "
        "0.05); a resume takes only --device, --precision, --grad-clip, --data-dir and "
        "--dist-timeout (start a new run in another --out to change the rest)")
    same = get_args(["--resume", "run", "--epochs", "2", "--device", "cuda"])
    check_resume_flags(same, same.given, saved)       # the run's own value is no change
    typed = get_args(["--resume", "run", "--seed", "0", "--conv", "hand"])   # the defaults
    assert typed.given == ["conv", "resume", "seed"]
    with pytest.raises(ValueError, match=r"flags: --seed 0 \(the run's: 3\);"):
        check_resume_flags(typed, typed.given, {**saved, "seed": 3})


def test_a_second_run_on_a_live_run_folder_refuses(cifar10_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(   # a live run's lock, held by another process
        [sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
         "import train; lock = train.lock_run_folder(sys.argv[2]); print(flush=True); "
         "time.sleep(600)", SRC, str(out)], stdout=subprocess.PIPE)
    try:
        holder.stdout.readline()                      # it holds the lock now
        args = ["--epochs", "1", "--data-dir", cifar10_dir, "--out", out, *TINY]
        refused = run_script("train.py", *args)
        assert refused.returncode == 2
        assert refused.stderr.splitlines()[-1] == (
            f"error: another run (process {holder.pid}) is writing {out}; wait for it to end "
            f"or give another --out")
        assert not list(out.glob("events.*"))         # nothing written
    finally:
        holder.kill()
        holder.wait()
    # A killed run leaves no stale lock.
    result = run_script("train.py", *args)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "error: train.py: unrecognized arguments: --bogus (see --help)"),
    (["--epochs", "two"], "error: train.py: argument --epochs: invalid int value: 'two' "
                          "(see --help)"),
    (["--epochs", "0"], "error: train.py: --epochs, --batch-size and --runs must be at least "
                        "1, --val-size and --cutout at least 0 (see --help)"),
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
    (["--precision", "fp8"], "error: train.py: argument --precision: invalid choice: 'fp8' "
                             "(choose from {0}auto{0}, {0}fp32{0}, {0}bf16{0}) (see --help)"),
])
def test_bad_flags_are_one_line(args, message, tmp_path):
    result = run_script("train.py", *args, cwd=tmp_path)   # no data/ there: flags fail first
    assert result.returncode == 2
    # Python 3.12 started quoting the choices in argparse's message; both forms are one line.
    assert result.stderr.strip() in {message.format(""), message.format("'")}


def test_missing_dataset_is_one_line(tmp_path):
    result = run_script("train.py", "--data-dir", tmp_path / "nowhere", *CPU_FP32,
                        "--out", tmp_path / "run", cwd=tmp_path)
    assert result.returncode == 2
    line, = result.stderr.splitlines()
    assert line.startswith(f"error: CIFAR-10 not found in {tmp_path / 'nowhere'}")
    assert "put the extracted python version of the dataset there" in line


def test_resume_without_checkpoint(tmp_path):
    result = run_script("train.py", "--resume", tmp_path, *CPU_FP32)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: no checkpoint at {tmp_path / 'checkpoint.pt'}"


def test_corrupt_checkpoint_is_one_line(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    result = run_script("train.py", "--resume", tmp_path, *CPU_FP32)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: cannot read checkpoint {tmp_path / 'checkpoint.pt'}: ")
    assert len(result.stderr.splitlines()) == 1


def test_cifar100_trains_end_to_end(cifar100_dir, tmp_path):
    out = tmp_path / "run100"
    result = run_script("train.py", "--dataset", "cifar100", "--epochs", "1", "--val-size", "100",
                        "--batch-size", "50", *CPU_FP32, "--data-dir", cifar100_dir,
                        "--out", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("done: seed on cifar100, 1 epochs")
    weights = torch.load(out / "weights.pt", weights_only=True)
    assert len(weights["classes"]) == 100 and weights["classes"][0] == "class_00"
    assert weights["state_dict"]["fc3.weight"].shape == (100, 256)


@pytest.mark.parametrize("preset, head", [("resnet18", "fc.weight"),
                                          ("fast96", "head.weight")])
def test_cifar100_presets_train_and_report_per_class(preset, head, cifar100_dir, tmp_path):
    """The CIFAR-100 presets (ResNet-18 with cutout; the residual fast96), 100-way heads, and
    inference's report under the meta file's class names."""
    out = tmp_path / "run100"
    result = run_script("train.py", "--preset", preset, "--dataset", "cifar100", "--epochs", "1",
                        "--batch-size", "100", *CPU_FP32, "--data-dir", cifar100_dir,
                        "--out", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"done: {preset} on cifar100, 1 epochs")
    weights = torch.load(out / "weights.pt", weights_only=True)
    assert weights["state_dict"][head].shape[0] == 100
    report = run_script("inference.py", "--weights", out / "weights.pt", "--data-dir",
                        cifar100_dir, *CPU_FP32, "--json")
    assert report.returncode == 0, report.stderr
    per_class = json.loads(report.stdout)["per_class"]
    assert list(per_class) == [f"class_{i:02d}" for i in range(100)]


def test_foreign_checkpoint_is_one_line(tmp_path):
    torch.save({"model": {}}, tmp_path / "checkpoint.pt")
    result = run_script("train.py", "--resume", tmp_path, *CPU_FP32)
    assert result.returncode == 2
    assert result.stderr == (f"error: {tmp_path / 'checkpoint.pt'} is not a checkpoint of "
                             f"this repo (expected keys model, optimizer, scheduler, epoch, rng, "
                             f"args)\n")


# ----------------------------------------------------------------------------------------------
# The fast presets' recipe

def test_fast94_trains_end_to_end_with_whitening_and_tta(tmp_path):
    data = str(tmp_path / "data")
    write_cifar10(data, per_file=40, n_test=30)
    out = tmp_path / "run"
    result = run_script("train.py", "--preset", "fast94", "--epochs", "2", "--batch-size", "50",
                        *CPU_FP32, "--data-dir", data, "--out", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("done: fast94 on cifar10, 2 epochs in ")
    assert " with TTA 2 (" in result.stdout and "200 train / 0 val images" in result.stderr

    events = EventAccumulator(str(out))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"train/loss", "train/accuracy", "lr"}  # no val
    weights = torch.load(out / "weights.pt", weights_only=True)
    assert weights["model"] == "fast94" and weights["tta"] == 2
    assert 0 <= weights["test_accuracy_without_tta"] <= 1
    # The frozen whitening filters are those of the (all 200) normalised training images.
    images = load_cifar(data, "cifar10", download=False)["train_x"]
    mean, std = torch.tensor(weights["mean"]), torch.tensor(weights["std"])
    expected = whitening_filters(normalize(images, mean, std))
    assert torch.allclose(weights["state_dict"]["whiten.weight"], expected, atol=1e-6)


def fast94_args(*flags):
    return get_args(["--preset", "fast94", *flags])


def test_decoupled_hyperparameters_follow_airbench():
    model = build_model("fast94")
    optimizers, pairs = make_optimizers(model, fast94_args())
    (sgd,) = optimizers
    assert pairs == []
    others, shifts = sgd.param_groups
    # lr 11.5 per 1024 examples / (1 + 1/(1 - 0.85)) at batch 1024; decay per step lr * wd.
    assert others["lr"] == pytest.approx(1.5)
    assert others["lr"] * others["weight_decay"] == pytest.approx(0.0153 / (1 + 1 / 0.15))
    assert shifts["lr"] == pytest.approx(64 * 1.5)
    assert shifts["lr"] * shifts["weight_decay"] == pytest.approx(0.0153 / (1 + 1 / 0.15))
    norms = [m.bias for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert {id(p) for p in shifts["params"]} == {id(p) for p in norms}
    assert all(p is not model.whiten.weight for p in others["params"])   # frozen: not trained
    half = make_optimizers(model, fast94_args("--batch-size", "512"))[0][0]
    assert half.param_groups[0]["lr"] == pytest.approx(0.75)              # LR scales with batch


def test_muon_updates_the_conv_filters_through_matrices_sharing_their_storage():
    torch.manual_seed(0)
    model = build_model("fast94")
    (sgd, muon), pairs = make_optimizers(model, fast94_args("--optimizer", "muon"))
    filters = [p for n, p in model.named_parameters() if p.ndim == 4 and p.requires_grad]
    assert len(pairs) == len(filters) == 6 and isinstance(muon, torch.optim.Muon)
    assert all(w.data_ptr() == m.data_ptr() and m.shape == (w.shape[0], w[0].numel())
               for w, m in pairs)
    assert not any(p.ndim == 4 for g in sgd.param_groups for p in g["params"])
    before = [w.detach().clone() for w, _ in pairs]
    model(torch.randn(4, 3, 32, 32)).square().mean().backward()
    for w, m in pairs:
        m.grad = w.grad.view_as(m)
    muon.step()
    assert all(not torch.equal(b, w) for b, (w, _) in zip(before, pairs))


def test_lr_schedule_is_piecewise_linear():
    args = fast94_args()
    assert lr_factor(0, 100, args) == pytest.approx(0.2)
    assert lr_factor(23, 100, args) == pytest.approx(1.0)
    assert lr_factor(99, 100, args) == pytest.approx(0.07)
    assert lr_factor(61, 100, args) == pytest.approx(1 - 0.93 * 38 / 76)
    # The scheduler steps once more after the last step: the factor stays at its end value.
    assert lr_factor(100, 100, args) == pytest.approx(0.07)
    assert min(lr_factor(s, total, get_args([])) for total in (1, 2, 3, 16, 61)
               for s in range(total + 2)) == pytest.approx(0.001)


def test_short_seed_run_logs_the_lr_each_epoch_used(cifar10_dir, tmp_path):
    out = tmp_path / "run"   # 2 epochs of 5 steps: the linear decay ends at the last step
    result = run_script("train.py", "--epochs", "2", "--data-dir", cifar10_dir, "--out", out,
                        *TINY)
    assert result.returncode == 0, result.stderr
    events = EventAccumulator(str(out))
    events.Reload()
    args = get_args(["--epochs", "2"])
    expected = [0.05 * lr_factor(s, 10, args) for s in (4, 9)]
    assert [e.value for e in events.Scalars("lr")] == pytest.approx(expected, rel=1e-6)
    assert expected[1] == pytest.approx(0.05 * 0.001)


def test_gradient_clipping_keeps_a_high_lr_seed_run_finite(tmp_path):
    # Without clipping, the seed net diverged at its own LR on some CPUs in runs this short;
    # at 4x the LR it diverged within a few steps for every seed tried, with gradient norms of
    # 1e4-1e7. Clipped (the preset's default), it trains.
    data = str(tmp_path / "data")
    write_cifar10(data, per_file=200, n_test=20)
    args = ["--epochs", "2", "--lr", "0.2", "--data-dir", data, *TINY]
    unclipped = run_script("train.py", *args, "--grad-clip", "0", "--out", tmp_path / "a")
    assert unclipped.returncode == 2
    assert re.search(r"error: (training loss became (nan|inf)|the weights became inf or nan) "
                     r"in epoch 1", unclipped.stderr)
    clipped = run_script("train.py", *args, "--out", tmp_path / "b")
    assert clipped.returncode == 0, clipped.stderr
    ckpt = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert ckpt["args"]["grad_clip"] == 5.0


def test_lookahead_pull_moves_the_slow_copy_then_resets_the_weights():
    model = build_model("fast94")
    slow = [t.clone() for t in lookahead_state(model)]
    with torch.no_grad():
        for t in lookahead_state(model):
            t.add_(1.0)
    fast = [t.clone() for t in lookahead_state(model)]
    lookahead_pull(model, slow, 0.75)
    for s, f, now in zip(slow, fast, lookahead_state(model)):
        assert torch.allclose(s, f - 0.75, atol=1e-6) and torch.equal(now, s)
    assert lookahead_decay(0, 10) == 0 and lookahead_decay(10, 10) == pytest.approx(0.95 ** 5)


def test_runs_report_mean_and_std_over_seeds(cifar10_dir, tmp_path):
    out = tmp_path / "runs"
    result = run_script("train.py", "--epochs", "1", "--runs", "2", "--data-dir", cifar10_dir,
                        "--out", out, *TINY)
    assert result.returncode == 0, result.stderr
    last = result.stdout.splitlines()[-1]
    assert last.startswith("2 runs of seed: test accuracy ") and last.endswith(" s each")
    accs = [torch.load(out / f"run{i}" / "weights.pt", weights_only=True)["test_accuracy"]
            for i in range(2)]
    assert f"test accuracy {sum(accs) / 2:.4f} ± " in last
    assert torch.load(out / "run1" / "checkpoint.pt", weights_only=True)["args"]["seed"] == 1


@pytest.mark.parametrize("preset, cutout, crop_pad", [("fast95", 0, 2), ("fast96", 12, 4)])
def test_wider_and_residual_presets_train_end_to_end(preset, cutout, crop_pad, tmp_path):
    args = get_args(["--preset", preset])
    assert (args.model, args.cutout, args.crop_pad, args.tta) == (preset, cutout, crop_pad, 2)
    data = str(tmp_path / "data")
    write_cifar10(data, per_file=40, n_test=10)
    result = run_script("train.py", "--preset", preset, "--epochs", "1", "--batch-size", "100",
                        *CPU_FP32, "--data-dir", data, "--out", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"done: {preset} on cifar10, 1 epochs in ")
    assert torch.load(tmp_path / "run" / "weights.pt", weights_only=True)["model"] == preset
