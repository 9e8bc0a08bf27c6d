#!/usr/bin/env python
"""Pretrain the debug model's ViT on the example world: the frozen understanding encoder of the README's main job.

  python tools/train_example_vit.py --vae example_vae/ --out example_vit/     # ~1.5 min on 2 CPU cores
  ... model.vit_path=example_vit model.vit_trainable=false

Lance fine-tunes on top of a pretrained, frozen ViT (Qwen2.5-VL's); a randomly initialised one has nothing to offer,
and learning one inside the main job's few hundred steps, next to five other tasks, left understanding at about
half right. This tool gives the debug model what a pretrained ViT gives Lance, without labels: the tower (the model
size's geometry) learns to tell, from its merged tokens averaged over a frame pair, the example frame VAE's latents
of both frames (distillation: the VAE already encodes colour, shape and place). Frame pairs are an image twice or
two consecutive video frames, drawn from train-split scenes at the data's 64 px, coded like the dataset codes them,
and resized to --resolution (the understanding groups') the way the loader resizes them.

The output directory holds `vit.safetensors` (Lance's ViT names without the `vit_model.` prefix) and a config.json
with its vision_config. At the end the program prints the share of the held-out latents' variance the tower
explains. The same flags give the same weights on the same machine.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from lance_ds.config.core import output_problem, to_dict
from lance_ds.data.example import draw_training_frames, encoder_learning_rate
from lance_ds.data.sequence import VisionGeometry, resize_crop, vit_patch_order
from lance_ds.model.registry import SIZES
from lance_ds.model.vae import FrameVAE, unit_range
from lance_ds.model.weights import EXAMPLE_VIT_DIR, FRAME_VAE_DIR, describe_model_dir, save_safetensors
from lance_ds.model.vision import VitConfig, build_vision_tower, normalise_patches

PAIR = 2  # frames per item: Qwen2.5-VL's temporal patch


def model_dir_problems(vae: str, out: str) -> list[str]:
    """Why --vae is not a frame VAE, and why saving into --out would overwrite another model's config.json (the frame
    VAE's, a Qwen2.5-VL's, ...). The tool's own earlier output, a ViT, is replaced as before: that is how it is
    retrained."""
    problems = []
    held = describe_model_dir(vae)
    if held is None:
        problems.append(f"--vae {vae} has no config.json: train the frame VAE first "
                        f"(python tools/train_example_vae.py --out {vae})")
    elif held != FRAME_VAE_DIR:
        problems.append(f"--vae {vae} holds {held}, not a frame VAE: pass a tools/train_example_vae.py output")
    if Path(out).resolve() == Path(vae).resolve():
        problems.append(f"--out {out} is the --vae directory: the ViT's config.json would replace the frame VAE's; "
                        "choose another --out")
    elif (held := describe_model_dir(out)) not in (None, EXAMPLE_VIT_DIR):
        problems.append(f"--out {out} already holds {held}, whose config.json the ViT would overwrite; choose another "
                        "--out")
    return problems


def patch_geometry(vit: VitConfig) -> VisionGeometry:
    """What vit_patch_order needs to know about the tower."""
    return VisionGeometry(vit_patch_size=vit.patch_size, vit_temporal_patch=vit.temporal_patch_size,
                          vit_merge_size=vit.spatial_merge_size)


class Pairs:
    """Frame pairs ready for the tower (uint8, patchified per batch) and their distillation targets [N, 2 * z]."""

    def __init__(self, frames: torch.Tensor, vae: FrameVAE, resolution: int, geometry: VisionGeometry):
        count = frames.shape[0]
        flat = frames.flatten(0, 1)  # [N * 2, size, size, 3]
        self.frames = resize_crop(flat, resolution, resolution).view(count, PAIR, resolution, resolution, 3)
        side = vae.frame_size
        pixels = unit_range(resize_crop(flat, side, side).view(count, PAIR, side, side, 3).permute(0, 4, 1, 2, 3))
        pixels = pixels.contiguous()
        self.targets = torch.cat([vae.encode(chunk)[..., 0, 0].transpose(1, 2).flatten(1)
                                  for chunk in pixels.split(1024)])
        self.geometry = geometry

    def __len__(self) -> int:
        return self.frames.shape[0]

    def patches(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(patches [B * P, D], grid_thw [B, 3]) of the items at `index`."""
        blocks = [vit_patch_order(self.frames[i].permute(0, 3, 1, 2), self.geometry) for i in index.tolist()]
        grid = torch.tensor([b[1] for b in blocks])
        return normalise_patches(torch.cat([b[0] for b in blocks])), grid


class Distiller(torch.nn.Module):
    """The tower, its merged tokens averaged over each item, and a linear read-out of the 2 * z latents."""

    def __init__(self, vit_cfg: VitConfig, outputs: int):
        super().__init__()
        self.tower = build_vision_tower(vit_cfg)
        self.readout = torch.nn.Linear(vit_cfg.out_hidden_size, outputs)

    def forward(self, patches: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        tokens = self.tower(patches, grid_thw=grid).pooler_output  # [B * M, H], item by item
        return self.readout(tokens.view(grid.shape[0], -1, tokens.shape[-1]).mean(1))


def train(net: Distiller, pairs: Pairs, steps: int, batch_size: int, lr: float, seed: int,
          log_every: int = 200) -> None:
    """MSE to the VAE's (unit-scale) latents; warmup, then cosine to 5% of the peak learning rate."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = encoder_learning_rate(lr, step, steps)
        index = torch.randint(0, len(pairs), (batch_size,), generator=generator)
        loss = (net(*pairs.patches(index)) - pairs.targets[index]).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            print(f"  step {step + 1}/{steps}: distillation mse {loss.item():.4f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)


@torch.no_grad()
def explained_variance(net: Distiller, pairs: Pairs) -> float:
    """1 - MSE / variance of the targets over `pairs`: 1 reads the latents exactly, 0 knows only their mean."""
    predictions = torch.cat([net(*pairs.patches(index)) for index in torch.arange(len(pairs)).split(256)])
    return 1.0 - float((predictions - pairs.targets).pow(2).mean() / pairs.targets.var(0).mean())


def save(net: Distiller, vit_cfg: VitConfig, out: str | Path) -> Path:
    """vit.safetensors + config.json {"vision_config": ...}: a model.vit_path directory."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors({k: v.detach().contiguous() for k, v in net.tower.state_dict().items()}, out / "vit.safetensors")
    (out / "config.json").write_text(json.dumps({"vision_config": to_dict(vit_cfg)}, indent=2))
    return out / "vit.safetensors"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", required=True, help="the example frame VAE directory (tools/train_example_vae.py)")
    p.add_argument("--out", required=True, help="output directory (vit.safetensors + config.json)")
    p.add_argument("--model-size", default="debug", choices=sorted(SIZES), help="whose ViT geometry to pretrain")
    p.add_argument("--resolution", type=int, default=56, help="frame side the tower sees (the und groups' resolution)")
    p.add_argument("--pairs", type=int, default=6000, help="distinct training frame pairs")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--size", type=int, default=64, help="side the scenes are drawn at (the example data's)")
    p.add_argument("--held-out", type=int, default=500, help="val-split pairs to measure the tower on (0: none)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    spec = SIZES[args.model_size]
    geometry = patch_geometry(spec.vit)
    problems = [f"--{k.replace('_', '-')} must be >= 1, got {v}" for k, v in vars(args).items()
                if k in ("pairs", "steps", "batch_size") and v < 1]
    if args.held_out < 0:
        problems.append(f"--held-out must be >= 0 (0: none), got {args.held_out}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        problems.append(f"--lr must be a finite number > 0, got {args.lr}")
    if args.seed < 0:  # numpy seeds only non-negative integers
        problems.append(f"--seed must be >= 0, got {args.seed}")
    if args.size < 16:  # as make_example_dataset.py: smaller, the shapes are not recognisable
        problems.append(f"--size must be >= 16 pixels for the shapes to be recognisable, got {args.size}")
    if problem := output_problem("--out", args.out, directory=True):
        problems.append(problem)
    if args.resolution < geometry.vit_multiple or args.resolution % geometry.vit_multiple:
        problems.append(f"--resolution must be a multiple of {geometry.vit_multiple} (patch x merge), got "
                        f"{args.resolution}")
    problems += model_dir_problems(args.vae, args.out)
    if problems:
        print("train_example_vit: " + "; ".join(problems), file=sys.stderr)
        return 2
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    vae = FrameVAE.from_pretrained(args.vae)
    pairs = Pairs(torch.from_numpy(draw_training_frames(args.pairs, "train", args.size, args.seed, span=PAIR)), vae,
                  args.resolution, geometry)
    print(f"train_example_vit: {len(pairs)} train-split frame pairs at {args.resolution}x{args.resolution} "
          f"({time.perf_counter() - start:.0f} s)", flush=True)
    net = Distiller(spec.vit, pairs.targets.shape[1])
    train(net, pairs, args.steps, args.batch_size, args.lr, args.seed)
    net.eval()
    path = save(net, spec.vit, args.out)
    summary = f"train_example_vit: wrote {path} ({sum(p.numel() for p in net.tower.parameters()):,} parameters) " \
              f"in {time.perf_counter() - start:.0f} s"
    if args.held_out:
        held_out = Pairs(torch.from_numpy(draw_training_frames(args.held_out, "val", args.size, args.seed, span=PAIR)),
                         vae, args.resolution, geometry)
        summary += f"; held-out frame VAE latents explained: {explained_variance(net, held_out):.1%}"
    print(summary, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
