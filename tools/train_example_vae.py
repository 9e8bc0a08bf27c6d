#!/usr/bin/env python
"""Train the frame VAE of the example world: the codec the README's main job generates through.

  python tools/train_example_vae.py --out example_vae/            # ~2.5 min on 2 CPU cores
  then train with model.vae_path=example_vae (as scripts/main_job.sh does)

Frames of train-split scenes (lance_ds.data.example: images, and single frames of the videos) are drawn at the
example data's size (64 px), coded as the dataset codes them (PNG or JPEG), and resized to --resolution the way the
loader resizes them; a per-frame VAE (lance_ds.model.vae.FrameAutoencoder: MLPs, one frame <-> --latent-channels
numbers) learns to reconstruct them. A whole frame in a few numbers is what lets the ~4 M-parameter debug model learn
to draw, edit and animate the shapes in minutes on a CPU; the patch codec's 4x4-pixel tokens left it drawing blobs.

At the end the program judges (lance_ds.data.example's judges) reconstructions of held-out scenes: the accuracy a
perfect generator could reach through this codec. The same flags give the same weights on the same machine.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lance_ds.config.core import output_problem
from lance_ds.data.example import (draw_scene, draw_training_frames, encoder_learning_rate, judge_image, judge_video,
                                   render_image, render_video)
from lance_ds.data.sequence import resize_crop
from lance_ds.model.vae import FrameAutoencoder, FrameVAE, to_uint8_frames, unit_range
from lance_ds.model.weights import FRAME_VAE_DIR, describe_model_dir


def out_model_problem(out: str) -> str | None:
    """Why saving into `out` would overwrite another model's config.json (a ViT's, a diffusers VAE's, ...), or None.
    The tool's own earlier output, a frame VAE, is replaced as before: re-running into it is how it is retrained."""
    held = describe_model_dir(out)
    if held in (None, FRAME_VAE_DIR):
        return None
    return f"--out {out} already holds {held}, whose config.json the frame VAE would overwrite; choose another --out"


def draw_frames(count: int, split: str, size: int, resolution: int, seed: int) -> torch.Tensor:
    """uint8 [count, resolution, resolution, 3]: single frames (lance_ds.data.example.draw_training_frames), resized
    the way the loader resizes them."""
    frames = torch.from_numpy(draw_training_frames(count, split, size, seed)[:, 0])
    return resize_crop(frames, resolution, resolution)


def to_unit(frames: torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1], as the VAE sees pixels."""
    return unit_range(frames.permute(0, 3, 1, 2))


def train(net: FrameAutoencoder, frames: torch.Tensor, steps: int, batch_size: int, lr: float, kl_weight: float,
          seed: int, log_every: int = 250) -> None:
    """Reconstruction MSE of a posterior sample + kl_weight * KL to N(0, 1): the noise makes the decoder draw clean
    shapes from latents near, not only at, the ones it was trained on (what a generator produces)."""
    data = to_unit(frames)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = encoder_learning_rate(lr, step, steps)
        x = data[torch.randint(0, len(data), (batch_size,), generator=generator)]
        mean, logvar = net.posterior(x)
        z = mean + torch.randn(mean.shape, generator=generator) * torch.exp(0.5 * logvar)
        mse = (net.reconstruct(z) - x).pow(2).mean()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        loss = mse + kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            print(f"  step {step + 1}/{steps}: reconstruction mse {mse.item():.5f}, kl {kl.item():.3f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)


@torch.no_grad()
def latent_stats(net: FrameAutoencoder, frames: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the posterior means: the normalisation that gives unit-scale latents."""
    means = torch.cat([net.posterior(to_unit(chunk))[0] for chunk in frames.split(1024)])
    return means.mean(0).tolist(), means.std(0).clamp_min(1e-3).tolist()


@torch.no_grad()
def judge_reconstructions(vae: FrameVAE, count: int, size: int, seed: int) -> tuple[float, float]:
    """(image, video) accuracy of the judges on reconstructed held-out scenes."""
    rng = np.random.default_rng([seed, 7])
    side = vae.spatial_factor

    def roundtrip(frames: np.ndarray) -> np.ndarray:  # uint8 [T, S, S, 3] -> the same, through the codec
        pixels = to_unit(resize_crop(torch.from_numpy(np.array(frames)), side, side)).transpose(0, 1)[None]
        return to_uint8_frames(vae.decode(vae.encode(pixels))[0]).numpy()

    images = [draw_scene(rng, False, "val") for _ in range(count)]
    videos = [draw_scene(rng, True, "val") for _ in range(count)]
    image_ok = sum(bool(judge_image(roundtrip(render_image(s, size)), s.caption())) for s in images)
    video_ok = sum(bool(judge_video(roundtrip(render_video(s, size)), s.caption())) for s in videos)
    return image_ok / count, video_ok / count


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (config.json + model.safetensors)")
    p.add_argument("--resolution", type=int, default=32, help="frame side the codec takes (the gen groups' resolution)")
    p.add_argument("--latent-channels", type=int, default=16, help="numbers per frame")
    p.add_argument("--hidden", type=int, default=512, help="width of the encoder and decoder MLPs")
    p.add_argument("--frames", type=int, default=20000, help="distinct training frames")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--kl-weight", type=float, default=1e-4)
    p.add_argument("--size", type=int, default=64, help="side the scenes are drawn at (the example data's)")
    p.add_argument("--judge", type=int, default=200, help="held-out images and videos to judge at the end (0: none)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    problems = [f"--{k.replace('_', '-')} must be >= 1, got {v}" for k, v in vars(args).items()
                if k in ("resolution", "latent_channels", "hidden", "frames", "steps", "batch_size") and v < 1]
    if args.judge < 0:
        problems.append(f"--judge must be >= 0 (0: no judging), got {args.judge}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        problems.append(f"--lr must be a finite number > 0, got {args.lr}")
    if not (math.isfinite(args.kl_weight) and args.kl_weight >= 0):
        problems.append(f"--kl-weight must be a finite number >= 0, got {args.kl_weight}")
    if args.seed < 0:  # numpy seeds only non-negative integers
        problems.append(f"--seed must be >= 0, got {args.seed}")
    if args.size < 16:  # as make_example_dataset.py: smaller, the shapes are not recognisable
        problems.append(f"--size must be >= 16 pixels for the shapes to be recognisable, got {args.size}")
    if problem := output_problem("--out", args.out, directory=True) or out_model_problem(args.out):
        problems.append(problem)
    if args.resolution > args.size:
        problems.append(f"--resolution {args.resolution} is above --size {args.size}: the codec would learn upscaled "
                        "frames")
    if problems:
        print("train_example_vae: " + "; ".join(problems), file=sys.stderr)
        return 2
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    frames = draw_frames(args.frames, "train", args.size, args.resolution, args.seed)
    print(f"train_example_vae: {len(frames)} train-split frames at {args.resolution}x{args.resolution} "
          f"({time.perf_counter() - start:.0f} s)", flush=True)
    net = FrameAutoencoder(args.resolution, args.latent_channels, args.hidden)
    train(net, frames, args.steps, args.batch_size, args.lr, args.kl_weight, args.seed)
    net.eval()
    mean, std = latent_stats(net, frames)
    net.save(args.out, mean, std)
    summary = f"train_example_vae: wrote {Path(args.out) / 'model.safetensors'} " \
              f"({sum(p.numel() for p in net.parameters()):,} parameters) in {time.perf_counter() - start:.0f} s"
    if args.judge:
        vae = FrameVAE.from_pretrained(args.out)
        image_acc, video_acc = judge_reconstructions(vae, args.judge, args.size, args.seed)
        summary += f"; held-out reconstructions judged right: images {image_acc:.0%}, videos {video_acc:.0%}"
    print(summary, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
