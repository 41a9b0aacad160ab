"""Test-time augmentation's weights and views, and predict_logits' checks."""
import pytest
import torch
import torch.nn.functional as F

from evaluate import predict_logits, tta_logits
from model import build_model




def recording_model(calls):
    """A 'model' that records each batch it sees and answers with the call's index one-hot, so
    that TTA's output reveals the weight it gave each view."""
    def model(x):
        calls.append(x.clone())
        return F.one_hot(torch.tensor(len(calls) - 1), 6).double().expand(len(x), 6)
    return model


def test_tta_level_two_weights_mirror_and_one_pixel_shifts():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float64).view(2, 3, 5, 5)
    calls = []
    out = tta_logits(recording_model(calls), x, level=2)
    assert out[0].tolist() == [0.25, 0.25, 0.125, 0.125, 0.125, 0.125]
    assert torch.equal(calls[0], x) and torch.equal(calls[1], x.flip(3))
    up_left, down_right = calls[2], calls[4]
    assert torch.equal(calls[3], up_left.flip(3)) and torch.equal(calls[5], down_right.flip(3))
    assert torch.equal(up_left[:, :, 1:, 1:], x[:, :, :-1, :-1])       # shifted by one pixel
    assert torch.equal(up_left[:, :, 0, 1:], x[:, :, 1, :-1])          # reflected border
    assert torch.equal(down_right[:, :, :-1, :-1], x[:, :, 1:, 1:])


def test_tta_levels_zero_and_one():
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    calls = []
    assert tta_logits(recording_model(calls), x, 0)[0].tolist() == [1, 0, 0, 0, 0, 0]
    calls = []
    assert tta_logits(recording_model(calls), x, 1)[0].tolist() == [0.5, 0.5, 0, 0, 0, 0]


def test_predict_logits_refuses_an_unknown_tta_level():
    with pytest.raises(ValueError, match=r"^TTA level must be one of \[0, 1, 2\], got 3$"):
        predict_logits(build_model("seed"), torch.zeros(1, 3, 32, 32, dtype=torch.uint8),
                       torch.zeros(3), torch.ones(3), tta=3)
