"""Evaluation: test-time augmentation, logits for uint8 images, a split's loss and accuracy
(over every rank under torchrun), and the test-set report with its confusion matrix."""
import torch
import torch.nn.functional as F

import distributed
from data import normalize


TTA_LEVELS = {0: "none", 1: "mirror", 2: "mirror + 1-pixel translations"}


def tta_logits(model, x, level=0):
    """Logits for a normalised batch, averaged over test-time augmentations (as airbench):
    level 1 averages the image and its mirror; level 2 gives that average weight 1/2 and the
    mirror-averaged logits of the image shifted one pixel up-left and one down-right (reflect
    padding) weight 1/4 each."""
    if level == 0:
        return model(x).float()
    # Summed in float32: under bf16 autocast the logits come out in bf16.
    mirrored = 0.5 * (model(x).float() + model(x.flip(3)).float())
    if level == 1:
        return mirrored
    h, w = x.shape[2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    shifted = [padded[:, :, :h, :w], padded[:, :, 2:, 2:]]
    return 0.5 * mirrored + 0.25 * sum(tta_logits(model, s, 1) for s in shifted)


@torch.no_grad()
def predict_logits(model, images, mean, std, batch_size=1000, tta=0):
    """Logits (float32) for uint8 images, in eval mode and in batches, on the images' device,
    with test-time augmentation of the given level (`TTA_LEVELS`)."""
    if tta not in TTA_LEVELS:
        raise ValueError(f"TTA level must be one of {sorted(TTA_LEVELS)}, got {tta}")
    model.eval()
    return torch.cat([tta_logits(model, normalize(images[i:i + batch_size], mean, std), tta)
                      .float() for i in range(0, len(images), batch_size)])


def evaluate(model, images, labels, mean, std, tta=0, predictions=False):
    """(cross-entropy against the hard labels, accuracy) over a whole split; with
    `predictions`, also the predicted class of every image (on the CPU). Under torchrun each
    rank predicts its share and the sums (and predictions) are gathered: every rank gets the
    whole split's figures."""
    mine = distributed.share()
    logits = predict_logits(model, images[mine], mean, std, tta=tta)
    predicted = logits.argmax(1)
    sums = torch.stack([F.cross_entropy(logits.float(), labels[mine], reduction="sum"),
                        (predicted == labels[mine]).sum().float()])
    loss_sum, correct = distributed.all_reduce_sum(sums).tolist()
    figures = (loss_sum / len(images), correct / len(images))
    if not predictions:
        return figures
    everyone = torch.empty(len(images), dtype=torch.long)
    for rank, share in enumerate(distributed.all_gather(predicted.cpu())):
        everyone[rank::distributed.world_size()] = share
    return figures + (everyone,)


def confusion_matrix(labels, predictions, n_classes):
    """(n, n) counts on the CPU; rows: true class, columns: predicted."""
    return torch.bincount(labels.cpu() * n_classes + predictions.cpu(),
                          minlength=n_classes * n_classes).view(n_classes, n_classes)


def test_report(model, weights, data, device, tta=0):
    """Accuracy, per-class accuracy and confusion matrix (rows: true class) on the test set,
    with the weights file's normalisation."""
    labels = data["test_y"].to(device)
    mean, std = torch.tensor(weights["mean"]), torch.tensor(weights["std"])
    pred = predict_logits(model, data["test_x"].to(device), mean, std, tta=tta).argmax(1)
    confusion = confusion_matrix(labels, pred, len(weights["classes"]))
    per_class = confusion.diag().double() / confusion.sum(1).clamp(min=1)
    return {"accuracy": confusion.diag().sum().item() / len(labels), "tta": tta,
            "per_class": dict(zip(weights["classes"], per_class.tolist())),
            "confusion": confusion.tolist()}
