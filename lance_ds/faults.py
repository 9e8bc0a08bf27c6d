"""Crash-test hooks: `LANCE_DS_FAULT=<name>:<step>[,<name>:<step>...]` makes a named point of the code fail at that step the way a
real failure would, so tests can prove recovery (tests/dist/test_train.py). Off unless the variable is set."""

from __future__ import annotations

import os
import signal


def armed(name: str, step: int) -> bool:
    return f"{name}:{step}" in os.environ.get("LANCE_DS_FAULT", "").split(",")


def kill_if_armed(name: str, step: int) -> None:
    """SIGKILL this process here, as a machine failure would (no cleanup, no exception handlers)."""
    if armed(name, step):
        os.kill(os.getpid(), signal.SIGKILL)
