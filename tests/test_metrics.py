"""training.metrics: precision/recall/F1 from the confusion matrix, PR-curve histograms that add up across
batches to TensorBoard's own curve, and the highest-loss items kept by evaluation."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.tensorboard.summary import compute_curve

from datasets.base import ArrayStore, InMemoryDataset
from training import metrics
from training.loaders import build_loader
from training.loop import Normalizer, evaluate

CPU = torch.device("cpu")


def test_precision_recall_f1_follow_their_definitions_item_by_item():
    """Class 0 normal, 1 has items but is never predicted, 2 is predicted but has no items, 3 neither."""
    true = np.array([0, 0, 0, 0, 1, 1, 0])
    predicted = np.array([0, 0, 2, 0, 0, 2, 2])
    confusion = np.zeros((4, 4), dtype=np.int64)
    np.add.at(confusion, (true, predicted), 1)
    result = metrics.precision_recall_f1(torch.from_numpy(confusion))
    assert result == metrics.precision_recall_f1(confusion)  # torch or numpy alike

    def ratio(hits, of):
        return hits.sum() / of.sum() if of.sum() else None

    for c in range(4):
        precision = ratio((true == c) & (predicted == c), predicted == c)
        recall = ratio((true == c) & (predicted == c), true == c)
        assert result["precision"][c] == precision and result["recall"][c] == recall
    assert result["recall"][2] is None and result["precision"][1] is None and result["precision"][3] is None
    p0, r0 = 3 / 4, 3 / 5  # 5 items of class 0, 4 predictions of it, 3 hits
    assert result["f1"] == [pytest.approx(2 * p0 * r0 / (p0 + r0)), 0.0, None, None]
    assert result["f1_macro"] == pytest.approx((2 * p0 * r0 / (p0 + r0) + 0.0) / 2)  # classes with items only
    assert metrics.precision_recall_f1(np.zeros((2, 2)))["f1_macro"] is None


def test_pr_histograms_summed_over_batches_give_tensorboards_curve():
    generator = torch.Generator().manual_seed(0)
    probabilities = torch.softmax(3 * torch.randn(300, 4, generator=generator), dim=1)
    probabilities[:3] = torch.tensor([[1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0.25, 0.25, 0.25, 0.25]])  # bucket edges
    targets = torch.randint(4, (300,), generator=generator)
    histogram = sum(metrics.pr_buckets(p, t) for p, t in zip(probabilities.split(70), targets.split(70)))
    assert histogram.shape == (4, 2, metrics.PR_THRESHOLDS) and int(histogram.sum()) == 300 * 4
    for c in range(4):
        expected = compute_curve((targets == c).numpy(), probabilities[:, c].numpy(), metrics.PR_THRESHOLDS)
        assert np.array_equal(metrics.pr_curve(histogram[c]), expected)


def test_evaluation_keeps_the_highest_loss_items():
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (37, 1, 2, 2), dtype=torch.uint8, generator=generator)
    labels = torch.randint(3, (37,), generator=generator)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    normalize = Normalizer([0.5], [0.25], CPU)
    loader = build_loader(InMemoryDataset(ArrayStore(images, labels)), device=CPU, seed=0, train=False,
                          mode="device", batch_size=5, shuffle=False, num_workers=0, pin_memory=False,
                          persistent_workers=False, prefetch_factor=2)
    val = evaluate(model, loader, normalize, CPU, num_classes=3)

    with torch.no_grad():
        logits = model(normalize(images))
    losses = nn.functional.cross_entropy(logits, labels, reduction="none")
    top = torch.argsort(losses, descending=True)[: metrics.MISTAKES]
    mistakes = val["mistakes"]
    assert torch.equal(mistakes.images, images[top]) and torch.equal(mistakes.targets, labels[top])
    assert torch.equal(mistakes.predicted, logits.argmax(1)[top])
    assert torch.allclose(mistakes.losses, losses[top])
    assert int(val["pr_buckets"].sum()) == 37 * 3


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pr_histograms_and_mistakes_stay_on_the_gpu_without_a_host_sync():
    device = torch.device("cuda")
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(200, 5, generator=generator)
    targets = torch.randint(5, (200,), generator=generator)
    images = torch.randint(0, 256, (200, 1, 3, 3), dtype=torch.uint8, generator=generator)
    losses = nn.functional.cross_entropy(logits, targets, reduction="none")
    probabilities = torch.softmax(logits, 1).to(device)  # from the CPU: the same floats on both sides
    on_gpu = [t.to(device) for t in (images, targets, logits, losses)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync inside raises
    try:
        histogram = metrics.pr_buckets(probabilities, on_gpu[1])
        mistakes = metrics.Mistakes.empty(device)
        for part in zip(*(t.split(64) for t in on_gpu)):
            mistakes = mistakes.add(*part)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(histogram.cpu(), metrics.pr_buckets(torch.softmax(logits, 1), targets))
    top = torch.argsort(losses, descending=True)[: metrics.MISTAKES]
    assert torch.equal(mistakes.images.cpu(), images[top]) and torch.equal(mistakes.targets.cpu(), targets[top])
