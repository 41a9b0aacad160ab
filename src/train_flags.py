"""train.py's flags: what each means, the preset's values filled in wherever a flag is not
given, and argparse's one-line error for a bad combination."""
import argparse
import os
import time

import cli
from data import DATASETS
from evaluate import TTA_LEVELS
from model import MODELS
from presets import PRESETS
from pretrained import BACKBONES

TRAIN_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
DESCRIPTION = "Train a CIFAR network whose convolutions are written by hand."


def make_parser():
    p = cli.parser(TRAIN_SCRIPT, DESCRIPTION)
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="hyperparameters and network (default: that of --model, else seed)")
    p.add_argument("--model", choices=sorted(MODELS), help="default: the preset's")
    p.add_argument("--pretrained", choices=sorted(BACKBONES),
                   help="fine-tune this ImageNet backbone (preset finetune unless --preset)")
    p.add_argument("--image-size", type=int,
                   help="--pretrained: resolution the 32x32 images are resized to (default: "
                        "the backbone's, 224; 260 for efficientnet_lite2)")
    p.add_argument("--conv", default="hand", choices=("hand", "native"),
                   help="hand: every convolution is the hand-written one; native: nn.Conv2d "
                        "(for comparison)")
    p.add_argument("--dataset", default="cifar10", choices=sorted(DATASETS))
    p.add_argument("--epochs", type=int, help="default: the preset's (25 for seed)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--label-smoothing", type=float)
    p.add_argument("--grad-clip", type=float,
                   help="clip the gradients' global norm to this (0: no clipping; default: the "
                        "preset's, 5 for seed)")
    p.add_argument("--cutout", type=int, help="side of the cutout square (0: none)")
    p.add_argument("--tta", type=int, choices=sorted(TTA_LEVELS),
                   help="test-time augmentation for the final test accuracy: "
                        + ", ".join(f"{k} {v}" for k, v in TTA_LEVELS.items()))
    p.add_argument("--optimizer", choices=("sgd", "muon"),
                   help="muon: torch.optim.Muon for the conv filters, SGD for the rest")
    p.add_argument("--muon-lr", type=float, default=0.24,
                   help="Muon's LR (airbench94_muon's value; follows the same schedule)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the training step (compile time reported apart)")
    p.add_argument("--runs", type=int, default=1,
                   help="train N times (seeds seed..seed+N-1), report mean ± std")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-size", type=int,
                   help="training images held out for validation, stratified (0: none)")
    p.add_argument("--test-every", type=int, metavar="EPOCHS",
                   help="without a validation split: evaluate the test set every EPOCHS epochs "
                        "for TensorBoard's test/accuracy curve, for display only (default: as "
                        "often as keeps it within 5 %% of the training time, every 2 epochs "
                        "on CIFAR; 0: never)")
    p.add_argument("--data-dir", default="data")
    cli.add_device_flags(p, "Weights, optimiser, BatchNorm statistics and loss stay float32; "
                            "default auto, with --resume the run's own", precision_default=None)
    p.add_argument("--no-conv-measure", action="store_true",
                   help="run every hand-written conv in its default variant instead of the "
                        "fastest measured at start-up (also: CIFAR_CONV_MEASURE=0); a resumed "
                        "run keeps its own")
    p.add_argument("--out", help="run folder (default: runs/<preset>-<timestamp>)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run saved in RUN_DIR (or from a checkpoint file in it, "
                        "such as the previous one kept as checkpoint.prev.pt)")
    p.add_argument("--dist-timeout", type=float, default=300,
                   help="under torchrun: seconds a rank waits for the others before the whole "
                        "job fails")
    return p


def get_args(argv=None):
    """The flags, with the preset's values wherever a flag is not given."""
    p = make_parser()
    args = p.parse_args(argv)
    # The flags the command line set, even to their default value (argparse fills in only what
    # a namespace lacks): a resumed run refuses to change its own (see check_resume_flags).
    unset = object()
    typed = p.parse_args(argv, argparse.Namespace(**{k: unset for k in vars(args)}))
    args.given = sorted(k for k, v in vars(typed).items() if v is not unset)
    if args.pretrained:
        args.model = args.pretrained
        args.preset = args.preset or "finetune"
    if args.preset is None:
        args.preset = args.model if args.model in PRESETS else "seed"
    for key, value in PRESETS[args.preset].items():
        # --resume keeps the run's clipping unless --grad-clip is given (see train())
        if getattr(args, key, None) is None and not (args.resume and key == "grad_clip"):
            setattr(args, key, value)
    if args.model not in MODELS:      # --preset finetune alone: the preset's backbone
        args.pretrained = args.model
    if args.precision is None and not args.resume:   # a resume keeps its run's, unless given
        args.precision = "auto"
    check_args(p, args)
    if args.out is None:
        args.out = os.path.join("runs", f"{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
    return args


def check_args(p, args):
    """argparse's one-line error for values no `choices` or `type` rules out."""
    if args.image_size is not None and not args.pretrained:
        p.error("--image-size goes with --pretrained")
    if min(args.epochs, args.batch_size, args.runs) < 1 or min(args.val_size, args.cutout,
                                                                   args.test_every or 0) < 0:
        p.error("--epochs, --batch-size and --runs must be at least 1, --val-size, --cutout "
                "and --test-every at least 0")
    if args.test_every is not None and args.val_size and not args.resume:
        p.error("--test-every is for runs without a validation split (--val-size 0): with one, "
                "the validation accuracy is the held-out curve")
    if args.resume and args.runs != 1:
        p.error("--resume continues one run; it cannot be combined with --runs")
    if (args.grad_clip or 0) < 0:
        p.error("--grad-clip must be at least 0")
    if not 0 <= args.label_smoothing < 1:
        p.error("--label-smoothing must be in [0, 1)")
