"""The GPU check's dry run on the CPU at a toy size (every part but --compile's epoch, which
takes minutes on 2 cores; muon's in a slow test), so that it runs where a GPU is lent."""
import json
import re

import pytest
import torch

from conftest import run_main
from gpu_check import PARTS, SIZES, training
from run_setup import get_args as train_args


def test_the_gpu_check_runs_every_part_on_the_cpu_and_writes_its_figures(tmp_path):
    """In this process (run_main): the check runs train.py in-process too, and its resume part
    sends SIGTERM to this process while train.py's handler is in place (its own no-op before
    and after). The muon part has a test of its own."""
    result = run_main("gpu_check.py", "--device", "cpu", "--tiny", "--skip", "compile,muon",
                      "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    path = tmp_path / "gpu_check.json"
    assert result.stdout == (f"gpu check on cpu: 6 of 7 parts passed, 1 skipped (syncs); "
                             f"{path}\n")
    check = json.loads(path.read_text())
    parts = check["parts"]
    assert list(parts) == ["conv", "memory", "steps", "syncs", "train", "resume", "cpu-resume"]
    assert all(p["ok"] for p in parts.values()), parts
    assert parts["conv"]["shapes"] == 29 and parts["conv"]["float32"]["hand"] < 1e-5
    assert set(parts["steps"]["fast94"]) == {"hand", "hand channels_last",
                                             "native channels_last", "ratio"}
    assert set(parts["memory"]["peak_mib"]) == {"hand", "native"}
    assert parts["syncs"] == {"ok": True, "skipped": "CUDA only",
                              "seconds_total": parts["syncs"]["seconds_total"]}
    assert 0 <= parts["train"]["inference_accuracy"] <= 1
    # On the CPU a stopped and resumed run ends with the uninterrupted run's weights, bit for bit.
    assert re.fullmatch(r"error: stopped by SIGTERM in epoch 1 after step [1-4]/5; (.+) holds "
                        r"it: python src/train.py --resume (.+) continues",
                        parts["resume"]["stopped"])
    assert parts["resume"]["weight_difference"] == 0.0
    assert parts["cpu-resume"]["notes"] == []     # the CPU to the CPU: nothing re-seeded


@pytest.mark.slow    # 26 s on 2 cores without bf16 units (Muon works in bf16): ./test.sh -m slow
def test_the_gpu_checks_muon_part_trains_on_the_cpu(tmp_path):
    others = ",".join(p for p in PARTS if p != "muon")
    result = run_main("gpu_check.py", "--device", "cpu", "--tiny", "--skip", others, "--out",
                      tmp_path)
    assert result.returncode == 0, result.stderr
    path = tmp_path / "gpu_check.json"
    assert result.stdout == f"gpu check on cpu: 1 of 1 parts passed; {path}\n"
    muon = json.loads(path.read_text())["parts"]["muon"]
    assert muon["ok"] and muon["train"].startswith("done: fast94 on cifar10, 1 epochs in ")


def test_an_unknown_part_and_an_empty_out_are_one_line(tmp_path):
    result = run_main("gpu_check.py", "--skip", "conv,warp", "--out", tmp_path)
    assert result.returncode == 2
    assert result.stderr == "error: gpu_check.py: unknown parts: warp (see --help)\n"
    empty = run_main("gpu_check.py", "--out", "")
    assert (empty.returncode, empty.stderr) == (2, "error: gpu_check.py: --out must name a "
                                                   "folder (see --help)\n")


def test_the_check_trains_without_measuring_the_conv_so_a_resume_can_match_bit_for_bit():
    """Runs that measured the conv's variants apart may pick different ones and round float32
    differently (the resume part failed by 9e-6 on an AVX2-only CPU with measuring on)."""
    flags = training("data", torch.device("cpu"), "fp32", SIZES["tiny"], "out")
    assert "--no-conv-measure" in flags
    assert train_args([str(f) for f in flags]).no_conv_measure
