"""The process group, when there is one: code that runs alike in one process (tests, tools) and under the launcher
asks here instead of guarding every collective."""

from __future__ import annotations

import torch.distributed as dist


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size(group=None) -> int:
    """Ranks in `group` (the default group when None); 1 without a process group."""
    return dist.get_world_size(group) if initialized() else 1


def rank() -> int:
    return dist.get_rank() if initialized() else 0


REFUSED = "refused"  # what a rank that refused its config says in the first exchange (train.stop_the_others_too)


def every_rank(value) -> list:
    """Every rank's `value` (picklable), by rank; every rank must call it. [value] in one process."""
    if world_size() == 1:
        return [value]
    values = [None] * world_size()
    dist.all_gather_object(values, value)
    return values
