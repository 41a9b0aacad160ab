"""The hand-written convolution: `torch.nn.Conv2d` rebuilt from tensor operations.

`Conv2d` is a drop-in replacement for `nn.Conv2d` (same parameters, same initialisation, same
outputs and gradients) whose forward and backward are made only of tensor operations: a strided
view of the padded input (im2col without a native kernel), a matrix product, and for the
backward the transposed products plus a sum of shifted slices (col2im, i.e. fold). No
convolution kernel (`F.conv2d`, cuDNN's or oneDNN's) runs anywhere in it: only general matrix
products. Read in the order docs/model.pdf derives it:

    im2col.py     the receptive fields as a strided view, chunked matmuls, fold
    regions.py    the output split by which kernel taps read padding (those products skipped)
    plans.py      which variant runs for a layer shape: the default, or measured once
    functions.py  the autograd functions: forward and the backward written out
    layers.py     the modules: Conv2d, Conv2dTFSame (TensorFlow's 'SAME'), swap_convs

docs/conv_performance.md says what was measured to make it fast.
"""
from .functions import conv2d_unfold, conv2d_unfold_autograd
from .layers import Conv2d, Conv2dTFSame, replace_module, swap_convs, tf_same_pads

__all__ = ["Conv2d", "Conv2dTFSame", "conv2d_unfold", "conv2d_unfold_autograd",
           "replace_module", "swap_convs", "tf_same_pads"]
