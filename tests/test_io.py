"""utils/io.py: what a path that should be a file or a folder is instead."""
from __future__ import annotations

import os

from utils.io import path_problem


def test_path_problem_says_what_the_path_is(tmp_path):
    folder, file, missing = tmp_path / "d", tmp_path / "f.txt", tmp_path / "none"
    folder.mkdir()
    file.write_text("x")
    os.symlink(missing, tmp_path / "broken")
    os.mkfifo(tmp_path / "fifo")
    assert path_problem(str(folder)) == "is a folder, not a file"
    assert path_problem(str(file), "folder") == "is a file, not a folder"
    assert path_problem(str(missing)) == path_problem(str(missing), "folder") == "does not exist"
    assert path_problem(str(tmp_path / "broken")) == "is a broken symbolic link"
    assert path_problem(str(tmp_path / "fifo")) == "is not a regular file"


def test_atomic_writes_get_the_mode_of_a_plain_open(tmp_path):
    """mkstemp's 0600 survived the rename: results.json, config.json and checkpoints were unreadable
    to the other users of a machine, unlike log.txt."""
    import torch

    from utils.io import _file_mode, save_torch, write_json

    old = os.umask(0o027)
    try:
        assert _file_mode() == 0o640
    finally:
        os.umask(old)
    write_json(tmp_path / "r.json", {"a": 1})
    save_torch(tmp_path / "c.pt", {"a": torch.ones(1)})
    with open(tmp_path / "plain.txt", "w"):
        pass
    expect = os.stat(tmp_path / "plain.txt").st_mode & 0o777
    assert os.stat(tmp_path / "r.json").st_mode & 0o777 == expect
    assert os.stat(tmp_path / "c.pt").st_mode & 0o777 == expect
