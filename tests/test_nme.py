"""utils/nme.py: class means (plain and iCaRL/LUCIR's flipped form) and nearest-mean logits."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from utils.nme import class_means, nme_logits


def _official_flipped_mean(d: np.ndarray, d2: np.ndarray) -> np.ndarray:
    """LUCIR's class_means line (and iCaRL's): columns of D, D2 normalised, (D·α + D2·α) / 2, normalised."""
    d = d.T / np.linalg.norm(d.T, axis=0)
    d2 = d2.T / np.linalg.norm(d2.T, axis=0)
    alpha = np.ones(d.shape[1])
    mean = (d @ alpha + d2 @ alpha) / 2
    return mean / np.linalg.norm(mean)


def test_flipped_class_means_follow_the_official_formula():
    """embed(flip=True) gives n(f) + n(f'); summed as given, the mean is the official one (renormalising
    each sum first, as before, weighted exemplars whose mirror disagrees with them more)."""
    g = torch.Generator().manual_seed(0)
    f, f2 = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    pairs = F.normalize(f, dim=1) + F.normalize(f2, dim=1)
    ours = class_means(pairs, torch.zeros(5, dtype=torch.long), 1, normalized=True)[0]
    official = torch.from_numpy(_official_flipped_mean(f.double().numpy(), f2.double().numpy())).float()
    assert torch.allclose(ours, official, atol=1e-6)
    renormalised = class_means(pairs, torch.zeros(5, dtype=torch.long), 1)[0]
    assert not torch.allclose(renormalised, official, atol=1e-3)


def test_plain_class_means_normalise_each_feature_first():
    feats = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    mean = class_means(feats, torch.tensor([0, 0]), 1)[0]
    assert torch.allclose(mean, torch.tensor([1.0, 1.0]) / 2 ** 0.5)


def test_nme_classifies_by_nearest_mean():
    feats = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    means = class_means(feats, torch.tensor([0, 0, 1, 1]), 3)
    assert torch.allclose(means[2], torch.zeros(2))
    pred = nme_logits(torch.tensor([[0.8, 0.3], [0.2, 0.7]]), means).argmax(1)
    assert pred.tolist() == [0, 1]


def test_a_class_without_exemplars_never_wins():
    """A feature with negative cosine to every class mean (LUCIR's features can be negative) went to
    the empty class, whose zero mean scored 0."""
    means = class_means(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 2]), 3)
    logits = nme_logits(torch.tensor([[-1.0, -0.5]]), means)
    assert logits[0, 1] == float("-inf") and logits.argmax(1).item() in (0, 2)
