"""SIGINT (Ctrl-C) and SIGTERM as a request to stop a run, kept until it can stop cleanly.

    with StopSignals(defer=True) as stop:      # the training loop
        while ...:
            train_step()
            if stop.signum is not None:        # stop here: save a checkpoint, then raise
                ...

Deferred (`defer=True`), the first signal only records its number: the loop finishes the step
it is in and stops at the step's boundary, where the model, optimizer and RNG states agree
with the step count, so that a checkpoint saved there resumes exactly. A second SIGINT stops
at once (KeyboardInterrupt). Not deferred, SIGTERM raises `StopRequested` at once, as Ctrl-C
raises KeyboardInterrupt: a run ended by either cleans up what it started. Outside the main
thread (where Python cannot handle signals) nothing is installed.
"""

from __future__ import annotations

import signal
import threading

from fastgpt.errors import StopRequested

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Installs handlers for SIGINT and SIGTERM while entered; restores the earlier ones on
    exit. `signum`: the signal received while deferring (None: none yet)."""

    def __init__(self, defer: bool):
        self.defer = defer
        self.signum: int | None = None
        self._earlier: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._earlier = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._earlier.items():
            signal.signal(signum, handler)
        self._earlier = {}

    def _handle(self, signum: int, frame) -> None:
        if self.defer and self.signum is None:
            self.signum = signum
            return
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise StopRequested(signum, f"stopped by {signal.Signals(signum).name}")
