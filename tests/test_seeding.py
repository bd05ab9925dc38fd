"""utils/seeding.py: per-phase seeds and named streams."""
from __future__ import annotations

import torch

from utils.seeding import phase_seed, stream_seed


def test_stream_seeds_are_deterministic_and_apart_from_every_phase_seed():
    assert stream_seed(1993, 3, "cim") == stream_seed(1993, 3, "cim")
    phase_seeds = {phase_seed(s, k) for s in (0, 1, 1993) for k in range(50)}
    streams = {stream_seed(s, k, name) for s in (0, 1, 1993) for k in range(50) for name in ("cim", "replay")}
    assert len(streams) == 300 and not streams & phase_seeds
    assert all(0 <= x < 2 ** 63 for x in streams)
    # usable as a torch seed, and different streams give different numbers
    a = torch.rand(4, generator=torch.Generator().manual_seed(stream_seed(1993, 0, "cim")))
    b = torch.rand(4, generator=torch.Generator().manual_seed(stream_seed(1993, 1, "cim")))
    assert not torch.equal(a, b)
