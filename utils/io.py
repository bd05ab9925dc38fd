"""Atomic file writes: a reader (or a crash) never sees a half-written results or checkpoint file.

Also the checks of an output folder before a run starts (so that a bad path fails before the
dataset is loaded) and the removal of the temporary files a killed write leaves behind.
"""
from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from utils.errors import UserError

TMP_SUFFIX = ".tmp"


class DiskFull(UserError):
    """A write failed because the file system is full (ENOSPC / EDQUOT)."""


def path_problem(path: str, want: str = "file") -> str:
    """Why ``path`` is not the ``want`` ("file" or "folder") a key names, as the end of a sentence
    ("{path} is a folder, not a file."). Call it once ``os.path.isfile`` / ``isdir`` said no."""
    other = "folder" if want == "file" else "file"
    if os.path.isdir(path) if want == "file" else os.path.isfile(path):
        return f"is a {other}, not a {want}"
    if os.path.islink(path) and not os.path.exists(path):
        return "is a broken symbolic link"
    if os.path.exists(path):
        return "is not a regular file" if want == "file" else "is not a folder"
    return "does not exist"


def disk_error(path: Path, err: OSError) -> UserError | None:
    """A UserError for an OSError a user can fix (full disk, read-only file system, no permission)."""
    if err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return DiskFull(f"The disk is full: could not write {path} ({err.strerror}). Free some space "
                        f"(or use another --output folder) and rerun with --resume.")
    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return UserError(f"Cannot write {path}: {err.strerror}. Use another --output folder.")
    if err.errno in (errno.EISDIR, errno.ENOTDIR, errno.EEXIST):
        return UserError(f"Cannot write {path}: {err.strerror} (a folder or file of that name is in the way). "
                         f"Move it, or use another --output folder.")
    return None


def _file_mode() -> int:
    """The mode a plain ``open()`` gives a new file under this process's umask (0o666 & ~umask),
    read once at import: from /proc/self/status on Linux, else by setting and restoring it."""
    try:
        with open("/proc/self/status") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()


def check_entry_kinds(folder: str | Path, files: tuple[str, ...] = (), folders: tuple[str, ...] = ()) -> None:
    """UserError naming the first of ``files`` (``folders``) that exists in ``folder`` as something
    else than a file (a folder): a run would fail on it only when it first writes there."""
    for names, want in ((files, "file"), (folders, "folder")):
        for name in names:
            path = Path(folder) / name
            if (os.path.lexists(path) and not os.path.exists(path)) or \
                    (path.exists() and not (path.is_file() if want == "file" else path.is_dir())):
                raise UserError(f"{path} {path_problem(str(path), want)}, where the run keeps its {name}. "
                                f"Move it, or use another --output folder.")


def write_atomic(path: Path, write) -> None:
    """Write ``path`` through ``write(binary file)`` atomically (a temporary file renamed into place);
    a full disk or a folder that cannot be written is a UserError naming the path."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    except OSError as err:
        raise (disk_error(path, err) or err) from None
    try:
        os.fchmod(fd, FILE_MODE)   # mkstemp's 0600 would keep results from the other users of a machine
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        user = disk_error(path, err) if isinstance(err, OSError) else None
        if user is None and isinstance(err, RuntimeError) and isinstance(err.__cause__ or err.__context__, OSError):
            user = disk_error(path, err.__cause__ or err.__context__)   # torch.save wraps write errors
        if user is not None:
            raise user from None
        raise


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, lambda f: f.write((json.dumps(obj, indent=1) + "\n").encode()))


def save_torch(path: Path, obj: Any) -> None:
    write_atomic(path, lambda f: torch.save(obj, f))


def remove_stale_tmp(folder: Path) -> list[Path]:
    """Delete the temporary files of atomic writes (``.<name>.*.tmp``) that a killed run left in
    ``folder`` and its subfolders; returns them. Only call with the folder's run lock held."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.rglob(f".*{TMP_SUFFIX}") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def _nearest_existing(path: Path) -> Path | None:
    """The nearest of ``path`` and the folders above it that exists (a broken symbolic link counts).
    UserError for a name the file system cannot hold (Python's exists() raises on it)."""
    try:
        return next((p for p in (path, *path.parents) if p.exists() or p.is_symlink()), None)
    except OSError as exc:
        if exc.errno != errno.ENAMETOOLONG:
            raise
        long = max(path.parts, key=lambda part: len(os.fsencode(part)))
        raise UserError(f"{path} cannot be a path here: the name {long[:40]}… is {len(os.fsencode(long))} bytes, "
                        f"more than the file system allows (usually 255), or the whole path is too long.") from None


def file_in_the_way(path: str | Path) -> Path | None:
    """The nearest of ``path`` and the folders above it that exists, if it is not a folder: what
    stops ``path`` from being (made) a folder; else None. Looks only: nothing is created."""
    found = _nearest_existing(Path(path))
    return None if found is None or found.is_dir() else found


def check_writable_dir(path: str | Path, what: str) -> None:
    """Raise UserError naming ``path`` unless it is (or can be created as) a writable folder:
    an existing file, a path under a file, a read-only or permission-denied location are refused.
    Creates nothing (a probe file in the nearest existing folder is removed at once)."""
    path = Path(path)
    blocking = file_in_the_way(path)
    if blocking == path:
        raise UserError(f"{what} {path} {path_problem(str(path), 'folder')}; use another path.")
    if blocking is not None:
        raise UserError(f"{what} {path} cannot be created: {blocking} {path_problem(str(blocking), 'folder')}.")
    existing = _nearest_existing(path) or path   # a folder: file_in_the_way found nothing else
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".write-probe-", suffix=TMP_SUFFIX)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        reason = "the disk is full" if err.errno == errno.ENOSPC else err.strerror
        raise UserError(f"{what} {path} is not writable ({existing}: {reason}); use another path.") from None
