"""Classification metrics shared by validation, the runner's logging and evaluate.py: pure functions of the
confusion matrix, plus what one validation pass gathers beside it (PR-curve histograms, the highest-loss
items) in a form that sums or merges across DDP ranks.

Conventions (counts: rows are true classes, columns predictions):
- precision of a class = hits / items predicted as it; None when nothing was predicted as it (0/0).
- recall of a class = hits / its items; None when the split has none of it (0/0).
- F1 = 2PR / (P + R); None for a class with no items, 0.0 for a class with items that was never predicted
  (its recall is 0) or never hit.
- macro-F1 = mean F1 over the classes with items (present in the split); None when no class has items.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from training import distributed

PR_THRESHOLDS = 127  # TensorBoard's default and its maximum (more breaks its protobuf)
MISTAKES = 16  # highest-loss validation items kept for the val/mistakes image
_MIN_COUNT = 1e-7  # TensorBoard's floor on precision and recall denominators


def _counts(confusion: torch.Tensor | np.ndarray) -> np.ndarray:
    counts = confusion.cpu().numpy() if isinstance(confusion, torch.Tensor) else np.asarray(confusion)
    return counts.astype(np.int64)


def precision_recall_f1(confusion: torch.Tensor | np.ndarray) -> dict:
    """Per-class `precision`, `recall`, `f1` (lists, None where undefined) and `f1_macro`, by the
    conventions above."""
    counts = _counts(confusion)
    hits = np.diagonal(counts)
    predicted, items = counts.sum(axis=0), counts.sum(axis=1)
    precision = [float(h / p) if p else None for h, p in zip(hits, predicted)]
    recall = [float(h / n) if n else None for h, n in zip(hits, items)]
    f1 = []
    for p, r in zip(precision, recall):
        if r is None:
            f1.append(None)
        elif p is None or p + r == 0:
            f1.append(0.0)
        else:
            f1.append(2 * p * r / (p + r))
    present = [value for value in f1 if value is not None]
    return {"precision": precision, "recall": recall, "f1": f1,
            "f1_macro": sum(present) / len(present) if present else None}


def pr_buckets(probabilities: torch.Tensor, targets: torch.Tensor, thresholds: int = PR_THRESHOLDS) -> torch.Tensor:
    """One batch's PR-curve histograms, (classes, 2, thresholds) int64 on the batch's device: for each class,
    how many items of that class ([:, 0]) and of other classes ([:, 1]) got a probability in each bucket.
    Buckets as TensorBoard's pr_curve draws them (floor(p * (thresholds - 1))), so histograms of batches and
    ranks add up to the one TensorBoard would compute from every item at once. No host sync (index_add_)."""
    n, classes = probabilities.shape
    # float64, as TensorBoard computes it in numpy: float32 would move items sitting on a bucket edge.
    bucket = (probabilities.double() * (thresholds - 1)).floor().long().clamp_(0, thresholds - 1)
    other = (targets.view(-1, 1) != torch.arange(classes, device=targets.device)).long()  # 0: its own class
    slot = (torch.arange(classes, device=targets.device) * 2 + other) * thresholds + bucket
    histogram = torch.zeros(classes * 2 * thresholds, dtype=torch.int64, device=probabilities.device)
    histogram.index_add_(0, slot.flatten(), torch.ones(n * classes, dtype=torch.int64, device=probabilities.device))
    return histogram.view(classes, 2, thresholds)


def pr_curve(histogram: torch.Tensor | np.ndarray) -> np.ndarray:
    """(6, thresholds) float: TP, FP, TN, FN, precision, recall at each threshold, from one class's
    (2, thresholds) histogram; the same arithmetic as TensorBoard's pr_curve summary."""
    own, other = _counts(histogram).astype(np.float64)
    tp = np.cumsum(own[::-1])[::-1]
    fp = np.cumsum(other[::-1])[::-1]
    tn, fn = fp[0] - fp, tp[0] - tp
    return np.stack((tp, fp, tn, fn, tp / np.maximum(_MIN_COUNT, tp + fp), tp / np.maximum(_MIN_COUNT, tp + fn)))


@dataclass
class Mistakes:
    """The validation items with the highest loss, highest first: uint8 images as the loader gave them
    (before normalisation), their true and predicted classes and losses."""

    images: torch.Tensor  # (k, C, H, W) uint8
    targets: torch.Tensor  # (k,) int64
    predicted: torch.Tensor  # (k,) int64
    losses: torch.Tensor  # (k,) float32, nats

    @staticmethod
    def empty(device: torch.device) -> Mistakes:
        return Mistakes(torch.empty(0, 0, 0, 0, dtype=torch.uint8, device=device),
                        torch.empty(0, dtype=torch.int64, device=device),
                        torch.empty(0, dtype=torch.int64, device=device),
                        torch.empty(0, dtype=torch.float32, device=device))

    def add(self, images: torch.Tensor, targets: torch.Tensor, logits: torch.Tensor, losses: torch.Tensor,
            k: int = MISTAKES) -> Mistakes:
        """The top k of these and one more batch; stays on the device (no host sync)."""
        if len(self.images):
            images, targets = torch.cat([self.images, images]), torch.cat([self.targets, targets])
            predicted, losses = torch.cat([self.predicted, logits.argmax(1)]), torch.cat([self.losses, losses])
        else:
            predicted = logits.argmax(1)
        top = torch.topk(losses, min(k, len(losses))).indices
        return Mistakes(images[top], targets[top], predicted[top], losses[top])

    def across_ranks(self, k: int = MISTAKES) -> Mistakes:
        """The top k of every rank's top k (each rank scored a different shard), on the CPU, on every rank."""
        parts = distributed.gather_objects(
            Mistakes(self.images.cpu(), self.targets.cpu(), self.predicted.cpu(), self.losses.cpu()))
        parts = [part for part in parts if len(part.images)]
        if not parts:
            return Mistakes.empty(torch.device("cpu"))
        merged = Mistakes(*(torch.cat([getattr(p, name) for p in parts])
                            for name in ("images", "targets", "predicted", "losses")))
        top = torch.topk(merged.losses, min(k, len(merged.losses))).indices
        return Mistakes(merged.images[top], merged.targets[top], merged.predicted[top], merged.losses[top])


def class_counts(labels: torch.Tensor, num_classes: int) -> list[int]:
    """Items per class index."""
    return torch.bincount(labels.cpu(), minlength=num_classes).tolist()


def imbalance(counts: list[int]) -> tuple[int, int, float]:
    """(largest class index, smallest class index, their ratio of items); inf when the smallest has none."""
    largest = max(range(len(counts)), key=counts.__getitem__)
    smallest = min(range(len(counts)), key=counts.__getitem__)
    ratio = counts[largest] / counts[smallest] if counts[smallest] else float("inf")
    return largest, smallest, ratio
