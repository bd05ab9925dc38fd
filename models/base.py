"""The learner interface: what a CIL method supplies to the one training loop in ``trainer.py``.

A learner changes its network at the start of a phase, returns the training *stages* of the phase
(each: epochs, parameters, optimiser settings, a forward and the loss of a batch), and may act at
the end of training (e.g. weight alignment). The trainer owns epochs, devices, AMP, data, memory,
evaluation, logging and checkpoints.

The loss of a batch is a function of the outputs of ``stage.forward(x, net)``; passing another
``net`` callable (e.g. the network evaluated with fast weights by ``torch.func.functional_call``)
re-runs the same loss with other parameters — what the CIM bilevel step needs.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable

import torch
from torch import nn

from utils.config import Option


@dataclass(frozen=True)
class Phase:
    """One phase of the protocol. Classes are labels after remapping to class-order position."""

    index: int
    first: int                      # first new class
    last: int                       # one past the last new class (= classes seen after this phase)
    task_bounds: tuple[tuple[int, int], ...]   # class ranges of phases 0..index

    @property
    def num_new(self) -> int:
        return self.last - self.first

    @property
    def num_old(self) -> int:
        return self.first


@dataclass
class Batch:
    """A training batch on the device: inputs ``x`` [B, 3, H, W] float, labels ``y`` [B], ``is_old``
    [B] bool (an old class), ``origin`` [B] int8 (``utils.stage_data``: NEW / EXEMPLAR / SYNTHETIC).

    ``ce_mask`` / ``kd_mask``: bool [B], the samples that count in the classification loss and in
    the distillation terms (a source may leave its samples out of either); None = every sample,
    and then a loss is the plain batch mean (``models.losses.masked_mean`` and friends).

    ``mask_count``: the divisor of a mean over a bool mask [B], which a loss over some rows only
    passes to ``masked_mean`` (and friends). None (one process): the mask's count. Under DDP the
    trainer gives the global batch's count times this shard's share of the global batch, so that
    the shards' terms, weighted by their shares, average to the global batch's masked mean (each
    shard's own count would not). A collective: every rank must call it alike.
    """

    x: torch.Tensor
    y: torch.Tensor
    is_old: torch.Tensor
    origin: torch.Tensor | None = None
    ce_mask: torch.Tensor | None = None
    kd_mask: torch.Tensor | None = None
    mask_count: Callable[[torch.Tensor], torch.Tensor] | None = None


LossFn = Callable[[dict, Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class Stage:
    """One optimisation stage of a phase, run by ``Trainer.run_stage``.

    ``data``: "phase" = the new classes' training images + the old classes' exemplars;
    "memory" = all exemplars, new classes included (a class-balanced set, after the memory update).
    ``scheduler``: "multistep" (``milestones``, ``gamma``), "cosine" (to 0 over ``epochs``) or "constant".
    ``forward(x, net=None)`` returns the outputs the loss needs; ``loss(outputs, batch)`` returns the
    total loss and named parts for the log. ``train_mode()`` puts modules in train/eval mode.
    ``model``: the network this stage trains and ``forward`` calls by default (the CIM bilevel step
    evaluates it with fast weights through ``forward(x, net=...)``, a multi-process run with its
    DistributedDataParallel wrapper); None = not such a stage.
    ``find_unused_parameters``: tell DDP that some trained parameter may get no gradient in a step.
    ``lr_key``: the config key that set ``lr`` (a diverged stage's message names it).
    """

    name: str
    epochs: int
    params: Iterable
    lr: float
    forward: Callable[..., dict]
    loss: LossFn
    train_mode: Callable[[], None]
    weight_decay: float = 0.0
    momentum: float = 0.9
    scheduler: str = "multistep"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    data: str = "phase"
    after_memory: bool = False
    batch_size: int | None = None
    on_end: Callable[[], None] | None = None
    model: nn.Module | None = None
    find_unused_parameters: bool = False   # DDP: a trained parameter may get no gradient in a step
    lr_key: str | None = None


class Learner:
    """Base class. Subclasses set ``name``, ``options`` (their keys with defaults) and the hooks."""

    name: ClassVar[str] = ""
    options: ClassVar[dict[str, Option]] = {}
    uses_memory: ClassVar[bool] = True
    head_kind: ClassVar[str] = "linear"   # "linear" or "cosine": what the CAM should read

    def __init__(self, cfg: dict, ctx: Any):
        self.cfg = cfg
        self.ctx = ctx   # models.context.RunContext: device, embed(), class images, log, ...
        self.net: nn.Module | None = None
        self.old_net: nn.Module | None = None

    @classmethod
    def check_config(cls, cfg: dict) -> None:
        """Cross-key checks beyond types and ranges; raise ConfigError."""

    # ---- phase hooks --------------------------------------------------------------------
    def before_grow(self, phase: Phase) -> None:
        """Before the network changes (e.g. snapshot the old model for distillation)."""

    def grow_network(self, phase: Phase) -> None:
        """Change the network's structure for ``phase`` (deterministic; replayed on resume)."""
        raise NotImplementedError

    def begin_phase(self, phase: Phase) -> None:
        """After ``grow_network``: initialise new weights from data, snapshot the old model."""

    def stages(self, phase: Phase) -> list[Stage]:
        """Default: one stage training every trainable parameter with ``forward``/``loss`` on the
        phase schedule. The network's own ``train()`` decides which parts stay in eval mode."""
        return [Stage("train", params=self.net.parameters(), forward=self.forward, loss=self.loss,
                      train_mode=self.net.train, model=self.net, **self.schedule(phase))]

    def forward(self, x: torch.Tensor, net=None) -> dict:
        """The training forward; ``net`` replaces ``self.net`` (e.g. a functional fast-weight call)."""
        return (net or self.net)(x)

    def loss(self, out: dict, batch: Batch):
        raise NotImplementedError

    def end_training(self, phase: Phase) -> None:
        """After the stages that come before the memory update (e.g. weight alignment)."""

    # ---- deployed model -----------------------------------------------------------------
    def inference(self, x: torch.Tensor) -> dict:
        """The deployed model in eval mode: {"logits": [B, C], "features": [B, d]}."""
        out = self.net(x)
        return {"logits": out["logits"], "features": out["features"]}

    def cam_network(self) -> nn.Module:
        """The network whose class activation maps choose the exemplar boxes (SPEC.md §3 step 1):
        its forward gives "fmap" [B, C, h, w] and its ``classifier.weight_rows()`` is [classes, C]."""
        return self.net

    def extra_evaluations(self) -> dict[str, Callable[[torch.Tensor], dict]]:
        """Other models to evaluate after a phase, by name (e.g. FOSTER's teacher)."""
        return {}

    def phase_report(self, phase: Phase) -> dict:
        """Extra fields for ``results.json`` ``phases[k]``."""
        return {}

    def modules(self) -> dict[str, nn.Module]:
        """Every module whose state must be checkpointed, by name."""
        return {"net": self.net}

    def eval_mode(self) -> None:
        """Every module of :meth:`modules` in eval mode (evaluation, feature extraction, probes)."""
        for m in self.modules().values():
            if m is not None:
                m.eval()

    # ---- helpers for subclasses --------------------------------------------------------
    def snapshot_old_net(self) -> None:
        """Frozen copy of the current network, the teacher of distillation losses."""
        self.old_net = copy.deepcopy(self.net).eval()
        for p in self.old_net.parameters():
            p.requires_grad_(False)

    def schedule(self, phase: Phase) -> dict:
        """The phase-0 or later-phase optimiser settings from the common schedule keys."""
        c = self.cfg
        if phase.index == 0:
            return dict(epochs=c["init_epochs"], lr=c["init_lr"], lr_key="init_lr", weight_decay=c["init_weight_decay"],
                        milestones=tuple(c["init_milestones"]), scheduler=c["scheduler"],
                        gamma=c["lr_decay"], momentum=c["momentum"])
        return dict(epochs=c["epochs"], lr=c["lr"], lr_key="lr", weight_decay=c["weight_decay"],
                    milestones=tuple(c["milestones"]), scheduler=c["scheduler"],
                    gamma=c["lr_decay"], momentum=c["momentum"])

    def state_dict(self) -> dict:
        return {name: m.state_dict() for name, m in self.modules().items() if m is not None}

    def load_state_dict(self, state: dict) -> None:
        for name, m in self.modules().items():
            if m is not None:
                m.load_state_dict(state[name])


def schedule_options(init_epochs: int, init_lr: float, init_milestones: list[int], init_weight_decay: float,
                     epochs: int, lr: float, milestones: list[int], weight_decay: float,
                     scheduler: str = "multistep", lr_decay: float = 0.1, momentum: float = 0.9) -> dict[str, Option]:
    """The schedule keys shared by learners, with a learner's own defaults."""
    return {
        "init_epochs": Option(init_epochs, "int", "Epochs of phase 0.", min=0),
        "init_lr": Option(init_lr, "float", "Learning rate of phase 0.", min=0.0),
        "init_milestones": Option(init_milestones, "int_list", "Phase-0 epochs where the lr is multiplied by lr_decay (multistep).", min=0, increasing=True,
                                  only_with=("scheduler", "multistep"), milestones_of="init_epochs"),
        "init_weight_decay": Option(init_weight_decay, "float", "Weight decay of phase 0.", min=0.0),
        "epochs": Option(epochs, "int", "Epochs of each later phase.", min=0),
        "lr": Option(lr, "float", "Learning rate of later phases.", min=0.0),
        "milestones": Option(milestones, "int_list", "Later-phase epochs where the lr is multiplied by lr_decay (multistep).", min=0, increasing=True,
                             only_with=("scheduler", "multistep"), milestones_of="epochs"),
        "weight_decay": Option(weight_decay, "float", "Weight decay of later phases.", min=0.0),
        "scheduler": Option(scheduler, "str", "Learning-rate schedule.", choices=("multistep", "cosine", "constant")),
        "lr_decay": Option(lr_decay, "float", "Multistep decay factor.", min=0.0, max=1.0),
        "momentum": Option(momentum, "float", "SGD momentum.", min=0.0, max=1.0),
    }
