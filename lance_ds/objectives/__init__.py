"""Objectives (DESIGN rule 1): everything between the network's predictions and a scalar loss, and the samplers.

  flow    timesteps (logit-normal + shift), noising, velocity target, per-token MSE, Euler sampler with CFG
  text    per-token CE, greedy / top-p decoding of packed prompts with a KV cache
  losses  named losses normalised by global token counts (rule 2)

A training step of `micro_steps` micro-batches, in the trainer:
    weights = step_weights(micro_batches, cfg.objective, device)   # the whole step's token counts, all ranks
    for batch in micro_batches:
        flow = prepare_flow(clean_latents, batch, cfg.objective, generator)
        pred = engine(batch, vit_embeds, flow.noisy, flow.timesteps)
        losses = compute_losses(pred.logits, pred.velocity, batch, flow, cfg.objective, step=weights,
                                micro_steps=micro_steps)
        engine.backward(losses.total)
"""

from .flow import (
                   PREDICTIONS,
                   FlowInputs,
                   SamplerInputs,
                   as_velocity,
                   euler_sample,
                   guided_steps,
                   lance_velocity_fn,
                   latent_weights,
                   mse_per_token,
                   prepare_flow,
                   sample_timesteps,
                   sampling_schedule,
                   shift_timesteps,
                   token_blocks,
)
from .losses import Losses, TokenLosses, compute_losses, normalised, step_weights, token_losses
from .text import ce_per_token, decode_text, pick_token

__all__ = [
    "PREDICTIONS", "FlowInputs", "Losses", "SamplerInputs", "TokenLosses", "as_velocity",
    "ce_per_token", "compute_losses", "decode_text", "euler_sample", "guided_steps", "lance_velocity_fn",
    "latent_weights", "mse_per_token", "normalised", "pick_token", "prepare_flow", "sample_timesteps", "sampling_schedule",
    "shift_timesteps", "step_weights", "token_blocks", "token_losses",
]
