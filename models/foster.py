"""FOSTER (Wang et al. 2022): Feature Boosting and Compression.

Phase 0 trains one backbone with plain cross-entropy. Every later phase has two stages:

1. **Boosting.** The teacher (``convs/foster_net.py``) = the old model's backbone and head, frozen,
   + a new backbone copied from the old one, a classifier ``fc`` over both backbones and a head
   ``fe_fc`` over the new backbone alone. Loss =
   CE(logits / w_β1) + CE(fe_logits) + λ_okd · KD_T(logits[:, :old], old model's logits),
   with class-balanced weights w_β1 from per-class sample counts n_c (``balance_counts``): by
   default the **real** samples of the phase data — old classes: their exemplars in memory, new
   classes: their training images (counts, never a sum of indices); "seen" adds the synthetic replay
   images that count in the loss; "budget" counts old classes as the official code does (their
   uncompressed quota, fewer than CIM stores). The weights are set when the stages are built, after
   the plugins' ``before_phase`` (synthetic images loaded).
   Optional weight alignment of the teacher's new-class rows (``is_teacher_wa``).
2. **Compression.** A one-backbone student, initialised as the old model with fresh new-class rows
   (PyCIL: old backbone + old head copied), learns from the frozen teacher by class-balanced KD
   (weights w_β2 applied to the teacher's softened probabilities). Optional student weight alignment.

Which model is deployed after a phase (``foster_deploy``, SPEC.md §4): by default the two-backbone
**teacher**, as PyCIL and the official CIM code — it is ``phases[k].cnn``, its features choose the
exemplars (herding) and give the NME class means, so the published FOSTER figures compare with ours.
The other model is reported too, as ``phases[k].student`` (or ``phases[k].teacher`` with
``foster_deploy: student``, which evaluates and herds with the student instead). In phase 0 the
single network is both. Either way the student is the model carried into the next phase (the next
teacher is built on it), so at most two backbones are ever trained together.

With CIM (``compression: cim``) the old backbone's Padé units are frozen with the rest of it, and
the student keeps the old backbone's units (official code); only the new backbone's are trained.

As in PyCIL and the official FOSTER code: SGD with cosine schedules; the compression stage uses the
boosting learning rate and no weight decay; the λ_okd·KD term is not scaled by old/total classes
(PyCIL only scales the value it logs).
"""
from __future__ import annotations

import functools

import torch

from convs.activation import activation_sites
from convs.der_net import clone_backbone, parameter_count
from convs.foster_net import FosterNet
from convs.incremental_net import IncrementalNet
from convs.linears import SimpleLinear, expand_linear
from models.base import Batch, Learner, Phase, Stage, schedule_options
from models.losses import balanced_kd_loss, class_balanced_weights, cross_entropy, kd_loss
from models.registry import register_learner
from models.weight_align import align_weights, alignment_gamma
from utils.config import Option
from utils.errors import ConfigError


@register_learner("foster")
class FOSTER(Learner):
    name = "foster"
    # PyCIL's FOSTER schedule (exps/foster.json); milestones are unused with the cosine schedule.
    options = {
        **schedule_options(init_epochs=200, init_lr=0.1, init_milestones=[], init_weight_decay=5e-4,
                           epochs=170, lr=0.1, milestones=[], weight_decay=5e-4, scheduler="cosine"),
        "compression_epochs": Option(None, "int", "Epochs of the compression stage of later phases (`epochs`, `lr` and "
                                                  "`weight_decay` are the boosting stage's); null = `epochs` "
                                                  "(the official configs use 130).", min=0, nullable=True),
        "compression_lr": Option(None, "float", "Learning rate of the compression stage; null = `lr` (as PyCIL).",
                                 min=0.0, nullable=True),
        "compression_weight_decay": Option(0.0, "float", "Weight decay of the compression stage "
                                                         "(PyCIL and the official code use none).", min=0.0),
        "beta1": Option(0.96, "float", "β of the class-balanced weights that divide the teacher's logits in "
                                       "boosting (0 = no balancing; must be < 1).", min=0.0),
        "beta2": Option(0.97, "float", "β of the class-balanced weights of the compression KD (must be < 1).", min=0.0),
        "T": Option(2.0, "float", "Distillation temperature (boosting KD and compression KD).", min=1e-6),
        "lambda_okd": Option(1.0, "float", "Weight of the KD to the old model in boosting.", min=0.0),
        "is_teacher_wa": Option(False, "bool", "Weight-align the teacher's new-class rows after boosting."),
        "is_student_wa": Option(False, "bool", "Weight-align the student's new-class rows after compression."),
        "wa_value": Option(1.0, "float", "Extra alignment factor: gamma is multiplied by wa_value^(old/new).", min=0.0),
        "balance_counts": Option("real", "str", "n_c of the class-balanced weights (beta1, beta2): real = training "
                                                "images and stored exemplars (SPEC); seen = also the synthetic replay "
                                                "images that count in the loss (CE for beta1, KD for beta2; with its "
                                                "`ratio`, their expected draws); budget = old classes at their "
                                                "uncompressed quota (memory_per_class with fixed_memory, else "
                                                "memory_size // old classes), as the official FOSTER and CIM code "
                                                "count them, fewer than CIM stores. seen and real agree without "
                                                "synthetic replay.",
                                 choices=("real", "seen", "budget")),
        "foster_deploy": Option("teacher", "str", "Model evaluated as `cnn`, used for herding and NME after a later "
                                                  "phase: the two-backbone teacher (PyCIL, official CIM code) or the "
                                                  "student; the other is reported as an extra evaluation.",
                                choices=("teacher", "student")),
    }

    def __init__(self, cfg: dict, ctx):
        super().__init__(cfg, ctx)
        self.teacher: FosterNet | None = None
        self.boost_weights: torch.Tensor | None = None     # [classes], from beta1
        self.distill_weights: torch.Tensor | None = None   # [classes], from beta2

    @classmethod
    def check_config(cls, cfg: dict) -> None:
        for key in ("beta1", "beta2"):
            if not 0.0 <= cfg[key] < 1.0:
                raise ConfigError(f"Config key '{key}' is {cfg[key]}; it must be in [0, 1).")

    # ---- network --------------------------------------------------------------------------
    def grow_network(self, phase: Phase) -> None:
        self.teacher = None   # the previous phase's teacher is not needed any more
        convnet = self.cfg["convnet_type"]
        if self.net is None:
            self.net = IncrementalNet(convnet)
            self.net.head = SimpleLinear(self.net.feature_dim, phase.last)
            return
        old = self.net
        self.teacher = FosterNet(old, phase.last, convnet)   # takes over old's backbone and head, frozen
        student = IncrementalNet(convnet)
        student.backbone = clone_backbone(old.backbone, convnet)
        student.head = expand_linear(old.head, phase.last)
        self.net = student

    def set_balance_weights(self, phase: Phase) -> None:
        """The class-balanced weights of boosting (β1, from the CE's n_c) and of the compression KD (β2,
        from the distillation's n_c), with n_c as ``balance_counts`` says."""
        how = self.cfg["balance_counts"]
        counts = self.ctx.class_counts(phase)
        if how == "budget":
            counts[:phase.first] = float(self.ctx.memory.class_budget(phase.first))
        added = self.ctx.added_counts(phase) if how == "seen" else {"ce": 0.0, "kd": 0.0}
        counts, kd_counts = counts + added["ce"], counts + added["kd"]
        device = self.ctx.device
        self.boost_weights = class_balanced_weights(counts, self.cfg["beta1"]).to(device)
        self.distill_weights = class_balanced_weights(kd_counts, self.cfg["beta2"]).to(device)

        def shown(c):
            n = [round(v, 2) if v != int(v) else int(v) for v in c.tolist()]
            return f"old {n[:phase.first]}, new {n[phase.first:]}"
        self.ctx.log.info(f"  class counts ({self.cfg['balance_counts']}): {shown(counts)}")
        if not torch.equal(counts, kd_counts):
            self.ctx.log.info(f"  class counts of the compression KD: {shown(kd_counts)}")
        self.ctx.log.info(f"  class-balanced weights (beta1 {self.cfg['beta1']}): "
                              f"old {self.boost_weights[0].item():.4f}, new {self.boost_weights[-1].item():.4f}")

    # ---- training -------------------------------------------------------------------------
    def stages(self, phase: Phase) -> list[Stage]:
        c = self.cfg
        sched = self.schedule(phase)
        if phase.index == 0:
            return [Stage("train", params=self.net.parameters(), forward=self.forward, loss=self.ce_loss,
                          train_mode=self.net.train, model=self.net, **sched)]
        self.set_balance_weights(phase)   # here: after the plugins' before_phase (synthetic images loaded)
        boosting = Stage(
            "boosting", params=self.teacher.parameters(), forward=self.forward_boosting, loss=self.boosting_loss,
            train_mode=self.teacher.train,   # FosterNet.train() keeps the old backbone in eval mode
            model=self.teacher,
            on_end=functools.partial(self.align, self.teacher.fc, phase, "teacher") if c["is_teacher_wa"] else None,
            **sched)
        compression = Stage(
            "compression", params=self.net.parameters(), forward=self.forward_compression,
            loss=self.compression_loss, train_mode=self.train_student, model=self.net,
            on_end=functools.partial(self.align, self.net.head, phase, "student") if c["is_student_wa"] else None,
            **{**sched,
               "epochs": c["compression_epochs"] if c["compression_epochs"] is not None else sched["epochs"],
               "lr": c["compression_lr"] if c["compression_lr"] is not None else sched["lr"],
               "lr_key": "compression_lr" if c["compression_lr"] is not None else sched["lr_key"],
               "weight_decay": c["compression_weight_decay"]})
        return [boosting, compression]

    def end_training(self, phase: Phase) -> None:
        """The student keeps the Padé units of the old backbone (the CIM model, if any; official
        code: its next student is built from the old backbone, whose units were frozen with it).
        The clone made in ``grow_network`` already holds them; copying makes it explicit."""
        if self.teacher is None:
            return
        with torch.no_grad():
            for src, dst in zip(activation_sites(self.teacher.backbones[0]), activation_sites(self.net.backbone)):
                if src.pau is not None and dst.pau is not None:
                    dst.pau.load_state_dict(src.pau.state_dict())

    def train_student(self) -> None:
        self.net.train()
        self.teacher.eval()

    def forward(self, x, net=None) -> dict:
        return (net or self.net)(x)

    def ce_loss(self, out: dict, batch: Batch):
        ce = cross_entropy(out["logits"], batch.y, batch.ce_mask, batch.mask_count)
        return ce, {"ce": ce}

    def forward_boosting(self, x, net=None) -> dict:
        return (net or self.teacher)(x)

    def boosting_loss(self, out: dict, batch: Batch):
        logits = out["logits"].float()
        old_logits = out["old_logits"].detach()
        clf = cross_entropy(logits / self.boost_weights, batch.y, batch.ce_mask, batch.mask_count)
        fe = cross_entropy(out["fe_logits"].float(), batch.y, batch.ce_mask, batch.mask_count)
        kd = self.cfg["lambda_okd"] * kd_loss(logits[:, :old_logits.shape[1]], old_logits, self.cfg["T"],
                                               batch.kd_mask, batch.mask_count)
        return clf + fe + kd, {"clf": clf, "fe": fe, "kd": kd}

    def forward_compression(self, x, net=None) -> dict:
        out = (net or self.net)(x)
        with torch.no_grad():
            out["teacher_logits"] = self.teacher(x)["logits"]
        return out

    def compression_loss(self, out: dict, batch: Batch):
        bkd = balanced_kd_loss(out["logits"], out["teacher_logits"], self.cfg["T"], self.distill_weights,
                               batch.kd_mask, batch.mask_count)
        return bkd, {"bkd": bkd}

    def align(self, head: SimpleLinear, phase: Phase, which: str) -> None:
        gamma = alignment_gamma(head.weight, phase.num_old, self.cfg["wa_value"])
        with torch.no_grad():
            head.weight.copy_(align_weights(head.weight, phase.num_old, self.cfg["wa_value"]))
        self.ctx.log.info(f"  weight alignment ({which}): new-class rows × {gamma:.4f}")

    # ---- deployed model, teacher, checkpoint ------------------------------------------------
    def teacher_inference(self, x: torch.Tensor) -> dict:
        out = (self.teacher if self.teacher is not None else self.net)(x)
        return {"logits": out["logits"], "features": out["features"]}

    def student_inference(self, x: torch.Tensor) -> dict:
        out = self.net(x)
        return {"logits": out["logits"], "features": out["features"]}

    def inference(self, x: torch.Tensor) -> dict:
        """The deployed model (``foster_deploy``): evaluation "cnn", herding features, NME means."""
        return self.teacher_inference(x) if self.cfg["foster_deploy"] == "teacher" else self.student_inference(x)

    def cam_network(self):
        """The teacher (both backbones) once it exists; in phase 0 the single network."""
        return self.teacher if self.teacher is not None else self.net

    def extra_evaluations(self) -> dict:
        if self.cfg["foster_deploy"] == "teacher":
            return {"student": self.student_inference}
        return {"teacher": self.teacher_inference}

    def modules(self) -> dict:
        # The teacher of the last finished phase is checkpointed too (it is rebuilt by grow_network
        # on resume, then loaded); it is dropped when the next phase grows the network.
        return {"net": self.net, "teacher": self.teacher}

    def phase_report(self, phase: Phase) -> dict:
        return {"deployed": self.cfg["foster_deploy"] if self.teacher is not None else "single network",
                "params": {"total": parameter_count(self.net), "backbones": 1,
                           "teacher_total": parameter_count(self.teacher) if self.teacher is not None else None,
                           "teacher_backbones": 2 if self.teacher is not None else None}}
