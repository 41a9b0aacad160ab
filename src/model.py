"""The hand-written convolution and the networks built from it.

`Conv2d` is a drop-in replacement for `torch.nn.Conv2d` (same parameters, same initialisation,
same outputs and gradients) whose forward and backward are made only of tensor operations:
a strided view of the padded input (im2col without a native kernel), a matrix product, and
for the backward the transposed products plus a sum of shifted slices (col2im, i.e. fold).
No convolution kernel (`F.conv2d`, cuDNN's or oneDNN's) runs anywhere in it: only general
matrix products. docs/model.pdf derives every step; docs/conv_performance.md says what is fast.

Every network is reached through `build_model(name, num_classes, conv=...)`; new networks
register themselves in `MODELS` with the `@register` decorator.
"""
import math
import os
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from data import normalize


# ----------------------------------------------------------------------------------------------
# The convolution as tensor operations

def _patches(xp, kernel_size, stride, dilation, groups, out_hw):
    """A view (N, Ho, Wo, G, kh, kw, C/G) of every receptive field of the padded input.

    Works for any memory layout of `xp` because it uses the tensor's own strides; reshaping the
    view to (N*Ho*Wo, G, kh*kw*C/G) is the only copy (the im2col matrix)."""
    n, c = xp.shape[:2]
    sn, sc, sh, sw = xp.stride()
    (kh, kw), (st_h, st_w), (d_h, d_w), (ho, wo) = kernel_size, stride, dilation, out_hw
    cg = c // groups
    return xp.as_strided(
        (n, ho, wo, groups, kh, kw, cg),
        (sn, sh * st_h, sw * st_w, cg * sc, sh * d_h, sw * d_w, sc),
        xp.storage_offset())


def _pad_channels_last(x, pads):
    """Zero-pad (left, right, top, bottom) and lay the result out channels-last in one copy.

    Channels-last makes every receptive-field row of the im2col matrix a run of contiguous
    memory, which is what keeps the gather (and the matmul after it) fast."""
    left, right, top, bottom = pads
    n, c, h, w = x.shape
    xp = x.new_empty((n, h + top + bottom, w + left + right, c)).permute(0, 3, 1, 2)
    xp[:, :, top:top + h, left:left + w] = x
    # Zero only the border (filling the whole tensor first would write the interior twice).
    xp[:, :, :top].zero_()
    xp[:, :, top + h:].zero_()
    xp[:, :, top:top + h, :left].zero_()
    xp[:, :, top:top + h, left + w:].zero_()
    return xp


def _images_per_chunk(xp, out_hw, kernel_size):
    """How many images to unfold at a time so that one chunk's im2col matrix is no larger than
    the padded input itself, nor than 4 MiB (at least one image, and up to 1 MiB of columns
    regardless). Small chunks are reused from the heap; large ones are fresh mappings whose
    page faults cost more than the gather (glibc maps anything above 32 MiB; batch-1024 layers
    had chunks of 100+ MB before the cap, docs/conv_performance.md variant 2e)."""
    (ho, wo), (kh, kw) = out_hw, kernel_size
    cols_per_image = ho * wo * kh * kw * xp.shape[1] * xp.element_size()
    budget = min(max(xp.numel() * xp.element_size(), 2 ** 20), 4 * 2 ** 20)
    return max(1, min(xp.shape[0], budget // cols_per_image))


def _weight_taps(weight, groups):
    """The weight as a (G, O/G, kh, kw, C/G) view: taps before channels, like the im2col
    columns."""
    out_c, cg, kh, kw = weight.shape
    return weight.view(groups, out_c // groups, cg, kh, kw).permute(0, 1, 3, 4, 2)


def _weight_rows(weight, groups):
    """The weight as (G, O/G, K), each row one filter with K ordered (kh, kw, C/G) like the
    columns of the im2col matrix."""
    return _weight_taps(weight, groups).reshape(groups, weight.shape[0] // groups, -1)


# CIFAR_ONEDNN_MATMUL=0 sends the conv's CPU matmuls to torch.mm/addmm instead of oneDNN's
# private op (to compare, or should a torch release change that op).
ONEDNN_MATMUL_SWITCH = "CIFAR_ONEDNN_MATMUL"


def _onednn_matmul_available(dtype):
    """Whether oneDNN's matmul runs `dtype` here: float32 wherever oneDNN is built in, bf16
    where torch says oneDNN takes it (x86 CPUs from AVX-512 up, natively with AVX512-BF16 or
    AMX; AVX2-only CPUs are refused); never with CIFAR_ONEDNN_MATMUL=0."""
    if os.environ.get(ONEDNN_MATMUL_SWITCH) == "0" or not (
            hasattr(torch.ops.mkldnn, "_linear_pointwise") and
            torch.backends.mkldnn.is_available()):
        return False
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return dtype == torch.float32


def _matmul_nt(a, b_t, bias=None):
    """a @ b_t.T (+ bias) for 2-D a (m, k) and b_t (n, k).

    float32 and bf16 on the CPU go through oneDNN's matmul (the `mkldnn._linear_pointwise` op
    that torch.compile itself emits for linear layers): where MKL's sgemm is slow it is up to
    twice as fast in float32, and in bf16 up to 3x torch.mm's on the chunk-sized products here
    (docs/conv_performance.md). Otherwise, and while being traced (torch.jit.trace cannot record
    the op's arguments; torch.compile lowers it only for constant weights and picks its own
    matmul anyway): torch.addmm."""
    if (a.device.type == "cpu" and _onednn_matmul_available(a.dtype)
            and not torch.jit.is_tracing() and not torch.compiler.is_compiling()):
        return torch.ops.mkldnn._linear_pointwise(a, b_t, bias, "none", [], "")
    return torch.mm(a, b_t.t()) if bias is None else torch.addmm(bias, a, b_t.t())


def _accumulator(dtype):
    """The dtype sums over chunks, regions and kernel taps are added in: float32 for bf16 and
    float16 (which keep 8 and 11 significant bits, rounding at every add), else the dtype
    itself. The matmuls themselves accumulate in float32 inside oneDNN or cuBLAS."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _add_matmul(acc, a, b):
    """acc += a @ b (batched when 3-D). A float32 `acc` of bf16 factors takes their product,
    rounded once, and adds it in float32 (CPU matmuls have no bf16-in, float32-out form)."""
    if acc.dtype != a.dtype:
        return acc.add_(a @ b)
    return acc.addmm_(a, b) if a.dim() == 2 else acc.baddbmm_(a, b)


def _column_chunks(xp, kernel_size, stride, dilation, groups, out_hw):
    """Yield (first output row, im2col matrix (G, m, K)) for successive chunks of images, each
    chunk no larger than `_images_per_chunk` allows; rows are ordered (n, ho, wo). The caller
    must drop each matrix before asking for the next, or two chunks are alive at once."""
    ho, wo = out_hw
    chunk = _images_per_chunk(xp, out_hw, kernel_size)
    for i in range(0, xp.shape[0], chunk):
        cols = _patches(xp[i:i + chunk], kernel_size, stride, dilation, groups, out_hw)
        yield i * ho * wo, cols.reshape(cols.shape[0] * ho * wo, groups, -1).transpose(0, 1)


def _unfold_matmul(xp, w_t, bias, out_hw, kernel_size, stride, dilation, groups):
    """Correlate a padded input (any view, any layout) with a weight given as matrices.

    xp: (N, C, Hp, Wp); w_t: (G, O/G, kh*kw*C/G) with columns ordered (kh, kw, C/G); bias (O,).
    Returns the output as rows (N*Ho*Wo, O), rows ordered (n, ho, wo). The im2col matrix is built
    a chunk of images at a time (`_images_per_chunk`), so it never dominates memory."""
    ho, wo = out_hw
    out = xp.new_empty((xp.shape[0] * ho * wo, w_t.shape[0] * w_t.shape[1]))
    for start, cols in _column_chunks(xp, kernel_size, stride, dilation, groups, out_hw):
        rows = out[start:start + cols.shape[1]]
        if groups == 1:
            rows.copy_(_matmul_nt(cols[0], w_t[0], bias))
        else:
            rows.view(-1, groups, w_t.shape[1]).copy_(
                torch.bmm(cols, w_t.transpose(1, 2)).transpose(0, 1))
            if bias is not None:
                rows += bias
        del cols   # free this chunk before the generator builds the next one
    return out


# Zero padding. With padding 1, a 3x3 kernel on a 3x3 map multiplies padding in 32 of its 81
# (position, tap) products, on a 7x7 map in 18 %. Rather than copy the input into a zero-padded
# buffer and multiply those zeros (the native conv skips them), the output is split into
# rectangles whose positions all read the same kernel taps inside the input, and each rectangle
# is one smaller unfold + matmul that reads the unpadded input directly.

SPLIT_AT_SKIPPED_SHARE = 0.1   # split once 10 % of the products would multiply padding


def _bands(size, out, kernel, stride, dilation, before):
    """Runs (o0, o1, t0, t1) of output rows o0:o1 that all read kernel rows t0:t1 inside an
    input of `size` rows (output row i, kernel row t read input row i*stride + t*dilation -
    before); t0 == t1 where the rows read nothing but padding."""
    runs = []
    for i in range(out):
        valid = [t for t in range(kernel) if 0 <= i * stride + t * dilation - before < size]
        taps = (valid[0], valid[-1] + 1) if valid else (0, 0)
        if runs and runs[-1][2:] == taps:
            runs[-1] = (runs[-1][0], i + 1) + taps
        else:
            runs.append((i, i + 1) + taps)
    return runs


def _regions(in_hw, kernel_size, stride, pads, dilation, out_hw):
    """The output split into rectangles (i0, i1, p0, p1, j0, j1, q0, q1): output rows i0:i1 and
    columns j0:j1, all of whose positions read kernel rows p0:p1 and columns q0:q1 inside the
    input and only padding outside them."""
    left, _, top, _ = pads
    rows = _bands(in_hw[0], out_hw[0], kernel_size[0], stride[0], dilation[0], top)
    cols = _bands(in_hw[1], out_hw[1], kernel_size[1], stride[1], dilation[1], left)
    return [r + c for r in rows for c in cols]


def _reads_input(region):
    """Whether a region's positions read any input at all (else only padding)."""
    _, _, p0, p1, _, _, q0, q1 = region
    return p0 < p1 and q0 < q1


def _region_input(src, region, before, stride, dilation):
    """The slice of `src` (N, C, H, W) that a region reads: its own valid-padding conv input."""
    i0, i1, p0, p1, j0, j1, q0, q1 = region
    (top, left), (sh, sw), (dh, dw) = before, stride, dilation
    r0, c0 = i0 * sh + p0 * dh - top, j0 * sw + q0 * dw - left
    return src[:, :, r0:(i1 - 1) * sh + (p1 - 1) * dh - top + 1,
               c0:(j1 - 1) * sw + (q1 - 1) * dw - left + 1]


def _conv_source(x, pads, kernel_size, stride, dilation, out_hw):
    """What the im2col reads, as (source, (top, left) padding still to apply, regions).

    When at least SPLIT_AT_SKIPPED_SHARE of the products would multiply padding: the input
    itself, channels-last, and the output split into regions. Otherwise one zero-padded
    channels-last copy, read as a single region (small regions cost more in bookkeeping,
    copies and short matmuls than they save). Negative padding crops."""
    regions = _regions(x.shape[2:], kernel_size, stride, pads, dilation, out_hw)
    (kh, kw), (ho, wo) = kernel_size, out_hw
    computed = sum((i1 - i0) * (p1 - p0) * (j1 - j0) * (q1 - q0)
                   for i0, i1, p0, p1, j0, j1, q0, q1 in regions)
    if computed < (1 - SPLIT_AT_SKIPPED_SHARE) * ho * wo * kh * kw:
        return x.contiguous(memory_format=torch.channels_last), (pads[2], pads[0]), regions
    left, right, top, bottom = pads
    xp = _pad_channels_last(x, tuple(max(p, 0) for p in pads))
    hp, wp = xp.shape[2:]
    xp = xp[:, :, max(-top, 0):hp - max(-bottom, 0), max(-left, 0):wp - max(-right, 0)]
    return xp, (0, 0), [(0, ho, 0, kh, 0, wo, 0, kw)]     # every position reads every tap


def _conv_regions(src, before, regions, w5, bias, stride, dilation, out_hw):
    """The conv of `src` (padding `before` still to apply) as output rows (N*Ho*Wo, O), one
    unfold + matmul per region. w5: the weight as (G, O/G, kh, kw, C/G), `_weight_taps`."""
    groups, og = w5.shape[:2]
    n, (ho, wo) = src.shape[0], out_hw

    def rows_of(region):
        i0, i1, p0, p1, j0, j1, q0, q1 = region
        return _unfold_matmul(_region_input(src, region, before, stride, dilation),
                              w5[:, :, p0:p1, q0:q1].reshape(groups, og, -1), bias,
                              (i1 - i0, j1 - j0), (p1 - p0, q1 - q0), stride, dilation, groups)

    if len(regions) == 1 and _reads_input(regions[0]):   # the rows are the output already
        return rows_of(regions[0])
    out = src.new_empty((n, ho, wo, groups * og))
    for region in regions:
        i0, i1, _, _, j0, j1, _, _ = region
        target = out[:, i0:i1, j0:j1]
        if _reads_input(region):
            target.copy_(rows_of(region).view(target.shape))
        elif bias is None:        # these positions read only padding
            target.zero_()
        else:
            target.copy_(bias.expand_as(target))
    return out.view(n * ho * wo, -1)


def _grad_weight_regions(src, before, regions, go4, kernel_size, stride, dilation, groups):
    """grad W as (G, kh, kw, C/G, O/G), summed in `_accumulator`'s dtype: per region, its
    im2col columns (rebuilt chunk by chunk) times its rows of the output gradient go4
    (N, Ho, Wo, G, O/G)."""
    og, cg = go4.shape[-1], src.shape[1] // groups
    kh, kw = kernel_size
    acc_dtype = _accumulator(go4.dtype)
    gw = go4.new_zeros((groups, kh, kw, cg, og), dtype=acc_dtype)
    for region in regions:
        if not _reads_input(region):
            continue
        i0, i1, p0, p1, j0, j1, q0, q1 = region
        go_r = go4[:, i0:i1, j0:j1].reshape(-1, groups, og)   # a copy unless the whole map
        whole = (p1 - p0, q1 - q0) == (kh, kw)
        acc = (gw.view(groups, -1, og) if whole else
               go4.new_zeros((groups, (p1 - p0) * (q1 - q0) * cg, og), dtype=acc_dtype))
        xs = _region_input(src, region, before, stride, dilation)
        # Accumulated as grad W^T = cols^T @ go (K, O/G): MKL ran this orientation of the same
        # product faster than grad_y^T @ cols (docs/conv_performance.md, variant 2d).
        for start, cols in _column_chunks(xs, (p1 - p0, q1 - q0), stride, dilation, groups,
                                          (i1 - i0, j1 - j0)):
            go_c = go_r[start:start + cols.shape[1]].transpose(0, 1)          # (G, m, O/G)
            if groups == 1:
                _add_matmul(acc[0], cols[0].t(), go_c[0])
            else:
                _add_matmul(acc, cols.transpose(1, 2), go_c)
            del cols   # free this chunk before the generator builds the next one
        if not whole:
            gw[:, p0:p1, q0:q1] += acc.view(groups, p1 - p0, q1 - q0, cg, og)
    return gw


def _tap_views(t, kernel_size, stride, dilation, out_hw):
    """For each kernel tap (p, q): the (N, Ho, Wo, ...) view of the padded channels-last tensor
    t (N, Hp, Wp, ...) that the tap multiplies (im2col's column block for that tap; adding
    into these views is fold)."""
    (kh, kw), (sh, sw), (dh, dw), (ho, wo) = kernel_size, stride, dilation, out_hw
    for p in range(kh):
        for q in range(kw):
            yield p, q, t[:, p * dh:p * dh + (ho - 1) * sh + 1:sh,
                          q * dw:q * dw + (wo - 1) * sw + 1:sw]


def _fold_columns(go, w_rows, padded_shape, kernel_size, stride, dilation, out_hw):
    """col2im of go @ W: the gradient of a padded channels-last input (N, Hp, Wp, G, C/G).

    go: output gradient rows (N*Ho*Wo, G, O/G); w_rows: (G, O/G, K) as from `_weight_rows`.
    Each chunk of images gets its columns (m, K) from one matmul, then every kernel tap adds its
    column block into the tap's shifted view of the buffer (fold, the adjoint of im2col).
    Chunks are sized like the forward's im2col chunks, so the columns stay small and reused."""
    n, hp, wp, groups, cg = padded_shape
    (kh, kw), (ho, wo) = kernel_size, out_hw
    gxp = go.new_zeros(padded_shape, dtype=_accumulator(go.dtype))   # the taps add up here
    as_nchw = gxp.view(n, hp, wp, groups * cg).permute(0, 3, 1, 2)
    chunk = _images_per_chunk(as_nchw, out_hw, kernel_size)
    w_cols = w_rows[0].t().contiguous() if groups == 1 else None       # (K, O) for _matmul_nt
    for i in range(0, n, chunk):
        rows = go[i * ho * wo:(i + chunk) * ho * wo]
        if groups == 1:
            cols = _matmul_nt(rows[:, 0], w_cols).unsqueeze(0)           # (1, m, K)
        else:
            cols = torch.bmm(rows.transpose(0, 1), w_rows)               # (G, m, K)
        # Converted once, contiguous: adding bf16 into float32 views tap by tap took 10x longer.
        cols = cols.to(gxp.dtype).view(groups, -1, ho, wo, kh, kw, cg)
        for p, q, view in _tap_views(gxp[i:i + chunk], kernel_size, stride, dilation, out_hw):
            view += cols[:, :, :, :, p, q].permute(1, 2, 3, 0, 4)
    return gxp


def _output_hw(x_shape, kernel_size, stride, pads, dilation):
    """(Ho, Wo) of a conv; a ValueError if the dilated kernel does not fit the padded input."""
    (h, w), (kh, kw), (left, right, top, bottom) = x_shape[2:], kernel_size, pads
    ho = (h + top + bottom - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + left + right - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"Conv2d: kernel {(kh, kw)} with dilation {tuple(dilation)} is "
                         f"larger than the padded input {(h + top + bottom, w + left + right)}")
    return ho, wo


class _UnfoldMatmulConv(torch.autograd.Function):
    """y = im2col(x) @ W^T + b, with the backward written out rather than traced.

    Autograd through `as_strided` would scatter gradients element by element. Here:
    - grad W = grad_y^T @ im2col(x): the columns are rebuilt chunk by chunk instead of being
      saved, since they are kh*kw times the input;
    - grad x, stride 1 and O <= 2C: a correlation of the zero-padded grad_y with the flipped,
      transposed kernel, i.e. the same unfold + matmul as the forward (long inner dimension);
    - grad x otherwise: grad_y @ W, then fold (kh*kw shifted, strided adds: the adjoint of
      im2col), a chunk of images at a time."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, pads, dilation, groups):
        n, out_c, (kh, kw) = x.shape[0], weight.shape[0], weight.shape[2:]
        ho, wo = _output_hw(x.shape, (kh, kw), stride, pads, dilation)
        src, before, regions = _conv_source(x, pads, (kh, kw), stride, dilation, (ho, wo))
        out = _conv_regions(src, before, regions, _weight_taps(weight, groups), bias, stride,
                            dilation, (ho, wo))
        ctx.save_for_backward(src, weight)
        ctx.geometry = (x.shape, stride, pads, dilation, groups, (ho, wo), bias is not None,
                        before, regions)
        return out.view(n, ho, wo, out_c).permute(0, 3, 1, 2)              # NCHW, channels-last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        src, weight = ctx.saved_tensors
        (x_shape, stride, pads, dilation, groups, (ho, wo), has_bias, before,
         regions) = ctx.geometry
        n, c, h, w = x_shape
        out_c, cg, kh, kw = weight.shape
        og = out_c // groups
        left, right, top, bottom = pads
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
        go = grad_out.permute(0, 2, 3, 1).view(-1, groups, og)               # (M, G, O/G)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None

        if need_w:
            gw = _grad_weight_regions(src, before, regions, go.view(n, ho, wo, groups, og),
                                      (kh, kw), stride, dilation, groups)
            grad_w = gw.permute(0, 4, 3, 1, 2).reshape(out_c, cg, kh, kw).to(weight.dtype)
        if has_bias and need_b:
            grad_b = go.sum(0).reshape(out_c)
        if need_x and stride == (1, 1) and out_c <= 2 * c:
            # x[r, s] receives go[r + top - p*d, s + left - q*d] W[:, :, p, q]: a stride-1
            # correlation of go, padded by the dilated kernel extent less the forward padding,
            # with the kernel flipped in space and transposed in channels; the same region split
            # skips the taps that land on that padding.
            eh, ew = dilation[0] * (kh - 1), dilation[1] * (kw - 1)
            gpads = (ew - left, ew - right, eh - top, eh - bottom)
            g_src, g_before, g_regions = _conv_source(grad_out, gpads, (kh, kw), (1, 1),
                                                      dilation, (h, w))
            w_rot = weight.view(groups, og, cg, kh, kw).flip(3, 4).permute(0, 2, 3, 4, 1)
            gx = _conv_regions(g_src, g_before, g_regions, w_rot, None, (1, 1), dilation, (h, w))
            grad_x = gx.view(n, h, w, c).permute(0, 3, 1, 2)
        elif need_x:
            # grad_y @ W, then fold. Gathering the correlation's columns moves kh·kw·O values
            # per output position; this writes kh·kw·C, reads them back and adds them into the
            # kh·kw shifted views (about 4 passes of kh·kw·C): less memory traffic once O > 2C,
            # and the only way for strides > 1 (docs/conv_performance.md, variant 5).
            gxp = _fold_columns(go, _weight_rows(weight, groups), (n, h + top + bottom,
                                w + left + right, groups, cg), (kh, kw), stride, dilation,
                                (ho, wo))
            grad_x = gxp.view(n, h + top + bottom, w + left + right, c)
            grad_x = grad_x[:, top:top + h, left:left + w].permute(0, 3, 1, 2).to(src.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None


class _DepthwiseConv(torch.autograd.Function):
    """A depthwise conv (groups = input channels = output channels: one filter per channel)
    as kh*kw multiply-adds of shifted views of the padded channels-last input.

    Through the matmul path it would be C products of (m x kh*kw) by (kh*kw x 1), far too
    small for a GEMM; here every pass is one elementwise op over contiguous channel rows.
    Backward: grad W[c, p, q] = sum of tap view * grad_y; grad x = the same shifted views of a
    zero padded buffer accumulating grad_y * W[:, p, q] (any stride), then cropped."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, pads, dilation, out_hw):
        xp = _pad_channels_last(x, pads).permute(0, 2, 3, 1)                # (N, Hp, Wp, C)
        taps = weight[:, 0]                                                  # (C, kh, kw)
        out = None
        for p, q, view in _tap_views(xp, weight.shape[2:], stride, dilation, out_hw):
            if out is None:      # the first tap writes the sum, in `_accumulator`'s dtype
                first = view * taps[:, p, q] if bias is None else torch.addcmul(bias, view,
                                                                                taps[:, p, q])
                out = first.to(_accumulator(x.dtype))
            else:
                out.addcmul_(view, taps[:, p, q])
        ctx.save_for_backward(xp, weight)
        ctx.geometry = (x.shape, stride, pads, dilation, out_hw, bias is not None)
        return out.to(x.dtype).permute(0, 3, 1, 2)                           # channels-last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        xp, weight = ctx.saved_tensors
        (n, c, h, w), stride, (left, _, top, _), dilation, out_hw, has_bias = ctx.geometry
        go = grad_out.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        kernel = weight.shape[2:]
        if need_w:
            grad_w = torch.stack([(view * go).sum((0, 1, 2)) for _, _, view in
                                  _tap_views(xp, kernel, stride, dilation, out_hw)], 1)
            grad_w = grad_w.view(weight.shape)
        if has_bias and need_b:
            grad_b = go.sum((0, 1, 2))
        if need_x:
            gxp = torch.zeros_like(xp, dtype=_accumulator(xp.dtype))
            taps = weight[:, 0]
            for p, q, view in _tap_views(gxp, kernel, stride, dilation, out_hw):
                view.addcmul_(go, taps[:, p, q])
            grad_x = gxp[:, top:top + h, left:left + w].permute(0, 3, 1, 2).to(xp.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None


def conv2d_unfold(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """Functional form of the hand-written convolution (same arguments as `F.conv2d`, padding
    also as a 4-tuple (left, right, top, bottom))."""
    stride, dilation = _pair(stride), _pair(dilation)
    if isinstance(padding, int) or len(padding) == 2:
        ph, pw = _pair(padding)
        padding = (pw, pw, ph, ph)
    if x.dim() != 4:
        raise ValueError(f"Conv2d expects a 4-D (N, C, H, W) input, got shape {tuple(x.shape)}")
    if x.shape[1] != weight.shape[1] * groups:
        raise ValueError(f"Conv2d expects {weight.shape[1] * groups} input channels, "
                         f"got {x.shape[1]}")
    # Under autocast the matmuls run in the autocast dtype, as cuDNN's and oneDNN's convolutions
    # would; float64, which autocast leaves alone, stays float64.
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type) and x.dtype != torch.float64:
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(device_type, enabled=False):
            return _apply_conv(x, weight, bias, stride, tuple(padding), dilation, groups)
    return _apply_conv(x, weight, bias, stride, tuple(padding), dilation, groups)


def _apply_conv(x, weight, bias, stride, pads, dilation, groups):
    """The formulation for this shape: elementwise taps for depthwise convs, im2col + matmul
    for everything else."""
    if groups == x.shape[1] == weight.shape[0] > 1:       # one filter per channel
        out_hw = _output_hw(x.shape, weight.shape[2:], stride, pads, dilation)
        return _DepthwiseConv.apply(x, weight, bias, stride, pads, dilation, out_hw)
    return _UnfoldMatmulConv.apply(x, weight, bias, stride, pads, dilation, groups)


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


class Conv2d(nn.Module):
    """`torch.nn.Conv2d` re-implemented with unfold + matmul (zero padding only)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, device=None, dtype=None):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError("in_channels and out_channels must be divisible by groups")
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
        self.pads = self._explicit_padding()
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

    @torch.jit.unused
    def _explicit_padding(self):
        """(left, right, top, bottom); 'same' puts the odd pixel right/bottom as PyTorch does."""
        if self.padding == "valid":
            return (0, 0, 0, 0)
        if self.padding == "same":
            pads = []
            for d, k in zip(self.dilation[::-1], self.kernel_size[::-1]):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            return tuple(pads)
        ph, pw = self.padding
        return (pw, pw, ph, ph)

    def forward(self, x):
        if torch.jit.is_scripting():
            return conv2d_unfold_autograd(x, self.weight, self.bias, self.stride, self.pads,
                                          self.dilation, self.groups)
        return conv2d_unfold(x, self.weight, self.bias, self.stride, self.pads, self.dilation,
                             self.groups)

    def extra_repr(self):
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}, padding={self.padding}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        return s + ("" if self.bias is not None else ", bias=False")


TTA_LEVELS = {0: "none", 1: "mirror", 2: "mirror + 1-pixel translations"}


def tta_logits(model, x, level=0):
    """Logits for a normalised batch, averaged over test-time augmentations (as airbench):
    level 1 averages the image and its mirror; level 2 gives that average weight 1/2 and the
    mirror-averaged logits of the image shifted one pixel up-left and one down-right (reflect
    padding) weight 1/4 each."""
    if level == 0:
        return model(x).float()
    # Summed in float32: under bf16 autocast the logits come out in bf16.
    mirrored = 0.5 * (model(x).float() + model(x.flip(3)).float())
    if level == 1:
        return mirrored
    h, w = x.shape[2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    shifted = [padded[:, :, :h, :w], padded[:, :, 2:, 2:]]
    return 0.5 * mirrored + 0.25 * sum(tta_logits(model, s, 1) for s in shifted)


@torch.no_grad()
def predict_logits(model, images, mean, std, batch_size=1000, tta=0):
    """Logits (float32) for uint8 images, in eval mode and in batches, on the images' device,
    with test-time augmentation of the given level (`TTA_LEVELS`)."""
    if tta not in TTA_LEVELS:
        raise ValueError(f"TTA level must be one of {sorted(TTA_LEVELS)}, got {tta}")
    model.eval()
    return torch.cat([tta_logits(model, normalize(images[i:i + batch_size], mean, std), tta)
                      .float() for i in range(0, len(images), batch_size)])


CONVS = {"hand": Conv2d, "native": nn.Conv2d}   # "native" exists only for tests and benchmarks


# ----------------------------------------------------------------------------------------------
# Networks

MODELS = {}


def register(name):
    def add(fn):
        MODELS[name] = fn
        return fn
    return add


def build_model(name, num_classes=10, conv="hand"):
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(sorted(MODELS))}")
    if conv not in CONVS:
        raise ValueError(f"unknown conv {conv!r}; choose from {', '.join(CONVS)}")
    return MODELS[name](num_classes, CONVS[conv])


class SeedNet(nn.Module):
    """The seed network: three conv+ReLU layers, each followed by the one shared 2x2 max-pool,
    then three fully connected layers with dropout before the second and the third.

    32x32 -> 16x16 -> 8x8 -> 4x4 spatially. Widths are chosen so that 25 epochs train on a
    2-core CPU in about an hour (see README); the structure is the seed's."""

    def __init__(self, num_classes=10, conv=Conv2d, widths=(64, 128, 256), hidden=(512, 256),
                 dropout=0.3):
        super().__init__()
        c1, c2, c3 = widths
        self.conv1 = conv(3, c1, 3, padding=1)
        self.conv2 = conv(c1, c2, 3, padding=1)
        self.conv3 = conv(c2, c3, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(c3 * 4 * 4, hidden[0])
        self.dropout1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.dropout2 = nn.Dropout(dropout)
        self.fc3 = nn.Linear(hidden[1], num_classes)
        # He initialisation suits ReLU without normalisation layers better than PyTorch's
        # default (which is scaled for a leaky slope of sqrt(5)); biases start at zero.
        for m in self.modules():
            if isinstance(m, (conv, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = self.pool(F.relu(self.conv3(x)))
        x = torch.flatten(x, 1)
        x = self.dropout1(F.relu(self.fc1(x)))
        x = self.dropout2(F.relu(self.fc2(x)))
        return self.fc3(x)


@register("seed")
def seed_net(num_classes, conv):
    return SeedNet(num_classes, conv)


# ----------------------------------------------------------------------------------------------
# Fast, accurate networks (after airbench: github.com/KellerJordan/cifar10-airbench)

def whitening_filters(images, kernel_size=2, eps=5e-4):
    """Filters for a frozen first conv that whitens kernel_size^2 patches of `images`.

    The (uncentred) covariance of all patches has eigenvectors v_i and eigenvalues l_i; the
    filters v_i / sqrt(l_i + eps), largest first, make the patch features uncorrelated with
    unit variance (eps caps the gain of near-empty directions). Their negatives follow, so
    that a GELU after the conv keeps both signs: 2 * C * k^2 filters of shape (C, k, k)."""
    k, c = kernel_size, images.shape[1]
    patches = images.unfold(2, k, 1).unfold(3, k, 1)                  # (N, C, H', W', k, k)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k).double()
    covariance = patches.T @ patches / len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)          # ascending
    filters = eigenvectors.T.flip(0) / torch.sqrt(eigenvalues.flip(0) + eps)[:, None]
    filters = filters.reshape(c * k * k, c, k, k).to(images.dtype)
    return torch.cat([filters, -filters])


def frozen_scale_batchnorm(width, momentum):
    """BatchNorm whose scale stays 1 (only the shift learns), with a tiny eps as airbench.
    `momentum` is PyTorch's (weight of the new batch in the running statistics)."""
    norm = nn.BatchNorm2d(width, eps=1e-12, momentum=momentum)
    norm.weight.requires_grad_(False)
    return norm


def dirac_conv(conv, c_in, c_out):
    """A 3x3 'same' conv without bias whose first c_in filters start as the identity: at
    initialisation the block passes its input through, which lets these nets train fast."""
    layer = conv(c_in, c_out, 3, padding="same", bias=False)
    with torch.no_grad():
        nn.init.dirac_(layer.weight[:c_in])
    return layer


class ConvGroup(nn.Module):
    """conv -> 2x2 max-pool -> BN -> GELU, then `depth - 1` more conv -> BN -> GELU; with
    `residual`, the input of the second conv is added to the output of the last one."""

    def __init__(self, c_in, c_out, conv, bn_momentum, depth=2, residual=False):
        super().__init__()
        self.residual = residual
        self.convs = nn.ModuleList([dirac_conv(conv, c_in, c_out)] + [
            dirac_conv(conv, c_out, c_out) for _ in range(depth - 1)])
        self.norms = nn.ModuleList([frozen_scale_batchnorm(c_out, bn_momentum)
                                    for _ in range(depth)])
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        x = F.gelu(self.norms[0](self.pool(self.convs[0](x))))
        skip = x
        for conv, norm in zip(self.convs[1:], self.norms[1:]):
            x = F.gelu(norm(conv(x)))
        return x + skip if self.residual else x


class FastNet(nn.Module):
    """airbench's network: a frozen 2x2 patch-whitening conv (+ GELU), three ConvGroups, a
    global max-pool and a linear head whose logits are scaled down (1/9 as airbench).

    `init_whitening(images)` sets the whitening filters from training images; until then they
    are the default random conv init. Only the whitening bias trains (for a few epochs)."""

    def __init__(self, num_classes, conv, widths=(64, 256, 256), depth=2, residual=False,
                 whiten_kernel=2, bn_momentum=0.4, logit_scale=1 / 9):
        super().__init__()
        whiten_width = 2 * 3 * whiten_kernel ** 2
        self.whiten = conv(3, whiten_width, whiten_kernel, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        c_ins = (whiten_width,) + tuple(widths[:-1])
        self.groups = nn.Sequential(*[ConvGroup(c_in, c_out, conv, bn_momentum, depth, residual)
                                      for c_in, c_out in zip(c_ins, widths)])
        self.head = nn.Linear(widths[-1], num_classes, bias=False)
        self.logit_scale = logit_scale

    @torch.no_grad()
    def init_whitening(self, images, eps=5e-4):
        self.whiten.weight.copy_(whitening_filters(images, self.whiten.kernel_size[0], eps))

    def forward(self, x):
        # The whitening conv stays float32 under bf16 autocast: its filters amplify the weakest
        # patch directions up to 45x, and with them bf16's rounding of the input (2.7 % relative
        # error in its output, which doubled the logits' error on the shipped fast94 weights).
        with torch.autocast(x.device.type, enabled=False):
            x = F.gelu(self.whiten(x))
        x = self.groups(x)
        x = F.adaptive_max_pool2d(x, 1).flatten(1)
        return self.head(x) * self.logit_scale


@register("fast94")
def fast94_net(num_classes, conv):
    return FastNet(num_classes, conv, widths=(64, 256, 256))


@register("fast95")
def fast95_net(num_classes, conv):
    return FastNet(num_classes, conv, widths=(128, 384, 384))


@register("fast96")
def fast96_net(num_classes, conv):
    """10 convs: three convs per group with a residual over the last two (as airbench96)."""
    return FastNet(num_classes, conv, widths=(128, 512, 512), depth=3, residual=True)


# ----------------------------------------------------------------------------------------------
# ResNet-18 for 32x32 inputs (He et al. 2016, CIFAR variant: 3x3 stem, no max-pool), the
# CIFAR-100 baseline: ~75.6 % in 200 epochs in the literature (not measured here).

class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the input (through a strided 1x1 conv + BN where the shape
    changes), then ReLU."""

    def __init__(self, c_in, c_out, stride, conv):
        super().__init__()
        self.conv1 = conv(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = conv(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(conv(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(self, num_classes, conv, widths=(64, 128, 256, 512)):
        super().__init__()
        self.stem = nn.Sequential(conv(3, widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, c_in = [], widths[0]
        for i, width in enumerate(widths):           # two blocks per stage; stages 2-4 halve
            blocks += [BasicBlock(c_in, width, 1 if i == 0 else 2, conv),
                       BasicBlock(width, width, 1, conv)]
            c_in = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


@register("resnet18")
def resnet18_net(num_classes, conv):
    return ResNet18(num_classes, conv)
