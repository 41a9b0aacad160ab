"""Zero padding without multiplying zeros: the output split into rectangles by which kernel
taps read the input.

With padding 1, a 3x3 kernel on a 3x3 map multiplies padding in 32 of its 81 (position, tap)
products, on a 7x7 map in 18 %. Rather than copy the input into a zero-padded buffer and
multiply those zeros (the native conv skips them), the output is split into rectangles whose
positions all read the same kernel taps inside the input, and each rectangle is one smaller
unfold + matmul that reads the unpadded input directly."""
from typing import NamedTuple

import torch

from .im2col import accumulator, add_matmul, column_chunks, pad_channels_last, unfold_matmul


class Region(NamedTuple):
    """Output rows i0:i1 and columns j0:j1, whose positions all read kernel rows p0:p1 and
    columns q0:q1 inside the input, and only padding outside them."""
    i0: int
    i1: int
    p0: int
    p1: int
    j0: int
    j1: int
    q0: int
    q1: int


SPLIT_AT_SKIPPED_SHARE = 0.1   # split once 10 % of the products would multiply padding


def bands(size, out, kernel, stride, dilation, before):
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


def output_regions(in_hw, kernel_size, stride, pads, dilation, out_hw):
    """The output split into `Region`s: rectangles whose positions all read the same kernel
    taps inside the input."""
    left, _, top, _ = pads
    rows = bands(in_hw[0], out_hw[0], kernel_size[0], stride[0], dilation[0], top)
    cols = bands(in_hw[1], out_hw[1], kernel_size[1], stride[1], dilation[1], left)
    return [Region(*r, *c) for r in rows for c in cols]


def reads_input(region):
    """Whether a region's positions read any input at all (else only padding)."""
    return region.p0 < region.p1 and region.q0 < region.q1


def region_input(src, region, before, stride, dilation):
    """The slice of `src` (N, C, H, W) that a region reads: its own valid-padding conv input."""
    i0, i1, p0, p1, j0, j1, q0, q1 = region
    (top, left), (sh, sw), (dh, dw) = before, stride, dilation
    r0, c0 = i0 * sh + p0 * dh - top, j0 * sw + q0 * dw - left
    return src[:, :, r0:(i1 - 1) * sh + (p1 - 1) * dh - top + 1,
               c0:(j1 - 1) * sw + (q1 - 1) * dw - left + 1]


def skips_padding(regions, kernel_size, out_hw):
    """Whether splitting the output into these `output_regions` skips at least
    SPLIT_AT_SKIPPED_SHARE of the products (those that would multiply padding): the default
    choice of `conv_source`."""
    (kh, kw), (ho, wo) = kernel_size, out_hw
    computed = sum((i1 - i0) * (p1 - p0) * (j1 - j0) * (q1 - q0)
                   for i0, i1, p0, p1, j0, j1, q0, q1 in regions)
    return computed < (1 - SPLIT_AT_SKIPPED_SHARE) * ho * wo * kh * kw


def conv_source(x, pads, kernel_size, stride, dilation, out_hw, split=None):
    """What the im2col reads, as (source, (top, left) padding still to apply, regions).

    split (by default, where `skips_padding`): the input itself, channels-last, and the output
    split into regions. Otherwise one zero-padded channels-last copy, read as a single region
    (small regions cost more in bookkeeping, copies and short matmuls than they save).
    Negative padding crops, and is never split."""
    if split is not False and min(pads) >= 0:
        regions = output_regions(x.shape[2:], kernel_size, stride, pads, dilation, out_hw)
        if split or skips_padding(regions, kernel_size, out_hw):
            return x.contiguous(memory_format=torch.channels_last), (pads[2], pads[0]), regions
    (kh, kw), (ho, wo) = kernel_size, out_hw
    left, right, top, bottom = pads
    xp = pad_channels_last(x, tuple(max(p, 0) for p in pads))
    hp, wp = xp.shape[2:]
    xp = xp[:, :, max(-top, 0):hp - max(-bottom, 0), max(-left, 0):wp - max(-right, 0)]
    return xp, (0, 0), [Region(0, ho, 0, kh, 0, wo, 0, kw)]     # every position reads every tap


def conv_regions(src, before, regions, w_taps, bias, stride, dilation, out_hw, plan, out=None):
    """The conv of `src` (padding `before` still to apply) as output rows (N*Ho*Wo, O), one
    unfold + matmul per region, written into `out` (such rows) where given. w_taps: the weight
    as (G, O/G, kh, kw, C/G), `weight_taps`; each region's taps are copied into contiguous
    filter rows once, for the matmul op (`matmul_nt`)."""
    groups, og = w_taps.shape[:2]
    n, (ho, wo) = src.shape[0], out_hw

    def rows_of(region, rows=None):
        i0, i1, p0, p1, j0, j1, q0, q1 = region
        w_rows = w_taps[:, :, p0:p1, q0:q1].reshape(groups, og, -1).contiguous()
        return unfold_matmul(region_input(src, region, before, stride, dilation), w_rows, bias,
                             (i1 - i0, j1 - j0), (p1 - p0, q1 - q0), stride, dilation, groups,
                             plan, rows)

    if len(regions) == 1 and reads_input(regions[0]):   # the rows are the output already
        return rows_of(regions[0], out)
    out = (src.new_empty((n * ho * wo, groups * og)) if out is None else out).view(
        n, ho, wo, groups * og)
    for region in regions:
        target = out[:, region.i0:region.i1, region.j0:region.j1]
        if reads_input(region):
            target.copy_(rows_of(region).view(target.shape))
        elif bias is None:        # these positions read only padding
            target.zero_()
        else:
            target.copy_(bias.expand_as(target))
    return out.view(n * ho * wo, -1)


def grad_weight_regions(src, before, regions, grad_map, kernel_size, stride, dilation,
                        groups, plan):
    """grad W as (G, kh, kw, C/G, O/G), summed in `accumulator`'s dtype: per region, its
    im2col columns (rebuilt chunk by chunk) times its rows of the output gradient grad_map
    (N, Ho, Wo, G, O/G)."""
    og, cg = grad_map.shape[-1], src.shape[1] // groups
    kh, kw = kernel_size
    acc_dtype = accumulator(grad_map.dtype)
    gw = grad_map.new_zeros((groups, kh, kw, cg, og), dtype=acc_dtype)
    for region in regions:
        if not reads_input(region):
            continue
        i0, i1, p0, p1, j0, j1, q0, q1 = region
        go_r = grad_map[:, i0:i1, j0:j1].reshape(-1, groups, og)   # a copy unless the whole map
        whole = (p1 - p0, q1 - q0) == (kh, kw)
        acc = (gw.view(groups, -1, og) if whole else
               grad_map.new_zeros((groups, (p1 - p0) * (q1 - q0) * cg, og), dtype=acc_dtype))
        xs = region_input(src, region, before, stride, dilation)
        # Accumulated as grad W^T = cols^T @ go (K, O/G): MKL ran this orientation of the same
        # product faster than grad_y^T @ cols (docs/conv_performance.md, variant 2d).
        for start, cols in column_chunks(xs, (p1 - p0, q1 - q0), stride, dilation, groups,
                                          (i1 - i0, j1 - j0), plan):
            go_c = go_r[start:start + cols.shape[1]].transpose(0, 1)          # (G, m, O/G)
            if groups == 1:
                add_matmul(acc[0], cols[0].t(), go_c[0])
            else:
                add_matmul(acc, cols.transpose(1, 2), go_c)
            del cols   # free this chunk before the generator builds the next one
        if not whole:
            gw[:, p0:p1, q0:q1] += acc.view(groups, p1 - p0, q1 - q0, cg, og)
    return gw
