"""DER (Yan et al. 2021): Dynamically Expandable Representation.

- each phase appends a backbone initialised from the newest one; the earlier backbones are frozen
  (no gradients, eval mode, so their BatchNorm statistics stay fixed too);
- the classifier spans the concatenated features of all backbones; its old rows × old columns are
  copied, every other entry is freshly initialised (as PyCIL does);
- loss = CE over all seen classes + ``aux_weight`` · CE of an auxiliary head on the newest backbone's
  features over (new classes + one bucket for all old classes);
- after training a later phase, the new-class rows of the classifier are weight-aligned
  (``models/weight_align.py``).
The original's mask-based pruning is not implemented (PyCIL's DER does not have it either), so the
network grows by one backbone per phase; ``phases[k].params`` in results.json reports its size.
"""
from __future__ import annotations

import torch

from convs.der_net import DERNet, parameter_count
from convs.linears import SimpleLinear, expand_linear
from models.base import Batch, Learner, Phase, schedule_options
from models.losses import cross_entropy
from models.registry import register_learner
from models.weight_align import align_weights, alignment_gamma
from utils.config import Option


@register_learner("der")
class DER(Learner):
    name = "der"
    # DER's CIFAR-100 schedule (SPEC.md §4, PyCIL's models/der.py).
    options = {
        **schedule_options(init_epochs=200, init_lr=0.1, init_milestones=[60, 120, 170], init_weight_decay=5e-4,
                           epochs=170, lr=0.1, milestones=[80, 120, 150], weight_decay=2e-4),
        "aux_weight": Option(1.0, "float", "Weight of the auxiliary loss (CE over new classes + one 'old' bucket, "
                                           "on the newest backbone's features).", min=0.0),
        "weight_align": Option(True, "bool", "Align the norms of the new-class classifier rows to the old ones "
                                             "after each later phase."),
    }

    # ---- network --------------------------------------------------------------------------
    def grow_network(self, phase: Phase) -> None:
        if self.net is None:
            self.net = DERNet(self.cfg["convnet_type"])
            self.net.add_backbone()
            self.net.fc = SimpleLinear(self.net.feature_dim, phase.last)
            return
        self.net.add_backbone()   # a copy of the newest backbone; the earlier ones are frozen
        self.net.fc = expand_linear(self.net.fc, phase.last, in_dim=self.net.feature_dim)
        self.net.aux_fc = SimpleLinear(self.net.backbone_dim, phase.num_new + 1)

    # ---- training -------------------------------------------------------------------------
    # stages()/forward() are the base class's single stage: DERNet.train() keeps the frozen
    # backbones in eval mode and the trainer skips their parameters (requires_grad False).

    def loss(self, out: dict, batch: Batch):
        ce = cross_entropy(out["logits"], batch.y, batch.ce_mask, batch.mask_count)
        if "aux_logits" not in out:
            return ce, {"ce": ce}
        num_old = out["logits"].shape[1] - (out["aux_logits"].shape[1] - 1)
        # Old classes share bucket 0; new class c becomes c - num_old + 1.
        aux_y = torch.where(batch.y >= num_old, batch.y - num_old + 1, torch.zeros_like(batch.y))
        aux = cross_entropy(out["aux_logits"], aux_y, batch.ce_mask, batch.mask_count)
        return ce + self.cfg["aux_weight"] * aux, {"ce": ce, "aux": aux}

    def end_training(self, phase: Phase) -> None:
        if phase.index == 0 or not self.cfg["weight_align"]:
            return
        fc = self.net.fc
        gamma = alignment_gamma(fc.weight, phase.num_old)
        with torch.no_grad():
            fc.weight.copy_(align_weights(fc.weight, phase.num_old))
        self.ctx.log.info(f"  weight alignment: new-class rows × {gamma:.4f}")

    # ---- reporting ------------------------------------------------------------------------
    def phase_report(self, phase: Phase) -> dict:
        return {"params": {"total": parameter_count(self.net),
                           "trainable": parameter_count(self.net, trainable=True),
                           "backbones": len(self.net.backbones)}}
