"""benchmark.py and plot.py, run for real on small inputs."""
import json

import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from benchmark import fastest_line, markdown, ratios_to_first
from conv_benchmark import conv_layers, conv_shapes, fmt_shape, network
from timing import random_epoch, train_epoch_seconds
from conftest import run_main, run_script
from model import MODELS
from pretrained import BACKBONES


def test_benchmark_prints_markdown_tables_with_ratios(tmp_path):
    result = run_script("benchmark.py", "--device", "cpu", "--batch-size", "4", "--warmup", "1",
                        "--repeats", "2", "--variants", "torch.jit.trace,torch.jit.script",
                        "--epoch-images", "16", "--json", tmp_path / "ratios.json")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    forward = [row for row in lines if row.startswith(("| torch.jit", "| eager"))]
    assert [row.split("|")[1].strip() for row in forward] == \
        ["eager", "torch.jit.trace", "torch.jit.script", "eager"]
    assert forward[0].split("|")[3].strip() == "1.00"        # eager is its own baseline
    assert all(float(row.split("|")[3]) > 0 for row in forward)  # every variant ran
    assert "one training epoch of 16 images" in result.stdout
    assert "Warning" not in result.stderr                     # TorchScript's are silenced
    assert lines[-1].startswith("fastest forward: ")
    ratios = json.loads((tmp_path / "ratios.json").read_text())   # the same ratios, unrounded
    assert [f"{ratios['forward'][row.split('|')[1].strip()]:.2f}" for row in forward[:3]] == \
        [row.split("|")[3].strip() for row in forward[:3]]
    assert list(ratios["epoch"]) == ["eager"] and ratios["epoch"]["eager"] == 1


def test_a_study_whose_eager_variant_failed_still_prints_its_table():
    rows = [("eager", None, None, "RuntimeError: out of memory"),
            ("torch.compile", 0.25, 9.5, ""), ("torch.jit.trace", 0.5, 1.0, "")]
    assert markdown(rows, 1e3, "ms", None).splitlines()[2:] == [
        "| eager | n/a | n/a | n/a | RuntimeError: out of memory |",
        "| torch.compile | 250.00 | n/a | 9.50 |  |",
        "| torch.jit.trace | 500.00 | n/a | 1.00 |  |"]
    assert fastest_line(rows) == "fastest forward: torch.compile (eager failed)"
    assert ratios_to_first(rows) == {"eager": None, "torch.compile": None,
                                     "torch.jit.trace": None}
    assert fastest_line(rows[:1]) == "fastest forward: none ran"


def test_conv_benchmark_times_every_layer_shape_and_ends_with_the_geomeans(tmp_path):
    result = run_main("benchmark.py", "--conv", "--device", "cpu", "--models", "seed",
                      "--batch-size", "2", "--warmup", "1", "--repeats", "1",
                      "--epoch-images", "4", "--step-models", "seed,fast94",
                      "--step-batch", "2", "--step-repeats", "1",
                      "--precision", "fp32", "--json", tmp_path / "ratios.json")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    layers = [row.split("|")[1].strip() for row in lines if row.startswith("| seed.")]
    assert layers == ["seed.conv1", "seed.conv2", "seed.conv3"]
    assert any(row.startswith("| seed (batch 2) |") for row in lines)
    # Whole-network steps: hand-written in both layouts against native channels_last.
    steps = [row.split(" | ") for row in lines if row.startswith(("| seed | ", "| fast94 | "))]
    assert [(row[0], row[1], row[2]) for row in steps] == [
        ("| seed", "fp32 (--precision fp32)", "2"), ("| fast94", "fp32 (--precision fp32)", "2")]
    ratios = json.loads((tmp_path / "ratios.json").read_text())["steps"]
    assert list(ratios) == ["seed fp32", "fast94 fp32"]
    for row, (hand, hand_cl) in zip(steps, (r.values() for r in ratios.values())):
        assert row[6:] == [f"{hand:.2f}", f"{hand_cl:.2f} |"]
    assert lines[-2].startswith("geomean inference ratio (hand/native): ")
    assert lines[-1].startswith("geomean train-step ratio (hand/native): ")
    assert float(lines[-1].split()[-1]) > 0


def test_conv_benchmark_times_each_distinct_layer_shape_once():
    # fast94: the whitening conv and the 3x3 convs (without bias) of the three groups, in
    # order; the first conv of the last group has the shape of the one before it.
    shapes = conv_shapes(["fast94"], 2, None)
    assert [label for label, *_ in shapes] == ["fast94.whiten"] + [
        f"fast94.groups.{name}" for name in ("0.convs.0", "0.convs.1", "1.convs.0",
                                             "1.convs.1", "2.convs.1")]


def test_conv_benchmark_finds_a_pretrained_backbones_depthwise_and_strided_convs():
    # In process: a timed run over its ~40 shapes measures each one's memory in a child
    # process, minutes on this CPU.
    layers = conv_layers("efficientnet_lite0", 2, image_size=32)
    shapes = [fmt_shape(kwargs, in_shape) for _, _, kwargs, in_shape, _ in layers]
    assert shapes[0] == "2x3x32x32 -> 32, 3x3 s2"                 # the TF 'SAME' stem
    assert layers[0][2]["padding"] == (1, 1)                      # same output size as TF's
    assert shapes[1] == "2x32x16x16 -> 32, 3x3 g32"               # a depthwise conv
    assert any(" 5x5 s2 g" in shape for shape in shapes)
    assert len(layers) == sum(isinstance(m, torch.nn.Conv2d) for m in
                              network("efficientnet_lite0", "native", 32).modules())
    seconds, _ = train_epoch_seconds(network("efficientnet_lite0", "hand", 32),
                                     *random_epoch(4, torch.device("cpu")), 2,
                                     torch.device("cpu"))
    assert seconds > 0


def test_network_names_are_one_network_each():
    """model.py's networks and the pretrained backbones share no name: resnet18 is the CIFAR
    ResNet-18 (3x3 stem at 32x32), tv_resnet18 torchvision's (7x7 stem, stride 2)."""
    assert not set(MODELS) & set(BACKBONES)
    layers = conv_layers("resnet18", 2)
    assert fmt_shape(layers[0][2], layers[0][3]) == "2x3x32x32 -> 64, 3x3"
    layers = conv_layers("tv_resnet18", 2, image_size=64)
    assert fmt_shape(layers[0][2], layers[0][3]) == "2x3x64x64 -> 64, 7x7 s2"


def test_benchmark_rejects_unknown_variant():
    result = run_main("benchmark.py", "--variants", "onnx")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: benchmark.py: unknown variants: onnx (see --help)"


def test_plot_draws_a_validation_run_from_its_event_files(tmp_path):
    run = tmp_path / "run"
    writer = SummaryWriter(str(run))   # what a validation run logs per epoch
    for epoch, acc in enumerate([0.3, 0.5, 0.6], start=1):
        writer.add_scalar("val/accuracy", acc, epoch)
        writer.add_scalar("train/accuracy", acc - 0.1, epoch)
        writer.add_scalar("train/loss", 2 - acc, epoch)
        writer.add_scalar("lr", 0.1 / epoch, epoch)
    writer.close()
    out = tmp_path / "docs"
    result = run_script("plot.py", run, "--out-dir", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (f"wrote {out / 'accuracy.png'}, {out / 'loss_lr.png'}: "
                                     f"best held-out accuracy 0.6000 over 3 evaluations")
    for name, size in (("accuracy.png", (840, 504)), ("loss_lr.png", (1200, 456))):
        with Image.open(out / name) as img:
            assert img.format == "PNG" and img.size == size, name


def test_plot_draws_a_fast94_run_and_compares_runs(fast94_run, resumed_fast94_run, tmp_path):
    _, run, _ = fast94_run
    result = run_main("plot.py", run, "--out-dir", tmp_path)
    assert result.returncode == 0, result.stderr
    names = ("accuracy.png", "loss_lr.png", "confusion_matrix.png")
    events = EventAccumulator(str(run))
    events.Reload()
    best = max(e.value for e in events.Scalars("test/accuracy"))
    assert result.stdout.strip() == (f"wrote {', '.join(str(tmp_path / n) for n in names)}: "
                                     f"best held-out accuracy {best:.4f} over 4 evaluations")
    for name in names:
        with Image.open(tmp_path / name) as img:
            assert img.format == "PNG", name

    result = run_main("plot.py", run, resumed_fast94_run, "--out-dir", tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote {tmp_path / 'comparison.png'}: 2 runs compared"
    with Image.open(tmp_path / "comparison.png") as img:
        assert img.format == "PNG" and img.size == (1320, 504)


def test_plot_refuses_a_folder_without_training_scalars(tmp_path):
    result = run_main("plot.py", tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: no training scalars in the TensorBoard events "
                                     f"of {tmp_path}")
    result = run_main("plot.py", tmp_path / "missing")
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: no run folder at {tmp_path / 'missing'}"
