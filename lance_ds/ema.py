"""Exponential moving average of the trainable weights that never gathers the model.

Under ZeRO-3 each rank keeps the EMA of its own parameter partitions (`param.ds_tensor`) in fp32, so the EMA costs
4 bytes per parameter divided by the world size, and updating it needs no communication. Below stage 3 every rank
holds full parameters, and keeps the EMA of the same part ZeRO-3 would give it (its chunk of each flattened
parameter, the last one shorter): a full EMA on every rank would be 24 GB per GPU for a 6B model, saved again by
every rank. A checkpoint stores each rank's shard; `consolidate` rebuilds full tensors offline from the shards, the
same way ZeRO-3 partitions a flattened parameter: equal contiguous chunks in rank order, the last one padded.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from .chunks import budget_chunks

PARTITIONED = "partitioned"
_CHUNK_ELEMENTS = 64 << 20  # elements lerped per multi-tensor call (256 MB of fp32)


def _chunk(numel: int, world: int) -> int:
    """Elements per rank when a flattened parameter is split as ZeRO-3 splits it (padded to a multiple of world)."""
    return -(-numel // world)


def _full_shape(p: torch.nn.Parameter) -> list[int]:
    return list(p.ds_shape) if hasattr(p, "ds_shape") else list(p.shape)


class ShardedEMA:
    """EMA shadow of `model`'s trainable parameters, local to this rank."""

    def __init__(self, model: torch.nn.Module, decay: float, rank: int | None = None, world_size: int | None = None):
        from . import distributed

        self.decay = decay
        self.rank = distributed.rank() if rank is None else rank
        self.world = distributed.world_size() if world_size is None else world_size
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.zero3 = any(hasattr(p, "ds_tensor") for p in self.params.values())
        self.partitioned = self.zero3 or self.world > 1
        self.shapes = {n: _full_shape(p) for n, p in self.params.items()}
        self.shadow: dict[str, torch.Tensor] = {}
        self.load_state_dict(None)
        names = list(self.shadow)
        self.chunks = [[names[i] for i in chunk]
                       for chunk in budget_chunks([self.shadow[n].numel() for n in names], _CHUNK_ELEMENTS)]

    @torch.no_grad()
    def update(self) -> None:
        # a few multi-tensor kernels per step, not one lerp per parameter (a 3B model has ~1000 of them); in chunks,
        # so that the fp32 copies of bf16 weights never exist for the whole model at once
        for names in self.chunks:
            torch._foreach_lerp_([self.shadow[n] for n in names], [self._local(n).float() for n in names],
                                 1.0 - self.decay)

    def _local(self, name: str) -> torch.Tensor:
        """This rank's part of a parameter: its ZeRO-3 partition, its chunk of the full one, or all of it alone."""
        p = self.params[name]
        if self.zero3:
            return p.ds_tensor
        if not self.partitioned:
            return p.data
        chunk = _chunk(p.numel(), self.world)
        return p.data.reshape(-1)[self.rank * chunk:(self.rank + 1) * chunk]

    @contextlib.contextmanager
    def applied(self, optimizer=None):
        """The model holds the EMA weights (in its own dtype) inside the block, and exactly its trained ones again
        after it. A collective: every rank enters it. Under ZeRO-3 each rank writes its partitions, between the
        engine's `optimizer` partitioning every parameter and gathering the persistent (never released) ones again,
        as around a checkpoint load; below stage 3 each rank writes its chunk and the chunks are gathered."""
        trained = {n: self._local(n).clone() for n in self.params}
        self._write(self.shadow, optimizer)
        try:
            yield
        finally:
            self._write(trained, optimizer)

    @torch.no_grad()
    def _write(self, parts: dict[str, torch.Tensor], optimizer) -> None:
        if self.zero3 and optimizer is not None:
            optimizer.checkpoint_event_prologue()
        for name, part in parts.items():
            self._local(name).copy_(part)
        if self.zero3 and optimizer is not None:
            optimizer.checkpoint_event_epilogue()
        elif self.partitioned and not self.zero3:
            for name in parts:
                self._gather_chunks(name)

    def _gather_chunks(self, name: str) -> None:
        """Every rank's chunk of a full parameter into everyone's copy of it (below stage 3)."""
        import torch.distributed as dist

        flat = self.params[name].data.view(-1)
        chunk = _chunk(flat.numel(), self.world)
        mine = torch.zeros(chunk, dtype=flat.dtype, device=flat.device)
        own = flat[self.rank * chunk:(self.rank + 1) * chunk]
        mine[:own.numel()] = own
        every = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(every, mine)
        flat.copy_(torch.cat(every)[:flat.numel()])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def metadata(self) -> dict[str, str]:
        return {PARTITIONED: json.dumps(self.partitioned), "shapes": json.dumps(self.shapes)}

    def load_state_dict(self, state: dict[str, torch.Tensor] | None) -> None:
        """Restore a saved shadow; None (a checkpoint saved without EMA: it was turned on at this resume) starts it
        from the current, resumed weights."""
        if state is None:
            self.shadow = {n: self._local(n).detach().float().clone() for n in self.params}
            return
        self._refuse_missing(state)
        for name, value in state.items():
            if name in self.shadow:
                whole = list(value.shape) == self.shapes[name]
                if self.partitioned and not self.zero3 and whole and value.numel() != self.shadow[name].numel():
                    # saved whole by every rank below stage 3 (before the EMA was split there): this rank's chunk
                    start = self.rank * _chunk(value.numel(), self.world)
                    value = value.reshape(-1)[start:start + self.shadow[name].numel()]
                if value.shape != self.shadow[name].shape:
                    raise ValueError(f"EMA shard of {name} has shape {tuple(value.shape)}, expected "
                                     f"{tuple(self.shadow[name].shape)}: resume with the world size it was saved with")
                self.shadow[name].copy_(value)

    def _refuse_missing(self, saved_names) -> None:
        missing = sorted(set(self.shadow) - set(saved_names))
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[:3]}; the checkpoint was "
                           "saved by a different model (check model.* in its config.yaml)")

    def load_repartitioned(self, shard_files: list[Path], rank: int) -> None:
        """Restore from the shards of a checkpoint saved by another number of ranks (given in rank order): this
        rank's part of each parameter, read without building the full tensors (a 7B model's would be 28 GB on every
        rank)."""
        from .model.weights import open_safetensors

        with contextlib.ExitStack() as stack:
            handles = [stack.enter_context(open_safetensors(path)) for path in shard_files]
            shapes = json.loads(handles[0].metadata()["shapes"])  # (below stage 3 each rank saved the whole EMA: the
            # first file holds all of it, and nothing is read past a parameter's real elements)
            self._refuse_missing(handles[0].keys())
            for name, shadow in self.shadow.items():
                flat = shadow.view(-1)
                real = int(torch.Size(shapes[name]).numel())
                start = (rank * flat.numel() if self.zero3 else rank * _chunk(real, self.world) if self.partitioned
                         else 0)
                flat.copy_(_span([h.get_slice(name) for h in handles], start, flat.numel(), real))


def _span(slices, start: int, length: int, real: int) -> torch.Tensor:
    """Elements [start, start + length) of the concatenation of flat tensors given as safetensors slices, reading
    only the slices that overlap; past the `real` elements (the old partitions' padding, or the new ones') zeros."""
    out = torch.zeros(length, dtype=torch.float32)
    offset = 0
    for piece in slices:
        size = int(torch.Size(piece.get_shape()).numel())
        lo, hi = max(start, offset), min(start + length, offset + size, real)
        if lo < hi:
            if len(piece.get_shape()) > 1:  # (a whole tensor, saved below stage 3)
                out[lo - start:hi - start] = piece[:].flatten()[lo - offset:hi - offset]
            else:
                out[lo - start:hi - start] = piece[lo - offset:hi - offset]
        offset += size
    return out


def consolidate(shard_files: list[Path]) -> dict[str, torch.Tensor]:
    """Full fp32 EMA tensors from the per-rank shard files of one checkpoint (given in rank order)."""
    from .model.weights import open_safetensors  # the model package only when needed (not for --check)

    shards = []
    meta = None
    for path in shard_files:
        with open_safetensors(path) as f:
            meta = meta or f.metadata()
            shards.append({k: f.get_tensor(k) for k in f.keys()})
    if not shards:
        return {}
    shapes = json.loads(meta["shapes"])
    if not json.loads(meta[PARTITIONED]):
        return {name: shards[0][name].view(shape) for name, shape in shapes.items()}
    out = {}
    for name, shape in shapes.items():
        numel = int(torch.Size(shape).numel())
        flat = torch.cat([s[name].flatten() for s in shards])
        out[name] = flat[:numel].view(shape).clone()
    return out
