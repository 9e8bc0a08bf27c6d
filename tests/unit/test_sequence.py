"""Sequence plans: per-task layouts, RoPE ids, pixels, and a data-side parity check against the original Lance
code's packed batch (reference/lance_tiny/case_min.*)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import LANCE_TINY
from lance_ds.config.data import GroupConfig, ImageOptions, VideoOptions
from lance_ds.data.batch import AttnMode, Sample
from lance_ds.data.packing import check_length, collate
from lance_ds.data.sequence import (DEFAULT_SYSTEM_PROMPTS, PLACEHOLDER_TASK,
                                    REFERENCE_TEMPORAL_START, PlanError, SequencePlanner, VisionGeometry, fit_size,
                                    resize_crop, vit_patch_order)
from lance_ds.data.tokenizer import QWEN_SPECIAL_TOKENS, load_tokenizer

REFERENCE = LANCE_TINY
_MODES = {"causal": AttnMode.CAUSAL, "full": AttnMode.FULL, "full_noise": AttnMode.FULL, "noise": AttnMode.NOISE}


def write_fake_tokenizer(directory: Path, config: dict) -> Path:
    """The case's fake tokenizer: words, spaces and punctuation split into config["fake_tokenizer_vocab"], Qwen's 22
    special tokens at 990..1011 (so len = 1012 = config["len_tokenizer"])."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = dict(config["fake_tokenizer_vocab"])
    first_special = config["special_token_ids"]["<|endoftext|>"]
    for i in range(first_special):
        if i not in vocab.values():
            vocab[f"<unused_{i}>"] = i
    for i, token in enumerate(QWEN_SPECIAL_TOKENS):
        vocab[token] = first_special + i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unused_0>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|\s|[^\w\s]"), behavior="isolated")
    tok.add_special_tokens(list(QWEN_SPECIAL_TOKENS))
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    return directory


@pytest.fixture(scope="module")
def case():
    config = json.loads((REFERENCE / "config.json").read_text())
    meta = json.loads((REFERENCE / "case_min.json").read_text())
    tensors = load_file(str(REFERENCE / "case_min.safetensors"))
    return config, meta, tensors


@pytest.fixture(scope="module")
def fake_tokenizer(case, tmp_path_factory):
    config, _, _ = case
    return load_tokenizer(write_fake_tokenizer(tmp_path_factory.mktemp("fake_tok"), config))


@pytest.fixture(scope="module")
def tiny_geometry(case):
    config, _, _ = case
    vit = config["vit"]
    return VisionGeometry(vae_spatial_factor=16, vae_temporal_factor=4, vit_patch_size=vit["patch_size"],
                          vit_temporal_patch=vit["temporal_patch_size"], vit_merge_size=vit["spatial_merge_size"],
                          tokens_per_second=vit["tokens_per_second"], max_latent_size=config["max_latent_size"],
                          max_latent_frames=config["max_num_frames"] // 4 + 1)


def _system_of(rendered: str) -> str:
    return rendered.split("<|im_start|>system\n", 1)[1].split("<|im_end|>", 1)[0]


def _image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (1, h, w, 3), generator=g, dtype=torch.uint8)


def test_case_min_parity(case, fake_tokenizer, tiny_geometry):
    """t2i + i2t planned and packed as lance_ds does == the batch the original Lance code built."""
    config, meta, t = case
    assert len(fake_tokenizer) == config["len_tokenizer"]
    special = config["special_token_ids"]
    assert fake_tokenizer.special.im_start == special["<|im_start|>"]
    assert fake_tokenizer.special.video_pad == special["<|video_pad|>"]

    t2i_text, i2t_text = meta["samples"][0]["rendered"], meta["samples"][1]["rendered"]
    assert _system_of(t2i_text) == DEFAULT_SYSTEM_PROMPTS["t2i"]  # Lance's default t2i system prompt
    planner = SequencePlanner(fake_tokenizer, tiny_geometry, seed=0)
    t2i_group = GroupConfig(name="t2i", task="t2i", caption_dropout=0.0, image=ImageOptions(resolution=32))
    i2t_group = GroupConfig(name="i2t", task="i2t", caption_dropout=0.0, image=ImageOptions(resolution=56))
    t2i = Sample("t2i", {"caption": "a red cube on a blue table"}, {"image": _image(40, 40)}, key="a", group="t2i")
    i2t = Sample("i2t", {"caption_i": _system_of(i2t_text), "caption_q": "What is in the image ?",
                         "caption_a": "A red cube sits on a table ."}, {"image": _image(60, 60, 1)}, key="b",
                 group="i2t")
    plans = [planner.plan(t2i, t2i_group), planner.plan(i2t, i2t_group)]
    batch = collate(plans, pad_to=256, pad_id=fake_tokenizer.special.pad)
    inputs = meta["inputs"]
    n = inputs["sequence_length"]

    assert batch.num_tokens == 256 and batch.num_real_tokens == n
    assert torch.equal(batch.input_ids[:n], t["inputs.packed_text_ids"])
    assert torch.bincount(batch.sample_ids).tolist() == inputs["sample_lens"]
    assert batch.tasks == ["t2i", "i2t", "pad"]
    split_lens = torch.bincount(batch.split_ids).tolist()
    assert split_lens == inputs["split_lens"]
    starts = torch.tensor([0] + split_lens[:-1]).cumsum(0)
    assert [AttnMode(int(batch.attn_modes[s])) for s in starts] == [_MODES[m] for m in inputs["attn_modes"]]
    assert torch.equal(batch.ce_indexes, t["inputs.ce_loss_indexes"])
    assert torch.equal(batch.ce_targets, t["inputs.packed_label_ids"])
    assert torch.equal(batch.ce_weights, torch.ones(16))
    assert torch.equal(batch.vae_indexes, t["inputs.packed_vae_token_indexes"])
    assert torch.equal(batch.vae_indexes[batch.vae_is_target.repeat_interleave(batch.vae_grid_thw.prod(1))],
                       t["inputs.mse_loss_indexes"])
    assert batch.vae_grid_thw.tolist() == inputs["patchified_vae_latent_shapes"]
    size = config["max_latent_size"]
    latent_ids = batch.vae_coords[:, 0] * size * size + batch.vae_coords[:, 1] * size + batch.vae_coords[:, 2]
    assert torch.equal(latent_ids, t["inputs.packed_latent_position_ids"])
    assert torch.equal(batch.vit_indexes, t["inputs.packed_vit_token_indexes"])
    assert torch.equal(batch.vit_grid_thw, t["inputs.vit_video_grid_thw"])
    text = torch.ones(n, dtype=torch.bool)
    text[batch.vit_indexes] = False
    text[batch.vae_indexes] = False
    assert torch.equal(torch.nonzero(text).flatten(), t["inputs.packed_text_indexes"])
    assert torch.equal(batch.position_ids[:, :n], t["outputs.packed_position_ids_used"][:, 0])
    assert batch.vae_weights.tolist() == [1.0] and batch.vae_pixels[0].shape == (3, 1, 32, 32)


def test_vit_patch_order_matches_lance(case, tiny_geometry):
    _, _, t = case
    clip = t["extra.padded_videos_vit.0"]  # [3, 2, 56, 56] normalised pixels
    patches, grid = vit_patch_order(clip.permute(1, 0, 2, 3), tiny_geometry)
    assert grid == (1, 4, 4)
    assert torch.equal(patches, t["inputs.packed_vit_tokens.0"])


def test_vit_patches_travel_as_uint8_and_are_normalised_like_qwen(tiny_geometry):
    """The loader ships uint8 patches (a quarter of float32's bytes); encode_vit normalises them on the device, to
    exactly what normalising the frames first gives."""
    from lance_ds.model.vision import CLIP_MEAN, CLIP_STD, normalise_patches

    frames = _video(2, 28, 28)
    patches, grid = vit_patch_order(frames.permute(0, 3, 1, 2), tiny_geometry)
    assert grid == (1, 2, 2) and patches.shape == (4, 3 * 2 * 14 * 14) and patches.dtype == torch.uint8
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    normalised_first = vit_patch_order((frames.permute(0, 3, 1, 2).float() / 255.0 - mean) / std, tiny_geometry)[0]
    assert torch.equal(normalise_patches(patches), normalised_first)
    # the first patch's first value: channel 0, frame 0, pixel (0, 0)
    expected = (frames[0, 0, 0, 0].item() / 255.0 - CLIP_MEAN[0]) / CLIP_STD[0]
    assert normalise_patches(patches)[0, 0].item() == pytest.approx(expected, abs=1e-6)


def _video(t: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (t, h, w, 3), generator=g, dtype=torch.uint8)


def test_edit_layout_and_position_reuse(fake_tokenizer):
    geometry = VisionGeometry(tokens_per_second=2)
    planner = SequencePlanner(fake_tokenizer, geometry)
    group = GroupConfig(name="edit", task="v2v", caption_dropout=0.0, video=VideoOptions(resolution=64))
    sample = Sample("v2v", {"caption": "make the cube green"},
                    {"input_video": _video(11, 70, 64), "output_video": _video(10, 64, 64, 1)}, key="k", group="edit")
    plan = planner.plan(sample, group)
    assert plan.split_modes == [AttnMode.CAUSAL, AttnMode.FULL, AttnMode.FULL, AttnMode.CAUSAL, AttnMode.CAUSAL,
                                AttnMode.NOISE, AttnMode.CAUSAL]
    vit, (source, target) = plan.vit[0], plan.vae
    assert vit.grid_thw == (5, 4, 4)  # 10 frames (source trimmed to the target's 10), 56x56
    assert source.grid_thw == target.grid_thw == (3, 4, 4)  # 9 = 4k+1 frames, 64x64 / 16
    assert source.pixels(plan.media).shape == target.pixels(plan.media).shape == (3, 9, 64, 64)
    assert source.cut.media == "input_video" and target.cut.media == "output_video" and vit.cut.count == 10
    assert not source.is_target and source.weight == 0.0 and target.is_target and target.weight == 1.0
    pos = plan.position_ids
    assert torch.equal(pos[:, target.positions], pos[:, source.positions])
    # the ViT block's temporal ids start at 1000 (vision_start) and step by tokens_per_second per grid frame
    vs = int(vit.positions[0]) - 1
    assert pos[0, vs] == REFERENCE_TEMPORAL_START
    assert pos[0, vit.positions].unique().tolist() == [REFERENCE_TEMPORAL_START + 1 + 2 * i for i in range(5)]
    # the source latents come after the ViT block's vision_end (un-shifted ids) and are 3D over (t, h, w)
    ve = int(vit.positions[-1]) + 1
    src_vs = int(source.positions[0]) - 1
    assert src_vs == ve + 1 and pos[1, src_vs] == pos[1, ve] + 1
    assert pos[:, source.positions[-1]].tolist() == [pos[0, src_vs] + 1 + 2 * 2, pos[1, src_vs] + 4,
                                                     pos[2, src_vs] + 4]
    assert plan.ce_targets.numel() == 0
    assert plan.input_ids[source.positions].eq(fake_tokenizer.special.video_pad).all()


def test_vit_resolution_sizes_only_what_the_vit_sees(fake_tokenizer):
    """image.vit_resolution: an edit's source reaches the ViT at 56 px while both latent blocks stay at 32 px."""
    planner = SequencePlanner(fake_tokenizer, VisionGeometry(vae_spatial_factor=32, vae_temporal_factor=1))
    sample = Sample("i2i", {"caption": "make it blue"},
                    {"input_image": _video(1, 64, 64), "output_image": _video(1, 64, 64, 1)}, key="k", group="edit")
    for vit_resolution, vit_grid in ((None, (1, 2, 2)), (56, (1, 4, 4))):
        group = GroupConfig(name="edit", task="i2i", caption_dropout=0.0,
                            image=ImageOptions(resolution=32, vit_resolution=vit_resolution))
        plan = planner.plan(sample, group)
        assert plan.vit[0].grid_thw == vit_grid  # 28 px (32 cut to the ViT's multiple of 28) or 56 px
        assert [b.pixels(plan.media).shape for b in plan.vae] == [(3, 1, 32, 32)] * 2


def test_understanding_video_ce_and_text_continuation(fake_tokenizer):
    planner = SequencePlanner(fake_tokenizer, VisionGeometry())
    group = GroupConfig(name="v2t", task="v2t", image=ImageOptions(resolution=56))
    sample = Sample("v2t", {"caption_i": "", "caption_q": "", "caption_a": "a cat walks left"},
                    {"video": _video(5, 56, 56)}, key="v", group="v2t")
    plan = planner.plan(sample, group)
    s = fake_tokenizer.special
    answer = fake_tokenizer.encode("a cat walks left") + [s.im_end]
    assert plan.ce_targets.tolist() == answer
    assert plan.input_ids[plan.ce_positions + 1].tolist() == answer
    assert plan.vit[0].grid_thw == (3, 4, 4)  # 5 frames padded to 6
    ve = int(plan.vit[0].positions[-1]) + 1
    assert plan.position_ids[1, ve + 1] == plan.position_ids[1, ve] + 1
    assert plan.split_modes == [AttnMode.CAUSAL, AttnMode.FULL, AttnMode.CAUSAL]
    system = fake_tokenizer.encode("system\n" + DEFAULT_SYSTEM_PROMPTS["v2t"])  # caption_i "" -> the default
    assert plan.input_ids[1:1 + len(system)].tolist() == system


def test_caption_dropout_is_deterministic_per_sample(fake_tokenizer):
    planner = SequencePlanner(fake_tokenizer, VisionGeometry(), seed=7)
    group = GroupConfig(name="g", task="t2i", caption_dropout=0.5, image=ImageOptions(resolution=32))
    image = _image(32, 32)
    dropped = []
    for i in range(200):
        sample = Sample("t2i", {"caption": "a red cube"}, {"image": image}, key=f"k{i}", group="g")
        plan = planner.plan(sample, group)
        uncond = fake_tokenizer.special.uncond in plan.input_ids.tolist()
        assert uncond == planner.drops_caption(sample, group) == SequencePlanner(
            fake_tokenizer, VisionGeometry(), seed=7).drops_caption(sample, group)
        dropped.append(uncond)
    assert 70 < sum(dropped) < 130
    other_seed = SequencePlanner(fake_tokenizer, VisionGeometry(), seed=8)
    assert dropped != [other_seed.drops_caption(Sample("t2i", {}, {}, key=f"k{i}", group="g"), group)
                       for i in range(200)]


def test_a_sample_too_long_with_its_caption_is_too_long_without_it(fake_tokenizer):
    """Whether a sample fits a pack is decided with its caption: one too long only because of it trained in the
    epochs dropout replaced the caption, always captionless (its conditional version never)."""
    planner = SequencePlanner(fake_tokenizer, VisionGeometry(), seed=7)
    group = GroupConfig(name="g", task="t2i", caption_dropout=0.5, image=ImageOptions(resolution=32))
    samples = [Sample("t2i", {"caption": "a red cube " * 40}, {"image": _image(32, 32)}, key=f"k{i}", group="g")
               for i in range(20)]
    plans = [planner.plan(s, group) for s in samples]
    kept = [p.num_tokens for s, p in zip(samples, plans) if not planner.drops_caption(s, group)]
    dropped = [p for s, p in zip(samples, plans) if planner.drops_caption(s, group)]
    assert kept and dropped and max(p.num_tokens for p in dropped) < min(kept)
    assert {p.tokens_with_caption for p in dropped} == set(kept)
    assert not any(check_length(p, min(kept) - 1, filter_overlong=True) for p in plans)
    assert all(check_length(p, min(kept), filter_overlong=True) for p in plans)


def test_buckets_and_limits():
    assert fit_size(100, 200, resolution=64, buckets=[1.0, 2.0, 0.5], multiple=16) == (32, 80)
    assert fit_size(200, 100, resolution=64, buckets=[1.0, 2.0, 0.5], multiple=28) == (84, 28)
    assert fit_size(64, 64, resolution=512, buckets=[1.0], multiple=16, max_side=128) == (128, 128)
    assert fit_size(64, 64, resolution=512, buckets=[1.0], multiple=16, max_pixels=64 * 64) == (64, 64)
    frames = _video(2, 30, 60)
    out = resize_crop(frames, 32, 32)
    assert out.shape == (2, 32, 32, 3) and out.dtype == torch.uint8
    assert torch.equal(resize_crop(frames, 30, 60), frames)
    assert VisionGeometry().vae_num_frames(12) == 9 and VisionGeometry().vae_num_frames(1) == 1
    assert VisionGeometry(max_latent_frames=2).vae_num_frames(30) == 5


def test_bad_samples_raise_plan_error(fake_tokenizer):
    planner = SequencePlanner(fake_tokenizer, VisionGeometry())
    with pytest.raises(PlanError, match="no 'image' media"):
        planner.plan(Sample("t2i", {"caption": "x"}, {}, key="k"))
    with pytest.raises(PlanError, match="no 'caption_a' text"):
        planner.plan(Sample("i2t", {"caption_a": ""}, {"image": _image(28, 28)}, key="k"))
    with pytest.raises(PlanError, match="no 'caption' text"):  # it trained as a caption of blanks
        planner.plan(Sample("t2i", {"caption": " \n "}, {"image": _image(28, 28)}, key="k"))
    blank_system = planner.plan(Sample("i2t", {"caption_i": "  ", "caption_a": "a"}, {"image": _image(28, 28)}))
    assert torch.equal(blank_system.input_ids, planner.plan(Sample("i2t", {"caption_a": "a"},
                                                                   {"image": _image(28, 28)})).input_ids)
    with pytest.raises(PlanError, match="unknown task"):
        planner.plan(Sample("x2y", {}, {}, key="k"))


def test_placeholder_is_tiny_and_zero_weight(fake_tokenizer):
    planner = SequencePlanner(fake_tokenizer, VisionGeometry())
    plan = planner.placeholder(vit=True, vae=True, ce=True)
    assert plan.task == PLACEHOLDER_TASK and not plan.is_real
    assert plan.num_tokens <= 12
    assert plan.vit[0].grid_thw == (1, 2, 2) and plan.vit[0].positions.numel() == 1
    assert plan.vae[0].grid_thw == (1, 1, 1) and plan.vae[0].is_target and plan.vae[0].weight == 0.0
    assert plan.ce_weight == 0.0 and plan.ce_targets.numel() == 1
    assert planner.placeholder(vit=False, vae=False, ce=True).vit == []
