"""Run a grid of configurations: ``python exps/sweep.py SPEC.json [--output ROOT] [--dry-run]
[--jobs K] [--devices 0,1,...]``.

SPEC.json is ``{"base": config name or path, "set": {fixed overrides}, "grid": {key: [values]},
"variants": {name: {overrides, optionally its own "base"}}, "description": "..."}``; every key
but ``base`` is optional. The runs are every variant (one unnamed variant if there are none) times
every combination of the grid. A seed list in the resolved config (and no ``seed`` in the grid) is
one more grid axis: each run has one seed. Two runs of one configuration and seed (a grid key that
does not change the result, such as ``threads``, or values that resolve alike, such as 0 and 0.0)
are refused: they would be the same run twice.

Each run is a ``main.py`` subprocess writing into ``ROOT/<variant>/<key>=<value>/...`` (the varying
keys, in the spec's order; default ROOT ``logs/sweeps/<spec name>``). Its state comes from its
``results.json``: *done* (every phase of the plan), *partial* (fewer phases, or a started folder:
resumed with ``--resume``), *missing* (run from scratch), *stale* (written by another config: left
alone, reported), *unreadable* (a results.json that is not a results object: left alone, reported),
*running* (another sweep holds its lock, or a ``main.py`` holds the run's own ``run.lock``). A run
folder's ``.sweep.lock`` is held (``flock``) while its subprocess runs, so two sweeps never run the
same run; its state is read again once the lock is held, so a run another sweep finished or started
meanwhile is skipped or resumed, never started afresh. ``ROOT/sweep.json`` lists the spec and its
runs, and keeps the runs an earlier sweep.json there listed whose folders remain (another spec run
into the same root).

SIGTERM, SIGINT (Ctrl-C) or SIGHUP stop the sweep: each running ``main.py`` gets one SIGINT (it stops
with its finished phases saved and exits 130), the runs not started yet are not started, and the
sweep exits 130 with one "interrupted" line; a second signal, over a second later, kills the
subprocesses (SIGKILL: main.py handles SIGTERM as it does Ctrl-C; its writes are atomic, so a kill
loses at most the phase it was in).

Exit status: 0 all runs done; 1 some run failed or is stale/unreadable/locked; 2 a bad spec (unknown
top-level key, a grid value that is not a list, a config key or value refused by the schema, a run
folder name that is not usable) or a bad ``--output`` / ``--devices``, or data missing on disk (the
message names data_root) — nothing run; 130 interrupted.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import queue
import signal
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

from utils.errors import ConfigError, DataError, UserError  # noqa: E402
from utils.results_file import is_run_name, load_results, read_json_file, read_sweep_json  # noqa: E402

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143   # main.py's, after Ctrl-C and after SIGTERM
SPEC_KEYS = ("base", "set", "grid", "variants", "description")
LOCK_NAME = ".sweep.lock"
NAME_MAX_FALLBACK = 255   # bytes of one file name, where the file system does not say


@dataclass
class Run:
    name: str                 # folder relative to the sweep root, e.g. "memory_size=500/seed=1993"
    base: Path                # the base config file
    overrides: dict           # every --set of this run (the spec's set, the variant's, the grid's)
    cfg: dict                 # resolved config (one seed)
    variant: str | None = None
    folder: Path = field(default=Path("."))
    hash: str = field(init=False, default="")   # config_hash(cfg): the run's identity (seed aside)

    def __post_init__(self):
        from utils.config import config_hash

        self.hash = config_hash(self.cfg)


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
    """The spec at ``path``, checked for its shape (top-level keys, grid lists, variant objects);
    ConfigError naming the file for anything else: missing, a folder, unreadable, not UTF-8, not JSON."""
    try:
        spec = read_json_file(path)   # the wording every JSON file of ours gets (utils/results_file.py)
    except DataError as err:
        raise ConfigError(f"Sweep spec {err}.") from None
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


def _exists(path: Path) -> bool:
    """Path.exists(), False where the path cannot be looked up at all: Python 3.11 raises OSError
    (ENAMETOOLONG) for a name longer than the file system allows instead of returning False."""
    try:
        return path.exists()
    except OSError:
        return False


def check_root_names(root: Path, limit: int) -> None:
    """Every folder name of the sweep root must fit the file system's limit (``limit`` bytes); a longer
    one would end in an OSError (ENAMETOOLONG) at the first look at the root."""
    for part in Path(root).parts:
        size = len(os.fsencode(part))
        if size > limit:
            raise ConfigError(f"--output {_short(str(root), 80)}: its folder name {_short(part)} is {size} bytes, longer "
                              f"than the file system allows ({limit} bytes); give a shorter --output.")


def name_max(root: Path) -> int:
    """The longest file name (bytes) the file system of ``root`` (or of its nearest existing
    folder above) allows; 255 where it does not say."""
    folder = Path(os.path.abspath(root))
    while not _exists(folder) and folder.parent != folder:
        folder = folder.parent
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, TypeError):
        return NAME_MAX_FALLBACK


def _short(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[:n] + "…"


def check_variant_label(vname: str, label: str) -> None:
    """A variant's folder label must be a usable folder name of its own: not empty, not ``.`` /
    ``..`` (or any name of dots only), which would put its runs in the sweep root or above it."""
    if not label.strip("."):
        raise ConfigError(f"Sweep variant name {json.dumps(vname)} is not a usable folder name (its folder would be "
                          f"{json.dumps(label)}); give the variant a name with a letter or digit.")


def check_name_length(run_name: str, part: str, key: str | None, vname: str | None, limit: int) -> None:
    """One folder name of a run (``part``: the variant label, or ``key=value``) must fit the file
    system's limit on a file name (``limit`` bytes); the message names the key or the variant."""
    size = len(part.encode("utf-8"))
    if size <= limit:
        return
    if key is None:
        raise ConfigError(f"Sweep variant {json.dumps(_short(vname or ''))}: its folder name is {size} bytes, longer "
                          f"than the file system allows ({limit} bytes); give the variant a shorter name.")
    raise ConfigError(f"Sweep run '{_short(run_name, 80)}': the folder name for {_short(part)} is {size} bytes, longer "
                      f"than the file system allows ({limit} bytes); give this value of '{key}' as a variant with a "
                      f"short name instead of a grid value (\"variants\": {{\"short-name\": {{\"{key}\": ...}}}}).")


def check_inside_root(run: Run, root: Path) -> None:
    """A run's folder must lie inside the sweep root (compared as absolute paths with ``.`` and
    ``..`` resolved, so a name can never write beside the root or elsewhere on disk)."""
    top = os.path.normpath(os.path.abspath(root))
    folder = os.path.normpath(os.path.abspath(run.folder))
    if os.path.commonpath([top, folder]) != top or folder == top:
        raise ConfigError(f"Sweep run '{run.name}': its folder {folder} is not inside the sweep root {top}; "
                          f"rename the variant.")


def _json(value) -> str:
    return json.dumps(value, sort_keys=True)


def same_run_differences(a: Run, b: Run) -> str:
    """Why two runs of one (config hash, seed) differ at all: the keys whose resolved values differ
    (none of them changes the result) and the keys given differently that resolve alike."""
    reasons = []
    for key in sorted(set(a.cfg) | set(b.cfg)):
        if _json(a.cfg.get(key)) != _json(b.cfg.get(key)):
            reasons.append(f"{key} ({_short(_json(a.cfg.get(key)))} vs {_short(_json(b.cfg.get(key)))}) does not "
                           f"change the result (it is not part of a run's identity)")
    for key in sorted(set(a.overrides) | set(b.overrides)):
        va, vb = a.overrides.get(key, a.cfg.get(key)), b.overrides.get(key, b.cfg.get(key))
        if _json(va) != _json(vb) and _json(a.cfg.get(key)) == _json(b.cfg.get(key)):
            reasons.append(f"{key} ({_short(_json(va))} vs {_short(_json(vb))}) resolves to the same value "
                           f"{_short(_json(a.cfg.get(key)))}")
    if a.base != b.base:
        reasons.append(f"their bases {a.base.name} and {b.base.name} resolve to the same config")
    return "; ".join(reasons) or "they have the same config"


def check_distinct_runs(runs: list[Run]) -> None:
    """No two runs may share a (config hash, seed): they would train the same configuration with the
    same seed twice, and a report would count the second as another seed. ConfigError naming both
    runs and the keys whose values differ."""
    from utils.config import result_key_differences

    seen: dict[tuple[str, str], Run] = {}
    for run in runs:
        key = (run.hash, _json(run.cfg["seed"]))
        first = seen.setdefault(key, run)
        if first is run or result_key_differences(first.cfg, run.cfg):
            continue
        raise ConfigError(f"Sweep runs '{first.name}' and '{run.name}' would be the same run twice (config hash "
                          f"{key[0]}, seed {key[1]}): {same_run_differences(first, run)}. Vary only keys that change "
                          f"the result; put the others in \"set\".")


def expand(spec: dict, spec_path: Path, root: Path) -> list[Run]:
    """Every run of ``spec``, resolved and validated (ConfigError naming the run and the key): its
    folder names usable and inside ``root``, no folder shared, no configuration run twice."""
    from utils.config import apply_overrides, load_config_file, resolve_config

    spec_dir = Path(spec_path).resolve().parent
    grid = spec.get("grid", {})
    variants = spec.get("variants") or {None: {}}
    limit = name_max(root)
    check_root_names(root, limit)
    runs = []
    for vname, vover in variants.items():
        if vname is not None:
            check_variant_label(vname, _label(vname))
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
            overrides = {}
            for layer in (spec.get("set", {}), vover, point):   # later layers win, blocks merge
                overrides = apply_overrides(overrides, layer)
            keyed = ([(None, _label(vname))] if vname is not None else []) + \
                [(k, f"{k}={_label(v)}") for k, v in point.items()]
            name = "/".join(part for _, part in keyed) or "run"
            try:
                cfg = resolve_config(apply_overrides(raw_base, overrides))
            except ConfigError as err:
                raise ConfigError(f"Sweep run '{_short(name, 200)}' (base {base.name}): {err}") from None
            if isinstance(cfg["seed"], list):
                raise ConfigError(f"Sweep run '{name}': 'seed' is a list inside a grid value; give the seeds "
                                  f"as the grid's 'seed' list.")
            for key, part in keyed:
                check_name_length(name, part, key, vname, limit)
            run = Run(name, base, overrides, cfg, vname, root / name)
            check_inside_root(run, root)
            runs.append(run)
    names = [r.name for r in runs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"Sweep spec {spec_path}: two runs share the folder {dup[0]}; give the variants distinct names.")
    check_distinct_runs(runs)
    return runs


# ---- state of a run folder ---------------------------------------------------------------------
class DataMissing(UserError):
    """The dataset of a run is not on disk as its config says (a DataError of the listing)."""


_plan_cache: dict[str, int] = {}


def planned_phases(cfg: dict) -> int:
    """Number of phases of ``cfg``'s plan (needs the dataset's class count: its listing on disk).
    DataMissing for data not on disk; a config the dataset refuses stays a ConfigError."""
    from utils.config import phase_plan
    from utils.datasets import describe_dataset

    key = json.dumps([cfg["dataset"], cfg["data_root"], cfg["class_list"], cfg["shapes"]], sort_keys=True)
    if key not in _plan_cache:
        try:
            info = describe_dataset(cfg["dataset"], cfg["data_root"], class_list=cfg["class_list"],
                                    shapes=cfg["shapes"])
        except DataError as err:
            raise DataMissing(f"dataset '{cfg['dataset']}' not usable at data_root={json.dumps(cfg['data_root'])} "
                              f"(set it in the spec's \"set\" or with the base config): {err}") from None
        _plan_cache[key] = info["num_classes"]
    return len(phase_plan(cfg, _plan_cache[key]))


def is_locked(folder: Path) -> bool:
    """Whether another sweep holds ``folder``'s ``.sweep.lock``. Only looks: nothing is created or
    written (a dry run writes nothing)."""
    from utils.run_lock import holder_of

    return holder_of(folder, LOCK_NAME) is not None


def sweep_lock(folder: Path):
    """The ``.sweep.lock`` of a run folder (created here), to hold (``acquire()``; UserError if another
    sweep holds it) while the run's subprocess runs: utils/run_lock.py's lock under another name, so
    the kernel releases it if the sweep dies, and it falls back likewise where files cannot be locked."""
    from utils.run_lock import RunLock

    Path(folder).mkdir(parents=True, exist_ok=True)
    return RunLock(folder, notice=lambda message: None, name=LOCK_NAME)


def run_state(run: Run, num_phases: int | None) -> tuple[str, str]:
    """(state, detail): running (a lock is held), else :func:`results_state`."""
    from utils.run_lock import holder_of

    folder = run.folder
    if folder.is_dir() and is_locked(folder):
        return "running", "locked by another sweep"
    holder = holder_of(folder) if folder.is_dir() else None   # main.py's own run.lock (utils/run_lock.py)
    if holder is not None:
        return "running", f"main.py ({holder}) holds its lock {folder / 'run.lock'}"
    return results_state(run, num_phases)


def results_state(run: Run, num_phases: int | None) -> tuple[str, str]:
    """(state, detail) from what the run folder holds: done / partial / missing / stale / unreadable."""
    from utils.config import config_hash, resolve_saved_config

    folder = run.folder
    results = folder / "results.json"
    if results.exists():
        saved, why = load_results(results)
        if why:
            return "unreadable", f"results.json {why}; delete it or the folder"
        try:
            old, _ = resolve_saved_config(saved["config"])
            same = config_hash(old) == run.hash and old["seed"] == run.cfg["seed"]
        except (ValueError, KeyError, TypeError, AttributeError, UserError):
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


# ---- running -----------------------------------------------------------------------------------
def command(run: Run, resume: bool) -> list[str]:
    cmd = [sys.executable, str(REPO / "main.py"), "--config", str(run.base)]
    for key, value in run.overrides.items():
        cmd += ["--set", f"{key}={json.dumps(value)}"]
    cmd += ["--output", str(run.folder)]
    return cmd + (["--resume"] if resume else [])


def launch(cmd: list[str], log, env: dict) -> subprocess.Popen:
    """Start one run's ``main.py`` writing stdout and stderr to ``log``, in a session (and process
    group) of its own: a Ctrl-C on the terminal reaches only the sweep, which forwards exactly one
    SIGINT (stdin is /dev/null: it has no terminal to read)."""
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                            cwd=Path.cwd(), start_new_session=True)


class Children:
    """The ``main.py`` subprocesses running now, and the signal that stopped the sweep (None while
    it goes on). The first stop signal sends each child's process group one SIGINT (main.py then
    exits 130 with its finished phases saved); one more, over ``ESCALATE_AFTER_S`` later, sends
    SIGKILL (a child that did not stop, e.g. stuck in a collective) — copies of the first that arrive
    at once (``timeout`` and a terminal both deliver it) do not. A child started after the stop is
    signalled as it registers."""

    ESCALATE_AFTER_S = 1.0

    def __init__(self):
        self.lock = threading.RLock()   # re-entrant: the signal handler may run while the main thread holds it
        self.procs: dict[int, subprocess.Popen] = {}
        self.sent: dict[int, int] = {}     # pid -> signal sent to its group
        self.stop_signal: int | None = None
        self.first_stop = 0.0
        self.escalated = False

    def _send(self, proc, sig: int) -> None:
        if proc.pid <= 0 or self.sent.get(proc.pid) == sig or proc.poll() is not None:
            return
        self.sent[proc.pid] = sig
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _signal_for_now(self) -> int:
        return signal.SIGKILL if self.escalated else signal.SIGINT

    def add(self, proc) -> None:
        with self.lock:
            self.procs[proc.pid] = proc
            if self.stop_signal is not None:
                self._send(proc, self._signal_for_now())

    def remove(self, proc) -> None:
        with self.lock:
            self.procs.pop(proc.pid, None)

    def stop(self, signum: int) -> None:
        """Called from the signal handler (main thread): stop every child, start no more."""
        with self.lock:
            if self.stop_signal is None:
                self.stop_signal, self.first_stop = signum, time.monotonic()
            elif time.monotonic() - self.first_stop > self.ESCALATE_AFTER_S:
                self.escalated = True
            for proc in list(self.procs.values()):
                self._send(proc, self._signal_for_now())

    @property
    def stopped(self) -> bool:
        return self.stop_signal is not None


STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")


class StopHandler:
    """While installed (``with StopHandler(children):``, main thread only), SIGINT / SIGTERM / SIGHUP
    raise KeyboardInterrupt until ``running`` is set (no run started yet: nothing to stop), then stop
    the children instead (:meth:`Children.stop`); the previous handlers come back on exit."""

    def __init__(self, children: Children):
        self.children = children
        self.running = False
        self.old: dict[int, object] = {}

    def handle(self, signum, frame) -> None:
        if not self.running:
            raise KeyboardInterrupt
        self.children.stop(signum)

    def __enter__(self) -> "StopHandler":
        if threading.current_thread() is threading.main_thread():
            for name in STOP_SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self.old[sig] = signal.signal(sig, self.handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self.old.items():
            signal.signal(sig, old)


def execute(run: Run, state: str, device: str | None, say, children: Children | None = None,
            num_phases: int | None = None) -> str:
    """Run one configuration as a subprocess under its lock; returns its outcome: finished, failed,
    locked, done (another sweep or a main.py finished it since the states were read), stale or
    unreadable (its results.json was written meanwhile by another config, or is not usable now),
    interrupted (the child was stopped by a signal) or cancelled (the sweep was stopped first). The
    state is read again once the lock is held: a run finished or started meanwhile is skipped or
    resumed, never started afresh (which would delete its results)."""
    children = children or Children()
    if children.stopped:
        return "cancelled"
    lock = sweep_lock(run.folder)
    try:
        lock.acquire()
    except UserError:
        say(f"{run.name}: locked by another sweep, skipped")
        return "locked"
    try:
        now, detail = results_state(run, num_phases)
        if now in ("done", "stale", "unreadable"):
            say(f"{run.name}: written by another process meanwhile ({skip_message(now, detail)})")
            return now
        # partial: resumed; partial? (plan unknown): resumed too, which is safe even when it is done
        state = "partial" if now.startswith("partial") else now
        env = dict(os.environ)
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        start = time.time()
        say(f"{run.name}: {'resume' if state == 'partial' else 'start'}"
            f"{'' if device is None else f' on CUDA device {device}'}")
        with open(run.folder / "sweep_output.txt", "a") as out:
            proc = launch(command(run, state == "partial"), out, env)
            children.add(proc)
            try:
                code = proc.wait()
            finally:
                children.remove(proc)
        took = time.time() - start
        if code != 0 and (children.stopped or code in (EXIT_INTERRUPTED, EXIT_TERMINATED)):
            say(f"{run.name}: interrupted (exit {code}) after {took:.0f} s; its finished phases are saved, "
                f"a rerun resumes it")
            return "interrupted"
        if code != 0:
            say(f"{run.name}: FAILED (exit {code}) after {took:.0f} s; see {run.folder / 'sweep_output.txt'}")
            return "failed"
        say(f"{run.name}: finished in {took:.0f} s")
        return "finished"
    finally:
        lock.release()


def write_sweep_json(root: Path, spec: dict, spec_path: Path, runs: list[Run]) -> None:
    """Write ``root/sweep.json``: this spec, and its runs followed by the runs an earlier sweep.json
    there listed that this spec does not and whose folders are still there (another spec run into
    the same root, or an earlier version of this one: exps/report.py keeps finding them; delete a
    run's folder to drop it). The read and the write happen under a lock on the root, so two sweeps
    starting at once both keep theirs."""
    import fcntl

    from utils.io import write_json

    root.mkdir(parents=True, exist_ok=True)
    entries = [{"name": r.name, "variant": r.variant, "base": str(r.base), "overrides": r.overrides,
                "config_hash": r.hash, "seed": r.cfg["seed"]} for r in runs]
    with open(root / ".sweep.json.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:   # a file system without locks: the merge below still keeps what was there
            pass
        old = _sweep_json_runs(root / "sweep.json")
        names = {e["name"] for e in entries}
        write_json(root / "sweep.json", {
            "spec": spec, "spec_path": str(spec_path),
            "varying": list(spec.get("grid", {})) + (["seed"] if runs and "seed" not in spec.get("grid", {})
                                                     and len({r.cfg["seed"] for r in runs}) > 1 else []),
            "runs": entries + [e for e in old if e["name"] not in names and _still_there(root, e["name"])]})


def _still_there(root: Path, name: str) -> bool:
    """Whether an earlier sweep.json's run ``name`` is a folder inside ``root`` on disk."""
    try:
        return is_run_name(name) and (root / name).is_dir()
    except OSError:   # a name longer than the file system allows
        return False


def _sweep_json_runs(path: Path) -> list[dict]:
    """The run entries of an existing sweep.json; [] if there is none. UserError naming it if it cannot
    be read: replacing it would drop, without a word, the runs other specs listed there."""
    if not (path.exists() or path.is_symlink()):
        return []
    try:
        return read_sweep_json(path)["runs"]
    except UserError as err:
        raise UserError(f"{err}; it lists the runs of every spec run into {path.parent}, which rewriting it would "
                        f"drop: fix it or remove it, then rerun.") from None


def parse_devices(text: str | None) -> list[str]:
    """``--devices`` as a list of CUDA device ids (integers ≥ 0) or GPU UUIDs (``GPU-…``, ``MIG-…``);
    UserError naming the first bad entry, or the empty list. None (no option) is no pinning: []."""
    if text is None:
        return []
    entries = [d.strip() for d in text.split(",")]
    if not any(entries):
        raise UserError(f"--devices {json.dumps(text)} lists no device; give CUDA device ids such as 0,1 "
                        f"(or GPU UUIDs), or leave --devices out.")
    for i, entry in enumerate(entries):
        if not entry:
            raise UserError(f"--devices {json.dumps(text)}: entry {i + 1} is empty; give comma-separated CUDA "
                            f"device ids such as 0,1.")
        is_id = entry.isascii() and entry.isdigit()
        is_uuid = entry.startswith(("GPU-", "MIG-")) and len(entry) > 4
        if not (is_id or is_uuid):
            raise UserError(f"--devices {json.dumps(text)}: {json.dumps(entry)} is not a CUDA device id (an integer "
                            f"≥ 0) or a GPU UUID (GPU-… or MIG-…, as nvidia-smi -L prints).")
    return entries


def output_problem(root: Path, runs: list[Run]) -> str | None:
    """Why the sweep root ``root`` cannot hold the runs' folders (a file at its place or above it,
    or at a run folder's place), without writing anything; None if it can."""
    from utils.io import file_in_the_way, path_problem

    bad = file_in_the_way(root)
    if bad is not None:
        return (f"--output {root} {path_problem(str(root), 'folder')}" if bad == root
                else f"--output {root} lies under {bad}, which {path_problem(str(bad), 'folder')}")
    for run in runs:
        bad = file_in_the_way(run.folder)
        if bad is not None and bad != root and root in bad.parents:
            return f"run '{run.name}': {bad} {path_problem(str(bad), 'folder')}; the sweep needs a folder there: move it away"
    return None


def skip_message(state: str, detail: str) -> str | None:
    """What the sweep prints for a run it leaves alone in ``state`` (None: a state it runs)."""
    if state == "done":
        return f"done, skipped ({detail})"
    if state == "stale":
        return "STALE (results.json of another config), left alone: delete it or use another --output"
    if state == "running":
        return f"{detail}, skipped"
    if state == "unreadable":
        return f"{detail}; left alone"
    return None


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module docstring); returns the exit status. A stop signal before
    any run started ends it with "interrupted" and 130, as one during the runs does."""
    children = Children()
    with StopHandler(children) as stopper:
        try:
            return _main(argv, children, stopper)
        except KeyboardInterrupt:
            print("interrupted: nothing was run.", file=sys.stderr, flush=True)
            return EXIT_INTERRUPTED


def _main(argv: list[str] | None, children: Children, stopper: StopHandler) -> int:
    p = argparse.ArgumentParser(description="Run a grid of configurations (see the module docstring).")
    p.add_argument("spec", help="sweep spec JSON: {base, set, grid, variants}")
    p.add_argument("--output", help="sweep root folder (default logs/sweeps/<spec name>)")
    p.add_argument("--dry-run", action="store_true", help="list every run with its folder and state; run nothing")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (default 1)")
    p.add_argument("--devices", help="comma-separated CUDA device ids or GPU UUIDs; each job slot is pinned to one, "
                                     "round-robin")
    args = p.parse_args(argv)
    if args.jobs < 1:
        print("error: --jobs must be ≥ 1.", file=sys.stderr)
        return EXIT_USER_ERROR
    if args.output is not None and not args.output.strip():
        print("error: --output is empty; give the sweep's root folder, or leave --output out.", file=sys.stderr)
        return EXIT_USER_ERROR
    spec_path = Path(args.spec)
    root = Path(args.output) if args.output else Path("logs") / "sweeps" / spec_path.stem
    try:
        devices = parse_devices(args.devices)
        spec = load_spec(spec_path)
        runs = expand(spec, spec_path, root)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    problem = output_problem(root, runs)
    if problem is not None:
        print(f"error: {problem}.", file=sys.stderr)
        return EXIT_USER_ERROR
    try:
        _sweep_json_runs(root / "sweep.json")   # an unusable one: refused before anything runs or is written
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
        except UserError as err:   # a config the dataset refuses, or a protocol that does not fit it
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
    try:
        from utils.io import check_writable_dir

        check_writable_dir(root, "--output")
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR

    try:
        write_sweep_json(root, spec, spec_path, runs)
    except UserError as err:   # made unusable since the check above
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    start = time.time()
    lock = threading.Lock()
    todo = []
    for i, (run, (state, detail)) in enumerate(zip(runs, states)):
        tag = f"[{i + 1}/{len(runs)}]"
        why = skip_message(state, detail)
        if why is not None:
            print(f"{tag} {run.name}: {why}", flush=True)
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
            return execute(run, state, devices[slot % len(devices)] if devices else None, say, children,
                           planned_phases(run.cfg))   # cached: the dataset was listed above
        finally:
            slots.put(slot)

    stopper.running = True   # from here a stop signal stops the children instead of raising
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        outcomes = list(pool.map(work, todo))
    took = time.time() - start
    if children.stopped:
        print(f"interrupted ({signal.Signals(children.stop_signal).name}): {outcomes.count('interrupted')} running "
              f"run(s) stopped (their finished phases are saved), {outcomes.count('cancelled')} not started; rerun "
              f"the same command to resume.", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    bad = (outcomes.count("failed") + outcomes.count("locked") + outcomes.count("interrupted")
           + outcomes.count("stale") + outcomes.count("unreadable")
           + sum(s in ("stale", "running", "unreadable") for s, _ in states))
    print(f"sweep {spec_path.stem}: {outcomes.count('finished')} run, "
          f"{sum(s == 'done' for s, _ in states) + outcomes.count('done')} "
          f"already done, {bad} failed/stale/unreadable/locked; {took:.0f} s; results under {root}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
