"""Text: cross-entropy on answer tokens, and greedy / sampled decoding for i2t / v2t answers.

Shape legend:
  C  scored positions (PackedBatch.ce_indexes);  V' = num_text_classes (len(tokenizer));  L  packed tokens
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from lance_ds.data.batch import AttnMode, PackedBatch


def ce_per_token(logits: Tensor, targets: Tensor) -> Tensor:
    """[C] cross-entropy of next-token logits [C, V'] against target ids [C], in fp32."""
    return F.cross_entropy(logits.float(), targets, reduction="none")


# ----------------------------------------------------------------------------------------------------------------
# decoding


def append_token(batch: PackedBatch, token_id: int) -> PackedBatch:
    """The batch with one more text token at the end of its last sample (in its trailing causal split).

    The new token's RoPE id is the last token's + 1 on all three axes (the last token is text, whose three ids
    agree); it is scored next, so ce_indexes becomes [L].
    """
    device = batch.input_ids.device
    last = batch.num_tokens - 1
    causal_tail = int(batch.attn_modes[last]) == AttnMode.CAUSAL
    split = batch.split_ids[last] if causal_tail else batch.split_ids.max() + 1

    def grow(x: Tensor, value) -> Tensor:
        return torch.cat([x, torch.as_tensor([value], dtype=x.dtype, device=device)])

    return dataclasses.replace(
        batch,
        input_ids=grow(batch.input_ids, token_id),
        position_ids=torch.cat([batch.position_ids, batch.position_ids[:, -1:] + 1], dim=1),
        sample_ids=grow(batch.sample_ids, batch.sample_ids[last]),
        split_ids=grow(batch.split_ids, split),
        attn_modes=grow(batch.attn_modes, int(AttnMode.CAUSAL)),
        ce_indexes=torch.tensor([last + 1], device=device),
        ce_targets=torch.zeros(1, dtype=torch.long, device=device),
        ce_weights=torch.zeros(1, device=device),
        num_real_tokens=batch.num_real_tokens + 1)


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
def decode_text(model: torch.nn.Module, prompt: PackedBatch, vit_embeds: Tensor | None = None,
                max_new_tokens: int = 64, eos_token_id: int | None = None, temperature: float = 0.0,
                top_p: float = 1.0, generator: torch.Generator | None = None, use_cache: bool = True,
                latents: Tensor | None = None, timesteps: Tensor | None = None, sync_group=None) -> list[int]:
    """Answer one prompt (a single-sample batch ending with `<|im_start|>assistant\n`); returns the new token ids
    (eos included when reached).

    model: a LanceModel (or a DeepSpeed engine around one). latents / timesteps: the prompt's VAE tokens [N, z] / [N]
    if it has any (clean conditions at t = 0 by default: zeros). use_cache: keep keys/values (LanceModel.prefill /
    extend) instead of re-running the whole sequence each token (same function, exercised by the tests).
    Under ZeRO-3 every rank must run the same number of forwards: pass sync_group (e.g. dist.group.WORLD) and a
    rank that reached eos keeps stepping (its extra tokens are dropped) until every rank of the group has, or
    max_new_tokens. None: this rank decodes alone (a plain model on one process).
    """
    model = getattr(model, "module", model)
    if int(prompt.sample_ids.unique().numel()) != 1:
        raise ValueError("decode_text takes a batch holding one sample (the prompt)")
    device = prompt.input_ids.device
    num_vae = prompt.vae_indexes.numel()
    if latents is None:
        latents = torch.zeros(num_vae, getattr(getattr(model, "cfg", None), "latent_channels", 0), device=device)
    if timesteps is None:
        timesteps = torch.zeros(num_vae, device=device)
    batch = dataclasses.replace(prompt, ce_indexes=torch.tensor([prompt.num_tokens - 1], device=device))
    if use_cache:
        pred, cache = model.prefill(batch, vit_embeds, latents, timesteps)
    else:
        pred = model(batch, vit_embeds, latents, timesteps)
    logits = pred.logits[-1]
    position = batch.position_ids[:, -1:]
    out: list[int] = []
    done = False
    for step in range(max_new_tokens):
        token = pick_token(logits, temperature, top_p, generator)
        if not done:
            out.append(token)
            done = eos_token_id is not None and token == eos_token_id
        # the step count, not len(out), ends the loop: it is the same on every rank of the group
        if step == max_new_tokens - 1 or all_ranks_done(done, device, sync_group):
            break
        position = position + 1  # text after text: the last token's id + 1 on all three axes
        if use_cache:
            logits = model.extend(torch.tensor([token], device=device), position, cache)[-1]
        else:
            batch = append_token(batch, token)
            logits = model(batch, vit_embeds, latents, timesteps).logits[-1]
    return out


def all_ranks_done(done: bool, device: torch.device, group=None) -> bool:
    """True when every rank of `group` is done; just `done` when group is None (no synchronisation)."""
    if group is None or dist.get_world_size(group) == 1:
        return done
    flag = torch.tensor([0 if done else 1], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return int(flag) == 0
