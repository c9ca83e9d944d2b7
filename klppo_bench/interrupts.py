"""Ctrl-C stops a command with exit 130, always.

Two ways a ``KeyboardInterrupt`` can fail to stop a Python program, both seen with ``report``
(it then finished and exited 0): it lands in a finalizer (``__del__``, a weakref callback),
where Python prints "Exception ignored in ..." and goes on; or a library's ``except:`` /
``except BaseException`` around an import or a call swallows it. :class:`Interrupts` raises
such an interrupt again in the main thread (10 ms after a finalizer swallowed it; and, for
commands that ask for it, every second until one stops the command), and remembers that
Ctrl-C was pressed, so the command exits 130 even if every interrupt was swallowed.
"""

from __future__ import annotations

import signal
import sys
import threading

RERAISE_EVERY = 1.0
"""Seconds between interrupts raised again while a persistent command still runs."""


class Interrupts:
    """A context manager around a command: installs the SIGINT handler (main thread only) and
    restores the previous handlers on exit. ``persist``: after Ctrl-C, raise the interrupt
    again every :data:`RERAISE_EVERY` seconds until one reaches :meth:`stopped` (for commands
    whose cleanup never needs more than that; a sweep's cleanup ends its workers, so it gets
    one interrupt only)."""

    def __init__(self, persist: bool = False) -> None:
        self.seen = False
        self.persist = persist
        self.done = False
        self._main = threading.current_thread() is threading.main_thread()
        self._saved: dict = {}

    def __enter__(self) -> "Interrupts":
        if self._main:  # signal handlers belong to the main thread
            self._saved = {signal.SIGINT: signal.getsignal(signal.SIGINT),
                           "unraisable": sys.unraisablehook}
            self._saved[signal.SIGALRM] = signal.getsignal(signal.SIGALRM)
            signal.signal(signal.SIGINT, self._on_sigint)
            signal.signal(signal.SIGALRM, self._again)
            sys.unraisablehook = self._unraisable
        return self

    def stopped(self) -> None:
        """The interrupt reached the command's top: raise no more."""
        self.done = True
        if self._main:
            signal.setitimer(signal.ITIMER_REAL, 0)

    def __exit__(self, *exc) -> None:
        self.stopped()
        if self._main:
            sys.unraisablehook = self._saved.pop("unraisable")
            for signum, handler in self._saved.items():
                signal.signal(signum, handler)

    def _on_sigint(self, signum, frame) -> None:
        self.seen = True
        if self.persist and not self.done:
            signal.setitimer(signal.ITIMER_REAL, RERAISE_EVERY, RERAISE_EVERY)
        raise KeyboardInterrupt

    def _again(self, signum, frame) -> None:
        if not self.done:
            raise KeyboardInterrupt

    def _unraisable(self, unraisable) -> None:
        if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
            # raised again in 10 ms, out of this finalizer (a timer, not at once: an exception
            # raised here would be ignored too)
            self.seen = True
            if self._main and not self.done:
                signal.setitimer(signal.ITIMER_REAL, 0.01, RERAISE_EVERY if self.persist else 0)
            return
        self._saved["unraisable"](unraisable)
