"""Predict with trained weights: a test-set report, or the top-3 classes of image files.

    python src/inference.py                      # test set: accuracy, per class, confusion
    python src/inference.py cat.jpg ship.png     # top-3 classes per image
    python src/inference.py --json ...           # the same as JSON on stdout
    python src/inference.py --tta ...            # with test-time augmentation
"""
import json
import os
import sys

import numpy as np
import torch

import cli
from data import DataError, load_cifar, load_torch_file
from device import describe, pick_device
from conv import plans as conv_plans
from precision import autocast, disable_tf32, pick_precision
from precision import describe as describe_precision
from checkpoint import intact_checkpoint
from evaluate import TTA_LEVELS, predict_logits, test_report
from model import MODELS, build_model
from pretrained import BACKBONES, PretrainedError, load_backbone

DEFAULT_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir,
                               "weights", "seed_cifar10.pt")
WEIGHTS_KEYS = ("model", "dataset", "classes", "mean", "std", "state_dict")


def get_args(argv=None):
    p = cli.parser(__file__, __doc__)
    p.add_argument("images", nargs="*", metavar="IMAGE", help="PNG/JPEG files (any size)")
    p.add_argument("--weights", default=os.path.normpath(DEFAULT_WEIGHTS))
    p.add_argument("--data-dir", default="data", help="where the dataset is (test-set report)")
    cli.add_device_flags(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--conv", default="hand", choices=("hand", "native"),
                   help="run the network with the hand-written conv or nn.Conv2d (same weights)")
    p.add_argument("--tta", nargs="?", const="auto", default="0", metavar="LEVEL",
                   choices=["auto", *map(str, TTA_LEVELS)],
                   help="test-time augmentation: " + ", ".join(
                       f"{k} {v}" for k, v in TTA_LEVELS.items())
                   + "; the flag alone: the level the weights were trained to report")
    return p.parse_args(argv)


def tta_level(flag, weights):
    """The --tta flag's level; "auto" (the flag alone) means the level the weights were trained
    to report, or mirror + translations (2) for weights saved without one (or with none)."""
    if flag == "auto":
        return weights.get("tta") or 2
    return int(flag)


def load_weights(path, conv="hand"):
    """(model in eval mode on the CPU, weights dict) from a weights file written by train.py."""
    try:
        weights = load_torch_file(path, "weights file", WEIGHTS_KEYS)
    except DataError:
        if intact_checkpoint(path) is None:
            raise
        raise DataError(f"{path} is a training checkpoint, not a weights file: a run writes "
                        f"weights.pt beside it when it ends (python src/train.py --resume "
                        f"{os.path.dirname(path) or '.'} ends it)") from None
    if weights.get("pretrained"):        # a fine-tuned backbone: its architecture, no download
        if weights["model"] not in BACKBONES:
            raise DataError(f"{path} holds unknown backbone {weights['model']!r}")
        model = load_backbone(weights["model"], len(weights["classes"]), conv,
                              image_size=weights["image_size"], imagenet=False)
    elif weights["model"] not in MODELS:
        raise DataError(f"{path} holds unknown model {weights['model']!r}")
    else:
        model = build_model(weights["model"], len(weights["classes"]), conv)
    try:
        model.load_state_dict(weights["state_dict"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise DataError(f"{path} does not fit model {weights['model']!r}: "
                        f"{first[1].strip() if len(first) > 1 else first[0]}") from None
    return model.eval(), weights


def read_image(path):
    """uint8 (3, 32, 32) RGB from any image file PIL can read (an animation's first frame),
    resized as a whole."""
    from PIL import Image, UnidentifiedImageError
    if os.path.isdir(path):
        raise DataError(f"not an image file but a folder: {path}")
    if not os.path.isfile(path):                 # a dangling symlink too
        raise DataError(f"no such image file: {path}")
    try:
        with Image.open(path) as img:
            img = to_8_bits(img).convert("RGB").resize((32, 32), Image.Resampling.BICUBIC)
    except Image.DecompressionBombError:
        raise DataError(f"image too large: {path} (over {2 * Image.MAX_IMAGE_PIXELS:,} "
                        f"pixels, PIL's limit against decompression bombs)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
        # PIL reports some broken files as SyntaxError or EOFError rather than OSError.
        raise DataError(f"not a readable image: {path} ({type(e).__name__})") from None
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)   # PIL's array interface: HWC


def to_8_bits(img):
    """16-bit and 32-bit integer images scaled from 0..65535, float ones from 0..1 (or 0..255
    where they go past 1), to 8-bit greyscale: PIL's convert("RGB") would clip them at 255."""
    from PIL import Image
    if not (img.mode.startswith("I") or img.mode == "F"):
        return img
    pixels = np.asarray(img, dtype=np.float64)
    top = 65535 if img.mode.startswith("I") else 1 if pixels.max(initial=0) <= 1 else 255
    return Image.fromarray(np.clip(np.rint(pixels * (255 / top)), 0, 255).astype(np.uint8))


def print_report(report, classes):
    total = sum(map(sum, report["confusion"]))
    tta = f", test-time augmentation: {TTA_LEVELS[report['tta']]}" if report["tta"] else ""
    print(f"test accuracy: {report['accuracy']:.4f} of {total} images{tta}")
    width = max(len(c) for c in classes)
    for c, acc in report["per_class"].items():
        print(f"  {c:<{width}}  {acc:.4f}")
    print("confusion matrix (rows: true class, columns: predicted):")
    cell = max(5, len(str(max(max(r) for r in report["confusion"]))) + 1)
    print(" " * (width + 2) + "".join(f"{c[:cell - 1]:>{cell}}" for c in classes))
    for c, row in zip(classes, report["confusion"]):
        print(f"  {c:<{width}}" + "".join(f"{v:>{cell}}" for v in row))


def classify_images(model, weights, images, paths, device, tta=0):
    images = images.to(device)
    mean, std = torch.tensor(weights["mean"]), torch.tensor(weights["std"])
    probs = predict_logits(model, images, mean, std, tta=tta).softmax(1)
    top = probs.topk(min(3, probs.shape[1]), dim=1)
    return [{"path": p, "top": [{"class": weights["classes"][i], "prob": v}
                                for v, i in zip(vals.tolist(), idx.tolist())]}
            for p, vals, idx in zip(paths, top.values, top.indices)]


def main(argv=None):
    args = get_args(argv)
    try:
        # Every input is checked before anything is printed.
        device = pick_device(args.device, verbose=False)
        dtype, why = pick_precision(args.precision, device)
        tf32 = disable_tf32(device) if dtype is None else ""
        why += f"; {tf32}" if tf32 else ""
        conv_plans.measuring()              # a bad CIFAR_CONV_MEASURE: its one line, now
        model, weights = load_weights(args.weights, args.conv)
        tta = tta_level(args.tta, weights)
        if args.images:
            images = torch.stack([read_image(p) for p in args.images])
        else:
            data = load_cifar(args.data_dir, weights["dataset"])
            if data["classes"] != weights["classes"]:
                raise DataError(f"the classes in {args.data_dir} differ from those of "
                                f"{args.weights}")
        print(f"device: {describe(device)}, {describe_precision(dtype, why)}", file=sys.stderr)
        model.to(device)
        with autocast(device, dtype):
            report_or_classify(args, model, weights, images if args.images else data, device,
                               tta)
    except (DataError, ValueError, OSError, PretrainedError) as e:
        cli.fail(str(e))


def report_or_classify(args, model, weights, inputs, device, tta):
    """Print the top-3 classes of the image files (inputs: their pixels), or the test-set
    report (inputs: the dataset)."""
    if args.images:
        results = classify_images(model, weights, inputs, args.images, device, tta)
        if args.json:
            print(json.dumps(results))
        else:
            for r in results:
                print(f"{r['path']}: " + ", ".join(f"{t['class']} {t['prob']:.3f}"
                                                   for t in r["top"]))
    else:
        report = test_report(model, weights, inputs, device, tta)
        if args.json:
            print(json.dumps(report))
        else:
            print_report(report, weights["classes"])


if __name__ == "__main__":
    main()
