"""Named losses, each normalised by its token count summed over ranks and micro-steps (DESIGN rule 2).

DeepSpeed averages gradients over ranks and divides each micro-step's loss by the number of micro-steps, so a
micro-step's loss is sum(w * l) * world_size * micro_steps / (sum of w over every rank and micro-step of the
optimizer step): every real token of the step weighs the same whether its rank or micro-batch had 3 of them or 3000.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lance_ds.config.model import ObjectiveConfig
from lance_ds.data.batch import PackedBatch
from lance_ds.distributed import sum_over_ranks, world_size

from .flow import FlowInputs, as_velocity, latent_weights, mse_per_token
from .text import ce_per_token


@dataclass
class TokenLosses:
    """Unweighted losses per scored position, and their weights (what per-task means are made of)."""

    ce: Tensor  # [C] per batch.ce_indexes
    ce_weights: Tensor  # [C]
    mse: Tensor  # [N] per latent token (zeros without a generation branch)
    mse_weights: Tensor  # [N] (flow.weights; zeros without a generation branch)


@dataclass
class Losses:
    """The losses of one micro-batch (tensors in the graph) and the global token counts they were divided by."""

    total: Tensor  # ce_weight * ce + mse_weight * mse; backpropagate this
    ce: Tensor
    mse: Tensor
    counts: Tensor  # [CE weight, MSE weight, CE positions, MSE latent tokens scored] over all ranks (step_weights)
    per_token: TokenLosses  # detached: per-task logging reads these instead of scoring the logits again

    # read on demand: each is a device -> host sync, which the training step does not need
    @property
    def num_ce_tokens(self) -> float:
        """Sum of CE weights over all ranks: what ce is divided by (Lance's n_ce_tokens)."""
        return float(self.counts[0])

    @property
    def num_mse_tokens(self) -> float:
        """Sum of MSE token weights over all ranks (with objective.mse_per=block: target blocks)."""
        return float(self.counts[1])

    @property
    def scored_tokens(self) -> tuple[float, float]:
        """CE positions and MSE latent tokens with weight > 0, all ranks."""
        return float(self.counts[2]), float(self.counts[3])


def normalised(per_token: Tensor, weights: Tensor, global_count: Tensor, num_ranks: int) -> Tensor:
    """sum(w * l) * world / global_sum(w); 0 (still in the graph) when no rank has a weighted token."""
    count = torch.where(global_count > 0, global_count, torch.ones_like(global_count))
    return (per_token * weights.to(per_token.dtype)).sum() * num_ranks / count


def step_weights(batches: list[PackedBatch], cfg: ObjectiveConfig, device: torch.device) -> Tensor:
    """[CE weight, MSE weight, CE positions, MSE latent tokens scored] summed over the micro-batches of one optimizer
    step on every rank (one all-reduce, in float64: counts stay exact): what compute_losses divides by."""
    mine = sum(_weight_counts(batch.ce_weights, latent_weights(batch, cfg)) for batch in batches)
    return sum_over_ranks(mine.to(device))


def _weight_counts(ce_w: Tensor, mse_w: Tensor) -> Tensor:
    ce_w, mse_w = ce_w.double(), mse_w.double().to(ce_w.device)
    return torch.stack([ce_w.sum(), mse_w.sum(), (ce_w > 0).sum(), (mse_w > 0).sum()])


def compute_losses(logits: Tensor, velocity: Tensor, batch: PackedBatch, flow: FlowInputs | None,
                   cfg: ObjectiveConfig, step: Tensor | None = None, micro_steps: int = 1) -> Losses:
    """CE on batch.ce_indexes (weights batch.ce_weights) and MSE on noised latents (weights flow.weights).

    logits [C, V'] and velocity [N, z] (the flow head's output: see objective.prediction) are the model's
    Predictions; flow is None for a model without generation.
    step: step_weights() of the optimizer step this batch is one of `micro_steps` micro-batches of; None: this
    batch is the whole step (one all-reduce then carries its counts).
    """
    tokens = token_losses(logits, velocity, batch, flow, cfg)
    ce_w, mse_w = tokens.ce_weights, tokens.mse_weights
    counts = sum_over_ranks(_weight_counts(ce_w, mse_w)) if step is None else step
    ranks = world_size() * micro_steps
    ce = normalised(tokens.ce, ce_w, counts[0].float(), ranks)
    mse = normalised(tokens.mse, mse_w, counts[1].float().to(tokens.mse.device), ranks)
    total = cfg.ce_weight * ce + cfg.mse_weight * mse
    detached = TokenLosses(tokens.ce.detach(), ce_w, tokens.mse.detach(), mse_w)
    return Losses(total=total, ce=ce, mse=mse, counts=counts, per_token=detached)


def token_losses(logits: Tensor, velocity: Tensor, batch: PackedBatch, flow: FlowInputs | None,
                 cfg: ObjectiveConfig) -> TokenLosses:
    """CE per scored position and MSE per latent token (on the velocity the flow head's output implies), in fp32;
    no communication."""
    ce_tok = ce_per_token(logits, batch.ce_targets)
    ce_w = batch.ce_weights.to(ce_tok.device).float()
    if flow is not None:
        velocity = as_velocity(velocity, flow.noisy, flow.timesteps, cfg.prediction)
        mse_tok, mse_w = mse_per_token(velocity, flow.target), flow.weights.float()
    else:
        mse_tok, mse_w = velocity.float().sum(-1) * 0.0, torch.zeros(velocity.shape[0], device=velocity.device)
    return TokenLosses(ce_tok, ce_w, mse_tok, mse_w)
