"""Token-budget packing, collate to PackedBatch, placeholders for missing branches."""

from __future__ import annotations

import random

import pytest
import torch

from lance_ds.data.batch import AttnMode
from lance_ds.data.packing import (Branches, OverlongSampleError, TokenBudgetPacker, build_micro_batch, check_length,
                                   collate)
from lance_ds.data.sequence import FrameCut, SequencePlan, SequencePlanner, VaeBlock, VisionGeometry, VitBlock
from lance_ds.data.tokenizer import load_tokenizer


def text_plan(n: int, key: str = "", ce: int = 0) -> SequencePlan:
    """A causal text-only plan of n tokens whose last `ce` tokens are CE targets."""
    ids = torch.arange(n) % 100 + 1
    return SequencePlan(task="i2t", input_ids=ids, position_ids=torch.arange(n).expand(3, -1).clone(),
                        split_lens=[n], split_modes=[AttnMode.CAUSAL],
                        ce_positions=torch.arange(n - ce - 1, n - 1), ce_targets=ids[n - ce:], key=key)


@pytest.fixture(scope="module")
def planner():
    return SequencePlanner(load_tokenizer(None), VisionGeometry())


def test_first_fit_fills_sequences_and_loses_nothing():
    rng = random.Random(0)
    sizes = [rng.randint(40, 700) for _ in range(2000)]
    packer = TokenBudgetPacker(2048, buffer_size=64)
    sequences, fed = [], iter(enumerate(sizes))
    for i, n in fed:
        packer.add(text_plan(n, key=str(i)))
        while packer.ready():
            sequences.append(packer.pop_sequence())
    while packer.buffer:
        sequences.append(packer.pop_sequence())
    keys = [p.key for seq in sequences for p in seq]
    assert sorted(keys, key=int) == [str(i) for i in range(len(sizes))]  # every plan exactly once
    assert all(sum(p.num_tokens for p in seq) <= 2048 for seq in sequences)
    steady = sequences[:-10]  # the drained tail is not representative
    efficiency = sum(p.num_tokens for s in steady for p in s) / (2048 * len(steady))
    assert efficiency >= 0.95, efficiency


def test_first_fit_beats_next_fit_and_padded_batches():
    rng = random.Random(1)
    sizes = [rng.choice([60, 90, 300, 800]) for _ in range(1500)]

    def efficiency(strategy):
        packer = TokenBudgetPacker(2048, buffer_size=64, strategy=strategy)
        used = total = 0
        for n in sizes:
            packer.add(text_plan(n))
            if packer.ready():
                seq = packer.pop_sequence()
                used, total = used + sum(p.num_tokens for p in seq), total + 2048
        return used / total

    padded = sum(sizes) / sum(8 * max(sizes[i:i + 8]) for i in range(0, len(sizes), 8))  # batches of 8, padded
    first, nxt = efficiency("first_fit"), efficiency("next_fit")
    assert first >= 0.95 and first > nxt and first > padded + 0.2, (first, nxt, padded)


def test_oldest_plan_always_leaves_first():
    packer = TokenBudgetPacker(100, buffer_size=3)
    for n, key in [(90, "a"), (20, "b"), (15, "c")]:
        packer.add(text_plan(n, key))
    assert [p.key for p in packer.pop_sequence()] == ["a"]
    assert [p.key for p in packer.pop_sequence()] == ["b", "c"]


def test_overlong_is_counted_or_refused():
    plan = text_plan(300, key="long")
    assert check_length(plan, 300, filter_overlong=False)
    assert not check_length(plan, 200, filter_overlong=True)
    with pytest.raises(OverlongSampleError, match="data.filter_overlong=true"):
        check_length(plan, 200, filter_overlong=False)


def test_collate_offsets_splits_and_padding(planner):
    a, b = text_plan(5, ce=2), text_plan(7, ce=3)
    b.vit = [VitBlock(FrameCut(None, 2, 28, 28), VisionGeometry(), (1, 2, 2), torch.tensor([3]))]
    b.vae = [VaeBlock(FrameCut(None, 1, 16, 16), (1, 1, 1), torch.tensor([4]), True, 1.0)]
    batch = collate([a, b], pad_to=16, pad_id=planner.special.pad)
    assert batch.num_tokens == 16 and batch.num_real_tokens == 12
    assert batch.attended_pairs == 5 * 5 + 7 * 7  # each sample attends within itself; padding is no work
    assert batch.sample_ids.tolist() == [0] * 5 + [1] * 7 + [2] * 4 and batch.tasks == ["i2t", "i2t", "pad"]
    assert batch.split_ids.tolist() == [0] * 5 + [1] * 7 + [2] * 4
    assert batch.ce_indexes.tolist() == [2, 3, 5 + 3, 5 + 4, 5 + 5]
    assert torch.equal(batch.input_ids[batch.ce_indexes + 1], batch.ce_targets)
    assert batch.vit_indexes.tolist() == [8] and batch.vae_indexes.tolist() == [9]
    assert batch.vae_coords.tolist() == [[0, 0, 0]] and batch.vae_is_target.tolist() == [True]
    assert batch.input_ids[12:].eq(planner.special.pad).all() and batch.position_ids[:, 12:].tolist()[0] == [0, 1, 2, 3]


def test_pin_memory_pins_every_tensor_of_a_batch(planner, monkeypatch):
    """DataLoader(pin_memory=True) on a GPU host calls PackedBatch.pin_memory (CPU torch cannot pin: the call is
    stood in for by a copy that counts)."""
    a, b = text_plan(5, ce=2), text_plan(7, ce=3)
    b.vae = [VaeBlock(FrameCut(None, 1, 16, 16), (1, 1, 1), torch.tensor([4]), True, 1.0)]
    batch = collate([a, b], pad_to=16, pad_id=planner.special.pad)
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: pinned.append(t) or t.clone())
    out = batch.pin_memory()
    tensors = [v for v in vars(batch).values() if torch.is_tensor(v)] + batch.vae_pixels
    assert len(pinned) == len(tensors) and all(any(t is p for p in pinned) for t in tensors)
    assert torch.equal(out.input_ids, batch.input_ids) and out.input_ids is not batch.input_ids
    assert out.tasks == batch.tasks and out.num_real_tokens == batch.num_real_tokens


@pytest.mark.parametrize("has_vit,has_target,has_ce", [(False, False, False), (True, False, False),
                                                       (False, True, True), (True, True, True)])
def test_placeholder_added_exactly_for_missing_branches(planner, has_vit, has_target, has_ce):
    plan = text_plan(10, ce=2 if has_ce else 0)
    if has_vit:
        plan.vit = [VitBlock(FrameCut(None, 2, 28, 28), VisionGeometry(), (1, 2, 2), torch.tensor([3]))]
    if has_target:
        plan.vae = [VaeBlock(FrameCut(None, 1, 16, 16), (1, 1, 1), torch.tensor([4]), True, 1.0)]
    batch = build_micro_batch([[plan]], planner, Branches(), packing_length=64)
    needs = not (has_vit and has_target and has_ce)
    assert ("placeholder" in batch.tasks) == needs
    # one block of each branch: the plan's, or the placeholder's for those it lacks (no more)
    assert batch.vit_grid_thw.shape[0] == 1 and batch.vae_grid_thw.shape[0] == 1 and bool(batch.vae_is_target.any())
    assert batch.ce_targets.numel() == (2 if has_ce else 1)
    assert batch.num_tokens == 64 and batch.num_real_tokens == 10 and batch.attended_pairs == 10 * 10  # (not the
    # placeholder's)
    # the placeholder carries no loss: its CE weights and VAE weights are 0, real ones keep 1
    assert batch.ce_weights.sum().item() == (2 if has_ce else 0)
    assert batch.vae_weights.sum().item() == (1.0 if has_target else 0.0)
    # a branch that is not trained needs no placeholder
    assert "placeholder" not in build_micro_batch([[plan]], planner, Branches(False, False, False), 64).tasks


def test_placeholder_grows_the_batch_only_when_there_is_no_padding_room(planner):
    batch = build_micro_batch([[text_plan(64)]], planner, Branches(), packing_length=64)
    placeholder = planner.placeholder(vit=True, vae=True, ce=True)
    assert batch.num_tokens == 64 + placeholder.num_tokens and batch.tasks == ["i2t", "placeholder"]
