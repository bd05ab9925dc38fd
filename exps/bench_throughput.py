"""Training throughput of the framework's loop beside a plain PyTorch loop, and image decoding speed.

    python exps/bench_throughput.py --config smoke [--set KEY=VALUE ...] [--epochs 3] [--threads N]
        [--compare NAME:KEY=VALUE,KEY=VALUE ...] [--precision bf16 fp32] [--out table.json]
    python exps/bench_throughput.py --decode --config cim-lucir-imagenette-224 [--workers 0 1 2 4 8]

Measures images/s of phase 0's main training stage as run by ``Trainer.run_stage`` (batched on-device
augmentation, learner forward/loss, plugins, logging) and of a plain loop over the same backbone, batch
size, optimiser and images already on the device as a normalised float tensor (no augmentation, no CIL
logic). The framework's images are those its loader trains (its last partial batch included; the
plain loops run full batches only). The framework's rate is given for the whole timed stage (its one-time setup included) and for
its epochs alone (their logged wall times), and for the epochs after the first (the steady state,
without what a stage pays once, such as compilation). Both run the same number of epochs after one warm-up epoch (which also pays for cuDNN's
algorithm search and, with ``compile``, for compilation). Each ``--compare NAME:overrides`` adds a
framework row with those overrides (e.g. ``cim:compression=cim``, ``compiled:compile=true``); each
``--precision`` repeats every row with bf16 autocast + channels_last (``amp``/``channels_last`` true)
or float32 (both false); on a CPU the two are the same, so one is enough there. Ratios are against the
plain loop of the same precision. A second plain row, ``plain + augment``, runs the plain loop on
the stored uint8 images with the framework's batched augmentation on the device
(``Trainer.augment``; the original sizes of whole-stored images stay on the host, where it draws
the crop boxes, as in the framework's loader): what is left between it and the framework row is
the framework's own work per step (sources, hooks, loss parts, logging).
``--profile`` then profiles, per row, steady-state training steps under ``torch.profiler``: for
the plain rows one more epoch; for a framework row a fresh stage of two epochs of which only the
second is profiled, from its first batch to its end (so the stage's one-time setup, copying its
data to the device and ``compile``'s compilation, are left out; see ``profile_framework``). It
reports the wall time per step (over the steps the loader really gave, the framework's last
partial batch included) and the images/s of those steps (in the JSON; it compares rows whatever
their last batch), both with the profiler's own overhead in them, so compare the rows with each
other, not with their unprofiled images/s; the device's busy fraction (the union of the device's
kernel, copy and memset intervals over the wall time: kernels overlapping on several streams
count once and the profiler's annotation ranges not at all; well below 1 means the GPU waits for
the host, i.e. per-step Python or a host sync is the limit), on a GPU the host syncs of the
window (count and source lines) and the top operators by host time and by device time.
``--decode`` instead times decoding the training files to the stored form through the streamed
path's loader (images/s and images/s per worker), through the same loader with ``stream_decode:
"device"`` (the workers read bytes, each batch is decoded on the GPU, or on a CPU-only machine by
torchvision on the CPU, with the stored form's resize), and on a GPU
``torchvision.io.decode_jpeg`` on the device alone, for the dataset's first ``--decode_images`` files.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from trainer import Trainer  # noqa: E402
from utils import batching  # noqa: E402
from utils.config import apply_overrides, load_config_file, parse_set, resolve_config, stored_image_size  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.io import path_problem  # noqa: E402


def run_main(main: Callable[[], object]) -> int:
    """Run an experiment script's ``main()`` (it reads sys.argv) and return its exit status: a bad input
    (a UserError: an unknown --config or --set key, a bad path, unreadable data, an argument out of
    range) is one "error: ..." line on stderr and status 2, not a traceback. Shared by the exps/
    benches and analyses: ``sys.exit(run_main(main))``."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def check_out_file(path: str | None, what: str = "--out") -> None:
    """UserError unless ``path`` (None: no such option given) can be written as a file: not a folder,
    in an existing, writable folder. Checked before a benchmark runs, so that a bad path does not fail
    only once the whole benchmark is done."""
    if path is None:
        return
    target = Path(path)
    folder = target.parent
    try:
        if target.is_dir():
            raise UserError(f"{what} {path} is a folder; give a file name.")
        if not folder.is_dir():
            raise UserError(f"{what} {path} cannot be written: its folder {folder} {path_problem(str(folder), 'folder')}.")
    except OSError as err:   # a name too long (Python 3.11's Path methods raise ENAMETOOLONG)
        raise UserError(f"{what} {path} cannot be written: {err.strerror or err}.") from None
    if not os.access(folder, os.W_OK):
        raise UserError(f"{what} {path} cannot be written: its folder {folder} is not writable.")


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


def time_framework(raw: dict, epochs: int, profile: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        trainer, phase = build_trainer(raw, 1, Path(tmp) / "warm")
        stage = trainer.learner.stages(phase)[0]
        gen = torch.Generator().manual_seed(0)
        trainer.run_stage(phase, stage, gen)                      # warm-up epoch
        stage = trainer.learner.stages(phase)[0]                  # fresh stage: params may be a generator
        stage.epochs = epochs
        data = trainer.stage_data(phase, stage.data)
        records = []
        trainer.log.metric = records.append                       # the epochs' own timings
        sync(trainer.device)
        start = time.perf_counter()
        trainer.run_stage(phase, stage, gen)
        sync(trainer.device)
        seconds = time.perf_counter() - start
        n = trained_per_epoch(data, stage.batch_size or trainer.cfg["batch_size"])
        # Each epoch ends in a device sync (its losses are read), so the logged epoch seconds are
        # wall times of the epochs alone: without the stage's one-time setup (assembling the stage
        # data and copying it to the device), which the plain loop's timing leaves out too.
        timed = [r["seconds"] for r in records if r.get("stage") == stage.name]
        epoch_seconds, later = sum(timed), sum(timed[1:])
        profiled = None
        if profile:
            try:
                profiled = profile_framework(trainer, phase, gen)
            except Exception as exc:  # noqa: BLE001 - the timings above stand without their profile
                profiled = {"error": error_text(exc)}
        # Epochs after the first: the steady state, without what a stage pays once in its first
        # epoch (torch.compile compiles the stage's forward there).
        return {"images_per_s": round(epochs * n / seconds, 1), "seconds": round(seconds, 2),
                "epoch_images_per_s": round(epochs * n / epoch_seconds, 1) if epoch_seconds else None,
                "steady_images_per_s": round((len(timed) - 1) * n / later, 1) if later else None,
                "device": str(trainer.device), **({"profile": profiled} if profiled else {})}


def trained_per_epoch(data, batch_size: int) -> int:
    """Samples one framework epoch trains: every batch of the loader (``StageData.batches``) but
    a last one under 2 samples, so the last partial batch counts (the plain loops drop it and
    count full batches only). Phase 0 has no mixed source (``ratio``) adding samples per batch."""
    if data.mixed:
        raise UserError("the stage has mixed sources (a synthetic replay `ratio`); its images per epoch are not counted")
    return sum(len(b) for b in batching.shard_batches(torch.arange(len(data)), batch_size, min_batch=2))


def profile_framework(trainer: Trainer, phase, gen: torch.Generator, top: int = 15) -> dict:
    """Profile the framework's steady-state steps: a fresh stage runs two epochs and the profiler
    covers the second one only, from its first batch to its end. Two bench-only plugins open and
    close the window: one placed first, whose ``before_augment`` starts the profiler at the second
    epoch's first batch and counts that epoch's batches (the loader's real number of steps, the
    last partial batch included), and one placed last, whose ``after_epoch`` stops it once the
    epoch's losses were read and every plugin's per-epoch work (e.g. CIM's bilevel step) ran.
    So the stage's one-time setup (stage data, copy to the device, optimiser, torch.compile's
    compilation in the first epoch's forward) is outside the window, and ms/step is the wall
    time of those steps over their count."""
    from models.plugins import Plugin

    stage = trainer.learner.stages(phase)[0]                      # fresh stage, as the timed one
    stage.epochs = 2
    last = stage.epochs - 1
    window = StepProfiler(trainer.device, top)
    state = {"steps": 0, "images": 0, "result": None}

    class OpenWindow(Plugin):
        def before_augment(self, images, batch, stage, epoch):
            if epoch == last:
                if state["steps"] == 0:
                    window.start()
                state["steps"] += 1
                state["images"] += images.shape[0]
            return images

    class CloseWindow(Plugin):
        def after_epoch(self, phase, stage, epoch, lr):
            if epoch == last and window.running:
                state["result"] = window.stop(state["steps"], state["images"])

    plugins = trainer.plugins
    trainer.plugins = [OpenWindow(trainer.cfg, trainer.ctx), *plugins, CloseWindow(trainer.cfg, trainer.ctx)]
    try:
        trainer.run_stage(phase, stage, gen)
    finally:
        trainer.plugins = plugins
        window.close()
    if state["result"] is None:
        raise RuntimeError(f"--profile: the framework's stage {stage.name!r} ran no batch in its second epoch")
    return state["result"]


def time_plain(raw: dict, epochs: int, augment: bool = False, profile: bool = False) -> dict:
    """Same backbone/head, batch, SGD settings; nothing else. Without ``augment`` the data are
    pre-normalised in memory; with it, the stored uint8 images are on the device and each batch goes
    through the framework's augmentation there (``Trainer.augment``) before the step."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer, phase = build_trainer(raw, 1, Path(tmp) / "plain")
        net = trainer.learner.net
        cfg = trainer.cfg
        device = trainer.device
        data = trainer.stage_data(phase, "phase")
        images, labels = data.images, data.labels
        if augment:
            stored = images.to(device)                                 # uint8, as the framework holds it
            hw = data.orig_hw        # int64 [N, 2] or None: stays on the host, as in the framework's loader,
            #                          where the augmentation draws its crop boxes (no per-step copy back)
        else:
            x_all = trainer.ctx.to_input(images, data.orig_hw)        # float, normalised, on the device
        y_all = labels.to(device)
        opt = torch.optim.SGD(net.parameters(), lr=cfg["init_lr"], momentum=cfg["momentum"],
                              weight_decay=cfg["init_weight_decay"])
        bs = cfg["batch_size"]
        gen = torch.Generator().manual_seed(0)

        def epoch() -> int:
            """One pass of full batches; returns its number of steps. The order is drawn on the
            host and copied to the device once (``batching.iterate`` does the same): the batches
            are cut from the device copy, the sizes of whole-stored images from the host one."""
            net.train()
            order = torch.randperm(len(y_all), generator=gen)
            order_dev = batching.to_device(order, device)
            steps = 0
            for i in range(0, len(order) - bs + 1, bs):
                idx = order_dev[i:i + bs]
                if augment:
                    x = trainer.augment(stored[idx], gen, None if hw is None else hw[order[i:i + bs]])
                    if trainer.channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                else:
                    x = x_all[idx]
                with trainer.ctx.autocast():
                    loss = F.cross_entropy(net(x)["logits"], y_all[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps += 1
            return steps

        epoch()                                                   # warm-up
        sync(device)
        start = time.perf_counter()
        for _ in range(epochs):
            epoch()
        sync(device)
        seconds = time.perf_counter() - start
        n = len(y_all) // bs * bs
        out = {"images_per_s": round(epochs * n / seconds, 1), "seconds": round(seconds, 2), "device": str(device)}
        if profile:
            out["profile"] = profile_call(epoch, device, bs)
        return out


# What the device's busy time counts among the profiler's device-side events (Kineto activity
# types): kernels, copies and memsets. Not counted: the user-annotation ranges (record_function,
# ProfilerStep#) that the profiler also places on the device's timeline, spanning the kernels
# they enclose, nor anything else (e.g. synchronisation records).
DEVICE_WORK = ("kernel", "gpu_memcpy", "gpu_memset")


def device_intervals(events) -> list[tuple[float, float]]:
    """(start, end) in µs of the device's own work among profiler events (``prof.events()``,
    ``FunctionEvent``s): events on a non-CPU device that are not user annotations and, where the
    event names its activity type (a string; older or other profilers may give none), of a type
    in ``DEVICE_WORK``."""
    from torch.autograd import DeviceType

    out = []
    for e in events:
        if e.device_type == DeviceType.CPU or getattr(e, "is_user_annotation", False):
            continue
        kind = getattr(e, "activity_type", None)   # a name, e.g. "kernel" (Kineto's); else unknown
        if isinstance(kind, str) and kind and kind not in DEVICE_WORK:
            continue
        out.append((e.time_range.start, e.time_range.end))
    return out


def busy_us(intervals) -> float:
    """Length of the union of ``(start, end)`` intervals: time during which at least one of them
    runs, so kernels overlapping on several streams, or nested, count once; empty or reversed
    intervals count nothing."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= start or end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


class StepProfiler:
    """torch.profiler over a window of training steps that the caller opens (``start``) and closes
    (``stop(steps)`` -> the report); ``close`` ends a window left open (an error), restoring the
    sync debug mode. The report: the window's wall time per step; the device's busy fraction (the
    union of its kernel, copy and memset intervals, :func:`device_intervals` / :func:`busy_us`,
    over the wall time; None on a CPU); on a GPU the host syncs it made
    (``torch.cuda.set_sync_debug_mode``: their number and the lines that made them; an epoch reads
    its losses once, so a few are expected, one per step is a stall) and the top operators by self
    host time and, on a GPU, by self device time (tables as text)."""

    def __init__(self, device: torch.device, top: int = 15):
        self.device, self.top = device, top
        self.cuda = device.type == "cuda"
        self.running = False
        self._sync_mode = 0   # the sync debug mode to restore ("default")

    def start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        # The device's queue drained first, so every kernel the profiler records ran in the window
        # (the busy time's intervals and the wall time cover the same span).
        sync(self.device)
        self.prof = profile(activities=activities)
        self.prof.start()
        self.running = True
        self._warnings = warnings.catch_warnings(record=True)
        self.caught = self._warnings.__enter__()
        warnings.simplefilter("always")
        if self.cuda:   # every host read of a GPU value warns, with the Python line that made it
            self._sync_mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
        self.t0 = time.perf_counter()

    def stop(self, steps: int, images: int) -> dict:
        self._end_sync_debug()
        sync(self.device)
        wall = time.perf_counter() - self.t0
        self.close()
        return self.report(wall, steps, images)

    def _end_sync_debug(self) -> None:
        if self.cuda:
            torch.cuda.set_sync_debug_mode(self._sync_mode)

    def close(self) -> None:
        if not self.running:
            return
        self.running = False
        try:
            self._end_sync_debug()
            self._warnings.__exit__(None, None, None)
        finally:
            self.prof.stop()

    def report(self, wall: float, steps: int, images: int) -> dict:
        averages = self.prof.key_averages()
        syncs = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in self.caught
                        if "synchronizing CUDA operation" in str(w.message))
        out = {"wall_s": round(wall, 4), "steps": steps, "ms_per_step": round(1000 * wall / max(steps, 1), 3),
               # images the steps trained (a framework row's last batch may be partial): images/s
               # under the profiler, comparable between rows whatever their batches
               "images": images, "images_per_s": round(images / wall, 1) if wall > 0 else None,
               "device_busy": None,
               # host syncs in the window (GPU only): their count and where they are (file:line -> count)
               "host_syncs": sum(syncs.values()) if self.cuda else None,
               "host_sync_sites": dict(syncs.most_common(10)),
               "top_host": averages.table(sort_by="self_cpu_time_total", row_limit=self.top)}
        if self.cuda:
            intervals = device_intervals(self.prof.events())
            busy = busy_us(intervals)
            out["device_busy"] = round(busy / 1e6 / wall, 3)
            # the device's own time per step: the profiler slows the host (more than the device), so
            # the busy fraction of an unprofiled step is about this over its unprofiled step time
            out["device_ms_per_step"] = round(busy / 1e3 / max(steps, 1), 3)
            out["device_ops"] = len(intervals)   # kernels, copies, memsets counted (0 would mean none was seen)
            out["top_device"] = averages.table(sort_by="self_device_time_total", row_limit=self.top)
        return out


def profile_call(fn, device: torch.device, batch_size: int, top: int = 15) -> dict:
    """Run ``fn`` (one epoch of full batches of ``batch_size``; it returns its number of steps)
    under :class:`StepProfiler`."""
    window = StepProfiler(device, top)
    window.start()
    try:
        steps = fn()
        return window.stop(steps, steps * batch_size)
    finally:
        window.close()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


PRECISION = {"bf16": {"amp": True, "channels_last": True}, "fp32": {"amp": False, "channels_last": False}}


def parse_compare(text: str) -> tuple[str, dict]:
    """'NAME:K=V,K=V' -> (NAME, overrides); values are JSON where they parse, else strings."""
    name, _, rest = text.partition(":")
    if not name or not rest:
        raise UserError(f"--compare {text!r}: expected NAME:KEY=VALUE[,KEY=VALUE]")
    return name, parse_set(rest.split(","))


def time_decode(raw: dict, workers: list[int], count: int, batch_size: int = 64) -> list[dict]:
    """Decode the first ``count`` training files to the stored form: through the streamed path's
    DataLoader (FileImages, Pillow with JPEG draft mode) with each number of workers, the same with
    ``stream_decode`` "device" (bytes in the workers, ``utils.stream_decode`` on the GPU, else the
    CPU), and, on a GPU, with ``torchvision.io.decode_jpeg`` on the device plus a resize there."""
    from utils.datasets import FileImages, load_dataset

    cfg = resolve_config({**raw, "in_memory": False})
    size = stored_image_size(cfg)
    data = load_dataset(cfg["dataset"], cfg["data_root"], image_size=size, class_list=cfg["class_list"],
                        cache_dir=None, in_memory=False)
    paths = list(data.train.paths[:count])
    files = FileImages(paths, size)
    rows = []
    for w in workers:
        loader = torch.utils.data.DataLoader(files, batch_size=batch_size, num_workers=w)
        start = time.perf_counter()
        n = sum(len(b) for b in loader)
        seconds = time.perf_counter() - start
        rows.append({"decoder": "pillow (streamed loader)", "workers": w, "images": n,
                     "images_per_s": round(n / seconds, 1),
                     "images_per_s_per_worker": round(n / seconds / max(w, 1), 1)})
    from utils import batching

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_device = FileImages(paths, size, device)
    for w in workers:
        start = time.perf_counter()
        n = sum(len(b) for b, in batching.iterate(on_device, batch_size=batch_size, num_workers=w))
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        rows.append({"decoder": f"stream_decode device (bytes in the loader, decode_jpeg on {device.type})",
                     "workers": w, "images": n, "images_per_s": round(n / seconds, 1),
                     "images_per_s_per_worker": round(n / seconds / max(w, 1), 1)})
    if torch.cuda.is_available():
        import torchvision.io as tio
        import torch.nn.functional as F
        blobs = [tio.read_file(p) for p in paths]
        def gpu_pass():
            out = 0
            for i in range(0, len(blobs), batch_size):
                imgs = tio.decode_jpeg(blobs[i:i + batch_size], device="cuda", mode=tio.ImageReadMode.RGB)
                for im in imgs:   # short side to the stored size, centre crop (as decode_image)
                    h, w = im.shape[-2:]
                    s = size / min(h, w)
                    r = F.interpolate(im[None].float(), size=(max(size, round(h * s)), max(size, round(w * s))),
                                      mode="bilinear", antialias=True, align_corners=False)
                    out += r.shape[0]
            torch.cuda.synchronize()
            return out
        row = {"decoder": "torchvision.io.decode_jpeg on cuda (+ resize)", "workers": 0}
        try:
            gpu_pass()   # warm-up
            start = time.perf_counter()
            n = gpu_pass()
            seconds = time.perf_counter() - start
            row.update(images=n, images_per_s=round(n / seconds, 1), images_per_s_per_worker=None)
        except Exception as exc:   # e.g. a torchvision built without nvjpeg: the loader rows still count
            row["error"] = f"{type(exc).__name__}: {exc}"
        rows.append(row)
    return rows


def error_text(exc: BaseException) -> str:
    """A failed row's or profile's reason: the exception's type and first line."""
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"


def save_partial(path: str | None, report: dict, rows: list[dict]) -> None:
    """Write the rows measured so far to ``path`` (``--out``), so that they survive a run stopped
    at its time limit."""
    if path:
        Path(path).write_text(json.dumps({**report, "rows": rows}, indent=1))


def markdown(rows: list[dict]) -> str:
    profiled = any("profile" in r for r in rows)
    head = ("| row | precision | images/s (stage) | vs plain | images/s (epochs) | vs plain | "
            "images/s (epochs 2+) | vs plain | seconds | device |" + (" ms/step (profiled) | device busy |" if profiled
                                                                      else "") + "\n"
            + "|---" * (10 + 2 * profiled) + "|\n")

    def profile_cells(r):
        if not profiled:
            return ""
        prof = r.get("profile") or {}
        busy = prof.get("device_busy")
        return f" {prof.get('ms_per_step', '')} | {'' if busy is None else busy} |"
    return head + "".join(f"| {r['row']} | {r['precision']} | {(r.get('error') or '').replace('|', '/') or r['images_per_s']} | {r.get('vs_plain', '')} | "
                          f"{r.get('epoch_images_per_s') or ''} | {r.get('epochs_vs_plain', '')} | "
                          f"{r.get('steady_images_per_s') or ''} | {r.get('steady_vs_plain', '')} | "
                          f"{r['seconds'] or ''} | {r['device']} |{profile_cells(r)}\n" for r in rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="smoke")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--compare", action="append", default=[],
                   help="NAME:KEY=VALUE[,KEY=VALUE] overrides for another framework row")
    p.add_argument("--precision", nargs="+", default=None, choices=sorted(PRECISION),
                   help="rows per precision (default: the config's own amp/channels_last)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--decode", action="store_true", help="time image decoding instead of training")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4, 8])
    p.add_argument("--decode_images", type=int, default=2000)
    p.add_argument("--profile", action="store_true",
                   help="profile steady-state steps of every row: one more epoch of the plain rows, the "
                        "second epoch of a fresh two-epoch stage of the framework rows (ms per step, the "
                        "device's busy fraction as the union of its kernel intervals, host syncs, top operators)")
    p.add_argument("--out", default=None, help="also write the report as JSON here")
    args = p.parse_args()
    if args.epochs < 1:
        raise UserError(f"--epochs is {args.epochs}; it must be at least 1.")
    check_out_file(args.out)
    compares = [("framework", {})] + [parse_compare(c) for c in args.compare]   # all parsed before any timing
    if args.threads:
        torch.set_num_threads(args.threads)
    raw, _ = load_config_file(args.config)
    raw = apply_overrides(raw, parse_set(args.set))
    resolve_config(raw)   # an unknown or bad key: refused here, not in the first row's run
    report = {"config": args.config, "set": args.set, "epochs": args.epochs, "threads": torch.get_num_threads(),
              "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    if args.decode:
        report["decode"] = time_decode(raw, args.workers, args.decode_images)
    else:
        rows = []
        for precision in args.precision or [None]:
            base = {**raw, **(PRECISION[precision] if precision else {})}
            plain = time_plain(base, args.epochs, profile=args.profile)
            on_gpu = plain["device"].startswith("cuda")   # amp and channels_last act on CUDA only
            label = (precision or ("bf16" if base.get("amp", True) else "fp32")) if on_gpu else "fp32"
            plain = {"row": "plain loop", "precision": label, **plain}
            rows.append(plain)
            augmented = {"row": "plain + augment", "precision": label,
                         **time_plain(base, args.epochs, augment=True, profile=args.profile)}
            augmented["vs_plain"] = round(augmented["images_per_s"] / plain["images_per_s"], 3)
            rows.append(augmented)
            save_partial(args.out, report, rows)
            for name, overrides in compares:
                r = {"row": name, "precision": label, "overrides": overrides}
                try:
                    r.update(time_framework(apply_overrides(base, overrides), args.epochs, profile=args.profile))
                except Exception as exc:  # noqa: BLE001 - one failing row (a diverged stage, say) keeps the others
                    r.update(error=error_text(exc), images_per_s=None, seconds=None,
                             epoch_images_per_s=None, steady_images_per_s=None, device=plain["device"])
                    print(f"row {name} ({label}) failed: {r['error']}", file=sys.stderr)
                    rows.append(r)
                    save_partial(args.out, report, rows)
                    continue
                r["vs_plain"] = round(r["images_per_s"] / plain["images_per_s"], 3)
                if r["epoch_images_per_s"]:
                    r["epochs_vs_plain"] = round(r["epoch_images_per_s"] / plain["images_per_s"], 3)
                if r["steady_images_per_s"]:
                    r["steady_vs_plain"] = round(r["steady_images_per_s"] / plain["images_per_s"], 3)
                rows.append(r)
                save_partial(args.out, report, rows)
        report["rows"] = rows
        report["table"] = markdown(rows)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    if "table" in report:
        print(report["table"])
        for r in report["rows"]:
            if "profile" in r:
                prof = r["profile"]
                if "error" in prof:
                    print(f"{r['row']} ({r['precision']}): profile failed: {prof['error']}")
                    continue
                print(f"{r['row']} ({r['precision']}): {prof['ms_per_step']} ms per step, device busy "
                      f"{prof['device_busy']} (device {prof.get('device_ms_per_step')} ms per step), "
                      f"host syncs {prof['host_syncs']}"
                      + "".join(f"; {site} x{n}" for site, n in prof["host_sync_sites"].items()))


if __name__ == "__main__":
    sys.exit(run_main(main))
