"""The hand-written Conv2d against torch.nn.Conv2d, and the networks built from it."""
import random
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from model import (MODELS, Conv2d, SeedNet, _conv_source, _images_per_chunk, build_model,
                   conv2d_unfold, conv2d_unfold_autograd, dirac_conv, predict_logits, tta_logits,
                   whitening_filters)

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}  # max |a - b| / max |b|


def random_configs(count, seed=0):
    """Conv shapes drawn at random: stride 1-2, padding int/pair/'same'/'valid', dilation,
    groups, non-square kernels, batch 1 and odd sizes."""
    rnd = random.Random(seed)
    configs = []
    while len(configs) < count:
        groups = rnd.choice([1, 1, 2, 3])
        cin, cout = groups * rnd.randint(1, 4), groups * rnd.randint(1, 4)
        k = (rnd.randint(1, 4), rnd.randint(1, 4))
        stride = rnd.choice([1, 2, (1, 2), (2, 1)])
        dilation = rnd.choice([1, 1, 2, (1, 2)])
        padding = rnd.choice([0, 1, (2, 1), "same", "valid"])
        if padding == "same":
            stride = 1
        h, w = rnd.randint(7, 13), rnd.randint(7, 13)  # >= the largest dilated kernel
        configs.append(dict(cin=cin, cout=cout, k=k, stride=stride, padding=padding,
                            dilation=dilation, groups=groups, n=rnd.choice([1, 2, 3]),
                            h=h, w=w, bias=rnd.random() < 0.8))
    return configs


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def traced_autograd_forward(conv, x):
    """The F.unfold variant that `Conv2d` runs under TorchScript, called directly."""
    return conv2d_unfold_autograd(x, conv.weight, conv.bias, conv.stride, conv.pads,
                                  conv.dilation, conv.groups)


def compare(cfg, dtype, forward=Conv2d.forward):
    ref = nn.Conv2d(cfg["cin"], cfg["cout"], cfg["k"], cfg["stride"], cfg["padding"],
                    cfg["dilation"], cfg["groups"], cfg["bias"]).to(dtype)
    hand = Conv2d(cfg["cin"], cfg["cout"], cfg["k"], cfg["stride"], cfg["padding"],
                  cfg["dilation"], cfg["groups"], cfg["bias"]).to(dtype)
    hand.load_state_dict(ref.state_dict())
    x_ref = torch.randn(cfg["n"], cfg["cin"], cfg["h"], cfg["w"], dtype=dtype, requires_grad=True)
    x_hand = x_ref.detach().clone().requires_grad_()
    y_ref, y_hand = ref(x_ref), forward(hand, x_hand)
    assert y_hand.shape == y_ref.shape
    grad = torch.randn_like(y_ref)
    y_ref.backward(grad)
    y_hand.backward(grad)
    errors = {"output": rel_err(y_hand, y_ref), "grad_input": rel_err(x_hand.grad, x_ref.grad),
              "grad_weight": rel_err(hand.weight.grad, ref.weight.grad)}
    if cfg["bias"]:
        errors["grad_bias"] = rel_err(hand.bias.grad, ref.bias.grad)
    return errors


@pytest.mark.parametrize("forward", [Conv2d.forward, traced_autograd_forward],
                         ids=["unfold_matmul_function", "unfold_autograd"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("cfg", random_configs(40), ids=lambda c: (
    "{cin}-{cout}-k{k}-s{stride}-p{padding}-d{dilation}-g{groups}-n{n}-{h}x{w}".format(**c)))
def test_conv_matches_nn_conv2d(cfg, dtype, forward):
    torch.manual_seed(1)
    errors = compare(cfg, dtype, forward)
    assert max(errors.values()) < TOL[dtype], errors


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_conv_matches_on_seed_shapes(dtype):
    """The three layer shapes of the seed net, at a real batch size."""
    torch.manual_seed(2)
    for cin, cout, size in [(3, 64, 32), (64, 128, 16), (128, 256, 8)]:
        cfg = dict(cin=cin, cout=cout, k=3, stride=1, padding=1, dilation=1, groups=1, n=16,
                   h=size, w=size, bias=True)
        errors = compare(cfg, dtype)
        assert max(errors.values()) < TOL[dtype], (cin, cout, errors)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kernel,stride,pads,dilation,bias", [
    (3, 1, (1, 1, 1, 1), 1, False),        # EfficientNet's stride-1 depthwise conv
    (3, 2, (0, 1, 0, 1), 1, False),        # TensorFlow 'SAME' at stride 2: odd pixel right
    (5, 2, (1, 2, 1, 2), 1, True),
    ((3, 2), (2, 1), (2, 0, 1, 3), (1, 2), True),
    (3, 1, (0, 0, 0, 0), 2, True),
])
def test_depthwise_conv_matches_nn_conv2d(kernel, stride, pads, dilation, bias, dtype):
    """groups = channels in = channels out runs the elementwise-taps formulation."""
    torch.manual_seed(5)
    c = 6
    ref = nn.Conv2d(c, c, kernel, stride, 0, dilation, groups=c, bias=bias).to(dtype)
    x_ref = torch.randn(3, c, 11, 9, dtype=dtype, requires_grad=True)
    x_hand = x_ref.detach().clone().requires_grad_()
    weight = ref.weight.detach().clone().requires_grad_()
    b = ref.bias.detach().clone().requires_grad_() if bias else None
    y_ref = ref(F.pad(x_ref, pads))
    y_hand = conv2d_unfold(x_hand, weight, b, stride, pads, dilation, groups=c)
    grad = torch.randn_like(y_ref)
    y_ref.backward(grad)
    y_hand.backward(grad)
    errors = {"output": rel_err(y_hand, y_ref), "grad_input": rel_err(x_hand.grad, x_ref.grad),
              "grad_weight": rel_err(weight.grad, ref.weight.grad)}
    if bias:
        errors["grad_bias"] = rel_err(b.grad, ref.bias.grad)
    assert max(errors.values()) < TOL[dtype], errors


def test_torchscript_runs_the_traced_variant_with_the_same_result():
    torch.manual_seed(4)
    conv = Conv2d(4, 6, (3, 2), stride=2, padding=(1, 2), groups=2).double()
    with warnings.catch_warnings():                 # TorchScript is deprecated, still works
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(conv)
    x = torch.randn(2, 4, 11, 10, dtype=torch.float64)
    assert rel_err(scripted(x), conv(x)) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("size,k,padding,dilation,groups", [
    (3, 3, 1, 1, 1),      # fast94's last maps: 32 of 81 products would read padding
    (7, 3, 1, 1, 2),      # 18 %
    (1, 3, 1, 1, 1),      # a 1x1 map: only the centre tap reads the input
    (2, 1, 1, 1, 1),      # the outer output rows and columns read nothing but padding
    (1, 2, 2, 3, 1),      # the whole output reads nothing but padding (bias alone)
    (5, 3, 2, 2, 1),      # dilated
    (4, (3, 1), (1, 0), 1, 1),
])
def test_conv_matches_where_padding_taps_are_skipped(size, k, padding, dilation, groups, dtype):
    """Small maps split the output into regions that skip the taps landing on padding; the
    split must be taken here, and must not show in outputs or gradients."""
    cfg = dict(cin=4, cout=6, k=k, stride=1, padding=padding, dilation=dilation, groups=groups,
               n=3, h=size, w=size, bias=True)
    kernel, pad, dil = _pair(k), _pair(padding), _pair(dilation)
    out_hw = tuple(size + 2 * p - d * (kk - 1) for kk, p, d in zip(kernel, pad, dil))
    source, _, _ = _conv_source(torch.zeros(3, 4, size, size), (pad[1], pad[1], pad[0], pad[0]),
                                kernel, (1, 1), dil, out_hw)
    assert source.shape[2:] == (size, size)      # the unpadded input, read region by region
    torch.manual_seed(6)
    errors = compare(cfg, dtype)
    assert max(errors.values()) < TOL[dtype], errors


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("cin,cout", [(32, 16), (8, 32)], ids=["correlation", "fold"])
def test_conv_matches_when_unfolded_in_chunks_of_images(cin, cout, groups):
    """Large inputs are unfolded a few images at a time, and grad x (a correlation of grad_y
    when cout <= 2 cin, else grad_y @ W folded) is built a few images at a time too; the
    chunks must not show."""
    cfg = dict(cin=cin, cout=cout, k=3, stride=1, padding=1, dilation=1, groups=groups, n=12,
               h=24, w=24, bias=True)
    for channels in (cin, cout):
        assert _images_per_chunk(torch.zeros(12, channels, 26, 26), (24, 24), (3, 3)) < 12
    torch.manual_seed(5)
    errors = compare(cfg, torch.float64)
    assert max(errors.values()) < TOL[torch.float64], errors


def bf16_errors(cfg, conv):
    """Relative RMS errors of a conv run under CPU bf16 autocast (float32 weights, as training
    runs it) against float64 on the same bf16-representable inputs: output and gradients."""
    ref = nn.Conv2d(cfg["cin"], cfg["cout"], cfg["k"], cfg["stride"], cfg["padding"],
                    cfg["dilation"], cfg["groups"], cfg["bias"])
    layer = conv(cfg["cin"], cfg["cout"], cfg["k"], cfg["stride"], cfg["padding"],
                 cfg["dilation"], cfg["groups"], cfg["bias"])
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.bfloat16())
    layer.load_state_dict(ref.state_dict())
    ref = ref.double()
    x = torch.randn(cfg["n"], cfg["cin"], cfg["h"], cfg["w"]).bfloat16().float()
    x = x.contiguous(memory_format=torch.channels_last)
    x_ref, x_low = x.double().requires_grad_(), x.clone().requires_grad_()
    y_ref = ref(x_ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_low = layer(x_low)
    assert y_low.dtype == torch.bfloat16
    grad = torch.randn(y_ref.shape).bfloat16()
    y_ref.backward(grad.double())
    y_low.backward(grad)

    def rms(a, b):
        return ((a.double() - b).norm() / b.norm().clamp(min=1e-30)).item()
    errors = {"output": rms(y_low, y_ref), "grad_input": rms(x_low.grad, x_ref.grad),
              "grad_weight": rms(layer.weight.grad, ref.weight.grad)}
    if cfg["bias"]:
        errors["grad_bias"] = rms(layer.bias.grad, ref.bias.grad)
    return errors


def bf16_configs():
    """The random shapes, larger ones that unfold in chunks or split the padding regions, and
    depthwise convs (elementwise taps)."""
    big = [dict(cin=cin, cout=cout, k=3, stride=1, padding="same", dilation=1, groups=1, n=n,
                h=size, w=size, bias=False)
           for cin, cout, size, n in [(24, 64, 31, 8), (64, 64, 15, 16), (64, 256, 15, 8),
                                      (256, 256, 7, 16), (256, 256, 3, 32), (3, 64, 32, 8)]]
    depthwise = [dict(cin=c, cout=c, k=k, stride=s, padding=k // 2, dilation=1, groups=c, n=4,
                      h=14, w=14, bias=b) for c, k, s, b in [(32, 3, 1, False), (48, 5, 2, True)]]
    return random_configs(24, seed=7) + big + depthwise


@pytest.mark.parametrize("cfg", bf16_configs(), ids=lambda c: (
    "{cin}-{cout}-k{k}-s{stride}-p{padding}-d{dilation}-g{groups}-n{n}-{h}x{w}".format(**c)))
def test_bf16_conv_is_as_accurate_as_the_native_bf16_conv(cfg):
    """Under bf16 autocast the hand-written conv's error against float64 is at most twice
    that of F.conv2d in bf16 on the same inputs (plus 1e-6 for errors that vanish), for the
    output and every gradient: sums over chunks, regions and taps add in float32."""
    torch.manual_seed(11)
    ours = bf16_errors(cfg, Conv2d)
    torch.manual_seed(11)
    native = bf16_errors(cfg, nn.Conv2d)
    for key in ours:
        assert ours[key] <= 2 * native[key] + 1e-6, (key, ours, native)


def test_conv_channels_last_input_gives_the_same_result():
    torch.manual_seed(3)
    conv = Conv2d(4, 6, 3, padding=1).double()
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    y = conv(x)
    y_cl = conv(x.contiguous(memory_format=torch.channels_last))
    assert torch.equal(y, y_cl)


def test_default_init_equals_nn_conv2d_for_the_same_seed():
    for args in [(3, 8, 3), (6, 4, (1, 3), 1, 0, 1, 2)]:
        torch.manual_seed(7)
        ref = nn.Conv2d(*args)
        torch.manual_seed(7)
        hand = Conv2d(*args)
        assert torch.equal(hand.weight, ref.weight) and torch.equal(hand.bias, ref.bias)


def test_state_dicts_load_both_ways():
    ref, hand = nn.Conv2d(4, 8, (3, 2), groups=2), Conv2d(4, 8, (3, 2), groups=2)
    assert {k: v.shape for k, v in ref.state_dict().items()} == \
        {k: v.shape for k, v in hand.state_dict().items()}
    hand.load_state_dict(ref.state_dict())
    assert torch.equal(hand.weight, ref.weight)
    ref2 = nn.Conv2d(4, 8, (3, 2), groups=2)
    ref2.load_state_dict(hand.state_dict())
    assert torch.equal(ref2.bias, ref.bias)
    assert Conv2d(3, 5, 3, bias=False).state_dict().keys() == {"weight"}


def test_bad_arguments_raise_like_pytorch():
    with pytest.raises(ValueError, match="padding='same' is not supported for strided"):
        Conv2d(3, 4, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match="padding must be an int, a pair, 'same' or 'valid'"):
        Conv2d(3, 4, 3, padding="full")
    with pytest.raises(ValueError, match="divisible by groups"):
        Conv2d(3, 4, 3, groups=2)
    with pytest.raises(ValueError, match="expects 3 input channels, got 4"):
        Conv2d(3, 4, 3)(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match=r"kernel \(3, 3\) with dilation \(2, 2\) is larger "
                                         r"than the padded input \(4, 4\)"):
        Conv2d(3, 4, 3, dilation=2)(torch.zeros(1, 3, 4, 4))


def _refuse(*args, **kwargs):
    raise AssertionError("a native convolution was called")


def native_conv_ops(model):
    """Names of the native convolution kernels run by one forward + backward of `model`."""
    x = torch.randn(4, 3, 32, 32, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(x).sum().backward()
    ops = {e.key for e in prof.key_averages()}
    assert x.grad is not None and ops & {"aten::mm", "aten::addmm", "aten::bmm"}
    return [op for op in ops if op.startswith(("aten::", "mkldnn", "cudnn")) and "conv" in op]


def cpu_ops(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


def test_onednn_matmul_equals_addmm_and_switches_off(monkeypatch):
    from model import ONEDNN_MATMUL_SWITCH, _matmul_nt, _onednn_matmul_available
    torch.manual_seed(0)
    a, b_t, bias = torch.randn(200, 300), torch.randn(48, 300), torch.randn(48)
    want = torch.addmm(bias.double(), a.double(), b_t.double().t())
    # float32 sums of 300 products (results up to about 70): 5e-5 from float64 measured on an
    # AMD EPYC (addmm: 2e-5); the bound is a tenth of float32's worst case for such sums.
    torch.testing.assert_close(_matmul_nt(a, b_t, bias).double(), want, rtol=0, atol=5e-4)
    torch.testing.assert_close(_matmul_nt(a, b_t).double(), want - bias.double(), rtol=0,
                               atol=5e-4)
    onednn = _onednn_matmul_available(torch.float32)
    assert ("mkldnn::_linear_pointwise" in cpu_ops(lambda: _matmul_nt(a, b_t))) == onednn
    monkeypatch.setenv(ONEDNN_MATMUL_SWITCH, "0")
    assert not _onednn_matmul_available(torch.float32)
    ops = cpu_ops(lambda: _matmul_nt(a, b_t, bias))
    assert "aten::addmm" in ops and "mkldnn::_linear_pointwise" not in ops


def test_no_native_convolution_in_forward_or_backward(monkeypatch):
    torch.manual_seed(0)
    # The profiler check sees native convolutions where there are some...
    assert native_conv_ops(build_model("seed", 10, conv="native"))
    # ...and none in the hand-written network, even with every Python entry point refusing.
    for module, name in [(F, "conv2d"), (torch, "conv2d"), (torch, "convolution"),
                         (torch, "_convolution"), (F, "conv_transpose2d")]:
        monkeypatch.setattr(module, name, _refuse)
    model = build_model("seed", 10)
    assert native_conv_ops(model) == []
    assert model.conv1.weight.grad is not None


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
