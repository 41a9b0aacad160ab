"""Hyperparameters per preset, in one place: train.py's flags override them."""

# "decoupled": lr and weight decay are given per 1024 examples as airbench does, so that they
# hold whatever the batch size (see `optimizer_groups`); otherwise they are PyTorch's own.
PRESETS = {
    "seed": {
        "model": "seed",
        "epochs": 25,
        "batch_size": 128,
        "lr": 0.05,              # peak learning rate (SGD, Nesterov momentum 0.9)
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "decoupled": False,
        "bias_lr_scale": 1.0,
        "label_smoothing": 0.1,  # soft one-hot targets: a little less over-confidence
        "warmup": 0.15,          # fraction of all steps spent ramping the LR up; the rest decays
        # Without BatchNorm the first steps' gradients are large, and short runs diverged at
        # the peak LR on some CPUs; clipped, they train at 4x the LR (docs/results.md, the seed
        # network).
        "grad_clip": 5.0,        # gradient-norm clipping (0: none)
        "lr_start": 0.1,         # LR at the first step and at the last, as fractions of the peak
        "lr_end": 0.001,
        "decay": "linear",       # the shape of the decay after the warm-up: linear or cosine
        "backbone_lr_scale": 1.0,  # --pretrained: the backbone's LR as a fraction of the head's
        "crop_pad": 4,           # random crops from a 4-pixel zero-padded image, plus flips
        "pad_mode": "constant",
        "flip": "random",
        "cutout": 0,
        "lookahead": False,
        "whiten_bias_epochs": 0,
        "val_size": 5000,
        "tta": 0,
        "optimizer": "sgd",
    },
    # airbench94's recipe (94.01 % on the official test set in 9.9 epochs), run for 12 epochs:
    # the JPEG copy costs about 3 points, and two more epochs win a little of that back.
    "fast94": {
        "model": "fast94",
        "epochs": 12,
        "batch_size": 1024,
        "lr": 11.5,              # per 1024 examples, decoupled (an SGD LR of 1.5 at batch 1024)
        "momentum": 0.85,
        "weight_decay": 0.0153,  # per 1024 examples, decoupled from the LR
        "decoupled": True,
        "bias_lr_scale": 64.0,   # BatchNorm shifts learn 64x faster (no extra decay)
        "label_smoothing": 0.2,
        "warmup": 0.23,
        "lr_start": 0.2,
        "lr_end": 0.07,
        "decay": "linear",
        "backbone_lr_scale": 1.0,
        "crop_pad": 2,           # translations of up to 2 pixels, reflect-padded
        "pad_mode": "reflect",
        "flip": "alternating",   # each image mirrored in every other epoch
        "cutout": 0,
        "lookahead": True,       # every 5 steps the weights move to an EMA of themselves
        "whiten_bias_epochs": 3,  # the whitening conv's bias trains this long, then freezes
        "val_size": 0,           # all 50,000 training images train, as in airbench
        "tta": 2,                # mirror + translations at test time
        "optimizer": "sgd",
        "grad_clip": 0.0,
    },
}
# Wider (airbench95: widths 128/384/384, 15 epochs, a lower LR) and residual (airbench96:
# 10 convs, 12-pixel cutout, 4-pixel translations, LR x 0.78, 40 epochs) variants.
PRESETS["fast95"] = {**PRESETS["fast94"], "model": "fast95", "epochs": 15, "lr": 10.0}
PRESETS["fast96"] = {**PRESETS["fast94"], "model": "fast96", "epochs": 40, "lr": 9.0,
                     "cutout": 12, "crop_pad": 4}
# ResNet-18 for CIFAR-100 (the usual 200-epoch recipe: SGD 0.1, weight decay 5e-4, cosine
# decay) with an 8-pixel cutout (DeVries & Taylor's size for CIFAR-100), on all 50,000 images.
PRESETS["resnet18"] = {**PRESETS["seed"], "model": "resnet18", "epochs": 200, "lr": 0.1,
                       "label_smoothing": 0.0, "warmup": 0.01, "lr_end": 0.0,
                       "decay": "cosine", "cutout": 8, "val_size": 0, "grad_clip": 0.0}
# Fine-tuning an ImageNet backbone (--pretrained): a short warm-up, the new head at the full
# LR and the pretrained layers at a fifth of it, cosine decay, label smoothing, translations
# and flips. The backbone's own BatchNorm statistics adapt with the default momentum.
PRESETS["finetune"] = {**PRESETS["seed"], "model": "efficientnet_lite0", "epochs": 10,
                       "batch_size": 128, "lr": 0.05, "weight_decay": 5e-5, "warmup": 0.05,
                       "lr_start": 0.1, "lr_end": 0.0, "decay": "cosine",
                       "backbone_lr_scale": 0.2, "tta": 1, "grad_clip": 0.0}
