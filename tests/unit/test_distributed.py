"""What ranks agree on, batch by batch, in a real 2-process gloo group: under ZeRO-3 a rank that runs one forward
pass fewer than the others, or generates for other prompts, hangs the run."""

import torch

from conftest import on_two_gloo_ranks


def _agree(rank: int):
    from lance_ds.data.stream import DataError
    from lance_ds.distributed import until_every_rank_is_done
    from lance_ds.validation import refuse_other_prompts

    mine = iter(["a", "b", "c"] if rank == 0 else ["x"])  # rank 1 read less (a shard it could not read)
    items = list(until_every_rank_is_done(mine, lambda: "filler", torch.device("cpu")))
    refuse_other_prompts([("g", "k0"), ("g", "k1")])  # the same on both ranks: nothing to refuse
    try:
        refuse_other_prompts([("g", "k0")] if rank == 0 else [("g", "k2")])
        refused = ""
    except DataError as e:
        refused = str(e)
    return items, refused


def test_ranks_go_on_with_fillers_until_every_rank_is_done_and_refuse_other_prompts():
    got = on_two_gloo_ranks(_agree)
    assert got[0][0] == ["a", "b", "c"] and got[1][0] == ["x", "filler", "filler"]
    for rank in range(2):
        assert "validation prompts differ between ranks" in got[rank][1] and "rank 1 read 1" in got[rank][1]
