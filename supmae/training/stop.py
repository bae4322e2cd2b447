"""A run asked to stop (SIGTERM from a scheduler, Ctrl-C) finishes its step, checkpoints and exits 0.

The handler only records the request; the loop asks `requested()` between steps. A second Ctrl-C
stops at once, for a user who does not want to wait for the checkpoint.
"""
import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequests:
    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def requested(self) -> bool:
        return self.signal is not None
