"""The networks, built from the hand-written convolution (`conv`), and `build_model`.

Every network is reached through `build_model(name, num_classes, conv=...)`; a new network
registers itself in `MODELS` with the `@register` decorator. The seed net (3 conv + pool,
2 dropout, 3 FC), airbench's fast nets (fast94/95/96) and a CIFAR ResNet-18.
"""
import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from conv import Conv2d


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
    2-core CPU in about an hour (docs/results.md); the structure is the seed's."""

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
    that a GELU after the conv keeps both signs: 2 * C * k^2 filters of shape (C, k, k),
    returned on the images' device.

    Computed on the CPU in float64 whatever the images' device: MPS has no float64, nor have
    some Intel GPUs, and the 12x12 eigendecomposition is nothing to move a GPU for."""
    k, c = kernel_size, images.shape[1]
    patches = images.cpu().unfold(2, k, 1).unfold(3, k, 1)           # (N, C, H', W', k, k)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k).double()
    covariance = patches.T @ patches / len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)          # ascending
    filters = eigenvectors.T.flip(0) / torch.sqrt(eigenvalues.flip(0) + eps)[:, None]
    filters = filters.reshape(c * k * k, c, k, k).to(images.dtype)
    return torch.cat([filters, -filters]).to(images.device)


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
        with torch.autocast(x.device.type, enabled=False) if torch.amp.is_autocast_available(
                x.device.type) else contextlib.nullcontext():     # (meta: no autocast)
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
