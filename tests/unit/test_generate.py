"""lance_ds.generate: inference prompts, packed generation for t2i / t2v / i2i / v2v, batched answers for i2t / v2t,
from a live ZeRO-3 engine on 2 ranks, from a training checkpoint and from an export, and the CLI end to end.

One launch of the real `deepspeed` launcher (2 CPU ranks) trains the debug model for 3 steps with the real Trainer
(ZeRO-3, EMA) and a LoRA variant, saves their checkpoints, records references (gathered weights and EMA, the
trainer's frozen ViT, predictions on a fixed batch) and runs the Generator on the live engine on both ranks. This
file is also that worker (`python test_generate.py --worker ...`); tests/unit/test_export.py uses the same runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
NUM_STEPS = 3  # Euler steps in these tests (30 in real use; the code path is the same)
MAX_NEW_TOKENS = 6

RUN_YAML = """\
model:
  size: debug
data:
  packing_length: 512
  num_workers: 0
train:
  max_steps: 3
  lr: 1.0e-2
  warmup_steps: 1
  precision: fp32
checkpoint:
  save_every: 3
log:
  every: 1
  progress_bar: false
"""


# ----------------------------------------------------------------------------------------------------------------
# inputs shared by the worker and the tests


def probe_samples() -> list:
    """One fixed sample per task, made of example-world media (no target media: sizes come from the defaults)."""
    from lance_ds.data.batch import Sample
    from lance_ds.data.example import SYSTEM_PROMPT, draw_scene, render_image, render_video

    rng = np.random.default_rng(7)
    image = torch.from_numpy(np.array(render_image(draw_scene(rng, False, "val"))))
    video = torch.from_numpy(np.array(render_video(draw_scene(rng, True, "val"))))
    return [
        Sample("t2i", {"caption": "a red circle"}, {}, key="t2i"),
        Sample("t2v", {"caption": "a blue square moving left"}, {}, key="t2v"),
        Sample("i2i", {"caption": "make it green"}, {"input_image": image}, key="i2i"),
        Sample("v2v", {"caption": "make it yellow"}, {"input_video": video}, key="v2v"),
        Sample("i2t", {"caption_q": "What colour is the shape?", "caption_i": SYSTEM_PROMPT}, {"image": image},
               key="i2t"),  # (the example rows' caption_i: the CLI's answer is this sample's)
        Sample("v2t", {"caption_q": ""}, {"video": video}, key="v2t"),
    ]


def gen_samples():
    return probe_samples()[:4]


def und_samples():
    return probe_samples()[4:]


def reference_inputs(vit, latent_channels: int, num_text_classes: int):
    """A fixed packed batch (text, ViT block, noised latents, scored text) and its encoder outputs."""
    from lance_ds.model import encode_vit
    from lance_ds.model.synthetic import Text, Vae, Vit, random_latents, synthetic_batch

    batch = synthetic_batch([[Text(5, scored=True), Vit(1, 4, 4), Vae(1, 2, 3), Text(4, scored=True)],
                             [Text(6, scored=True)]], num_text_classes=num_text_classes, seed=3)
    vit_embeds = encode_vit(vit, batch.vit_patches, batch.vit_grid_thw) if vit is not None else None  # (None:
    # the model holds a trainable ViT)
    latents = random_latents(batch, latent_channels, seed=4)
    return batch, vit_embeds, latents, torch.full((latents.shape[0],), 0.6)


# ----------------------------------------------------------------------------------------------------------------
# the 2-rank worker (run under the deepspeed launcher)


def train(run_yaml: Path, out: Path, dataset: Path, ds_json: Path, *overrides: str, resume: str = "none"):
    from lance_ds.config import load_and_check
    from lance_ds.trainer import Trainer

    args = [f"dataset_config={dataset}", f"output_dir={out}", *overrides]
    run, ds_config = load_and_check(str(run_yaml), args, str(ds_json), int(os.environ["WORLD_SIZE"]))
    trainer = Trainer(run, ds_config, resume=resume)
    trainer.train()
    return trainer


def gathered_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    import deepspeed

    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return {n: p.detach().float().clone() for n, p in module.named_parameters()}


def gathered_ema(ema) -> dict[str, torch.Tensor]:
    """Full EMA tensors from the live per-rank partitions (independent of the files the export reads)."""
    import torch.distributed as dist

    out = {}
    for name, shard in ema.shadow.items():
        parts = [torch.empty_like(shard) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, shard.contiguous())
        numel = int(torch.Size(ema.shapes[name]).numel())
        out[name] = torch.cat([p.flatten() for p in parts])[:numel].view(ema.shapes[name]).clone()
    return out


@torch.no_grad()
def engine_predictions(trainer) -> dict[str, torch.Tensor]:
    engine = trainer.engine
    engine.eval()
    batch, vit_embeds, latents, t = reference_inputs(trainer.parts.vit, trainer.parts.geometry.latent_channels,
                                                     len(trainer.tokenizer))
    pred = engine(batch, vit_embeds, latents, t)
    engine.train()
    return {"logits": pred.logits.float(), "velocity": pred.velocity.float()}


def count_forwards(module: torch.nn.Module) -> list[int]:
    counter = [0]
    module.register_forward_pre_hook(lambda *_: counter.__setitem__(0, counter[0] + 1))
    return counter


def generator_phases(trainer, rank: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """The Generator on the live ZeRO-3 engine, called by both ranks: same inputs; answers that end at different
    steps; fewer prompts on one rank (it runs idle batches); and requests that cannot be evened out, which must be
    refused on both ranks instead of hanging."""
    from lance_ds.data.batch import Sample
    from lance_ds.generate import Generator

    gen = Generator(trainer.engine, trainer.parts.vit, trainer.parts.vae, trainer.planner, trainer.tokenizer,
                    trainer.cfg.objective)
    forwards = count_forwards(trainer.engine.module.language_model.model)  # the decoder: prefill, extend, forward
    record: dict = {"forwards": {}}
    videos = gen.generate(gen_samples(), num_steps=NUM_STEPS)
    record["forwards"]["generate"] = forwards[0]
    record["answers"] = gen.answer(und_samples(), max_new_tokens=MAX_NEW_TOKENS)
    record["forwards"]["answer"] = forwards[0] - record["forwards"]["generate"]
    # rank 0 stops at its first token (its eos is that token), rank 1 never stops: both must run 6 forwards
    first = gen.answer_ids(und_samples()[:1], max_new_tokens=1)[0][0]
    before = forwards[0]
    eos = first if rank == 0 else -1
    record["uneven_ids"] = gen.answer_ids([und_samples()[rank]], max_new_tokens=MAX_NEW_TOKENS, eos_token_id=eos)[0]
    record["first_token"] = first
    record["forwards"]["uneven"] = forwards[0] - before
    gen.max_batch_tokens = 1  # one prompt per forward batch
    # uneven work: rank 1 has two prompts (two forward batches), rank 0 one; then rank 0 has none at all
    before = forwards[0]
    record["uneven_answers"] = gen.answer(und_samples()[:rank + 1], max_new_tokens=2)
    record["uneven_videos"] = len(gen.generate(gen_samples()[:rank], num_steps=2))
    record["forwards"]["uneven_prompts"] = forwards[0] - before
    unplannable = Sample("i2t", {"caption_q": "?"}, {}, key="no-image")
    record["refused"] = []
    for call in (lambda: gen.generate(gen_samples()[:1], num_steps=2 + rank),
                 lambda: gen.answer([und_samples()[0] if rank == 0 else unplannable], max_new_tokens=2)):
        try:
            call()
            record["refused"].append("")
        except ValueError as e:  # GenerateError, or the planner's PlanError on the rank whose sample is bad
            record["refused"].append(str(e))
    return record, {f"video.{i}": v for i, v in enumerate(videos)}


def run_worker(out: Path, dataset: Path, ds_json: Path) -> None:
    from safetensors.torch import save_file

    from lance_ds.generate import Generator

    run_yaml = out / "run.yaml"
    rank = int(os.environ["RANK"])
    trainer = train(run_yaml, out / "full", dataset, ds_json, "train.ema_decay=0.5")
    reference = {f"weights.{k}": v for k, v in gathered_state(trainer.engine.module).items()}
    reference.update({f"ema.{k}": v for k, v in gathered_ema(trainer.ema).items()})
    reference.update({f"pred.{k}": v for k, v in engine_predictions(trainer).items()})
    reference.update({f"vit.{k}": v.float() for k, v in trainer.parts.vit.state_dict().items()})
    record, videos = generator_phases(trainer, rank)
    with trainer.ema.applied(trainer.engine.optimizer):  # as validation.weights=ema validates
        reference.update({f"applied.{k}": v for k, v in gathered_state(trainer.engine.module).items()})
        gen = Generator(trainer.engine, trainer.parts.vit, trainer.parts.vae, trainer.planner, trainer.tokenizer,
                        trainer.cfg.objective)
        videos.update({f"ema_video.{i}": v for i, v in enumerate(gen.generate(gen_samples(), num_steps=NUM_STEPS))})
    reference.update({f"after.{k}": v for k, v in gathered_state(trainer.engine.module).items()})
    trainer.tb.close()  # not trainer.close(): that ends the process group, which the LoRA run below still needs
    # with a trainable ViT, which trains whole beside the adapters
    lora_args = ("model.training_type=lora", "model.lora.r=4", "model.vit_trainable=true")
    lora = train(run_yaml, out / "lora", dataset, ds_json, *lora_args)
    reference.update({f"lora_pred.{k}": v for k, v in engine_predictions(lora).items()})
    lora_state = gathered_state(lora.engine.module)
    lora.close(finished=False)  # all but the process group, which the resumed run takes on (its HfDeepSpeedConfig
    # lives on: the resumed run's config check must not build under it)
    # the same run again resumes from its last checkpoint: adapters, the ViT it trains whole and the rest as trained
    resumed = train(run_yaml, out / "lora", dataset, ds_json, *lora_args, resume="latest")
    record["lora_resumed_step"] = resumed.step
    record["muon_kernels_compiled"] = "deepspeed.runtime.zero.muon.original_muon" in sys.modules  # (three engines built)
    record["lora_resumed_differs"] = sorted(n for n, v in gathered_state(resumed.engine.module).items()
                                            if not torch.equal(v, lora_state[n]))
    record["lora_trained"] = sorted({n.split(".lora_")[0].rsplit(".", 1)[-1] if ".lora_" in n else n.split(".")[0]
                                     for n, p in resumed.engine.module.named_parameters() if p.requires_grad})
    resumed.close()
    save_file({k: v.contiguous() for k, v in videos.items()}, str(out / f"videos_rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    if rank == 0:
        save_file({k: v.contiguous() for k, v in reference.items()}, str(out / "reference.safetensors"))


# ----------------------------------------------------------------------------------------------------------------
# the launch, once per session: the trained_runs fixture (tests/conftest.py) runs it; test_export.py uses it too


def launch_runs(root: Path) -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import free_port, make_shards

    dataset = make_shards(root, "train", 4, tasks=("t2i", "i2t"))
    ds = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    # partition all but the norms (192 elements): tiny params too (test rule), and some persistent ones, which ZeRO-3
    # keeps gathered (the EMA swap must gather them again)
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 200
    (root / "ds.json").write_text(json.dumps(ds))
    (root / "run.yaml").write_text(RUN_YAML)
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port", str(free_port()),
           __file__, "--worker", "--out", str(root), "--dataset", str(dataset), "--ds_json", str(root / "ds.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        raise AssertionError(f"the 2-rank worker hung:\n{log[-4000:]}")
    (root / "worker.log").write_text(log)
    assert proc.returncode == 0, f"the 2-rank worker failed ({proc.returncode}):\n{log[-5000:]}"
    from safetensors.torch import load_file

    return {"root": root, "full": root / "full", "lora": root / "lora",
            "ranks": [json.loads((root / f"rank{r}.json").read_text()) for r in (0, 1)],
            "videos": [load_file(str(root / f"videos_rank{r}.safetensors")) for r in (0, 1)],
            "reference": load_file(str(root / "reference.safetensors"))}


# ----------------------------------------------------------------------------------------------------------------
# prompts (no model needed)


@pytest.fixture(scope="module")
def planner():
    from lance_ds.data.sequence import SequencePlanner, VisionGeometry
    from lance_ds.data.tokenizer import load_tokenizer

    return SequencePlanner(load_tokenizer(), VisionGeometry(vae_spatial_factor=8, max_latent_size=32,
                                                             max_latent_frames=9))


def test_answer_prompt_is_the_training_sequence_up_to_the_answer(planner):
    from lance_ds.data.batch import Sample

    for sample in und_samples():
        full = planner.plan(dataclasses.replace(sample, texts={**sample.texts, "caption_a": "a red circle"}))
        prompt = planner.prompt(sample)
        n = prompt.num_tokens
        assert torch.equal(full.input_ids[:n], prompt.input_ids)
        assert torch.equal(full.position_ids[:, :n], prompt.position_ids)
        assert planner.tokenizer.decode(prompt.input_ids[-3:].tolist()).endswith("<|im_start|>assistant\n")
        assert full.ce_positions[0] == n - 1 and prompt.ce_targets.numel() == 0
        assert [b.grid_thw for b in prompt.vit] == [b.grid_thw for b in full.vit]
    with pytest.raises(ValueError, match="needs 'image' media"):
        planner.prompt(Sample("i2t", {"caption_q": "?"}, {}))


def test_generation_prompt_has_the_training_layout_and_a_caption_dropped_twin(planner):
    from lance_ds.config.data import GroupConfig
    from lance_ds.data.batch import AttnMode

    no_dropout = GroupConfig(name="g", task="t2v", caption_dropout=0.0)
    t2v = gen_samples()[1]
    target = torch.zeros(9, 64, 64, 3, dtype=torch.uint8)
    trained = planner.plan(dataclasses.replace(t2v, media={"video": target}), no_dropout)
    prompt = planner.prompt(t2v, no_dropout, target_shape=(9, 64, 64))
    assert torch.equal(trained.input_ids, prompt.input_ids) and torch.equal(trained.position_ids, prompt.position_ids)
    assert trained.split_modes == prompt.split_modes and prompt.vae[-1].grid_thw == (3, 8, 8)
    # a held-out sample's target media decides the size, cut as training cuts it (here: to a 4:3 bucket)
    wide = GroupConfig(name="g", task="t2v", caption_dropout=0.0)
    wide.image.buckets = [1.0, 4 / 3]
    held_out = dataclasses.replace(t2v, media={"video": torch.zeros(13, 48, 64, 3, dtype=torch.uint8)})
    assert planner.prompt(held_out, wide).vae[-1].grid_thw == planner.plan(held_out, wide).vae[-1].grid_thw == (4, 6, 9)
    twin = planner.prompt(t2v, no_dropout, drop_caption=True, target_shape=(9, 48, 64))
    prompt = planner.prompt(t2v, no_dropout, target_shape=(9, 48, 64))
    assert planner.special.uncond in twin.input_ids.tolist() and twin.vae[-1].grid_thw == (3, 6, 8)
    assert twin.num_tokens < prompt.num_tokens and twin.split_modes[-2] == AttnMode.NOISE
    edit = planner.prompt(gen_samples()[2])  # source latents (full) then the target (noise), sharing RoPE ids
    source, target_block = edit.vae
    assert not source.is_target and target_block.is_target and len(edit.vit) == 1
    assert torch.equal(edit.position_ids[:, source.positions], edit.position_ids[:, target_block.positions])
    with pytest.raises(ValueError, match="multiple of 8.*k \\* 4 \\+ 1"):
        planner.prompt(t2v, target_shape=(6, 30, 64))
    with pytest.raises(ValueError, match="the source only 9"):
        planner.prompt(gen_samples()[3], target_shape=(13, 64, 64))


def test_a_video_edit_prompt_is_the_trained_sequence_up_to_the_target(planner):
    from lance_ds.config.data import GroupConfig

    group = GroupConfig(name="g", task="v2v", caption_dropout=0.0)
    frames = lambda n, level: torch.full((n, 64, 64, 3), level, dtype=torch.uint8)  # noqa: E731
    v2v = dataclasses.replace(gen_samples()[3], media={"input_video": frames(13, 40), "output_video": frames(9, 200)})
    trained, prompt = planner.plan(v2v, group), planner.prompt(v2v, group)  # a source longer than its target
    assert torch.equal(trained.vit[0].patches(trained.media), prompt.vit[0].patches(prompt.media))  # the ViT sees the source cut to 9 frames
    assert torch.equal(trained.input_ids, prompt.input_ids) and torch.equal(trained.position_ids, prompt.position_ids)
    assert [b.grid_thw for b in trained.vae] == [b.grid_thw for b in prompt.vae]
    # asked for a 9-frame target (the CLI's --frames 9) without one: the ViT sees the source as far, as in training
    asked = planner.prompt(dataclasses.replace(v2v, media={"input_video": frames(13, 40)}), group,
                           target_shape=(9, 64, 64))
    assert torch.equal(trained.vit[0].patches(trained.media), asked.vit[0].patches(asked.media))
    assert torch.equal(trained.input_ids, asked.input_ids)


def test_prompts_are_cut_into_chunks_within_the_token_budget():
    from lance_ds.chunks import budget_chunks

    assert budget_chunks([5, 5, 5, 20, 1], 10) == [[0, 1], [2], [3], [4]] and budget_chunks([], 10) == []


# ----------------------------------------------------------------------------------------------------------------
# 2 ranks, live engine


def test_two_ranks_run_the_same_forwards_and_refuse_mismatched_work(trained_runs):
    """Under ZeRO-3 a rank that runs fewer forwards leaves the others in a collective until the timeout."""
    rank0, rank1 = trained_runs["ranks"]
    assert rank0["forwards"] == rank1["forwards"]
    # 4 prompts packed: cfg 4.0 over 3 steps, every step inside [0.4, 1] for this schedule -> 3 joint forwards
    assert rank0["forwards"]["generate"] == NUM_STEPS
    assert rank0["forwards"]["uneven"] == MAX_NEW_TOKENS  # rank 0 finished at token 1 and kept stepping
    assert rank0["uneven_ids"] == [rank0["first_token"]] and len(rank1["uneven_ids"]) == MAX_NEW_TOKENS
    assert rank0["answers"] == rank1["answers"] and len(rank0["answers"]) == 2
    # fewer prompts (or none) on a rank: it runs idle forward batches in step with the others
    assert len(rank0["uneven_answers"]) == 1 and len(rank1["uneven_answers"]) == 2
    assert rank0["uneven_answers"][0] == rank1["uneven_answers"][0]  # the same prompt, the same answer
    assert (rank0["uneven_videos"], rank1["uneven_videos"]) == (0, 1)
    assert rank0["forwards"]["uneven_prompts"] >= 2 + 2  # two answer batches (>= 1 token each), two Euler steps
    # different step counts cannot be evened out: refused on both ranks before any forward
    assert all("disagree on the step settings" in record["refused"][0] for record in (rank0, rank1))
    # a sample one rank cannot plan: that rank raises its own error, the other stops too instead of waiting
    assert "another rank could not plan" in rank0["refused"][1] and "needs 'image' media" in rank1["refused"][1]
    videos0, videos1 = trained_runs["videos"]
    for key in videos0:
        assert torch.equal(videos0[key], videos1[key])
    shapes = [tuple(videos0[f"video.{i}"].shape) for i in range(4)]
    assert shapes == [(1, 64, 64, 3), (9, 64, 64, 3), (1, 64, 64, 3), (9, 64, 64, 3)]


def test_engines_start_without_compiling_deepspeeds_muon_kernels(trained_runs):
    """~1.5 s of CPU on every rank's start, for an optimizer lance_ds never builds (engine.without_muon_kernels)."""
    assert [r["muon_kernels_compiled"] for r in trained_runs["ranks"]] == [False, False]
    assert all(r["lora_resumed_step"] > 0 for r in trained_runs["ranks"])  # the ZeRO-3 engines trained and resumed


def test_checkpoint_generation_equals_the_live_engine(trained_runs, from_checkpoint):
    videos = from_checkpoint.generate(gen_samples(), num_steps=NUM_STEPS)
    for i, frames in enumerate(videos):
        live = trained_runs["videos"][0][f"video.{i}"]
        assert frames.shape == live.shape
        assert (frames.int() - live.int()).abs().max() <= 1  # float rounding only
    assert from_checkpoint.answer(und_samples(), max_new_tokens=MAX_NEW_TOKENS) == trained_runs["ranks"][0]["answers"]


def test_validating_with_ema_weights_uses_them_and_gives_the_trained_ones_back(trained_runs):
    """validation.weights=ema: inside ShardedEMA.applied the ZeRO-3 model holds the EMA (persistent parameters
    included) and generates what the checkpoint's EMA generates; after it, exactly the trained weights again."""
    from lance_ds.generate import Generator

    ref = trained_runs["reference"]
    names = [k.removeprefix("ema.") for k in ref if k.startswith("ema.")]
    assert names and any("norm" in n for n in names)  # (the norms are the persistent ones here)
    for name in names:
        assert torch.equal(ref[f"applied.{name}"], ref[f"ema.{name}"]), name  # (an fp32 run)
        assert torch.equal(ref[f"after.{name}"], ref[f"weights.{name}"]), name
    assert any(not torch.equal(ref[f"ema.{n}"], ref[f"weights.{n}"]) for n in names)
    gen = Generator.from_checkpoint(trained_runs["full"], ema=True, device="cpu")
    for i, frames in enumerate(gen.generate(gen_samples(), num_steps=NUM_STEPS)):
        assert (frames.int() - trained_runs["videos"][0][f"ema_video.{i}"].int()).abs().max() <= 1


def test_export_generates_what_the_checkpoint_generates(from_checkpoint, exported):
    from lance_ds.generate import Generator

    gen = Generator.from_checkpoint(exported, device="cpu")
    for a, b in zip(gen.generate(gen_samples(), num_steps=NUM_STEPS),
                    from_checkpoint.generate(gen_samples(), num_steps=NUM_STEPS)):
        assert torch.equal(a, b)
    assert gen.answer(und_samples(), max_new_tokens=MAX_NEW_TOKENS) == \
        from_checkpoint.answer(und_samples(), max_new_tokens=MAX_NEW_TOKENS)


# ----------------------------------------------------------------------------------------------------------------
# the sampler and the decoder against the single-prompt references in lance_ds.objectives


def test_packed_sampling_does_not_depend_on_packing_and_twins_see_only_themselves(from_checkpoint):
    from lance_ds.generate import sample_generator
    from lance_ds.objectives import lance_velocity_fn

    gen = from_checkpoint
    samples = gen_samples()
    packed = gen.generate(samples, num_steps=NUM_STEPS, seed=5)
    gen.max_batch_tokens = 1  # one prompt per forward
    try:
        alone = gen.generate(samples, num_steps=NUM_STEPS, seed=5)
    finally:
        gen.max_batch_tokens = 32768
    for a, b in zip(packed, alone):
        assert (a.int() - b.int()).abs().max() <= 1
    # the list split over two calls (as evaluation splits it over ranks) draws the same noise per prompt
    split = (gen.generate(samples[:1], num_steps=NUM_STEPS, seed=5)
             + gen.generate(samples[1:], num_steps=NUM_STEPS, seed=5, first_index=1))
    assert all((a.int() - b.int()).abs().max() <= 1 for a, b in zip(packed, split))
    assert (gen.generate(samples[1:2], num_steps=NUM_STEPS, seed=5)[0].int() - packed[1].int()).abs().max() > 1
    # a guided step's one forward over the prompt and its caption-dropped twin gives both velocities as two
    # separate forwards do (the i2i prompt: condition latents, ViT tokens)
    edit = samples[2]
    cond, uncond = gen.planner.prompt(edit), gen.planner.prompt(edit, drop_caption=True)
    x = torch.randn(cond.vae[-1].coords.shape[0], gen.lance.cfg.latent_channels, generator=sample_generator(5, 2))
    cond_inputs, uncond_inputs = gen._sampler_inputs([cond]), gen._sampler_inputs([uncond])
    joint = gen._with_twins(cond_inputs, [cond], [uncond])
    v_cond, v_uncond = lance_velocity_fn(gen.model, cond_inputs, joint)(x, 0.9, True)
    assert torch.allclose(v_cond, lance_velocity_fn(gen.model, cond_inputs)(x, 0.9, False)[0], atol=1e-5)
    assert torch.allclose(v_uncond, lance_velocity_fn(gen.model, uncond_inputs)(x, 0.9, False)[0], atol=1e-5)
    assert not torch.equal(v_cond, v_uncond)  # each sees its own caption (barely: this model never trained edits)
    t2i = samples[0]  # a task it trained: there the caption matters
    cond, uncond = gen.planner.prompt(t2i), gen.planner.prompt(t2i, drop_caption=True)
    x = torch.randn(cond.vae[-1].coords.shape[0], gen.lance.cfg.latent_channels, generator=sample_generator(5, 0))
    cond_inputs = gen._sampler_inputs([cond])
    v_cond, v_uncond = lance_velocity_fn(gen.model, cond_inputs, gen._with_twins(cond_inputs, [cond], [uncond]))(
        x, 0.9, True)
    assert not torch.allclose(v_cond, v_uncond, atol=1e-3)
    unguided = gen.generate(samples[:1], num_steps=NUM_STEPS, cfg_scale=1.0, seed=5)[0]
    assert not torch.equal(unguided, packed[0])  # guidance changes the result


def with_answer(plan, tokens: list[int]):
    """The prompt with `tokens` appended to its trailing causal split, scored (next token) at its last position."""
    n = len(tokens)
    ids = torch.cat([plan.input_ids, torch.tensor(tokens, dtype=torch.long)])
    grown = plan.position_ids[:, -1:] + torch.arange(1, n + 1)  # text after text: + 1 on all three axes
    return dataclasses.replace(
        plan, input_ids=ids, position_ids=torch.cat([plan.position_ids, grown], dim=1),
        split_lens=plan.split_lens[:-1] + [plan.split_lens[-1] + n],
        ce_positions=torch.tensor([ids.numel() - 1]), ce_targets=torch.zeros(1, dtype=torch.long))


def test_batched_cached_answers_are_what_the_whole_sequence_predicts(from_checkpoint):
    """Answers decoded together with the KV cache: each token is the argmax of a plain forward over its prompt and
    the answer so far (a prompt at a time, nothing cached)."""
    from lance_ds.data.packing import collate

    gen = from_checkpoint
    eos = gen.tokenizer.special.im_end
    ids = gen.answer_ids(und_samples(), max_new_tokens=MAX_NEW_TOKENS)
    for sample, got in zip(und_samples(), ids):
        assert 0 < len(got) <= MAX_NEW_TOKENS and (len(got) == MAX_NEW_TOKENS or got[-1] == eos)
        prompt = gen.planner.prompt(sample)
        for k, token in enumerate(got):
            batch = collate([with_answer(prompt, got[:k])])
            none = torch.zeros(0, gen.lance.cfg.latent_channels)  # an answer prompt holds no VAE tokens
            with torch.no_grad():
                logits = gen.model(batch, gen._vit_embeds(batch), none, none[:, 0]).logits[0]
            assert int(logits.argmax()) == token or logits[token] >= logits.max() - 1e-4, (k, token)
    sampled = gen.answer(und_samples(), max_new_tokens=MAX_NEW_TOKENS, temperature=1.0, seed=1)
    assert sampled == gen.answer(und_samples(), max_new_tokens=MAX_NEW_TOKENS, temperature=1.0, seed=1)
    with pytest.raises(ValueError, match="takes \\['i2t', 'v2t'\\] samples"):
        gen.answer(gen_samples()[:1])


# ----------------------------------------------------------------------------------------------------------------
# CLI


def decoded(path: Path) -> tuple[int, int, int]:
    """(frames, height, width) of a written image or video, read back with PIL / PyAV."""
    if path.suffix == ".mp4":
        import av

        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        return len(frames), frames[0].shape[0], frames[0].shape[1]
    from PIL import Image

    with Image.open(path) as image:
        return 1, image.height, image.width


def test_cli_writes_every_generation_task_and_prints_answers(trained_runs, exported, tmp_path, capsys, monkeypatch):
    from lance_ds.data.media import encode_image, encode_video
    from lance_ds.generate import main

    image, video = (tmp_path / "in.png"), (tmp_path / "in.mp4")
    image.write_bytes(encode_image(und_samples()[0].media["image"]))
    video.write_bytes(encode_video(und_samples()[1].media["video"], fps=12))
    common = ["--steps", "2", "--seed", "3"]
    jobs = [  # (checkpoint, arguments, output file, its (frames, height, width))
        (trained_runs["full"], ["--task", "t2i", "--prompt", "a red circle", "--size", "32x48"], "a.png", (1, 32, 48)),
        (exported, ["--task", "i2i", "--input", str(image), "--prompt", "make it blue"], "b.jpg", (1, 64, 64)),
        (exported, ["--task", "v2v", "--input", str(video), "--prompt", "make it red", "--frames", "5"], "c.mp4",
         (5, 64, 64))]
    for checkpoint, args, name, shape in jobs:
        assert main(["--checkpoint", str(checkpoint), *args, *common, "--out", str(tmp_path / name)]) == 0
        assert decoded(tmp_path / name) == shape
    capsys.readouterr()
    question = und_samples()[0].texts["caption_q"]  # the PNG is lossless: the live engine's prompt, exactly
    assert main(["--checkpoint", str(exported), "--task", "i2t", "--input", str(image), "--question", question,
                 "--max-new-tokens", str(MAX_NEW_TOKENS)]) == 0
    out, err = capsys.readouterr()
    # without --system, under the caption_i the training rows carried (the converter counted it, the run recorded it)
    assert out == trained_runs["ranks"][0]["answers"][0] + "\n"
    assert "system prompt" not in err
    # a still image given to a video task is refused (PyAV reads it as a 1-frame clip); a short clip is pointed out
    assert main(["--checkpoint", str(exported), "--task", "v2t", "--input", str(image)]) == 2
    assert f"--input: {image} is a png image; v2t works on a video" in capsys.readouterr().err
    assert main(["--checkpoint", str(exported), "--task", "i2i", "--input", str(video), "--prompt", "make it blue"]) == 2
    assert f"--input: {video} is a video (mp4); i2i works on an image" in capsys.readouterr().err
    short = tmp_path / "short.mp4"
    short.write_bytes(encode_video(und_samples()[1].media["video"][:1], fps=12))
    assert main(["--checkpoint", str(exported), "--task", "v2t", "--input", str(short), "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err
    assert f"{short} gives 1 frame(s) at 12 fps (v2t reads up to" in err
    assert "system prompt: v2t's built-in one" in err  # (a task the run did not train: nothing recorded)
    assert "the run trained no v2t group (its tasks: t2i, i2t)" in err
    # problems are all reported at once, with the flag and the fix, and nothing is loaded
    assert main(["--checkpoint", str(exported), "--task", "t2v", "--out", "x.png", "--size", "big", "--frames",
                 "0"]) == 2
    err = capsys.readouterr().err
    assert "--prompt: t2v needs a prompt" in err and "ending in .mp4" in err and "SIDE or HEIGHTxWIDTH" in err
    assert "--frames must be >= 1, got 0" in err
    assert main(["--checkpoint", str(exported), "--task", "t2i", "--prompt", "x", "--size", "30", "--out",
                 str(tmp_path / "d.png")]) == 2
    assert "multiple of 4" in capsys.readouterr().err
    # a v2v --frames the VAE cannot make (3 frames were cut to a 1-frame clip), refused from the config alone, before
    # the weights load (minutes at 3B) or the input is read; an --ema the run did not keep, before consolidating
    import lance_ds.export

    def no_loading(*args, **kwargs):
        raise AssertionError("weights loaded")

    monkeypatch.setattr(lance_ds.export, "load_inference_parts", no_loading)
    for checkpoint in (exported, trained_runs["full"]):
        assert main(["--checkpoint", str(checkpoint), "--task", "v2v", "--input", str(video), "--prompt", "make it "
                     "red", "--frames", "3", "--out", str(tmp_path / "e.mp4")]) == 2
        assert "--frames 3: this model's VAE makes k x 4 + 1 frames, at most 33; use --frames 1 or 5" in \
            capsys.readouterr().err and not (tmp_path / "e.mp4").exists()
    monkeypatch.undo()
    monkeypatch.setattr(lance_ds.export, "zero_consolidated_state", no_loading)
    assert main(["--checkpoint", str(trained_runs["lora"]), "--task", "t2i", "--prompt", "x", "--ema", "--out",
                 str(tmp_path / "f.png")]) == 2  # (the LoRA run kept no EMA)
    assert "train.ema_decay=0" in capsys.readouterr().err
    monkeypatch.undo()
    # an empty answer (the model ended its turn at once) is said, not just a blank line
    from lance_ds.generate import Generator

    monkeypatch.setattr(Generator, "answer", lambda self, samples, **kwargs: [""])
    assert main(["--checkpoint", str(exported), "--task", "i2t", "--input", str(image)]) == 0
    out, err = capsys.readouterr()
    assert out == "\n" and "the answer is empty: the model ended its turn at once" in err
    monkeypatch.undo()
    # a question given as --prompt (it was dropped: the model captioned instead), and a device that is not there
    assert main(["--checkpoint", str(exported), "--task", "i2t", "--input", str(image), "--prompt", question,
                 "--device", "cuda:7"]) == 2
    err = capsys.readouterr().err
    assert "give it as --question" in err and "--device: cuda:7 is not available" in err


def test_inference_cuts_inputs_as_training_cut_the_task(from_checkpoint, exported):
    """Checkpoints and exports record each task's image / video options; the CLI cuts with them (an i2t model trained
    at 448 px was asked at 64), --size overriding the side."""
    from lance_ds.generate import Generator, cli_group

    for gen in (from_checkpoint, Generator.from_checkpoint(exported, device="cpu")):
        assert gen.cuts["i2t"]["image"]["resolution"] == 56 and gen.cuts["t2i"]["image"]["resolution"] == 16
    cuts = from_checkpoint.cuts
    assert cli_group(from_checkpoint.vae, "i2t", cuts).image.resolution == 56
    assert cli_group(from_checkpoint.vae, "i2t", cuts, size=112).image.resolution == 112
    assert cli_group(from_checkpoint.vae, "v2t", cuts).image.resolution == 64  # a task training did not see


def test_cli_cuts_as_training_cut_the_task_then_as_the_flags_say(planner):
    """What the checkpoint recorded of training (sizes, frame sampling, system prompt) cuts a CLI request; each flag
    overrides its part alone (a trained system prompt was dropped; --size missed video.resolution and the ViT's;
    t2v --frames drew at image.resolution; inputs were read at 12 fps whatever training read them at)."""
    from lance_ds.config.data import DatasetConfig, GroupConfig, ImageOptions, VideoOptions
    from lance_ds.generate import cli_group, cli_target_shape, parse_args
    from lance_ds.model.vae import PatchCodec
    from lance_ds.trainer import training_cuts

    vae = PatchCodec(8, 4)
    image = ImageOptions(resolution=64, vit_resolution=56)
    video = VideoOptions(sample_fps=4.0, max_frames=5, resolution=32)
    cuts = training_cuts(DatasetConfig([GroupConfig(task, ["x"], task=task, system_prompt="You draw.", image=image,
                                                    video=video) for task in ("t2v", "v2v", "v2t")]))
    t2v = cli_group(vae, "t2v", cuts)
    assert (t2v.system_prompt, t2v.video.resolution, t2v.video.sample_fps) == ("You draw.", 32, 4.0)
    prompt = planner.prompt(gen_samples()[1], t2v)
    assert "You draw." in planner.tokenizer.decode(prompt.input_ids.tolist())
    assert prompt.vae[-1].grid_thw == (2, 4, 4)  # 5 frames of 32 x 32, as training drew
    longer = cli_group(vae, "t2v", cuts, frames=9)  # --frames alone: the trained side still
    args = parse_args(["--checkpoint", "x", "--task", "t2v", "--prompt", "x", "--out", "a.mp4", "--frames", "9"])
    assert cli_target_shape(args, planner, longer) is None
    assert planner.prompt(gen_samples()[1], longer).vae[-1].grid_thw == (3, 4, 4)
    args = parse_args(["--checkpoint", "x", "--task", "t2v", "--prompt", "x", "--out", "a.mp4", "--size", "48"])
    assert cli_target_shape(args, planner, t2v) == (5, 48, 48)
    assert cli_group(vae, "t2v", cuts, system="Be bold.").system_prompt == "Be bold."
    # --size of an input: the VAE's side for an edit, the ViT's for a question
    assert planner.prompt(gen_samples()[3], cli_group(vae, "v2v", cuts, size=64)).vae[0].grid_thw[1:] == (8, 8)
    v2t = cli_group(vae, "v2t", cuts, size=112)
    assert v2t.image.vit_resolution == 112 and cli_group(vae, "v2t", cuts).image.vit_resolution == 56
    # a question's --system (the training rows' caption_i), else the task's default
    question = und_samples()[0]
    del question.texts["caption_i"]  # (as cli_sample makes it: the system prompt comes from the group)
    asked = planner.prompt(question, cli_group(vae, "i2t", system="Be brief."))
    assert "system\nBe brief.<|im_end|>" in planner.tokenizer.decode(asked.input_ids.tolist())
    assert "Be brief." not in planner.tokenizer.decode(planner.prompt(question, cli_group(vae, "i2t")).input_ids.tolist())


def test_checkpoints_record_the_system_prompt_and_cut_most_of_a_tasks_samples_trained_with(tmp_path):
    """The caption_i most i2t / v2t rows carry (their converter manifests count them), else their group's
    system_prompt, each group weighing its share of the mixture; the heaviest group's sizes. (The first group's
    were recorded: a 4-row group of weight 1 beside a 120-row group of weight 10 set both.)"""
    import json

    from lance_ds.config.data import DatasetConfig, GroupConfig, ImageOptions
    from lance_ds.trainer import training_cuts

    def output(name: str, counts: dict) -> str:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "shard-000000.tar").write_bytes(b"")
        (folder / "manifest.json").write_text(json.dumps({"task": "i2t", "shards": [{"name": "shard-000000.tar"}],
                                                          "system_prompts": counts}))
        return str(folder)

    def cut(*groups) -> dict:
        return training_cuts(DatasetConfig([GroupConfig(f"g{i}", shards, weight=weight, task="i2t",
                                                        system_prompt=system, image=ImageOptions(resolution=side))
                                            for i, (shards, weight, system, side) in enumerate(groups)]))["i2t"]

    mostly_blank, brief = output("a", {"Be brief.": 3, "": 4}), output("b", {"Be brief.": 2})
    from lance_ds.data.sequence import DEFAULT_SYSTEM_PROMPTS

    # blank commonest: the task's default, recorded as such (not "unknown", which generate asks the user about)
    assert cut(([mostly_blank], 1, None, 64))["system_prompt"] == DEFAULT_SYSTEM_PROMPTS["i2t"]
    assert cut(([mostly_blank], 1, "You see.", 64))["system_prompt"] == "You see."  # blank rows: the group's
    assert cut(([mostly_blank, f"{brief}/*.tar"], 1, None, 64))["system_prompt"] == "Be brief."  # 5 of 9 rows
    small, big = output("small", {"Answer in one word.": 4}), output("big", {"Describe the picture.": 120})
    recorded = cut(([small], 1, None, 56), ([big], 10, None, 112))
    assert (recorded["system_prompt"], recorded["image"]["resolution"]) == ("Describe the picture.", 112)
    assert cut(([small], 1, None, 56), ([big], 0.5, None, 112))["system_prompt"] == "Answer in one word."
    many = output("many", {"Be brief.": 40})  # its .tar files listed one by one: its manifest counts once
    for i in (1, 2):
        (Path(many) / f"shard-00000{i}.tar").write_bytes(b"")
    listed = [f"{many}/shard-00000{i}.tar" for i in range(3)]
    assert cut((listed + [output("q", {"Say why.": 100})], 1, None, 64))["system_prompt"] == "Say why."
    unknown = [output("old", {}), "https://host/shard-{000..009}.tar", str(tmp_path / "none")]
    assert cut((unknown, 1, None, 64))["system_prompt"] is None and cut((unknown, 1, "Hi.", 64))["system_prompt"] == "Hi."


def test_cli_reads_an_input_video_at_the_trained_frame_rate(tmp_path, planner):
    from lance_ds.data.media import encode_video
    from lance_ds.generate import cli_group, cli_sample, parse_args
    from lance_ds.model.vae import PatchCodec

    video = tmp_path / "in.mp4"
    video.write_bytes(encode_video(torch.zeros(24, 32, 32, 3, dtype=torch.uint8), fps=24))  # one second
    cuts = {"v2t": {"video": {"sample_fps": 4.0, "max_frames": 33, "max_duration": 10.0}}}
    args = parse_args(["--checkpoint", "x", "--task", "v2t", "--input", str(video)])
    assert cli_sample(args, cli_group(PatchCodec(8, 4), "v2t", cuts)).media["video"].shape[0] == 4
    assert cli_sample(args, cli_group(PatchCodec(8, 4), "v2t", cuts, fps=12)).media["video"].shape[0] == 12
    assert cli_sample(args, cli_group(PatchCodec(8, 4), "v2t")).media["video"].shape[0] == 9  # defaults: 12 fps, 9


def test_cli_refuses_bad_sampling_flags(tmp_path):
    from lance_ds.generate import check_args, parse_args

    base = ["--checkpoint", str(tmp_path), "--task", "i2t", "--input", str(tmp_path), "--question", "What is it?"]
    problems = check_args(parse_args(["--checkpoint", str(tmp_path), "--task", "t2i", "--prompt", "x", "--out",
                                      str(tmp_path / "x.png"), "--size", "²", "--fps", "inf", "--steps", "0",
                                      "--cfg", "nan"]))
    assert any(p.startswith("--fps must be in (0, 1000]") for p in problems), problems
    assert "--steps must be >= 1, got 0" in problems, problems
    assert "--cfg must be a finite number >= 0 (1: no guidance), got nan" in problems, problems
    assert any(p.startswith("--size") for p in problems), problems  # a digit Python's int() does not read
    for size in ("0", "64x0"):  # an input cut to nothing
        problems = check_args(parse_args(base + ["--size", size]))
        assert any(p.startswith("--size: give SIDE or HEIGHTxWIDTH") for p in problems), (size, problems)


def test_cli_says_when_a_v2v_input_is_shorter_than_its_frames(tmp_path, capsys):
    from lance_ds.data.media import encode_video
    from lance_ds.generate import cli_group, cli_sample, parse_args
    from lance_ds.model.vae import PatchCodec

    clip = und_samples()[1].media["video"]
    video = tmp_path / "in.mp4"
    video.write_bytes(encode_video(clip, fps=12))
    base = ["--checkpoint", str(tmp_path), "--task", "v2v", "--input", str(video), "--prompt", "make it red"]
    read = lambda frames: cli_sample(parse_args(base + ["--frames", str(frames)]),  # noqa: E731
                                     cli_group(PatchCodec(8, 4), "v2v", frames=frames))
    read(clip.shape[0])
    assert capsys.readouterr().err == ""
    assert read(clip.shape[0] + 4).media["input_video"].shape[0] == clip.shape[0]
    assert f"gives {clip.shape[0]} frames at 12 fps, not --frames {clip.shape[0] + 4}" in capsys.readouterr().err


def test_cli_says_when_an_input_is_scaled_up_far(tmp_path, capsys):
    """A tiny input (a 1x1 image) is scaled up to its task's area: a flat image the model was asked about silently."""
    from lance_ds.data.media import encode_image
    from lance_ds.generate import cli_group, cli_sample, parse_args
    from lance_ds.model.vae import PatchCodec

    group = cli_group(PatchCodec(8, 4), "i2t", size=64)  # the ViT sees 64 x 64 (a square: covered, then cropped)
    for (height, width), said in (((1, 1), "64.0x"), ((31, 31), "2.1x"), ((32, 32), None), ((80, 80), None),
                                  ((203, 17), "3.8x")):  # (a thin strip: its width is scaled up 3.8x)
        image = tmp_path / f"in{height}x{width}.png"
        image.write_bytes(encode_image(torch.full((1, height, width, 3), 99, dtype=torch.uint8), "png"))
        cli_sample(parse_args(["--checkpoint", str(tmp_path), "--task", "i2t", "--input", str(image)]), group)
        err = capsys.readouterr().err
        told = f"{image} is {width}x{height}, scaled up {said} a side to the 64 x 64 area i2t is cut to"
        assert (told in err) if said else not err, (height, width, err)


def test_cli_as_a_module_writes_an_mp4(exported, tmp_path):
    out = tmp_path / "clip.mp4"
    proc = subprocess.run([sys.executable, "-m", "lance_ds.generate", "--checkpoint", str(exported), "--task", "t2v",
                           "--prompt", "a green triangle moving up", "--out", str(out), "--steps", "2", "--frames",
                           "5", "--size", "32"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert decoded(out) == (5, 32, 32) and "wrote" in proc.stderr


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--dataset", type=Path)
    parser.add_argument("--ds_json", type=Path)
    parser.add_argument("--local_rank", type=int, default=0)
    known, _ = parser.parse_known_args()
    run_worker(known.out, known.dataset, known.ds_json)
    # Everything is written; skip the interpreter's teardown of the process group and library threads (~7 s).
    sys.stdout.flush()
    os._exit(0)
