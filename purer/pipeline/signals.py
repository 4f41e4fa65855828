"""Stopping a run without losing it: Ctrl-C, and the signals clusters send before they kill a job.

SLURM (preemption, time limits) and Kubernetes (eviction) send SIGTERM and kill a few
seconds to minutes later; some schedulers warn with SIGUSR1 first.  Within
:class:`StopSignals`, SIGINT, SIGTERM and SIGUSR1 only set :attr:`StopSignals.requested`;
the run honours the request at its next safe point (between meta-iterations: a
checkpoint is written; between meta-test rows: the finished rows are kept) and ends
with :class:`Stopped`, so ``--resume`` continues where it stopped.  A second Ctrl-C
interrupts at once.
"""
from __future__ import annotations

import signal
import threading

WATCHED = ("SIGINT", "SIGTERM", "SIGUSR1")


class Stopped(KeyboardInterrupt):
    """The run stopped at a safe point on a signal; its work so far is saved (continue with ``--resume``)."""

    def __init__(self, signame: str):
        super().__init__(signame)
        self.signame = signame


class StopSignals:
    """Within the block, :data:`WATCHED` signals set :attr:`requested` (the signal's name) instead of killing.

    A KeyboardInterrupt in the middle of a meta-iteration would leave the bank one
    inversion step ahead of the iteration counter, so a checkpoint written then would
    resume into a different run; the loop asks :meth:`check` between iterations.
    Handlers live in the main thread; signals a caller ignores (a background job's
    SIGINT) stay ignored; the previous handlers come back when the block ends.
    """

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.requested == "SIGINT":
            raise KeyboardInterrupt  # the second Ctrl-C: at once
        self.requested = self.requested or signal.Signals(signum).name

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():
            return self
        for name in WATCHED:
            sig = getattr(signal, name, None)
            if sig is None:
                continue
            previous = signal.getsignal(sig)
            if previous is signal.SIG_IGN:
                continue
            self._previous[sig] = previous
            signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, signal.default_int_handler if previous is None else previous)
        self._previous = {}

    def check(self, stop: bool | None = None) -> None:
        """Raise :class:`Stopped` if a stop was requested (or ``stop`` says so, e.g. gathered over processes)."""
        if stop if stop is not None else self.requested:
            raise Stopped(self.requested or "another process")
