"""Stop requests from the scheduler or the user: SIGTERM, SIGINT and SIGUSR1 set a flag that the trainer agrees on
across ranks at the next step; a second signal aborts at once. Data-loader workers ignore them.

A repeat within ``DUPLICATE_S`` seconds of the first counts as the same request: a scheduler signals the whole
process group and torchrun then forwards the signal to its workers again, which must not abort the save."""

from __future__ import annotations

import os
import signal
import threading
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
DUPLICATE_S = 3.0


class StopSignals:
    """The stop request of this process (``received``: the signal's name, or None)."""

    def __init__(self) -> None:
        self.received: str | None = None
        self.received_at = 0.0
        self._old: dict = {}

    def install(self) -> None:
        """Record SIGTERM, SIGINT and SIGUSR1 (the stop signals) instead of dying; a second one aborts at once."""
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (e.g. a library call in a worker thread)
        for sig in STOP_SIGNALS:
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            if time.monotonic() - self.received_at < DUPLICATE_S:
                return
            os.write(2, f"\n{name} again: aborting at once (the last verified checkpoint is kept)\n".encode())
            os._exit(128 + signum)
        self.received = name
        self.received_at = time.monotonic()
        os.write(
            2,
            f"\n{name} received: stopping after this step with a checkpoint (send it again to abort "
            "at once)\n".encode(),
        )

    def restore(self) -> None:
        """Put the previous handlers back."""
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


def ignore_stop_signals() -> None:
    """For data-loader workers: the main process decides when to stop; a worker must not die first."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
