"""Errors caused by the user's input (config, data on disk, CLI).

``main.py`` turns any :class:`UserError` into a one-paragraph message and exit status 2;
anything else is a bug and exits 1 with a traceback.
"""


class UserError(Exception):
    """Bad input that the user can fix; the message names the key/path and what is allowed."""


class ConfigError(UserError):
    """An unknown key, a wrong type or an out-of-range value in the configuration."""


class DataError(UserError):
    """A dataset that is missing, malformed or unreadable on disk."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler preempting the job, a sweep stopping its runs), raised where Ctrl-C's
    KeyboardInterrupt would be, so the run stops the same way: finished phases saved, lock released."""


def interruption_name(err: BaseException) -> str:
    """How a run was interrupted, for its messages: "SIGTERM" or "Ctrl-C"."""
    return "SIGTERM" if isinstance(err, Terminated) else "Ctrl-C"
