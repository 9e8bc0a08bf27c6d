"""The data position of a run resumed on another number of loader slots (ranks x data.num_workers).

A saved position is per slot (stream.py): each slot reads its own share of each group's shards, so positions do
not carry over to another split. What carries over is what has not been trained yet:
  - the samples the old slots had read but not trained (their shuffle and packing buffers), dealt round-robin into
    the new slots' shuffle buffers (re-read by address as at any resume; a buffer dealt more than its size is drawn
    down to it first), up to twice a slot's usual buffers; any more become one-sample pieces, in shard order;
  - as pieces, per group: the rest of each old slot's share of its current epoch (the shard it was in from its next
    sample on, then its remaining shards), its whole share of any later epoch another slot had already started, and
    the pieces an earlier reshard left unread.
The pieces are dealt round-robin to the new slots (those of one shard together), which read them first, then start
the epoch after the furthest one begun, split the new way. With a shard-level split (a group with at least as many
shards as the old slots), every sample of the interrupted epoch is trained once: none twice, none skipped. With a
sample-level split (fewer shards than old slots, all slots read every shard) the slots' positions cannot be told
apart sample by sample: the rest of the stream is taken from the slot furthest behind, so up to the slots' lag is
trained twice.
The run's counters (samples, tokens, skips) go to the first new slot, so that their sums over ranks carry on.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict

from .stream import DataError, GroupCursor, GroupReader, SkipCounter, SlotStream, StreamSpec

_TOTALS = ("num_batches", "num_samples", "real_tokens", "total_tokens")


def old_slot_states(rank_states: list[dict], fingerprint: str) -> list[dict | None]:
    """The slot positions of a checkpoint's ranks (their data.json, in rank order), slot by slot."""
    slots: list[dict | None] = []
    for rank, state in enumerate(rank_states):
        if state.get("fingerprint") != fingerprint:
            raise DataError(f"rank {rank}'s saved data position is for another dataset, train.seed or packing "
                            "setting: resume with the dataset YAML and data settings of the checkpoint, or start a "
                            "new output_dir")
        slots.extend(state["workers"])
    return slots


def resharded(old: list[dict | None], spec: StreamSpec, new_slots: int) -> list[dict]:
    """The positions of `new_slots` slots that go on from the old slots' positions (None: a slot that had not
    produced a trained batch, still at the start)."""
    new = [SlotStream(spec, slot, new_slots).state() for slot in range(new_slots)]  # (opens nothing)
    buffered = [address for state in old if state for address in state["shuffle_buffer"] + state["packing_buffer"]]
    room = new_slots * 2 * (spec.data.shuffle_buffer + spec.data.packing_buffer)  # (memory: a slot's usual twice)
    for slot, state in enumerate(new):
        state["shuffle_buffer"] = buffered[:room][slot::new_slots]
    for group in spec.groups:
        cursors = [GroupCursor.from_state(state["groups"][group.name] if state else {}) for state in old]
        overflow = sorted([epoch, shard, offset, 1] for name, shard, offset, epoch, _ in buffered[room:]
                          if name == group.name)
        pieces = overflow + [list(p) for c in cursors for p in c.pieces] + _unread(group, cursors, spec.seed)
        dealt = _deal(pieces, new_slots)
        furthest = max(c.epoch for c in cursors)
        trained = max((s["trained_epoch"].get(group.name, 0) for s in old if s), default=0)
        for slot, state in enumerate(new):
            state["groups"][group.name] = asdict(GroupCursor(epoch=furthest + 1, pieces=dealt[slot]))
            state["trained_epoch"][group.name] = trained
    done = [state for state in old if state]
    for key in _TOTALS:
        new[0][key] = sum(state[key] for state in done)
    new[0]["skipped"] = dict(sum((Counter(state["skipped"]) for state in done), Counter()))
    return new


def _deal(pieces: list[list[int]], num_slots: int) -> list[list[list[int]]]:
    """The pieces dealt round-robin to the slots, a run of pieces of one shard (and epoch) as one: the slot reads the
    run in one pass (a pipe: shard streamed once, not once per piece)."""
    dealt: list[list[list[int]]] = [[] for _ in range(num_slots)]
    slot = -1
    for i, piece in enumerate(pieces):
        if i == 0 or piece[:2] != pieces[i - 1][:2]:
            slot = (slot + 1) % num_slots
        dealt[slot].append(piece)
    return dealt


def _unread(group, cursors: list[GroupCursor], seed: int) -> list[list[int]]:
    """Pieces of the shards the old slots had not read, up to the end of the furthest epoch begun."""
    whole = GroupReader(group, 0, 1, seed, SkipCounter())  # one slot's units: an epoch's whole shard order
    orders: dict[int, list[int]] = {}

    def order(epoch: int) -> list[int]:  # (each epoch shuffled once, not once per old slot)
        if epoch not in orders:
            orders[epoch] = list(whole.units(epoch))
        return orders[epoch]

    num_slots, furthest = len(cursors), max(c.epoch for c in cursors)
    if len(group.shards) < num_slots:  # a sample-level split: every slot read the same stream; from the one behind
        behind = min(cursors, key=lambda c: (c.epoch, c.unit, c.offset))
        return _rest(order, behind, furthest)
    return [piece for slot, cursor in enumerate(cursors)
            for piece in _rest(lambda epoch, slot=slot: order(epoch)[slot::num_slots], cursor, furthest)]


def _rest(units, cursor: GroupCursor, furthest: int) -> list[list[int]]:
    """The shards a slot whose epochs' shards are `units(epoch)` had still to read from `cursor` to the end of epoch
    `furthest`."""
    pieces = [[cursor.epoch, shard, cursor.offset if i == 0 else 0, -1]
              for i, shard in enumerate(units(cursor.epoch)[cursor.unit:])]
    for epoch in range(cursor.epoch + 1, furthest + 1):
        pieces += [[epoch, shard, 0, -1] for shard in units(epoch)]
    return pieces

