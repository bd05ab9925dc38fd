"""Class-incremental exemplar compression (CIM, CVPR 2023) as a plugin for every learner.

Config key ``compression`` picks the policy (SPEC.md §3 step 8; same memory budget for all):

* ``none``   — plain exemplars (the plugin is off);
* ``full``   — the whole exemplar downsampled (empty box, cost 1/η);
* ``random`` — a box of area ``box_area`` at a random position;
* ``center`` — a centred box of area ``box_area``;
* ``cam``    — the box around the CIL model's CAM above ``mask_threshold``;
* ``cim``    — the same with the CAM of the CIM model (the network with every activation replaced by
  its learnable Padé unit, φ trained by the bilevel step below).

What the plugin does in a phase (hooks of ``models/plugins.py``):

1. ``after_grow``: with ``cim``, every activation site of the learner's networks gets a PAU
   (initialised to the ReLU fit); new backbones of DER/FOSTER copy their source's PAUs.
2. Artifact augmentation (``before_augment``): a new-class training image is replaced by its
   compressed version with probability p = ``randombbxblur_prob_incre`` · ⌊epoch /
   ``cam_update_interval``⌋; the boxes of the new-class images are recomputed every
   ``cam_update_interval`` epochs. Old-class exemplars come from the memory already compressed.
   A later stage on the phase data that does not train the CAM network (FOSTER's compression)
   keeps the p and boxes the CAM-training stage ended with.
3. Bilevel step (``after_epoch``, ``cim`` only, stages that train the CAM network on the phase
   data): ``int(num_meta_iters_per_cls × new classes)`` mask-level iterations (SPEC.md §3.2),
   written once for every learner through ``Stage.forward(x, net)`` and ``Stage.loss``. An
   iteration never reads the device (a non-finite one is skipped there, ``utils.masked_adam``), so
   on a GPU it is recorded once per stage as a CUDA graph and replayed (``utils.cuda_graph``).
4. ``compressor``: the boxes of the memory update (computed with the final model of the phase).
5. ``after_phase``: ``exemplars_phase_<k>.png`` (stored exemplars, kept box, CAM overlay).

With several processes (torchrun): rank 0 alone runs the bilevel iterations after each epoch and
then broadcasts φ, so the CIM model is the same on every rank. Their batches and augmentation draw
from a generator of their own (``meta_generator``), so the draws every rank makes (the picks below)
come from a generator that rank 0's bilevel step leaves untouched. The CAM boxes are computed in shares,
each rank the CAMs of a contiguous share of the images: for artifact augmentation they are
gathered here, so every rank holds all boxes (``refresh_boxes``); the memory update's
``compressor`` gives the boxes of the share the trainer hands it, which the trainer gathers with
the share's features (each rank decodes only its share). Before a
refresh during a stage the CAM network takes rank 0's BatchNorm statistics, which each rank
otherwise updates on its own shard, so the boxes are those rank 0's network gives. Each rank draws
which of its new-class images to compress for the whole global batch and keeps its shard's draws
(the same picks as one process, and the generator in step on every rank; the boxes of the
policies that ignore the pixels, ``random``'s too, are drawn in full by every rank for the same
reason, without reading an image). The figure is drawn on rank 0 only.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call

from convs.activation import activation_sites
from convs.pau import KERNELS, PAU, pau_parameters
from convs.pau_closed_form import kernels_for
from models.base import Batch, Phase, Stage
from models.plugins import Plugin, register_plugin
from utils import batching, distributed
from utils.augment import normalize
from utils.compression import (class_activation_map, compress_images, mask_box, soft_compress,
                               upsample_cam)
from utils.config import Option, stored_image_size
from utils.cuda_graph import GraphedStep
from utils.errors import ConfigError
from utils.masked_adam import MaskedAdam
from utils.seeding import stream_seed
from utils.stage_data import NEW

POLICIES = ("none", "full", "random", "center", "cam", "cim")
PIXEL_FREE = ("full", "random", "center")   # policies whose boxes do not look at the image


def center_boxes(n: int, size: int, area: float) -> torch.Tensor:
    """int64 [n, 4]: the centred square box of area fraction ``area`` (side rounded to pixels)."""
    side = min(size, max(0, round(size * math.sqrt(area))))
    if side == 0:
        return torch.zeros(n, 4, dtype=torch.long)
    lo = (size - side) // 2
    return torch.tensor([lo, lo + side, lo, lo + side], dtype=torch.long).repeat(n, 1)


def random_boxes(n: int, size: int, area: float, generator: torch.Generator) -> torch.Tensor:
    """int64 [n, 4]: square boxes of area fraction ``area`` at uniformly random positions."""
    side = min(size, max(0, round(size * math.sqrt(area))))
    if side == 0:
        return torch.zeros(n, 4, dtype=torch.long)
    y0 = torch.randint(0, size - side + 1, (n,), generator=generator)
    x0 = torch.randint(0, size - side + 1, (n,), generator=generator)
    return torch.stack([y0, y0 + side, x0, x0 + side], dim=1)


def compress_picked(images: torch.Tensor, pick: torch.Tensor, boxes: torch.Tensor, ratio: float,
                    sync_free: bool | None = None) -> torch.Tensor:
    """uint8 [B, 3, S, S]: the images with the rows of bool ``pick`` [B] compressed with their
    ``boxes`` int64 [B, 4] (``utils.compression.compress_images``; the other rows' boxes are unused).

    On a GPU every row is compressed and the picked ones are kept with ``torch.where``: selecting
    the rows would read ``pick`` on the host, a sync per training step that stops the host from
    queueing the next step's work. On the CPU only the picked rows are compressed (less work, and
    no queue to keep). Both give the same images: compression acts on each row alone.
    ``sync_free`` forces one way (None: by the device)."""
    if images.device.type != "cpu" if sync_free is None else sync_free:
        return torch.where(pick.view(-1, 1, 1, 1), compress_images(images, boxes, ratio), images)
    if not bool(pick.any()):
        return images
    images = images.clone()
    images[pick] = compress_images(images[pick], boxes[pick], ratio)
    return images


def frozen_parts(net: torch.nn.Module) -> list[torch.nn.Module]:
    """The submodules of ``net`` whose own weights (every parameter but Padé coefficients) are all
    frozen — the old backbones of DER and FOSTER. Modules without such weights are not counted."""
    parts = []
    for module in net.modules():
        paus = {id(p) for p in pau_parameters(module)}
        weights = [p for p in module.parameters() if id(p) not in paus]
        if weights and not any(p.requires_grad for p in weights):
            parts.append(module)
    return parts


def is_backbone_parameter(name: str) -> bool:
    """θ of the inner step: backbone parameters only (SPEC.md §3.2), never the classifiers."""
    return name.startswith(("backbone.", "backbones."))


@register_plugin("cim")
class ExemplarCompression(Plugin):
    options = {
        "compression": Option("none", "str", "Exemplar compression policy (SPEC.md §3): none | full (whole image "
                                             "downsampled) | random / center (box of area `box_area`) | cam (CAM "
                                             "of the CIL model) | cim (CAM of the PAU model, bilevel-trained).",
                              choices=POLICIES),
        "compress_ratio": Option(4.0, "float", "Area factor η of the downsampled part (each side ÷ √η); an "
                                               "exemplar costs a + (1 − a)/η units.", min=1.0),
        "mask_threshold": Option(0.6, "float", "CAM threshold τ of the kept box (cam, cim).", min=0.0, max=1.0),
        "box_area": Option(0.25, "float", "Area fraction of the square box of the random and center policies.",
                           min=0.0, max=1.0),
        "cam_update_interval": Option(40, "int", "Epochs between recomputations of the new-class boxes used by "
                                                 "artifact augmentation.", min=1),
        "randombbxblur_prob_incre": Option(0.1, "float", "Artifact augmentation: a new-class image is compressed "
                                                         "with p = this × ⌊epoch / cam_update_interval⌋.",
                                           min=0.0, max=1.0),
        "cam_batch_size": Option(16, "int", "Batch size of the CAM/box computations.", min=1),
        "meta_batch_size": Option(16, "int", "Size of each of the two batches of a bilevel iteration.", min=2),
        "num_meta_iters_per_cls": Option(0.5, "float", "Bilevel iterations per epoch = int(this × new classes).",
                                         min=0.0),
        "init_phi_lr": Option(0.01, "float", "Adam learning rate of φ (PAU coefficients) in phase 0.", min=0.0),
        "incre_phi_lr": Option(0.01, "float", "Adam learning rate of φ in later phases.", min=0.0),
        "phi_weight_decay": Option(5e-4, "float", "Adam weight decay of φ.", min=0.0),
        "lr_ratio": Option(0.1, "float", "Inner step size β1 = lr_ratio × the current θ learning rate.", min=0.0),
        "max_phi_grad_norm": Option(1.0, "float", "Clip of φ's gradient norm in phase 0.", min=0.0),
        "incre_max_phi_grad_norm": Option(None, "float", "Clip of φ's gradient norm in later phases; null = "
                                                         "√2 × max_phi_grad_norm (official).", min=0.0,
                                          nullable=True),
        "bilevel_autocast": Option(False, "bool", "Run the bilevel step's forward passes under the run's bf16 "
                                                  "autocast too (only with `amp` on a GPU; the official step and "
                                                  "the default run it in float32)."),
        "bilevel_cuda_graph": Option(True, "bool", "On a GPU, record the bilevel iteration as a CUDA graph once "
                                                   "per stage and replay it (the same kernels, launched at once: "
                                                   "its thousands of small kernels otherwise keep the GPU waiting "
                                                   "for the host); a failed recording is retried once, then the "
                                                   "stage runs it eagerly, with a log line. No effect on a CPU."),
        "pau_kernel": Option("auto", "str", "How the PAUs compute and differentiate: autograd (Horner steps "
                                            "differentiated by autograd, as the official code) | fused (first "
                                            "and second derivatives in closed form, convs/pau_closed_form.py: "
                                            "one Triton kernel per level on a GPU, 37 % less device time per "
                                            "bilevel iteration on an H200; on a CPU the same formulas as torch "
                                            "ops, 7 % slower than autograd) | auto (fused where its Triton "
                                            "kernels run, autograd elsewhere). Equal up to float rounding.",
                             choices=("auto", *KERNELS)),
        "div_coef": Option(0.2, "float", "Weight μ′ of CE(CIM logits) in the outer loss.", min=0.0),
        "reg_coef": Option(0.1, "float", "Weight μ of mean(CAM²) in the outer loss (smaller masks).", min=0.0),
        "exemplar_figure": Option(True, "bool", "Write exemplars_phase_<k>.png after each phase (compression on)."),
    }

    @classmethod
    def enabled(cls, cfg: dict) -> bool:
        return cfg["compression"] != "none"

    @classmethod
    def check_config(cls, cfg: dict, learner_cls: type) -> None:
        if cfg["compression"] != "none" and not learner_cls.uses_memory:
            raise ConfigError(f"Config key 'compression' is '{cfg['compression']}' but model_name "
                              f"'{cfg['model_name']}' keeps no exemplar memory; use 'none' or a learner with memory.")
        size = stored_image_size(cfg)
        if cfg["compression"] != "none" and cfg["compress_ratio"] > size * size:
            raise ConfigError(f"Config key 'compress_ratio' is {cfg['compress_ratio']}; with image_size {size} it "
                              f"must be at most {size * size} (each side is divided by √η: beyond that the "
                              f"downsampled image is smaller than one pixel).")
        # Values that leave every box empty make the policy 'full' without a word.
        if cfg["compression"] in ("cam", "cim") and cfg["mask_threshold"] >= 1.0:
            raise ConfigError(f"Config key 'mask_threshold' is {cfg['mask_threshold']}; it must be below 1: a CAM is "
                              f"scaled to [0, 1] and the box keeps the pixels above τ, so at 1 every box is empty "
                              f"(that is compression 'full').")
        if cfg["compression"] in ("random", "center") and cfg["box_area"] == 0:
            raise ConfigError(f"Config key 'box_area' is 0 with compression '{cfg['compression']}': every box would be "
                              f"empty (that is compression 'full'); give an area fraction above 0.")

    def __init__(self, cfg: dict, ctx):
        super().__init__(cfg, ctx)
        self.policy = cfg["compression"]
        self.ratio = cfg["compress_ratio"]
        self.generator = torch.Generator()        # picks and ``random`` boxes: drawn on every rank
        self.meta_generator = torch.Generator()   # the bilevel batches: drawn by rank 0 alone
        self.phase: Phase | None = None
        self.box_table: torch.Tensor | None = None   # int64 [N_train, 4] on the device
        self.fixed_p: float | None = None            # artifact probability held for a whole stage
        self.carried = None                           # (p, box table) the CAM-training stage ended with
        self.stage_data = None
        self.phi_opt = None                           # MaskedAdam over φ while a stage runs the bilevel step
        self.phi_lr = 0.0
        self.graphed_step = None                      # GraphedStep of the bilevel iteration, per stage
        self._bilevel_stage: Stage | None = None      # the stage whose bilevel iterations run
        self._phi_names: list[str] = []               # its model's names of φ and of θ (set per stage)
        self._theta_names: list[str] = []
        self.beta: torch.Tensor | None = None         # inner step size β1, a device scalar (a graph input)
        self._pau_kernels_logged = False              # pau_kernel fused: what runs, said once per process
        self.reset_counters()

    def reset_counters(self) -> None:
        """The per-phase counts and times reported in ``phases[k].compression``. The bilevel
        step's outcome stays on the device (read once, in the phase's report): how many of its
        iterations were skipped for a non-finite loss or gradient, and the last applied outer loss."""
        self.meta_attempts = 0
        device = self.ctx.device
        self.skipped_count = torch.zeros((), dtype=torch.long, device=device)
        self.outer_loss = torch.full((), float("nan"), device=device)   # NaN until an iteration applies
        self.meta_seconds = 0.0
        self.graph_replays = 0          # bilevel iterations replayed from a CUDA graph (the rest ran eagerly)
        self.graph_fallback = None      # why a stage's iterations could not be recorded, if one could not
        self.graph_failures: list[str] = []   # every failed recording (a stage records again once)
        self.refreshes = 0
        self.refresh_seconds = 0.0

    @property
    def meta_skipped(self) -> int:
        """Bilevel iterations of this phase skipped for a non-finite loss or gradient (a device read)."""
        return int(self.skipped_count)

    @property
    def meta_iterations(self) -> int:
        """Bilevel iterations of this phase that stepped φ (a device read)."""
        return self.meta_attempts - self.meta_skipped

    @property
    def last_outer_loss(self) -> float | None:
        """The outer loss of this phase's last applied bilevel iteration (None: none applied).
        Per phase: a resumed run must report what an uninterrupted one does."""
        return None if self.meta_iterations == 0 else float(self.outer_loss)

    # ---- the CIM model ------------------------------------------------------------------------
    def after_grow(self, phase: Phase) -> None:
        if self.policy != "cim":
            return
        kernel = self.pau_kernel()
        for site in self._activation_sites():
            if site.pau is None:
                site.pau = PAU()
            site.pau.kernel = kernel   # new units and those a DER backbone copied

    def _activation_sites(self):
        """Every activation site of the learner's networks."""
        for module in self.ctx.learner.modules().values():
            if module is not None:
                yield from activation_sites(module)

    def pau_kernel(self) -> str:
        """The kernel the PAUs use (``convs.pau.KERNELS``): the ``pau_kernel`` key, with ``auto``
        resolved for this run's device: ``fused`` where its Triton kernels run (they are built and
        checked once per device), ``autograd`` elsewhere (on a CPU the closed-form torch ops are slower)."""
        if self.cfg["pau_kernel"] != "auto":
            return self.cfg["pau_kernel"]
        if self.ctx.device.type != "cuda":
            return "autograd"
        from convs import pau_triton
        return "fused" if pau_triton.available(self.ctx.device) else "autograd"

    def pau_kernels_run(self) -> str:
        """What ``pau_kernel: fused`` runs on this run's device ("Triton kernels", "torch ops"), and on
        a GPU without the Triton kernels, why."""
        device = torch.device(self.ctx.device)
        kernels = kernels_for(device)
        if device.type == "cuda":
            from convs import pau_triton
            if kernels is not pau_triton:
                return f"{kernels.NAME} (Triton kernels unavailable: {pau_triton.why_unavailable(device)})"
        return kernels.NAME

    def pau_kernel_description(self) -> str:
        """What computes the PAUs, for the log and the phase's report: "autograd", or "closed form, "
        and what runs it (:meth:`pau_kernels_run`); with ``auto`` on a GPU without the Triton
        kernels, "autograd" and why."""
        kernel = self.pau_kernel()
        if kernel == "fused":
            return f"closed form, {self.pau_kernels_run()}"
        if self.cfg["pau_kernel"] == "auto" and self.ctx.device.type == "cuda":
            from convs import pau_triton
            return f"autograd (pau_kernel auto: Triton kernels unavailable: {pau_triton.why_unavailable(self.ctx.device)})"
        return "autograd"

    def use_pau_kernel(self, kernel: str) -> None:
        """Every PAU of the learner's networks computes with ``kernel`` (``convs.pau.KERNELS``)."""
        for site in self._activation_sites():
            if site.pau is not None:
                site.pau.kernel = kernel

    def phi(self) -> list[torch.nn.Parameter]:
        """φ: the PAU coefficients of the CAM network's trainable part. The units of a frozen old
        backbone (DER's older ones, FOSTER's old one) stay frozen with it, as in the official code."""
        if self.policy != "cim":
            return []
        net = self.ctx.learner.cam_network()
        frozen = {id(p) for m in frozen_parts(net) for p in pau_parameters(m)}
        return [p for p in pau_parameters(net) if id(p) not in frozen]

    def owned_parameters(self) -> list:
        if self.policy != "cim":
            return []
        return [p for m in self.ctx.learner.modules().values() if m is not None for p in pau_parameters(m)]

    # ---- CAMs and boxes -----------------------------------------------------------------------
    def cam_input(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, S, S] -> normalised float [B, 3, I, I]: the whole image (resized, not cropped,
        so that the CAM covers every stored pixel). With the stored form ``whole`` the stored image
        is the whole original squashed to a square, and so is this input: the CAM, and the box
        drawn from it, are in stored pixels, which is where compression keeps or downsamples."""
        t = self.ctx
        x = normalize(images.to(t.device), t.mean, t.std)
        if x.shape[-1] != t.input_size:
            x = F.interpolate(x, size=(t.input_size, t.input_size), mode="bilinear", align_corners=False)
        return x.contiguous(memory_format=torch.channels_last) if t.channels_last else x

    @torch.no_grad()
    def cams(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """float [B, h, w] CAMs of uint8 ``images`` for ``labels`` from the CAM network in eval mode
        (its PAU version with ``cim``), in ``cam_batch_size`` chunks."""
        net = self.ctx.learner.cam_network()
        was_training = net.training
        net.eval()
        mode = "pau" if self.policy == "cim" else "relu"
        out = []
        bs = self.cfg["cam_batch_size"]
        try:
            with net.activations(mode):
                for i in range(0, images.shape[0], bs):
                    x = self.cam_input(images[i:i + bs])
                    y = labels[i:i + bs].to(x.device)
                    with self.ctx.inference_autocast():
                        fmap = net(x)["fmap"]
                    rows = net.classifier.weight_rows()[y]
                    out.append(class_activation_map(fmap.float(), rows.float()))
        finally:
            net.train(was_training)
        return torch.cat(out)

    def drawn_boxes(self, n: int, size: int) -> torch.Tensor:
        """int64 [n, 4] on the CPU: boxes of n images of side ``size`` for a policy whose boxes
        ignore the pixels (``PIXEL_FREE``); ``random`` draws them from the plugin's generator."""
        if self.policy == "full":
            return torch.zeros(n, 4, dtype=torch.long)
        if self.policy == "center":
            return center_boxes(n, size, self.cfg["box_area"])
        return random_boxes(n, size, self.cfg["box_area"], self.generator)

    def boxes(self, images: torch.Tensor, labels: torch.Tensor, share: tuple[slice, int] | None = None) -> torch.Tensor:
        """int64 [B, 4] boxes (on the images' device) of the policy for uint8 ``images`` [B, 3, S, S].
        ``share`` = (rows, n): the images are the rows ``rows`` of n; a pixel-free policy draws
        boxes for all n and keeps ``rows``, so that every share (an empty one too) draws what one
        process draws, and ``random``'s generator stays in step on every rank."""
        n, size = images.shape[0], images.shape[-1]
        if self.policy in PIXEL_FREE:
            rows, total = share if share is not None else (slice(0, n), n)
            return self.drawn_boxes(total, size)[rows].to(images.device)
        if n == 0:
            return torch.zeros(0, 4, dtype=torch.long, device=images.device)
        return mask_box(self.cams(images, labels), (size, size), self.cfg["mask_threshold"]).to(images.device)

    def compressor(self, phase: Phase):
        """The memory update's boxes of a share of a class's candidates (``utils.memory.Compressor``):
        the policy's boxes, the CAMs of the share's images alone (the trainer gathers the shares)."""
        def compress(images: torch.Tensor, label: int, rows: slice, n: int) -> torch.Tensor:
            labels = torch.full((images.shape[0],), label, dtype=torch.long)
            return self.boxes(images, labels, share=(rows, n))
        return compress

    # ---- phase and stage ----------------------------------------------------------------------
    def before_phase(self, phase: Phase) -> None:
        self.phase = phase
        self.generator.manual_seed(stream_seed(self.cfg["seed"], phase.index, "cim"))
        self.meta_generator.manual_seed(stream_seed(self.cfg["seed"], phase.index, "cim-meta"))
        self.box_table = None
        self.carried = None
        self.reset_counters()

    def _trains_cam_network(self, stage: Stage) -> bool:
        return (stage.data == "phase" and stage.model is not None
                and stage.model is self.ctx.learner.cam_network())

    def _runs_bilevel(self, stage: Stage) -> bool:
        return (self.policy == "cim" and self._trains_cam_network(stage)
                and int(self.cfg["num_meta_iters_per_cls"] * self.phase.num_new) > 0)

    def before_stage(self, phase, stage, data) -> None:
        self.stage_data = data
        self.box_table = None
        self.fixed_p = None
        self.phi_opt = None
        if stage.data == "phase" and not self._trains_cam_network(stage) and self.carried is not None:
            # A later stage on the same data that does not train the CAM network (FOSTER's
            # compression) goes on with the probability and boxes the CAM-training stage ended
            # with, as the official code, whose two stages share one loader.
            self.fixed_p, self.box_table = self.carried
        if self._runs_bilevel(stage):
            phi = self.phi()
            for p in phi:
                p.requires_grad_(True)
            lr = self.cfg["init_phi_lr"] if phase.index == 0 else self.cfg["incre_phi_lr"]
            self.phi_opt = MaskedAdam(phi, lr=lr, max_norm=self.phi_clip(phase),
                                      weight_decay=self.cfg["phi_weight_decay"])
            self.phi_lr = lr
            self._bilevel_stage = stage
            # φ's and θ's parameter names (θ: the backbone's trainable ones that are not φ), once per stage
            name_of = {id(p): name for name, p in stage.model.named_parameters()}
            self._phi_names = [name_of[id(p)] for p in phi]
            not_theta = set(self._phi_names)
            self._theta_names = [name for name, p in stage.model.named_parameters() if p.requires_grad
                                 and name not in not_theta and is_backbone_parameter(name)]
            self.beta = torch.zeros((), device=self.ctx.device)
            if not self._pau_kernels_logged and (self.cfg["pau_kernel"] == "fused" or self.ctx.device.type == "cuda"):
                self.ctx.log.info(f"  PAU kernels: {self.pau_kernel_description()}")
                self._pau_kernels_logged = True
            self.graphed_step = GraphedStep(self._bilevel_iteration, self.ctx.device,
                                            enabled=self.cfg["bilevel_cuda_graph"], on_fallback=self._graph_fallback)

    def after_stage(self, phase, stage) -> None:
        if self._trains_cam_network(stage):
            self.carried = (self.augment_probability(stage.epochs - 1), self.box_table)
        if self.graphed_step is not None:
            self.graph_replays += self.graphed_step.replays
            self.graph_failures += self.graphed_step.failures
        self.stage_data = None
        self.box_table = None
        self.phi_opt = None
        self.graphed_step = None   # its graph holds the stage's tensors and a memory pool: let them go
        self._bilevel_stage = None

    def refresh_boxes(self) -> None:
        """Recompute the boxes of the stage's new-class training images (artifact augmentation).
        The policies that ignore the pixels (``PIXEL_FREE``) read no image, and every rank draws
        all the boxes. ``cam``/``cim``: with several processes each rank computes the CAMs of its
        share of the images and the shares are gathered (``utils.distributed.map_shards``); the CAM
        network's BatchNorm statistics, which each rank updated on its own shard since DDP last
        broadcast them, are rank 0's first (the running statistics play no part in training, only
        in eval-mode passes such as this), so every rank's boxes are those rank 0's network gives."""
        start = time.time()
        data = self.stage_data
        images, labels, index = data.images, data.labels, data.index
        new = (data.origin == NEW).nonzero().flatten()
        bs = max(self.cfg["cam_batch_size"], self.cfg["eval_batch_size"])
        if self.policy in PIXEL_FREE:   # drawn per batch of bs new images, the batches the CAM policies see
            boxes = torch.cat([torch.zeros(0, 4, dtype=torch.long)]
                              + [self.drawn_boxes(c.numel(), self.ctx.image_size) for c in new.split(bs)])
        else:
            distributed.broadcast_tensors(list(self.ctx.learner.cam_network().buffers()))

            def rows_boxes(rows: slice) -> torch.Tensor:
                out = [torch.zeros(0, 4, dtype=torch.long, device=self.ctx.device)]
                mine = new[rows]
                if isinstance(images, torch.Tensor):
                    batches = ((images[sel.to(images.device)], sel) for sel in mine.split(bs))
                else:   # streamed: one loader over the share, its images spread over its workers
                    batches = batching.in_order(batching.select(images, mine), mine, batch_size=bs,
                                                num_workers=self.cfg["num_workers"])
                for imgs, sel in batches:
                    out.append(self.boxes(imgs, labels[sel]).to(self.ctx.device))
                return torch.cat(out)

            boxes = distributed.map_shards(rows_boxes, new.numel())
        table = torch.zeros(len(self.ctx.train_labels), 4, dtype=torch.long, device=self.ctx.device)
        table[index[new].to(table.device)] = boxes.to(table.device)
        self.box_table = table
        self.refreshes += 1
        self.refresh_seconds += time.time() - start

    def augment_probability(self, epoch: int) -> float:
        """p = randombbxblur_prob_incre · ⌊epoch / cam_update_interval⌋ (0 … in the official schedule 0.4)."""
        return min(1.0, self.cfg["randombbxblur_prob_incre"] * (epoch // self.cfg["cam_update_interval"]))

    def before_augment(self, images, batch, stage, epoch):
        p = self.augment_probability(epoch) if self.fixed_p is None else self.fixed_p
        if p <= 0.0 or stage.data != "phase":
            return images
        if self.box_table is None:
            self.refresh_boxes()
        index = batch.index
        if batch.positions is None:
            draws = torch.rand(images.shape[0], generator=self.generator)
        else:   # a shard of a global batch: draw for the whole batch, keep this shard's
            draws = torch.rand(batch.global_size, generator=self.generator)[batch.positions]
        # through pinned memory, without waiting: a plain copy from the host would drain the GPU's queue every step
        pick = batching.to_device(draws < p, images.device) & (batch.origin == NEW)
        return compress_picked(images, pick, self.box_table[index], self.ratio)

    def after_epoch(self, phase, stage, epoch, lr) -> None:
        if self.phi_opt is not None:
            start = time.time()
            if self.ctx.is_main:
                self.bilevel_epoch(phase, stage, lr, epoch)
            distributed.broadcast_tensors(self.phi())   # φ: rank 0's on every rank
            if self.ctx.device.type == "cuda":   # the iterations' device time, not only their launches
                torch.cuda.synchronize(self.ctx.device)
            self.meta_seconds += time.time() - start
        # Boxes are recomputed when the next epoch enters a new cam_update_interval block.
        if stage.data == "phase" and self.fixed_p is None and (epoch + 1) % self.cfg["cam_update_interval"] == 0 \
                and self.augment_probability(epoch + 1) > 0 and epoch + 1 < stage.epochs:
            self.refresh_boxes()

    # ---- the bilevel step (SPEC.md §3.2) ------------------------------------------------------
    def _meta_order(self, iters: int) -> torch.Tensor:
        """int64 [2·iters·b]: the stage's sample indices of an epoch's bilevel batches, consecutive
        slices of shuffled passes over the data (batches A and B never overlap while the data lasts)."""
        n = len(self.stage_data)
        need = 2 * iters * min(self.cfg["meta_batch_size"], n)
        passes = [torch.randperm(n, generator=self.meta_generator) for _ in range(-(-need // n))]
        return torch.cat(passes)[:need]

    def _meta_batches(self, phase: Phase, order: torch.Tensor):
        """The epoch's bilevel batches, one per row of ``order`` (int64 [2·iters, b], the stage's
        sample indices), in order: (x float [b, 3, I, I], y, old-class rows). A streamed stage's
        images are decoded by one loader over the whole epoch's picks (its ``num_workers``)."""
        images = self.stage_data.images
        if isinstance(images, torch.Tensor):
            pixels = itertools.repeat(None)   # indexed in _meta_batch
        else:
            picks = batching.select(images, order.flatten())
            pixels = (imgs for imgs, in batching.iterate(picks, batch_size=order.shape[1],
                                                         num_workers=self.cfg["num_workers"]))
        for pick, imgs in zip(order, pixels):
            yield self._meta_batch(phase, pick, imgs)

    def _meta_batch(self, phase: Phase, pick: torch.Tensor, imgs: torch.Tensor | None):
        """One bilevel batch of the stage's samples ``pick``: their uint8 images ``imgs``
        [b, 3, S, S] (a streamed stage's, decoded), or None to index the stage's image tensor."""
        labels = self.stage_data.labels
        dev_pick = batching.to_device(pick, labels.device)   # pinned, non-blocking: no wait for the GPU's queue
        if imgs is None:
            imgs = self.stage_data.images[dev_pick]
        t = self.ctx
        hw = self.stage_data.orig_hw
        x = t.augment(imgs.to(t.device), self.meta_generator, None if hw is None else hw[pick.cpu()])
        if t.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = labels[dev_pick].to(t.device)
        return x, y, y < phase.first

    def bilevel_epoch(self, phase: Phase, stage: Stage, lr: float, epoch: int = 0) -> None:
        """The mask-level iterations after epoch ``epoch`` of ``stage`` (θ's learning rate was ``lr``).
        φ's Adam rate follows a cosine over the stage's epochs, like θ's. The iterations never
        read the device: a non-finite one is skipped on the device (``utils.masked_adam``), and
        on a GPU they replay one CUDA graph per stage (``bilevel_cuda_graph``)."""
        self.phi_opt.set_lr(self.phi_lr * 0.5 * (1 + math.cos(math.pi * epoch / max(stage.epochs, 1))))
        self.beta.fill_(self.cfg["lr_ratio"] * lr)
        iters = int(self.cfg["num_meta_iters_per_cls"] * phase.num_new)
        order = self._meta_order(iters).view(2 * iters, -1)
        model = stage.model
        was_training = model.training
        model.eval()
        batches = self._meta_batches(phase, order)
        try:
            for it in range(iters):
                xa, ya, olda = next(batches)
                xb, yb, _ = next(batches)
                self.graphed_step(xa, ya, olda, xb, yb)
                self.meta_attempts += 1
        finally:
            batches.close()   # a streamed stage's loader: its workers stop here, not when collected
        model.train(was_training)

    def _graph_fallback(self, reason: str) -> None:
        self.graph_fallback = reason
        self.ctx.log.info(f"  bilevel step: no CUDA graph ({reason}); it runs eagerly for the rest of the stage")

    def _bilevel_iteration(self, xa: torch.Tensor, ya: torch.Tensor, olda: torch.Tensor,
                           xb: torch.Tensor, yb: torch.Tensor) -> None:
        """One mask-level iteration (SPEC.md §3.2) on batch A (``xa`` float [b, 3, I, I], ``ya``
        int64 [b], ``olda`` bool [b]: old-class rows) and batch B (``xb``, ``yb``), of the stage
        set up by ``before_stage``: φ takes a clipped Adam step unless the outer loss or φ's
        gradient is not finite (e.g. an eval-mode network whose BatchNorm statistics are not
        settled yet, in the first epochs). Its effects are all in place on device tensors (φ, the
        optimiser's moments, the phase's counters) and it reads nothing back: ``GraphedStep``
        may record it once and replay it.

        The network runs on aliases of its parameters (views, ``torch.func.functional_call``) and
        the gradients are taken with respect to those: they never reach the parameters' own
        gradient accumulators. Those may be held, made on another CUDA stream, by the training
        steps' graphs or by DDP's reducer, and feeding them from the stream a CUDA graph records
        on makes the recording fail."""
        stage = self._bilevel_stage
        model = stage.model
        alias = {name: p.view_as(p) for name, p in model.named_parameters() if p.requires_grad}
        phi = [alias[name] for name in self._phi_names]
        theta = self._theta_names
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)   # no cast cache: graph-safe
                    if self.cfg["bilevel_autocast"] and self.ctx.amp else contextlib.nullcontext())
        # Batch A through the CIM model: its logits (div term) and its soft CAM (reg term, mask).
        with model.activations("pau"), autocast:
            out_a = functional_call(model, alias, (xa,))
        div = F.cross_entropy(out_a["logits"].float(), ya)
        rows = model.classifier.weight_rows()[ya].detach()
        cam = class_activation_map(out_a["fmap"].float(), rows)          # [B, h, w], no threshold
        reg = cam.pow(2).mean()
        x_soft = soft_compress(xa, upsample_cam(cam, xa.shape[-2:]), self.ratio)
        # Inner step on the CIL model: θ⁺ = θ − β1 ∇θ L_CIL(x̃), kept differentiable w.r.t. φ. As in
        # the official code, x̃ depends on θ too (through the CAM): ∇θ takes both paths.
        with autocast:
            inner, _ = stage.loss(stage.forward(x_soft, net=lambda x: functional_call(model, alias, (x,))),
                                  Batch(x_soft, ya, olda))
        grads = torch.autograd.grad(inner, [alias[name] for name in theta], create_graph=True, allow_unused=True)
        fast = {**alias, **{name: alias[name] - self.beta * g for name, g in zip(theta, grads) if g is not None}}
        # Outer loss on batch B with the fast weights; gradients to φ only.
        with autocast:
            out_b = stage.forward(xb, net=lambda x: functional_call(model, fast, (x,)))
        outer = F.cross_entropy(out_b["logits"].float(), yb) + self.cfg["div_coef"] * div \
            + self.cfg["reg_coef"] * reg
        grads_phi = torch.autograd.grad(outer, phi, allow_unused=True)
        finite = torch.stack([torch.isfinite(outer)] + [torch.isfinite(g).all() for g in grads_phi
                                                        if g is not None]).all()
        self.phi_opt.step(list(grads_phi), finite)
        self.skipped_count.add_((~finite).long())
        self.outer_loss.copy_(torch.where(finite, outer.detach().float(), self.outer_loss))

    def phi_clip(self, phase: Phase) -> float:
        """Clip of φ's gradient norm: max_phi_grad_norm in phase 0, incre_max_phi_grad_norm later
        (null: √2 × max_phi_grad_norm, SPEC.md §3.2)."""
        if phase.index == 0:
            return self.cfg["max_phi_grad_norm"]
        later = self.cfg["incre_max_phi_grad_norm"]
        return math.sqrt(2.0) * self.cfg["max_phi_grad_norm"] if later is None else later

    # ---- end of phase ----------------------------------------------------------------------
    def after_phase(self, phase: Phase) -> None:
        if not self.cfg["exemplar_figure"] or not self.ctx.is_main:
            return
        # A picture must never cost a trained phase (this runs before the checkpoint, on rank 0 alone):
        # a plotting failure is a note in the log.
        path = self.ctx.out / f"exemplars_phase_{phase.index}.png"
        try:
            from utils.exemplar_figure import write_exemplar_figure

            write_exemplar_figure(self, phase, path)
        except Exception as err:  # noqa: BLE001 - matplotlib, fonts, a full disk: the run goes on
            self.ctx.log.info(f"  note: could not write {path.name}: {type(err).__name__}: {err}")

    def phase_report(self, phase: Phase) -> dict:
        mem = self.ctx.memory
        size = self.ctx.image_size
        areas = [float(((e.boxes[:, 1] - e.boxes[:, 0]).clamp(min=0) * (e.boxes[:, 3] - e.boxes[:, 2]).clamp(min=0))
                       .float().sum()) for e in mem.classes.values()]
        n = len(mem)
        return {"compression": {
            "policy": self.policy, "ratio": self.ratio,
            "mean_box_area": round(sum(areas) / (n * size * size), 6) if n else None,
            "bilevel": {"iterations": self.meta_iterations, "skipped_nonfinite": self.meta_skipped,
                        "last_outer_loss": self.last_outer_loss,
                        "seconds": round(self.meta_seconds, 3),
                        # on a GPU: iterations replayed from the stage's CUDA graph; why each recording
                        # failed, and why a stage gave up recording (its iterations ran eagerly)
                        "graph_replays": self.graph_replays, "graph_failures": self.graph_failures,
                        "graph_fallback": self.graph_fallback,
                        "pau_kernels": self.pau_kernel_description() if self.policy == "cim" else None},
            "box_refresh": {"count": self.refreshes, "seconds": round(self.refresh_seconds, 3)},
        }}
