"""The autograd functions of the hand-written conv, their functional entry `conv2d_unfold`, and
the autograd-traced variant TorchScript can compile."""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from .im2col import (accumulator, fold_columns, output_hw, pad_channels_last, tap_views,
                     weight_rows, weight_taps)
from .plans import plan_for
from .regions import conv_regions, conv_source, grad_weight_regions


def channels_last_output(like, shape):
    """An empty (N, C, H, W) output in channels-last memory, and its (N*H*W, C) rows, which the
    products write into. The output itself is returned, not a view of the rows: a custom
    Function's output that is a view cannot be changed in place, and an in-place op after a
    conv (nn.ReLU(inplace=True): AlexNet, VGG, EfficientNet) is common."""
    out = torch.empty(shape, dtype=like.dtype, device=like.device,
                      memory_format=torch.channels_last)
    return out, out.permute(0, 2, 3, 1).view(-1, shape[1])


class UnfoldMatmulConv(torch.autograd.Function):
    """y = im2col(x) @ W^T + b, with the backward written out rather than traced.

    Autograd through `as_strided` would scatter gradients element by element. Here:
    - grad W = grad_y^T @ im2col(x): the columns are rebuilt chunk by chunk instead of being
      saved, since they are kh*kw times the input;
    - grad x, stride 1 (plan.correlate, by default where O <= 2C): a correlation of the
      zero-padded grad_y with the flipped, transposed kernel, i.e. the same unfold + matmul as
      the forward (long inner dimension);
    - grad x otherwise: grad_y @ W, then fold (kh*kw shifted, strided adds: the adjoint of
      im2col), a chunk of images at a time.
    `plan` (plans.py) says which of these variants run: every one gives the same result up to
    rounding."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, pads, dilation, groups, plan):
        n, out_c, (kh, kw) = x.shape[0], weight.shape[0], weight.shape[2:]
        ho, wo = output_hw(x.shape, (kh, kw), stride, pads, dilation)
        src, before, regions = conv_source(x, pads, (kh, kw), stride, dilation, (ho, wo),
                                           plan.split)
        out, rows = channels_last_output(x, (n, out_c, ho, wo))
        conv_regions(src, before, regions, weight_taps(weight, groups), bias, stride, dilation,
                     (ho, wo), plan, rows)
        ctx.save_for_backward(src, weight)
        ctx.x_shape, ctx.stride, ctx.pads, ctx.dilation = x.shape, stride, pads, dilation
        ctx.groups, ctx.out_hw, ctx.has_bias = groups, (ho, wo), bias is not None
        ctx.plan = plan
        ctx.before, ctx.regions = before, regions     # what the forward read, and how
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        src, weight = ctx.saved_tensors
        stride, dilation, groups, before, regions, plan = (ctx.stride, ctx.dilation, ctx.groups,
                                                           ctx.before, ctx.regions, ctx.plan)
        (n, c, h, w), (ho, wo) = ctx.x_shape, ctx.out_hw
        out_c, cg, kh, kw = weight.shape
        og = out_c // groups
        left, right, top, bottom = ctx.pads
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
        go = grad_out.permute(0, 2, 3, 1).view(-1, groups, og)               # (M, G, O/G)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None

        if need_w:
            gw = grad_weight_regions(src, before, regions, go.view(n, ho, wo, groups, og),
                                      (kh, kw), stride, dilation, groups, plan)
            grad_w = gw.permute(0, 4, 3, 1, 2).reshape(out_c, cg, kh, kw).to(weight.dtype)
        if ctx.has_bias and need_b:
            grad_b = go.sum(0).reshape(out_c)
        if need_x and stride == (1, 1) and plan.correlate:
            # x[r, s] receives go[r + top - p*d, s + left - q*d] W[:, :, p, q]: a stride-1
            # correlation of go, padded by the dilated kernel extent less the forward padding,
            # with the kernel flipped in space and transposed in channels; the same region split
            # skips the taps that land on that padding (as its share rules, or in the
            # accelerator form as the plan says).
            eh, ew = dilation[0] * (kh - 1), dilation[1] * (kw - 1)
            gpads = (ew - left, ew - right, eh - top, eh - bottom)
            g_src, g_before, g_regions = conv_source(grad_out, gpads, (kh, kw), (1, 1), dilation,
                                                      (h, w), plan.split if plan.whole else None)
            w_rot = weight.view(groups, og, cg, kh, kw).flip(3, 4).permute(0, 2, 3, 4, 1)
            gx = conv_regions(g_src, g_before, g_regions, w_rot, None, (1, 1), dilation, (h, w),
                              plan)
            grad_x = gx.view(n, h, w, c).permute(0, 3, 1, 2)
        elif need_x:
            # grad_y @ W, then fold. Gathering the correlation's columns moves kh·kw·O values
            # per output position; this writes kh·kw·C, reads them back and adds them into the
            # kh·kw shifted views (about 4 passes of kh·kw·C): less memory traffic once O > 2C,
            # and the only way for strides > 1 (docs/conv_performance.md, variant 5).
            grad_padded = fold_columns(go, weight_rows(weight, groups), (n, h + top + bottom,
                                w + left + right, groups, cg), (kh, kw), stride, dilation,
                                (ho, wo), plan)
            grad_x = grad_padded.view(n, h + top + bottom, w + left + right, c)
            grad_x = grad_x[:, top:top + h, left:left + w].permute(0, 3, 1, 2).to(src.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None


class DepthwiseConv(torch.autograd.Function):
    """A depthwise conv (groups = input channels = output channels: one filter per channel)
    as kh*kw multiply-adds of shifted views of the padded channels-last input.

    Through the matmul path it would be C products of (m x kh*kw) by (kh*kw x 1), far too
    small for a GEMM; here every pass is one elementwise op over contiguous channel rows.
    Backward: grad W[c, p, q] = sum of tap view * grad_y; grad x = the same shifted views of a
    zero padded buffer accumulating grad_y * W[:, p, q] (any stride), then cropped."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, pads, dilation, out_hw):
        xp = pad_channels_last(x, pads).permute(0, 2, 3, 1)                # (N, Hp, Wp, C)
        taps = weight[:, 0]                                                  # (C, kh, kw)
        (n, c), (ho, wo) = x.shape[:2], out_hw
        out, rows = channels_last_output(x, (n, c, ho, wo))
        # The taps add up in `accumulator`'s dtype: in the output itself unless that is bf16.
        out_map = rows.view(n, ho, wo, c)
        acc = out_map if out_map.dtype == accumulator(x.dtype) else torch.empty_like(
            out_map, dtype=accumulator(x.dtype))
        for p, q, view in tap_views(xp, weight.shape[2:], stride, dilation, out_hw):
            if p == q == 0:      # the first tap writes the sum
                if bias is None:
                    torch.mul(view, taps[:, p, q], out=acc)
                else:
                    torch.addcmul(bias, view, taps[:, p, q], out=acc)
            else:
                acc.addcmul_(view, taps[:, p, q])
        if acc is not out_map:
            out_map.copy_(acc)
        ctx.save_for_backward(xp, weight)
        ctx.x_shape, ctx.stride, ctx.pads, ctx.dilation = x.shape, stride, pads, dilation
        ctx.out_hw, ctx.has_bias = out_hw, bias is not None
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        xp, weight = ctx.saved_tensors
        (h, w), (left, _, top, _) = ctx.x_shape[2:], ctx.pads
        stride, dilation, out_hw = ctx.stride, ctx.dilation, ctx.out_hw
        go = grad_out.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        kernel = weight.shape[2:]
        if need_w:
            grad_w = torch.stack([(view * go).sum((0, 1, 2)) for _, _, view in
                                  tap_views(xp, kernel, stride, dilation, out_hw)], 1)
            grad_w = grad_w.view(weight.shape)
        if ctx.has_bias and need_b:
            grad_b = go.sum((0, 1, 2))
        if need_x:
            grad_padded = torch.zeros_like(xp, dtype=accumulator(xp.dtype))
            taps = weight[:, 0]
            for p, q, view in tap_views(grad_padded, kernel, stride, dilation, out_hw):
                view.addcmul_(go, taps[:, p, q])
            grad_x = grad_padded[:, top:top + h, left:left + w].permute(0, 3, 1, 2).to(xp.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None


def conv2d_unfold(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """Functional form of the hand-written convolution (same arguments as `F.conv2d`, padding
    also as a 4-tuple (left, right, top, bottom))."""
    stride, dilation = _pair(stride), _pair(dilation)
    if isinstance(padding, int) or len(padding) == 2:
        ph, pw = _pair(padding)
        padding = (pw, pw, ph, ph)
    if x.dim() == 3:          # one image (C, H, W), as F.conv2d takes it
        return conv2d_unfold(x.unsqueeze(0), weight, bias, stride, padding, dilation,
                             groups).squeeze(0)
    # RuntimeError, as F.conv2d raises for these.
    if x.dim() != 4:
        raise RuntimeError(f"Conv2d expects a 3-D (C, H, W) or 4-D (N, C, H, W) input, got "
                           f"shape {tuple(x.shape)}")
    if x.shape[1] != weight.shape[1] * groups:
        raise RuntimeError(f"Conv2d expects {weight.shape[1] * groups} input channels, "
                           f"got {x.shape[1]}")
    # Under autocast the matmuls run in the autocast dtype, as cuDNN's and oneDNN's convolutions
    # would; float64, which autocast leaves alone, stays float64.
    device_type = x.device.type
    if (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
            and x.dtype != torch.float64):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(device_type, enabled=False):
            return _apply_conv(x, weight, bias, stride, tuple(padding), dilation, groups)
    return _apply_conv(x, weight, bias, stride, tuple(padding), dilation, groups)


def _apply_conv(x, weight, bias, stride, pads, dilation, groups):
    """The formulation for this shape: elementwise taps for depthwise convs, im2col + matmul
    for everything else, in the variant `plan_for` picks.

    torch.compile runs it eagerly, compiling what comes before and after (`_eager_conv`):
    Dynamo cannot trace the Functions' Python-side planning (chunks, regions, measuring) and
    would recompile it region by region. torch.export, which needs one graph, gets unfold +
    matmul with autograd deriving the backward (`conv2d_unfold_autograd`)."""
    if torch.compiler.is_exporting():
        return conv2d_unfold_autograd(x, weight, bias, stride, pads, dilation, groups)
    if torch.compiler.is_compiling():
        # Made here, not as a decorator: torch.compiler.disable imports Dynamo, 1.5 s of every
        # script's start on 2 cores, compiled or not. Dynamo traces this call once per conv.
        return torch.compiler.disable(_eager_conv)(x, weight, bias, stride, pads, dilation,
                                                   groups)
    return _eager_conv(x, weight, bias, stride, pads, dilation, groups)


def _eager_conv(x, weight, bias, stride, pads, dilation, groups):
    if groups == x.shape[1] == weight.shape[0] > 1:       # one filter per channel
        out_hw = output_hw(x.shape, weight.shape[2:], stride, pads, dilation)
        return DepthwiseConv.apply(x, weight, bias, stride, pads, dilation, out_hw)
    plan = plan_for(x, weight, bias, stride, pads, dilation, groups, UnfoldMatmulConv.apply)
    return UnfoldMatmulConv.apply(x, weight, bias, stride, pads, dilation, groups, plan)


def conv2d_unfold_autograd(x, weight, bias: Optional[torch.Tensor], stride: Tuple[int, int],
                           pads: Tuple[int, int, int, int], dilation: Tuple[int, int],
                           groups: int):
    """The same convolution with autograd tracing the backward through F.unfold (whose
    adjoint is F.fold). Slower, but TorchScript can compile it, which it cannot do for an
    autograd.Function, so `Conv2d` uses it under `torch.jit.script`."""
    n = x.shape[0]
    out_c, kh, kw = weight.shape[0], weight.shape[2], weight.shape[3]
    x = F.pad(x, pads)
    ho = (x.shape[2] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (x.shape[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    cols = F.unfold(x, [kh, kw], dilation=dilation, stride=stride)      # (N, C*kh*kw, L)
    cols = cols.view(n, groups, -1, ho * wo)
    out = torch.matmul(weight.view(groups, out_c // groups, -1), cols)  # (N, G, O/G, L)
    out = out.reshape(n, out_c, ho, wo)
    return out if bias is None else out + bias.view(1, -1, 1, 1)
