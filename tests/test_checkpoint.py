"""checkpoint.py: atomic writes that keep the previous file, a corrupt checkpoint's offer of
the previous one, and the flags a resume refuses."""
import dataclasses
import re
import resource
import signal

import pytest
import torch

from checkpoint import (Checkpoint, atomic_save, check_resume_flags, no_seconds,
                        read_checkpoint, save_checkpoint, set_aside_other_checkpoint)
from data import DataError
from run_setup import get_args


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
    ckpt = Checkpoint(model={}, optimizer=[], scheduler=[], epoch=2, rng={"processes": []},
                      args={"epochs": 8}, train_size=10, lookahead={}, conv_plans={},
                      precision="fp32", seconds=no_seconds(), partial=None)
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(ckpt, str(tmp_path))
    save_checkpoint(dataclasses.replace(ckpt, epoch=3), str(tmp_path))
    assert read_checkpoint(str(tmp_path)) == (dataclasses.replace(ckpt, epoch=3), str(tmp_path))
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
        "0.05); a resume takes only --device, --precision, --grad-clip, --data-dir, "
        "--dist-timeout, --no-conv-measure and --test-every (start a new run in another --out "
        "to change the rest)")
    same = get_args(["--resume", "run", "--epochs", "2", "--device", "cuda"])
    check_resume_flags(same, same.given, saved)       # the run's own value is no change
    typed = get_args(["--resume", "run", "--seed", "0", "--conv", "hand"])   # the defaults
    assert typed.given == ["conv", "resume", "seed"]
    with pytest.raises(ValueError, match=r"flags: --seed 0 \(the run's: 3\);"):
        check_resume_flags(typed, typed.given, {**saved, "seed": 3})
