"""SIGTERM: the notice a scheduler gives before it kills (Kubernetes, Slurm, a spot
instance's shutdown hook, `ray job stop`). Both jobs stop with what they finished
saved, exit 143 (as a process SIGTERM killed), and print the command that continues
them; `cli.run_job` prints it. (Ctrl+C stops the tune job the same way, exit 130.)"""

from __future__ import annotations

import contextlib
import signal
import threading

from fashion_vit.config import FashionVitError

EXIT_PREEMPTED = 128 + signal.SIGTERM  # 143


class Preempted(FashionVitError):
    """The job stopped on SIGTERM (or, for tune, Ctrl+C) with its state saved. `resume`:
    the flags that, added to the same command, continue it (e.g. ["--resume", "--name",
    "fashion-vit-x"]); [] when nothing was started, so that the same command starts it
    again. `exit_code`: 143 for SIGTERM, 130 for Ctrl+C."""

    def __init__(self, message: str, resume: list[str] | None = None, exit_code: int = EXIT_PREEMPTED):
        super().__init__(message)
        self.resume = resume or []
        self.exit_code = exit_code


@contextlib.contextmanager
def on_sigterm(handler):
    """Call handler(signum, frame) on SIGTERM inside the block. Python runs signal
    handlers in the main thread only; elsewhere SIGTERM keeps what it had."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Sigterm(BaseException):
    """What raise_preempted raises, for the job to turn into Preempted. Not an Exception,
    as KeyboardInterrupt is not: library code that catches every Exception to log it
    passes it through instead (Ray Data printed a full stack trace as its own internal
    error when it was one)."""


def raise_preempted(signum, frame) -> None:
    """A SIGTERM handler for work that keeps nothing in flight worth waiting for."""
    raise Sigterm("stopped by SIGTERM")
