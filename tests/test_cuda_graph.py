"""utils/cuda_graph.py: off a GPU, GraphedStep is the function itself, called every time.

Recording and replaying need a GPU; exps/bench_bilevel.py checks on one that the replayed
bilevel iteration ends where the eager one does (README, issue 10)."""
from __future__ import annotations

import torch

from utils.cuda_graph import GraphedStep


def test_on_a_cpu_every_call_runs_the_function_with_its_inputs():
    state = torch.zeros(3)

    def step(x: torch.Tensor, k: torch.Tensor) -> None:
        state.add_(x * k)

    graphed = GraphedStep(step, torch.device("cpu"), enabled=True, warmup=1)
    for i in range(4):
        graphed(torch.ones(3) * i, torch.tensor(2.0))
    assert state.tolist() == [12.0, 12.0, 12.0]              # 2 · (0 + 1 + 2 + 3)
    assert graphed.calls == 4 and graphed.replays == 0 and graphed.graph is None
    assert graphed.fallback_reason is None
