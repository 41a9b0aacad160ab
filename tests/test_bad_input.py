"""Every kind of input a user hands inference.py, odd and broken, through its real main():
odd-but-valid images are classified as their plain RGB twins are; broken images and weights
files are one line on stderr naming the file, exit code 2, nothing on stdout, no traceback.
(Broken dataset folders: tests/test_data.py.)"""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import inference
from conftest import CPU_FP32

SHIPPED = inference.DEFAULT_WEIGHTS


def run(capsys, *args):
    """(exit code, stdout, stderr) of inference.main on these arguments."""
    try:
        inference.main([*CPU_FP32, *map(str, args)])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def picture(size=(40, 30)):
    """An RGB picture with structure (a gradient and a square), as uint8 (H, W, 3)."""
    h, w = size[1], size[0]
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    rgb[..., 1] = np.linspace(255, 0, h, dtype=np.uint8)[:, None]
    rgb[h // 4:h // 2, w // 4:w // 2, 2] = 200
    return rgb


def grey(size=(40, 30)):
    return np.asarray(Image.fromarray(picture(size)).convert("L"))


# Odd but valid images: (name, writer, the plain 8-bit twin it must be classified as).
def save(img, path, **kw):
    img.save(path, **kw)


VALID = {
    "16-bit greyscale PNG": (lambda p: save(Image.fromarray(grey().astype(np.uint16) * 257), p),
                             ".png", lambda: Image.fromarray(grey())),
    "float TIFF in 0..1": (lambda p: save(Image.fromarray(grey().astype(np.float32) / 255), p),
                           ".tiff", lambda: Image.fromarray(grey())),
    "palette PNG": (lambda p: save(Image.fromarray(picture()).quantize(16), p), ".png",
                    lambda: Image.fromarray(picture()).quantize(16)),
    "greyscale with alpha (LA)": (lambda p: save(Image.fromarray(grey()).convert("LA"), p),
                                  ".png", lambda: Image.fromarray(grey())),
    "CMYK TIFF": (lambda p: save(Image.fromarray(picture()).convert("CMYK"), p), ".tiff",
                  lambda: Image.fromarray(picture()).convert("CMYK")),
    "1-bit PNG": (lambda p: save(Image.fromarray(grey()).convert("1"), p), ".png",
                  lambda: Image.fromarray(grey()).convert("1")),
    "animated GIF (first frame)": (
        lambda p: save(Image.fromarray(picture()).quantize(64), p, save_all=True,
                       append_images=[Image.new("P", (40, 30), 3)] * 2),
        ".gif", lambda: Image.fromarray(picture()).quantize(64)),
    "1x1 pixel": (lambda p: save(Image.new("RGB", (1, 1), (200, 30, 90)), p), ".png",
                  lambda: Image.new("RGB", (1, 1), (200, 30, 90))),
    "lossless WebP": (lambda p: save(Image.fromarray(picture()), p, lossless=True), ".webp",
                      lambda: Image.fromarray(picture())),
    "BMP": (lambda p: save(Image.fromarray(picture()), p), ".bmp",
            lambda: Image.fromarray(picture())),
    "a PNG named .txt": (lambda p: save(Image.fromarray(picture()), p, format="PNG"), ".txt",
                         lambda: Image.fromarray(picture())),
}


@pytest.mark.parametrize("kind", VALID)
def test_odd_but_valid_images_are_classified_as_their_plain_twins(kind, tmp_path, capsys):
    write, suffix, twin = VALID[kind]
    odd, plain = tmp_path / f"odd{suffix}", tmp_path / "plain.png"
    write(odd)
    twin().convert("RGB").save(plain)
    code, out, err = run(capsys, "--json", odd, plain)
    assert code == 0, err
    odd_top, plain_top = (r["top"] for r in json.loads(out))
    assert [t["class"] for t in odd_top] == [t["class"] for t in plain_top]
    assert [t["prob"] for t in odd_top] == pytest.approx([t["prob"] for t in plain_top],
                                                         abs=1e-6)


def broken_images(tmp_path):
    """(path, the one line it must give)."""
    png = tmp_path / "whole.png"
    Image.fromarray(picture((64, 64))).save(png)
    cases = {}
    def case(name, data, message):
        path = tmp_path / name
        path.write_bytes(data)
        cases[name] = (path, message.format(path=path))
    case("empty.png", b"", "error: not a readable image: {path} (")
    case("truncated.png", png.read_bytes()[:len(png.read_bytes()) // 2],
         "error: not a readable image: {path} (")
    case("random.jpg", np.random.default_rng(0).bytes(5000),
         "error: not a readable image: {path} (")
    case("notes.png", b"a text file, not an image\n",
         "error: not a readable image: {path} (")
    case("weights.png", open(SHIPPED, "rb").read(),
         "error: not a readable image: {path} (")
    folder = tmp_path / "folder.png"
    folder.mkdir()
    cases["a folder"] = (folder, f"error: not an image file but a folder: {folder}")
    dangling = tmp_path / "dangling.png"
    dangling.symlink_to(tmp_path / "gone.png")
    cases["a dangling symlink"] = (dangling, f"error: no such image file: {dangling}")
    missing = tmp_path / "missing.png"
    cases["a missing file"] = (missing, f"error: no such image file: {missing}")
    bomb = tmp_path / "bomb.png"     # 196 million pixels: over PIL's limit, a few KB on disk
    Image.new("1", (14000, 14000)).save(bomb)
    cases["a decompression bomb"] = (bomb, f"error: image too large: {bomb} (over "
                                           f"178,956,970 pixels, PIL's limit against "
                                           f"decompression bombs)")
    return cases


BROKEN_IMAGES = ["empty.png", "truncated.png", "random.jpg", "notes.png", "weights.png",
                 "a folder", "a dangling symlink", "a missing file", "a decompression bomb"]


@pytest.mark.parametrize("kind", BROKEN_IMAGES)
def test_broken_images_are_one_line_naming_the_file(kind, tmp_path, capsys):
    path, message = broken_images(tmp_path)[kind]
    good = tmp_path / "good.png"
    Image.fromarray(picture()).save(good)
    code, out, err = run(capsys, good, path)     # one bad file among good ones fails the call
    assert code == 2 and out == "" and len(err.splitlines()) == 1, err
    assert err.startswith(message), err         # unreadable: PIL's exception named after it


def broken_weights(tmp_path):
    """(path, the one line it must give) for weights files that cannot be used."""
    shipped = torch.load(SHIPPED, weights_only=True)
    cases = {}
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(open(SHIPPED, "rb").read()[:100_000])
    cases["truncated"] = (truncated, f"error: cannot read weights file {truncated}: ")
    other = tmp_path / "other_model.pt"
    torch.save({**shipped, "model": "fast94"}, other)       # the seed net's tensors
    cases["another model's"] = (other, f"error: {other} does not fit model 'fast94': ")
    unknown = tmp_path / "unknown_model.pt"
    torch.save({**shipped, "model": "vgg99"}, unknown)
    cases["an unknown model's"] = (unknown, f"error: {unknown} holds unknown model 'vgg99'")
    hundred = tmp_path / "cifar100.pt"
    torch.save({**shipped, "classes": [f"c{i}" for i in range(10)]}, hundred)
    cases["another dataset's classes"] = (hundred, f"error: the classes in {tmp_path} differ "
                                                   f"from those of {hundred}")
    ckpt = tmp_path / "run" / "checkpoint.pt"
    ckpt.parent.mkdir()
    torch.save({"model": shipped["state_dict"], "optimizer": [], "scheduler": [], "epoch": 3,
                "rng": {}, "args": {}}, ckpt)
    cases["a checkpoint"] = (ckpt, f"error: {ckpt} is a training checkpoint, not a weights "
                                   f"file: a run writes weights.pt beside it when it ends "
                                   f"(python src/train.py --resume {ckpt.parent} ends it)")
    image = tmp_path / "picture.pt"
    Image.fromarray(picture()).save(image, format="PNG")
    cases["an image"] = (image, f"error: cannot read weights file {image}: ")
    return cases


BROKEN_WEIGHTS = ["truncated", "another model's", "an unknown model's",
                  "another dataset's classes", "a checkpoint", "an image"]


@pytest.mark.parametrize("kind", BROKEN_WEIGHTS)
def test_broken_weights_are_one_line_naming_the_file(kind, tmp_path, cifar10_dir, capsys):
    path, message = broken_weights(tmp_path)[kind]
    if kind == "another dataset's classes":      # checked against the data folder's classes
        os.rename(os.path.join(cifar10_dir, "cifar-10-batches-py"),
                  tmp_path / "cifar-10-batches-py")
    code, out, err = run(capsys, "--weights", path, "--data-dir", tmp_path)
    assert code == 2 and out == "" and len(err.splitlines()) == 1, err
    assert err.startswith(message), err
    assert "Traceback" not in err
