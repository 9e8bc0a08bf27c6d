"""One rank of the 2-rank ZeRO-3 branch test (run by tests/dist/test_zero3_branches.py under `deepspeed`).

Rank 0 gets an understanding-only batch (i2t) with a zero-weighted VAE placeholder block; rank 1 a generation-only
batch (t2i) with a zero-weighted ViT block and a zero-weighted CE position. Both run every trainable module each
step (DESIGN rule 3), so ZeRO-3's gathers and reduce-scatters match. Writes out_dir/rank{r}.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from datetime import timedelta
from pathlib import Path

import torch

NUM_CLASSES = 1000


def spatial_factor() -> int:
    from lance_ds.model.registry import SIZES

    return SIZES["debug"].vae.spatial_factor


def ds_config() -> dict:
    return {
        "bf16": {"enabled": True},  # the trainer's default precision: zero.Init builds the parameters in bf16
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                              "stage3_prefetch_bucket_size": 1000, "reduce_bucket_size": 1000},
        "steps_per_print": 10 ** 6,
    }


def batch_for(rank: int, placeholders: bool = True):
    from lance_ds.model.synthetic import Text, Vae, Vit, synthetic_batch

    SF = spatial_factor()  # pixels per latent row / column: Vae(t, h, w) blocks cover h * SF x w * SF pixels

    if not placeholders:  # beyond the data contract: each rank holds only its own branch's tokens
        if rank == 0:
            batch = synthetic_batch([[Text(4), Vit(1, 4, 4), Text(3), Text(6, scored=True)]], NUM_CLASSES, seed=rank)
            return dataclasses.replace(batch, vae_pixels=[])
        batch = synthetic_batch([[Text(5), Vae(1, 2, 3), Text(1)]], NUM_CLASSES, seed=rank)
        return dataclasses.replace(batch, vae_pixels=[torch.rand(1, 3, 1, 2 * SF, 3 * SF) * 2 - 1])
    if rank == 0:  # i2t + a VAE placeholder (weight 0) so the gen expert and heads run
        batch = synthetic_batch([[Text(4), Vit(1, 4, 4), Text(3), Text(6, scored=True)],
                                 [Vae(1, 1, 1, weight=0.0)]], NUM_CLASSES, seed=rank, tasks=["i2t", "pad"])
        pixels = [torch.zeros(1, 3, 1, SF, SF)]
    else:  # t2i + a ViT placeholder + a CE placeholder (weights 0) so lm_head and the und path run
        batch = synthetic_batch([[Text(5), Vae(1, 2, 3), Text(1)], [Vit(1, 2, 2), Text(2, scored=True)]],
                                NUM_CLASSES, seed=rank, tasks=["t2i", "pad"])
        batch = dataclasses.replace(batch, ce_weights=torch.zeros_like(batch.ce_weights))
        pixels = [torch.rand(1, 3, 1, 2 * SF, 3 * SF, generator=torch.Generator().manual_seed(rank)) * 2 - 1]
    return dataclasses.replace(batch, vae_pixels=pixels)


def train(mode: str, steps: int, rank: int) -> dict:
    placeholders = not mode.endswith("-bare")
    mode = mode.removesuffix("-bare")
    """Build (ZeRO-3), train `steps` steps on this rank's batch, report losses and which weights moved."""
    import deepspeed

    from lance_ds.config.model import LoraConfig, ModelConfig, ObjectiveConfig
    from lance_ds.model import build_model, encode_vit
    from lance_ds.model.build import gathered
    from lance_ds.objectives import compute_losses, prepare_flow

    torch.manual_seed(0)
    cfg = ModelConfig(size="debug", dtype="fp32", vit_dtype="fp32", gradient_checkpointing=True,
                      training_type="lora" if mode == "lora" else "full", vit_trainable=mode == "vit",
                      lora=LoraConfig(r=4, target_modules=["q_proj", "v_proj", "q_proj_moe_gen", "v_proj_moe_gen"]))
    config = ds_config()
    bundle = build_model(cfg, NUM_CLASSES, config)
    model = bundle.model
    params = dict(model.named_parameters())
    watched = ["llm2vae.weight", "language_model.lm_head.weight",
               "language_model.model.layers.1.mlp_moe_gen.down_proj.weight",
               "language_model.model.layers.1.mlp.down_proj.weight"]
    if mode == "vit":
        watched = ["vit_model.blocks.0.attn.qkv.weight", "vit_model.merger.mlp.2.weight"] + watched[:2]
    if mode == "lora":
        watched = [n for n in params if "lora_B" in n and "moe_gen" in n][:1] + \
                  [n for n in params if "lora_B" in n and "moe_gen" not in n][:1] + watched[:2]

    def snapshot():
        with gathered([params[n] for n in watched]):
            return {n: params[n].detach().clone() for n in watched}

    before = snapshot()
    engine, _, _, _ = deepspeed.initialize(model=model, config=config,
                                           model_parameters=[p for p in model.parameters() if p.requires_grad])
    batch = batch_for(rank, placeholders)
    objective = ObjectiveConfig()
    records = []
    for step in range(steps):
        vit = encode_vit(bundle.vit, batch.vit_patches, batch.vit_grid_thw) if bundle.vit is not None else None
        latents = torch.cat([bundle.vae.encode(p)[0].flatten(1).T for p in batch.vae_pixels] or
                            [torch.zeros(0, bundle.geometry.latent_channels)])  # [N, z] raster
        flow = prepare_flow(latents, batch, objective, torch.Generator().manual_seed(step * 10 + rank))
        pred = engine(batch, vit, flow.noisy, flow.timesteps)
        losses = compute_losses(pred.logits, pred.velocity, batch, flow, objective)
        engine.backward(losses.total)
        engine.step()
        ce_tokens, mse_tokens = losses.scored_tokens
        records.append({"train/loss": float(losses.total), "train/ce": float(losses.ce), "train/mse": float(losses.mse),
                        "train/ce_tokens": ce_tokens, "train/mse_tokens": mse_tokens})
    after = snapshot()
    decoded = decode_answers(engine, bundle, rank) if mode == "full" else None
    return {"records": records, "decoded": decoded, "changed": {n: bool((after[n] - before[n]).abs().max() > 0) for n in watched},
            "zero_at_start": [n for n in watched if "lora_B" in n and not before[n].abs().max() > 0],
            "trainable": sorted(n for n, p in params.items() if p.requires_grad)[:3],
            "finite": all(math.isfinite(r["train/loss"]) for r in records)}


def decode_answers(engine, bundle, rank: int) -> list[int]:
    """Greedy answers through the ZeRO-3 engine with the KV cache: rank 0 stops at eos after one token, rank 1 runs
    to max_new_tokens; both keep stepping together, so neither waits forever on the other."""
    from lance_ds.model import encode_vit
    from lance_ds.model.synthetic import Text, Vit, synthetic_batch
    from lance_ds.objectives import decode_text

    prompt = synthetic_batch([[Text(3), Vit(1, 4, 4), Text(4)]], NUM_CLASSES, seed=rank)
    vit = encode_vit(bundle.vit, prompt.vit_patches, prompt.vit_grid_thw)
    first = decode_text(engine, prompt, vit, max_new_tokens=1)[0]
    return decode_text(engine, prompt, vit, max_new_tokens=4, eos_token_id=first[0] if rank == 0 else None)[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--modes", default="full,lora")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()

    import deepspeed

    deepspeed.init_distributed(timeout=timedelta(seconds=60))
    rank = int(os.environ["RANK"])
    result = {mode: train(mode, args.steps, rank) for mode in args.modes.split(",")}
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # a clean exit: a live gloo group can abort the process at teardown
    from lance_ds.engine import release_shm_buffer

    release_shm_buffer()  # as init_distributed does: DeepSpeed leaves its CPU all-reduce buffer in /dev/shm


if __name__ == "__main__":
    main()
