"""Weight alignment (models/weight_align.py) on hand-made weights, and FOSTER's use of it."""
from __future__ import annotations

import math
import types

import pytest
import torch

from convs.linears import SimpleLinear
from models.base import Phase
from models.foster import FOSTER
from models.weight_align import align_weights, alignment_gamma


def _rows(*norms_and_dims):
    """A weight matrix whose row i is norms[i] · e_{dims[i]} (so its norm is norms[i])."""
    w = torch.zeros(len(norms_and_dims), 4)
    for i, (norm, dim) in enumerate(norms_and_dims):
        w[i, dim] = norm
    return w


def test_new_rows_get_the_old_rows_mean_norm():
    w = _rows((1.0, 0), (3.0, 1), (4.0, 2), (8.0, 3), (6.0, 0))   # old norms 1, 3; new 4, 8, 6
    gamma = alignment_gamma(w, num_old=2)
    assert gamma == pytest.approx(2.0 / 6.0)
    out = align_weights(w, num_old=2)
    assert torch.equal(out[:2], w[:2])                               # old rows untouched
    assert torch.allclose(out[2:], w[2:] * (2.0 / 6.0))
    assert out[2:].norm(dim=1).mean().item() == pytest.approx(out[:2].norm(dim=1).mean().item())
    assert w[2, 2] == 4.0                                            # the input is not modified


def test_wa_value_multiplies_gamma_by_its_power_old_over_new():
    w = _rows((2.0, 0), (1.0, 1), (3.0, 2), (0.5, 3))                # old mean 2, new mean 0.5
    plain = alignment_gamma(w, num_old=3)
    assert plain == pytest.approx(4.0)
    assert alignment_gamma(w, num_old=3, wa_value=0.9) == pytest.approx(plain * 0.9 ** 3)
    assert torch.allclose(align_weights(w, 3, wa_value=0.9)[3], w[3] * plain * 0.9 ** 3)


def test_alignment_needs_old_and_new_rows():
    w = torch.ones(3, 2)
    for num_old in (0, 3):
        with pytest.raises(ValueError):
            align_weights(w, num_old)


def test_foster_aligns_the_given_head_in_place_with_wa_value():
    logged = []
    trainer = types.SimpleNamespace(log=types.SimpleNamespace(info=logged.append))
    learner = FOSTER({"wa_value": 1.0}, trainer)
    head = SimpleLinear(4, 5)
    with torch.no_grad():
        head.weight.copy_(_rows((1.0, 0), (3.0, 1), (4.0, 2), (8.0, 3), (6.0, 0)))
    before = head.weight.detach().clone()
    learner.align(head, Phase(1, 2, 5, ((0, 2), (2, 5))), "student")
    assert torch.equal(head.weight[:2], before[:2])
    assert torch.allclose(head.weight[2:], before[2:] / 3.0)
    assert head.weight.requires_grad                     # still the same trainable parameter
    assert logged and "student" in logged[0] and math.isclose(float(logged[0].split("×")[1]), 1 / 3, rel_tol=1e-3)
