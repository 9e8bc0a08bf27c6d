#!/usr/bin/env python
"""Answer decoding (i2t / v2t), measured side by side in one run:

  cached      objectives.decode_text: one forward over the packed prompts, then one token per prompt per step
              against their cached keys / values (what Generator.answer runs)
  recomputed  the same greedy answers with every step a full forward over prompts + answers so far (no cache)

Both decode the same packed prompts (image-question prompts of the shape the example data has) with the same
randomly initialised model; the answers must agree, and the ratio is the cache's speed-up.
    python bench/bench_decode.py [--size debug] [--prompts 8] [--new-tokens 32] [--repeats 3] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch


def prompts_batch(num_prompts: int, num_text_classes: int, vit_side: int):
    from lance_ds.model.synthetic import Text, Vit, synthetic_batch

    return synthetic_batch([[Text(24), Vit(1, vit_side, vit_side), Text(12)] for _ in range(num_prompts)],
                           num_text_classes, seed=1)


def grown(batch, answers: list[list[int]]):
    """The packed prompts with each one's answer so far appended to it (text after text), scored at each end."""
    from lance_ds.data.batch import AttnMode

    counts = torch.unique_consecutive(batch.sample_ids, return_counts=True)[1].tolist()
    ids, pos, samples, splits, modes, ends, vit_shift = [], [], [], [], [], [], []
    start = added = 0
    for sample, (count, answer) in enumerate(zip(counts, answers)):
        stop = start + count
        tail = torch.tensor(answer, dtype=torch.long, device=batch.input_ids.device)
        ids += [batch.input_ids[start:stop], tail]
        pos += [batch.position_ids[:, start:stop], batch.position_ids[:, stop - 1:stop] + tail.new_tensor(
            range(1, len(answer) + 1))]
        samples += [batch.sample_ids[start:stop], tail.new_full((len(answer),), sample)]
        splits += [batch.split_ids[start:stop], batch.split_ids[stop - 1].repeat(len(answer))]
        modes += [batch.attn_modes[start:stop], tail.new_full((len(answer),), int(AttnMode.CAUSAL))]
        vit_shift.append((start, stop, added))
        added += len(answer)
        ends.append(stop - 1 + added)
        start = stop
    shift = torch.zeros_like(batch.vit_indexes)
    for lo, hi, offset in vit_shift:
        shift[(batch.vit_indexes >= lo) & (batch.vit_indexes < hi)] = offset
    return dataclasses.replace(
        batch, input_ids=torch.cat(ids), position_ids=torch.cat(pos, dim=1), sample_ids=torch.cat(samples),
        split_ids=torch.cat(splits), attn_modes=torch.cat(modes), vit_indexes=batch.vit_indexes + shift,
        ce_indexes=torch.tensor(ends, device=shift.device), ce_targets=shift.new_zeros(len(ends)),
        ce_weights=torch.zeros(len(ends), device=shift.device), num_real_tokens=batch.num_real_tokens + added)


@torch.no_grad()
def recomputed(model, batch, vit_embeds, max_new_tokens: int) -> list[list[int]]:
    none = torch.zeros(0, model.cfg.latent_channels, device=batch.input_ids.device)  # the prompts hold no VAE tokens
    answers: list[list[int]] = [[] for _ in range(int(batch.sample_ids.max()) + 1)]
    for _ in range(max_new_tokens):
        logits = model(grown(batch, answers), vit_embeds, none, none[:, 0]).logits
        for answer, row in zip(answers, logits):
            answer.append(int(row.argmax()))
    return answers


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="debug")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--vit-side", type=int, default=8, help="ViT patches per side of each prompt's image (8: 16 tokens)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    from lance_ds.config.model import ModelConfig
    from lance_ds.model import build_model, encode_vit
    from lance_ds.objectives import decode_text

    torch.manual_seed(0)
    vocab = 2000
    bundle = build_model(ModelConfig(size=args.size, dtype="fp32", vit_dtype="fp32"), vocab, device=args.device)
    model = bundle.model.to(args.device).eval()
    batch = prompts_batch(args.prompts, vocab, args.vit_side).to(args.device)
    vit = encode_vit(bundle.vit, batch.vit_patches, batch.vit_grid_thw)
    sync = torch.cuda.synchronize if batch.input_ids.is_cuda else (lambda: None)
    runs = {"cached": lambda: decode_text(model, batch, vit, max_new_tokens=args.new_tokens),
            "recomputed": lambda: recomputed(model, batch, vit, args.new_tokens)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    answers = {}
    for _ in range(args.repeats):  # interleaved rounds: load bursts hit both alike
        for name, run in runs.items():
            sync()
            start = time.perf_counter()
            answers[name] = run()
            sync()
            times[name].append(time.perf_counter() - start)
    same = answers["cached"] == answers["recomputed"]
    print(f"{args.prompts} prompts of {batch.num_tokens // args.prompts} tokens, {args.new_tokens} new tokens each, "
          f"model {args.size} on {args.device}, best of {args.repeats} interleaved rounds")
    for name, values in times.items():
        print(f"{name:12s} {min(values):8.3f} s")
    print(f"cached vs recomputed: {min(times['recomputed']) / min(times['cached']):.1f}x faster; "
          f"answers {'identical' if same else 'DIFFER'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
