"""Replaying a step of many small kernels as one CUDA graph.

A step that launches thousands of small kernels (CIM's bilevel iteration: a second-order step
on two batches of 16) leaves a GPU waiting for the host, which spends more time launching the
kernels than the GPU spends running them. A CUDA graph records the launches once and replays
them all with one call. :class:`GraphedStep` does that for a function of tensors whose every
effect is on tensors (parameters, optimiser moments, counters updated in place; no return
value, no host read of a device value, no Python state changed):

* on a CPU, or with ``enabled`` false, each call runs the function (eagerly);
* on a GPU the first ``warmup`` calls run eagerly on a side stream (the warm-up CUDA graphs
  need, for cuDNN's algorithm search and the allocator; they are real calls of the function),
  the next call records the graph with copies of its inputs as the graph's inputs and then
  replays it, and every later call copies its inputs into them and replays;
* when recording fails (e.g. the function reads a device value on the host, which a capture
  forbids, or an autograd graph kept alive from outside holds gradient accumulators made on
  another stream), the call runs eagerly (a failed capture ran none of the function's kernels)
  and the next call records again; after ``attempts`` failures ``on_fallback`` gets the last
  reason and every call runs eagerly from then on.

Replays run the recorded kernels on the recorded buffers: the function must take tensors of the
same shapes and dtypes at every call (a call that differs runs eagerly) and must keep using the
same parameter and state tensors (changed in place, never replaced) for as long as the graph is
kept; drop the :class:`GraphedStep` when they change (a new stage).
"""
from __future__ import annotations

from typing import Callable

import torch


class GraphedStep:
    def __init__(self, fn: Callable[..., None], device: torch.device, enabled: bool = True, warmup: int = 2,
                 on_fallback: Callable[[str], None] | None = None, attempts: int = 2):
        self.fn = fn
        self.use_graph = enabled and torch.device(device).type == "cuda"
        self.warmup = warmup
        self.on_fallback = on_fallback
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: list[torch.Tensor] = []
        self.replays = 0
        self.attempts = attempts
        self.failures: list[str] = []             # why each recording failed
        self.fallback_reason: str | None = None   # the last of them, once the step gave up recording

    @staticmethod
    def _signature(tensors) -> list[tuple]:
        return [(tuple(t.shape), t.dtype, t.device) for t in tensors]

    def __call__(self, *inputs: torch.Tensor) -> None:
        self.calls += 1
        if not self.use_graph:
            self.fn(*inputs)
            return
        if self.graph is not None:
            if self._signature(inputs) != self._signature(self.static):
                self.fn(*inputs)
                return
            for s, x in zip(self.static, inputs):
                s.copy_(x, non_blocking=True)
            self.graph.replay()
            self.replays += 1
            return
        if self.calls <= self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.fn(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            return
        self.static = [x.clone() for x in inputs]
        graph = torch.cuda.CUDAGraph()
        # Other threads of this process poll CUDA events while the graph records: the process
        # group's watchdog under torchrun, and a DataLoader's pin-memory thread (the pinned-memory
        # allocator queries events) while a streamed stage's bilevel batches load. The default
        # "global" mode forbids that in every thread; "thread_local" checks this thread's calls
        # only (as torch.compile's CUDA graphs record).
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.fn(*self.static)
        except Exception as exc:  # noqa: BLE001 - any capture failure: the step still runs, eagerly
            self.static = []
            self.failures.append(f"{type(exc).__name__}: {exc}".splitlines()[0])
            try:
                torch.cuda.synchronize()
            except RuntimeError:   # the capture's own error, reported once more: the context is still usable
                pass
            if len(self.failures) >= self.attempts:
                self.use_graph = False
                self.fallback_reason = self.failures[-1]
                if self.on_fallback is not None:
                    self.on_fallback(self.fallback_reason)
            self.fn(*inputs)
            return
        self.graph = graph
        graph.replay()
        self.replays += 1
