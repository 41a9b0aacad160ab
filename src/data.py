"""CIFAR-10 / CIFAR-100 held in memory as one uint8 tensor, and batch-wise preprocessing.

Reading: the official "python version" layouts are unpickled here directly, so any copy in that
layout works (torchvision's md5 check of extracted files would reject re-encoded copies), pickled
by Python 2 (bytes keys, as the official files) or by Python 3 (str keys, as many re-creations).
torchvision is used only to download (and checksum) the archive when the folder is missing.

Preprocessing happens on whole batches on the training device: uint8 -> float, normalise with
the training split's mean/std, random crop from a padded image and horizontal flip.
"""
import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

DATASETS = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train_files": [f"data_batch_{i}" for i in range(1, 6)],
        "test_files": ["test_batch"],
        "label_key": "labels",
        "meta_file": "batches.meta",
        "names_key": "label_names",
        "num_classes": 10,
        "download": "CIFAR10",
        "pretty": "CIFAR-10",
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train_files": ["train"],
        "test_files": ["test"],
        "label_key": "fine_labels",
        "meta_file": "meta",
        "names_key": "fine_label_names",
        "num_classes": 100,
        "download": "CIFAR100",
        "pretty": "CIFAR-100",
    },
}


class DataError(Exception):
    """A dataset that is missing or unreadable; the message is meant for the user as is."""


def load_torch_file(path, kind, keys):
    """The dict saved at `path` by this repo, loaded to the CPU with weights_only=True (no code
    runs from the file). A missing or unreadable file, or one without all of `keys`, is a
    DataError naming it as `kind` ("weights file", "checkpoint")."""
    if not os.path.isfile(path):
        raise DataError(f"no {kind} at {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DataError(f"cannot read {kind} {path}: {type(e).__name__}") from None
    if not isinstance(obj, dict) or any(k not in obj for k in keys):
        raise DataError(f"{path} is not a {kind} of this repo (expected keys "
                        f"{', '.join(keys)})")
    return obj


def _unpickle(path):
    """The pickled object; a dict's bytes keys (Python 2 pickles) become str."""
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except FileNotFoundError:
        raise DataError(f"missing dataset file {path}") from None
    except Exception as e:  # truncated or not a pickle at all
        raise DataError(f"corrupt dataset file {path}: {type(e).__name__}: {e}") from None
    if isinstance(obj, dict):
        obj = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    return obj


def _read_batch(path, label_key, num_classes):
    d = _unpickle(path)
    if not isinstance(d, dict) or "data" not in d or label_key not in d:
        raise DataError(f"corrupt dataset file {path}: expected a dict with "
                        f"'data' and '{label_key}'")
    data = np.asarray(d["data"])
    labels = np.asarray(d[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"corrupt dataset file {path}: 'data' is {data.dtype} {data.shape}, "
                        f"expected uint8 (N, 3072)")
    if labels.ndim != 1 or len(labels) != len(data):
        raise DataError(f"corrupt dataset file {path}: {len(data)} images but "
                        f"{labels.size} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"corrupt dataset file {path}: labels outside 0..{num_classes - 1}")
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels.astype(np.int64))


def _download(root, spec):
    """Fetch the official archive with torchvision (which checks its md5); any failure becomes
    one line telling the user where the files belong."""
    target = os.path.join(root, spec["folder"])
    try:
        import torchvision
        getattr(torchvision.datasets, spec["download"])(root, train=True, download=True)
    except Exception as e:
        raise DataError(
            f"{spec['pretty']} not found in {target} and the download failed "
            f"({type(e).__name__}); put the extracted python version of the dataset there"
            ) from None


def load_cifar(root, dataset="cifar10", download=True):
    """Return dict(train_x, train_y, test_x, test_y, classes); images uint8 (N, 3, 32, 32)."""
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    spec = DATASETS[dataset]
    folder = os.path.join(root, spec["folder"])
    if not os.path.isdir(folder):
        if not download:
            raise DataError(f"{spec['pretty']} not found in {folder}; put the extracted "
                            f"python version there")
        _download(root, spec)

    meta = _unpickle(os.path.join(folder, spec["meta_file"]))
    names = meta.get(spec["names_key"]) if isinstance(meta, dict) else None
    if not names or len(names) != spec["num_classes"]:
        raise DataError(f"corrupt dataset file {os.path.join(folder, spec['meta_file'])}: "
                        f"expected {spec['num_classes']} class names")
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]

    out = {"classes": classes}
    for split in ("train", "test"):
        parts = [_read_batch(os.path.join(folder, f), spec["label_key"], spec["num_classes"])
                 for f in spec[f"{split}_files"]]
        out[f"{split}_x"] = torch.cat([p[0] for p in parts])
        out[f"{split}_y"] = torch.cat([p[1] for p in parts])
    return out


def write_synthetic_cifar10(root, per_file=40, n_test=30, seed=0):
    """CIFAR-10's official python layout (data_batch_1..5, test_batch, batches.meta, pickled
    as the official files are) with random pixels and cycling labels: for checks that need
    files in that layout but not the dataset. Returns the folder."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, DATASETS["cifar10"]["folder"])
    os.makedirs(folder, exist_ok=True)
    names = DATASETS["cifar10"]["train_files"] + DATASETS["cifar10"]["test_files"]
    for i, name in enumerate(names):
        n = n_test if name == "test_batch" else per_file
        write_pickle(os.path.join(folder, name), {
            b"batch_label": name.encode(), b"labels": [(i + j) % 10 for j in range(n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"{name}_{j}.png".encode() for j in range(n)]})
    write_pickle(os.path.join(folder, "batches.meta"), {
        b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_vis": 3072,
        b"num_cases_per_batch": per_file})
    return folder


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]


def write_pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the protocol of the official files


def stratified_split(labels, val_size, seed=0):
    """Indices (train, val): val_size images drawn per class in proportion to its frequency,
    the same for a given seed whatever else the program does."""
    n = len(labels)
    if not 0 <= val_size < n:
        raise ValueError(f"validation size must be in 0..{n - 1}, got {val_size}")
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    counts = torch.bincount(labels)
    quota = counts * val_size // n
    # Hand out what integer division left over to the largest classes first.
    leftover = val_size - int(quota.sum())
    quota[torch.argsort(counts, descending=True, stable=True)[:leftover]] += 1
    val = torch.cat([perm[labels[perm] == c][:q] for c, q in enumerate(quota.tolist())])
    is_val = torch.zeros(n, dtype=torch.bool)
    is_val[val] = True
    return torch.nonzero(~is_val).flatten(), torch.sort(val).values


def channel_stats(images):
    """Per-channel mean and std of uint8 images, on the 0..1 scale."""
    x = images.double().div_(255)
    return x.mean((0, 2, 3)).float(), x.std((0, 2, 3)).float()


@dataclass
class Split:
    """A run's images, each a uint8 tensor on the training device (batches are gathered from
    them by index), and what batches are normalised with."""
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor           # the validation split: empty without --val-size
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: torch.Tensor            # per channel, on the device (see `device_split`)
    std: torch.Tensor
    flip_bits: torch.Tensor | None  # which images the alternating flip mirrors in even epochs


def device_split(data, val_size, seed, alternating_flip, device, stats=None):
    """`load_cifar`'s images as a `Split` on the device: the training images less a stratified
    validation split of `val_size` (0: none), the test set, the normalisation (the training
    images' mean and std, or `stats`), and with `alternating_flip` the flip's bits."""
    labels = data["train_y"]
    if val_size:
        train_idx, val_idx = stratified_split(labels, val_size, seed=seed)
    else:
        train_idx, val_idx = torch.arange(len(labels)), torch.arange(0)
    mean, std = stats or channel_stats(data["train_x"][train_idx])
    flip_bits = None
    if alternating_flip:    # fixed by the seed alone: a resumed run flips as an uninterrupted one
        bit_gen = torch.Generator().manual_seed(seed + 1)
        flip_bits = (torch.rand(len(train_idx), generator=bit_gen) < 0.5).to(device)
    return Split(*(data[k][idx].to(device) for idx in (train_idx, val_idx)
                   for k in ("train_x", "train_y")),
                 data["test_x"].to(device), data["test_y"].to(device), mean.to(device),
                 std.to(device), flip_bits)


def normalize(images, mean, std):
    """uint8 (N, 3, H, W) -> float32 normalised, on the images' device (keep `mean` and `std`
    there too: a copy from the host every batch waits for a GPU)."""
    mean = mean.to(images.device).view(1, -1, 1, 1)
    std = std.to(images.device).view(1, -1, 1, 1)
    return (images.float().div_(255) - mean) / std


def one_hot(labels, num_classes, smoothing=0.0):
    """Soft targets: 1 - smoothing on the true class plus smoothing spread over all classes.
    A scatter rather than F.one_hot, which reads the labels' range back to the host (a sync
    on a GPU every step); the labels were checked when they were read (`_read_batch`)."""
    targets = torch.zeros(len(labels), num_classes, device=labels.device)
    targets.scatter_(1, labels[:, None], 1.0)
    return targets * (1 - smoothing) + smoothing / num_classes


def random_crop(x, pad, gen, mode="constant"):
    """Each image shifted by its own random offset in [-pad, pad]^2: a crop from the padded
    image, as one gather. Zero padding (after normalisation zero is the mean colour) or, with
    mode="reflect", the image mirrored at its borders (airbench's translation)."""
    n, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad), mode=mode)
    dy = torch.randint(0, 2 * pad + 1, (n, 1), generator=gen, device=gen.device).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n, 1), generator=gen, device=gen.device).to(x.device)
    rows = (dy + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(c, device=x.device)[None, :, None, None]
    return xp[batch, chans, rows, cols]


def random_flip(x, gen):
    """Each image mirrored left-right with probability 1/2."""
    flip = torch.rand(len(x), generator=gen, device=gen.device).to(x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def alternating_flip(x, flip_bits, epoch):
    """Mirror image i when flip_bits[i] differs from the epoch's parity: a random half of the
    images in even epochs, the other half in odd ones, so every image is seen both ways
    in any two consecutive epochs (airbench's alternating flip)."""
    flip = flip_bits.to(x.device) ^ bool(epoch % 2)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def cutout(x, size, gen):
    """Zero (the mean colour) one size x size square per image, centred on a uniformly drawn
    pixel (an even square reaches one pixel further down and right) and clipped at the
    borders."""
    n, _, h, w = x.shape
    top = torch.randint(0, h, (n, 1, 1), generator=gen, device=gen.device).to(x.device)
    left = torch.randint(0, w, (n, 1, 1), generator=gen, device=gen.device).to(x.device)
    top, left = top - (size - 1) // 2, left - (size - 1) // 2
    rows = torch.arange(h, device=x.device)[None, :, None]
    cols = torch.arange(w, device=x.device)[None, None, :]
    inside = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)
    return x.masked_fill(inside[:, None], 0)


def augment(x, gen, crop_pad=4, pad_mode="constant", flip_bits=None, epoch=0, cutout_size=0):
    """Random translation, then a random flip, or with `flip_bits` the alternating flip, then
    optional cutout. Every random draw comes from `gen`."""
    if crop_pad:
        x = random_crop(x, crop_pad, gen, pad_mode)
    x = random_flip(x, gen) if flip_bits is None else alternating_flip(x, flip_bits, epoch)
    return cutout(x, cutout_size, gen) if cutout_size else x
