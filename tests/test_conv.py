"""The hand-written conv against torch.nn.Conv2d: outputs and gradients in float64 and float32
over random shapes, depthwise, skipped padding taps, chunking, bf16, init, state dicts, errors,
and that no native convolution kernel runs."""
import random
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from conv import Conv2d, conv2d_unfold, conv2d_unfold_autograd, plans, swap_convs
from conv.im2col import (ONEDNN_MATMUL_SWITCH, images_per_chunk, matmul_nt,
                         onednn_matmul_available)
from conv.regions import conv_source
from gpu_check import rel_err
from model import build_model


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
    source, _, _ = conv_source(torch.zeros(3, 4, size, size), (pad[1], pad[1], pad[0], pad[0]),
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
        assert images_per_chunk(torch.zeros(12, channels, 26, 26), (24, 24), (3, 3),
                                plans.Plan(True, True, True, chunk_mib=4)) < 12
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


@pytest.mark.parametrize("cin, cout, groups, padding", [(4, 6, 1, 1), (4, 6, 2, 0), (6, 6, 6, 1)],
                         ids=["matmul", "grouped", "depthwise"])
def test_an_inplace_op_after_the_conv_gives_nn_conv2d_outputs_and_gradients(cin, cout, groups,
                                                                            padding):
    """nn.ReLU(inplace=True) after a conv (AlexNet, VGG, EfficientNet): the output is a tensor
    of its own, not a view, so autograd lets it change in place; float64, to 1e-12."""
    torch.manual_seed(4)
    hand = Conv2d(cin, cout, 3, padding=padding, groups=groups).double()
    native = nn.Conv2d(cin, cout, 3, padding=padding, groups=groups).double()
    native.load_state_dict(hand.state_dict())
    x = torch.randn(2, cin, 7, 7, dtype=torch.float64)
    results = []
    for conv in (hand, native):
        xi = x.clone().requires_grad_()
        y = nn.ReLU(inplace=True)(conv(xi))
        (y * torch.arange(y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        results.append((y.detach(), xi.grad, conv.weight.grad, conv.bias.grad))
    for ours, theirs in zip(*results):
        assert torch.allclose(ours, theirs, rtol=1e-12, atol=1e-12)


def small_net(conv):
    """Two convs, each followed by an in-place ReLU, then a linear head: float64."""
    torch.manual_seed(5)
    return nn.Sequential(conv(3, 8, 3, padding=1), nn.ReLU(inplace=True),
                         conv(8, 4, 3, stride=2, padding_mode="zeros"), nn.ReLU(inplace=True),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).double()


def test_torch_compile_trains_with_the_hand_written_conv_as_eager_native_does():
    """torch.compile of a network of hand-written convs, each followed by an in-place ReLU (the
    convs run eagerly, the rest compiled): outputs, the input's and every parameter's gradients
    equal the native network's in eager mode (float64, 1e-12), and the compiled network runs
    no native convolution."""
    native, hand = small_net(nn.Conv2d), small_net(Conv2d)
    hand.load_state_dict(native.state_dict())
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    compiled = torch.compile(hand)
    results = []
    for net in (native, compiled):
        xi = x.clone().requires_grad_()
        ops = cpu_ops(lambda: net(xi).pow(2).sum().backward())
        results.append([net(xi).detach(), xi.grad] + [p.grad for p in net.parameters()])
    assert not [op for op in ops if "conv" in op and op.startswith(("aten::", "mkldnn"))]
    for ours, theirs in zip(results[1], results[0]):
        assert torch.allclose(ours, theirs, rtol=1e-12, atol=1e-12)


def test_torch_export_of_a_hand_written_network_gives_its_eager_outputs():
    """torch.export.export of fast94 (its batch norms in eval mode): the exported program's
    outputs equal eager's to float32 rounding, and its graph holds unfold (aten.im2col) and
    matmul, no convolution op."""
    torch.manual_seed(0)
    model = build_model("fast94", 10).eval()
    x = torch.randn(4, 3, 32, 32)
    program = torch.export.export(model, (x,))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert {"aten.im2col.default", "aten.matmul.default"} <= targets
    assert not [t for t in targets if "conv" in t]
    with torch.no_grad():     # float32 sums in another order than eager's
        assert rel_err(program.module()(x), model(x)) < 1e-5


def test_a_double_backward_is_refused_in_one_line_when_it_is_asked_for():
    """The backward is written out (chunks, regions, sums in place) and not itself
    differentiable: create_graph=True works, differentiating its result raises (see
    docs/conv_performance.md, "Double backward")."""
    conv = Conv2d(2, 3, 3).double()
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    (grad_x,) = torch.autograd.grad(conv(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="^trying to differentiate twice a function that "
                                           "was marked with @once_differentiable$"):
        grad_x.pow(2).sum().backward()


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


BAD_CONSTRUCTIONS = [dict(stride=2, padding="same"), dict(padding="full"), dict(groups=2),
                     dict(padding_mode="mirror")]
BAD_CALLS = [((3, 4, 3), (1, 4, 8, 8)), ((3, 4, 3, 1, 0, 2), (1, 3, 4, 4)),
             ((3, 4, 3), (3, 8)), ((3, 4, 3), (1, 1, 3, 8, 8))]


def raised(fn):
    try:
        fn()
    except Exception as e:          # the type is what is compared
        return type(e)
    raise AssertionError("no exception")


@pytest.mark.parametrize("kwargs", BAD_CONSTRUCTIONS, ids=str)
def test_a_bad_argument_raises_what_nn_conv2d_raises(kwargs):
    assert raised(lambda: Conv2d(3, 4, 3, **kwargs)) is raised(lambda: nn.Conv2d(3, 4, 3,
                                                                                 **kwargs))


@pytest.mark.parametrize("args, shape", BAD_CALLS, ids=str)
def test_a_bad_input_raises_what_nn_conv2d_raises(args, shape):
    x = torch.zeros(shape)
    assert raised(lambda: Conv2d(*args)(x)) is raised(lambda: nn.Conv2d(*args)(x)) \
        is RuntimeError


def test_bad_arguments_say_what_is_wrong():
    with pytest.raises(ValueError, match="padding='same' is not supported for strided"):
        Conv2d(3, 4, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match="padding must be an int, a pair, 'same' or 'valid'"):
        Conv2d(3, 4, 3, padding="full")
    with pytest.raises(ValueError, match="divisible by groups"):
        Conv2d(3, 4, 3, groups=2)
    with pytest.raises(ValueError, match="padding_mode must be one of \\('zeros', 'reflect', "
                                         "'replicate', 'circular'\\), got 'mirror'"):
        Conv2d(3, 4, 3, padding_mode="mirror")
    with pytest.raises(RuntimeError, match="expects 3 input channels, got 4"):
        Conv2d(3, 4, 3)(torch.zeros(1, 4, 8, 8))
    with pytest.raises(RuntimeError, match=r"kernel \(3, 3\) with dilation \(2, 2\) is larger "
                                           r"than the padded input \(4, 4\)"):
        Conv2d(3, 4, 3, dilation=2)(torch.zeros(1, 3, 4, 4))


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("padding, stride, batched", [(1, 1, True), ((2, 1), 2, True),
                                                      ("same", 1, False)], ids=str)
def test_every_padding_mode_and_unbatched_input_match_nn_conv2d(mode, padding, stride, batched):
    """float64: outputs, and the gradients of input, weight and bias, to 1e-10."""
    torch.manual_seed(5)
    hand = Conv2d(3, 5, 3, stride=stride, padding=padding, padding_mode=mode).double()
    native = nn.Conv2d(3, 5, 3, stride=stride, padding=padding, padding_mode=mode).double()
    native.load_state_dict(hand.state_dict())
    x = torch.randn((2, 3, 9, 8) if batched else (3, 9, 8), dtype=torch.float64)
    results = []
    for conv in (hand, native):
        xi = x.clone().requires_grad_()
        y = conv(xi)
        (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(0),
                         dtype=y.dtype)).sum().backward()
        results.append((y.detach(), xi.grad, conv.weight.grad, conv.bias.grad))
    assert results[0][0].shape == results[1][0].shape
    for ours, theirs in zip(*results):
        assert rel_err(ours, theirs) < 1e-10


def test_swap_convs_swaps_every_padding_mode_and_refuses_a_conv_with_its_own_forward():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
                        nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"))
    swap_convs(net)
    assert [type(m) for m in net] == [Conv2d, Conv2d]
    assert [m.padding_mode for m in net] == ["reflect", "circular"]

    class Standardised(nn.Conv2d):
        def forward(self, x):
            w = (self.weight - self.weight.mean()) / self.weight.std()
            return F.conv2d(x, w, self.bias, self.stride, self.padding)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(Standardised(4, 4, 3)))
    with pytest.raises(ValueError, match=r"^swap_convs: 1\.0 is a Standardised, a subclass of "
                                         r"nn\.Conv2d with a forward of its own"):
        swap_convs(net)
    assert type(net[0]) is nn.Conv2d       # nothing swapped


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
    torch.manual_seed(0)
    a, b_t, bias = torch.randn(200, 300), torch.randn(48, 300), torch.randn(48)
    want = torch.addmm(bias.double(), a.double(), b_t.double().t())
    # float32 sums of 300 products (results up to about 70): 5e-5 from float64 measured on an
    # AMD EPYC (addmm: 2e-5); the bound is a tenth of float32's worst case for such sums.
    torch.testing.assert_close(matmul_nt(a, b_t, bias).double(), want, rtol=0, atol=5e-4)
    torch.testing.assert_close(matmul_nt(a, b_t).double(), want - bias.double(), rtol=0,
                               atol=5e-4)
    onednn = onednn_matmul_available(torch.float32)
    assert ("mkldnn::_linear_pointwise" in cpu_ops(lambda: matmul_nt(a, b_t))) == onednn
    monkeypatch.setenv(ONEDNN_MATMUL_SWITCH, "0")
    assert not onednn_matmul_available(torch.float32)
    ops = cpu_ops(lambda: matmul_nt(a, b_t, bias))
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
