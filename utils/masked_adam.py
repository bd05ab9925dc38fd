"""Adam with gradient-norm clipping whose step is taken or skipped on the device (CIM's φ optimiser).

The bilevel step must skip a step whose loss or gradient is not finite (SPEC.md §3.2; e.g. an
eval-mode network whose BatchNorm statistics are not settled yet), and deciding that on the host
reads the device once per iteration, which stalls the GPU's queue and rules out capturing the
iteration in a CUDA graph. Here the decision stays a device flag: every step computes the update
and keeps it only where the flag is true, with ``torch.where``, so the parameters and the moments
of a skipped step are left exactly as they were.

The update is ``torch.nn.utils.clip_grad_norm_(params, max_norm)`` followed by
``torch.optim.Adam(params, lr, betas, eps, weight_decay)`` (L2 weight decay added to the gradient,
bias-corrected moments), on the parameters and moments flattened into one vector each, so it costs
a few dozen kernels whatever the number of parameters. The learning rate and the step count are
device tensors: changing the rate (:meth:`set_lr`) is a device fill, never a new graph.
"""
from __future__ import annotations

import torch


class MaskedAdam:
    """Adam over ``params`` (a list of tensors, any shapes), clipping the total gradient norm to
    ``max_norm`` first; :meth:`step` takes the gradients and a bool device flag and applies the
    step only where the flag is true. A parameter whose gradient is None is left alone, as
    ``torch.optim.Adam`` leaves it (the same parameters must be None at every step)."""

    def __init__(self, params: list[torch.Tensor], lr: float, max_norm: float, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        if not params:
            raise ValueError("MaskedAdam needs at least one parameter")
        self.params = list(params)
        self.max_norm = float(max_norm)
        self.weight_decay = float(weight_decay)
        self.beta1, self.beta2 = map(float, betas)
        self.eps = float(eps)
        device = self.params[0].device
        n = sum(p.numel() for p in self.params)
        self.exp_avg = torch.zeros(n, device=device)        # float32 [n]: first moments, all params
        self.exp_avg_sq = torch.zeros(n, device=device)     # float32 [n]: second moments
        self.steps = torch.zeros((), device=device)         # steps taken (float, for the bias corrections)
        self.lr = torch.tensor(float(lr), device=device)    # float32 []: the current learning rate
        self._index: tuple[tuple[bool, ...], torch.Tensor] | None = None   # see _used

    def set_lr(self, lr: float) -> None:
        self.lr.fill_(float(lr))

    def _used(self, grads: list[torch.Tensor | None]) -> torch.Tensor:
        """int64 [k]: the positions in the flat moments of the parameters that have a gradient
        (built once per pattern of missing gradients, which is the same at every step)."""
        pattern = tuple(g is not None for g in grads)
        if self._index is None or self._index[0] != pattern:
            used, start = [], 0
            for p, has_grad in zip(self.params, pattern):
                if has_grad:
                    used.append(torch.arange(start, start + p.numel(), device=self.exp_avg.device))
                start += p.numel()
            self._index = (pattern, torch.cat(used))
        return self._index[1]

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor | None], apply: torch.Tensor) -> None:
        """One clipped Adam step with ``grads`` (one per parameter, None for none), kept where the
        bool scalar ``apply`` is true (on the parameters' device; never read on the host)."""
        if len(grads) != len(self.params):
            raise ValueError(f"{len(grads)} gradients for {len(self.params)} parameters")
        live = [(p, g) for p, g in zip(self.params, grads) if g is not None]
        if not live:
            return
        if len(live) == len(self.params):
            exp_avg, exp_avg_sq = self.exp_avg, self.exp_avg_sq
            index = None
        else:   # a few parameters without a gradient: their moments stay as they are
            index = self._used(grads)
            exp_avg, exp_avg_sq = self.exp_avg[index], self.exp_avg_sq[index]
        g = torch.cat([g.detach().reshape(-1).float() for _, g in live])
        p = torch.cat([q.detach().reshape(-1).float() for q, _ in live])
        # clip_grad_norm_: scale by max_norm / (‖g‖ + 1e-6), at most 1
        g = g * (self.max_norm / (g.norm() + 1e-6)).clamp(max=1.0)
        g = torch.where(apply, g, torch.zeros_like(g))      # a skipped step's inf/nan stays out of every sum below
        if self.weight_decay:
            g = g.add(p, alpha=self.weight_decay)
        m = exp_avg.mul(self.beta1).add_(g, alpha=1 - self.beta1)
        v = exp_avg_sq.mul(self.beta2).addcmul_(g, g, value=1 - self.beta2)
        t = self.steps + 1
        bias1 = 1 - self.beta1 ** t
        bias2_sqrt = (1 - self.beta2 ** t).sqrt()
        update = m / (v.sqrt() / bias2_sqrt + self.eps) * (-self.lr / bias1)
        update = torch.where(apply, update, torch.zeros_like(update))
        m = torch.where(apply, m, exp_avg)
        v = torch.where(apply, v, exp_avg_sq)
        if index is None:
            self.exp_avg.copy_(m)
            self.exp_avg_sq.copy_(v)
        else:
            self.exp_avg[index] = m
            self.exp_avg_sq[index] = v
        self.steps.add_(apply.to(self.steps.dtype))
        params = [q for q, _ in live]
        torch._foreach_add_(params, [u.view_as(q) for u, q in
                                     zip(update.split([q.numel() for q in params]), params)])
