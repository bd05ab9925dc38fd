"""Training throughput of the framework's loop beside a plain PyTorch loop.

    python exps/bench_throughput.py --config smoke [--set KEY=VALUE ...] [--epochs 3] [--threads N]

Measures images/s of phase 0's main training stage as run by ``Trainer.run_stage`` (batched on-device
augmentation, learner forward/loss, logging) and of a plain loop over the same backbone, batch size,
optimiser and images already in memory as a normalised float tensor (no augmentation, no CIL logic).
Both run the same number of epochs after one warm-up epoch. With ``--compare KEY=VALUE`` a second
framework configuration is timed too (e.g. ``--compare compression=cim``) and the ratio reported.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from trainer import Trainer  # noqa: E402
from utils.config import load_config_file, parse_set, resolve_config  # noqa: E402


def build_trainer(raw: dict, epochs: int, out: Path) -> tuple[Trainer, object]:
    cfg = resolve_config({**raw, "init_epochs": epochs, "checkpoints": "none"})
    trainer = Trainer(cfg, out)
    phase = trainer.phases()[0]
    trainer.learner.before_grow(phase)
    trainer.learner.grow_network(phase)
    for plugin in trainer.plugins:
        plugin.after_grow(phase)
    trainer.learner_to_device()
    trainer.learner.begin_phase(phase)
    for plugin in trainer.plugins:
        plugin.before_phase(phase)
    return trainer, phase


def time_framework(raw: dict, epochs: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        trainer, phase = build_trainer(raw, 1, Path(tmp) / "warm")
        stage = trainer.learner.stages(phase)[0]
        gen = torch.Generator().manual_seed(0)
        trainer.run_stage(phase, stage, gen)                      # warm-up epoch
        stage = trainer.learner.stages(phase)[0]                  # fresh stage: params may be a generator
        stage.epochs = epochs
        images = trainer.stage_data(phase, stage.data).images
        sync(trainer.device)
        start = time.perf_counter()
        trainer.run_stage(phase, stage, gen)
        sync(trainer.device)
        seconds = time.perf_counter() - start
        n = len(images) // (stage.batch_size or trainer.cfg["batch_size"]) * (stage.batch_size or trainer.cfg["batch_size"])
        return {"images_per_s": round(epochs * n / seconds, 1), "seconds": round(seconds, 2), "device": str(trainer.device)}


def time_plain(raw: dict, epochs: int) -> dict:
    """Same backbone/head, batch, SGD settings; data pre-normalised in memory; nothing else."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer, phase = build_trainer(raw, 1, Path(tmp) / "plain")
        net = trainer.learner.net
        cfg = trainer.cfg
        device = trainer.device
        data = trainer.stage_data(phase, "phase")
        images, labels = data.images, data.labels
        x_all = trainer.ctx.to_input(images)                          # float, normalised, on the device
        y_all = labels.to(device)
        opt = torch.optim.SGD(net.parameters(), lr=cfg["init_lr"], momentum=cfg["momentum"],
                              weight_decay=cfg["init_weight_decay"])
        bs = cfg["batch_size"]
        gen = torch.Generator().manual_seed(0)

        def epoch():
            net.train()
            perm = torch.randperm(len(y_all), generator=gen).to(device)
            for i in range(0, len(perm) - bs + 1, bs):
                idx = perm[i:i + bs]
                with trainer.ctx.autocast():
                    loss = F.cross_entropy(net(x_all[idx])["logits"], y_all[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

        epoch()                                                   # warm-up
        sync(device)
        start = time.perf_counter()
        for _ in range(epochs):
            epoch()
        sync(device)
        seconds = time.perf_counter() - start
        n = len(y_all) // bs * bs
        return {"images_per_s": round(epochs * n / seconds, 1), "seconds": round(seconds, 2), "device": str(device)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="smoke")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--compare", action="append", default=[], help="KEY=VALUE overrides for a second framework run")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    raw, _ = load_config_file(args.config)
    raw.update(parse_set(args.set))
    report = {"config": args.config, "set": args.set, "epochs": args.epochs, "threads": torch.get_num_threads()}
    report["plain"] = time_plain(raw, args.epochs)
    report["framework"] = time_framework(raw, args.epochs)
    report["framework_over_plain"] = round(report["framework"]["images_per_s"] / report["plain"]["images_per_s"], 3)
    if args.compare:
        other = {**raw, **parse_set(args.compare)}
        report["compare"] = {"set": args.compare, **time_framework(other, args.epochs)}
        report["compare_over_framework"] = round(report["compare"]["images_per_s"] / report["framework"]["images_per_s"], 3)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
