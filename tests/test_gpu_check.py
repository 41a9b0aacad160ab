"""The GPU check's dry run on the CPU at a toy size (every part but --compile's epoch, which
takes minutes on 2 cores), so that it runs where a GPU is lent."""
import json
import re

from conftest import run_main


def test_the_gpu_check_runs_every_part_on_the_cpu_and_writes_its_figures(tmp_path):
    """In this process (run_main): the check runs train.py in-process too, and its resume part
    sends SIGTERM to this process while train.py's handler is in place (its own no-op before
    and after)."""
    result = run_main("gpu_check.py", "--device", "cpu", "--tiny", "--skip", "compile",
                      "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    path = tmp_path / "gpu_check.json"
    assert result.stdout == (f"gpu check on cpu: 7 of 8 parts passed, 1 skipped (syncs); "
                             f"{path}\n")
    check = json.loads(path.read_text())
    parts = check["parts"]
    assert list(parts) == ["conv", "memory", "steps", "syncs", "train", "resume", "cpu-resume",
                           "muon"]
    assert all(p["ok"] for p in parts.values()), parts
    assert parts["conv"]["shapes"] == 29 and parts["conv"]["float32"]["hand"] < 1e-5
    assert set(parts["steps"]["fast94"]) == {"hand", "hand channels_last",
                                             "native channels_last", "ratio"}
    assert set(parts["memory"]["peak_mib"]) == {"hand", "native"}
    assert parts["syncs"] == {"ok": True, "skipped": "CUDA only",
                              "seconds_total": parts["syncs"]["seconds_total"]}
    assert 0 <= parts["train"]["inference_accuracy"] <= 1
    # On the CPU a stopped and resumed run ends with the uninterrupted run's weights, bit for bit.
    assert re.fullmatch(r"error: stopped by SIGTERM in epoch 1 after step [1-9]/10; (.+) holds "
                        r"it: python src/train.py --resume (.+) continues",
                        parts["resume"]["stopped"])
    assert parts["resume"]["weight_difference"] == 0.0
    assert parts["cpu-resume"]["notes"] == []     # the CPU to the CPU: nothing re-seeded


def test_an_unknown_part_is_one_line(tmp_path):
    result = run_main("gpu_check.py", "--skip", "conv,warp", "--out", tmp_path)
    assert result.returncode == 2
    assert result.stderr == "error: gpu_check.py: unknown parts: warp (see --help)\n"
