"""Stopping a run on request: SIGTERM (a scheduler preempting the job, the deepspeed launcher passing a kill on) or
SIGINT (Ctrl-C) ends the run at the next step boundary, with a checkpoint of that step, instead of losing every step
since the last save.

One rank's signal is enough: the deepspeed launcher signals one rank after another (and waits up to 30 s for each to
exit before it kills it), so the ranks agree on stopping with one all-reduce per step and save and exit together.
A second Ctrl-C stops at once (the last complete checkpoint is kept, as after any crash); SIGKILL always does. Data
loader workers ignore both signals: their rank decides when they stop (they exit with it).
"""

from __future__ import annotations

import signal
import threading

import torch

from . import distributed

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequests:
    """Records SIGTERM / SIGINT while installed (main thread only; elsewhere signals keep their handlers)."""

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._request) for signum in STOP_SIGNALS}

    def _request(self, signum: int, frame) -> None:
        # (no printing here: the handler may interrupt a write to the same stream, e.g. the progress bar's)
        if signum == signal.SIGINT and self.signal == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now
        self.signal = self.signal or signum

    def agreed(self, device: torch.device) -> int | None:
        """The signal that stops the run, the same on every rank (a collective: every rank calls it at the same
        step); None: go on."""
        return int(distributed.max_over_ranks(self.signal or 0, device)) or None

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


def ignore_stop_signals() -> None:
    """For data-loader workers: a Ctrl-C reaches every process of the terminal's group and the launcher signals
    whole process trees; a worker killed by either would make PyTorch raise in its rank, mid-save."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
