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
