"""User-facing errors.

Anything raised as an :class:`IWMError` is a problem with the user's input (config, data,
checkpoint, command line), not a bug: the CLI prints its message on one line, without a
traceback, and exits with status 2.
"""


class IWMError(Exception):
    """A problem the user can fix; the message names it and says how."""


class ConfigError(IWMError):
    """A bad configuration key or value."""


class DataError(IWMError):
    """A data set that cannot be found, read or used."""


class CheckpointError(IWMError):
    """A checkpoint that cannot be saved or loaded."""
