"""utils/run_lock.py: one run per output folder, decided by the kernel's flock, not by a pid."""
from __future__ import annotations

import multiprocessing as mp
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO
from utils.errors import UserError
from utils.run_lock import LOCK_NAME, RunLock, holder_of

HOLD = ("import sys, time; from utils.run_lock import RunLock; lock = RunLock(sys.argv[1]); lock.acquire(); "
        "open(lock.path, 'w').write(sys.argv[2]); print('held', flush=True); time.sleep(60)")


def _hold(folder, content: str) -> subprocess.Popen:
    """A process holding ``folder``'s lock, its file rewritten to ``content``."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), content], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def test_a_lock_held_where_its_pid_cannot_be_seen_is_still_refused(tmp_path):
    """Another container or node: the holder's pid means nothing here (999999 does not exist). A
    pid check took such a live lock over as stale, and two runs wrote one folder."""
    holder = _hold(tmp_path, "999999 elsewhere\n")
    try:
        with pytest.raises(UserError, match=r"in use by another run \(pid 999999 on host elsewhere"):
            RunLock(tmp_path).acquire()
        assert holder_of(tmp_path) == "pid 999999 on host elsewhere"
    finally:
        holder.kill()
        holder.wait()
    notes = []
    lock = RunLock(tmp_path, notice=notes.append)
    lock.acquire()     # the kernel dropped the killed holder's lock: free, with a note about the file
    assert notes == [f"note: taking over the stale lock {tmp_path / LOCK_NAME} (of pid 999999 on host elsewhere, "
                     f"which is no longer running)"]
    assert holder_of(tmp_path) == f"pid {os.getpid()} on host {socket.gethostname()}"
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists() and holder_of(tmp_path) is None


def _race(folder, delay, start, refused, results):
    lock = RunLock(folder, notice=lambda message: time.sleep(delay))
    start.wait()
    try:
        lock.acquire()
        results.put("held")
        refused.wait(30)      # hold it until the other one has tried (a bug: both hold, for 30 s)
        lock.release()
    except UserError:
        results.put("refused")
        refused.set()


def test_two_runs_finding_a_stale_lock_at_once_do_not_both_take_it(tmp_path):
    """Read-decide-unlink let both take over a stale lock when one was delayed between its check and
    the unlink (here: in its notice)."""
    (tmp_path / LOCK_NAME).write_text("999999\n")
    spawn = mp.get_context("spawn")
    results, start, refused = spawn.Queue(), spawn.Barrier(2), spawn.Event()
    procs = [spawn.Process(target=_race, args=(tmp_path, delay, start, refused, results)) for delay in (0.5, 0.0)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert sorted(results.get(timeout=5) for _ in procs) == ["held", "refused"]


def test_checking_a_lock_writes_nothing_and_a_folder_in_the_way_is_named(tmp_path):
    lock = RunLock(tmp_path)
    lock.acquire()
    before = (tmp_path / LOCK_NAME).stat()
    holder_of(tmp_path)
    after = (tmp_path / LOCK_NAME).stat()
    assert (before.st_mtime_ns, before.st_size) == (after.st_mtime_ns, after.st_size)
    lock.release()
    (tmp_path / LOCK_NAME).mkdir()
    with pytest.raises(UserError, match=rf"{re.escape(str(tmp_path / LOCK_NAME))} cannot be opened \(Is a directory\)"):
        RunLock(tmp_path).acquire()


def test_without_file_locks_the_lock_falls_back_to_the_pid_and_host_in_the_file(tmp_path, monkeypatch):
    """NFS without lockd, Lustre without -o flock: flock fails with ENOLCK / ENOSYS. The lock used to
    be a pid file that worked there; flock alone gave a traceback."""
    import errno

    import utils.run_lock as run_lock

    real = run_lock.fcntl.flock

    def no_locks(fd, op):
        if op & (run_lock.fcntl.LOCK_EX | run_lock.fcntl.LOCK_SH):
            raise OSError(errno.ENOLCK, "No locks available")
        return real(fd, op)

    monkeypatch.setattr(run_lock.fcntl, "flock", no_locks)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    path = tmp_path / LOCK_NAME
    try:
        for left, refused in ((f"{sleeper.pid} {socket.gethostname()}\n", f"pid {sleeper.pid} on host"),
                              ("123 another-node\n", "pid 123 on host another-node.*delete")):
            path.write_text(left)
            with pytest.raises(UserError, match=rf"in use by another run \({refused}"):
                RunLock(tmp_path, notice=lambda m: None).acquire()
            assert path.read_text() == left and holder_of(tmp_path) is not None
    finally:
        sleeper.kill()
        sleeper.wait()
    path.write_text(f"{sleeper.pid} {socket.gethostname()}\n")      # its process is gone: stale
    assert holder_of(tmp_path) is None
    notes = []
    lock = RunLock(tmp_path, notice=notes.append)
    lock.acquire()
    assert "has no file locks (No locks available)" in notes[0] and "taking over the stale lock" in notes[1]
    assert path.read_text() == f"{os.getpid()} {socket.gethostname()}\n" and lock.held
    lock.release()
    assert not path.exists()


def test_a_lock_that_is_no_regular_file_or_a_full_disk_is_a_user_error(tmp_path, monkeypatch):
    """A FIFO named run.lock ("Illegal seek") and a full disk at the lock's first write were tracebacks
    (exit 1); the README promises exit 2 for a full disk."""
    import errno

    from utils.io import DiskFull

    fifo = tmp_path / "fifo_run"
    fifo.mkdir()
    os.mkfifo(fifo / "run.lock")
    with pytest.raises(UserError, match=r"run.lock is not a regular file"):
        RunLock(fifo).acquire()

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(DiskFull, match=r"The disk is full: could not write .*run.lock"):
        RunLock(tmp_path).acquire()
