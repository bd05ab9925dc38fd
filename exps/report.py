"""Tables and plots of runs: ``python exps/report.py RUN_OR_SWEEP_DIRS... [--output DIR]``.

Each argument is a run folder (holding ``results.json``), a sweep root (holding ``sweep.json``) or
any folder (searched for ``results.json``). A run folder reached twice (the same path given twice,
a sweep root and one of its runs) counts once. Runs that differ only in their seed form one
configuration; two folders holding the same configuration with the same seed (a copied run) count
once: the one with the most phases (then the first in path order) is kept, the other is listed under
"Left out". A run with fewer phases than its plan (the phase count that its config and its
results.json's class order give) or, where the plan is unknown, than the longest run of its row is
left out with a note (a row left with no run is not shown; none left at all: exit 2). Writes into DIR (default ``<the one sweep>/report``, else ``logs/report``):

- ``report.md`` and ``report.csv``: one row per configuration, labelled by the variant name and the
  keys that every row has and whose values differ (a key shown only in the rows where it takes
  effect); for one configuration, its prefix or its sweep's spec name. CNN avg / last top-1 and
  forgetting (ours and PyCIL's), NME avg / last, FOSTER's other model's avg / last (the student, or
  the teacher with foster_deploy: student), each as mean ± std over seeds (std: sample standard
  deviation, n − 1; "–" for one seed) with the seed count; exemplars per class and memory bytes
  after the last phase; wall time (sum of the phases' seconds, mean over seeds); phases done. Where
  a row matches a published setting of SPEC.md §5 (dataset, learner, compression, init_cls,
  increment, phase count, backbone, and the effective memory where SPEC states it — memory_size, or
  memory_per_class × classes with fixed_memory; epochs are not compared) the published avg / last
  stand beside ours with the difference.
- ``accuracy_curve.png``: CNN top-1 vs classes seen, one line per configuration (mean over
  seeds), a band from the seeds' min to max, the published last-phase top-1 as a star where known.
- ``accuracy_matrix_<row>.png``: task accuracy after each phase (mean over seeds), as a heatmap
  (``<row>``: the row label as a file name; ``_2``, ``_3`` … appended where two rows would share one).
- ``memory.png``: exemplars per class and mean compression cost (units per exemplar) per phase.
- ``tensorboard/``: with ``--tensorboard`` and the package installed, the metrics.jsonl scalars.

A results.json or sweep.json given as an argument that cannot be used (not UTF-8, not JSON, not an
object, lacking ``config`` / ``phases`` / ``runs``), or an ``--output`` folder that cannot be made:
exit 2 with one line naming it. An unusable results.json found in a searched folder or a sweep's run
list is left out with a note.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
import textwrap
import warnings
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from utils.errors import UserError  # noqa: E402
from utils.io import path_problem  # noqa: E402
from utils.results_file import is_run_name, read_json_file, read_results, read_sweep_json  # noqa: E402

EXIT_USER_ERROR = 2

# SPEC.md §5, average incremental accuracy (and last-phase accuracy where published). Each row also
# holds the backbone (convnet_type) and the total memory (full-image units after the last phase) the
# number was measured with, where SPEC states them; None = not stated, not compared.
PUBLISHED: list[dict] = []


def _add(source, dataset, learner, compression, init_cls, increment, phases, avg, last=None, memory=None,
         convnet_type=None):
    PUBLISHED.append({"source": source, "dataset": dataset, "model_name": learner, "compression": compression,
                      "init_cls": init_cls, "increment": increment, "phases": phases, "avg": avg, "last": last,
                      "memory": memory, "convnet_type": convnet_type})


# SPEC §3.3: the official memory of FOSTER (± CIM), ResNet-18, LFS with 10 phases. SPEC does not state
# the memory of DER, of N = 5 / 20 or of the LFH runs: those rows compare no memory (as before).
_LFS10_MEMORY = {"food101": 2020, "imagenet100": 2000}


def _published_tables() -> None:
    # §5 "ResNet-18 from scratch, from the CIM poster": LFS, LFH, ImageNet-1000 and the ablation.
    lfs = {("food101", 5): (21, 20), ("food101", 10): (11, 10), ("food101", 20): (6, 5),
           ("imagenet100", 5): (20, 20), ("imagenet100", 10): (10, 10), ("imagenet100", 20): (5, 5)}
    table = {("der", "none"): ([73.88, 70.76, 64.39], [78.50, 76.12, 73.79]),
             ("der", "cim"): ([75.63, 73.09, 69.17], [79.63, 77.57, 75.36]),
             ("foster", "none"): ([75.03, 72.72, 66.73], [79.93, 76.55, 74.49]),
             ("foster", "cim"): ([76.44, 74.85, 70.20], [80.58, 77.94, 75.23])}
    for (learner, comp), (food, inet) in table.items():
        for dataset, values in (("food101", food), ("imagenet100", inet)):
            for n, avg in zip((5, 10, 20), values):
                init, inc = lfs[(dataset, n)]
                memory = _LFS10_MEMORY[dataset] if learner == "foster" and n == 10 else None
                _add(f"CIM paper LFS N={n}", dataset, learner, comp, init, inc, n, avg, memory=memory,
                     convnet_type="resnet18")
    lfh = {("der", "none"): ([78.13, 73.45, None], [79.08, 77.73, None]),
           ("der", "cim"): ([79.25, 75.76, None], [80.30, 79.05, None]),
           ("foster", "none"): ([79.08, 75.07, 68.08], [80.07, 77.54, 72.40]),
           ("foster", "cim"): ([79.76, 76.86, 70.50], [80.93, 78.66, 75.74])}
    for (learner, comp), (food, inet) in lfh.items():
        for dataset, init, values in (("food101", 51, food), ("imagenet100", 50, inet)):
            for n, inc, avg in zip((5, 10, 25), (10, 5, 2), values):
                if avg is not None:     # memory of the LFH runs: not stated in SPEC
                    _add(f"CIM paper LFH N={n}", dataset, learner, comp, init, inc, n + 1, avg,
                         convnet_type="resnet18")
    for mem, base, cim in ((20000, (68.34, 60.14), (69.53, 62.07)), (5000, (54.72, 44.96), (59.48, 50.83))):
        _add(f"CIM paper ImageNet-1000 {mem // 1000}k", "imagenet1000", "foster", "none", 100, 100, 10, *base, mem,
             "resnet18")
        _add(f"CIM paper ImageNet-1000 {mem // 1000}k", "imagenet1000", "foster", "cim", 100, 100, 10, *cim, mem,
             "resnet18")
    # The ablation's "per-phase τ" (73.83) and "joint training" (73.44) have no config key here. Its
    # policies are compared "at equal memory" (§3) with the LFS N=10 FOSTER baseline (72.72): §3.3's 2020.
    for comp, avg in (("full", 73.03), ("random", 73.10), ("center", 73.29), ("cam", 73.76)):
        _add("CIM paper ablation Food-101 N=10", "food101", "foster", comp, 11, 10, 10, avg,
             memory=_LFS10_MEMORY["food101"], convnet_type="resnet18")
    # §5: "CIFAR-100 ResNet-32, 2000 exemplars".
    for learner, init, avg, last in (("icarl", 10, 64.3, 49.6), ("der", 10, 69.7, 58.7), ("foster", 10, 72.9, 61.6),
                                     ("der", 50, 68.0, 62.0), ("foster", 50, 70.1, 63.9)):
        phases = 10 if init == 10 else 6
        _add(f"PyCIL CIFAR-100 figure B{0 if init == 10 else 50} Inc10 (±0.5)", "cifar100", learner, "none",
             init, 10, phases, avg, last, 2000, "resnet32")


_published_tables()


def effective_memory(cfg: dict, num_classes: int) -> int | None:
    """The memory in full-image units after the last of ``num_classes`` classes, as the run's
    ``ExemplarMemory.total_budget`` gives it: memory_size, or memory_per_class × classes with
    fixed_memory (None where the config does not say)."""
    from utils.memory import ExemplarMemory

    try:   # a config of another schema may lack a key: as the run would read it (no fixed_memory: off)
        total = ExemplarMemory(cfg.get("memory_size"), cfg.get("memory_per_class"),
                               bool(cfg.get("fixed_memory"))).total_budget(num_classes)
    except TypeError:   # fixed_memory without a memory_per_class
        return None
    return total if isinstance(total, int) else None


def published_for(cfg: dict, phases: int) -> dict | None:
    """The SPEC §5 row measured in ``cfg``'s setting with ``phases`` phases, or None. Compared: dataset,
    learner, compression, init_cls, increment, phase count, and, where the row states them, the
    backbone and the effective memory (:func:`effective_memory`); epochs are not."""
    for ref in PUBLISHED:
        classes = ref["init_cls"] + ref["increment"] * (ref["phases"] - 1)
        if (ref["dataset"] == cfg.get("dataset") and ref["model_name"] == cfg.get("model_name")
                and ref["compression"] == cfg.get("compression", "none") and ref["init_cls"] == cfg.get("init_cls")
                and ref["increment"] == cfg.get("increment") and ref["phases"] == phases
                and ref["convnet_type"] in (None, cfg.get("convnet_type"))
                and ref["memory"] in (None, effective_memory(cfg, classes))):
            return ref
    return None


# ---- collecting runs ---------------------------------------------------------------------------
def resolve_saved(cfg: dict) -> dict | None:
    """A run's saved config resolved with today's schema, or None for a config of another schema
    (a key no longer known, a value refused)."""
    from utils.config import resolve_saved_config

    try:
        return resolve_saved_config(cfg)[0]
    except Exception:  # noqa: BLE001 - another schema: its keys are compared as saved
        return None


@dataclass
class RunResult:
    """One run's results.json, with what the report derives from its config, computed once:
    ``resolved`` (today's schema; None for another schema), ``planned`` (phases of its plan: its
    class order's length and its config; None if unknown), and the sweep that holds it."""
    folder: Path
    results: dict
    variant: str | None = None
    sweep: tuple[Path, dict] | None = None    # (root, sweep.json) of the sweep holding the folder
    resolved: dict | None = field(init=False, default=None)
    planned: int | None = field(init=False, default=None)

    def __post_init__(self):
        self.resolved = resolve_saved(self.results["config"])
        self.planned = planned_phases(self.results, self.resolved)


@dataclass
class Row:
    key: str
    runs: list = field(default_factory=list)
    label: str = ""

    @property
    def cfg(self) -> dict:
        """The config as its first run saved it (the labels show the values as written)."""
        return self.runs[0].results["config"]

    @property
    def resolved(self) -> dict:
        """The config with today's schema's defaults, else as saved (another schema)."""
        return self.runs[0].resolved or self.cfg


def _identity(run: RunResult) -> str:
    """The configuration's hash with today's schema (seed and where-it-ran keys left out)."""
    from utils.config import _NOT_HASHED, config_hash

    if run.resolved is not None:
        return config_hash(run.resolved)
    cfg = run.results["config"]   # another schema: compare its identifying keys as saved
    return json.dumps({k: v for k, v in cfg.items() if k not in _NOT_HASHED}, sort_keys=True)


def planned_phases(results: dict, resolved: dict | None) -> int | None:
    """Phases of the run's plan, from its config (``resolved``: today's schema) and its class
    order's length (the dataset's class count), as exps/sweep.py's planned_phases gives it without
    reading the dataset; None if unknown."""
    from utils.config import phase_plan

    order = results.get("class_order")
    if resolved is None or not isinstance(order, list) or not order:
        return None
    try:
        return len(phase_plan(resolved, len(order)))
    except Exception:  # noqa: BLE001 - a plan that no longer fits: unknown
        return None


SweepFiles = dict   # resolved folder -> (root, sweep.json), None (unreadable) or False (none there)


def _sweep_at(folder: Path, sweeps: SweepFiles):
    """(folder, its sweep.json), None if it cannot be read, False if it has none; read once per
    folder (``sweeps``: this report's answers so far)."""
    key = folder.resolve()
    if key not in sweeps:
        if not (folder / "sweep.json").is_file():
            sweeps[key] = False
        else:
            try:
                data = read_json_file(folder / "sweep.json")
            except UserError:
                data = None
            sweeps[key] = (folder, data) if isinstance(data, dict) else None
    return sweeps[key]


def _sweep_above(folder: Path, sweeps: SweepFiles) -> tuple[Path, dict] | None:
    """(sweep root, its sweep.json) of the sweep holding ``folder`` (it or one of its 5 parents);
    None if there is none or it cannot be read."""
    for parent in [folder, *folder.parents][:6]:
        found = _sweep_at(parent, sweeps)
        if found is not False:
            return found
    return None


def _is(path: Path, kind: str) -> bool:
    """``path.is_file()`` / ``is_dir()`` ("file" / "dir"), False also where the path cannot even be
    asked (a name longer than the file system allows, a NUL byte)."""
    try:
        return path.is_file() if kind == "file" else path.is_dir()
    except (OSError, ValueError):
        return False


def _present(path: Path) -> bool:
    """Whether something (a broken link included) has the name ``path``."""
    try:
        return os.path.lexists(path)
    except (OSError, ValueError):
        return False


def _run_folders(path: Path, notes: list[str], sweeps: SweepFiles):
    """(folder, variant, given) of each run ``path`` names: itself (a run folder, or its results.json:
    ``given``, its results.json must be usable), its sweep.json's runs (the sweep root, or its
    sweep.json), or the results.json files found under it. UserError for a results.json or
    sweep.json given directly that cannot be used."""
    if path.name in ("results.json", "sweep.json") and _is(path, "file"):
        path = path.parent
    if _is(path / "results.json", "file"):
        return [(path, None, True)]
    if _present(path / "results.json") and not _present(path / "sweep.json"):
        raise UserError(f"{path / 'results.json'} {path_problem(str(path / 'results.json'), 'file')}")
    if _present(path / "sweep.json"):
        data = read_sweep_json(path / "sweep.json")
        sweeps[path.resolve()] = (path, data)
        out = []
        for entry in data["runs"]:
            if not is_run_name(entry["name"]):
                notes.append(f"{path / 'sweep.json'}: run {json.dumps(entry['name'])} is not a folder inside the "
                             f"sweep (left out)")
                continue
            folder = path / entry["name"]
            if _is(folder / "results.json", "file"):
                out.append((folder, entry.get("variant") if isinstance(entry.get("variant"), str) else None, False))
            elif _present(folder / "results.json"):
                notes.append(f"{folder / 'results.json'} {path_problem(str(folder / 'results.json'), 'file')} "
                             f"(left out)")
            else:
                notes.append(f"{folder}: no results.json yet (left out)")
        return out
    if _is(path, "dir"):
        found = sorted(path.rglob("results.json"))
        for f in found:
            if not _is(f, "file"):
                notes.append(f"{f} {path_problem(str(f), 'file')} (left out)")
        files = [f for f in found if _is(f, "file")]
        if not files:
            notes.append(f"{path}: no results.json found")
        return [(f.parent, None, False) for f in files]
    notes.append(f"{path}: {'not a folder' if _present(path) else 'does not exist'}")
    return []


def collect(paths: list[Path]) -> tuple[list[RunResult], list[str]]:
    """The runs of ``paths`` and notes on what was left out. Each run folder is read once (by its
    resolved path: a folder reached again only adds the variant its sweep gives it), and each
    sweep.json once. UserError for a results.json or sweep.json given directly that cannot be used."""
    found: dict[Path, RunResult] = {}
    notes: list[str] = []
    sweeps: SweepFiles = {}
    for path in map(Path, paths):
        for folder, variant, given in _run_folders(path, notes, sweeps):
            seen = found.get(folder.resolve())
            if seen is not None:
                seen.variant = seen.variant or variant      # reached as a sweep's run: keep its variant
                continue
            try:
                results = read_results(folder / "results.json")
            except UserError as err:
                if given:
                    raise
                notes.append(f"{err} (left out)")
                continue
            found[folder.resolve()] = RunResult(folder, results, variant, _sweep_above(folder, sweeps))
    return list(found.values()), list(dict.fromkeys(notes))


def _phases_done(run: RunResult) -> int:
    return len(run.results.get("phases", []))


def _seed_of(run: RunResult) -> str:
    return json.dumps(run.results["config"].get("seed"), sort_keys=True)


def drop_repeated_seeds(runs: list[RunResult], notes: list[str]) -> list[RunResult]:
    """``runs`` (of one configuration) with one run per seed: two folders of one configuration and
    one seed are one run copied, not two seeds. Kept: the one with the most phases, then the first
    in path order; each other one is noted, naming both folders."""
    by_seed: dict[str, list[RunResult]] = {}
    for run in runs:
        by_seed.setdefault(_seed_of(run), []).append(run)
    dropped = set()
    for seed, same in by_seed.items():
        if len(same) < 2:
            continue
        kept, *others = sorted(same, key=lambda r: (-_phases_done(r), str(r.folder.resolve())))
        for other in others:
            dropped.add(id(other))
            notes.append(f"{other.folder}: same configuration and seed {seed} as {kept.folder}: one run twice, "
                         f"not two seeds ({kept.folder} counted, this one left out)")
    return [r for r in runs if id(r) not in dropped]


def drop_partial(runs: list[RunResult], notes: list[str]) -> list[RunResult]:
    """``runs`` (of one configuration) without the unfinished ones, each noted: a run with fewer phases
    than its plan where the plan is known; else one with fewer phases than the row's longest run."""
    kept = []
    for run in runs:
        if run.planned is not None and _phases_done(run) < run.planned:
            notes.append(f"{run.folder}: {_phases_done(run)} of {run.planned} phases (partial, left out)")
        else:
            kept.append(run)
    unknown = [r for r in kept if r.planned is None]
    if not unknown:
        return kept
    most = max(_phases_done(r) for r in kept)
    notes += [f"{r.folder}: {_phases_done(r)} of {most} phases (partial, left out)"
              for r in unknown if _phases_done(r) < most]
    return [r for r in kept if r.planned is not None or _phases_done(r) == most]


def group(runs: list[RunResult], notes: list[str] | None = None) -> list[Row]:
    """Runs of one configuration (seeds aside) form a row; a copy of a run already in the row (same
    seed) and a run with fewer phases than its plan or than the row's longest run (stopped, or still
    running) are left out of it, with a note. Rows left with no run are dropped."""
    notes = [] if notes is None else notes
    rows: dict[str, Row] = {}
    for run in runs:
        key = (run.variant or "") + "|" + _identity(run)
        rows.setdefault(key, Row(key)).runs.append(run)
    for row in rows.values():
        row.runs = drop_partial(drop_repeated_seeds(row.runs, notes), notes)
    rows_list = [row for row in rows.values() if row.runs]
    label_rows(rows_list, runs)
    return rows_list


# ---- row labels --------------------------------------------------------------------------------
def _label_keys(run: RunResult) -> tuple[set[str], set[str]]:
    """(the keys that identify ``run``'s config as saved, those of them that take effect in it): its
    hashed keys (its learner's and its enabled plugins' among them), less keys read only with another
    value of a switch (``Option.switched_off``: memory_per_class under fixed_memory false). A config
    of another schema: its keys as saved, all taken as in effect."""
    from utils.config import _NOT_HASHED, hashed_keys, options_for

    cfg, resolved = run.results["config"], run.resolved
    if resolved is None:
        keys = set(cfg) - set(_NOT_HASHED)
        return keys, keys
    keys = {k for k in hashed_keys(resolved) if k in cfg}
    options = options_for(resolved["model_name"])
    return keys, {k for k in keys if not (k in options and options[k].switched_off(resolved))}


def _differing(keys, cfgs: list[dict]) -> list[str]:
    return [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in cfgs}) > 1]


def label_rows(rows: list[Row], runs: list[RunResult]) -> None:
    """Set each row's label: its variant name, then the keys that every row has and whose values
    differ (a sweep's grid order first), each shown in the rows where it takes effect; a row with
    nothing to show: :func:`_fallback_label`. If that leaves two rows alike, the keys that any row has
    and that differ (a key a row lacks shows as null) are shown instead."""
    cfgs = [r.cfg for r in rows]
    order = _key_order(runs)
    sort = (lambda k: (order.index(k) if k in order else len(order), k))
    both = [_label_keys(row.runs[0]) for row in rows]
    common = set.intersection(*(keys for keys, _ in both)) if both else set()
    varying = sorted(_differing(common, cfgs), key=sort)
    labels = [_label(row, [k for k in varying if k in active]) for row, (_, active) in zip(rows, both)]
    if len(set(labels)) < len(labels):
        from utils.config import _NOT_HASHED

        every = sorted(_differing({k for c in cfgs for k in c} - set(_NOT_HASHED), cfgs), key=sort)
        labels = [_label(row, every) for row in rows]
    for row, label in zip(rows, labels):
        row.label = _shown(label)


def _shown(text: str) -> str:
    """``text`` as report.md, report.csv, a plot or a terminal can take it: what is not printable (a
    newline or NUL in a folder name, the undecodable bytes of a non-UTF-8 one) as its escape."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _label(row: Row, keys: list[str]) -> str:
    parts = [row.runs[0].variant] if row.runs[0].variant else []
    parts += [f"{k}={_fmt_value(row.cfg.get(k))}" for k in keys]
    return ", ".join(p for p in parts if p) or _fallback_label(row)


def _fallback_label(row: Row) -> str:
    """A label for a row that no key tells apart: its config's prefix, else its sweep's spec name, else
    its run's folder (one run) or the folder holding its runs — never one seed's folder of several."""
    if row.cfg.get("prefix"):
        return str(row.cfg["prefix"])
    if row.runs[0].sweep is not None:
        root, sweep = row.runs[0].sweep
        spec_path = sweep.get("spec_path")
        return Path(spec_path).stem if isinstance(spec_path, str) and spec_path else root.resolve().name
    if len(row.runs) == 1:
        return row.runs[0].folder.resolve().name
    return Path(os.path.commonpath([str(r.folder.resolve()) for r in row.runs])).name or "runs"


def _key_order(runs) -> list[str]:
    """Grid keys in the order a sweep spec gave them (memory_size before compression, ...)."""
    order = []
    for run in runs:
        spec = run.sweep[1].get("spec") if run.sweep else None
        grid = spec.get("grid") if isinstance(spec, dict) else None
        if isinstance(grid, dict):
            order += [k for k in grid if k not in order]
    return order


def _fmt_value(v) -> str:
    if isinstance(v, list):
        return "-".join(map(str, v))
    return json.dumps(v) if isinstance(v, (bool, type(None))) else str(v)


# ---- statistics --------------------------------------------------------------------------------
def mean_std(values: list) -> tuple[float | None, float | None, int]:
    """(mean, sample std with n − 1 (None for one value), n) of the non-None ``values``."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None, 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None), len(vals)


def fmt_ms(values: list, digits: int = 2) -> str:
    m, s, _ = mean_std(values)
    if m is None:
        return "–"
    return f"{m:.{digits}f}" + (f" ± {s:.{digits}f}" if s is not None else "")


COLUMNS = [("cnn_avg_top1", "CNN avg"), ("cnn_last_top1", "CNN last"), ("cnn_forgetting", "CNN forgetting"),
           ("cnn_forgetting_pycil", "CNN forgetting (PyCIL)"),
           ("nme_avg_top1", "NME avg"), ("nme_last_top1", "NME last"),
           # FOSTER: the model that is not deployed (foster_deploy); cnn_* is the deployed one
           ("student_avg_top1", "student avg"), ("student_last_top1", "student last"),
           ("teacher_avg_top1", "teacher avg"), ("teacher_last_top1", "teacher last")]


def row_stats(row: Row) -> dict:
    """Every number of a table row: ``{column: (mean, std, n)}`` plus counts and the published match."""
    summaries = [r.results.get("summary", {}) for r in row.runs]
    last = [r.results["phases"][-1] if r.results.get("phases") else None for r in row.runs]
    out = {name: mean_std([s.get(name) for s in summaries]) for name, _ in COLUMNS}
    out["seeds"] = sorted({r.results["config"].get("seed") for r in row.runs})
    out["phases_done"] = sorted({len(r.results.get("phases", [])) for r in row.runs})
    out["exemplars_per_class"] = mean_std([p["memory"]["exemplars"] / p["classes"][1] for p in last if p])
    out["memory_bytes"] = mean_std([p["memory"].get("bytes") for p in last if p])
    out["seconds"] = mean_std([sum(ph.get("seconds", 0) for ph in r.results.get("phases", [])) for r in row.runs])
    out["published"] = published_for(row.resolved, max(out["phases_done"]) if out["phases_done"] else 0)
    return out


# ---- tables ------------------------------------------------------------------------------------
def table(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    stats = [row_stats(r) for r in rows]
    used = [(k, h) for k, h in COLUMNS if any(s[k][0] is not None for s in stats)]
    header = (["configuration", "seeds"] + [h for _, h in used]
              + ["exemplars/class", "memory bytes", "wall time (s)", "phases", "published avg (Δ)", "published last (Δ)"])
    body = []
    for row, s in zip(rows, stats):
        line = [row.label, str(len(row.runs))]
        line += [fmt_ms([r.results.get("summary", {}).get(k) for r in row.runs]) for k, _ in used]
        line += [fmt_ms([p["memory"]["exemplars"] / p["classes"][1] for p in
                         (r.results["phases"][-1] for r in row.runs if r.results.get("phases"))], 1),
                 fmt_ms([r.results["phases"][-1]["memory"].get("bytes") for r in row.runs if r.results.get("phases")], 0),
                 fmt_ms([sum(ph.get("seconds", 0) for ph in r.results.get("phases", [])) for r in row.runs], 0),
                 "/".join(map(str, s["phases_done"]))]
        ref = s["published"]
        for ours, theirs in ((s["cnn_avg_top1"][0], ref and ref["avg"]), (s["cnn_last_top1"][0], ref and ref["last"])):
            line.append("–" if theirs is None else
                        f"{theirs:.2f} ({ours - theirs:+.2f})" if ours is not None else f"{theirs:.2f}")
        body.append(line)
    return header, body


def code_versions(row: Row) -> list[str]:
    """The code versions (git commits, ``utils/provenance.py``) the phases of ``row``'s runs ran on;
    runs written before results.json recorded them add none."""
    return sorted({_shown(p["code"]) for r in row.runs for p in r.results["phases"] if isinstance(p.get("code"), str)})


def write_tables(rows: list[Row], out: Path, notes: list[str], title: str) -> None:
    header, body = table(rows)
    with open(out / "report.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(body)
    md = [f"# {title}", "",
          "Mean ± sample std (n − 1) over seeds; top-1 in % on all classes seen; avg = average incremental "
          "accuracy (phase 0 included); forgetting in points; exemplars/class and memory bytes after the last "
          "phase; wall time = sum of the phases' seconds per run. Published numbers: the CIM paper (Luo et al., "
          "CVPR 2023: LFS, LFH, ImageNet-1000, ablation) and PyCIL's CIFAR-100 figures (read off, ±0.5), as "
          "listed in exps/report.py (PUBLISHED).", "",
          "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(line) + " |" for line in body]
    refs = [(r.label, s["published"]["source"]) for r, s in zip(rows, map(row_stats, rows)) if s["published"]]
    if refs:
        md += ["", "Published settings matched: " + "; ".join(f"{label} ↔ {src}" for label, src in refs) + "."]
    mixed = [(row.label, codes) for row in rows if len(codes := code_versions(row)) > 1]
    if mixed:
        md += ["", "Rows whose runs ran on more than one version of the code (each phase's git commit in "
                   "results.json; a fix between them can change the numbers, and the config hash cannot tell):",
               *[f"- {label}: {', '.join(codes)}" for label, codes in mixed]]
    if notes:
        md += ["", "Left out:", *[f"- {_shown(n)}" for n in notes]]
    md += ["", "Plots: ![accuracy](accuracy_curve.png) ![memory](memory.png)", ""]
    (out / "report.md").write_text("\n".join(md), encoding="utf-8")


# ---- plots -------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text.replace(", ", "__"))[:120]


def unique_names(labels: list[str]) -> list[str]:
    """A distinct file-name part per label: its slug, with ``_2``, ``_3`` … appended where an earlier
    label took the same (labels cut at 120 characters, or differing only in characters a slug maps to _)."""
    taken, names = set(), []
    for label in labels:
        name, k = _slug(label), 1
        while name in taken:
            k += 1
            name = f"{_slug(label)}_{k}"
        taken.add(name)
        names.append(name)
    return names


def _wrap(text: str, width: int) -> str:
    """``text`` broken into lines of at most ``width`` characters (after ", " where it can)."""
    return "\n".join(textwrap.wrap(text, width, break_on_hyphens=False)) or text


def _legend_layout(labels: list[str], width: int) -> tuple[list[str], int]:
    """(wrapped labels, columns) for a legend under a plot ``width`` characters wide: as many columns
    (up to 3) as the longest label allows, each label wrapped to its column."""
    longest = max((len(x) for x in labels), default=0)
    ncol = max(1, min(3, len(labels), width // max(longest + 6, 1)))
    return [_wrap(x, width // ncol - 6) for x in labels], ncol


def _legend_below(owner, handles, labels, width: int, anchor):
    """A legend under the axes (``owner``: an axes or the figure). Added after tight_layout, so the
    axes keep their size; savefig(bbox_inches="tight") grows the image to hold it."""
    wrapped, ncol = _legend_layout(labels, width)
    return owner.legend(handles, wrapped, loc="upper center", bbox_to_anchor=anchor, ncol=ncol, fontsize=8,
                        frameon=False)


def _or_nan(value) -> float:
    """A top-1 as a float for a plot; NaN where it is null (a phase or task without test images)."""
    return math.nan if value is None else float(value)


def _curves(row: Row, key: str = "cnn"):
    """x = classes seen, and per seed the top-1 after each phase (runs cut to the shortest)."""
    n = min(len(r.results["phases"]) for r in row.runs)
    xs = [row.runs[0].results["phases"][k]["classes"][1] for k in range(n)]
    ys = [[_or_nan(r.results["phases"][k][key]["top1"]) if r.results["phases"][k].get(key) else math.nan
           for k in range(n)] for r in row.runs]
    return xs, ys


def _line_style(i: int) -> tuple[str, str]:
    """(colour, line style) of the figures' i-th row: the colour cycle, then the next line style
    every 10 rows, so that rows stay apart past the cycle's colours."""
    import matplotlib.pyplot as plt

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return colors[i % len(colors)], ("-", "--", ":", "-.")[(i // 10) % 4]


def accuracy_curve_figure(rows: list[Row]):
    """The accuracy_curve.png figure: top-1 vs classes seen per row, the legend under the axes."""
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(8, 5.2), dpi=110)
    for i, row in enumerate(rows):
        xs, ys = _curves(row)
        ys = np.array(ys)
        with warnings.catch_warnings():   # a phase no seed has a top-1 for (no test images): NaN, unplotted
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(ys, axis=0)
        c, ls = _line_style(i)
        ax.plot(xs, mean, ls, marker="o", color=c, lw=2, ms=5, label=f"{row.label} (n={len(row.runs)})")
        if len(row.runs) > 1:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                ax.fill_between(xs, np.nanmin(ys, axis=0), np.nanmax(ys, axis=0), color=c, alpha=0.15, lw=0)
        ref = row_stats(row)["published"]
        if ref and ref["last"] is not None:
            ax.plot([xs[-1]], [ref["last"]], "*", color=c, ms=14, mec="black")
    if any(row_stats(r)["published"] for r in rows):
        ax.plot([], [], "*", color="grey", ms=12, mec="black", label="published last top-1 (CIM paper, PyCIL)")
    ax.set_xlabel("number of classes seen")
    ax.set_ylabel("CNN top-1 accuracy on classes seen (%)")
    ax.set_title("Top-1 after each phase (line: mean over seeds, band: seed min–max)")
    if rows:
        ax.set_xticks(sorted({x for r in rows for x in _curves(r)[0]}))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        _legend_below(ax, handles, labels, 110, (0.5, -0.12))
    return fig


def matrix_figure(row: Row):
    """The accuracy_matrix figure of ``row`` (mean over its seeds), or None without a matrix."""
    import matplotlib.pyplot as plt
    import numpy as np

    mats = [r.results.get("summary", {}).get("cnn_accuracy_matrix") for r in row.runs]
    mats = [m for m in mats if m]
    if not mats:
        return None
    n = min(len(m) for m in mats)
    grid = np.full((n, n), np.nan)
    for k in range(n):
        for t in range(k + 1):
            seen = [m[k][t] for m in mats if m[k][t] is not None]   # null: a task without test images
            grid[k, t] = np.mean(seen) if seen else np.nan
    width = max(4.6, 1.6 + 0.8 * n)
    fig, ax = plt.subplots(figsize=(width, max(4.0, 1.4 + 0.75 * n)), dpi=110)
    im = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis")
    for k in range(n):
        for t in range(k + 1):
            ax.text(t, k, "–" if np.isnan(grid[k, t]) else f"{grid[k, t]:.0f}", ha="center", va="center",
                    fontsize=11, color="white" if not grid[k, t] >= 55 else "black")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xlabel("task (classes of phase t)")
    ax.set_ylabel("after phase k")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()    # before the title: a long (wrapped) label then grows the image, not shrinks the matrix
    ax.set_title(f"CNN task accuracy (%), mean of {len(mats)} seed(s)\n{_wrap(row.label, int(width * 11))}",
                 fontsize=9)
    return fig


def memory_figure(rows: list[Row]):
    """The memory.png figure: exemplars per class and mean exemplar cost per phase, legend below."""
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.4), dpi=110)
    for i, row in enumerate(rows):
        n = min(len(r.results["phases"]) for r in row.runs)
        c, ls = _line_style(i)
        per_class = [np.mean([r.results["phases"][k]["memory"]["exemplars"] / r.results["phases"][k]["classes"][1]
                              for r in row.runs]) for k in range(n)]
        cost = [np.mean([r.results["phases"][k]["memory"].get("mean_cost") or math.nan for r in row.runs])
                for k in range(n)]
        a1.plot(range(n), per_class, ls, marker="o", color=c, label=row.label)
        a2.plot(range(n), cost, ls, marker="o", color=c, label=row.label)
    a1.set_title("Exemplars per class after each phase")
    a1.set_ylabel("exemplars per class seen")
    a2.set_title("Mean cost of an exemplar (1 = a full image)")
    a2.set_ylabel("memory units per exemplar")
    for a in (a1, a2):
        a.set_xlabel("phase")
        a.grid(alpha=0.3)
        a.xaxis.get_major_locator().set_params(integer=True)
    a2.set_ylim(bottom=0)
    fig.tight_layout()
    handles, labels = a1.get_legend_handles_labels()
    if handles:
        _legend_below(fig, handles, labels, 150, (0.5, 0.0))
    return fig


def plot_all(rows: list[Row], out: Path) -> list[Path]:
    """Write accuracy_curve.png, one accuracy_matrix_<row>.png per row (distinct names) and memory.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if all(r_.results.get("phases") for r_ in r.runs)]
    figures = [("accuracy_curve.png", accuracy_curve_figure(rows))]
    figures += [(f"accuracy_matrix_{name}.png", matrix_figure(row))
                for row, name in zip(rows, unique_names([r.label for r in rows]))]
    figures.append(("memory.png", memory_figure(rows)))
    written = []
    for name, fig in figures:
        if fig is None:
            continue
        fig.savefig(out / name, bbox_inches="tight", pad_inches=0.15)
        plt.close(fig)
        written.append(out / name)
    return written


def export_tensorboard(rows: list[Row], out: Path) -> str:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # noqa: BLE001 - optional: tensorboard not installed
        return "tensorboard not installed: no TensorBoard export"
    pairs = [(row, r) for row in rows for r in row.runs]
    names = unique_names([f"{row.label}__seed{r.results['config'].get('seed')}" for row, r in pairs])
    for (row, r), name in zip(pairs, names):
        path = r.folder / "metrics.jsonl"
        if not path.exists():
            continue
        writer = SummaryWriter(str(out / "tensorboard" / name))
        step = 0
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            step += 1
            for k, v in rec.get("losses", {}).items():
                writer.add_scalar(f"loss/{k}", v, step)
            writer.add_scalar("train_acc", rec.get("train_acc", 0), step)
            writer.add_scalar("lr", rec.get("lr", 0), step)
        for p in r.results.get("phases", []):
            if p.get("cnn") and p["cnn"]["top1"] is not None:
                writer.add_scalar("test/cnn_top1", p["cnn"]["top1"], p["classes"][1])
        writer.close()
    return f"TensorBoard scalars in {out / 'tensorboard'}"


def prepare_output(out: Path) -> None:
    """Create the report folder ``out``; UserError naming it if it is a file, lies under one, or
    cannot be made or written (``utils.io.check_writable_dir``, as main.py checks its --output)."""
    from utils.io import check_writable_dir

    check_writable_dir(out, "--output")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the report folder {out}: {err.strerror or err}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Tables and plots of runs and sweeps (see the module docstring).")
    p.add_argument("paths", nargs="+", help="run folders, sweep roots or folders to search")
    p.add_argument("--output", help="report folder (default <sweep>/report, else logs/report)")
    p.add_argument("--tensorboard", action="store_true", help="also export metrics.jsonl as TensorBoard scalars")
    args = p.parse_args(argv)
    if args.output is not None and not args.output.strip():
        print("error: --output is empty; give a folder for the report, or leave --output out.", file=sys.stderr)
        return EXIT_USER_ERROR
    paths = [Path(x) for x in args.paths]
    try:
        runs, notes = collect(paths)
    except UserError as err:
        print(_shown(f"error: {err}"), file=sys.stderr)
        return EXIT_USER_ERROR
    if not runs:
        print(_shown("error: no results.json in " + ", ".join(map(str, paths)) + "; " + "; ".join(notes)), file=sys.stderr)
        return EXIT_USER_ERROR
    rows = group(runs, notes)
    if not rows:
        print(_shown("error: no finished run in " + ", ".join(map(str, paths)) + "; " + "; ".join(notes)), file=sys.stderr)
        return EXIT_USER_ERROR
    given = paths[0].parent if paths[0].name == "sweep.json" else paths[0]   # a sweep root, or its sweep.json
    default = given / "report" if len(paths) == 1 and (given / "sweep.json").is_file() else Path("logs/report")
    out = Path(args.output) if args.output else default
    try:
        prepare_output(out)
    except UserError as err:
        print(_shown(f"error: {err}"), file=sys.stderr)
        return EXIT_USER_ERROR
    title = _shown("Report: " + ", ".join(str(x) for x in paths))
    write_tables(rows, out, notes, title)
    written = plot_all(rows, out)
    print((out / "report.md").read_text(encoding="utf-8"))
    print(_shown(f"wrote {out / 'report.md'}, {out / 'report.csv'} and {len(written)} plots in {out}"))
    if args.tensorboard:
        print(export_tensorboard(rows, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
