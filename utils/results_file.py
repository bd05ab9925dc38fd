"""Reading a run's ``results.json`` with one rule, for everything that reads finished runs: the
trainer's resume (a finished run without checkpoints), ``exps/sweep.py`` (a run's state) and
``exps/report.py`` (its tables).

A file is usable when it is UTF-8 JSON holding an object with a ``config`` object (its one integer
``seed``) and a ``phases`` list whose entries carry their ``classes`` range, ``memory`` and
accuracies with the types the trainer writes after every phase (a top-1 may be null: a phase
without test images; numbers are finite, seconds ≥ 0), and a ``summary`` whose accuracies are finite
numbers or null; anything else gets
one line saying why, naming no path (the caller adds it).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from utils.errors import DataError


def _parse(path: str | Path) -> tuple[Any, str | None]:
    """(the JSON value in ``path``, None), or (None, why it cannot be read: not UTF-8, not JSON, ...)."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except IsADirectoryError:
        return None, "is a folder, not a file"
    except OSError as err:
        return None, f"cannot be read: {err.strerror or err}"
    except UnicodeDecodeError:
        return None, "is not UTF-8 text"
    try:
        return json.loads(text), None
    except json.JSONDecodeError as err:
        hint = "; truncated?" if err.pos >= len(text.rstrip()) or err.msg.startswith("Unterminated") else ""
        return None, f"is not valid JSON (line {err.lineno}: {err.msg}{hint})"
    except RecursionError:
        return None, "nests its JSON too deeply to be read"


def read_json_file(path: str | Path) -> Any:
    """The JSON value in ``path``; DataError "<path> <why>" if it cannot be read, is not UTF-8 or not JSON."""
    value, why = _parse(path)
    if why:
        raise DataError(f"{path} {why}")
    return value


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any, or_none: bool = False) -> bool:
    """A finite int or float (or None with ``or_none``): Python's json reads Infinity, -Infinity and NaN,
    which no run writes and which would come out of a table or a plot as inf / nan."""
    return (v is None and or_none) or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))


def _phase_problem(phase: Any) -> str | None:
    """What is wrong with one entry of "phases" (None: usable): the fields the trainer writes and
    the readers use, with their types."""
    if not isinstance(phase, dict):
        return "is not an object"
    classes = phase.get("classes")
    if not (isinstance(classes, list) and len(classes) == 2 and all(map(_is_int, classes))
            and 0 <= classes[0] < classes[1]):
        return 'lacks its "classes" range [first, last) of class counts'
    memory = phase.get("memory")
    if not (isinstance(memory, dict) and _is_int(memory.get("exemplars")) and memory["exemplars"] >= 0):
        return 'lacks its "memory" with a count of "exemplars"'
    if not all(_is_number(memory.get(k), or_none=True) for k in ("bytes", "mean_cost")):
        return '"memory" has a "bytes" or "mean_cost" that is not a finite number'
    for model in ("cnn", "nme"):
        if not (phase.get(model) is None
                or (isinstance(phase[model], dict) and "top1" in phase[model]
                    and _is_number(phase[model]["top1"], or_none=True))):
            return f'"{model}" is not an object with a "top1" finite number (or null)'
    if "seconds" in phase and not (_is_number(phase["seconds"]) and phase["seconds"] >= 0):
        return '"seconds" is not a finite number ≥ 0'
    return None


def _summary_problem(summary: dict) -> str | None:
    """What is wrong with "summary" (None: usable): its accuracies and forgetting are numbers (or
    null), its accuracy matrices lists whose row k has an entry for each of tasks 0 … k (other
    entries, such as FOSTER's "cnn_model", are not read as numbers)."""
    for key, value in summary.items():
        if key.endswith("_matrix"):
            if value is not None and not (isinstance(value, list) and all(
                    isinstance(row, list) and len(row) > k and all(_is_number(v, or_none=True) for v in row)
                    for k, row in enumerate(value))):
                return f'"summary.{key}" is not a matrix with a row of task accuracies per phase'
        elif key.endswith(("_top1", "_forgetting", "_forgetting_pycil")) and not _is_number(value, or_none=True):
            return f'"summary.{key}" is not a finite number'
    return None


def results_problem(data: Any) -> str | None:
    """What keeps ``data`` from being a run's results (None: usable): the shape the trainer writes,
    with the types of every field a reader uses, so that a hand-edited file is refused here with
    one line rather than failing later in a sum or a plot."""
    if not isinstance(data, dict):
        return f"does not hold a results object (a JSON {type(data).__name__})"
    if not isinstance(data.get("config"), dict):
        return 'has no "config" object'
    if not isinstance(data.get("phases"), list):
        return 'has no "phases" list'
    if not isinstance(data.get("summary", {}), dict):
        return '"summary" is not an object'
    if not _is_int(data["config"].get("seed")):
        return '"config.seed" is not one integer (a run has one seed)'
    if "class_order" in data and not (isinstance(data["class_order"], list) and all(map(_is_int, data["class_order"]))):
        return '"class_order" is not a list of class indices'
    for k, phase in enumerate(data["phases"]):
        why = _phase_problem(phase)
        if why:
            return f"phase {k} {why}"
    return _summary_problem(data.get("summary", {}))


def read_sweep_json(path: str | Path) -> dict:
    """The sweep.json at ``path`` (written by exps/sweep.py: a "runs" list of objects with a string
    "name"); DataError naming the file if it is unusable."""
    data = read_json_file(path)
    runs = data.get("runs") if isinstance(data, dict) else None
    if not isinstance(runs, list) or not all(isinstance(r, dict) and isinstance(r.get("name"), str) for r in runs):
        raise DataError(f'{path} is not a sweep.json of exps/sweep.py (no "runs" list of named runs)')
    return data


def is_run_name(name: str) -> bool:
    """Whether a sweep.json run name names a folder inside its sweep: relative, no ``..``, no NUL."""
    return bool(name) and "\0" not in name and not Path(name).is_absolute() and ".." not in Path(name).parts


def load_results(path: str | Path) -> tuple[dict | None, str | None]:
    """(the results dict in ``path``, None), or (None, why it is not usable)."""
    data, why = _parse(path)
    why = why or results_problem(data)
    return (None, why) if why else (data, None)


def read_results(path: str | Path) -> dict:
    """The results dict in ``path``; DataError "<path> <why>" if it is not usable."""
    data, why = load_results(path)
    if why:
        raise DataError(f"{path} {why}")
    return data
