"""models/losses.py: the shared loss terms' known answers (FOSTER's class-balanced terms: test_foster.py)."""
from __future__ import annotations

import torch

from models.losses import inverse_count_weights, masked_mean


def test_inverse_count_weights_make_every_present_class_weigh_alike():
    w = inverse_count_weights(torch.tensor([2.0, 4.0, 0.0, 6.0]))
    # N = 12 over C' = 3 present classes: each class's samples sum to 4; the absent class gets 0
    assert torch.allclose(w, torch.tensor([2.0, 1.0, 0.0, 2 / 3]))
    assert torch.allclose(w * torch.tensor([2.0, 4.0, 0.0, 6.0]), torch.tensor([4.0, 4.0, 0.0, 4.0]))
    assert w.dtype == torch.float32
    # equal counts: exactly ones, so a weighted mean is the plain mean, bit for bit
    assert torch.equal(inverse_count_weights(torch.tensor([3.0, 3.0, 3.0])), torch.ones(3))
    assert torch.equal(inverse_count_weights(torch.zeros(2)), torch.zeros(2))


def test_masked_mean_divides_by_the_mask_count_and_gives_0_for_an_empty_mask():
    v = torch.tensor([1.0, 2.0, 3.0, 6.0])
    assert masked_mean(v, None) == 3.0
    assert masked_mean(v, torch.tensor([True, False, True, False])) == 2.0
    assert masked_mean(v, torch.zeros(4, dtype=torch.bool)) == 0.0
