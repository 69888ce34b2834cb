"""Exceptions the CLI turns into one-line messages with exit code 2.

Library code raises these and never exits the process; `dpsynth.cli.main` maps
every `DpsynthError` to `error: <message>` on stderr and exit status 2.
"""


class DpsynthError(Exception):
    """Base class: bad input or a refused operation, reported in one line."""


class BadInput(DpsynthError):
    """A flag or value outside what is allowed (names the value and the allowed range)."""


class DatasetNotFound(DpsynthError):
    """A named dataset whose files are absent; the message says where they must go."""


class RunDirError(DpsynthError):
    """A run directory that is missing, locked, corrupt or from another version."""


class IntegrityError(DpsynthError):
    """An artifact whose sha256 no longer matches the manifest."""


class BudgetExhausted(DpsynthError):
    """The privacy ledger cannot fit the requested mechanism within the target epsilon.
    The message is one line, then the options as indented lines (`privacy.refusal`);
    `shortfall` holds the numbers it was computed from, when a calibration raised it."""

    def __init__(self, message: str, shortfall=None):
        super().__init__(message)
        self.shortfall = shortfall

    @property
    def one_line(self) -> str:
        """The message on one line (for a table cell): the headline, then the options after ';'."""
        return "; ".join(line.strip().removeprefix("- ") for line in str(self).splitlines())


class StorageError(DpsynthError):
    """A file could not be written (full disk, read-only or unwritable location); the previous
    version of the file, if any, is left in place."""


class Interrupted(Exception):
    """Training stopped at a step boundary on request (Ctrl-C) after writing a checkpoint.
    Not a DpsynthError: the CLI reports it with exit status 130, like any interrupted command."""

    def __init__(self, message: str, step: int, total: int):
        super().__init__(message)
        self.step, self.total = step, total


class PeerStopped(Exception):
    """On ranks > 0 of a multi-process run: rank 0 stopped before training (and reported why).
    The CLI exits with status 2 without a message of its own."""
