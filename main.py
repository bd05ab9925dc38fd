"""Command line: ``python main.py --config NAME_OR_PATH [--set KEY=VALUE ...] [--output DIR] [--resume]
[--device DEV] [--check]``.

Exit status: 0 success; 2 config or data error (a message naming the key or path, no traceback);
130 interrupted by Ctrl-C, 143 by SIGTERM (the finished phases stay saved; the message gives the
resume command); 1 anything else.

Under ``torchrun --nproc_per_node=N main.py ...`` every process validates the same config (an error
there stops each of them alike, before any process group exists), then joins the process group
(``utils/distributed.py``) and trains its shard; rank 0 writes the run folder.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143   # 128 + SIGTERM, as a shell reports a process that SIGTERM ended


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Class-incremental learning with compressed exemplars.")
    p.add_argument("--config", help="config file path, or a name in configs/ (with or without .json)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key; VALUE is parsed as JSON, else taken as a string (repeatable)")
    p.add_argument("--output", help="output folder (default logs/<model>/<dataset>/<config>-<hash>/seed<seed>)")
    p.add_argument("--resume", action="store_true", help="continue after the last finished phase")
    p.add_argument("--device", help="override the config's device (cpu, cuda, cuda:N, auto)")
    p.add_argument("--threads", type=int, help="override the config's CPU threads of torch (threads key)")
    p.add_argument("--check", action="store_true", help="validate config and dataset, print the plan, exit")
    p.add_argument("--keys", action="store_true", help="print every config key with its default and exit")
    return p


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def output_dir(cfg: dict, config_name: str, seed: int, explicit: str | None, many_seeds: bool) -> Path:
    from utils.config import config_hash

    if explicit:
        return Path(explicit) / f"seed{seed}" if many_seeds else Path(explicit)
    name = cfg["prefix"] or config_name
    return Path("logs") / cfg["model_name"] / cfg["dataset"] / f"{name}-{config_hash(cfg)}" / f"seed{seed}"


def check_inputs(cfg: dict, seeds: list[int]) -> dict:
    """The checks that need the dataset's file listing, before any image is decoded or any output
    folder is touched: the data_root layout, enough classes for the protocol, and the files each
    enabled plugin reads (a synthetic-replay folder or pipeline) for every seed's class order.
    Returns :func:`utils.datasets.describe_dataset`'s dict."""
    from models.plugins import check_plugin_inputs
    from trainer import class_order
    from utils.config import phase_plan
    from utils.datasets import describe_dataset

    info = describe_dataset(cfg["dataset"], cfg["data_root"], class_list=cfg["class_list"], shapes=cfg["shapes"])
    plan = phase_plan(cfg, info["num_classes"])
    for seed in seeds:
        order = class_order(info["num_classes"], seed, cfg["shuffle"])
        check_plugin_inputs({**cfg, "seed": seed}, [info["class_names"][c] for c in order], plan)
    return info


def print_plan(cfg: dict, config_name: str, info: dict, outputs: list[Path], world: int = 1) -> None:
    from trainer import class_order
    from models.registry import get_learner_class
    from utils.config import phase_plan, run_notes
    from utils.memory import ExemplarMemory

    plan = phase_plan(cfg, info["num_classes"])
    memory = ExemplarMemory(cfg["memory_size"], cfg["memory_per_class"], cfg["fixed_memory"])
    print(f"config {config_name}: learner {cfg['model_name']}, backbone {cfg['convnet_type']}, dataset {cfg['dataset']} "
          f"({info['num_classes']} classes, {info['num_train']} train / {info['num_test']} test images)")
    seeds = cfg["seed"] if isinstance(cfg["seed"], list) else [cfg["seed"]]
    for seed in seeds:   # each seed draws its own class order
        print(f"class order (seed {seed}): {class_order(info['num_classes'], seed, cfg['shuffle'])[:plan[-1][1]]}")
    uses_memory = get_learner_class(cfg["model_name"]).uses_memory
    for k, (lo, hi) in enumerate(plan):
        budget = (f"memory budget {memory.class_budget(hi)} units per class ({memory.total_budget(hi)} total)"
                  if uses_memory else "no exemplar memory")
        print(f"  phase {k}: classes [{lo}, {hi}) — {hi - lo} new; {budget}")
    for note in run_notes(cfg, plan, info["num_classes"], uses_memory, world):
        print(note)
    for out in outputs:
        print(f"output: {out}")


def check_paths(cfg: dict, outputs: list[Path]) -> None:
    """Output folders and the cache folder must be writable: checked before any data is loaded."""
    from utils.datasets import DATASETS
    from utils.io import check_writable_dir

    for out in outputs:
        check_writable_dir(out, "Output folder")
    if cfg["cache_dir"] is not None and DATASETS[cfg["dataset"]].file_based:
        check_writable_dir(cfg["cache_dir"], "Config key 'cache_dir': the cache folder")


def resume_command(argv: list[str], world: int = 1) -> str:
    """The command that continues this one: itself with --resume (under torchrun, its own launch line)."""
    import shlex

    if world > 1:
        return "the same torchrun command with --resume"
    args = list(argv) + ([] if "--resume" in argv else ["--resume"])
    return shlex.join(["python", "main.py", *args])


def interrupted_status(how: str) -> int:
    """The exit status of a run interrupted by ``how`` ("SIGTERM" or "Ctrl-C")."""
    return EXIT_TERMINATED if how == "SIGTERM" else EXIT_INTERRUPTED


def stop_on_sigterm() -> None:
    """Make SIGTERM (a scheduler's preemption, a sweep stopping its runs) end a run as Ctrl-C does:
    the finished phases stay saved, the lock is released, one line says how to resume. Installed
    by the command line only (a program that calls :func:`main` keeps its own handlers)."""
    import os
    import signal

    from utils.errors import TERMINATION, Terminated

    owner = os.getpid()

    def terminated(signum, frame):
        if os.getpid() != owner:   # a forked helper (a decode pool's worker): die as SIGTERM would
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        TERMINATION.set()   # for where the exception below is lost or overtaken (utils.errors)
        raise Terminated()

    previous_hook = sys.unraisablehook

    def unraisable(report):   # a finalizer's exception, which Python prints and ignores
        if not TERMINATION.is_set():   # after SIGTERM: a consequence of the teardown (utils.errors)
            previous_hook(report)

    signal.signal(signal.SIGTERM, terminated)
    sys.unraisablehook = unraisable


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        return _main(args, argv)
    except (KeyboardInterrupt, Exception) as err:
        # Not during a run's phases (those end in RunInterrupted): in the checks or the data loading,
        # where nothing of the folder's saved phases (an earlier attempt's, an earlier seed's) is touched.
        from utils import distributed
        from utils.errors import interruption_of

        how = interruption_of(err)
        if how is None:   # an error of its own (after SIGTERM, any error is taken for it)
            raise
        rank, world, _ = distributed.env_world()
        if rank == 0:
            print(f"interrupted ({how}) before training started; the phases saved earlier stay saved; continue "
                  f"with: {resume_command(argv, world)}", file=sys.stderr)
        return interrupted_status(how)


def _main(args, argv: list[str]) -> int:
    try:
        from utils.config import apply_overrides, describe_keys, load_config_file, parse_set, resolve_config

        if args.keys:
            print(describe_keys())
            return 0
        if not args.config:
            print("error: --config is required (a path, or a name in configs/).", file=sys.stderr)
            return EXIT_USER_ERROR
        if args.output is not None and not args.output.strip():
            print("error: --output is an empty string; give a folder, or leave --output out for the default "
                  "under logs/.", file=sys.stderr)
            return EXIT_USER_ERROR
        raw, config_name = load_config_file(args.config)
        raw = apply_overrides(raw, parse_set(args.set))
        if args.device is not None:
            raw["device"] = args.device
        if args.threads is not None:
            raw["threads"] = args.threads
        cfg = resolve_config(raw)
        seeds = cfg["seed"] if isinstance(cfg["seed"], list) else [cfg["seed"]]
        runs = [({**cfg, "seed": s}, output_dir({**cfg, "seed": s}, config_name, s, args.output, len(seeds) > 1))
                for s in seeds]
        check_paths(cfg, [out for _, out in runs])

        from utils import distributed

        rank, world, _ = distributed.env_world()
        from utils.errors import ConfigError

        cores = usable_cores()
        if cfg["threads"] is not None and cfg["threads"] > cores:
            # torch.set_num_threads(100000) then crashes (segfault) and 1000 on 2 cores crawls
            raise ConfigError(f"Config key 'threads' (--threads) is {cfg['threads']}, but this process may use "
                              f"{cores} CPU core(s); give at most {cores}, or null for torch's default.")
        if world > 1 and cfg["batch_size"] // world < 2:
            # each process takes batch_size // world samples a step; a share of one is dropped (as
            # BatchNorm needs two), so every step would be skipped and the phases saved untrained
            raise ConfigError(f"Config key 'batch_size' is {cfg['batch_size']}, split across {world} processes: "
                              f"each would take {cfg['batch_size'] // world} sample(s) a step, and a step needs "
                              f"2; set batch_size to at least {2 * world} or start fewer processes.")
        info = check_inputs(cfg, seeds)
        if args.check:
            from trainer import resolve_device

            resolve_device(cfg["device"])   # a device this machine lacks fails here as in a run
            if rank == 0:
                print_plan(cfg, config_name, info, [out for _, out in runs], world)
            return 0
        from trainer import RunInterrupted, Trainer, TrainingDiverged, resolve_device

        device = resolve_device(cfg["device"])
        if world > 1 and cfg["sync_bn"] and device.type != "cuda":
            raise ConfigError("Config key 'sync_bn' is true but the device is the CPU: PyTorch's SyncBatchNorm "
                              "trains on GPUs only; set sync_bn to false.")
        distributed.init(device, cfg["dist_timeout"])   # a no-op in a plain run
        try:
            for run_cfg, out in runs:
                try:
                    Trainer(run_cfg, out, config_name).run(resume=args.resume)
                except TrainingDiverged as err:   # losses are reduced over ranks: every rank stops here
                    print(f"error: {err}", file=sys.stderr)
                    return 1
                except RunInterrupted as err:
                    if err.saved_phase is not None:
                        saved = f"phase {err.saved_phase} is saved in {err.out}"
                    elif err.checkpoints == "none":
                        saved = f"nothing is saved (checkpoints: none) in {err.out}"
                    else:
                        saved = f"no phase was finished yet in {err.out}"
                    if rank == 0:
                        print(f"interrupted ({err.how}): {saved}; resume with: {resume_command(argv, world)}",
                              file=sys.stderr)
                    return interrupted_status(err.how)
        finally:
            distributed.shutdown()
        return 0
    except Exception as err:  # noqa: BLE001 - user errors become a message, bugs keep their traceback
        from utils.errors import UserError

        if isinstance(err, UserError):
            print(f"error: {err}", file=sys.stderr)
            return EXIT_USER_ERROR
        raise


def quiet_on_broken_pipe(run) -> int:
    """``run()``'s exit status; when the reader of our output has gone (``main.py --keys | head``),
    exit 1 without a traceback, as command-line tools do (Python's docs, "Note on SIGPIPE"). A run
    whose log.info lines went to such a pipe stops there, its lock released and its finished phases
    saved."""
    import os

    try:
        code = run()
        sys.stdout.flush()   # a broken pipe can show only here, in the last write
        return code
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # the exit's own flush fails too
        return 1


if __name__ == "__main__":
    stop_on_sigterm()
    sys.exit(quiet_on_broken_pipe(main))
