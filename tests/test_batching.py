"""utils/batching.py: how a streamed source is decoded whole (materialize) and in ordered batches (in_order)."""
from __future__ import annotations

import torch

from utils import batching
from utils.batching import MIN_IMAGES_PER_WORKER, loader_split


def test_loader_split_spreads_the_images_over_the_workers_it_starts():
    assert MIN_IMAGES_PER_WORKER == 32
    assert loader_split(20, 16) == (0, 256)            # too few to start a process for
    assert loader_split(63, 16) == (0, 256)            # one worker's worth: this process reads them
    assert loader_split(64, 16) == (2, 32)
    assert loader_split(300, 2) == (2, 150)            # not 256 + 44
    assert loader_split(1300, 16) == (16, 82)          # every worker busy, not 6 of 16
    assert loader_split(100_000, 16) == (16, 256)      # batches stay at most batch_size
    assert loader_split(1300, 0) == (0, 256)
    assert loader_split(0, 8) == (0, 256)


def _files(tmp_path, n: int):
    """A streamed source of n small PNGs, each of its own colour, and its images decoded one by one."""
    from PIL import Image

    from utils.datasets import FileImages

    paths = []
    for i in range(n):
        paths.append(str(tmp_path / f"{i:02d}.png"))
        Image.new("RGB", (10, 8), (i, 255 - i, (7 * i) % 256)).save(paths[-1])
    files = FileImages(paths, 8)
    return files, torch.stack([files[i] for i in range(len(files))])


def _record_loaders(monkeypatch) -> list:
    """(workers, batch sizes) of every DataLoader batching starts from now on."""
    started = []
    real = batching.DataLoader

    def recording(*args, **kwargs):
        started.append((kwargs["num_workers"], [len(b) for b in kwargs["batch_sampler"]]))
        return real(*args, **kwargs)
    monkeypatch.setattr(batching, "DataLoader", recording)
    return started


def test_materialize_decodes_in_order_with_the_workers_of_the_split(tmp_path, monkeypatch):
    files, expected = _files(tmp_path, 70)
    started = _record_loaders(monkeypatch)
    assert torch.equal(batching.materialize(files, num_workers=2), expected)
    assert torch.equal(batching.materialize(batching.select(files, torch.arange(10)), num_workers=2), expected[:10])
    assert started == [(2, [35, 35]), (0, [10])]


def test_rebatch_recuts_the_rows_in_order():
    rows = torch.arange(23)
    parts = [(rows[a:b], -rows[a:b]) for a, b in ((0, 3), (3, 4), (4, 15), (15, 23))]
    out = list(batching.rebatch(iter(parts), 5))
    assert [len(x) for x, _ in out] == [5, 5, 5, 5, 3]
    assert torch.equal(torch.cat([x for x, _ in out]), rows) and all(torch.equal(y, -x) for x, y in out)
    assert [len(x) for x, in batching.rebatch([(rows[:10],)], 5)] == [5, 5]     # exact multiple: no empty tail
    assert [len(x) for x, in batching.rebatch([(rows[:4],)], 5)] == [4]
    assert list(batching.rebatch([], 5)) == []


def test_in_order_gives_the_batches_of_a_plain_pass_whatever_the_workers(tmp_path, monkeypatch):
    """A streamed source is read with its images spread over the workers (two busy, not one: the
    plain pass in batches of 64 would give one worker 64 of 70) and re-cut to the asked batches, so
    a pass computes from the same batches as over the images held in memory."""
    files, expected = _files(tmp_path, 70)
    extra = torch.arange(70) * 10
    started = _record_loaders(monkeypatch)
    for source in (files, expected):
        batches = list(batching.in_order(source, extra, batch_size=64, num_workers=2))
        assert [len(x) for x, _ in batches] == [64, 6]
        assert torch.equal(torch.cat([x for x, _ in batches]), expected)
        assert torch.equal(torch.cat([e for _, e in batches]), extra)
    assert started == [(2, [35, 35])]                                  # the tensor needs no loader
    share = batching.select(files, torch.arange(5, 60))
    assert [len(x) for x, in batching.in_order(share, batch_size=20, num_workers=4)] == [20, 20, 15]
    assert started[1] == (0, [20, 20, 15])                             # 55 images: no process started


class _Failing(torch.utils.data.Dataset):
    """Eight blank images; reading image 5 raises ``error`` (from ``cause``, when given)."""

    def __init__(self, error: Exception, cause: Exception | None = None):
        self.error, self.cause = error, cause

    def __len__(self):
        return 8

    def __getitem__(self, i):
        if i == 5:
            raise self.error from self.cause
        return torch.zeros(3, 2, 2, dtype=torch.uint8)


def test_a_user_error_in_a_loader_worker_keeps_its_own_message():
    """torch re-raises a worker's exception as its type built from the whole formatted traceback
    ("Caught DataError in DataLoader worker process 1. Original Traceback ..."), which main.py
    would print as the user's message: the message is the worker's own again, whatever it was
    raised from (here another DataError, whose header line comes first) and over several lines."""
    import pytest

    from utils.errors import ConfigError, DataError

    message = "Cannot read image /data/x.png (OSError: broken).\nsecond line: utils.errors.DataError: not a header"
    with pytest.raises(DataError) as err:
        list(batching.iterate(_Failing(DataError(message), DataError("the cause")), batch_size=2, num_workers=2))
    assert str(err.value) == message and err.value.__cause__ is None
    with pytest.raises(ConfigError) as err:       # any UserError, its own type
        list(batching.iterate(_Failing(ConfigError("bad key"), ValueError("why")), batch_size=2, num_workers=1))
    assert str(err.value) == "bad key"
    text = None
    try:                                          # not a user error: torch's text, traceback and all
        list(batching.iterate(_Failing(ValueError("a bug")), batch_size=2, num_workers=1))
    except ValueError as bug:
        text = str(bug)
        bug.__traceback__ = None                  # the loader stops now, not 5 s into a later gc
    assert text.startswith("Caught ValueError in DataLoader worker process 0") and "Traceback" in text
    with pytest.raises(DataError) as err:         # raised in this process: untouched, cause kept
        list(batching.iterate(_Failing(DataError(message), OSError("why")), batch_size=2, num_workers=0))
    assert str(err.value) == message and isinstance(err.value.__cause__, OSError)


def test_worker_error_recovers_the_message_from_torchs_text():
    """What torch's wrapper (torch._utils.ExceptionWrapper, as a loader worker uses it) makes of a
    message: empty, over several lines, raised from another exception."""
    import pytest
    from torch._utils import ExceptionWrapper

    from utils.errors import DataError

    def through_a_worker(message, cause=None):
        try:
            raise DataError(message) from cause
        except DataError:
            wrapper = ExceptionWrapper(where="in DataLoader worker process 3")
        with pytest.raises(DataError) as err:
            wrapper.reraise()
        return err.value

    for message in ("", "one line", "two\nlines\n", "utils.errors.DataError: inside"):
        wrapped = through_a_worker(message, DataError("cause"))
        assert str(wrapped).startswith("Caught DataError in DataLoader worker process 3.")
        assert str(batching.worker_error(wrapped)) == message
        assert type(batching.worker_error(wrapped)) is DataError
    plain = DataError("Caught nothing")
    assert batching.worker_error(plain) is plain


def test_loader_workers_leave_the_process_group():
    """A signal to the process group (`timeout`, a terminal's Ctrl-C) must reach the training process
    alone: workers that died under it raced its interruption (tests/test_main.py's process-group test)."""
    import os

    from torch.utils.data import Dataset

    class GroupOfWorker(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.full((3, 1, 1), os.getpgid(0), dtype=torch.int64)

    got = [imgs for imgs, in batching.iterate(GroupOfWorker(), batch_size=2, num_workers=2)]
    assert len(got) == 2 and all(int(v) != os.getpgid(0) for imgs in got for v in imgs.flatten())


def test_the_fd_servers_connection_error_is_dropped_when_a_side_hangs_up(capsys, monkeypatch):
    """multiprocessing's file-descriptor server thread (resource_sharer.py) reports its errors
    through sys.excepthook: "ConnectionResetError" / "BrokenPipeError" was printed after a SIGTERM
    run's one line (tests/test_main.py's process-group test, about 2 runs in 5). The hook of the
    training process and its workers drops those, and prints every other error."""
    import sys

    code = compile("def serve():\n    raise ConnectionResetError(104, 'Connection reset by peer')\n",
                   "/usr/lib/python3/multiprocessing/resource_sharer.py", "exec")
    scope = {}
    exec(code, scope)

    def raised(fn):
        try:
            fn()
        except Exception:
            return sys.exc_info()

    def elsewhere():
        raise BrokenPipeError(32, "Broken pipe")

    assert sys.excepthook is batching._quiet_when_the_parent_hangs_up    # set on import
    monkeypatch.setattr(batching, "_EXCEPTHOOK", sys.__excepthook__)
    batching._quiet_when_the_parent_hangs_up(*raised(scope["serve"]))
    assert capsys.readouterr().err == ""
    batching._quiet_when_the_parent_hangs_up(*raised(elsewhere))
    assert "BrokenPipeError" in capsys.readouterr().err
