"""The errors a user can cause, which `fastgpt` prints as one line and exit status 2.

Library code raises them with the names of Python parameters ("batch_size must be >= 1"); the
command line reports a `ConfigError` with the flags instead ("--batch-size must be >= 1"). Both
are ValueErrors, so code that catches ValueError keeps working.
"""

from __future__ import annotations

import re
from collections.abc import Callable

_PLACEHOLDER = re.compile(r"\{([a-z_][a-z0-9_]*)\}")


class NamesOptions:
    """An error whose message may name options: a "{field_name}" in it reads "field_name" from
    the library and the option's flag from the CLI (`render`)."""

    def __init__(self, message: str):
        self.template = message
        super().__init__(self.render(lambda name: name))

    def render(self, name_of: Callable[[str], str]) -> str:
        """The message with every "{field}" passed through `name_of` (e.g. to a flag)."""
        return _PLACEHOLDER.sub(lambda m: name_of(m.group(1)), self.template)


class UsageError(NamesOptions, ValueError):
    """Bad input: an option, a file, data. The message says what is wrong and where; a
    "{field_name}" in it names an option (the library shows "field_name", the CLI its flag)."""


class ConfigError(UsageError):
    """A bad value of one configuration field, named by `field`; `problem` is the rest of the
    message ("{other_field}" names another field)."""

    def __init__(self, field: str, problem: str):
        self.field = field
        self.problem = problem
        super().__init__(f"{{{field}}} {problem}")


def require(options: object, field: str, ok: bool, what: str) -> None:
    """ConfigError "FIELD must be WHAT, got VALUE" unless ok (VALUE read from `options`)."""
    if not ok:
        raise ConfigError(field, f"must be {what}, got {getattr(options, field)!r}")


class MissingFileError(UsageError, FileNotFoundError):
    """A file the input names is not there: a UsageError that is also a FileNotFoundError."""


class RunFailedError(NamesOptions, RuntimeError):
    """A run failed for a reason outside the code (the CLI prints it as one line, exit status
    1; "{field}"s as for UsageError)."""


class NonFiniteLossError(RunFailedError, FloatingPointError):
    """The training loss or gradient norm was NaN or infinite; no parameter was updated."""


class DiskFullError(RunFailedError):
    """A file could not be written because the disk (or the process's file size limit) is
    full: ENOSPC, EFBIG or EDQUOT, named with the file."""

    def __init__(self, path: object, reason: str):
        self.path = path
        super().__init__(f"disk full: cannot write {path} ({reason}); free some space")


class StopRequested(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped a run: `message` says where (the CLI prints it as one line),
    `exit_status` is 128 + the signal's number, as a shell reports a process it ended."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.exit_status = 128 + signum
