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
