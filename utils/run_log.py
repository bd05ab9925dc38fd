"""Human-readable log (stdout + log.txt) and the per-epoch metrics.jsonl of a run."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _fmt(x) -> str:
    return "  -  " if x is None else f"{x:6.2f}"


class RunLog:
    def __init__(self, out: Path, enabled: bool = True):
        """``enabled`` False (every rank but 0 of a distributed run): prints and writes nothing."""
        self.out = Path(out)
        self.enabled = enabled
        self._text = None
        self._metrics = None

    def open(self) -> None:
        if not self.enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        self._text = open(self.out / "log.txt", "a", buffering=1)
        self._metrics = open(self.out / "metrics.jsonl", "a", buffering=1)

    def close(self) -> None:
        for f in (self._text, self._metrics):
            if f is not None:
                f.close()
        self._text = self._metrics = None

    def info(self, message: str) -> None:
        if not self.enabled:
            return
        print(message, file=sys.stdout, flush=True)
        if self._text is not None:
            self._write(self._text, message + "\n")

    def metric(self, record: dict) -> None:
        if self._metrics is not None:
            self._write(self._metrics, json.dumps(record) + "\n")

    @staticmethod
    def _write(f, text: str) -> None:
        try:
            f.write(text)
        except OSError as err:   # a full disk: say so and name the file (exit 2), no traceback
            from utils.io import disk_error

            raise (disk_error(Path(f.name), err) or err) from None

    def phase_block(self, rec: dict) -> None:
        first, last = rec["classes"]   # half-open, as the phase's opening line writes it
        lines = [f"-- phase {rec['phase']} done in {rec['seconds']:.1f}s: classes [{first}, {last})"]
        for name in [k for k in rec if isinstance(rec[k], dict) and "top1" in rec[k]]:
            r = rec[name]
            tasks = " ".join(_fmt(t) for t in r["per_task"])
            lines.append(f"   {name:8s} top1 {_fmt(r['top1'])}  top5 {_fmt(r['top5'])}  old {_fmt(r['old'])}  "
                         f"new {_fmt(r['new'])}  per task [{tasks}]")
        m = rec["memory"]
        lines.append(f"   memory   {m['exemplars']} exemplars, {m['used']:.1f} / {m['budget']} units "
                     f"({m['class_budget']} per class)")
        if "params" in rec:
            lines.append(f"   params   {rec['params']}")
        for line in lines:
            self.info(line)

    def summary(self, s: dict) -> None:
        self.info("== summary")
        for key in sorted(s):
            if not key.endswith("matrix"):
                self.info(f"   {key}: {s[key]}")
