"""iCaRL (Rebuffi et al. 2017): herding exemplars, distillation to the previous model, NME.

As in PyCIL: cross-entropy on all seen classes + KD(T) between the new and old model's logits on
the old classes (the original's sigmoid/BCE formulation is not used, so PyCIL's numbers carry over).
The NME classifier is reported by the trainer for every learner with a memory.
"""
from __future__ import annotations

import torch

from models.base import Batch, Phase
from models.finetune import Finetune
from models.losses import cross_entropy, kd_loss
from models.registry import register_learner
from utils.config import Option


@register_learner("icarl", "replay")
class ICaRL(Finetune):
    name = "icarl"
    uses_memory = True
    options = {**Finetune.options,
               "T": Option(2.0, "float", "Distillation temperature.", min=1e-6)}

    def before_grow(self, phase: Phase) -> None:
        if phase.index > 0:
            self.snapshot_old_net()

    def forward(self, x, net=None) -> dict:
        out = (net or self.net)(x)
        if self.old_net is not None:
            with torch.no_grad():
                out["old_logits"] = self.old_net(x)["logits"]
        return out

    def loss(self, out: dict, batch: Batch):
        ce = cross_entropy(out["logits"], batch.y, batch.ce_mask, batch.mask_count)
        if "old_logits" not in out:
            return ce, {"ce": ce}
        old = out["old_logits"].shape[1]
        kd = kd_loss(out["logits"][:, :old], out["old_logits"], self.cfg["T"], batch.kd_mask, batch.mask_count)
        return ce + kd, {"ce": ce, "kd": kd}
