"""One run per output folder: a lock file created with O_EXCL that holds the owner's pid.

A second run into the same folder stops with a message naming the folder and the holder's pid
(two runs writing one folder would leave checkpoints and results of both). A lock whose pid is no
longer alive (a killed run) is stale: it is taken over with a notice.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from utils.errors import UserError

LOCK_NAME = "run.lock"


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # alive, owned by another user
        return True
    except OSError:
        return False
    return True


class RunLock:
    """``with RunLock(folder):`` — or ``acquire()`` / ``release()``. ``notice`` prints the stale-lock note."""

    def __init__(self, folder: str | Path, notice: Callable[[str], None] = print):
        self.path = Path(folder) / LOCK_NAME
        self.notice = notice
        self.held = False

    def _holder(self) -> int | None:
        try:
            return int(self.path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def acquire(self) -> None:
        for _ in range(3):   # a stale lock is removed, then created again by us
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and holder != os.getpid() and pid_alive(holder):
                    raise UserError(
                        f"Output folder {self.path.parent} is in use by another run (pid {holder}, lock file "
                        f"{self.path}). Wait for it to finish, or use another --output folder.") from None
                if holder is None and self._young():
                    # Being written by the run that just created it: its pid is about to appear.
                    raise UserError(f"Output folder {self.path.parent} is being locked by another run "
                                    f"(lock file {self.path}); use another --output folder.") from None
                self.notice(f"note: taking over the stale lock {self.path} "
                            f"({'of pid ' + str(holder) + ', which is no longer running' if holder else 'unreadable'})")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n")
            self.held = True
            return
        raise UserError(f"Could not take the lock {self.path}; another run may be starting in that folder.")

    def _young(self) -> bool:
        import time

        try:
            return time.time() - self.path.stat().st_mtime < 2.0
        except OSError:
            return False

    def release(self) -> None:
        if self.held:
            if self._holder() == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
