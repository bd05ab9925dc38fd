"""The process group of a multi-process run (``torchrun``): set-up, and the few collectives the
trainer and plugins use.

``torchrun --nproc_per_node=N main.py ...`` starts N processes with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set; :func:`init` joins them into one group
(gloo on the CPU, NCCL on CUDA with device ``cuda:LOCAL_RANK``). A plain ``python main.py`` has no
``WORLD_SIZE`` (or 1): nothing is initialised, and every helper here is the identity, so a
single-process run takes no distributed code path.

Every collective waits at most the config key ``dist_timeout`` (minutes; default 30): a process
that died or stopped calling the same collectives makes the others fail after that time instead of
hanging forever. Under torchrun the agent stops the others sooner, as soon as one process exits
with an error. The timeout must exceed the longest step rank 0 takes alone while the others wait
(herding, the evaluation, writing a checkpoint).
"""
from __future__ import annotations

import hashlib
import os
from datetime import timedelta
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) in a plain run."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return 0, 1, 0
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def is_distributed() -> bool:
    """A process group with more than one process is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def init(device: torch.device, timeout_minutes: float = 30) -> None:
    """Join the process group of a torchrun launch (no-op in a single process). ``device`` is this
    process's device (``cuda:LOCAL_RANK`` on GPUs): NCCL there, gloo on the CPU."""
    _, world, _ = env_world()
    if world <= 1 or is_distributed():
        return
    timeout = timedelta(minutes=timeout_minutes)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=timeout)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def backend() -> str:
    return dist.get_backend() if is_distributed() else "none"


def _comm_device() -> torch.device:
    """Where tensors must be for a collective: the current GPU with NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` (any picklable object, tensors included) on every rank."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


def all_gather_object(obj: Any) -> list:
    """[rank 0's obj, rank 1's obj, ...] on every rank."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_tensors(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` (same shapes on every rank) in place with rank ``src``'s values."""
    if not is_distributed():
        return
    dev = _comm_device()
    for t in tensors:
        if t.device == dev:
            dist.broadcast(t.data, src=src)
        else:
            buf = t.detach().to(dev)
            dist.broadcast(buf, src=src)
            t.data.copy_(buf.to(t.device))


def broadcast_module_states(modules: list[torch.nn.Module | None], src: int = 0) -> None:
    """Every parameter and buffer of ``modules`` set to rank ``src``'s (bit-identical on all ranks:
    BatchNorm statistics, which each rank updates on its own shard, included)."""
    tensors = [t for m in modules if m is not None
               for t in list(m.parameters()) + list(m.buffers())]
    broadcast_tensors(tensors, src)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of ``t`` (a new tensor on ``t``'s device)."""
    if not is_distributed():
        return t
    buf = t.detach().to(_comm_device()).clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of ``t`` (logged scalars)."""
    return all_reduce_sum(t) / world_size() if is_distributed() else t


def all_gather(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``t``, then rank 1's, ... concatenated along dim 0; the ranks' lengths may differ,
    and a rank may hold nothing (any empty tensor: it takes the others' trailing shape and dtype);
    the non-empty ones must agree in trailing shape and dtype."""
    if not is_distributed():
        return t
    dev = _comm_device()
    local = t.detach().to(dev).contiguous()
    shapes = all_gather_object((tuple(local.shape), str(local.dtype).removeprefix("torch.")) if local.numel()
                               else None)
    filled = [s for s in shapes if s is not None]
    if not filled:
        return t
    tail, dtype = filled[0][0][1:], getattr(torch, filled[0][1])
    if any(s[0][1:] != tail or s[1] != filled[0][1] for s in filled):
        raise RuntimeError(f"all_gather: the ranks' tensors differ in trailing shape or dtype: {shapes}")
    sizes = [s[0][0] if s is not None else 0 for s in shapes]
    if not local.numel():
        local = torch.zeros((0, *tail), dtype=dtype, device=dev)
    longest = max(sizes)
    padded = torch.zeros((longest, *tail), dtype=dtype, device=dev)
    padded[:local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(t.device)


def shard_span(n: int) -> slice:
    """This rank's contiguous share of ``n`` rows: rank r of W takes rows [⌊n·r/W⌋, ⌊n·(r+1)/W⌋),
    so that the shares, concatenated in rank order, are rows 0..n-1 (all of them in one process)."""
    r, w = rank(), world_size()
    return slice(n * r // w, n * (r + 1) // w)


def map_shards(fn: Callable[[slice], Any], n: int) -> Any:
    """``fn`` of this rank's rows (:func:`shard_span` of ``n``), gathered: every rank gets the rows of
    all ranks in order, the same as ``fn(slice(0, n))`` in one process (up to how batch
    composition rounds), computed by W processes at once. ``fn(rows)`` returns a tensor with
    ``rows``' length along dim 0 (an empty one for no rows), or a tuple of such tensors, each
    gathered on its own (a None entry stays None; it must be None on every rank). Every rank
    must call it (a collective)."""
    out = fn(shard_span(n))
    if isinstance(out, tuple):
        return tuple(None if t is None else all_gather(t) for t in out)
    return all_gather(out)


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and give its result to every rank; an exception it raises is
    raised on every rank (a ``UserError`` with its message, so that every process exits 2 with it;
    anything else as a RuntimeError naming it), never left as a hang in the next collective."""
    if not is_distributed():
        return fn()
    outcome: tuple[bool, Any] = (True, None)
    error: BaseException | None = None
    if is_main():
        try:
            outcome = (True, fn())
        except BaseException as exc:  # noqa: BLE001 - re-raised below, on every rank
            error = exc
            outcome = (False, (type(exc).__module__, type(exc).__qualname__, str(exc)))
    outcome = broadcast_object(outcome)
    if outcome[0]:
        return outcome[1]
    if error is not None:
        raise error
    _raise_received(0, *outcome[1])


def _raise_received(src: int, module: str, name: str, message: str) -> None:
    """Raise here the exception rank ``src`` raised (``type(exc).__module__``, ``__qualname__``,
    ``str(exc)``): a UserError as itself, so every process exits 2 with its message; anything else
    as a RuntimeError naming it."""
    from utils.errors import UserError

    if module == "utils.errors":
        import utils.errors as errors

        raise getattr(errors, name, UserError)(message)
    raise RuntimeError(f"rank {src} failed with {module}.{name}: {message}")


def first_on_node_leaders(fn: Callable[[], T]) -> T | None:
    """Run ``fn`` on each machine's first process (LOCAL_RANK 0) while the others wait, then let
    every process go on: ``fn``'s result there, None on the others (which then do their own work,
    e.g. read the cache the leader wrote). An exception on any leader is raised on every process
    (as :func:`on_main` does), never left as a hang in the next collective."""
    if not is_distributed():
        return fn()
    result, error, outcome = None, None, None
    if env_world()[2] == 0:
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised below, on every rank
            error = exc
            outcome = (type(exc).__module__, type(exc).__qualname__, str(exc))
    failures = [(r, o) for r, o in enumerate(all_gather_object(outcome)) if o is not None]
    if error is not None:
        raise error
    if failures:
        _raise_received(failures[0][0], *failures[0][1])
    return result


def tensor_digest(tensors: list[torch.Tensor], extra: str = "") -> str:
    """sha1 of the bytes of ``tensors`` (in order, with their dtypes and shapes) and ``extra``."""
    h = hashlib.sha1(extra.encode())
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()

