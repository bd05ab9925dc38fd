"""Tables and plots of runs: ``python exps/report.py RUN_OR_SWEEP_DIRS... [--output DIR]``.

Each argument is a run folder (holding ``results.json``), a sweep root (holding ``sweep.json``) or
any folder (searched for ``results.json``). Runs that differ only in their seed form one
configuration. Writes into DIR (default ``<the one sweep>/report``, else ``logs/report``):

- ``report.md`` and ``report.csv``: one row per configuration, labelled by the keys that vary
  between configurations; CNN avg / last top-1 and forgetting (ours and PyCIL's), NME avg / last,
  FOSTER's other model's avg / last (the student, or the teacher with foster_deploy: student), each as mean ± std over seeds (std: sample standard deviation, n − 1; "–" for one
  seed) with the seed count; exemplars per class and memory bytes after the last phase; wall time
  (sum of the phases' seconds, mean over seeds); phases done. Where a row matches a published
  setting of SPEC.md §5 (dataset, learner, compression, init_cls, increment, phase count, and the
  memory for ImageNet-1000) the published avg / last stand beside ours with the difference.
- ``accuracy_curve.png``: CNN top-1 vs classes seen, one line per configuration (mean over
  seeds), a band from the seeds' min to max, the published last-phase top-1 as a star where known.
- ``accuracy_matrix_<row>.png``: task accuracy after each phase (mean over seeds), as a heatmap.
- ``memory.png``: exemplars per class and mean compression cost (units per exemplar) per phase.
- ``tensorboard/``: with ``--tensorboard`` and the package installed, the metrics.jsonl scalars.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# SPEC.md §5, average incremental accuracy (and last-phase accuracy where published), ResNet-18 from
# scratch unless said. LFS: B0 with equal phases; LFH: half the classes first, then N phases.
PUBLISHED: list[dict] = []


def _add(source, dataset, learner, compression, init_cls, increment, phases, avg, last=None, memory_size=None):
    PUBLISHED.append({"source": source, "dataset": dataset, "model_name": learner, "compression": compression,
                      "init_cls": init_cls, "increment": increment, "phases": phases, "avg": avg, "last": last,
                      "memory_size": memory_size})


def _published_tables() -> None:
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
                _add(f"SPEC §5 LFS N={n}", dataset, learner, comp, init, inc, n, avg)
    lfh = {("der", "none"): ([78.13, 73.45, None], [79.08, 77.73, None]),
           ("der", "cim"): ([79.25, 75.76, None], [80.30, 79.05, None]),
           ("foster", "none"): ([79.08, 75.07, 68.08], [80.07, 77.54, 72.40]),
           ("foster", "cim"): ([79.76, 76.86, 70.50], [80.93, 78.66, 75.74])}
    for (learner, comp), (food, inet) in lfh.items():
        for dataset, init, values in (("food101", 51, food), ("imagenet100", 50, inet)):
            for n, inc, avg in zip((5, 10, 25), (10, 5, 2), values):
                if avg is not None:
                    _add(f"SPEC §5 LFH N={n}", dataset, learner, comp, init, inc, n + 1, avg)
    for mem, base, cim in ((20000, (68.34, 60.14), (69.53, 62.07)), (5000, (54.72, 44.96), (59.48, 50.83))):
        _add(f"SPEC §5 ImageNet-1000 {mem // 1000}k", "imagenet1000", "foster", "none", 100, 100, 10, *base, mem)
        _add(f"SPEC §5 ImageNet-1000 {mem // 1000}k", "imagenet1000", "foster", "cim", 100, 100, 10, *cim, mem)
    # The ablation's "per-phase τ" (73.83) and "joint training" (73.44) have no config key here.
    for comp, avg in (("full", 73.03), ("random", 73.10), ("center", 73.29), ("cam", 73.76)):
        _add("SPEC §5 ablation Food-101 N=10", "food101", "foster", comp, 11, 10, 10, avg)
    for learner, init, avg, last in (("icarl", 10, 64.3, 49.6), ("der", 10, 69.7, 58.7), ("foster", 10, 72.9, 61.6),
                                     ("der", 50, 68.0, 62.0), ("foster", 50, 70.1, 63.9)):
        phases = 10 if init == 10 else 6
        _add(f"SPEC §5 CIFAR-100 toolbox B{0 if init == 10 else 50} Inc10 (±0.5)", "cifar100", learner, "none",
             init, 10, phases, avg, last, 2000)


_published_tables()


def published_for(cfg: dict, phases: int) -> dict | None:
    for ref in PUBLISHED:
        if (ref["dataset"] == cfg.get("dataset") and ref["model_name"] == cfg.get("model_name")
                and ref["compression"] == cfg.get("compression", "none") and ref["init_cls"] == cfg.get("init_cls")
                and ref["increment"] == cfg.get("increment") and ref["phases"] == phases
                and ref["memory_size"] in (None, cfg.get("memory_size"))):
            return ref
    return None


# ---- collecting runs ---------------------------------------------------------------------------
@dataclass
class RunResult:
    folder: Path
    results: dict
    variant: str | None = None
    planned: int | None = None       # phases of the plan, when known (sweep runs)


@dataclass
class Row:
    key: str
    runs: list = field(default_factory=list)
    label: str = ""

    @property
    def cfg(self) -> dict:
        return self.runs[0].results["config"]


def _identity(cfg: dict) -> str:
    """The configuration's hash with today's schema (seed and where-it-ran keys left out)."""
    from utils.config import config_hash, resolve_saved_config

    try:
        return config_hash(resolve_saved_config(cfg)[0])
    except Exception:  # noqa: BLE001 - a config of another schema: compare its identifying keys as saved
        from utils.config import _NOT_HASHED

        return json.dumps({k: v for k, v in cfg.items() if k not in _NOT_HASHED}, sort_keys=True)


def collect(paths: list[Path]) -> tuple[list[RunResult], list[str]]:
    runs, notes = [], []
    for path in map(Path, paths):
        if (path / "results.json").is_file():
            runs.append(RunResult(path, json.loads((path / "results.json").read_text())))
        elif (path / "sweep.json").is_file():
            sweep = json.loads((path / "sweep.json").read_text())
            for r in sweep["runs"]:
                res = path / r["name"] / "results.json"
                if res.is_file():
                    runs.append(RunResult(path / r["name"], json.loads(res.read_text()), r.get("variant")))
                else:
                    notes.append(f"{path / r['name']}: no results.json yet (left out)")
        elif path.is_dir():
            found = sorted(path.rglob("results.json"))
            if not found:
                notes.append(f"{path}: no results.json found")
            runs += [RunResult(f.parent, json.loads(f.read_text())) for f in found]
        else:
            notes.append(f"{path}: not a folder")
    return runs, notes


def group(runs: list[RunResult], notes: list[str] | None = None) -> list[Row]:
    """Runs of one configuration (seeds aside) form a row; a run with fewer phases than the row's
    longest (stopped, or still running) is left out of it, with a note."""
    from utils.config import _NOT_HASHED

    rows: dict[str, Row] = {}
    for run in runs:
        key = (run.variant or "") + "|" + _identity(run.results["config"])
        rows.setdefault(key, Row(key)).runs.append(run)
    rows_list = list(rows.values())
    for row in rows_list:
        most = max(len(r.results.get("phases", [])) for r in row.runs)
        if notes is not None:
            notes += [f"{r.folder}: {len(r.results.get('phases', []))} of {most} phases (partial, left out)"
                      for r in row.runs if len(r.results.get("phases", [])) < most]
        row.runs = [r for r in row.runs if len(r.results.get("phases", [])) == most]
    # Label: the keys whose values differ between configurations (a sweep's variant name first).
    cfgs = [r.cfg for r in rows_list]
    keys = sorted({k for c in cfgs for k in c} - set(_NOT_HASHED))
    varying = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in cfgs}) > 1]
    order = _key_order(runs)
    varying.sort(key=lambda k: (order.index(k) if k in order else len(order), k))
    for row in rows_list:
        parts = [row.runs[0].variant] if row.runs[0].variant else []
        parts += [f"{k}={_fmt_value(row.cfg.get(k))}" for k in varying]
        row.label = ", ".join(p for p in parts if p) or (row.cfg.get("prefix") or row.runs[0].folder.name)
    return rows_list


def _key_order(runs) -> list[str]:
    """Grid keys in the order a sweep spec gave them (memory_size before compression, ...)."""
    order = []
    for run in runs:
        sweep = run.folder
        for parent in [sweep, *sweep.parents][:6]:
            if (parent / "sweep.json").is_file():
                spec = json.loads((parent / "sweep.json").read_text())["spec"]
                order += [k for k in list(spec.get("grid", {})) if k not in order]
                break
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
    out["published"] = published_for(row.cfg, max(out["phases_done"]) if out["phases_done"] else 0)
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


def write_tables(rows: list[Row], out: Path, notes: list[str], title: str) -> None:
    header, body = table(rows)
    with open(out / "report.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(body)
    md = [f"# {title}", "",
          "Mean ± sample std (n − 1) over seeds; top-1 in % on all classes seen; avg = average incremental "
          "accuracy (phase 0 included); forgetting in points; exemplars/class and memory bytes after the last "
          "phase; wall time = sum of the phases' seconds per run. Published numbers: SPEC.md §5.", "",
          "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(line) + " |" for line in body]
    refs = [(r.label, s["published"]["source"]) for r, s in zip(rows, map(row_stats, rows)) if s["published"]]
    if refs:
        md += ["", "Published settings matched: " + "; ".join(f"{label} ↔ {src}" for label, src in refs) + "."]
    if notes:
        md += ["", "Left out:", *[f"- {n}" for n in notes]]
    md += ["", "Plots: ![accuracy](accuracy_curve.png) ![memory](memory.png)", ""]
    (out / "report.md").write_text("\n".join(md))


# ---- plots -------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text.replace(", ", "__"))[:120]


def _curves(row: Row, key: str = "cnn"):
    """x = classes seen, and per seed the top-1 after each phase (runs cut to the shortest)."""
    n = min(len(r.results["phases"]) for r in row.runs)
    xs = [row.runs[0].results["phases"][k]["classes"][1] for k in range(n)]
    ys = [[r.results["phases"][k][key]["top1"] if r.results["phases"][k].get(key) else math.nan
           for k in range(n)] for r in row.runs]
    return xs, ys


def plot_all(rows: list[Row], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    rows = [r for r in rows if all(r_.results.get("phases") for r_ in r.runs)]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4
    styles = ["-", "--", ":", "-."]

    fig, ax = plt.subplots(figsize=(8, 5.2), dpi=110)
    for i, row in enumerate(rows):
        xs, ys = _curves(row)
        ys = np.array(ys)
        mean = np.nanmean(ys, axis=0)
        c, ls = colors[i % len(colors)], styles[(i // 10) % len(styles)]
        ax.plot(xs, mean, ls, marker="o", color=c, lw=2, ms=5, label=f"{row.label} (n={len(row.runs)})")
        if len(row.runs) > 1:
            ax.fill_between(xs, np.nanmin(ys, axis=0), np.nanmax(ys, axis=0), color=c, alpha=0.15, lw=0)
        ref = row_stats(row)["published"]
        if ref and ref["last"] is not None:
            ax.plot([xs[-1]], [ref["last"]], "*", color=c, ms=14, mec="black")
    if any(row_stats(r)["published"] for r in rows):
        ax.plot([], [], "*", color="grey", ms=12, mec="black", label="published last top-1 (SPEC §5)")
    ax.set_xlabel("number of classes seen")
    ax.set_ylabel("CNN top-1 accuracy on classes seen (%)")
    ax.set_title("Top-1 after each phase (line: mean over seeds, band: seed min–max)")
    if rows:
        ax.set_xticks(sorted({x for r in rows for x in _curves(r)[0]}))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best", framealpha=0.85)
    fig.tight_layout()
    fig.savefig(out / "accuracy_curve.png")
    plt.close(fig)
    written.append(out / "accuracy_curve.png")

    for row in rows:
        mats = [r.results.get("summary", {}).get("cnn_accuracy_matrix") for r in row.runs]
        mats = [m for m in mats if m]
        if not mats:
            continue
        n = min(len(m) for m in mats)
        grid = np.full((n, n), np.nan)
        for k in range(n):
            for t in range(k + 1):
                grid[k, t] = np.mean([m[k][t] for m in mats])
        fig, ax = plt.subplots(figsize=(max(4.6, 1.6 + 0.8 * n), max(4.0, 1.4 + 0.75 * n)), dpi=110)
        im = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis")
        for k in range(n):
            for t in range(k + 1):
                ax.text(t, k, f"{grid[k, t]:.0f}", ha="center", va="center", fontsize=11,
                        color="white" if grid[k, t] < 55 else "black")
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
        ax.set_xlabel("task (classes of phase t)")
        ax.set_ylabel("after phase k")
        ax.set_title(f"CNN task accuracy (%), mean of {len(mats)} seed(s)\n{row.label}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        fig.tight_layout()
        path = out / f"accuracy_matrix_{_slug(row.label)}.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.4), dpi=110)
    for i, row in enumerate(rows):
        n = min(len(r.results["phases"]) for r in row.runs)
        c, ls = colors[i % len(colors)], styles[(i // 10) % len(styles)]
        per_class = [np.mean([r.results["phases"][k]["memory"]["exemplars"] / r.results["phases"][k]["classes"][1]
                              for r in row.runs]) for k in range(n)]
        cost = [np.mean([r.results["phases"][k]["memory"]["mean_cost"] or math.nan for r in row.runs])
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
    handles, labels = a1.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(3, max(1, len(labels))), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.045 * math.ceil(len(labels) / 3), 1, 1))
    fig.savefig(out / "memory.png")
    plt.close(fig)
    written.append(out / "memory.png")
    return written


def export_tensorboard(rows: list[Row], out: Path) -> str:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # noqa: BLE001 - optional: tensorboard not installed
        return "tensorboard not installed: no TensorBoard export"
    for row in rows:
        for r in row.runs:
            path = r.folder / "metrics.jsonl"
            if not path.exists():
                continue
            writer = SummaryWriter(str(out / "tensorboard" / _slug(f"{row.label}__seed{r.results['config'].get('seed')}")))
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
                writer.add_scalar("test/cnn_top1", p["cnn"]["top1"], p["classes"][1])
            writer.close()
    return f"TensorBoard scalars in {out / 'tensorboard'}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Tables and plots of runs and sweeps (see the module docstring).")
    p.add_argument("paths", nargs="+", help="run folders, sweep roots or folders to search")
    p.add_argument("--output", help="report folder (default <sweep>/report, else logs/report)")
    p.add_argument("--tensorboard", action="store_true", help="also export metrics.jsonl as TensorBoard scalars")
    args = p.parse_args(argv)
    paths = [Path(x) for x in args.paths]
    runs, notes = collect(paths)
    if not runs:
        print("error: no results.json in " + ", ".join(map(str, paths)) + "; " + "; ".join(notes), file=sys.stderr)
        return 2
    default = paths[0] / "report" if len(paths) == 1 and (paths[0] / "sweep.json").is_file() else Path("logs/report")
    out = Path(args.output) if args.output else default
    out.mkdir(parents=True, exist_ok=True)
    rows = group(runs, notes)
    title = "Report: " + ", ".join(str(x) for x in paths)
    write_tables(rows, out, notes, title)
    written = plot_all(rows, out)
    print((out / "report.md").read_text())
    print(f"wrote {out / 'report.md'}, {out / 'report.csv'} and {len(written)} plots in {out}")
    if args.tensorboard:
        print(export_tensorboard(rows, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
