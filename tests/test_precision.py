"""--precision: what auto picks, and bf16 autocast through training, inference and the
benchmark. Every assertion holds on any CPU: CIFAR_CPU_BF16 says which bf16 unit's branch to
take, and bf16 itself runs everywhere (slowly where the CPU has no bf16 instructions)."""
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import SRC, run_main, two_epoch_run, write_cifar10
from model import build_model
from precision import autocast, cpu_bf16_unit, describe, pick_precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("flag, device, unit, expected", [
    ("auto", CPU, "amx", "precision: bf16 (AMX)"),
    ("auto", CPU, "avx512_bf16", "precision: bf16 (AVX512-BF16)"),
    ("auto", CPU, "none", "precision: fp32 (this CPU has no AMX or AVX512-BF16)"),
    ("auto", CUDA, "none", "precision: bf16 (CUDA)"),
    ("auto", torch.device("mps"), "amx", "precision: fp32 (mps)"),
    ("fp32", CPU, "amx", "precision: fp32 (--precision fp32)"),
    ("fp32", CUDA, "none", "precision: fp32 (--precision fp32)"),
    ("bf16", CUDA, "none", "precision: bf16 (--precision bf16)"),
    ("bf16", CPU, "avx512_bf16", "precision: bf16 (--precision bf16)"),
    ("bf16", CPU, "none", "precision: bf16 (--precision bf16; no AMX or AVX512-BF16 here: "
                          "slow)"),
])
def test_auto_is_bf16_on_cuda_and_on_cpus_with_bf16_units(monkeypatch, flag, device, unit,
                                                          expected):
    monkeypatch.setenv("CIFAR_CPU_BF16", unit)
    assert describe(*pick_precision(flag, device)) == expected


@pytest.mark.parametrize("override", [None, ""])
@pytest.mark.parametrize("amx, avx512_bf16, unit", [
    (True, True, "AMX"), (False, True, "AVX512-BF16"), (True, False, "AMX"), (False, False, None)])
def test_without_the_override_the_unit_is_what_torch_detects(monkeypatch, override, amx,
                                                             avx512_bf16, unit):
    monkeypatch.delenv("CIFAR_CPU_BF16")
    if override is not None:              # set but empty counts as unset
        monkeypatch.setenv("CIFAR_CPU_BF16", override)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16,
                        raising=False)
    assert cpu_bf16_unit() == unit
    assert describe(*pick_precision("auto", CPU)) == (
        f"precision: bf16 ({unit})" if unit else
        "precision: fp32 (this CPU has no AMX or AVX512-BF16)")


def test_bad_precision_and_override_are_one_line_errors(monkeypatch):
    with pytest.raises(ValueError, match="^unknown precision 'fp16'; choose from auto, fp32, "
                                         "bf16$"):
        pick_precision("fp16", CPU)
    with pytest.raises(ValueError, match="^--precision bf16 is not supported on mps$"):
        pick_precision("bf16", torch.device("mps"))
    monkeypatch.setenv("CIFAR_CPU_BF16", "yes")
    with pytest.raises(ValueError, match="^CIFAR_CPU_BF16 must be one of amx, avx512_bf16, "
                                         "none, got 'yes'$"):
        pick_precision("auto", CPU)


def test_bf16_step_keeps_weights_gradients_and_batchnorm_statistics_float32():
    """Mixed precision: bf16 logits, float32 everything that is kept; the whitening conv's
    output stays float32 (it amplifies rounding)."""
    torch.manual_seed(0)
    model = build_model("fast94", 10)
    whitened = []
    model.whiten.register_forward_hook(lambda m, i, o: whitened.append(o.dtype))
    x = torch.randn(8, 3, 32, 32)
    with autocast(CPU, torch.bfloat16):
        logits = model(x)
    F.cross_entropy(logits.float(), torch.arange(8)).backward()
    assert logits.dtype == torch.bfloat16 and whitened == [torch.float32]
    assert all(t.dtype == torch.float32 for t in model.state_dict().values()
               if t.is_floating_point())
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
    with autocast(CPU, None):
        assert model(x).dtype == torch.float32


def test_bf16_training_run_and_its_weights(tmp_path):
    """A fast94 run in bf16 (what auto picks on a CPU with AVX512-BF16) says so, trains to a
    finite loss, writes float32 weights, and inference reads them in either precision."""
    data = str(tmp_path / "data")
    # 50 images: 2 steps of 25 an epoch, so 3 epochs reach the lookahead's pull at step 5.
    write_cifar10(data, per_file=10, n_test=30)
    out = tmp_path / "run"
    result = run_main("train.py", "--preset", "fast94", "--epochs", "3", "--batch-size", "25",
                      "--device", "cpu", "--data-dir", data, "--out", out,
                      env={"CIFAR_CPU_BF16": "avx512_bf16"})
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith("device: cpu, precision: bf16 (AVX512-BF16)\n")
    assert "training loss became" not in result.stderr
    weights = torch.load(out / "weights.pt", weights_only=True)
    assert all(t.dtype == torch.float32 for t in weights["state_dict"].values()
               if t.is_floating_point())
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["args"]["precision"] == "auto"
    momenta = [s["momentum_buffer"] for s in ckpt["optimizer"][0]["state"].values()]
    assert momenta and all(m.dtype == torch.float32 for m in momenta)

    accuracies = {}
    for precision in ("fp32", "bf16"):
        report = run_main("inference.py", "--weights", out / "weights.pt", "--data-dir", data,
                          "--device", "cpu", "--precision", precision, "--json")
        assert report.returncode == 0, report.stderr
        assert f"precision: {precision} (--precision {precision}" in report.stderr
        accuracies[precision] = json.loads(report.stdout)["accuracy"]
    # bf16 inference repeats the run's own bf16 evaluation; float32 may flip the odd near-tie
    # of its 30 test images, not more.
    assert accuracies["bf16"] == pytest.approx(weights["test_accuracy_without_tta"], abs=1e-6)
    assert abs(accuracies["fp32"] - accuracies["bf16"]) <= 2 / 30 + 1e-9


@pytest.mark.slow    # 11 s on 2 cores (test_tools times the fp32 tables): ./test.sh -m slow
def test_conv_benchmark_in_bf16_compares_with_the_channels_last_native_net():
    result = run_main("benchmark.py", "--conv", "--device", "cpu", "--models", "seed",
                      "--batch-size", "2", "--warmup", "1", "--repeats", "1",
                      "--epoch-images", "4", "--precision", "bf16", "--step-models", "seed",
                      "--step-batch", "2", "--step-repeats", "1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "cpu, bf16 autocast, channels_last (precision: bf16 (--precision bf16" in lines[0]
    assert "| network | epoch of 4 images, hand s | native (channels_last) s | ratio |" in lines
    assert any(row.startswith("| seed (batch 2) |") for row in lines)
    assert [row.split(" | ")[1][:22] for row in lines if row.startswith("| seed | ")] == [
        "fp32 (--precision fp32", "bf16 (--precision bf16"]
    assert float(lines[-1].split()[-1]) > 0


def test_the_timing_study_refuses_bf16_in_one_line():
    result = run_main("benchmark.py", "--precision", "bf16")
    assert result.returncode == 2
    assert result.stderr == ("error: benchmark.py: --precision bf16 goes with --conv (the timing "
                             "study runs float32) (see --help)\n")


def test_a_resumed_auto_run_keeps_the_precision_it_ran_in(tmp_path):
    """auto is resolved once, when the run starts: a resume on a machine where auto means
    something else (here: told it has AVX512-BF16) keeps the run's precision."""
    first, _, prev, ckpt = two_epoch_run(tmp_path, precision="auto")
    assert "precision: fp32 (this CPU has no AMX or AVX512-BF16)" in first.stderr
    assert (ckpt["args"]["precision"], ckpt["precision"]) == ("auto", "fp32")
    for saved in ("fp32", "bf16"):
        torch.save({**ckpt, "precision": saved}, prev)
        resumed = run_main("train.py", "--resume", prev, env={"CIFAR_CPU_BF16": "avx512_bf16"})
        assert resumed.returncode == 0, resumed.stderr
        assert f"precision: {saved} (the resumed run's)" in resumed.stderr


TF32_FLAGS = """
import sys, torch
sys.path.insert(0, {src!r})
from precision import disable_tf32
flags = (torch.backends.cuda.matmul, torch.backends.cudnn)
for f in flags:
    f.allow_tf32 = True
print(repr(disable_tf32(torch.device("cpu"))), [f.allow_tf32 for f in flags])
print(repr(disable_tf32(torch.device("cuda"))), [f.allow_tf32 for f in flags])
"""


def test_fp32_on_cuda_is_true_float32_in_both_convs():
    """cuDNN's default is TF32 for float32 convolutions, cuBLAS's (the hand-written conv's
    matmuls) true float32: disable_tf32 makes both true float32. The flags exist without a GPU;
    a fresh process, as this one has them frozen (by torch's test utilities)."""
    out = subprocess.run([sys.executable, "-c", TF32_FLAGS.format(src=SRC)], check=True,
                         capture_output=True, text=True).stdout
    assert out == "'' [True, True]\n'TF32 off in cuBLAS and cuDNN' [False, False]\n"
