"""The frame VAE (the example world's codec): its interface, save/load, the training tool, and that a short training
run really learns to reconstruct held-out scenes."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, run_tool
from lance_ds.config.model import ModelConfig
from lance_ds.model import build_model, build_vae
from lance_ds.model.build import planned_geometry
from lance_ds.model.vae import FrameAutoencoder, FrameVAE, VaeConfig, detect_kind

sys.path.insert(0, str(REPO / "tools"))
import train_example_vae  # noqa: E402  (the tool's functions, tested in-process)


def saved_vae(directory: Path, resolution: int = 16, z: int = 6) -> Path:
    torch.manual_seed(0)
    net = FrameAutoencoder(resolution, z, hidden_size=32)
    net.save(directory, [0.5] * z, [2.0] * z)
    return directory


def test_each_frame_is_one_token_and_decode_inverts_the_normalisation(tmp_path):
    vae = build_vae(VaeConfig(), saved_vae(tmp_path))  # the class comes from config.json, not from the VaeConfig
    assert isinstance(vae, FrameVAE) and detect_kind(tmp_path) == "frame"
    assert (vae.latent_channels, vae.spatial_factor, vae.temporal_factor) == (6, 16, 1)
    pixels = torch.rand(2, 3, 5, 16, 16) * 2 - 1
    latents = vae.encode(pixels)
    assert latents.shape == (2, 6, 5, 1, 1)
    mean, _ = vae.net.posterior(pixels[1, :, 3][None])
    assert torch.allclose(latents[1, :, 3, 0, 0], (mean[0] - 0.5) / 2.0, atol=1e-6)  # the saved normalisation
    decoded = vae.decode(latents)
    assert decoded.shape == pixels.shape and decoded.abs().max() <= 1
    frame = vae.net.reconstruct(mean).clamp(-1, 1)[0]
    assert torch.allclose(decoded[1, :, 3], frame, atol=1e-5)
    sampled = vae.encode(pixels, sample=True, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(sampled, latents) and torch.allclose(sampled, latents, atol=5)


def test_reload_gives_the_same_codec(tmp_path):
    first = build_vae(VaeConfig(), saved_vae(tmp_path))
    second = FrameVAE.from_pretrained(tmp_path)
    pixels = torch.rand(1, 3, 1, 16, 16) * 2 - 1
    assert torch.equal(first.encode(pixels), second.encode(pixels))


def test_other_sizes_are_refused_with_the_fix(tmp_path):
    vae = build_vae(VaeConfig(), saved_vae(tmp_path))
    with pytest.raises(ValueError, match="trained on 16x16 frames, got 32x32; set the generation groups' resolution"):
        vae.encode(torch.zeros(1, 3, 1, 32, 32))
    with pytest.raises(ValueError, match="one token per frame"):
        vae.decode(torch.zeros(1, 6, 1, 2, 2))
    with pytest.raises(ValueError, match="needs weights"):
        build_vae(VaeConfig(kind="frame"))


def test_the_debug_model_generates_through_it(tmp_path):
    """model.vae_path to a frame VAE: latent width and geometry follow it, and a generated t2i image has its size."""
    from lance_ds.data.batch import Sample
    from lance_ds.data.sequence import SequencePlanner
    from lance_ds.data.tokenizer import load_tokenizer
    from lance_ds.generate import Generator

    tokenizer = load_tokenizer(None)
    config = ModelConfig(size="debug", dtype="fp32", vae_path=str(saved_vae(tmp_path)))
    bundle = build_model(config, len(tokenizer))
    assert bundle.geometry.latent_channels == 6 and bundle.geometry.vae_spatial_factor == 16
    assert bundle.geometry.frame_size == 16  # (the generate CLI checks --size against it before loading)
    assert planned_geometry(config) == bundle.geometry  # what --check plans with, from the config files alone
    planner = SequencePlanner(tokenizer, bundle.geometry)
    generator = Generator(bundle.model, bundle.vit, bundle.vae, planner, tokenizer)
    (image,) = generator.generate([Sample(task="t2i", key="k", texts={"caption": "a red circle"}, media={})],
                                  num_steps=2, target_shape=(1, 16, 16))
    assert image.shape == (1, 16, 16, 3) and image.dtype == torch.uint8


def test_training_learns_to_reconstruct_held_out_frames():
    """A short run of the tool's loop: held-out reconstruction error falls far below the untrained codec's."""
    frames = train_example_vae.draw_frames(512, "train", size=64, resolution=16, seed=0)
    held_out = train_example_vae.to_unit(train_example_vae.draw_frames(64, "val", size=64, resolution=16, seed=0))
    torch.manual_seed(0)
    net = FrameAutoencoder(16, 8, hidden_size=128)

    def error() -> float:
        with torch.no_grad():
            return float((net.reconstruct(net.posterior(held_out)[0]) - held_out).pow(2).mean())

    before = error()
    train_example_vae.train(net, frames, steps=150, batch_size=64, lr=2e-3, kl_weight=1e-3, seed=0, log_every=1000)
    assert error() < 0.25 * before


def test_draw_frames_is_deterministic_and_keeps_the_splits_apart():
    first = train_example_vae.draw_frames(8, "train", size=64, resolution=32, seed=0)
    assert first.shape == (8, 32, 32, 3) and first.dtype == torch.uint8
    assert torch.equal(first, train_example_vae.draw_frames(8, "train", size=64, resolution=32, seed=0))
    assert not torch.equal(first, train_example_vae.draw_frames(8, "val", size=64, resolution=32, seed=0))


def test_tool_writes_a_loadable_codec_and_refuses_bad_flags(tmp_path):
    out = tmp_path / "vae"
    proc = run_tool("tools/train_example_vae.py", "--out", str(out), "--resolution", "16", "--frames", "64",
                    "--steps", "3", "--batch-size", "16", "--hidden", "16", "--judge", "4")
    assert "held-out reconstructions judged right: images" in proc.stdout
    vae = FrameVAE.from_pretrained(out)
    assert vae.spatial_factor == 16 and vae.latent_channels == 16
    stds = vae.latents_std
    assert torch.isfinite(stds).all() and (stds > 0).all()
    bad = train_example_vae.main(["--out", str(tmp_path / "x"), "--resolution", "128", "--steps", "0"])
    assert bad == 2 and not (tmp_path / "x").exists()
    assert np.isfinite(float(vae.latents_mean.sum()))


def test_generate_cli_cuts_prompts_at_the_frame_size(tmp_path):
    """python -m lance_ds.generate without --size: a frame VAE's prompts (and i2i / v2v inputs) are cut to its size."""
    from argparse import Namespace

    from lance_ds.generate import check_against_model, cli_group, cli_target_shape
    from lance_ds.model.build import Geometry
    from lance_ds.model.vae import PatchCodec

    group = cli_group(build_vae(VaeConfig(), saved_vae(tmp_path)))
    assert group.image.resolution == 16 and group.image.vit_resolution == 64  # the ViT sees sources as usual
    assert cli_group(PatchCodec(4, 4)).image.resolution == 64
    assert cli_target_shape(Namespace(task="t2i", size=None), planner=None, group=group) is None
    assert cli_target_shape(Namespace(task="t2i", size="16"), planner=None, group=group) == (1, 16, 16)
    frame_geometry = Geometry(vae_spatial_factor=16, vae_temporal_factor=1, frame_size=16)
    check_against_model(Namespace(task="t2i", size="16", frames=None), frame_geometry)
    with pytest.raises(ValueError, match="frame VAE makes 16 x 16 frames only; use --size 16"):  # before loading
        check_against_model(Namespace(task="t2i", size="32", frames=None), frame_geometry)
    check_against_model(Namespace(task="t2i", size="32", frames=None), Geometry())  # other codecs: any size


def test_tool_refuses_an_out_it_could_not_save_to_and_a_negative_judge_before_training(tmp_path, capsys):
    (tmp_path / "afile").write_text("mine")
    for out in (tmp_path / "afile", tmp_path / "afile" / "vae"):
        assert train_example_vae.main(["--out", str(out), "--judge", "-1"]) == 2
        err = capsys.readouterr().err
        assert f"--out: {tmp_path / 'afile'} is a file" in err
        assert "--judge must be >= 0 (0: no judging), got -1" in err
    assert (tmp_path / "afile").read_text() == "mine"


SMALL = ["--resolution", "16", "--frames", "16", "--steps", "1", "--batch-size", "4", "--hidden", "8", "--judge", "0"]


def test_tool_refuses_an_out_holding_another_model_and_retrains_its_own(tmp_path, capsys):
    """--out with a ViT's (or a diffusers VAE's) config.json would lose it to the frame VAE's: refused before training,
    naming what is there; the tool's own earlier output is retrained in place, as before."""
    vit, wan = tmp_path / "vit", tmp_path / "wan"
    vit.mkdir(), wan.mkdir()
    (vit / "config.json").write_text('{"vision_config": {"depth": 2}}')
    (wan / "config.json").write_text('{"_class_name": "AutoencoderKLWan", "z_dim": 16}')
    for out, held in ((vit, "a ViT (tools/train_example_vit.py)"), (wan, "a AutoencoderKLWan model")):
        before = (out / "config.json").read_text()
        assert train_example_vae.main(["--out", str(out), *SMALL]) == 2
        assert f"--out {out} already holds {held}" in capsys.readouterr().err
        assert (out / "config.json").read_text() == before and not (out / "model.safetensors").exists()
    own = saved_vae(tmp_path / "vae")
    assert train_example_vae.main(["--out", str(own), *SMALL]) == 0
    assert FrameVAE.from_pretrained(own).net.hidden_size == 8  # replaced by the new run


@pytest.mark.parametrize("flags, message", [
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["--lr", "0"], "--lr must be a finite number > 0, got 0.0"),
    (["--lr=-1e-3"], "--lr must be a finite number > 0, got -0.001"),
    (["--kl-weight", "nan"], "--kl-weight must be a finite number >= 0, got nan"),
    (["--kl-weight", "-1"], "--kl-weight must be a finite number >= 0, got -1.0"),
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
    (["--size", "8", "--resolution", "8"], "--size must be >= 16 pixels"),
])
def test_tool_refuses_numbers_it_cannot_train_with_naming_the_flag(tmp_path, capsys, flags, message):
    """nan / inf / non-positive learning rates tracebacked in torch or trained nan weights silently; a negative seed
    failed in numpy without naming --seed."""
    assert train_example_vae.main(["--out", str(tmp_path / "x"), *SMALL, *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
