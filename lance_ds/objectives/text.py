"""Text: cross-entropy on answer tokens, and greedy / sampled decoding for i2t / v2t answers.

Shape legend:
  C  scored positions (PackedBatch.ce_indexes);  V' = num_text_classes (len(tokenizer));  L  packed tokens
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

from lance_ds.data.batch import PAD_TASK, AttnMode, PackedBatch
from lance_ds.distributed import max_over_ranks


def ce_per_token(logits: Tensor, targets: Tensor) -> Tensor:
    """[C] cross-entropy of next-token logits [C, V'] against target ids [C], in fp32."""
    return F.cross_entropy(logits.float(), targets, reduction="none")


# ----------------------------------------------------------------------------------------------------------------
# decoding


def pick_token(logits: Tensor, temperature: float = 0.0, top_p: float = 1.0,
               generator: torch.Generator | None = None) -> int:
    """Greedy when temperature == 0, else sample from softmax(logits / temperature) cut to the top-p nucleus."""
    logits = logits.float()
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (the top token always stays)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    if generator is not None:  # sample where the generator lives: a CPU one (sample_generator's) draws the same
        probs = probs.to(generator.device)  # tokens for logits on any device; multinomial refuses a mismatch
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


@torch.no_grad()
def decode_text(model: torch.nn.Module, prompts: PackedBatch, vit_embeds: Tensor | None = None,
                latents: Tensor | None = None, timesteps: Tensor | None = None, max_new_tokens: int = 64,
                eos_token_id: int | None = None, temperature: float = 0.0, top_p: float = 1.0,
                generators: list[torch.Generator | None] | None = None,
                done: list[bool] | None = None) -> list[list[int]]:
    """Answer every prompt of a packed batch (each sample ends with `<|im_start|>assistant\n`) with a KV cache: one
    forward over the prompts, then one over a token per prompt per step. Returns each prompt's new token ids (eos
    included when reached).

    model: a LanceModel (or a DeepSpeed engine around one). prompts: collated prompts, each sample one contiguous
    run, no padding sample. latents / timesteps: the prompts' VAE tokens [N, z] / [N] (default: zeros, clean at
    t = 0). generators: one per prompt, for sampling (temperature > 0). done: prompts that need no answer (a rank's
    idle placeholder), decoded in step with the others.
    Collective whenever a process group is initialised (every rank must call it): under ZeRO-3 every forward is, so a
    rank keeps stepping until the prompts of every rank are done (or max_new_tokens); the ranks agree after each step.
    """
    model = getattr(model, "module", model)
    device = prompts.input_ids.device
    ids, counts = torch.unique_consecutive(prompts.sample_ids, return_counts=True)
    ends = counts.cumsum(0) - 1  # each prompt's last token: its answer is scored there, then continues it
    num_prompts = ends.numel()
    if ids.unique().numel() != num_prompts or PAD_TASK in prompts.tasks:
        raise ValueError("decode_text takes collated prompts: each sample one contiguous run, no padding sample")
    if bool((prompts.attn_modes[ends] != int(AttnMode.CAUSAL)).any()):
        raise ValueError("every prompt must end with text (`<|im_start|>assistant\n`): an answer continues its "
                         "trailing causal split")
    num_vae = prompts.vae_indexes.numel()
    if latents is None:
        latents = torch.zeros(num_vae, model.cfg.latent_channels, device=device)
    if timesteps is None:
        timesteps = torch.zeros(num_vae, device=device)
    generators = generators or [None] * num_prompts
    done = list(done or [False] * num_prompts)
    if len(generators) != num_prompts or len(done) != num_prompts:
        raise ValueError(f"{num_prompts} prompts need one generator and one done flag each, got {len(generators)} "
                         f"and {len(done)}")
    pred, cache = model.prefill(dataclasses.replace(prompts, ce_indexes=ends), vit_embeds, latents, timesteps)
    logits = pred.logits  # [prompts, V']
    positions, sample_ids = prompts.position_ids[:, ends], prompts.sample_ids[ends]  # [3, prompts], [prompts]
    answers: list[list[int]] = [[] for _ in range(num_prompts)]
    for step in range(max_new_tokens):
        if temperature <= 0:  # greedy: every prompt's token in one device-to-host copy
            tokens = logits.float().argmax(dim=-1).tolist()
        else:  # sampled prompt by prompt, each from its own generator (none drawn for a prompt that is done)
            tokens = [pick_token(logits[i], temperature, top_p, generators[i]) if not done[i] else 0
                      for i in range(num_prompts)]
        for i, token in enumerate(tokens):
            if not done[i]:
                answers[i].append(token)
                done[i] = token == eos_token_id
        # the step count, not the answers, ends the loop: it is the same on every rank
        if step == max_new_tokens - 1 or not max_over_ranks(not all(done), device):
            break
        positions = positions + 1  # text after text: the last token's RoPE id + 1 on all three axes
        logits = model.extend(torch.tensor(tokens, device=device), positions, sample_ids, cache)
    return answers
