"""Clip-level classification metrics: accuracy and mean average precision (mAP).

The originals report accuracy for single-label tasks (ESC-50, Speech Commands, ...) and
sklearn's macro mAP for multi-label AudioSet. Both are rank/argmax statistics of the
per-class scores, so they are computed here on sigmoid probabilities (as the originals
do, and monotonic in the logits, so the same as on logits). torchmetrics keeps the
states, which makes the numbers exact under DDP (states are summed across ranks).

Shapes: `scores: (batch, num_classes)` logits, `target: (batch, num_classes)` one-/multi-hot
(soft targets from mixup only reach training, never these metrics).
"""

from __future__ import annotations

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MultilabelAveragePrecision

METRIC_NAMES = ("acc", "mAP")


def classification_metrics(num_classes: int, multilabel: bool, prefix: str) -> MetricCollection:
    """`{prefix}mAP` always, plus `{prefix}acc` for single-label tasks.

    Accuracy has no meaning when a clip may carry several labels, so multi-label tasks
    (AudioSet) get mAP only; asking to select checkpoints on `acc` there is an error
    raised by the task.
    """
    metrics = {"mAP": MultilabelAveragePrecision(num_labels=num_classes, average="macro")}
    if not multilabel:
        metrics["acc"] = MulticlassAccuracy(num_classes=num_classes, average="micro")
    return MetricCollection(metrics, prefix=prefix)


def update_metrics(metrics: MetricCollection, logits: torch.Tensor, target: torch.Tensor) -> None:
    """Feed one batch: logits (batch, num_classes), target (batch, num_classes) in {0, 1}."""
    probs = logits.detach().float().sigmoid()
    hard = (target > 0.5).long()
    for name, metric in metrics.items(keep_base=True):
        if name.endswith("acc"):
            metric.update(probs, target.argmax(dim=-1))
        else:
            metric.update(probs, hard)
