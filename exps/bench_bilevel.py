"""Time of CIM's bilevel iterations alone, and where it goes.

    python exps/bench_bilevel.py --config cim-lucir-imagenette-224 [--set KEY=VALUE ...]
        [--epochs 4] [--precision bf16 fp32] [--pau_kernels autograd fused] [--profile] [--threads N]
        [--out bilevel.json]

The bilevel step (``models/cim.py``, ``ExemplarCompression.bilevel_epoch``) runs
``int(num_meta_iters_per_cls × new classes)`` iterations after every epoch of a stage that trains
the CAM network; each is a second-order step on two batches of ``meta_batch_size``. Its share of a
phase's time therefore grows with the number of classes and shrinks with the images per class,
and ``exps/bench_throughput.py``'s CIM row mixes it with the training steps. This bench measures
it alone, on phase 0 of the config with ``compression=cim``: two epochs of the real stage first
(which train the network out of its initial state and run two bilevel epochs, paying for cuDNN's
algorithm search of the step's shapes), then ``--epochs`` bilevel epochs twice from the same
state (φ, its optimiser, the batches' generator): eagerly (row ``eager``) and replaying a CUDA
graph (row ``graphed``, ``bilevel_cuda_graph``; the same as eager on a CPU). A row's
``ms_per_iteration`` is over the epochs after its first (the graphed row's first records the
graph), and ``phi_max_abs_diff`` says how far the graphed row's φ ended from the eager row's
(against ``phi_max_abs_move``, how far the eager epochs moved it). With ``--profile`` each row
profiles one more epoch under ``torch.profiler`` (``bench_throughput.StepProfiler``: wall and
device time per iteration, the device's busy fraction, host syncs and where they are, top
operators). ``--pau_kernels autograd fused`` gives the two rows for each PAU kernel
(``pau_kernel``; ``pau_kernels_run`` says what ran: Triton kernels, or torch ops and why), all
from the same state, and ``saved_for_backward_mb``: the memory one iteration keeps for its
backward passes with the row's kernel. Each ``--precision`` gives the two rows with the step's
forward passes in float32 (``bilevel_autocast`` false, the default) and, for bf16, two more under bf16 autocast
(``bilevel_autocast`` true; ``--no_autocast_step`` leaves those out). It also reports the time of a training step of the same run
(``train_ms_per_step``, batch ``batch_size``) and, from the two, the bilevel step's share of an
epoch of the config's data (``bilevel_share``: the iterations' time over the epoch's steps' and
the iterations' time).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_throughput import PRECISION, StepProfiler, build_trainer, check_out_file, error_text, run_main, sync  # noqa: E402,E501
from convs.pau import KERNELS  # noqa: E402
from models.cim import ExemplarCompression  # noqa: E402
from utils import batching  # noqa: E402
from utils.cuda_graph import GraphedStep  # noqa: E402
from utils.config import apply_overrides, load_config_file, parse_set, resolve_config  # noqa: E402
from utils.errors import UserError  # noqa: E402


def snapshot(cim: ExemplarCompression) -> dict:
    """What a bilevel epoch changes: φ, its optimiser's moments, the batches' generator, the counters."""
    opt = cim.phi_opt
    return {"phi": [p.detach().clone() for p in opt.params], "m": opt.exp_avg.clone(), "v": opt.exp_avg_sq.clone(),
            "steps": opt.steps.clone(), "gen": cim.meta_generator.get_state(),
            "skipped": cim.skipped_count.clone(), "outer": cim.outer_loss.clone(), "attempts": cim.meta_attempts}


def restore(cim: ExemplarCompression, s: dict) -> None:
    opt = cim.phi_opt
    with torch.no_grad():
        for p, v in zip(opt.params, s["phi"]):
            p.copy_(v)
    opt.exp_avg.copy_(s["m"])
    opt.exp_avg_sq.copy_(s["v"])
    opt.steps.copy_(s["steps"])
    cim.meta_generator.set_state(s["gen"])
    cim.skipped_count.copy_(s["skipped"])
    cim.outer_loss.copy_(s["outer"])
    cim.meta_attempts = s["attempts"]


def run_epochs(cim, phase, stage, lr: float, epochs: int, device) -> list[float]:
    """Wall seconds of each of ``epochs`` bilevel epochs (each ends in a device sync)."""
    out = []
    for epoch in range(epochs):
        sync(device)
        start = time.perf_counter()
        cim.bilevel_epoch(phase, stage, lr, epoch)
        sync(device)
        out.append(time.perf_counter() - start)
    return out


def saved_for_backward_mb(cim, phase) -> float:
    """MB of the tensors one bilevel iteration keeps for its backward passes (each storage counted
    once; what its autograd graphs hold at their peak, and what a recorded CUDA graph keeps in its
    pool), on the first two batches of a fresh draw. It steps φ: restore the state after."""
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        return t

    batches = cim._meta_batches(phase, cim._meta_order(1).view(2, -1))
    try:
        xa, ya, olda = next(batches)
        xb, yb, _ = next(batches)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            cim._bilevel_iteration(xa, ya, olda, xb, yb)
    finally:
        batches.close()
    return round(sum(seen.values()) / 2 ** 20, 1)


def profile_epoch(cim, phase, stage, lr: float, epoch: int, device) -> dict:
    window = StepProfiler(device)
    try:
        before = cim.meta_attempts
        window.start()
        cim.bilevel_epoch(phase, stage, lr, epoch)
        done = cim.meta_attempts - before
        return window.stop(done, 2 * done * cim.cfg["meta_batch_size"])
    except Exception as exc:  # noqa: BLE001 - the timings stand without their profile
        return {"error": error_text(exc)}
    finally:
        window.close()


def time_bilevel(raw: dict, epochs: int, profile: bool = False,
                 pau_kernels: list[str] | None = None) -> list[dict]:
    """Rows ``eager`` and ``graphed`` (``bilevel_cuda_graph`` off / on) of phase 0 of ``raw`` with
    CIM, on one trainer, for each of ``pau_kernels`` (default: the config's ``pau_kernel``; row
    field ``pau_kernel``): every row starts from the same φ, optimiser state and batches, so its φ
    after its epochs must equal the first row's (``phi_max_abs_diff``, against how far the first
    row's epochs moved φ, ``phi_max_abs_move``); bitwise equal unless the device's kernels are
    not deterministic or the rows' PAU kernels differ (then up to float rounding)."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer, phase = build_trainer({**raw, "compression": "cim", "exemplar_figure": False}, 1, Path(tmp))
        cim = next(p for p in trainer.plugins if isinstance(p, ExemplarCompression))
        gen = torch.Generator().manual_seed(0)
        records, bilevel_s = [], []
        trainer.log.metric = records.append
        after_epoch = cim.after_epoch

        def timed_after_epoch(*args):   # each epoch's bilevel seconds, to leave out of its training time
            before = cim.meta_seconds
            after_epoch(*args)
            bilevel_s.append(cim.meta_seconds - before)
        cim.after_epoch = timed_after_epoch
        stage = trainer.learner.stages(phase)[0]
        stage.epochs = 2
        trainer.run_stage(phase, stage, gen)   # two epochs and their bilevel iterations: the warm-up
        cim.after_epoch = after_epoch
        per_epoch = cim.meta_attempts // 2
        if per_epoch == 0:
            raise UserError("the config's phase 0 runs no bilevel iteration (see the policy, "
                            "num_meta_iters_per_cls and init_cls)")
        # the training step's time: the second epoch's wall time less its bilevel part, over its
        # steps (the first pays for cuDNN's algorithm search)
        data = trainer.stage_data(phase, stage.data)
        batch_size = stage.batch_size or trainer.cfg["batch_size"]
        steps = len(batching.shard_batches(torch.arange(len(data)), batch_size, min_batch=2))
        epoch_s = [r["seconds"] for r in records if r.get("stage") == stage.name][-1]
        train_ms = 1000 * (epoch_s - bilevel_s[-1]) / steps
        # a fresh stage (the warm-up's ended and dropped φ's optimiser), its data on the device as
        # run_stage holds it, and the CIL network left trained by the warm-up epoch
        stage = trainer.learner.stages(phase)[0]
        cim.before_stage(phase, stage, trainer.resident(data))
        lr = trainer.cfg["init_lr"]
        start_state = snapshot(cim)
        rows, phis = [], []
        kernels = pau_kernels or [cim.pau_kernel()]
        for kernel, name, graphed in [(k, n, g) for k in kernels for n, g in (("eager", False), ("graphed", True))]:
            restore(cim, start_state)
            cim.use_pau_kernel(kernel)
            cim.graphed_step = GraphedStep(cim._bilevel_iteration, trainer.device, enabled=graphed,
                                           on_fallback=cim._graph_fallback)
            seconds = run_epochs(cim, phase, stage, lr, epochs, trainer.device)
            phis.append([p.detach().clone() for p in cim.phi_opt.params])
            # the graphed row's first epoch also runs the warm-up calls and records the graph:
            # the steady state is the epochs after it (for both rows alike)
            steady = seconds[1:] or seconds
            ms = 1000 * sum(steady) / (len(steady) * per_epoch)
            row = {"row": name, "pau_kernel": kernel,
                   "pau_kernels_run": cim.pau_kernels_run() if kernel == "fused" else "autograd",
                   "iterations": epochs * per_epoch, "iterations_per_epoch": per_epoch,
                   "skipped_nonfinite": cim.meta_skipped, "first_epoch_s": round(seconds[0], 3),
                   "ms_per_iteration": round(ms, 2), "meta_batch_size": trainer.cfg["meta_batch_size"],
                   "train_ms_per_step": round(train_ms, 2), "train_steps_per_epoch": steps,
                   # the bilevel share of an epoch of this data: its iterations over steps + iterations
                   "bilevel_share": round(per_epoch * ms / (per_epoch * ms + steps * train_ms), 3),
                   "graph_replays": cim.graphed_step.replays, "graph_failures": cim.graphed_step.failures,
                   "graph_fallback": cim.graphed_step.fallback_reason,
                   "device": str(trainer.device)}
            if profile:
                row["profile"] = profile_epoch(cim, phase, stage, lr, epochs, trainer.device)
            rows.append(row)
        for kernel in kernels:
            restore(cim, start_state)
            cim.use_pau_kernel(kernel)
            mb = saved_for_backward_mb(cim, phase)
            for row in rows:
                if row["pau_kernel"] == kernel:
                    row["saved_for_backward_mb"] = mb
        move = max(float((a - b).abs().max()) for a, b in zip(phis[0], start_state["phi"]))
        for row, phi in zip(rows[1:], phis[1:]):
            diff = max(float((a - b).abs().max()) for a, b in zip(phis[0], phi))
            row.update(phi_max_abs_diff=diff, phi_max_abs_move=move)
        cim.after_stage(phase, stage)
        return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="cim-lucir-imagenette-224")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--precision", nargs="+", default=None, choices=sorted(PRECISION),
                   help="rows per precision (default: the config's own amp/channels_last)")
    p.add_argument("--epochs", type=int, default=4, help="timed bilevel epochs (after the warm-up)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--profile", action="store_true", help="profile one more bilevel epoch per row")
    p.add_argument("--pau_kernels", nargs="+", default=None, choices=KERNELS,
                   help="eager and graphed rows for each PAU kernel (default: the config's pau_kernel)")
    p.add_argument("--no_autocast_step", action="store_true",
                   help="leave out the bf16 rows' second variant, the step under bf16 autocast")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.epochs < 1:
        raise UserError(f"--epochs is {args.epochs}; it must be at least 1.")
    check_out_file(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    raw, _ = load_config_file(args.config)
    raw = apply_overrides(raw, parse_set(args.set))
    # An unknown or bad key: refused here; in the rows it failed every row, and the script exited 0.
    cfg = resolve_config({**raw, "compression": "cim", "exemplar_figure": False})
    # Checked here: raised in a row, it ended the whole script (a SystemExit) after the first warm-up.
    if int(cfg["num_meta_iters_per_cls"] * cfg["init_cls"]) < 1:
        raise UserError(f"num_meta_iters_per_cls {cfg['num_meta_iters_per_cls']} × init_cls {cfg['init_cls']} "
                        f"is under 1: phase 0 runs no bilevel iteration to time.")
    rows = []
    for precision in args.precision or [None]:
        base = {**raw, **(PRECISION[precision] if precision else {})}
        variants = [("float32 step", False)]
        if not args.no_autocast_step and (precision == "bf16" or (precision is None and base.get("amp", True))):
            variants.append(("autocast step", True))
        for step_name, autocast in variants:
            try:
                got = time_bilevel({**base, "bilevel_autocast": autocast}, args.epochs, args.profile,
                                   args.pau_kernels)
            except Exception as exc:  # noqa: BLE001 - one failing variant keeps the others
                got = [{"row": "eager + graphed", "error": error_text(exc)}]
                print(f"{step_name} ({precision}) failed: {got[0]['error']}", file=sys.stderr)
            for row in got:
                row.update(step=step_name, precision=precision or "config")
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
                if "profile" in row and "error" not in row["profile"]:
                    prof = row["profile"]
                    print(f"  profiled: {prof['ms_per_step']} ms per iteration, device busy {prof['device_busy']} "
                          f"(device {prof.get('device_ms_per_step')} ms per iteration), host syncs "
                          f"{prof['host_syncs']}" + "".join(f"; {site} x{n}" for site, n in
                                                            prof["host_sync_sites"].items()), flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps({"config": args.config, "set": args.set, "rows": rows}, indent=1))
    for row in rows:
        prof = row.get("profile") or {}
        for key in ("top_host", "top_device"):
            if key in prof:
                print(f"== {row['step']}, {row['row']}, PAU {row.get('pau_kernel')} ({row['precision']}) {key}\n"
                      f"{prof[key]}")


if __name__ == "__main__":
    sys.exit(run_main(main))
