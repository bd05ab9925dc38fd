"""utils/batching.py: how a streamed source is decoded whole (materialize)."""
from __future__ import annotations

import torch

from utils import batching
from utils.batching import MIN_IMAGES_PER_WORKER, loader_split


def test_loader_split_spreads_the_images_over_the_workers_it_starts():
    assert MIN_IMAGES_PER_WORKER == 32
    assert loader_split(20, 16) == (0, 256)            # too few to start a process for
    assert loader_split(63, 16) == (0, 256)            # one worker's worth: this process reads them
    assert loader_split(64, 16) == (2, 32)
    assert loader_split(300, 2) == (2, 150)            # not 256 + 44
    assert loader_split(1300, 16) == (16, 82)          # every worker busy, not 6 of 16
    assert loader_split(100_000, 16) == (16, 256)      # batches stay at most batch_size
    assert loader_split(1300, 0) == (0, 256)
    assert loader_split(0, 8) == (0, 256)


def test_materialize_decodes_in_order_with_the_workers_of_the_split(tmp_path, monkeypatch):
    from PIL import Image

    from utils.datasets import FileImages

    paths = []
    for i in range(70):
        paths.append(str(tmp_path / f"{i:02d}.png"))
        Image.new("RGB", (10, 8), (i, 255 - i, (7 * i) % 256)).save(paths[-1])
    files = FileImages(paths, 8)
    expected = torch.stack([files[i] for i in range(len(files))])
    started = []
    real = batching.DataLoader

    def recording(*args, **kwargs):
        started.append((kwargs["num_workers"], [len(b) for b in kwargs["batch_sampler"]]))
        return real(*args, **kwargs)
    monkeypatch.setattr(batching, "DataLoader", recording)
    assert torch.equal(batching.materialize(files, num_workers=2), expected)
    assert torch.equal(batching.materialize(batching.select(files, torch.arange(10)), num_workers=2), expected[:10])
    assert started == [(2, [35, 35]), (0, [10])]
