"""benchmark.py and plot.py, run for real on small inputs."""
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

from conftest import run_script


def test_benchmark_prints_markdown_tables_with_ratios():
    result = run_script("benchmark.py", "--device", "cpu", "--batch-size", "4", "--warmup", "1",
                        "--repeats", "2", "--variants", "torch.jit.trace,torch.jit.script",
                        "--epoch-images", "16")
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


def test_benchmark_rejects_unknown_variant():
    result = run_script("benchmark.py", "--variants", "onnx")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: benchmark.py: unknown variants: onnx (see --help)"


def test_plot_draws_validation_accuracy_from_event_files(tmp_path):
    run = tmp_path / "run"
    writer = SummaryWriter(str(run))
    for epoch, acc in enumerate([0.3, 0.5, 0.6], start=1):
        writer.add_scalar("val/accuracy", acc, epoch)
        writer.add_scalar("train/accuracy", acc - 0.1, epoch)
    writer.close()
    out = tmp_path / "docs" / "val.png"
    result = run_script("plot.py", run, "--out", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote {out}: 3 epochs, best validation accuracy 0.6000"
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (840, 504)


def test_plot_refuses_a_folder_without_accuracy(tmp_path):
    result = run_script("plot.py", tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: no 'val/accuracy' scalars in the TensorBoard "
                                     f"events of {tmp_path}")
