"""Run a grid of configurations: ``python exps/sweep.py SPEC.json [--output ROOT] [--dry-run]
[--jobs K] [--devices 0,1,...]``.

SPEC.json is ``{"base": config name or path, "set": {fixed overrides}, "grid": {key: [values]},
"variants": {name: {overrides, optionally its own "base"}}, "description": "..."}``; every key
but ``base`` is optional. The runs are every variant (one unnamed variant if there are none) times
every combination of the grid. A seed list in the resolved config (and no ``seed`` in the grid) is
one more grid axis: each run has one seed.

Each run is a ``main.py`` subprocess writing into ``ROOT/<variant>/<key>=<value>/...`` (the varying
keys, in the spec's order; default ROOT ``logs/sweeps/<spec name>``). Its state comes from its
``results.json``: *done* (every phase of the plan), *partial* (fewer phases, or a started folder:
resumed with ``--resume``), *missing* (run from scratch), *stale* (written by another config: left
alone, reported), *running* (another sweep holds its lock). A run folder's ``.sweep.lock`` is held
(``flock``) while its subprocess runs, so two sweeps never run the same run.

Exit status: 0 all runs done; 1 some run failed or is stale/locked; 2 a bad spec (unknown
top-level key, a grid value that is not a list, a config key or value refused by the schema) or,
with ``--dry-run``, data missing on disk (the message names data_root) — nothing run.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import queue
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from utils.errors import ConfigError, UserError  # noqa: E402

EXIT_USER_ERROR = 2
SPEC_KEYS = ("base", "set", "grid", "variants", "description")
LOCK_NAME = ".sweep.lock"


@dataclass
class Run:
    name: str                 # folder relative to the sweep root, e.g. "memory_size=500/seed=1993"
    base: Path                # the base config file
    overrides: dict           # every --set of this run (the spec's set, the variant's, the grid's)
    cfg: dict                 # resolved config (one seed)
    variant: str | None = None
    folder: Path = field(default=Path("."))


# ---- the spec ----------------------------------------------------------------------------------
def _find_base(name: str, spec_dir: Path) -> Path:
    from utils.config import CONFIG_DIR

    names = [name] if name.endswith(".json") else [name, name + ".json"]
    for n in names:
        for folder in (Path.cwd(), spec_dir, CONFIG_DIR):
            path = folder / n
            if path.is_file():
                return path.resolve()
    raise ConfigError(f"Sweep spec 'base' is {json.dumps(name)}: no such config (looked in the current "
                      f"folder, the spec's folder {spec_dir} and {CONFIG_DIR}).")


def _label(value) -> str:
    """A value as a folder-name part: 500, cim, 0.5, true, 10-20 (lists), no slashes or spaces."""
    if isinstance(value, list):
        return "-".join(_label(v) for v in value)
    text = json.dumps(value) if isinstance(value, (bool, type(None), dict)) else str(value)
    return "".join(c if c.isalnum() or c in "._-+" else "_" for c in text)


def load_spec(path: Path) -> dict:
    try:
        spec = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"No sweep spec file {path}.") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"Sweep spec {path} is not valid JSON: {err}.") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"Sweep spec {path} must hold a JSON object {{\"base\", \"set\", \"grid\", \"variants\"}}.")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise ConfigError(f"Sweep spec {path}: unknown top-level key(s) {', '.join(unknown)}; "
                          f"allowed: {', '.join(SPEC_KEYS)}.")
    if not isinstance(spec.get("base"), str):
        raise ConfigError(f"Sweep spec {path}: 'base' must be a config name or path (a string).")
    for key in ("set", "grid", "variants"):
        if not isinstance(spec.get(key, {}), dict):
            raise ConfigError(f"Sweep spec {path}: '{key}' must be a JSON object.")
    for key, values in spec.get("grid", {}).items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"Sweep spec {path}: grid key '{key}' must have a non-empty list of values, "
                              f"got {json.dumps(values)}.")
    for name, over in spec.get("variants", {}).items():
        if not isinstance(over, dict):
            raise ConfigError(f"Sweep spec {path}: variant '{name}' must be a JSON object of overrides.")
        if "base" in over and not isinstance(over["base"], str):
            raise ConfigError(f"Sweep spec {path}: variant '{name}': 'base' must be a config name or path.")
    return spec


def expand(spec: dict, spec_path: Path, root: Path) -> list[Run]:
    """Every run of ``spec``, resolved and validated (ConfigError naming the run and the key)."""
    from utils.config import load_config_file, resolve_config

    spec_dir = Path(spec_path).resolve().parent
    grid = spec.get("grid", {})
    variants = spec.get("variants") or {None: {}}
    runs = []
    for vname, vover in variants.items():
        vover = dict(vover)
        base = _find_base(vover.pop("base", spec["base"]), spec_dir)
        raw_base, _ = load_config_file(str(base))
        axes = dict(grid)
        if "seed" not in axes:
            seeds = {**raw_base, **spec.get("set", {}), **vover}.get("seed")
            if isinstance(seeds, list):
                axes["seed"] = seeds
        for combo in itertools.product(*axes.values()):
            point = dict(zip(axes, combo))
            overrides = {**spec.get("set", {}), **vover, **point}
            parts = ([_label(vname)] if vname is not None else []) + [f"{k}={_label(v)}" for k, v in point.items()]
            name = "/".join(parts) or "run"
            try:
                cfg = resolve_config({**raw_base, **overrides})
            except ConfigError as err:
                raise ConfigError(f"Sweep run '{name}' (base {base.name}): {err}") from None
            if isinstance(cfg["seed"], list):
                raise ConfigError(f"Sweep run '{name}': 'seed' is a list inside a grid value; give the seeds "
                                  f"as the grid's 'seed' list.")
            runs.append(Run(name, base, overrides, cfg, vname, root / name))
    names = [r.name for r in runs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"Sweep spec {spec_path}: two runs share the folder {dup[0]}; give the variants distinct names.")
    return runs


# ---- state of a run folder ---------------------------------------------------------------------
class DataMissing(UserError):
    pass


_plan_cache: dict[str, int] = {}


def planned_phases(cfg: dict) -> int:
    """Number of phases of ``cfg``'s plan (needs the dataset's class count: its listing on disk)."""
    from utils.config import phase_plan
    from utils.datasets import describe_dataset

    key = json.dumps([cfg["dataset"], cfg["data_root"], cfg["class_list"], cfg["shapes"]], sort_keys=True)
    if key not in _plan_cache:
        try:
            info = describe_dataset(cfg["dataset"], cfg["data_root"], class_list=cfg["class_list"],
                                    shapes=cfg["shapes"])
        except UserError as err:
            raise DataMissing(f"dataset '{cfg['dataset']}' not usable at data_root={json.dumps(cfg['data_root'])} "
                              f"(set it in the spec's \"set\" or with the base config): {err}") from None
        _plan_cache[key] = info["num_classes"]
    return len(phase_plan(cfg, _plan_cache[key]))


def is_locked(folder: Path) -> bool:
    lock = RunLock(folder)
    if not lock.acquire(create=False):
        return True
    lock.release()
    return False


def run_state(run: Run, num_phases: int | None) -> tuple[str, str]:
    """(state, detail): done / partial / missing / stale / running."""
    from utils.config import config_hash, resolve_saved_config

    folder = run.folder
    if folder.exists() and is_locked(folder):
        return "running", "locked by another sweep"
    results = folder / "results.json"
    if results.exists():
        try:
            saved = json.loads(results.read_text())
            old, _ = resolve_saved_config(saved["config"])
            same = config_hash(old) == config_hash(run.cfg) and old["seed"] == run.cfg["seed"]
        except (ValueError, KeyError, UserError):
            same = False
        if not same:
            return "stale", "results.json written by another config"
        done = len(saved.get("phases", []))
        if num_phases is None:
            return "partial?", f"{done} phases done (plan unknown)"
        if done >= num_phases:
            return "done", f"{done}/{num_phases} phases"
        return "partial", f"{done}/{num_phases} phases"
    if (folder / "config.json").exists() or (folder / "checkpoints").exists():
        return "partial", f"0/{num_phases if num_phases is not None else '?'} phases"
    return "missing", ""


class RunLock:
    """An exclusive ``flock`` on ``<run folder>/.sweep.lock``, held while the run's subprocess runs
    (released by the kernel if this process dies, so a killed sweep leaves no stale lock)."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_NAME
        self.fd = None

    def acquire(self, create: bool = True) -> bool:
        import fcntl

        if not create and not self.path.exists():
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return True

    def release(self) -> None:
        import fcntl

        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


# ---- running -----------------------------------------------------------------------------------
def command(run: Run, resume: bool) -> list[str]:
    cmd = [sys.executable, str(REPO / "main.py"), "--config", str(run.base)]
    for key, value in run.overrides.items():
        cmd += ["--set", f"{key}={json.dumps(value)}"]
    cmd += ["--output", str(run.folder)]
    return cmd + (["--resume"] if resume else [])


def execute(run: Run, state: str, device: str | None, say) -> str:
    """Run one configuration as a subprocess under its lock; returns its outcome."""
    lock = RunLock(run.folder)
    if not lock.acquire():
        say(f"{run.name}: locked by another sweep, skipped")
        return "locked"
    try:
        env = dict(os.environ)
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        start = time.time()
        say(f"{run.name}: {'resume' if state == 'partial' else 'start'}"
            f"{'' if device is None else f' on CUDA device {device}'}")
        with open(run.folder / "sweep_output.txt", "a") as out:
            code = subprocess.run(command(run, state == "partial"), stdout=out, stderr=subprocess.STDOUT,
                                  env=env, cwd=Path.cwd()).returncode
        took = time.time() - start
        if code != 0:
            say(f"{run.name}: FAILED (exit {code}) after {took:.0f} s; see {run.folder / 'sweep_output.txt'}")
            return "failed"
        say(f"{run.name}: finished in {took:.0f} s")
        return "finished"
    finally:
        lock.release()


def write_sweep_json(root: Path, spec: dict, spec_path: Path, runs: list[Run]) -> None:
    from utils.config import config_hash
    from utils.io import write_json

    root.mkdir(parents=True, exist_ok=True)
    write_json(root / "sweep.json", {
        "spec": spec, "spec_path": str(spec_path),
        "varying": list(spec.get("grid", {})) + (["seed"] if runs and "seed" not in spec.get("grid", {})
                                                 and len({r.cfg["seed"] for r in runs}) > 1 else []),
        "runs": [{"name": r.name, "variant": r.variant, "base": str(r.base), "overrides": r.overrides,
                  "config_hash": config_hash(r.cfg), "seed": r.cfg["seed"]} for r in runs]})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run a grid of configurations (see the module docstring).")
    p.add_argument("spec", help="sweep spec JSON: {base, set, grid, variants}")
    p.add_argument("--output", help="sweep root folder (default logs/sweeps/<spec name>)")
    p.add_argument("--dry-run", action="store_true", help="list every run with its folder and state; run nothing")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (default 1)")
    p.add_argument("--devices", help="comma-separated CUDA device ids; each job slot is pinned to one, round-robin")
    args = p.parse_args(argv)
    if args.jobs < 1:
        print("error: --jobs must be ≥ 1.", file=sys.stderr)
        return EXIT_USER_ERROR
    devices = [d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else []
    spec_path = Path(args.spec)
    root = Path(args.output) if args.output else Path("logs") / "sweeps" / spec_path.stem
    try:
        spec = load_spec(spec_path)
        runs = expand(spec, spec_path, root)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR

    missing_data = None
    states = []
    for run in runs:
        try:
            n = planned_phases(run.cfg)
        except DataMissing as err:
            missing_data, n = missing_data or err, None
        except UserError as err:   # the protocol does not fit the dataset
            print(f"error: sweep run '{run.name}': {err}", file=sys.stderr)
            return EXIT_USER_ERROR
        states.append(run_state(run, n))

    if args.dry_run:
        print(f"sweep {spec_path.stem}: {len(runs)} runs under {root}")
        width = max(len(r.name) for r in runs)
        for run, (state, detail) in zip(runs, states):
            print(f"  {run.name:{width}s}  {state:8s} {detail}")
        counts = {s: sum(st == s for st, _ in states) for s in dict.fromkeys(st for st, _ in states)}
        print("  " + ", ".join(f"{n} {s}" for s, n in counts.items()))
        if missing_data is not None:
            print(f"error: data missing, nothing could run: {missing_data}", file=sys.stderr)
            return EXIT_USER_ERROR
        return 0
    if missing_data is not None:
        print(f"error: data missing, nothing run: {missing_data}", file=sys.stderr)
        return EXIT_USER_ERROR

    write_sweep_json(root, spec, spec_path, runs)
    start = time.time()
    lock = threading.Lock()
    todo = []
    for i, (run, (state, detail)) in enumerate(zip(runs, states)):
        tag = f"[{i + 1}/{len(runs)}]"
        if state in ("done", "stale", "running"):
            why = {"done": "done, skipped", "running": "locked by another sweep, skipped",
                   "stale": "STALE (results.json of another config), left alone: delete it or use another --output"}
            print(f"{tag} {run.name}: {why[state]}" + (f" ({detail})" if state == "done" else ""), flush=True)
        else:
            todo.append((tag, run, state))
    slots: queue.Queue = queue.Queue()
    for s in range(args.jobs):
        slots.put(s)

    def work(item):
        tag, run, state = item
        slot = slots.get()
        try:
            def say(msg):
                with lock:
                    print(f"{tag} {msg}", flush=True)
            return execute(run, state, devices[slot % len(devices)] if devices else None, say)
        finally:
            slots.put(slot)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        outcomes = list(pool.map(work, todo))
    took = time.time() - start
    bad = outcomes.count("failed") + outcomes.count("locked") + sum(s in ("stale", "running") for s, _ in states)
    print(f"sweep {spec_path.stem}: {outcomes.count('finished')} run, {sum(s == 'done' for s, _ in states)} "
          f"already done, {bad} failed/stale/locked; {took:.0f} s; results under {root}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
