"""The conv modules: `Conv2d` (nn.Conv2d's drop-in), `Conv2dTFSame` (TensorFlow's 'SAME'
padding, for timm's tf_* EfficientNets) and `swap_convs`, which puts them into any network."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from .functions import conv2d_unfold, conv2d_unfold_autograd


PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


class Conv2d(nn.Module):
    """`torch.nn.Conv2d` re-implemented with unfold + matmul: the same arguments, the same
    parameters (and initial values for the same seed), the same results. A padding_mode
    other than 'zeros' pads with F.pad first (what nn.Conv2d does too); unbatched (C, H, W)
    input is taken as a batch of one."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode="zeros", device=None, dtype=None):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError("in_channels and out_channels must be divisible by groups")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got "
                             f"{padding_mode!r}")
        self.padding_mode = padding_mode
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.dilation = _pair(dilation)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', "
                                 f"got {padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError("padding='same' is not supported for strided convolutions")
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.pads = explicit_padding(self.padding, self.kernel_size, self.dilation)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(
            (out_channels, in_channels // groups, *self.kernel_size), **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        # The same draws, in the same order, as torch.nn.Conv2d: equal seeds give equal weights.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].numel()
            if fan_in:
                bound = 1 / math.sqrt(fan_in)
                nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x):
        pads = self.pads
        if self.padding_mode != "zeros":
            x = F.pad(x, pads, mode=self.padding_mode)
            pads = (0, 0, 0, 0)
        if torch.jit.is_scripting():
            return conv2d_unfold_autograd(x, self.weight, self.bias, self.stride, pads,
                                          self.dilation, self.groups)
        return conv2d_unfold(x, self.weight, self.bias, self.stride, pads, self.dilation,
                             self.groups)

    def extra_repr(self):
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}, padding={self.padding}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        return s + ("" if self.bias is not None else ", bias=False")


def explicit_padding(padding, kernel_size, dilation):
    """nn.Conv2d's `padding` (a pair, 'same' or 'valid') as (left, right, top, bottom); 'same'
    puts the odd pixel right/bottom as PyTorch does."""
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        pads = []
        for d, k in zip(dilation[::-1], kernel_size[::-1]):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)
    ph, pw = padding
    return (pw, pw, ph, ph)


def replace_module(net, name, module):
    """Put `module` where the submodule called `name` is."""
    parent, _, child = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, child, module)


def tf_same_pads(size, kernel_size, stride, dilation):
    """TensorFlow's 'SAME' padding (left, right, top, bottom) for an input of `size` (H, W):
    the output is ceil(size / stride), the odd pixel goes right/bottom."""
    pads = []
    for n, k, s, d in zip(size[::-1], kernel_size[::-1], stride[::-1], dilation[::-1]):
        total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
        pads += [total // 2, total - total // 2]
    return tuple(pads)


class Conv2dTFSame(Conv2d):
    """The hand-written conv with TensorFlow's 'SAME' padding, which depends on the input
    size (timm's Conv2dSame for the tf_* EfficientNets)."""

    def forward(self, x):
        pads = tf_same_pads(x.shape[-2:], self.kernel_size, self.stride, self.dilation)
        return conv2d_unfold(x, self.weight, self.bias, self.stride, pads, self.dilation,
                             self.groups)


def swap_convs(model):
    """Replace (in place) every nn.Conv2d by the hand-written Conv2d with the same
    parameters (the very tensors: the state dict and any optimiser are unchanged). A
    subclass of nn.Conv2d with a forward of its own (a weight-standardised conv, say) would
    lose it: a ValueError naming the first such module, before anything is swapped."""
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    for name, module in convs:
        if type(module) is not nn.Conv2d and type(module).__name__ != "Conv2dSame":
            raise ValueError(f"swap_convs: {name or 'the model'} is a "
                             f"{type(module).__name__}, a subclass of nn.Conv2d with a forward "
                             f"of its own, which the hand-written Conv2d would not run")
    for name, module in convs:
        tf_same = type(module).__name__ == "Conv2dSame"       # timm: pads at run time
        hand = (Conv2dTFSame if tf_same else Conv2d)(
            module.in_channels, module.out_channels, module.kernel_size, module.stride,
            0 if tf_same else module.padding, module.dilation, module.groups,
            bias=module.bias is not None, padding_mode=module.padding_mode,
            device=module.weight.device)
        hand.weight = module.weight
        hand.bias = module.bias
        replace_module(model, name, hand)
    return model
