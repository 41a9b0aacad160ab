"""The hand-written Conv2d against references no one here wrote: PyTorch's own test inputs for
nn.Conv2d (module_db), and every torchvision classifier with its convs swapped."""
import pytest
import torch
import torch.nn as nn
import torchvision

from conv import Conv2d, swap_convs
from gpu_check import rel_err


def module_db_samples():
    """(constructor args, kwargs, forward input, description) of every Conv2d sample of
    PyTorch's module_db (its test suite's inputs; needs expecttest and hypothesis)."""
    from torch.testing._internal.common_modules import module_db
    samples = []
    for info in (m for m in module_db if m.module_cls is nn.Conv2d):
        for s in info.module_inputs_func(info, device="cpu", dtype=torch.float64,
                                         requires_grad=True, training=True):
            samples.append((s.constructor_input.args, s.constructor_input.kwargs,
                            s.forward_input.args[0], s.desc or "batched"))
    return samples


def outputs_and_gradients(conv, x):
    """The output, and the gradients of the input and every parameter, for a fixed random
    weighting of the output."""
    x = x.detach().clone().requires_grad_()
    y = conv(x)
    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(0), dtype=y.dtype)
    (y * weights).sum().backward()
    return [y.detach(), x.grad] + [p.grad for p in conv.parameters()]


@pytest.mark.parametrize("args, kwargs, x, desc", module_db_samples(),
                         ids=lambda v: v if isinstance(v, str) else None)
def test_every_module_db_sample_of_nn_conv2d_gives_its_outputs_and_gradients(args, kwargs, x,
                                                                            desc):
    """float64, within 1e-10 (relative), on the same state dict."""
    native = nn.Conv2d(*args, **kwargs).double()
    hand = Conv2d(*args, **kwargs).double()
    hand.load_state_dict(native.state_dict())
    for ours, theirs in zip(outputs_and_gradients(hand, x), outputs_and_gradients(native, x)):
        assert ours.shape == theirs.shape and rel_err(ours, theirs) < 1e-10, desc


def test_module_db_holds_the_samples_it_held_when_this_test_was_written():
    """4 samples in torch 2.14 (batched and unbatched, each with padding 0 and 'same'): the
    test above is not vacuous."""
    assert len(module_db_samples()) >= 4


def outputs_and_parameter_gradients(model, x):
    """The logits and every parameter's gradient of one forward + backward, and the native
    convolution kernels it ran."""
    model.zero_grad()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y = model(x.clone())
        y = y.logits if hasattr(y, "logits") else y
        (y * torch.arange(y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    native = sorted({e.key for e in prof.key_averages()
                     if "conv" in e.key and e.key.startswith(("aten::", "mkldnn"))})
    return [y.detach()] + [p.grad for p in model.parameters()], native


def input_size(name):
    """The smallest input a torchvision classifier takes here: its fixed size for the ViTs,
    Swin and MaxViT (224) and Inception v3 (299); 64 px for the rest (5 halvings)."""
    return 299 if name == "inception_v3" else 224 if name.startswith(("vit", "swin", "maxvit")) \
        else 64


@pytest.mark.slow   # 80 networks in float64, some at 224 px: all passed in 98 min wall on 2 cores
#                     of an AMD EPYC (Zen 4), about half of it paused for other work; most take
#                     seconds each, the EfficientNets, MaxViT and ConvNeXt-L minutes
@pytest.mark.parametrize("name", torchvision.models.list_models(module=torchvision.models))
def test_every_torchvision_classifier_runs_the_hand_written_conv_as_its_own(name):
    """Randomly initialised, float64, eval mode (no dropout or batch statistics), at the
    smallest input size the network takes: outputs and every parameter's gradient of the
    swapped network equal the original's within 1e-9, and no native convolution ran.

    One network, swapped in place after its own run (swap_convs keeps the very parameter
    tensors; zero_grad leaves the first run's gradients to the list that holds them): no
    second copy of the model, so the largest, vit_h_14 and regnet_y_128gf (630M parameters,
    5 GB in float64 and as much for each run's gradients), need about 15 GB, not 20."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, num_classes=10).double().eval()
    size = input_size(name)
    x = torch.randn(1, 3, size, size, dtype=torch.float64)
    theirs, native = outputs_and_parameter_gradients(model, x)
    assert native, "the profiler sees the original network's native convolutions"
    ours, native = outputs_and_parameter_gradients(swap_convs(model), x)
    assert not native, native
    for a, b in zip(ours, theirs):
        assert (a is None) == (b is None)
        if a is not None:
            assert rel_err(a, b) < 1e-9, name
