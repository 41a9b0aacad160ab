"""im2col and its adjoint: the receptive fields of a padded input as a strided view, the
matrix products a chunk of images at a time, and fold (col2im) for the input's gradient."""
import os

import torch


def patches(xp, kernel_size, stride, dilation, groups, out_hw):
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


def pad_channels_last(x, pads):
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


def images_per_chunk(xp, out_hw, kernel_size, plan):
    """How many images to unfold at a time (at least one) so that one chunk's im2col matrix is
    no larger than plan.chunk_mib MiB.

    On the CPU (plan.whole off) no larger than the padded input itself either, up to 1 MiB of
    columns regardless: small chunks are reused from the heap, while large ones are fresh
    mappings whose page faults cost more than the gather (glibc maps anything above 32 MiB;
    without the cap a batch-1024 layer's chunk is 100+ MB, docs/conv_performance.md variant
    2e). Accelerators take the whole batch where it fits (plans.accelerator_chunk_mib)."""
    (ho, wo), (kh, kw) = out_hw, kernel_size
    cols_per_image = ho * wo * kh * kw * xp.shape[1] * xp.element_size()
    budget = plan.chunk_mib * 2 ** 20
    if not plan.whole:
        budget = min(max(xp.numel() * xp.element_size(), 2 ** 20), budget)
    return max(1, min(xp.shape[0], budget // cols_per_image))


def weight_taps(weight, groups):
    """The weight as a (G, O/G, kh, kw, C/G) view: taps before channels, like the im2col
    columns."""
    out_c, cg, kh, kw = weight.shape
    return weight.view(groups, out_c // groups, cg, kh, kw).permute(0, 1, 3, 4, 2)


def weight_rows(weight, groups):
    """The weight as (G, O/G, K), each row one filter with K ordered (kh, kw, C/G) like the
    columns of the im2col matrix."""
    return weight_taps(weight, groups).reshape(groups, weight.shape[0] // groups, -1)


# CIFAR_ONEDNN_MATMUL=0 sends the conv's CPU matmuls to torch.mm/addmm instead of oneDNN's
# private op (to compare, or should a torch release change that op).
ONEDNN_MATMUL_SWITCH = "CIFAR_ONEDNN_MATMUL"


def onednn_matmul_available(dtype):
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


def matmul_nt(a, b_t, bias=None, onednn=True, out=None):
    """a @ b_t.T (+ bias) for 2-D a (m, k) and b_t (n, k), written into `out` (m, n) where
    given: torch.mm/addmm write there directly, oneDNN's op returns a tensor that is copied.

    onednn: float32 and bf16 on the CPU go through oneDNN's matmul (the
    `mkldnn._linear_pointwise` op that torch.compile itself emits for linear layers): where
    MKL's sgemm is slow it is up to twice as fast in float32, and in bf16 up to 3x torch.mm's on
    the chunk-sized products here (docs/conv_performance.md). That op is fast on contiguous
    operands only: a weight slice whose rows are strided (a padding region's taps of a
    channels_last weight) took 1,000x longer on an AMD EPYC (Zen 5). So it gets contiguous
    operands or none: the conv's callers make them so once per call (a test checks every
    call), and anything else goes to torch.addmm, which takes any row or column stride. So does
    everything while torch.jit.trace traces (it cannot record the op's arguments); torch.compile
    and torch.export never get here (`functions._apply_conv`)."""
    if (onednn and a.device.type == "cpu" and a.is_contiguous() and b_t.is_contiguous()
            and onednn_matmul_available(a.dtype) and not torch.jit.is_tracing()):
        y = torch.ops.mkldnn._linear_pointwise(a, b_t, bias, "none", [], "")
        return y if out is None else out.copy_(y)
    if bias is None:
        return torch.mm(a, b_t.t(), out=out)
    return torch.addmm(bias, a, b_t.t(), out=out)


def accumulator(dtype):
    """The dtype sums over chunks, regions and kernel taps are added in: float32 for bf16 and
    float16 (which keep 8 and 11 significant bits, rounding at every add), else the dtype
    itself. The matmuls themselves accumulate in float32 inside oneDNN or cuBLAS."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def add_matmul(acc, a, b):
    """acc += a @ b (batched when 3-D). A float32 `acc` of bf16 factors takes their product,
    rounded once, and adds it in float32 (CPU matmuls have no bf16-in, float32-out form)."""
    if acc.dtype != a.dtype:
        return acc.add_(a @ b)
    return acc.addmm_(a, b) if a.dim() == 2 else acc.baddbmm_(a, b)


def column_chunks(xp, kernel_size, stride, dilation, groups, out_hw, plan):
    """Yield (first output row, im2col matrix (G, m, K)) for successive chunks of images, each
    chunk no larger than `images_per_chunk` allows; rows are ordered (n, ho, wo). The caller
    must drop each matrix before asking for the next, or two chunks are alive at once."""
    ho, wo = out_hw
    chunk = images_per_chunk(xp, out_hw, kernel_size, plan)
    for i in range(0, xp.shape[0], chunk):
        cols = patches(xp[i:i + chunk], kernel_size, stride, dilation, groups, out_hw)
        # A copy (the im2col matrix) unless the view has rows alike already, as a 1x1 conv's
        # does; contiguous either way, which oneDNN's matmul needs (matmul_nt).
        yield i * ho * wo, cols.reshape(cols.shape[0] * ho * wo, groups, -1).contiguous(
            ).transpose(0, 1)


def unfold_matmul(xp, w_t, bias, out_hw, kernel_size, stride, dilation, groups, plan, out=None):
    """Correlate a padded input (any view, any layout) with a weight given as matrices.

    xp: (N, C, Hp, Wp); w_t: (G, O/G, kh*kw*C/G) with columns ordered (kh, kw, C/G); bias (O,).
    Returns the output as rows (N*Ho*Wo, O), rows ordered (n, ho, wo), written into `out` where
    given (such rows, contiguous). The im2col matrix is built a chunk of images at a time
    (`images_per_chunk`, at most plan.chunk_mib: small on the CPU, on an accelerator up to
    1/8 of its free memory); plan.onednn picks the matmul op (`matmul_nt`)."""
    ho, wo = out_hw
    if out is None:
        out = xp.new_empty((xp.shape[0] * ho * wo, w_t.shape[0] * w_t.shape[1]))
    for start, cols in column_chunks(xp, kernel_size, stride, dilation, groups, out_hw, plan):
        rows = out[start:start + cols.shape[1]]
        if groups == 1:
            matmul_nt(cols[0], w_t[0], bias, plan.onednn, rows)
        else:
            rows.view(-1, groups, w_t.shape[1]).copy_(
                torch.bmm(cols, w_t.transpose(1, 2)).transpose(0, 1))
            if bias is not None:
                rows += bias
        del cols   # free this chunk before the generator builds the next one
    return out


def tap_views(t, kernel_size, stride, dilation, out_hw):
    """For each kernel tap (p, q): the (N, Ho, Wo, ...) view of the padded channels-last tensor
    t (N, Hp, Wp, ...) that the tap multiplies (im2col's column block for that tap; adding
    into these views is fold)."""
    (kh, kw), (sh, sw), (dh, dw), (ho, wo) = kernel_size, stride, dilation, out_hw
    for p in range(kh):
        for q in range(kw):
            yield p, q, t[:, p * dh:p * dh + (ho - 1) * sh + 1:sh,
                          q * dw:q * dw + (wo - 1) * sw + 1:sw]


def fold_columns(go, w_rows, padded_shape, kernel_size, stride, dilation, out_hw, plan):
    """col2im of go @ W: the gradient of a padded channels-last input (N, Hp, Wp, G, C/G).

    go: output gradient rows (N*Ho*Wo, G, O/G); w_rows: (G, O/G, K) as from `weight_rows`.
    Each chunk of images gets its columns (m, K) from one matmul, then every kernel tap adds its
    column block into the tap's shifted view of the buffer (fold, the adjoint of im2col).
    Chunks are sized like the forward's im2col chunks, so the columns stay small and reused."""
    n, hp, wp, groups, cg = padded_shape
    (kh, kw), (ho, wo) = kernel_size, out_hw
    grad_padded = go.new_zeros(padded_shape, dtype=accumulator(go.dtype))   # the taps add up here
    as_nchw = grad_padded.view(n, hp, wp, groups * cg).permute(0, 3, 1, 2)
    chunk = images_per_chunk(as_nchw, out_hw, kernel_size, plan)
    w_cols = w_rows[0].t().contiguous() if groups == 1 else None       # (K, O) for matmul_nt
    for i in range(0, n, chunk):
        rows = go[i * ho * wo:(i + chunk) * ho * wo]
        if groups == 1:
            cols = matmul_nt(rows[:, 0], w_cols, None, plan.onednn).unsqueeze(0)  # (1, m, K)
        else:
            cols = torch.bmm(rows.transpose(0, 1), w_rows)               # (G, m, K)
        # Converted once, contiguous: adding bf16 into float32 views tap by tap took 10x longer.
        cols = cols.to(grad_padded.dtype).view(groups, -1, ho, wo, kh, kw, cg)
        taps = tap_views(grad_padded[i:i + chunk], kernel_size, stride, dilation, out_hw)
        for p, q, view in taps:
            view += cols[:, :, :, :, p, q].permute(1, 2, 3, 0, 4)
    return grad_padded


def output_hw(x_shape, kernel_size, stride, pads, dilation):
    """(Ho, Wo) of a conv; a RuntimeError (as F.conv2d's) if the dilated kernel does not fit
    the padded input."""
    (h, w), (kh, kw), (left, right, top, bottom) = x_shape[2:], kernel_size, pads
    ho = (h + top + bottom - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + left + right - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if ho < 1 or wo < 1:
        raise RuntimeError(f"Conv2d: kernel {(kh, kw)} with dilation {tuple(dilation)} is "
                           f"larger than the padded input {(h + top + bottom, w + left + right)}")
    return ho, wo
