"""The process group, when there is one: code that runs alike in one process (tests, tools) and under the launcher
asks here instead of guarding every collective."""

from __future__ import annotations

from typing import Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Ranks in the process group; 1 without one."""
    return dist.get_world_size() if initialized() else 1


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


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """`values` (a detached copy) summed over every rank; every rank must call it with the same shape."""
    values = values.detach().clone()
    if world_size() > 1:
        dist.all_reduce(values)
    return values


def max_over_ranks(value: float, device: torch.device) -> float:
    """The largest of every rank's `value`; every rank must call it. `value` itself in one process."""
    if world_size() == 1:
        return value
    largest = torch.tensor([float(value)], device=device)
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    return largest.item()


def until_every_rank_is_done(items: Iterator[T], filler: Callable[[], T], device: torch.device) -> Iterator[T]:
    """`items`, then `filler()`s until every rank's items have run out: as many on every rank, whatever one rank
    has (under ZeRO-3 each forward pass gathers parameters with every rank: a rank with one pass fewer hangs the
    others). One all-reduce per item; every rank must call it."""
    if world_size() == 1:
        yield from items
        return
    while True:
        item = next(items, None)
        if not max_over_ranks(item is not None, device):
            return
        yield item if item is not None else filler()
