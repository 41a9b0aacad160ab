"""presets.py: every preset's recipe as train.py reads it, and flags over a preset."""
import pytest

from model import MODELS
from presets import PRESETS
from pretrained import BACKBONES
from run_setup import get_args


@pytest.mark.parametrize("preset, expected", [
    ("fast95", {"model": "fast95", "epochs": 15, "lr": 10.0, "cutout": 0, "crop_pad": 2,
                "tta": 2, "val_size": 0}),
    ("fast96", {"model": "fast96", "epochs": 40, "lr": 9.0, "cutout": 12, "crop_pad": 4,
                "tta": 2, "val_size": 0}),
    ("resnet18", {"model": "resnet18", "epochs": 200, "lr": 0.1, "decay": "cosine",
                  "cutout": 8, "val_size": 0, "label_smoothing": 0.0, "lookahead": False}),
    ("finetune", {"model": "efficientnet_lite0", "pretrained": "efficientnet_lite0",
                  "epochs": 10, "backbone_lr_scale": 0.2, "tta": 1, "decay": "cosine"}),
])
def test_presets_set_their_recipe(preset, expected):
    args = vars(get_args(["--preset", preset]))
    assert {k: args[k] for k in expected} == expected


def test_every_preset_sets_every_hyperparameter_and_names_a_network():
    for name, preset in PRESETS.items():
        assert preset.keys() == PRESETS["seed"].keys(), name
        assert preset["model"] in MODELS or preset["model"] in BACKBONES, name


def test_flags_override_the_preset_and_the_model_picks_its_namesake():
    args = get_args(["--preset", "fast94", "--epochs", "3", "--lr", "1"])
    assert (args.epochs, args.lr, args.batch_size, args.momentum) == (3, 1.0, 1024, 0.85)
    assert get_args(["--model", "fast95"]).preset == "fast95"
    assert get_args(["--model", "fast95", "--preset", "seed"]).batch_size == 128
