"""The example world's pretrained ViT (tools/train_example_vit.py): its frame pairs, that its distillation really
learns, and that its output is a model.vit_path the debug model loads as its frozen understanding encoder."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run_tool
from lance_ds.config.model import ModelConfig
from lance_ds.data.example import draw_training_frames
from lance_ds.model import build_model
from lance_ds.model.registry import SIZES
from lance_ds.model.vae import FrameAutoencoder, FrameVAE

sys.path.insert(0, str(REPO / "tools"))
import train_example_vit  # noqa: E402  (the tool's functions, tested in-process)


def saved_vae(directory: Path, resolution: int = 16, z: int = 6) -> Path:
    torch.manual_seed(0)
    FrameAutoencoder(resolution, z, hidden_size=32).save(directory, [0.0] * z, [1.0] * z)
    return directory


def test_frame_pairs_are_an_image_twice_or_consecutive_video_frames():
    pairs = draw_training_frames(24, "train", size=32, seed=0, span=2)
    assert pairs.shape == (24, 2, 32, 32, 3) and pairs.dtype == np.uint8
    same = [np.array_equal(p[0], p[1]) for p in pairs]
    assert any(same) and not all(same)  # images repeated; video frames move (except a clip's last frame, repeated)
    assert np.array_equal(pairs, draw_training_frames(24, "train", size=32, seed=0, span=2))
    assert not np.array_equal(pairs, draw_training_frames(24, "val", size=32, seed=0, span=2))
    assert np.array_equal(pairs[:, 0], draw_training_frames(24, "train", size=32, seed=0)[:, 0])  # span keeps the draw


def test_distillation_learns_to_read_held_out_latents():
    """A short run of the tool's loop on the tiny size's ViT: held-out latents go from unexplained to mostly read."""
    spec = SIZES["tiny"].vit
    geometry = train_example_vit.patch_geometry(spec)
    torch.manual_seed(0)
    vae = FrameVAE(FrameAutoencoder(16, 4, hidden_size=32), [0.0] * 4, [1.0] * 4)  # any fixed encoder is a target
    train = train_example_vit.Pairs(torch.from_numpy(draw_training_frames(768, "train", 32, 0, span=2)), vae, 28,
                                    geometry)
    held_out = train_example_vit.Pairs(torch.from_numpy(draw_training_frames(128, "val", 32, 0, span=2)), vae, 28,
                                       geometry)
    net = train_example_vit.Distiller(spec, train.targets.shape[1])
    before = train_example_vit.explained_variance(net, held_out)
    train_example_vit.train(net, train, steps=300, batch_size=32, lr=2e-3, seed=0, log_every=1000)
    after = train_example_vit.explained_variance(net, held_out)
    assert before < 0.2 and after > 0.6, (before, after)


def test_tool_writes_the_frozen_vit_the_debug_model_loads(tmp_path):
    vae, out = saved_vae(tmp_path / "vae"), tmp_path / "vit"
    proc = run_tool("tools/train_example_vit.py", "--vae", str(vae), "--out", str(out), "--pairs", "16",
                    "--steps", "2", "--batch-size", "4", "--held-out", "8")
    assert "held-out frame VAE latents explained:" in proc.stdout
    saved = load_file(str(out / "vit.safetensors"))
    assert "patch_embed.proj.weight" in saved  # Lance's vit.safetensors names
    bundle = build_model(ModelConfig(size="debug", dtype="fp32", vit_path=str(out), vit_trainable=False,
                                     vit_dtype="fp32"), 300)
    assert bundle.vit is not None and not any(p.requires_grad for p in bundle.vit.parameters())
    assert bundle.spec.vit == SIZES["debug"].vit  # the geometry read back from config.json + the weights
    for name, value in bundle.vit.state_dict().items():
        assert torch.equal(value, saved[name]), name


def test_tool_refuses_bad_flags_before_any_work(tmp_path, capsys):
    assert train_example_vit.main(["--vae", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "train the frame VAE first" in capsys.readouterr().err
    vae = saved_vae(tmp_path / "vae")
    assert train_example_vit.main(["--vae", str(vae), "--out", str(tmp_path / "x"), "--resolution", "50"]) == 2
    assert "multiple of 28" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_tool_refuses_an_out_it_could_not_save_to_and_a_negative_held_out_before_training(tmp_path, capsys):
    vae = saved_vae(tmp_path / "vae")
    (tmp_path / "afile").write_text("mine")
    for out in (tmp_path / "afile", tmp_path / "afile" / "vit"):
        assert train_example_vit.main(["--vae", str(vae), "--out", str(out), "--held-out", "-1"]) == 2
        err = capsys.readouterr().err
        assert f"--out: {tmp_path / 'afile'} is a file" in err
        assert "--held-out must be >= 0 (0: none), got -1" in err
    assert (tmp_path / "afile").read_text() == "mine"


SMALL = ["--pairs", "4", "--steps", "1", "--batch-size", "2", "--held-out", "0"]  # what a refusal must not run


def test_tool_refuses_to_overwrite_the_frame_vae_or_another_model(tmp_path, capsys):
    """--out VAE_DIR (or another model's directory) would replace its config.json with the ViT's, leaving a VAE that no
    longer loads: refused before training, naming what is there."""
    vae, other = saved_vae(tmp_path / "vae"), saved_vae(tmp_path / "other_vae")
    qwen = tmp_path / "qwen"
    qwen.mkdir()
    (qwen / "config.json").write_text('{"model_type": "qwen2_5_vl", "vision_config": {"depth": 32}}')
    cases = ((vae, "is the --vae directory"), (other, "already holds a frame VAE (tools/train_example_vae.py)"),
             (qwen, "already holds a qwen2_5_vl model"))
    for out, message in cases:
        before = (out / "config.json").read_text()
        assert train_example_vit.main(["--vae", str(vae), "--out", str(out), *SMALL]) == 2
        assert f"--out {out} {message}" in capsys.readouterr().err
        assert (out / "config.json").read_text() == before and not (out / "vit.safetensors").exists()
    assert FrameVAE.from_pretrained(vae).frame_size == 16  # still loads


def test_tool_refuses_a_vae_that_is_not_a_frame_vae(tmp_path, capsys):
    """--vae given the ViT directory (the wrong model) gave a KeyError traceback from FrameVAE.from_pretrained."""
    vit = tmp_path / "vit"
    vit.mkdir()
    (vit / "config.json").write_text('{"vision_config": {"depth": 2}}')
    wan = tmp_path / "wan"
    wan.mkdir()
    (wan / "config.json").write_text('{"_class_name": "AutoencoderKLWan"}')
    for vae, held in ((vit, "a ViT (tools/train_example_vit.py)"), (wan, "a AutoencoderKLWan model")):
        assert train_example_vit.main(["--vae", str(vae), "--out", str(tmp_path / "x"), *SMALL]) == 2
        assert f"--vae {vae} holds {held}, not a frame VAE" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_tool_retrains_into_its_own_earlier_output(tmp_path):
    vae, out = saved_vae(tmp_path / "vae"), tmp_path / "vit"
    assert train_example_vit.main(["--vae", str(vae), "--out", str(out), *SMALL]) == 0
    first = load_file(str(out / "vit.safetensors"))
    assert train_example_vit.main(["--vae", str(vae), "--out", str(out), *SMALL, "--seed", "1"]) == 0
    second = load_file(str(out / "vit.safetensors"))
    assert not torch.equal(first["patch_embed.proj.weight"], second["patch_embed.proj.weight"])  # replaced


@pytest.mark.parametrize("flags, message", [
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["--lr", "-1"], "--lr must be a finite number > 0, got -1.0"),
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
    (["--size", "0"], "--size must be >= 16 pixels"),
])
def test_tool_refuses_numbers_it_cannot_train_with_naming_the_flag(tmp_path, capsys, flags, message):
    vae = saved_vae(tmp_path / "vae")
    assert train_example_vit.main(["--vae", str(vae), "--out", str(tmp_path / "x"), *SMALL, *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
