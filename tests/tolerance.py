"""The one tolerance rule every numerical test uses: it lives in the package, in
fastgpt/selftest/tolerance.py (so that `fastgpt selftest` applies the very same rule on a GPU),
and is re-exported here for the tests. See that module for the rule itself."""

from fastgpt.selftest.tolerance import (
    FLOOR_ULPS,
    K_BACKWARD,
    K_FORWARD,
    assert_close_to_reference,
    max_abs_error,
)

__all__ = ["FLOOR_ULPS", "K_BACKWARD", "K_FORWARD", "assert_close_to_reference", "max_abs_error"]
