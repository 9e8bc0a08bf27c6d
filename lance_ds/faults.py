"""Crash-test hooks: `LANCE_DS_FAULT=<name>:<step>[,<name>:<step>...]` makes a named point of the code fail at that step the way a
real failure would, so tests can prove recovery (tests/dist/test_train.py); `<name>:<seconds>` slows one down. Off
unless the variable is set."""

from __future__ import annotations

import os
import signal


def armed(name: str, step: int) -> bool:
    return f"{name}:{step}" in os.environ.get("LANCE_DS_FAULT", "").split(",")


def kill_if_armed(name: str, step: int) -> None:
    """SIGKILL this process here, as a machine failure would (no cleanup, no exception handlers)."""
    if armed(name, step):
        os.kill(os.getpid(), signal.SIGKILL)


def terminate_if_armed(name: str, step: int) -> None:
    """SIGTERM this process here, as a scheduler's stop arriving at this point would."""
    if armed(name, step):
        os.kill(os.getpid(), signal.SIGTERM)


def seconds_if_armed(name: str) -> float:
    """The seconds `<name>:<seconds>` asks for (0 when not armed): a slow point, e.g. a save longer than a grace."""
    for fault in os.environ.get("LANCE_DS_FAULT", "").split(","):
        if fault.startswith(f"{name}:"):
            return float(fault.split(":", 1)[1])
    return 0.0
