"""Grouping work into pieces of bounded size (prompts per forward, EMA tensors per multi-tensor call)."""

from __future__ import annotations


def budget_chunks(sizes: list[int], budget: int) -> list[list[int]]:
    """Indexes of consecutive items grouped so each group's total size stays within `budget` (a larger item alone)."""
    chunks: list[list[int]] = []
    total = budget + 1
    for i, size in enumerate(sizes):
        if total + size > budget:
            chunks.append([])
            total = 0
        chunks[-1].append(i)
        total += size
    return chunks
