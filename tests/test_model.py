"""The networks: structure, the hand-written and native convs giving the same function, the
whitening layer, and build_model's errors."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conv import Conv2d
from gpu_check import rel_err
from model import MODELS, SeedNet, build_model, dirac_conv, whitening_filters


def test_seed_net_structure():
    model = build_model("seed", 10)
    convs = [m for m in model.modules() if isinstance(m, Conv2d)]
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(convs) == 3 and not any(isinstance(m, nn.Conv2d) for m in model.modules())
    assert len(pools) == 1 and pools[0].kernel_size == 2      # one pool module, used thrice
    assert len([m for m in model.modules() if isinstance(m, nn.Dropout)]) == 2
    assert [m.out_features for m in model.modules() if isinstance(m, nn.Linear)] == [512, 256, 10]
    assert [c.out_channels for c in convs] == [64, 128, 256]
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert build_model("seed", 100).fc3.out_features == 100


def test_seed_net_native_switch_gives_the_same_function():
    torch.manual_seed(0)
    hand = build_model("seed", 10).double().eval()
    native = build_model("seed", 10, conv="native").double().eval()
    native.load_state_dict(hand.state_dict())
    assert isinstance(native.conv1, nn.Conv2d)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    assert rel_err(hand(x), native(x)) < 1e-10


def test_build_model_rejects_unknown_names():
    assert "seed" in MODELS
    with pytest.raises(ValueError, match="unknown model 'nope'; choose from"):
        build_model("nope")
    with pytest.raises(ValueError, match="unknown conv 'fast'"):
        build_model("seed", conv="fast")
    assert isinstance(SeedNet(), nn.Module)


# ----------------------------------------------------------------------------------------------
# Fast networks: whitening, dirac init, TTA

def correlated_images(n=200, seed=0):
    """Images whose pixels are correlated across channels and neighbours (like photos)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 1, 33, 33, generator=gen, dtype=torch.float64)
    smooth = (base[:, :, 1:, 1:] + base[:, :, :-1, :-1]) / 2
    return smooth.repeat(1, 3, 1, 1) + 0.3 * torch.randn(n, 3, 32, 32, generator=gen,
                                                         dtype=torch.float64)


def test_whitening_filters_make_patch_features_uncorrelated_with_unit_variance():
    images = correlated_images()
    filters = whitening_filters(images, kernel_size=2, eps=0.0)
    assert filters.shape == (24, 3, 2, 2) and filters.dtype == torch.float64
    assert torch.equal(filters[12:], -filters[:12])
    features = F.conv2d(images, filters[:12]).permute(0, 2, 3, 1).reshape(-1, 12)
    covariance = features.T @ features / len(features)
    assert (covariance - torch.eye(12, dtype=torch.float64)).abs().max() < 1e-8


def test_whitening_eps_caps_the_gain_of_weak_directions():
    images = correlated_images()
    plain = whitening_filters(images, eps=0.0)[:12].flatten(1).norm(dim=1)
    capped = whitening_filters(images, eps=1.0)[:12].flatten(1).norm(dim=1)
    assert (capped < plain).all() and plain[-1] > plain[0]   # the weakest direction is last


def test_fast_net_whitening_layer_is_set_and_frozen():
    net = build_model("fast94")
    images = correlated_images(50).float()
    net.init_whitening(images)
    assert torch.allclose(net.whiten.weight, whitening_filters(images), atol=1e-6)
    assert not net.whiten.weight.requires_grad and net.whiten.bias.requires_grad


def test_dirac_conv_passes_its_input_through_in_the_first_channels():
    layer = dirac_conv(Conv2d, 4, 6)
    x = torch.randn(2, 4, 7, 7)
    assert torch.equal(layer(x)[:, :4], x) and layer.bias is None


@pytest.mark.parametrize("name, convs", [("fast94", 7), ("fast95", 7), ("fast96", 10),
                                         ("resnet18", 20)])   # 17 3x3, 3 strided 1x1
def test_fast_nets_hand_and_native_are_the_same_function(name, convs):
    torch.manual_seed(0)
    hand = build_model(name, 10).double().eval()
    torch.manual_seed(0)
    native = build_model(name, 10, conv="native").double().eval()
    assert sum(isinstance(m, Conv2d) for m in hand.modules()) == convs   # whitening included
    assert not any(isinstance(m, nn.Conv2d) for m in hand.modules())
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    out = hand(x)
    assert out.shape == (3, 10)
    assert (out - native(x)).abs().max() <= 1e-10 * native(x).abs().max()


def test_fast_net_batchnorm_scales_are_frozen_at_one():
    norms = [m for m in build_model("fast94").modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 6
    assert all(not m.weight.requires_grad and m.bias.requires_grad for m in norms)
    assert all(m.momentum == 0.4 and m.eps == 1e-12 for m in norms)
