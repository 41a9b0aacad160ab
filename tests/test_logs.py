"""What a training run leaves in TensorBoard (logs.py), read back from its event files."""
import glob
import os

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

import logs

PNG = b"\x89PNG\r\n\x1a\n"


def events_of(run_dir):
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0,
                                                           "tensors": 0})
    events.Reload()
    return events


def written_steps(run_dir, tag):
    """Every step at which `tag` was written, over all event files of a run, repeats kept."""
    steps = []
    for path in sorted(glob.glob(os.path.join(run_dir, "events.*"))):
        for event in EventFileLoader(path).Load():
            steps += [event.step for value in event.summary.value if value.tag == tag]
    return sorted(steps)


def test_a_fast94_run_leaves_its_curves_hparams_figures_and_card(fast94_run):
    """FAST94_RUN: 4 epochs of 4 steps, no validation split, 30 test images (the test curve
    every epoch: logs.held_out_every(30, 200) == 1)."""
    _, out, _ = fast94_run
    events = events_of(out)
    weights = torch.load(out / "weights.pt", weights_only=True)
    scalars = events.Tags()["scalars"]
    assert set(scalars) == {"step/loss", "step/lr", "train/loss", "train/accuracy", "lr",
                            "test/loss", "test/accuracy", "test/accuracy_tta",
                            "hparams/test_accuracy", "hparams/test_accuracy_without_tta",
                            "hparams/train_seconds"}
    assert [e.step for e in events.Scalars("step/loss")] == list(range(1, 17))
    # The epoch's LR is its last step's.
    step_lr = {e.step: e.value for e in events.Scalars("step/lr")}
    assert [step_lr[4 * e.step] for e in events.Scalars("lr")] == [
        e.value for e in events.Scalars("lr")]
    assert [e.step for e in events.Scalars("test/loss")] == [1, 2, 3, 4]
    test_curve = events.Scalars("test/accuracy")
    assert [e.step for e in test_curve] == [1, 2, 3, 4]     # the last point: the result
    assert test_curve[-1].value == pytest.approx(weights["test_accuracy_without_tta"])
    assert events.Scalars("test/accuracy_tta")[-1].value == pytest.approx(
        weights["test_accuracy"])
    assert events.Scalars("hparams/train_seconds")[-1].value == pytest.approx(
        weights["train_seconds"], rel=1e-6)

    start = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    assert b"fast94" in start and b"preset" in start and b"label_smoothing" in start

    for tag in ("test/confusion_matrix", "test/misclassified"):
        (image,) = events.Images(tag)
        assert image.step == 4 and image.encoded_image_string.startswith(PNG), tag

    (card,) = events.Tensors("run/text_summary")
    text = card.tensor_proto.string_val[0].decode()
    assert "| command | `python src/train.py --preset fast94 --epochs 4 --batch-size 50" in text
    assert "| precision | fp32 (--precision fp32) |" in text and "| seed | 0 |" in text
    assert f"| torch | {torch.__version__} |" in text and "| steps per epoch | 4 |" in text
    assert "| commit | " in text and "| machine | " in text


def test_a_killed_and_resumed_run_writes_every_step_once(resumed_fast94_run):
    out = resumed_fast94_run
    assert len(glob.glob(os.path.join(out, "events.*"))) == 2     # one per process
    assert written_steps(out, "step/loss") == list(range(1, 17))
    assert written_steps(out, "train/loss") == [1, 2, 3, 4]
    assert written_steps(out, "test/accuracy") == [1, 2, 3, 4]
    assert written_steps(out, "run/text_summary") == [0, 4]       # a card per start


@pytest.mark.parametrize("n_test, n_train, every", [(10_000, 50_000, 2), (10_000, 45_000, 2),
                                                    (30, 200, 1), (5_000, 1_000, 34)])
def test_the_test_curve_costs_at_most_five_percent_by_its_estimate(n_test, n_train, every):
    assert logs.held_out_every(n_test, n_train) == every
    assert n_test * logs.FORWARD_SHARE / every <= 0.05 * n_train


def test_confusion_matrix_counts_true_classes_by_row():
    labels = torch.tensor([0, 1, 2, 2, 2])
    predicted = torch.tensor([0, 2, 2, 1, 2])
    assert logs.confusion_matrix(labels, predicted, 3).tolist() == [[1, 0, 0], [0, 0, 1],
                                                                    [0, 1, 2]]


def test_hparams_are_values_tensorboard_takes():
    flags = {"lr": 0.1, "epochs": 3, "preset": "seed", "out": None, "tta": 0,
             "widths": [64, 128], "flag": True}
    assert logs.hparams(flags) == {"lr": 0.1, "epochs": 3, "preset": "seed", "out": "none",
                                  "tta": 0, "widths": "[64, 128]", "flag": True}
