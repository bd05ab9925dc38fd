"""LUCIR (Hou et al. 2019): Learning a Unified Classifier Incrementally via Rebalancing.

- cosine-normalised classifier with a learnable scale σ; the backbone's last ReLU removed
  (the ``cosine_`` variant of ``convnet_type`` is used);
- new-class weights imprinted from normalised feature means, scaled to the old weights' mean norm;
- old-class weights frozen in later phases (as the official code does);
- loss = CE + λ·less-forget (1 − cos between new and old normalised features),
  λ = λ_base·sqrt(old/new classes), + margin ranking on old-class samples (K hard new-class
  negatives, margin m, weight lw_mr), the ranking on raw cosines;
- class-balanced finetuning on all exemplars after the memory update, as the official ``cbf_``
  scripts run it (``ft_flag`` 2): the old- and new-class rows of the classifier are trained with σ
  and the backbone fixed (BatchNorm in eval mode), on CE + the margin ranking (the less-forget term
  is constant with the backbone fixed: no gradient, left out), weight decay ``cbf_weight_decay``.
  Its memory holds m exemplars of every class, so each class weighs alike; with CIM the numbers
  per class differ (they depend on the boxes), and ``cbf_balance: classes`` weights each class's
  samples by the inverse of its count to keep every class's weight equal.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from convs.incremental_net import IncrementalNet
from convs.linears import CosineLinear, split_cosine
from convs.registry import backbone_names
from models.base import Batch, Learner, Phase, Stage, schedule_options
from models.losses import cross_entropy, inverse_count_weights, masked_mean
from models.registry import register_learner
from utils.config import Option
from utils.errors import ConfigError


def cosine_backbone_name(convnet_type: str) -> str:
    return convnet_type if convnet_type.startswith("cosine_") else f"cosine_{convnet_type}"


@register_learner("lucir")
class LUCIR(Learner):
    name = "lucir"
    head_kind = "cosine"
    _cbf_weights: torch.Tensor | None = None   # [classes seen] on the device, per phase (cbf_balance "classes")
    # LUCIR's CIFAR-100 schedule (SPEC.md §4): lr 0.1, 160 epochs, milestones [80, 120].
    options = {
        **schedule_options(init_epochs=160, init_lr=0.1, init_milestones=[80, 120], init_weight_decay=5e-4,
                           epochs=160, lr=0.1, milestones=[80, 120], weight_decay=5e-4),
        "lambda_base": Option(5.0, "float", "Less-forget weight base λ_base (λ = λ_base·sqrt(old/new)).", min=0.0),
        "K": Option(2, "int", "Hard negatives (new classes) per old-class sample in the margin ranking loss.", min=1),
        "margin": Option(0.5, "float", "Margin of the ranking loss.", min=0.0),
        "lw_mr": Option(1.0, "float", "Weight of the margin ranking loss.", min=0.0),
        "imprint": Option(True, "bool", "Imprint new-class weights from normalised feature means."),
        "freeze_old_weights": Option(True, "bool", "Keep old-class classifier weights fixed in later phases."),
        "cbf_epochs": Option(20, "int", "Class-balanced finetuning epochs (the classifier's rows only, σ and backbone "
                                        "fixed, CE + margin ranking, on all exemplars); 0 = off.", min=0),
        "cbf_lr": Option(0.01, "float", "Class-balanced finetuning learning rate.", min=0.0),
        "cbf_milestones": Option([10], "int_list", "Class-balanced finetuning lr milestones.", min=0, increasing=True,
                                 milestones_of="cbf_epochs"),
        "cbf_balance": Option("samples", "str", "What class-balanced finetuning balances: samples (every stored "
                                                "exemplar weighs 1, as the official scripts, whose memory holds m "
                                                "per class) or classes (each class's exemplars weighted by "
                                                "N / (classes × its count), so every class weighs alike in an epoch "
                                                "when CIM stores unequal numbers per class; the same as samples "
                                                "when the counts are equal).", choices=("samples", "classes")),
        "cbf_weight_decay": Option(5e-4, "float", "Class-balanced finetuning weight decay (the official scripts use "
                                                  "their training weight decay: 5e-4 CIFAR, 1e-4 ImageNet).", min=0.0),
    }

    @classmethod
    def check_config(cls, cfg: dict) -> None:
        name = cosine_backbone_name(cfg["convnet_type"])
        if name not in backbone_names():
            allowed = [n for n in backbone_names() if n.startswith("cosine_")]
            raise ConfigError(f"Config key 'convnet_type' is '{cfg['convnet_type']}': LUCIR needs a backbone with a "
                              f"cosine variant; allowed: {', '.join(allowed)} (or their names without 'cosine_').")

    # ---- network --------------------------------------------------------------------------
    def before_grow(self, phase: Phase) -> None:
        if phase.index > 0:
            self.snapshot_old_net()

    def grow_network(self, phase: Phase) -> None:
        if self.net is None:
            self.net = IncrementalNet(cosine_backbone_name(self.cfg["convnet_type"]))
            self.net.head = CosineLinear(self.net.feature_dim, phase.last)
            return
        # Every class seen so far becomes fc1 (old), the new classes fc2; σ is kept.
        self.net.head = split_cosine(self.net.head, phase.num_new)

    def begin_phase(self, phase: Phase) -> None:
        if phase.index == 0 or not self.cfg["imprint"]:
            return
        head = self.net.head
        with torch.no_grad():
            target_norm = head.fc1.weight.norm(dim=1).mean()
            for j, c in enumerate(range(phase.first, phase.last)):
                images, index = self.ctx.class_source(c)   # each process decodes its share
                feats = self.ctx.embed(images, lambda x: self.net.backbone(x)["features"],
                                       orig_hw=self.ctx.orig_hw(index), shard=True)
                mean = F.normalize(F.normalize(feats, dim=1).mean(dim=0), dim=0)
                head.fc2.weight[j] = mean.to(head.fc2.weight) * target_norm   # mean: CPU; target_norm: the head's device

    # ---- training -----------------------------------------------------------------------------
    def stages(self, phase: Phase) -> list[Stage]:
        self._cbf_weights = None   # cbf_balance "classes": from the memory this phase's update leaves
        params = self.net.parameters()
        if phase.index > 0 and self.cfg["freeze_old_weights"]:
            frozen = {id(p) for p in self.net.head.fc1.parameters()}
            params = [p for p in self.net.parameters() if id(p) not in frozen]
        stages = [Stage("train", params=params, forward=self.forward, loss=self.loss,
                        train_mode=self.net.train, model=self.net, **self.schedule(phase))]
        if phase.index > 0 and self.cfg["cbf_epochs"] > 0:
            stages.append(Stage(
                "balanced_finetune", epochs=self.cfg["cbf_epochs"], params=self.cbf_parameters(),
                lr=self.cfg["cbf_lr"], lr_key="cbf_lr", weight_decay=self.cfg["cbf_weight_decay"], momentum=self.cfg["momentum"],
                milestones=tuple(self.cfg["cbf_milestones"]), gamma=self.cfg["lr_decay"], scheduler="multistep",
                forward=self.forward_head_only, loss=self.cbf_loss, train_mode=self.net.eval,
                data="memory", after_memory=True, model=self.net.head))
        return stages

    def cbf_parameters(self) -> list[torch.nn.Parameter]:
        """What class-balanced finetuning trains: the old- and new-class rows (``fc1``, ``fc2``),
        not the shared scale σ (the official ``ft_flag`` 2 leaves σ out of its parameter groups)."""
        return [self.net.head.fc1.weight, self.net.head.fc2.weight]

    def forward(self, x, net=None) -> dict:
        out = (net or self.net)(x)
        if self.old_net is not None:
            with torch.no_grad():
                out["old_features"] = self.old_net(x)["features"]
        return out

    def forward_head_only(self, x, net=None) -> dict:
        """Class-balanced finetuning: the frozen backbone's features through the head (``net``
        replaces the head, the model of this stage)."""
        with torch.no_grad():
            feats = self.net.backbone(x)["features"]
        return {"features": feats, **(net or self.net.head)(feats)}

    def cbf_loss(self, out: dict, batch: Batch):
        """Class-balanced finetuning: CE + the margin ranking (the official loss there is the
        training loss; its less-forget term has no gradient with the backbone fixed). With
        ``cbf_balance: classes`` each sample weighs :meth:`cbf_class_weights` of its class."""
        if self.cfg["cbf_balance"] == "samples":
            weights = None
            ce = cross_entropy(out["logits"], batch.y, batch.ce_mask, batch.mask_count)
        else:
            if self._cbf_weights is None:   # once per stage: the memory is updated before it and then fixed
                self._cbf_weights = self.cbf_class_weights(out["logits"].shape[1]).to(batch.y.device)
            weights = self._cbf_weights[batch.y]
            ce = masked_mean(F.cross_entropy(out["logits"], batch.y, reduction="none") * weights,
                             batch.ce_mask, batch.mask_count)
        mr = self.margin_ranking(out["cosine"], batch, weights)
        return ce + mr, {"ce": ce, "mr": mr}

    def cbf_class_weights(self, num_classes: int) -> torch.Tensor:
        """float32 [num_classes]: :func:`models.losses.inverse_count_weights` of the memory's
        exemplars per class, the data of class-balanced finetuning (the same on every rank: the
        memory is)."""
        return inverse_count_weights(torch.tensor(self.ctx.memory.counts(num_classes), dtype=torch.float64))

    def loss(self, out: dict, batch: Batch):
        ce = cross_entropy(out["logits"], batch.y, batch.ce_mask, batch.mask_count)
        if "old_features" not in out:
            return ce, {"ce": ce}
        cos = out["cosine"]
        num_old = self.net.head.fc1.out_dim
        num_new = cos.shape[1] - num_old
        lam = self.cfg["lambda_base"] * math.sqrt(num_old / num_new)
        lf = masked_mean(1 - F.cosine_similarity(out["features"].float(), out["old_features"].float(), dim=1),
                         batch.kd_mask, batch.mask_count) * lam
        mr = self.margin_ranking(cos, batch)
        return ce + lf + mr, {"ce": ce, "lf": lf, "mr": mr}

    def margin_ranking(self, cos: torch.Tensor, batch: Batch, weights: torch.Tensor | None = None) -> torch.Tensor:
        """lw_mr × the mean over old-class rows × K of relu(margin − cos_gt + cos_hard), the K
        hardest new-class cosines of each row (``cos`` [B, old + new], raw cosines); 0 without an
        old-class row. ``weights`` [B]: each row's weight in that mean (None = 1)."""
        num_old = self.net.head.fc1.out_dim
        num_new = cos.shape[1] - num_old
        old_rows = batch.y < num_old
        if batch.kd_mask is not None:   # margin ranking is a distillation term too
            old_rows = old_rows & batch.kd_mask
        # Margin ranking over the old-class rows, computed for every row and masked (no host sync
        # to select the rows: the GPU's queue keeps running); mean over rows x K; 0 without one.
        k = min(self.cfg["K"], num_new)
        c = cos.float()
        gt = c.gather(1, batch.y[:, None])                                # [B, 1]
        hard = c[:, num_old:].topk(k, dim=1).values                       # [B, K]
        ranked = F.relu(self.cfg["margin"] - gt + hard).mean(dim=1)       # [B]
        if weights is not None:
            ranked = ranked * weights
        return masked_mean(ranked, old_rows, batch.mask_count) * self.cfg["lw_mr"]
