"""Flow matching on VAE latents (rectified flow, as Lance): timesteps, noising, velocity target, MSE, Euler sampler.

Shape legend:
  G  VAE blocks of the micro-batch (PackedBatch.vae_grid_thw rows);  N  latent tokens (t * h * w per block)
  z  latent channels

Convention: x_t = (1 - t) x_0 + t eps, so t = 0 is data and t = 1 is noise; the loss and the sampler use the velocity
dx_t/dt = eps - x_0. The flow head predicts that velocity (Lance), or, with objective.prediction = "data", the clean
x_0, turned into the velocity it implies, (x_t - x_0) / t: a head narrower than its tokens cannot carry the noise a
velocity holds, but the clean data of a simple world it can (pixel patches wider than the hidden size: the debug
model's codec). Target blocks draw one t each (logit-normal, shifted); condition blocks (edit sources) get
t = 0 (x_t = x_0) and carry no MSE. Sampling integrates from t = 1 down to 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lance_ds.config.model import PREDICTIONS, ObjectiveConfig
from lance_ds.data.batch import PackedBatch


def shift_timesteps(t: Tensor, shift: float) -> Tensor:
    """t' = s t / (1 + (s - 1) t): s > 1 moves mass toward t = 1 (more noise), where high-resolution latents need it."""
    return shift * t / (1 + (shift - 1) * t)


def sample_timesteps(num: int, shift: float, mean: float = 0.0, std: float = 1.0,
                     generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> Tensor:
    """[num] logit-normal timesteps: t = sigmoid(z), z ~ N(mean, std^2), then shifted."""
    z = torch.randn(num, generator=generator, device=device) * std + mean
    return shift_timesteps(torch.sigmoid(z), shift)


def token_blocks(vae_grid_thw: Tensor) -> Tensor:
    """[N] block index of every latent token (blocks are laid out one after the other, t*h*w tokens each)."""
    counts = vae_grid_thw.prod(dim=-1)
    return torch.repeat_interleave(torch.arange(counts.numel(), device=vae_grid_thw.device), counts)


@dataclass
class FlowInputs:
    """What the network gets and what its velocity is compared with, per latent token."""

    noisy: Tensor  # [N, z] x_t (x_0 itself for condition tokens)
    timesteps: Tensor  # [N] t per token (0 for conditions)
    target: Tensor  # [N, z] eps - x_0
    weights: Tensor  # [N] MSE weight: the block's vae_weights for targets, 0 for conditions


def prepare_flow(clean: Tensor, batch: PackedBatch, objective: ObjectiveConfig,
                 generator: torch.Generator | None = None, noise: Tensor | None = None,
                 block_timesteps: Tensor | None = None) -> FlowInputs:
    """Noise the clean latents x_0 [N, z] of `batch`'s VAE tokens (block after block, (t, h, w) raster).

    Timesteps are drawn per target block as `objective` says (timestep_shift, _mean, _std); objective.mse_per: block
    makes a target block's tokens share its weight, so a 9-frame video weighs what an image weighs; token (Lance):
    every token weighs the block's weight.
    noise / block_timesteps: given eps [N, z] and t [G] instead of drawing them (tests, parity with a reference).
    """
    blocks = token_blocks(batch.vae_grid_thw.to(clean.device))
    if blocks.numel() != clean.shape[0]:
        raise ValueError(f"{clean.shape[0]} latent tokens but vae_grid_thw describes {blocks.numel()}; the latents "
                         "must be the VAE blocks of the batch flattened in order")
    num_blocks = batch.vae_grid_thw.shape[0]
    is_target = batch.vae_is_target.to(clean.device).bool()
    if block_timesteps is None:
        block_timesteps = sample_timesteps(num_blocks, objective.timestep_shift, objective.timestep_mean,
                                           objective.timestep_std, generator, clean.device)
    block_timesteps = block_timesteps.to(clean.device)  # (given ones may live elsewhere, e.g. on the CPU)
    block_timesteps = torch.where(is_target, block_timesteps, torch.zeros_like(block_timesteps))
    t = block_timesteps[blocks]
    x0 = clean.float()
    eps = torch.randn(x0.shape, generator=generator, device=x0.device) if noise is None else noise.to(x0.device).float()
    noisy = (1 - t[:, None]) * x0 + t[:, None] * eps
    return FlowInputs(noisy=noisy, timesteps=t, target=eps - x0, weights=latent_weights(batch, objective, clean.device))


def latent_weights(batch: PackedBatch, objective: ObjectiveConfig, device: torch.device | None = None) -> Tensor:
    """[N] MSE weight of every latent token: its block's weight on targets, 0 on conditions (source latents).
    objective.mse_per: block divides a block's weight among its tokens. Known from the batch alone, before any
    latent exists (the trainer sums them over an optimizer step's micro-batches)."""
    blocks = token_blocks(batch.vae_grid_thw.to(device))
    block_weights = batch.vae_weights.to(device).float() * batch.vae_is_target.to(device).float()
    if objective.mse_per == "block":
        block_weights = block_weights / torch.bincount(blocks, minlength=batch.vae_grid_thw.shape[0]).clamp_min(1)
    return block_weights[blocks]


MIN_DATA_T = 0.05  # data prediction divides by t; below this the implied velocity would blow up


def as_velocity(output: Tensor, noisy: Tensor, timesteps: Tensor, prediction: str,
                min_t: float = MIN_DATA_T) -> Tensor:
    """The velocity [N, z] the flow head's output [N, z] stands for, given x_t [N, z] at times t [N].

    A data prediction x_0 stands for (x_t - x_0) / t, with t kept >= min_t: in training that bounds the loss near
    t = 0; the sampler passes 0 (its t is never 0), so that each Euler step lands exactly on the line through x_0.
    """
    if prediction == "velocity":
        return output
    if prediction == "data":
        return (noisy.float() - output.float()) / timesteps.float().clamp(min=min_t)[:, None]
    raise ValueError(f"objective.prediction must be one of {PREDICTIONS}, got {prediction!r}")


def mse_per_token(velocity: Tensor, target: Tensor) -> Tensor:
    """[N] mean squared error over the z channels of each token, in fp32."""
    return (velocity.float() - target.float()).pow(2).mean(dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# sampling

# (x_t, t, guided) -> (conditional velocity, unconditional velocity when guided else None), each shaped as x_t
VelocityFn = Callable[[Tensor, float, bool], tuple[Tensor, Tensor | None]]


def sampling_schedule(num_steps: int, shift: float, device: torch.device | str = "cpu") -> Tensor:
    """[num_steps + 1] times from 1 to 0: a shifted linspace(1, 0)."""
    return shift_timesteps(torch.linspace(1.0, 0.0, num_steps + 1, device=device, dtype=torch.float64), shift)


def guided_steps(times: Tensor, cfg_scale: float, cfg_interval: tuple[float, float]) -> list[bool]:
    """Per Euler step (from times[i]): whether classifier-free guidance applies, i.e. cfg_scale != 1 and the step
    starts inside cfg_interval (Lance: [0.4, 1]). Unguided steps need the conditional velocity only."""
    lo, hi = cfg_interval
    return [cfg_scale != 1.0 and lo <= float(t) <= hi for t in times[:-1]]


@torch.no_grad()
def euler_sample(velocity_fn: VelocityFn, noise: Tensor, times: Tensor, guided: list[bool],
                 cfg_scale: float = 4.0) -> Tensor:
    """Integrate dx/dt = v from times[0] = 1 (x = noise) to times[-1] = 0 with Euler steps; returns x_0.

    On guided steps v = v_u + cfg_scale (v_c - v_u) (classifier-free guidance); on the others v = v_c.
    """
    x = noise.float()
    for i, use_guidance in enumerate(guided):
        t, t_next = float(times[i]), float(times[i + 1])
        v, v_uncond = velocity_fn(x, t, use_guidance)
        v = v.float()
        if v_uncond is not None:
            v = v_uncond.float() + cfg_scale * (v - v_uncond.float())
        x = x + (t_next - t) * v
    return x


@dataclass
class SamplerInputs:
    """One prompt as the model sees it while sampling: the packed batch with its VAE tokens, and which of them are
    generated (the rest are clean conditions, e.g. the source image of an edit, kept at t = 0)."""

    batch: PackedBatch
    latents: Tensor  # [N, z] clean latents of condition tokens (rows of target tokens are ignored)
    target_mask: Tensor  # [N] bool, True for tokens being generated
    vit_embeds: Tensor | None = None  # [M, H] frozen-ViT tokens of the batch


def lance_velocity_fn(model: torch.nn.Module, cond: SamplerInputs, joint: SamplerInputs | None = None,
                      prediction: str = "velocity") -> VelocityFn:
    """A VelocityFn over LanceModel: x_t [n_target, z] is placed at the target tokens of the prompts' batch `cond`,
    and the velocity predicted there comes back. Guided steps run `joint` instead: the prompts followed by their
    caption-dropped twins in one batch (one forward for both velocities), x_t placed at the targets of each half."""

    def run(inputs: SamplerInputs, x: Tensor, t: float) -> Tensor:
        mask = inputs.target_mask
        latents = inputs.latents.float().clone()
        latents[mask] = x
        timesteps = torch.where(mask, torch.full_like(mask, t, dtype=torch.float32), torch.zeros_like(latents[:, 0]))
        pred = model(inputs.batch, inputs.vit_embeds, latents, timesteps)
        return as_velocity(pred.velocity[mask], x, timesteps[mask], prediction, min_t=0.0)

    def velocity(x: Tensor, t: float, guided: bool) -> tuple[Tensor, Tensor | None]:
        if not guided:
            return run(cond, x, t), None
        if joint is None:
            raise ValueError("a guided step needs the joint batch (prompts + caption-dropped twins)")
        v_cond, v_uncond = run(joint, torch.cat([x, x]), t).chunk(2)
        return v_cond, v_uncond

    return velocity
