"""Errors caused by the user's input (config, data on disk, CLI), and how a run is interrupted.

``main.py`` turns any :class:`UserError` into a one-paragraph message and exit status 2;
anything else is a bug and exits 1 with a traceback.
"""
from __future__ import annotations

import threading


class UserError(Exception):
    """Bad input that the user can fix; the message names the key/path and what is allowed."""


class ConfigError(UserError):
    """An unknown key, a wrong type or an out-of-range value in the configuration."""


class DataError(UserError):
    """A dataset that is missing, malformed or unreadable on disk."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler preempting the job, a sweep stopping its runs), raised where Ctrl-C's
    KeyboardInterrupt would be, so the run stops the same way: finished phases saved, lock released."""


# Set by main.py's SIGTERM handler before it raises Terminated. The exception alone is not enough:
# raised while the main thread runs a finalizer (a DataLoader iterator's __del__ joining its
# workers), Python prints it and carries on; and a scheduler that signals every process (SLURM) also
# ends the loader's workers, whose death the loader reports as its own RuntimeError, which can arrive
# first. So the run also stops wherever it next looks at this flag (every training step:
# raise_if_terminated), an error raised once it is set is taken for the interruption, and main.py
# keeps the exceptions finalizers meet after it off stderr (the run is being torn down then).
TERMINATION = threading.Event()


def raise_if_terminated() -> None:
    """Raise Terminated if SIGTERM arrived and its exception was lost in a finalizer."""
    if TERMINATION.is_set():
        raise Terminated()


def interruption_of(err: BaseException) -> str | None:
    """How ``err`` interrupts a run, for its messages and exit status: "SIGTERM" (Terminated, or any
    error once SIGTERM has arrived: see TERMINATION), "Ctrl-C" (KeyboardInterrupt), or None for an
    error of its own."""
    if isinstance(err, Terminated) or TERMINATION.is_set():
        return "SIGTERM"
    return "Ctrl-C" if isinstance(err, KeyboardInterrupt) else None
