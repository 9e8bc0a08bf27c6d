"""What ranks agree on, batch by batch, in a real 2-process gloo group: under ZeRO-3 a rank that runs one forward
pass fewer than the others, or generates for other prompts, hangs the run."""

import multiprocessing
import os

import torch

from conftest import free_port


def _rank(rank: int, port: int, results) -> None:
    import torch.distributed as dist

    from lance_ds.data.stream import DataError
    from lance_ds.distributed import until_every_rank_is_done
    from lance_ds.validation import refuse_other_prompts

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        mine = iter(["a", "b", "c"] if rank == 0 else ["x"])  # rank 1 read less (a shard it could not read)
        items = list(until_every_rank_is_done(mine, lambda: "filler", torch.device("cpu")))
        refuse_other_prompts([("g", "k0"), ("g", "k1")])  # the same on both ranks: nothing to refuse
        try:
            refuse_other_prompts([("g", "k0")] if rank == 0 else [("g", "k2")])
            refused = ""
        except DataError as e:
            refused = str(e)
        results.put((rank, items, refused))
    finally:
        dist.destroy_process_group()


def test_ranks_go_on_with_fillers_until_every_rank_is_done_and_refuse_other_prompts():
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    port = free_port()
    procs = [context.Process(target=_rank, args=(r, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    got = {rank: (items, refused) for rank, items, refused in (results.get(timeout=60) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs)
    assert got[0][0] == ["a", "b", "c"] and got[1][0] == ["x", "filler", "filler"]
    for rank in range(2):
        assert "validation prompts differ between ranks" in got[rank][1] and "rank 1 read 1" in got[rank][1]
