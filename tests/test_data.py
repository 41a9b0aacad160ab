"""Reading the official layouts (and refusing broken files), splits, targets, augmentation."""
import os
import pickle

import numpy as np
import pytest
import torch

from data import (CIFAR10_CLASSES, DataError, alternating_flip, augment, channel_stats, cutout,
                  load_cifar, normalize, one_hot, random_crop, random_flip, stratified_split)


def test_reads_cifar10_layout(cifar10_dir):
    d = load_cifar(cifar10_dir, "cifar10", download=False)
    assert d["train_x"].shape == (200, 3, 32, 32) and d["train_x"].dtype == torch.uint8
    assert d["test_x"].shape == (30, 3, 32, 32)
    assert d["train_y"].dtype == torch.int64 and d["classes"] == CIFAR10_CLASSES
    # Row-major R, G, B planes: pixel (c, y, x) is data[c*1024 + y*32 + x].
    with open(os.path.join(cifar10_dir, "cifar-10-batches-py", "data_batch_2"), "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    assert d["train_x"][40 + 5, 1, 7, 3] == raw[b"data"][5][1024 + 7 * 32 + 3]
    assert d["train_y"][40:45].tolist() == raw[b"labels"][:5]


def test_reads_cifar100_fine_labels(cifar100_dir):
    d = load_cifar(cifar100_dir, "cifar100", download=False)
    assert d["train_x"].shape == (300, 3, 32, 32) and len(d["classes"]) == 100
    assert d["train_y"].max() == 99 and d["classes"][7] == "class_07"


def test_missing_dataset_says_where_to_put_it(tmp_path):
    with pytest.raises(DataError, match=r"CIFAR-10 not found in .*cifar-10-batches-py; put "):
        load_cifar(str(tmp_path), "cifar10", download=False)


def _rewrite(folder, name, change):
    path = os.path.join(folder, name)
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    change(d)
    with open(path, "wb") as f:
        pickle.dump(d, f, protocol=2)
    return path


def test_python3_pickles_read_as_the_official_python2_ones(cifar10_dir, tmp_path):
    # Re-created copies are often pickled by Python 3: str keys and class names.
    official = load_cifar(cifar10_dir, download=False)
    folder = os.path.join(cifar10_dir, "cifar-10-batches-py")
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        d = {k.decode(): [v.decode() for v in vs] if k == b"label_names" else vs
             for k, vs in d.items()}
        with open(path, "wb") as f:
            pickle.dump(d, f)   # the current protocol, str keys
    python3 = load_cifar(cifar10_dir, download=False)
    assert python3["classes"] == official["classes"] == CIFAR10_CLASSES
    for key in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(python3[key], official[key]), key


def test_truncated_file_is_named(cifar10_dir):
    path = os.path.join(cifar10_dir, "cifar-10-batches-py", "data_batch_3")
    with open(path, "rb") as f:
        head = f.read(5000)
    with open(path, "wb") as f:
        f.write(head)
    with pytest.raises(DataError, match=f"corrupt dataset file {path}: UnpicklingError|"
                                        f"corrupt dataset file {path}: EOFError"):
        load_cifar(cifar10_dir, download=False)


def test_missing_batch_file_is_named(cifar10_dir):
    path = os.path.join(cifar10_dir, "cifar-10-batches-py", "data_batch_5")
    os.remove(path)
    with pytest.raises(DataError, match=f"missing dataset file {path}$"):
        load_cifar(cifar10_dir, download=False)


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update({b"data": d[b"data"][:, :3000]}), r"'data' is uint8 \(40, 3000\)"),
    (lambda d: d.update({b"data": d[b"data"].astype(np.float32)}), "'data' is float32"),
    (lambda d: d.update({b"labels": d[b"labels"][:-1]}), "40 images but 39 labels"),
    (lambda d: d[b"labels"].__setitem__(0, 10), r"labels outside 0\.\.9"),
    (lambda d: d.pop(b"labels"), "expected a dict with 'data' and 'labels'"),
])
def test_bad_contents_are_named(cifar10_dir, change, message):
    path = _rewrite(os.path.join(cifar10_dir, "cifar-10-batches-py"), "data_batch_1", change)
    with pytest.raises(DataError, match=f"corrupt dataset file {path}: {message}"):
        load_cifar(cifar10_dir, download=False)


def test_bad_meta_is_named(cifar10_dir):
    folder = os.path.join(cifar10_dir, "cifar-10-batches-py")
    path = _rewrite(folder, "batches.meta", lambda d: d[b"label_names"].pop())
    with pytest.raises(DataError, match=f"corrupt dataset file {path}: expected 10 class names"):
        load_cifar(cifar10_dir, download=False)


def test_stratified_split_is_disjoint_balanced_and_fixed():
    labels = torch.arange(1000) % 10
    labels[:100] = 0   # class 0 is over-represented: 190 of 1000 images
    train, val = stratified_split(labels, 100, seed=0)
    assert len(val) == 100 and len(train) == 900
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(1000))
    counts = torch.bincount(labels[val], minlength=10)
    assert counts[0] == 19 and counts[1:].tolist() == [9] * 9
    assert torch.equal(stratified_split(labels, 100, seed=0)[1], val)
    assert not torch.equal(stratified_split(labels, 100, seed=1)[1], val)
    with pytest.raises(ValueError, match="validation size must be in 0..999, got 1000"):
        stratified_split(labels, 1000)


def test_channel_stats_and_normalize():
    images = torch.randint(0, 256, (50, 3, 4, 4), dtype=torch.uint8)
    mean, std = channel_stats(images)
    x = normalize(images, mean, std)
    assert torch.allclose(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(x.std((0, 2, 3)), torch.ones(3), atol=1e-5)


def test_one_hot_and_label_smoothing():
    labels = torch.tensor([0, 2])
    assert torch.equal(one_hot(labels, 3), torch.tensor([[1., 0, 0], [0, 0, 1]]))
    soft = one_hot(labels, 4, smoothing=0.2)
    assert torch.allclose(soft, torch.tensor([[0.85, 0.05, 0.05, 0.05], [0.05, 0.05, 0.85, 0.05]]))
    assert torch.allclose(soft.sum(1), torch.ones(2))


@pytest.mark.parametrize("mode", ["constant", "reflect"])
def test_random_crop_is_a_shift_with_zero_or_mirrored_fill(mode):
    x = torch.arange(1, 1 + 6 * 2 * 8 * 8, dtype=torch.float32).view(6, 2, 8, 8)
    out = random_crop(x, 2, torch.Generator().manual_seed(0), mode)
    assert out.shape == x.shape
    for img, src in zip(out, x):
        padded = torch.nn.functional.pad(src[None], (2, 2, 2, 2), mode=mode)[0]
        matches = [(dy, dx) for dy in range(5) for dx in range(5)
                   if torch.equal(padded[:, dy:dy + 8, dx:dx + 8], img)]
        assert len(matches) == 1
    shifted = [not torch.equal(o, s) for o, s in zip(out, x)]
    assert any(shifted)


def test_random_flip_mirrors_about_half():
    x = torch.randn(400, 3, 5, 5)
    out = random_flip(x, torch.Generator().manual_seed(0))
    flipped = torch.tensor([torch.equal(o, s.flip(2)) for o, s in zip(out, x)])
    kept = torch.tensor([torch.equal(o, s) for o, s in zip(out, x)])
    assert (flipped ^ kept).all()
    assert 150 < flipped.sum() < 250


def test_augment_is_reproducible_from_the_generator():
    x = torch.randn(8, 3, 32, 32)
    a = augment(x, torch.Generator().manual_seed(5))
    b = augment(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a, x)


def test_alternating_flip_mirrors_each_image_in_every_other_epoch():
    x = torch.randn(300, 3, 5, 5)
    bits = torch.rand(300, generator=torch.Generator().manual_seed(1)) < 0.5
    seen = []
    for epoch in range(4):
        out = alternating_flip(x, bits, epoch)
        flipped = torch.tensor([torch.equal(o, s.flip(2)) for o, s in zip(out, x)])
        kept = torch.tensor([torch.equal(o, s) for o, s in zip(out, x)])
        assert (flipped ^ kept).all()
        seen.append(flipped)
    assert torch.equal(seen[0], bits) and torch.equal(seen[1], ~bits)
    assert torch.equal(seen[0], seen[2]) and torch.equal(seen[1], seen[3])


@pytest.mark.parametrize("size", [3, 4])
def test_cutout_zeroes_one_square_clipped_at_the_borders(size):
    x = torch.ones(500, 2, 10, 10)
    out = cutout(x, size, torch.Generator().manual_seed(0))
    holes = out[:, 0] == 0
    assert torch.equal(holes, out[:, 1] == 0)                  # the same square in every channel
    rows, cols = holes.any(2), holes.any(1)
    assert (rows.sum(1) * cols.sum(1) == holes.sum((1, 2))).all()   # a rectangle...
    assert rows.sum(1).max() == size and cols.sum(1).max() == size   # ...of at most size^2
    assert (holes.sum((1, 2)) == size * size).float().mean() > 0.3  # mostly whole squares
    assert (holes.sum((1, 2)) < size * size).any()                 # some clipped at a border
    assert ((out == 0) | (out == 1)).all()


def test_augment_with_alternating_flip_and_cutout_is_reproducible():
    x = torch.randn(8, 3, 32, 32)
    bits = torch.tensor([True, False] * 4)
    a = augment(x, torch.Generator().manual_seed(5), 2, "reflect", bits, 1, 8)
    b = augment(x, torch.Generator().manual_seed(5), 2, "reflect", bits, 1, 8)
    assert torch.equal(a, b) and (a == 0).any()
