"""One run per output folder: an exclusive ``flock`` on ``<folder>/run.lock``, held while the run runs.

A second run into the same folder stops with a message naming the folder and the holder (its pid
and host, written in the file). The kernel drops the lock when its holder exits, however it exits,
so a lock left by a killed run is simply free: the next run takes it (with a note naming the run
that left it). Unlike a pid in a file, the lock holds across processes that cannot see each other's
pids — another container on the same machine, or another node of a shared file system whose locks
are coherent (NFSv4, Lustre mounted with ``flock``, GPFS) — and two runs that find a lock free at
once cannot both take it.

A releasing run unlinks the file before it unlocks; a run that locked the file just as it was
unlinked finds its path gone or holding another file, and tries again.

Where the file system has no locks (NFS without lockd, Lustre mounted without ``flock``: flock fails
with ENOLCK, ENOSYS, EOPNOTSUPP or EINVAL), the lock falls back to the file's contents, with a note:
a file naming a live process of this machine, or any process of another machine, holds the folder
(the message says to delete the file once that run is gone); two runs starting in the same instant
are told apart by reading the file back.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
import time
from pathlib import Path
from typing import Callable

from utils.errors import UserError
from utils.io import disk_error

LOCK_NAME = "run.lock"
NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}   # flock unsupported here


def pid_alive(pid: int) -> bool:
    """Whether a process of this pid exists on this machine (in this pid namespace)."""
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


def _describe(text: str) -> str:
    """"pid 123 on host h" from a lock file's ``<pid> <host>`` (older files: ``<pid>``)."""
    parts = text.split()
    if not parts:
        return "unknown pid"
    return f"pid {parts[0]}" + (f" on host {parts[1]}" if len(parts) > 1 else "")


def _live_holder(text: str) -> bool:
    """Whether a lock file's ``<pid> <host>`` names a run that may be alive (without file locks): a
    live process of this machine, or any process of another machine (which cannot be checked)."""
    parts = text.split()
    if not parts or not parts[0].isdigit():
        return False
    if len(parts) > 1 and parts[1] != socket.gethostname():
        return True
    return int(parts[0]) != os.getpid() and pid_alive(int(parts[0]))


def _owner_line() -> str:
    """What a lock file holds while this process has it: ``<pid> <host>``."""
    return f"{os.getpid()} {socket.gethostname()}\n"


def holder_of(folder: str | Path, name: str = LOCK_NAME) -> str | None:
    """Who holds ``folder``'s run lock (``name``: exps/sweep.py keeps its own beside main.py's) as
    "pid 123 on host h", or None when no process holds it. Writes nothing: the file is opened
    read-only and only tested with a shared lock."""
    path = Path(folder) / name
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        text = os.pread(fd, 256, 0).decode("utf-8", "replace")
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _describe(text)
        except OSError as err:
            if err.errno in NO_LOCKS:
                return _describe(text) if _live_holder(text) else None
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class RunLock:
    """``with RunLock(folder):`` — or ``acquire()`` / ``release()``. ``notice`` prints the note about
    a lock file left by a run that ended without releasing it."""

    def __init__(self, folder: str | Path, notice: Callable[[str], None] = print, name: str = LOCK_NAME):
        self.path = Path(folder) / name
        self.notice = notice
        self.fd: int | None = None
        self.by_contents = False   # held through the file's contents (no file locks here)

    @property
    def held(self) -> bool:
        return self.fd is not None or self.by_contents

    def acquire(self) -> None:
        for attempt in range(20):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise UserError(f"Cannot lock the output folder {self.path.parent}: {self.path} cannot be opened "
                                f"({err.strerror}); move it, or use another --output folder.") from None
            if not stat.S_ISREG(os.fstat(fd).st_mode):   # a FIFO or device: no seek, no lock to read
                os.close(fd)
                raise UserError(f"Cannot lock the output folder {self.path.parent}: {self.path} is not a regular "
                                f"file; move it, or use another --output folder.")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    os.close(fd)
                    if err.errno in NO_LOCKS:
                        return self._acquire_by_contents(err)
                    raise UserError(f"Cannot lock the output folder {self.path.parent}: flock on {self.path} failed "
                                    f"({err.strerror}); use another --output folder.") from None
                holder = os.pread(fd, 256, 0).decode("utf-8", "replace")
                os.close(fd)
                if attempt < 3:   # perhaps a moment's shared lock of a check (holder_of): look again
                    time.sleep(0.05)
                    continue
                raise UserError(f"Output folder {self.path.parent} is in use by another run ({_describe(holder)}, "
                                f"lock file {self.path}). Wait for it to finish, or use another --output "
                                f"folder.") from None
            if not self._still_at_path(fd):   # unlinked by its releasing holder meanwhile: once more
                os.close(fd)
                continue
            left = os.pread(fd, 256, 0).decode("utf-8", "replace").strip()
            if left:
                self.notice(f"note: taking over the stale lock {self.path} (of {_describe(left)}, which is no "
                            f"longer running)")
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, _owner_line().encode(), 0)
            except OSError as err:   # a full disk: the run could not have saved anything either
                os.close(fd)
                raise (disk_error(self.path, err) or err) from None
            self.fd = fd
            return
        raise UserError(f"Could not take the lock {self.path}; another run may be starting in that folder.")

    def _acquire_by_contents(self, err: OSError) -> None:
        """The lock where the file system has no file locks (see the module docstring)."""
        self.notice(f"note: the file system of {self.path.parent} has no file locks ({err.strerror}); the run lock "
                    f"is the pid and host in {self.path}")
        mine = _owner_line()
        left = self._contents()
        if _live_holder(left):
            raise UserError(f"Output folder {self.path.parent} is in use by another run ({_describe(left)}, lock file "
                            f"{self.path}). Wait for it to finish, or use another --output folder; if that run is "
                            f"gone (its machine cannot be asked), delete {self.path}.")
        if left.strip():
            self.notice(f"note: taking over the stale lock {self.path} (of {_describe(left)}, which is no longer "
                        f"running)")
        try:
            self.path.write_text(mine)
        except OSError as err:
            raise (disk_error(self.path, err) or err) from None
        time.sleep(0.1)   # a run that wrote in the same instant: one of the two reads the other's back
        if self._contents() != mine:
            raise UserError(f"Output folder {self.path.parent} is being locked by another run (lock file "
                            f"{self.path}); use another --output folder.")
        self.by_contents = True

    def _contents(self) -> str:
        try:
            return self.path.read_text(errors="replace")
        except OSError:
            return ""

    def _still_at_path(self, fd: int) -> bool:
        try:
            here, there = os.fstat(fd), os.stat(self.path)
        except OSError:
            return False
        return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)

    def release(self) -> None:
        if self.by_contents:
            if self._contents() == _owner_line():
                self.path.unlink(missing_ok=True)
            self.by_contents = False
        if self.fd is not None:
            if self._still_at_path(self.fd):
                self.path.unlink(missing_ok=True)   # before unlocking: see the module docstring
            os.close(self.fd)                        # closing drops the lock
            self.fd = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
