"""--precision: what auto picks, and bf16 autocast through training, inference and the
benchmark. Every assertion holds on any CPU: CIFAR_CPU_AMX says whether to take AMX's branch,
and bf16 itself runs everywhere (slowly where the CPU has no bf16 instructions)."""
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import run_main, write_cifar10
from model import build_model
from precision import autocast, cpu_has, describe, pick_precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("flag, device, amx, expected", [
    ("auto", CPU, "1", "precision: bf16 (AMX)"),
    ("auto", CPU, "0", "precision: fp32 (this CPU has no AMX)"),
    ("auto", CUDA, "0", "precision: bf16 (CUDA)"),
    ("auto", torch.device("mps"), "1", "precision: fp32 (mps)"),
    ("fp32", CPU, "1", "precision: fp32 (--precision fp32)"),
    ("fp32", CUDA, "0", "precision: fp32 (--precision fp32)"),
    ("bf16", CUDA, "0", "precision: bf16 (--precision bf16)"),
])
def test_auto_is_bf16_on_cuda_and_on_amx_cpus(monkeypatch, flag, device, amx, expected):
    monkeypatch.setenv("CIFAR_CPU_AMX", amx)
    assert describe(*pick_precision(flag, device)) == expected


def test_bf16_on_a_cpu_without_bf16_instructions_says_it_is_slow(monkeypatch):
    monkeypatch.setenv("CIFAR_CPU_AMX", "0")
    monkeypatch.setattr("precision.cpu_has", lambda feature: False)
    assert describe(*pick_precision("bf16", CPU)) == \
        "precision: bf16 (--precision bf16; no AMX or AVX512-BF16 here: slow)"


@pytest.mark.parametrize("override", [None, ""])
@pytest.mark.parametrize("amx", [True, False])
def test_without_the_override_amx_is_what_torch_detects(monkeypatch, override, amx):
    monkeypatch.delenv("CIFAR_CPU_AMX")
    if override is not None:              # set but empty counts as unset
        monkeypatch.setenv("CIFAR_CPU_AMX", override)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert cpu_has("amx_tile") is amx
    assert pick_precision("auto", CPU)[0] == (torch.bfloat16 if amx else None)


def test_bad_precision_and_override_are_one_line_errors(monkeypatch):
    with pytest.raises(ValueError, match="^unknown precision 'fp16'; choose from auto, fp32, "
                                         "bf16$"):
        pick_precision("fp16", CPU)
    with pytest.raises(ValueError, match="^--precision bf16 is not supported on mps$"):
        pick_precision("bf16", torch.device("mps"))
    monkeypatch.setenv("CIFAR_CPU_AMX", "yes")
    with pytest.raises(ValueError, match="^CIFAR_CPU_AMX must be 0 or 1, got 'yes'$"):
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
    """A fast94 run in bf16 (what auto picks on an AMX CPU) says so, trains to a finite loss,
    writes float32 weights, and inference reads them in either precision."""
    data = str(tmp_path / "data")
    write_cifar10(data, per_file=40, n_test=30)
    out = tmp_path / "run"
    result = run_main("train.py", "--preset", "fast94", "--epochs", "2", "--batch-size", "50",
                      "--device", "cpu", "--data-dir", data, "--out", out,
                      env={"CIFAR_CPU_AMX": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith("device: cpu, precision: bf16 (AMX)\n")
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


def test_conv_benchmark_in_bf16_compares_with_the_channels_last_native_net():
    result = run_main("benchmark.py", "--conv", "--device", "cpu", "--models", "seed",
                      "--batch-size", "2", "--warmup", "1", "--repeats", "1",
                      "--epoch-images", "4", "--precision", "bf16")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "cpu, bf16 autocast, channels_last (precision: bf16 (--precision bf16" in lines[0]
    assert "| network | epoch of 4 images, hand s | native (channels_last) s | ratio |" in lines
    assert any(row.startswith("| seed (batch 2) |") for row in lines)
    assert float(lines[-1].split()[-1]) > 0


def test_the_timing_study_refuses_bf16_in_one_line():
    result = run_main("benchmark.py", "--precision", "bf16")
    assert result.returncode == 2
    assert result.stderr == ("error: benchmark.py: --precision bf16 goes with --conv (the timing "
                             "study runs float32) (see --help)\n")
