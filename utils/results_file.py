"""Reading a run's ``results.json`` with one rule, for everything that reads finished runs: the
trainer's resume (a finished run without checkpoints), ``exps/sweep.py`` (a run's state) and
``exps/report.py`` (its tables).

A file is usable when it is UTF-8 JSON holding an object with a ``config`` object and a ``phases``
list whose entries carry their ``classes`` range and ``memory`` (what the trainer writes after
every phase); anything else gets one line saying why, naming no path (the caller adds it).
"""
from __future__ import annotations

import json
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


def results_problem(data: Any) -> str | None:
    """What keeps ``data`` from being a run's results (None: usable)."""
    if not isinstance(data, dict):
        return f"does not hold a results object (a JSON {type(data).__name__})"
    if not isinstance(data.get("config"), dict):
        return 'has no "config" object'
    if not isinstance(data.get("phases"), list):
        return 'has no "phases" list'
    if not isinstance(data.get("summary", {}), dict):
        return '"summary" is not an object'
    for k, phase in enumerate(data["phases"]):
        if not (isinstance(phase, dict) and isinstance(phase.get("classes"), list) and len(phase["classes"]) == 2
                and isinstance(phase.get("memory"), dict) and "exemplars" in phase["memory"]):
            return f'phase {k} lacks its "classes" range or "memory"'
    return None


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
