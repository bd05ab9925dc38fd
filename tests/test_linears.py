"""Heads: logits math on hand-made vectors, weight rows, growing heads keeps old rows."""
import math

import pytest
import torch
import torch.nn.functional as F

from convs.linears import (CosineLinear, SimpleLinear, SplitCosineLinear, expand_linear,
                           merge_split_cosine, split_cosine)
from utils.errors import ConfigError


def test_simple_linear():
    head = SimpleLinear(2, 3)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, -1.0]]))
    out = head(torch.tensor([[3.0, 4.0]]))
    torch.testing.assert_close(out["logits"], torch.tensor([[3.0, 8.0, -1.0]]))
    assert head.out_dim == 3 and not hasattr(head, "bias")
    assert head.weight_rows() is head.weight


def test_cosine_linear_hand_made():
    head = CosineLinear(2, 2)
    assert head.sigma.item() == 1.0 and head.sigma.requires_grad
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[2.0, 0.0], [1.0, 1.0]]))
        head.sigma.fill_(4.0)
    out = head(torch.tensor([[3.0, 3.0]]))
    cos = torch.tensor([[1 / math.sqrt(2), 1.0]])
    torch.testing.assert_close(out["cosine"], cos)
    torch.testing.assert_close(out["logits"], 4.0 * cos)
    torch.testing.assert_close(head.weight_rows(), torch.tensor([[1.0, 0.0], [2 ** -0.5, 2 ** -0.5]]))


def test_cosine_linear_without_sigma():
    head = CosineLinear(4, 3, sigma=False)
    assert head.sigma is None
    out = head(torch.randn(5, 4))
    assert out["logits"] is out["cosine"] and out["logits"].abs().max() <= 1 + 1e-6


def test_split_cosine_linear():
    torch.manual_seed(0)
    head = SplitCosineLinear(8, 3, 2)
    assert head.out_dim == 5 and head.fc1.sigma is None and head.fc2.sigma is None
    with torch.no_grad():
        head.sigma.fill_(2.5)
    x = torch.randn(4, 8)
    w = torch.cat([head.fc1.weight, head.fc2.weight])
    cos = F.normalize(x, dim=1) @ F.normalize(w, dim=1).T
    out = head(x)
    torch.testing.assert_close(out["cosine"], cos)
    torch.testing.assert_close(out["logits"], 2.5 * cos)
    torch.testing.assert_close(head.weight_rows(), F.normalize(w, dim=1))
    # one shared scale: 1 sigma + two weight matrices
    assert len(list(head.parameters())) == 3


def test_expand_linear_keeps_old_rows():
    torch.manual_seed(0)
    head = SimpleLinear(6, 4)
    new = expand_linear(head, 10)
    assert new.out_dim == 10 and new is not head and head.out_dim == 4
    assert torch.equal(new.weight[:4], head.weight)
    assert not torch.equal(new.weight[4:], torch.zeros(6, 6))  # fresh init, not zeros
    wide = expand_linear(head, 10, in_dim=9)  # DER/FOSTER: features of a new backbone appended
    assert wide.weight.shape == (10, 9) and torch.equal(wide.weight[:4, :6], head.weight)
    with pytest.raises(ConfigError):
        expand_linear(head, 4)  # the total, not the increment
    with pytest.raises(ConfigError):
        expand_linear(head, 8, in_dim=5)


def test_merge_split_cosine_keeps_rows_and_logits():
    torch.manual_seed(0)
    head = SplitCosineLinear(8, 3, 2)
    with torch.no_grad():
        head.sigma.fill_(7.0)
    merged = merge_split_cosine(head)
    assert isinstance(merged, CosineLinear) and merged.out_dim == 5
    assert torch.equal(merged.weight[:3], head.fc1.weight)
    assert torch.equal(merged.weight[3:], head.fc2.weight)
    assert merged.sigma.item() == 7.0
    x = torch.randn(4, 8)
    torch.testing.assert_close(merged(x)["logits"], head(x)["logits"])


def test_split_cosine_from_either_head():
    torch.manual_seed(0)
    first = CosineLinear(8, 4)
    split = split_cosine(first, 3)
    assert (split.fc1.out_dim, split.fc2.out_dim) == (4, 3)
    assert torch.equal(split.fc1.weight, first.weight)
    again = split_cosine(split, 2)  # next phase: all 7 seen classes become fc1
    assert (again.fc1.out_dim, again.fc2.out_dim) == (7, 2)
    assert torch.equal(again.fc1.weight, torch.cat([split.fc1.weight, split.fc2.weight]))
    with pytest.raises(ConfigError):
        split_cosine(first, 0)
