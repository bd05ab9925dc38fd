"""Time per phase of a learner with exemplar compression beside the same config without it.

    python exps/bench_cim_overhead.py --config configs/foster-tinyimagenet50.json --phases 2 \
        [--set KEY=VALUE ...] [--policy cim] [--threads 1] [--parallel] [--out /tmp/bench]

Runs the config twice through the real trainer for phases 0 … phases-1: once with
``compression=none`` and once with ``compression=<policy>`` (every other key equal), and prints per
phase the wall-clock seconds, the part spent in the bilevel step, and the ratio. The compressed run
also does the CAM box refreshes and the artifact augmentation, so the ratio is the whole cost of
CIM in a phase. The goal (issue #4) is a ratio ≤ 1.15. Only compare runs made on the same machine
under the same load: ``--parallel`` runs the two at the same time in two processes (``--threads``
each), so that whatever else loads the machine loads both alike.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_throughput import run_main  # noqa: E402
from trainer import Trainer  # noqa: E402
from utils.config import apply_overrides, load_config_file, parse_set, resolve_config  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.io import check_writable_dir  # noqa: E402


def timed_run(raw: dict, phases: int, out: Path, threads: int | None = None) -> list[dict]:
    if threads:
        torch.set_num_threads(threads)
    cfg = resolve_config({**raw, "checkpoints": "none", "exemplar_figure": False})
    start = time.time()
    results = Trainer(cfg, out, "bench", stop_after_phase=phases - 1).run()
    print(f"  {cfg['compression']}: {time.time() - start:.1f}s in all", flush=True)
    return results["phases"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--policy", default="cim")
    p.add_argument("--phases", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--parallel", action="store_true", help="run both configurations at the same time")
    p.add_argument("--out", default="/tmp/bench_cim_overhead")
    a = p.parse_args()
    if a.phases < 1:
        raise UserError(f"--phases is {a.phases}; it must be at least 1.")
    if a.threads:
        torch.set_num_threads(a.threads)
    raw, _ = load_config_file(a.config)
    raw = apply_overrides(raw, parse_set(a.set))
    out = Path(a.out)
    policies = ("none", a.policy)
    for policy in policies:   # a bad --set key or --policy: refused here, not after the first run
        resolve_config({**raw, "compression": policy, "checkpoints": "none", "exemplar_figure": False})
    check_writable_dir(out, "--out")
    jobs = [({**raw, "compression": policy}, a.phases, out / policy, a.threads) for policy in policies]
    if a.parallel:
        with multiprocessing.get_context("spawn").Pool(2) as pool:
            rows = dict(zip(policies, pool.starmap(timed_run, jobs)))
    else:
        rows = {policy: timed_run(*job) for policy, job in zip(policies, jobs)}
    report = []
    for base, comp in zip(rows["none"], rows[a.policy]):
        bil = (comp.get("compression") or {}).get("bilevel", {}).get("seconds", 0.0)
        report.append({"phase": base["phase"], "none_s": base["seconds"], f"{a.policy}_s": comp["seconds"],
                       "bilevel_s": bil, "ratio": round(comp["seconds"] / base["seconds"], 4)})
        print(f"phase {base['phase']}: none {base['seconds']:.1f}s, {a.policy} {comp['seconds']:.1f}s "
              f"(bilevel {bil:.1f}s): ratio {comp['seconds'] / base['seconds']:.3f}")
    total = sum(r[f"{a.policy}_s"] for r in report) / sum(r["none_s"] for r in report)
    print(f"all phases: ratio {total:.3f}")
    print(json.dumps({"config": a.config, "set": a.set, "policy": a.policy, "parallel": a.parallel, "phases": report,
                      "ratio": round(total, 4)}))


if __name__ == "__main__":
    sys.exit(run_main(main))
