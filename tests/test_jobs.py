"""jobs.py: the commands, estimates and results of reproduce.py's jobs."""
import json
import os

import pytest
import torch

import jobs
from conftest import CPU_FP32, run_main
from run_setup import get_args

TARGET = jobs.Target(device="cpu", precision="fp32", data_dir="data", out="out")


def job(name):
    return next(j for j in jobs.JOBS if j["name"] == name)


def costs_of(step, first=None, device="cuda", images=(50000, 10000)):
    """Costs as reproduce.calibrate measures them: a 5 s start, every network `step` seconds
    a step."""
    nets = {net for j in jobs.JOBS for flags in j["ladder"] for net, _ in jobs.networks(j, flags)}
    return jobs.Costs(device=device, start=5.0, images=images, step=dict.fromkeys(nets, step),
                      first=dict.fromkeys(nets, first or step))


def test_every_job_has_a_command_its_script_accepts():
    for j in jobs.JOBS:
        for flags in j["ladder"]:
            argv = jobs.command(j, flags, TARGET)
            assert os.path.isfile(argv[0]) and argv[-4:] == CPU_FP32, argv
            script = os.path.basename(argv[0])
            parsed = run_main(script, *argv[1:], "--help")    # every flag known, no run
            assert parsed.returncode == 0 and parsed.stderr == "", (argv, parsed.stderr)
            if script == "train.py":                          # and every check of them
                get_args(argv[1:])


def test_every_job_runs_at_the_precision_its_steps_were_timed_in():
    for j in jobs.JOBS:
        argv = jobs.command(j, j["ladder"][0], TARGET._replace(precision="bf16"))
        assert argv[-2:] == ["--precision", "bf16"], argv


def test_a_training_estimate_is_its_steps_evaluation_and_start():
    costs = costs_of(0.01, first=1.01)
    # fast94: 50,000 images / 1024 = 48 steps x 12 epochs; the test set with TTA 2 (6 forward
    # passes an image) and without (1), a forward a third of a step; a 1 s warm-up; 5 s start.
    one_run = 576 * 0.01 + 10000 * 7 * 0.01 / 1024 / 3 + 1.0
    assert jobs.estimate(job("fast94"), {"preset": "fast94", "runs": 5}, costs) == \
        pytest.approx(5 + 5 * one_run)
    # seed: 45,000 / 128 = 351 steps x 25 epochs, 5,000 validation images each epoch.
    assert jobs.estimate(job("seed"), {"preset": "seed"}, costs) == pytest.approx(
        5 + 8775 * 0.01 + (5000 * 25 + 10000) * 0.01 / 128 / 3 + 1.0)


def test_estimates_grow_with_the_size_of_a_job():
    costs = costs_of(0.05, device="cpu")
    for j in jobs.JOBS:
        estimates = [jobs.estimate(j, flags, costs) for flags in j["ladder"]]
        assert estimates == sorted(estimates, reverse=True) and estimates[-1] > 5, j["name"]


def test_a_rung_whose_networks_were_not_timed_has_no_estimate():
    costs = costs_of(0.05, device="cpu")
    del costs.step[("fast94", 32)]
    conv = job("conv")
    assert [jobs.estimate(conv, flags, costs) is None for flags in conv["ladder"]] == \
        [True, True, False]


def test_a_training_row_reports_mean_and_std_over_runs(tmp_path, cifar10_dir):
    out = tmp_path / "runs"
    result = run_main("train.py", "--preset", "seed", "--epochs", "1", "--batch-size", "32",
                      "--val-size", "20", "--runs", "2", "--data-dir", cifar10_dir, "--out", out,
                      *CPU_FP32)
    assert result.returncode == 0, result.stderr
    runs = [torch.load(out / f"run{i}" / "weights.pt", weights_only=True) for i in range(2)]
    metric, value, text = jobs.read_result(job("seed"), {"preset": "seed"}, str(out), "")
    accuracies = torch.tensor([r["test_accuracy"] for r in runs], dtype=torch.float64)
    assert metric == "test accuracy" and value == pytest.approx(accuracies.mean().item())
    assert text == (f"{100 * accuracies.mean():.2f} ± {100 * accuracies.std():.2f} %, 1 epoch, "
                    f"2 runs (mean ± std); "
                    f"{sum(r['train_seconds'] for r in runs) / 2:.1f} s a run (training + test "
                    f"evaluation)")
    assert all(r["epochs"] == 1 and r["train_seconds"] > 0 for r in runs)


def test_a_fine_tune_row_says_its_resolution(tmp_path):
    torch.save({"test_accuracy": 0.8431, "tta": 1, "test_accuracy_without_tta": 0.8326,
                "epochs": 1, "image_size": 128, "train_seconds": 2640.0},
               tmp_path / "weights.pt")
    finetune = job("finetune")
    metric, value, text = jobs.read_result(finetune, finetune["ladder"][-1], str(tmp_path), "")
    assert (metric, value) == ("test accuracy with TTA", 0.8431)
    assert text == ("84.31 % with TTA (83.26 % without), 1 epoch at 128 px; 2640.0 s a run "
                    "(training + test evaluation)")


@pytest.mark.slow    # over 10 s on 2 cores: ./test.sh -m slow
def test_a_conv_row_is_the_benchmarks_geomeans(tmp_path):
    flags = {"models": "seed", "repeats": 1, "epoch_images": 0, "step_batch": 2}
    argv = jobs.command(job("conv"), flags, TARGET._replace(out=str(tmp_path)))
    assert argv[argv.index("--step-batch") + 1] == "2"
    out = tmp_path / "jobs" / "conv"
    out.mkdir(parents=True)
    result = run_main("benchmark.py", *argv[1:], "--batch-size", "2", "--step-repeats", "1",
                      "--warmup", "1")
    assert result.returncode == 0, result.stderr
    ratios = json.loads((out / "ratios.json").read_text())
    metric, value, text = jobs.read_result(job("conv"), flags, str(out), "")
    assert value == ratios["train"] and ratios["layers"] == 3 and ratios["networks"] == {}
    assert result.stdout.splitlines()[-1] == \
        f"geomean train-step ratio (hand/native): {ratios['train']:.2f}"
    worst = max((v, layout) for layout, v in ratios["steps"]["seed fp32"].items())
    assert list(ratios["steps"]) == ["seed fp32"]
    assert text == (f"{ratios['train']:.2f}x training step, {ratios['infer']:.2f}x inference "
                    f"(geomean of 3 layer shapes of seed, float32); whole-network training "
                    f"steps at batch 2, hand / native channels_last: at most {worst[0]:.2f}x "
                    f"(seed fp32, {worst[1]})")


def test_a_weights_row_is_inferences_accuracy(tmp_path, cifar10_dir):
    flags = {"weights": "fast94_cifar10.pt", "tta": 2}
    argv = jobs.command(job("weights-fast94"), flags, TARGET._replace(data_dir=cifar10_dir))
    result = run_main("inference.py", *argv[1:])
    assert result.returncode == 0, result.stderr
    metric, value, text = jobs.read_result(job("weights-fast94"), flags, str(tmp_path),
                                           result.stdout)
    accuracy = json.loads(result.stdout)["accuracy"]
    assert (metric, value) == ("test accuracy with TTA", accuracy)
    assert text == f"{100 * accuracy:.2f} % with TTA (mirror + 1-pixel translations)"
