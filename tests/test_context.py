"""models/context.py: what learners and plugins see of a run; here, the precision of its passes."""
from __future__ import annotations

import sys

import torch

from conftest import run, tiny_config
from models.context import RunContext

# Innermost first: the function of the trainer or the context that a forward pass belongs to.
INFERENCE_PASSES = ("embed", "cams", "evaluate", "check_outputs_finite")


def _pass_of_current_forward() -> str | None:
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_name
        if name in INFERENCE_PASSES:
            return name
        if name == "run_stage":
            return "training"
        frame = frame.f_back
    return None


def _autocast_by_pass(tmp_path, monkeypatch, **overrides) -> dict[str, set[bool]]:
    """A 2-phase LUCIR + CIM run whose training precision (``RunContext.autocast``) is bf16 autocast
    on the CPU, as ``amp`` makes it on CUDA: {pass: the autocast states its convolutions ran under}."""
    monkeypatch.setattr(RunContext, "autocast", lambda self: torch.autocast("cpu", dtype=torch.bfloat16))
    seen: dict[str, set[bool]] = {}

    def record(module, args):
        if isinstance(module, torch.nn.Conv2d):
            seen.setdefault(_pass_of_current_forward(), set()).add(torch.is_autocast_enabled("cpu"))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        run(tiny_config(model_name="lucir", compression="cim", num_phases=2, init_epochs=1, epochs=1,
                        cbf_epochs=1, cbf_milestones=[], **overrides), tmp_path / "run")
    finally:
        handle.remove()
    return seen


def test_inference_passes_run_in_float32_while_training_runs_in_bf16(tmp_path, monkeypatch):
    """Evaluation, herding / NME / imprinting features (``embed``), CIM's CAMs and the divergence
    probe never run under the training's bf16 autocast by default (the published code is float32
    throughout, and herding picks by small differences of summed features); ``amp_inference`` puts
    them all under it."""
    seen = _autocast_by_pass(tmp_path / "default", monkeypatch)
    assert set(INFERENCE_PASSES) <= set(seen), seen            # every inference pass ran
    assert True in seen["training"]                            # training itself ran under bf16
    assert all(seen[name] == {False} for name in INFERENCE_PASSES), seen
    seen = _autocast_by_pass(tmp_path / "amp", monkeypatch, amp_inference=True)
    assert all(seen[name] == {True} for name in INFERENCE_PASSES), seen

