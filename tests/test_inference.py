"""inference.py on the test set and on image files, text and JSON, and its refusals."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CPU_FP32, run_main, run_script
from data import CIFAR10_CLASSES
from data import load_cifar
from inference import DEFAULT_WEIGHTS, load_weights
from evaluate import predict_logits


def train_one_epoch(tmp_path_factory, name, *flags):
    """(weights path, data dir) from a real 1-epoch run on synthetic files."""
    from conftest import write_cifar10
    root = tmp_path_factory.mktemp(name)
    data = str(root / "data")
    write_cifar10(data)
    result = run_main("train.py", "--epochs", "1", *flags, *CPU_FP32,
                      "--data-dir", data, "--out", root / "run")
    assert result.returncode == 0, result.stderr
    return root / "run" / "weights.pt", data


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_one_epoch(tmp_path_factory, "inference", "--val-size", "20",
                           "--batch-size", "32")


def test_test_set_report_as_json(trained):
    weights, data = trained
    result = run_main("inference.py", "--weights", weights, "--data-dir", data, "--json",
                      *CPU_FP32)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report) == {"accuracy", "tta", "per_class", "confusion"} and report["tta"] == 0
    confusion = np.array(report["confusion"])
    assert confusion.shape == (10, 10) and confusion.sum() == 30
    assert confusion.sum(1).tolist() == [3] * 10            # 30 test images, labels cycle
    assert report["accuracy"] == pytest.approx(np.trace(confusion) / 30)
    assert list(report["per_class"]) == CIFAR10_CLASSES
    assert report["per_class"]["cat"] == pytest.approx(confusion[3, 3] / 3)
    # The same number train.py recorded when it evaluated the test set.
    recorded = torch.load(weights, weights_only=True)["test_accuracy"]
    assert report["accuracy"] == pytest.approx(recorded, abs=1e-6)


def test_test_set_report_as_text(trained):
    weights, data = trained
    result = run_main("inference.py", "--weights", weights, "--data-dir", data)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("test accuracy: ") and lines[0].endswith(" of 30 images")
    assert lines[1].split()[0] == "airplane" and lines[10].split()[0] == "truck"
    assert lines[11] == "confusion matrix (rows: true class, columns: predicted):"
    assert lines[12].split() == [c[:4] for c in CIFAR10_CLASSES]
    assert sum(sum(map(int, line.split()[1:])) for line in lines[13:23]) == 30


def test_image_files_top3_json_in_the_given_order(trained, tmp_path):
    weights, data = trained
    test_x = load_cifar(data, download=False)["test_x"]
    paths = []
    for i in (4, 0, 7):                        # 32x32 PNGs of test images: lossless round trip
        path = tmp_path / f"test_{i}.png"
        Image.fromarray(test_x[i].permute(1, 2, 0).numpy()).save(path)
        paths.append(str(path))
    big = tmp_path / "big.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (240, 320, 3), np.uint8)).convert(
        "L").save(big)                         # grayscale, not 32x32: converted and resized
    paths.append(str(big))

    result = run_main("inference.py", "--weights", weights, "--json", *paths)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert [r["path"] for r in out] == paths
    model, w = load_weights(str(weights))
    expected = predict_logits(model, test_x[[4, 0, 7]], torch.tensor(w["mean"]),
                              torch.tensor(w["std"])).softmax(1)
    for r, probs in zip(out, expected):
        assert len(r["top"]) == 3 and r["top"][0]["class"] == CIFAR10_CLASSES[probs.argmax()]
        assert r["top"][0]["prob"] == pytest.approx(probs.max().item(), abs=1e-6)
        assert [t["prob"] for t in r["top"]] == sorted((t["prob"] for t in r["top"]),
                                                      reverse=True)
    assert {t["class"] for t in out[-1]["top"]} <= set(CIFAR10_CLASSES)


def test_image_files_as_text(trained, tmp_path):
    weights, _ = trained
    path = tmp_path / "a.png"
    Image.new("RGBA", (50, 20), (200, 10, 10, 128)).save(path)
    result = run_main("inference.py", "--weights", weights, path)
    assert result.returncode == 0, result.stderr
    line, = result.stdout.splitlines()
    assert line.startswith(f"{path}: ") and len(line.split(", ")) == 3


def test_bad_inputs_are_one_line_errors(trained, tmp_path):
    weights, data = trained
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00" * 100)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weight": torch.zeros(3)}, foreign)
    bomb = tmp_path / "bomb.png"     # 196 million pixels: over PIL's limit, a few KB on disk
    Image.new("1", (14000, 14000)).save(bomb)
    mismatched = tmp_path / "mismatched.pt"
    w = torch.load(weights, weights_only=True)
    del w["state_dict"]["fc3.bias"]
    torch.save(w, mismatched)
    cases = [
        (["--weights", weights, tmp_path / "missing.png"],
         f"error: no such image file: {tmp_path / 'missing.png'}"),
        (["--weights", weights, text], f"error: not a readable image: {text} "
                                       f"(UnidentifiedImageError)"),
        (["--weights", weights, bomb], f"error: image too large: {bomb} (over 178,956,970 "
                                       f"pixels, PIL's limit against decompression bombs)"),
        (["--weights", tmp_path / "none.pt"], f"error: no weights file at {tmp_path / 'none.pt'}"),
        (["--weights", garbage], f"error: cannot read weights file {garbage}: UnpicklingError"),
        (["--weights", foreign], f"error: {foreign} is not a weights file of this repo "
                                 f"(expected keys model, dataset, classes, mean, std, state_dict)"),
        (["--weights", mismatched], f"error: {mismatched} does not fit model 'seed': "
                                    f"Missing key(s) in state_dict: \"fc3.bias\"."),
        (["--weights", weights, "--data-dir", tmp_path / "nowhere"],
         f"error: CIFAR-10 not found in {tmp_path / 'nowhere' / 'cifar-10-batches-py'} and the "
         f"download failed"),
        (["--jsn"], "error: inference.py: unrecognized arguments: --jsn (see --help)"),
    ]
    for args, message in cases:
        result = run_main("inference.py", *CPU_FP32, *args)
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr
        assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(message), \
            result.stderr
        assert result.stdout == ""


def test_bad_tta_level_is_one_line():
    result = run_main("inference.py", "--tta", "4")
    assert result.returncode == 2 and result.stdout == ""
    # Python 3.12 stopped quoting the choices in argparse's message; both forms are one line.
    message = ("error: inference.py: argument --tta: invalid choice: '4' (choose from {0}auto{0}, "
               "{0}0{0}, {0}1{0}, {0}2{0}) (see --help)")
    assert result.stderr.strip() in {message.format(""), message.format("'")}


def test_shipped_weights_are_the_default_and_load(tmp_path):
    path = tmp_path / "red.png"
    Image.new("RGB", (64, 48), (180, 30, 30)).save(path)
    result = run_script("inference.py", "--json", *CPU_FP32, path, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    top = json.loads(result.stdout)[0]["top"]
    assert len(top) == 3 and {t["class"] for t in top} <= set(CIFAR10_CLASSES)
    assert 0 < sum(t["prob"] for t in top) <= 1 + 1e-6


# The shipped weights on 8 seeded blocky images (4x4 random pixels, each an 8x8 block: exact
# uint8, no rounding that could differ between CPUs), float32 on the CPU: the top-1 class of
# each and the first one's logits, recorded from these files (their weight matrices stored in
# float16). Other weights (retrained, random, another file's) fail; fp32 rounding on another
# CPU does not (top-1 margins are >= 0.03).
SHIPPED_OUTPUTS = {
    "seed_cifar10": ([2, 0, 3, 0, 0, 0, 0, 0],
                     [1.844, -0.87, 3.698, -0.03, -1.676, 0.535, -1.056, -1.154, -0.343, -0.998]),
    "fast94_cifar10": ([2, 3, 3, 3, 8, 8, 3, 3],
                       [0.534, -0.38, 1.012, 0.238, -0.652, -0.407, -0.545, -0.644, 0.767,
                        0.076]),
    "fast95_cifar10": ([3, 3, 3, 3, 3, 3, 3, 3],
                       [-0.235, -0.391, -0.47, 1.862, -0.479, -0.351, -0.298, -0.531, 1.39,
                        -0.498]),
    "efficientnet_lite0_cifar10": ([0, 8, 8, 0, 8, 0, 8, 0],
                                   [1.849, -1.192, -1.459, 0.518, 0.265, 0.0, -0.219, -1.095,
                                    1.746, -1.188]),
}


@pytest.mark.parametrize("name", sorted(SHIPPED_OUTPUTS))
def test_shipped_weights_give_their_recorded_outputs(name):
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, 3, 4, 4), generator=gen, dtype=torch.uint8)
    images = images.repeat_interleave(8, 2).repeat_interleave(8, 3)
    model, weights = load_weights(os.path.join(os.path.dirname(DEFAULT_WEIGHTS), f"{name}.pt"))
    logits = predict_logits(model, images, torch.tensor(weights["mean"]),
                            torch.tensor(weights["std"]))
    classes, first = SHIPPED_OUTPUTS[name]
    assert logits.argmax(1).tolist() == classes
    assert logits[0].tolist() == pytest.approx(first, abs=1e-3)   # recorded to 3 decimals


@pytest.fixture(scope="module")
def trained_fast94(fast94_run):
    """conftest's fast94 run: its weights record TTA level 2."""
    _, out, data = fast94_run
    return out / "weights.pt", data


def test_tta_flag_reproduces_the_accuracies_recorded_by_train(trained_fast94):
    weights, data = trained_fast94
    recorded = torch.load(weights, weights_only=True)
    with_tta = run_main("inference.py", "--weights", weights, "--data-dir", data, "--json",
                        "--tta", *CPU_FP32)
    without = run_main("inference.py", "--weights", weights, "--data-dir", data, "--json",
                       *CPU_FP32)
    assert with_tta.returncode == 0 and without.returncode == 0, with_tta.stderr + without.stderr
    assert json.loads(with_tta.stdout)["tta"] == 2 and json.loads(without.stdout)["tta"] == 0
    # train.py records a float32 mean, inference.py a count ratio: equal to float32 precision.
    assert json.loads(with_tta.stdout)["accuracy"] == pytest.approx(recorded["test_accuracy"],
                                                                    abs=1e-6)
    assert json.loads(without.stdout)["accuracy"] == pytest.approx(
        recorded["test_accuracy_without_tta"], abs=1e-6)


def test_tta_on_image_files_averages_the_augmented_views(trained_fast94, tmp_path):
    weights, data = trained_fast94
    test_x = load_cifar(data, download=False)["test_x"]
    path = tmp_path / "test_3.png"
    Image.fromarray(test_x[3].permute(1, 2, 0).numpy()).save(path)
    result = run_main("inference.py", "--weights", weights, "--json", "--tta", "1", path)
    assert result.returncode == 0, result.stderr
    model, w = load_weights(str(weights))
    expected = predict_logits(model, test_x[[3]], torch.tensor(w["mean"]),
                              torch.tensor(w["std"]), tta=1).softmax(1)[0]
    top = json.loads(result.stdout)[0]["top"][0]
    assert top["class"] == CIFAR10_CLASSES[expected.argmax()]
    assert top["prob"] == pytest.approx(expected.max().item(), abs=1e-6)


def test_native_conv_gives_the_hand_written_convs_report(trained_fast94):
    weights, data = trained_fast94
    reports = [run_main("inference.py", "--weights", weights, "--data-dir", data, "--json",
                        *CPU_FP32, "--conv", conv) for conv in ("hand", "native")]
    assert all(r.returncode == 0 for r in reports), [r.stderr for r in reports]
    hand, native = (json.loads(r.stdout) for r in reports)
    assert hand["confusion"] == native["confusion"]      # every prediction the same
