"""Finetune: plain training on the new classes only — no memory, no distillation (the lower bound)."""
from __future__ import annotations


from convs.incremental_net import IncrementalNet
from convs.linears import SimpleLinear, expand_linear
from models.base import Batch, Learner, Phase, schedule_options
from models.losses import cross_entropy
from models.registry import register_learner


@register_learner("finetune")
class Finetune(Learner):
    name = "finetune"
    uses_memory = False
    # PyCIL's CIFAR schedule for finetune/iCaRL.
    options = schedule_options(init_epochs=200, init_lr=0.1, init_milestones=[60, 120, 170], init_weight_decay=5e-4,
                               epochs=170, lr=0.1, milestones=[80, 120], weight_decay=2e-4)

    def grow_network(self, phase: Phase) -> None:
        if self.net is None:
            self.net = IncrementalNet(self.cfg["convnet_type"])
            self.net.head = SimpleLinear(self.net.feature_dim, phase.last)
        else:
            self.net.head = expand_linear(self.net.head, phase.last)

    def loss(self, out: dict, batch: Batch):
        ce = cross_entropy(out["logits"], batch.y, batch.ce_mask, batch.mask_count)
        return ce, {"ce": ce}
