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


class NonFiniteLossError(NamesOptions, FloatingPointError):
    """The training loss or gradient norm was NaN or infinite; no parameter was updated (the
    CLI prints it as one line, exit status 1; "{field}"s as for UsageError)."""
