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


class StorageError(IWMError):
    """Run output (config, metrics) that cannot be written: disk full, permissions."""


class TrainingError(IWMError):
    """Training cannot go on as configured, e.g. the loss keeps coming out NaN/inf."""


class Stopped(Exception):  # noqa: N818 - a request that was honoured, not an error
    """Training stopped on request after writing a checkpoint; ``--resume`` continues it.

    Not an :class:`IWMError`: nothing is wrong. The CLI prints the message (one line) and
    exits with :attr:`exit_code`, which tells the two kinds of stop apart.
    """

    exit_code = 1

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step
        """The step the checkpoint holds."""


class Preempted(Stopped):
    """Training stopped on SIGTERM/SIGUSR1 after writing a checkpoint.

    Exit status :attr:`exit_code` 75 (``EX_TEMPFAIL`` of sysexits.h, "try again later"),
    so a requeue script can tell "preempted: requeue, ``--resume`` continues" from a
    failure (1, 2) and from a user's Ctrl-C (:class:`Interrupted`, 130).
    """

    exit_code = 75


class Interrupted(Stopped):
    """Training stopped on Ctrl-C (SIGINT) after writing a checkpoint.

    Exit status :attr:`exit_code` 130 (128 + SIGINT, what a shell reports for Ctrl-C), not
    75: the user stopped the run, a requeue script must not start it again.
    """

    exit_code = 130
