"""utils/run_lock.py: one run per output folder, decided by the kernel's flock, not by a pid."""
from __future__ import annotations

import multiprocessing as mp
import os
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


def _race(folder, delay, start, results):
    lock = RunLock(folder, notice=lambda message: time.sleep(delay))
    start.wait()
    try:
        lock.acquire()
        results.put("held")
        time.sleep(1.5)
        lock.release()
    except UserError:
        results.put("refused")


def test_two_runs_finding_a_stale_lock_at_once_do_not_both_take_it(tmp_path):
    """Read-decide-unlink let both take over a stale lock when one was delayed between its check and
    the unlink (here: in its notice)."""
    (tmp_path / LOCK_NAME).write_text("999999\n")
    spawn = mp.get_context("spawn")
    results, start = spawn.Queue(), spawn.Barrier(2)
    procs = [spawn.Process(target=_race, args=(tmp_path, delay, start, results)) for delay in (0.5, 0.0)]
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
    with pytest.raises(UserError, match=rf"{tmp_path / LOCK_NAME} cannot be opened \(Is a directory\)"):
        RunLock(tmp_path).acquire()
