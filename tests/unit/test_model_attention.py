"""The packed attention rule and its backends (sdpa, flex, the flash varlen plan) on CPU."""

from __future__ import annotations

import pytest
import torch

from lance_ds.data.batch import AttnMode
from lance_ds.model.attention import (FlexAttention, PackedLayout, SdpaAttention, VarlenAttention, build_attention,
                                      dense_mask, reference_varlen, varlen_plan)

C, F, N = AttnMode.CAUSAL, AttnMode.FULL, AttnMode.NOISE

# reference/LANCE_FACTS.md: sample lengths [8, 2]; splits [3 causal, 2 full, 2 noise, 1 causal | 2 causal]
REFERENCE_MASK = """
1000000000
1100000000
1110000000
1111100000
1111100000
1111111000
1111111000
1111100100
0000000010
0000000011
"""


def layout_from(samples: list[list[tuple[int, AttnMode]]]) -> PackedLayout:
    """samples: per sample, its splits as (length, mode)."""
    sample_ids, split_ids, modes = [], [], []
    split = 0
    for s, splits in enumerate(samples):
        for length, mode in splits:
            sample_ids += [s] * length
            split_ids += [split] * length
            modes += [int(mode)] * length
            split += 1
    return PackedLayout(torch.tensor(sample_ids), torch.tensor(split_ids), torch.tensor(modes))


def test_reference_mask_exactly():
    layout = layout_from([[(3, C), (2, F), (2, N), (1, C)], [(2, C)]])
    mask = dense_mask(layout.sample_ids, layout.split_ids, layout.attn_modes)
    expected = torch.tensor([[c == "1" for c in row] for row in REFERENCE_MASK.split()])
    assert torch.equal(mask, expected), "\n" + "\n".join("".join("1" if v else "0" for v in row) for row in mask.tolist())


# a packed sequence with every kind of neighbourhood: t2i, an edit (full vit, full clean source, noise target),
# two noise splits in one sample, a pure text sample and a padding sample
MIXED = [
    [(5, C), (4, N), (1, C)],
    [(3, C), (6, F), (4, F), (3, C), (8, N), (2, C)],
    [(2, C), (3, N), (2, C), (5, N), (1, C)],
    [(7, C)],
    [(9, C)],
]


def reference_attention(q, k, v, layout):
    """Softmax over the dense whole-sequence mask, written out (no SDPA): the ground truth."""
    mask = dense_mask(layout.sample_ids, layout.split_ids, layout.attn_modes)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def random_qkv(num_tokens: int, heads: int = 4, kv_heads: int = 2, dim: int = 16, grad: bool = False):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(num_tokens, h, dim, generator=g, dtype=torch.float64) for h in (heads, kv_heads, kv_heads))
    return [x.requires_grad_(grad) for x in (q, k, v)]


@pytest.mark.parametrize("backend", ["sdpa", "varlen", "flex"])
def test_backends_match_the_rule(backend):
    layout = layout_from(MIXED)
    grad = backend != "flex"  # flex has no CPU backward; its forward is checked here
    q, k, v = random_qkv(layout.num_tokens, grad=grad)
    if backend == "sdpa":
        attend = SdpaAttention(layout)
    elif backend == "varlen":
        attend = VarlenAttention(layout, kernel=reference_varlen)
    else:
        attend = FlexAttention(layout)
        q, k, v = (x.float() for x in (q, k, v))
    out = attend(q, k, v)
    ref = reference_attention(*(x.detach().double().requires_grad_(grad) for x in (q, k, v)), layout)
    tol = 1e-10 if q.dtype == torch.float64 else 1e-5
    assert (out.double() - ref).abs().max().item() < tol
    if grad:
        qr, kr, vr = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
        w = torch.randn_like(ref)
        (reference_attention(qr, kr, vr, layout) * w).sum().backward()
        (out * w).sum().backward()
        for a, b in ((q, qr), (k, kr), (v, vr)):
            assert (a.grad - b.grad).abs().max().item() < 1e-10


def long_layout(seed: int) -> PackedLayout:
    """~1000 tokens of random samples (text, vision, noise splits) and a padding tail: many 32-token blocks of every
    kind (empty, full, partial), the last one cut short."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(9):
        splits = [(int(torch.randint(1, 40, (1,), generator=g)), C)]
        for _ in range(int(torch.randint(0, 4, (1,), generator=g))):
            splits += [(int(torch.randint(1, 60, (1,), generator=g)), (F, N)[int(torch.randint(2, (1,), generator=g))]),
                       (int(torch.randint(1, 20, (1,), generator=g)), C)]
        samples.append(splits)
    return layout_from(samples + [[(37, C)]])


@pytest.mark.parametrize("seed", [0, 1])
def test_flex_block_mask_equals_torchs_built_a_chunk_at_a_time(seed, monkeypatch):
    """rule_block_mask walks query blocks a few at a time (create_block_mask holds L x L tensors at once); its tiles,
    their order and the mask they spell must be create_block_mask's."""
    from torch.nn.attention.flex_attention import create_block_mask

    from lance_ds.model import attention

    layout = long_layout(seed)
    monkeypatch.setattr(attention, "_MASK_CHUNK", 3 * 32 * 1024)  # a few query blocks per chunk
    ours = attention.rule_block_mask(layout, block=32)
    theirs = create_block_mask(ours.mask_mod, B=None, H=None, Q_LEN=layout.num_tokens, KV_LEN=layout.num_tokens,
                               BLOCK_SIZE=32)
    assert ours.kv_num_blocks.shape == theirs.kv_num_blocks.shape and ours.kv_num_blocks.shape[-1] > 10
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks",
                 "q_indices", "full_q_num_blocks", "full_q_indices"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
    assert 0 < int(ours.full_kv_num_blocks.sum()) and 0 < int(ours.kv_num_blocks.sum())  # both kinds of tile
    n = layout.num_tokens
    rule = dense_mask(layout.sample_ids, layout.split_ids, layout.attn_modes)
    assert not (ours.to_dense()[0, 0].repeat_interleave(32, 0).repeat_interleave(32, 1)[:n, :n] < rule).any()


def test_flex_attends_by_the_rule_over_many_blocks():
    layout = long_layout(2)
    q, k, v = (x.float() for x in random_qkv(layout.num_tokens))
    out = FlexAttention(layout)(q, k, v)
    assert (out.double() - reference_attention(q.double(), k.double(), v.double(), layout)).abs().max() < 1e-5


def test_repeated_kv_heads_attend_as_grouped_query_heads():
    """On CUDA a masked call repeats each key/value head for its query heads (SDPA has no fused masked GQA kernel
    there); the result must be what grouped-query attention gives."""
    from lance_ds.model.attention import _sdpa

    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(7, 6, 8, generator=g), torch.randn(7, 2, 8, generator=g), torch.randn(7, 2, 8, generator=g)
    mask = torch.rand(7, 7, generator=g) > 0.3
    mask.fill_diagonal_(True)
    grouped = _sdpa(q, k, v, mask, repeat_kv=False)
    assert torch.allclose(_sdpa(q, k, v, mask, repeat_kv=True), grouped, atol=1e-6)
    by_hand = [_sdpa(q[:, h:h + 1], k[:, h // 3:h // 3 + 1], v[:, h // 3:h // 3 + 1], mask) for h in range(6)]
    assert torch.allclose(torch.cat(by_hand, dim=1), grouped, atol=1e-6)  # query head h reads kv head h // 3


def test_varlen_plan_segments():
    """Consecutive causal splits merge; every segment's keys are the visible prefix, then itself."""
    layout = layout_from([[(3, C), (2, F), (2, N), (1, C)], [(2, C)]])
    causal, bidir = varlen_plan(layout)
    assert causal.cu_q.tolist() == [0, 3, 4, 6]  # [0..2], [7] after the noise split, sample two
    assert causal.k_index.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 7, 8, 9]  # the trailing token skips 5, 6
    assert bidir.cu_q.tolist() == [0, 2, 4]
    assert bidir.k_index.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]


def test_interleaved_samples_fall_back_to_one_mask():
    layout = PackedLayout(torch.tensor([0, 1, 0, 1, 0]), torch.tensor([0, 1, 0, 1, 0]), torch.zeros(5, dtype=torch.long))
    q, k, v = random_qkv(5)
    out = SdpaAttention(layout)(q, k, v)
    assert (out - reference_attention(q, k, v, layout)).abs().max() < 1e-10
    with pytest.raises(ValueError, match="contiguous"):
        varlen_plan(layout)


def test_flash_refused_clearly_without_flash_attn():
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="flash_attn.*model.attention=flex or sdpa"):
            build_attention("flash", layout_from(MIXED))
    else:  # a machine with flash-attn: the backend must build
        assert isinstance(build_attention("flash", layout_from(MIXED)), VarlenAttention)


def test_flex_backward_on_cpu_is_refused_clearly():
    layout = layout_from(MIXED)
    q, k, v = (x.float() for x in random_qkv(layout.num_tokens, grad=True))
    with pytest.raises(RuntimeError, match="model.attention=sdpa"):
        FlexAttention(layout)(q, k, v)


def test_unknown_backend_named():
    with pytest.raises(ValueError, match="model.attention"):
        build_attention("xformers", layout_from(MIXED))


def test_flash_attention_before_2_1_is_refused(monkeypatch):
    """flash_attn < 2.1 aligns causal masks top-left: packed causal segments with more keys than queries would
    attend wrongly, without an error."""
    import sys
    import types

    from lance_ds.model.attention import import_flash_varlen

    for version, ok in (("2.0.9", False), ("2.1.0", True), ("2.7.4.post1", True)):
        monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(__version__=version,
                                                                             flash_attn_varlen_func=len))
        if ok:
            assert import_flash_varlen() is len
        else:
            with pytest.raises(RuntimeError, match="needs flash_attn >= 2.1, found 2.0.9"):
                import_flash_varlen()
