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


def test_an_output_folder_blocked_by_a_file_or_a_broken_link_is_refused(tmp_path):
    """check_writable_dir (main.py's and report.py's --output, sweep.py's root) names what is in the
    way. A broken symbolic link at the path passed it before, and the run failed when it first wrote."""
    import pytest

    from utils.errors import UserError
    from utils.io import check_writable_dir, file_in_the_way

    (tmp_path / "afile").write_text("x")
    os.symlink(tmp_path / "gone", tmp_path / "broken")
    assert file_in_the_way(tmp_path / "new" / "deeper") is None
    assert file_in_the_way(tmp_path / "afile" / "sub" / "x") == tmp_path / "afile"
    assert file_in_the_way(tmp_path / "broken") == tmp_path / "broken"
    cases = {tmp_path / "afile": f"--output {tmp_path / 'afile'} is a file, not a folder",
             tmp_path / "afile" / "sub": f"cannot be created: {tmp_path / 'afile'} is a file, not a folder",
             tmp_path / "broken": f"--output {tmp_path / 'broken'} is a broken symbolic link",
             tmp_path / "broken" / "sub": f"cannot be created: {tmp_path / 'broken'} is a broken symbolic link"}
    for path, says in cases.items():
        with pytest.raises(UserError, match=None) as err:
            check_writable_dir(path, "--output")
        assert says in str(err.value)
    check_writable_dir(tmp_path / "new" / "deeper", "--output")
    assert not (tmp_path / "new").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["afile", "broken"]


def test_a_name_too_long_for_the_file_system_is_a_user_error(tmp_path):
    """A 300-byte folder name in --output: Python's exists() raises ENAMETOOLONG, which was a traceback
    (exit 1) from main.py, sweep.py and report.py alike."""
    import pytest

    from utils.errors import UserError
    from utils.io import check_writable_dir

    long = "a" * 300
    with pytest.raises(UserError, match=r"the name a{40}… is 300 bytes, more than the file system allows"):
        check_writable_dir(tmp_path / long / "run", "--output")
