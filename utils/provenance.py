"""Where a run's numbers came from: the code's git commit and the versions of Python and torch, and
the device, written into results.json and log.txt. A config hash names a run's settings, not the
code that ran them: a fix that changes results (LUCIR's class-balanced finetuning, 4de82cb) leaves
the hash as it was, so a report or a resumed run can only tell the code versions apart by this.
"""
from __future__ import annotations

import functools
import platform
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
UNKNOWN = "unknown"


def _git(*args: str) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):   # no git, or it hung
        return None


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The repository's commit (12 hex digits), with ``+dirty`` when a tracked file differs from
    it; "unknown" outside a git checkout or without git. Read once per process."""
    head = _git("rev-parse", "--short=12", "HEAD")
    if head is None or head.returncode != 0 or not head.stdout.strip():
        return UNKNOWN
    status = _git("status", "--porcelain", "--untracked-files=no")
    dirty = status is not None and status.returncode == 0 and bool(status.stdout.strip())
    return head.stdout.strip() + ("+dirty" if dirty else "")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    """The GPU's name for a CUDA device, the CPU model otherwise."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_name()


def environment(device: torch.device) -> dict:
    """{"code", "python", "torch", "device"} of this process (results.json's ``environment``)."""
    return {"code": code_version(), "python": platform.python_version(), "torch": torch.__version__,
            "device": device_name(device)}
