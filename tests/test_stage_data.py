"""A stage's data from a list of sources: origins, the epoch pass, ratio mixing, loss masks."""
from __future__ import annotations

import torch

from utils import batching
from utils.stage_data import EXEMPLAR, NEW, SYNTHETIC, SourceData, StageData, epoch_class_counts


def _source(name, n, origin, label0=0, ratio=None, **kw):
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2).clone() + 100 * origin
    return SourceData(name, images, torch.arange(n) % 3 + label0, origin, ratio=ratio, **kw)


def test_assembly_keeps_source_order_and_tags_every_sample():
    new = SourceData("new", torch.zeros(5, 3, 2, 2, dtype=torch.uint8), torch.full((5,), 4), NEW, torch.arange(10, 15))
    data = StageData.assemble([new, _source("exemplars", 3, EXEMPLAR)])
    assert len(data) == 8 and data.origin.tolist() == [NEW] * 5 + [EXEMPLAR] * 3
    assert data.index.tolist() == list(range(10, 15)) + [-1] * 3
    assert data.counts() == {"new": 5, "exemplar": 3}
    assert data.loss_masks(data.origin) == (None, None)


def test_the_epoch_order_is_a_plain_shuffled_pass_and_mixing_leaves_it_alone():
    parts = [_source("new", 10, NEW), _source("exemplars", 4, EXEMPLAR)]
    plain = StageData.assemble(parts)
    mixed = StageData.assemble(parts + [_source("synthetic", 7, SYNTHETIC, label0=5, ratio=0.5)])
    reference = list(batching.iterate(plain.images, plain.labels, batch_size=4, generator=torch.Generator().manual_seed(1),
                                      min_batch=2))
    a = list(plain.batches(4, torch.Generator().manual_seed(1)))
    b = list(mixed.batches(4, torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)))
    assert len(a) == len(b) == len(reference) == 4                        # 14 samples: 4+4+4+2
    for (ref_imgs, ref_y), x, y in zip(reference, a, b):
        assert torch.equal(x.images, ref_imgs) and torch.equal(x.labels, ref_y)
        n = len(ref_y)
        assert torch.equal(y.images[:n], ref_imgs) and torch.equal(y.labels[:n], ref_y)
        extra = round(0.5 * n)
        assert len(y.labels) == n + extra and y.origin[n:].tolist() == [SYNTHETIC] * extra
        assert bool((y.labels[n:] >= 5).all()) and y.index[n:].tolist() == [-1] * extra
    # The mixed draws cycle through shuffled passes: 2+2+2+1 = 7 draws, every synthetic image once.
    drawn = torch.cat([y.images[len(r[1]):, 0, 0, 0] for r, y in zip(reference, b)])
    assert sorted(drawn.tolist()) == [200 + i for i in range(7)]


def test_a_source_can_leave_its_samples_out_of_a_loss():
    data = StageData.assemble([_source("new", 3, NEW), _source("synthetic", 3, SYNTHETIC, in_kd=False)])
    ce, kd = data.loss_masks(torch.tensor([NEW, SYNTHETIC, EXEMPLAR], dtype=torch.int8))
    assert ce is None and kd.tolist() == [True, False, True]


def test_epoch_class_counts_known_answers():
    """Once each for an epoch source; a ratio source's expected draws, round(r·b) per batch of b."""
    pool = SourceData("synthetic", torch.zeros(4, 3, 2, 2, dtype=torch.uint8), torch.tensor([0, 0, 0, 1]), SYNTHETIC)
    assert epoch_class_counts(pool, 10, 4, 3).tolist() == [3.0, 1.0, 0.0]
    mixed = SourceData("synthetic", pool.images, pool.labels, SYNTHETIC, ratio=0.5)
    # batches of 4, 4, 2: 2 + 2 + 1 = 5 draws, 3/4 of them class 0
    assert epoch_class_counts(mixed, 10, 4, 3).tolist() == [3.75, 1.25, 0.0]
    # a last batch of 1 is dropped (BatchNorm), and draws nothing
    assert epoch_class_counts(mixed, 9, 4, 2).tolist() == [3.0, 1.0]


def test_epoch_class_counts_match_what_the_batches_draw():
    """Per class, averaged over epochs, the draws of a ratio source are the expected counts; on two
    processes a global batch too small to split (under 2 samples a process) draws nothing."""
    new = _source("new", 10, NEW)
    mixed = SourceData("synthetic", torch.zeros(8, 3, 2, 2, dtype=torch.uint8), torch.tensor([3] * 6 + [4] * 2),
                       SYNTHETIC, ratio=0.4)
    data = StageData.assemble([new, mixed])
    drawn, epochs = torch.zeros(5), 60
    mix = torch.Generator().manual_seed(1)
    for epoch in range(epochs):
        for b in data.batches(3, torch.Generator().manual_seed(epoch), mix):
            drawn += torch.bincount(b.labels[b.origin == SYNTHETIC], minlength=5).float()
    expected = epoch_class_counts(mixed, 10, 3, 5)
    assert expected.tolist() == [0, 0, 0, 2.25, 0.75]           # batches 3, 3, 3 (1 dropped): 1 draw each
    assert torch.allclose(drawn / epochs, expected, atol=0.25), drawn / epochs
    # two processes, global batch 4: batches 4, 4 (2 a process) kept, the last of 2 (1 a process) dropped
    assert epoch_class_counts(mixed, 10, 4, 5, world=2).tolist() == [0, 0, 0, 3.0, 1.0]   # 4, 4 kept; 2 dropped
