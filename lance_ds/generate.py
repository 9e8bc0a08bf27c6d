"""Inference: images and videos for t2i / t2v / i2i / v2v, answers for i2t / v2t. A library API and a CLI.

Library (the trainer's validation, the main job's evaluation):
    gen = Generator(engine_or_model, vit, vae, planner, tokenizer, objective)   # or Generator.from_checkpoint(DIR)
    videos = gen.generate(samples, num_steps=30, cfg_scale=4.0, seed=0)         # list of uint8 [T, H, W, 3]
    texts = gen.answer(samples, max_new_tokens=64)                              # list of str

CLI (DIR: a training checkpoint - run, checkpoints or step dir - or an export of tools/export_checkpoint.py):
    python -m lance_ds.generate --checkpoint DIR --task t2i --prompt "a red circle" --out out.png [--size 64|HxW]
    python -m lance_ds.generate --checkpoint DIR --task t2v --prompt "..." --out out.mp4 [--frames 9] [--size ...]
    python -m lance_ds.generate --checkpoint DIR --task i2i|v2v --input FILE --prompt "make it blue" --out out.png|mp4
    python -m lance_ds.generate --checkpoint DIR --task i2t|v2t --input FILE [--question "..."] [--system "..."]
                                                                                     (prints the answer)
    common: --steps 30 --cfg 4.0 --seed 0 --ema --dtype fp32|bf16|fp16 --device cpu|cuda

How it runs. Prompts are planned by SequencePlanner.prompt and packed into one sequence per forward (attention stays
inside each sample), up to `max_batch_tokens` per forward. Generation integrates the flow with Euler steps over a
shifted linspace(1, 0) (objective.sample_shift); while t is inside objective.cfg_interval the prompts and their
caption-dropped twins share one forward and v = v_u + cfg (v_c - v_u). Edits condition on the source's clean
latents (t = 0) and its ViT tokens, as in training (objectives.euler_sample). Answers are decoded for all prompts at
once with a KV cache (objectives.decode_text: one forward over the prompts, then one per new token over just the
new tokens), greedily unless a temperature is given.

Multi-rank safety (a ZeRO-3 engine): every forward gathers the partitioned weights collectively, so every rank must
run the same number of forwards. Before the first one the ranks agree (one all-reduce): a rank with fewer forward
batches than another (fewer prompts, or none) adds idle batches of a placeholder prompt; different step settings,
or a prompt that some rank cannot plan, are refused on every rank alike. Euler step counts are fixed; answers stop
when every prompt on every rank is done (an all-reduced flag) or at max_new_tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from .chunks import budget_chunks
from .config.core import Problems, from_dict, output_problem
from .config.data import EDIT_TASKS, GEN_TASKS, TEXT_TO_MEDIA_TASKS, UND_TASKS, VIDEO_TASKS, GroupConfig
from .config.model import ObjectiveConfig
from .data.batch import PackedBatch, Sample
from .data.packing import collate
from .data.sequence import PROMPT_MEDIA, SequencePlan, SequencePlanner
from .distributed import world_size
from .files import write_atomic
from .model.vae import to_uint8_frames
from .model.vision import encode_vit
from .objectives import (SamplerInputs, decode_text, euler_sample, guided_steps, lance_velocity_fn,
                         sampling_schedule)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
VIDEO_SUFFIXES = (".mp4",)
VIDEO_GEN_TASKS = ("t2v", "v2v")  # the generation tasks that write a video and take --frames


class GenerateError(ValueError):
    """A request the model or the inputs cannot serve; the message names the input and the fix."""


def sample_generator(seed: int, index: int) -> torch.Generator:
    """The RNG of prompt `index` (noise, token sampling): its output does not depend on what it is packed with."""
    return torch.Generator().manual_seed(hash((seed, index)) % 2**63)


class Generator:
    """Generation and answering with one model, on one rank or on every rank of a ZeRO-3 engine together.

    model: a LanceModel or a DeepSpeed engine around one. vit / vae: the frozen encoders outside it (ModelBundle.vit
    / .vae; None when the model lacks that branch, or holds a trainable ViT itself). planner / tokenizer: as the
    trainer built them. objective: its sampling settings (sample_shift, cfg_interval); defaults otherwise.
    max_batch_tokens: tokens packed into one forward (prompts beyond it go into further forwards).
    """

    def __init__(self, model: torch.nn.Module, vit: torch.nn.Module | None, vae, planner: SequencePlanner,
                 tokenizer, objective: ObjectiveConfig | None = None, max_batch_tokens: int = 32768,
                 device: torch.device | str | None = None):
        self.model = model
        self.lance = getattr(model, "module", model)  # the LanceModel inside an engine
        self.vit, self.vae = vit, vae
        self.planner, self.tokenizer = planner, tokenizer
        self.objective = objective or ObjectiveConfig()
        self.max_batch_tokens = max_batch_tokens
        self.device = torch.device(device) if device is not None else self._model_device()
        self.source = ""  # where the weights came from (from_checkpoint)
        self.cuts: dict = {}  # how training cut each task's inputs (from_checkpoint; cli_group)

    @classmethod
    def from_checkpoint(cls, path: str | Path, ema: bool = False, dtype: str = "fp32",
                        device: torch.device | str | None = None, moved: dict[str, str] | None = None,
                        **kwargs) -> "Generator":
        """A training checkpoint (run, checkpoints or step dir; consolidated on the fly) or an export dir; `moved`:
        where this machine has the model's directories (export.relocated)."""
        from .export import load_inference_parts

        parts = load_inference_parts(path, ema=ema, dtype=dtype, device=device, moved=moved)
        bundle = parts.bundle
        planner = SequencePlanner(parts.tokenizer, bundle.geometry)
        gen = cls(bundle.model, bundle.vit, bundle.vae, planner, parts.tokenizer, parts.objective, **kwargs)
        gen.source, gen.cuts = parts.source, parts.cuts
        return gen

    # -- generation ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, samples: list[Sample], num_steps: int = 30, cfg_scale: float = 4.0, seed: int = 0,
                 target_shape: tuple[int, int, int] | None = None, group: GroupConfig | None = None,
                 first_index: int = 0) -> list[Tensor]:
        """t2i / t2v / i2i / v2v samples -> uint8 frames [T, H, W, 3] each (an image has T = 1).

        The output size is target_shape (frames, height, width) when given, else the sample's target media cut as
        training cuts it (held-out samples), else the source's (edits), else the group's resolution.
        samples[k] starts from the noise of (seed, first_index + k): a list split over calls (or ranks) with each
        part's first_index draws what one call with the whole list draws.
        """
        times = sampling_schedule(max(num_steps, 1), self.objective.sample_shift)
        guided = guided_steps(times, cfg_scale, tuple(self.objective.cfg_interval))

        def plan() -> list[tuple[SequencePlan, SequencePlan]]:
            self._require(samples, GEN_TASKS, self.lance.cfg.visual_gen, "model.visual_gen")
            if num_steps < 1:
                raise GenerateError(f"num_steps must be >= 1, got {num_steps}")
            return [(self.planner.prompt(s, group, target_shape=target_shape),
                     self.planner.prompt(s, group, drop_caption=True, target_shape=target_shape)) for s in samples]

        pairs, problem = planned(plan)
        sizes = [c.num_tokens + (u.num_tokens if any(guided) else 0) for c, u in pairs]
        chunks = budget_chunks(sizes, self.max_batch_tokens)
        num_idle = self._agree("generate", problem, len(chunks), num_steps, sum(guided))
        out: list[Tensor] = []
        with self._inference():
            for chunk in chunks:
                chunk_pairs = [pairs[i] for i in chunk]
                latents = self._sample_latents(chunk_pairs, [first_index + i for i in chunk], times, guided,
                                               cfg_scale, seed)
                out += self._decode_latents(latents, [c for c, _ in chunk_pairs])
            idle = self.planner.placeholder(vit=False, vae=True, ce=False)
            for _ in range(num_idle):  # the forwards other ranks run for prompts this rank does not have
                self._sample_latents([(idle, idle)], [0], times, guided, cfg_scale, seed)
        return out

    def _sample_latents(self, pairs, indexes: list[int], times: Tensor, guided: list[bool],
                        cfg_scale: float, seed: int) -> Tensor:
        """Euler integration of the prompts' target latents [n, z] (prompt after prompt), from their seeded noise."""
        cond_plans = [c for c, _ in pairs]
        cond = self._sampler_inputs(cond_plans)
        joint = self._with_twins(cond, cond_plans, [u for _, u in pairs]) if any(guided) else None
        noise = [torch.randn(p.vae[-1].coords.shape[0], self.lance.cfg.latent_channels,
                             generator=sample_generator(seed, i)) for p, i in zip(cond_plans, indexes)]
        velocity = lance_velocity_fn(self.model, cond, joint, prediction=self.objective.prediction)
        return euler_sample(velocity, torch.cat(noise).to(self.device), times, guided, cfg_scale)

    def _sampler_inputs(self, plans: list[SequencePlan]) -> SamplerInputs:
        """Packed prompts with their ViT tokens and clean condition latents; targets marked for the sampler."""
        batch = collate(plans).to(self.device)
        counts = batch.vae_grid_thw.prod(dim=-1)
        target_mask = torch.repeat_interleave(batch.vae_is_target, counts)
        return SamplerInputs(batch, self._condition_latents(batch), target_mask, self._vit_embeds(batch))

    def _with_twins(self, cond: SamplerInputs, cond_plans: list[SequencePlan],
                    twins: list[SequencePlan]) -> SamplerInputs:
        """The prompts followed by their caption-dropped twins in one batch. A twin differs from its prompt only in
        the caption, so its vision blocks - and the encoders' outputs for them - repeat the prompt's."""
        batch = collate(cond_plans + twins).to(self.device)
        if not torch.equal(batch.vae_grid_thw, cond.batch.vae_grid_thw.repeat(2, 1)):
            raise GenerateError("a caption-dropped twin has other vision blocks than its prompt; "
                                "SequencePlanner.prompt must keep them")
        vit_embeds = cond.vit_embeds.repeat(2, 1) if cond.vit_embeds is not None else None
        return SamplerInputs(batch, cond.latents.repeat(2, 1), cond.target_mask.repeat(2), vit_embeds)

    def _condition_latents(self, batch: PackedBatch) -> Tensor:
        """[N, z]: the VAE's latent mean of every condition block (one VAE call per shape), zeros at targets."""
        z = self.lance.cfg.latent_channels
        counts = batch.vae_grid_thw.prod(dim=-1).tolist()
        starts = [sum(counts[:i]) for i in range(len(counts))]
        latents = torch.zeros(sum(counts), z, device=self.device)
        conditions = [i for i, is_target in enumerate(batch.vae_is_target.tolist()) if not is_target]
        for i, tokens in zip(conditions, self.vae.encode_blocks([batch.vae_pixels[i] for i in conditions])):
            latents[starts[i]:starts[i] + counts[i]] = tokens.to(self.device)
        return latents

    def _decode_latents(self, x: Tensor, plans: list[SequencePlan]) -> list[Tensor]:
        """Generated target latents [n, z], prompt after prompt -> uint8 frames per prompt."""
        grids = [p.vae[-1].grid_thw for p in plans]
        pieces = x.split([t * h * w for t, h, w in grids])
        out: list[Tensor | None] = [None] * len(plans)
        by_grid: dict[tuple, list[int]] = {}
        for i, grid in enumerate(grids):
            by_grid.setdefault(grid, []).append(i)
        for grid, members in by_grid.items():
            latents = torch.stack([pieces[i].T.reshape(-1, *grid) for i in members])  # [B, z, t, h, w]
            pixels = self.vae.decode(latents.to(self.vae.device))
            for i, clip in zip(members, pixels):
                out[i] = to_uint8_frames(clip)
        return out

    # -- answers -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def answer(self, samples: list[Sample], max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
               seed: int = 0, eos_token_id: int | None = None, group: GroupConfig | None = None) -> list[str]:
        """i2t / v2t samples (caption_q the question, may be empty; caption_i an optional system prompt) -> answers.

        Greedy when temperature == 0, else sampled (top-p). Decoding stops at eos (default <|im_end|>, not part of
        the answer) or after max_new_tokens.
        """
        eos = self.tokenizer.special.im_end if eos_token_id is None else eos_token_id
        ids = self.answer_ids(samples, max_new_tokens, temperature, top_p, seed, eos, group)
        return [self.tokenizer.decode(t[:-1] if t and t[-1] == eos else t) for t in ids]

    @torch.no_grad()
    def answer_ids(self, samples: list[Sample], max_new_tokens: int = 64, temperature: float = 0.0,
                   top_p: float = 1.0, seed: int = 0, eos_token_id: int | None = None,
                   group: GroupConfig | None = None) -> list[list[int]]:
        """`answer` as token ids, eos included when it was reached."""
        eos = self.tokenizer.special.im_end if eos_token_id is None else eos_token_id

        def plan() -> list[SequencePlan]:
            self._require(samples, UND_TASKS, self.lance.cfg.visual_und, "model.visual_und")
            if max_new_tokens < 1:
                raise GenerateError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
            return [self.planner.prompt(s, group) for s in samples]

        plans, problem = planned(plan)
        chunks = budget_chunks([p.num_tokens + max_new_tokens for p in plans], self.max_batch_tokens)
        num_idle = self._agree("answer", problem, len(chunks), max_new_tokens)
        tokens: list[list[int]] = []
        with self._inference():
            for chunk in chunks:
                tokens += self._decode_chunk([plans[i] for i in chunk], chunk, max_new_tokens, eos, temperature,
                                             top_p, seed)
            idle = self.planner.placeholder(vit=False, vae=False, ce=False)
            for _ in range(num_idle):  # steps in time with the other ranks' prompts, done from the start
                self._decode_chunk([idle], [0], max_new_tokens, eos, temperature, top_p, seed, idle=True)
        return tokens

    def _decode_chunk(self, plans: list[SequencePlan], indexes: list[int], max_new_tokens: int, eos: int,
                      temperature: float, top_p: float, seed: int, idle: bool = False) -> list[list[int]]:
        prompts = collate(plans).to(self.device)
        return decode_text(self.model, prompts, self._vit_embeds(prompts), max_new_tokens=max_new_tokens,
                           eos_token_id=eos, temperature=temperature, top_p=top_p,
                           generators=[sample_generator(seed, i) for i in indexes], done=[idle] * len(plans))

    # -- shared --------------------------------------------------------------------------------------------------

    def _vit_embeds(self, batch: PackedBatch) -> Tensor | None:
        if self.vit is None or batch.vit_indexes.numel() == 0:
            return None  # no ViT block, or a trainable ViT that the model runs itself
        return encode_vit(self.vit, batch.vit_patches, batch.vit_grid_thw)

    def _require(self, samples: list[Sample], tasks: tuple[str, ...], switch_on: bool, switch: str) -> None:
        method, other = ("generate", "answer") if tasks == GEN_TASKS else ("answer", "generate")
        wrong = sorted({s.task for s in samples} - set(tasks))
        if wrong:
            raise GenerateError(f"{method} takes {list(tasks)} samples, got {wrong}; use Generator.{other} for those")
        if samples and not switch_on:
            raise GenerateError(f"the model was built with {switch}=false, so it cannot serve "
                                f"{sorted({s.task for s in samples})}")
        edits = sorted({s.task for s in samples} & set(EDIT_TASKS))
        if edits and not self.lance.cfg.visual_und:  # an edit's source reaches the model through the ViT
            raise GenerateError(f"the model was built with model.visual_und=false (no ViT), so it cannot serve {edits}")

    def _agree(self, what: str, problem: Exception | None, num_chunks: int, *settings: int) -> int:
        """Before the first forward, with every rank: how many idle forward batches this rank adds so that it runs
        as many as the rank with the most prompts (0 without a process group).

        Raises on every rank alike when any rank could not plan its prompts, or when the step settings differ
        (under ZeRO-3 either would leave the others waiting in a collective until the timeout)."""
        if world_size() == 1:
            if problem is not None:
                raise problem
            return 0
        mine = torch.tensor([float(problem is not None), num_chunks, *settings], dtype=torch.float64,
                            device=self.device)
        spread = torch.cat([mine, -mine])
        dist.all_reduce(spread, op=dist.ReduceOp.MAX)
        highest, lowest = spread[:mine.numel()], -spread[mine.numel():]
        if problem is not None:
            raise problem
        if highest[0] > 0:
            raise GenerateError(f"{what}: another rank could not plan its prompts (its error says why); every rank "
                                "stops here so that none waits for the others")
        if not torch.equal(highest[2:], lowest[2:]):
            raise GenerateError(
                f"{what}: ranks disagree on the step settings: this rank {list(settings)}, the ranks range from "
                f"{lowest[2:].long().tolist()} to {highest[2:].long().tolist()} ((steps, guided steps) for generate, "
                "max_new_tokens for answer). Under ZeRO-3 every forward is collective: give every rank the same.")
        return int(highest[1]) - num_chunks

    @contextlib.contextmanager
    def _inference(self):
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)

    def _model_device(self) -> torch.device:
        if hasattr(self.model, "device") and isinstance(self.model.device, torch.device):
            return self.model.device  # a DeepSpeed engine
        return next(self.model.parameters()).device


def planned(plan):
    """(plan(), None), or ([], the error) when the prompts cannot be planned: raised after the ranks agree."""
    from .data.sequence import PlanError

    try:
        return plan(), None
    except (GenerateError, PlanError) as e:
        return [], e


# ----------------------------------------------------------------------------------------------------------------
# command line


def parse_args(argv: list[str] | None = None):
    import argparse

    from .export import add_model_dir_flags

    p = argparse.ArgumentParser(prog="python -m lance_ds.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="training checkpoint (run, checkpoints or step dir) or export")
    p.add_argument("--task", required=True, choices=GEN_TASKS + UND_TASKS)
    p.add_argument("--prompt", help="what to generate (t2i, t2v) or the edit instruction (i2i, v2v)")
    p.add_argument("--input", help="the image (i2i, i2t) or video (v2v, v2t) file to condition on")
    p.add_argument("--question", default="", help="i2t / v2t: the question (default: none, as in captioning)")
    p.add_argument("--system", help="the system prompt of i2t / v2t (default: the one training recorded for the "
                   "task: the caption_i most of its rows carried, else its group's system_prompt; else the task's "
                   "built-in one)")
    p.add_argument("--out", help="output file: .png / .jpg for images, .mp4 for videos")
    p.add_argument("--steps", type=int, default=30, help="Euler steps (Lance: 30)")
    p.add_argument("--cfg", type=float, default=4.0, help="classifier-free guidance scale (Lance: 4.0; 1 = none)")
    p.add_argument("--seed", type=int, default=0, help="noise / sampling seed")
    p.add_argument("--size", help="t2i / t2v output size: SIDE or HEIGHTxWIDTH in pixels; i2t / v2t / i2i / v2v: the "
                   "SIDE the input is cut to (its area; aspect by the training buckets). Default: what training cut "
                   "the task with (recorded in checkpoints and exports), else 64, or a frame VAE's own size")
    p.add_argument("--frames", type=int, help="t2v: frames to generate (4k + 1); v2v: frames read from --input")
    p.add_argument("--fps", type=float, help="frame rate of reading --input and of a written mp4 (default: the "
                   "sample_fps training read the task's videos at, else 12)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="i2t / v2t: answer length limit")
    p.add_argument("--temperature", type=float, default=0.0, help="i2t / v2t: 0 = greedy")
    p.add_argument("--ema", action="store_true", help="a training checkpoint's EMA weights")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="model dtype")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    add_model_dir_flags(p)
    return p.parse_args(argv)


def sampling_problems(steps: int, cfg: float) -> list[str]:
    """--steps and --cfg, as generate and evaluate take them."""
    problems = [f"--steps must be >= 1, got {steps}"] if steps < 1 else []
    if not 0 <= cfg < float("inf"):  # nan too
        problems.append(f"--cfg must be a finite number >= 0 (1: no guidance), got {cfg}")
    return problems


def check_args(args) -> list[str]:
    """Every problem with the request at once, each naming the flag and the fix."""
    return (_input_output_problems(args) + _shape_problems(args) + _decoding_problems(args)
            + _role_problems(args) + _device_problems(args))


def _input_output_problems(args) -> list[str]:
    problems = []
    generation = args.task in GEN_TASKS
    video = args.task in VIDEO_GEN_TASKS
    needs_input = args.task not in TEXT_TO_MEDIA_TASKS
    if generation and not args.prompt:
        problems.append(f"--prompt: {args.task} needs a prompt (what to generate, or the edit instruction)")
    if needs_input and not args.input:
        problems.append(f"--input: {args.task} needs the {'video' if args.task[0] == 'v' else 'image'} to work on")
    elif needs_input and not Path(args.input).is_file():
        problems.append(f"--input: {args.input} is not a file")
    elif args.task in ("v2v", "v2t") and (kind := _input_kind(Path(args.input))) in STILL_IMAGES:
        problems.append(f"--input: {args.input} is a {kind} image; {args.task} works on a video (PyAV would read it "
                        f"as a 1-frame clip): give a video, or use {'i2i' if args.task == 'v2v' else 'i2t'}")
    elif args.task in ("i2i", "i2t") and (kind := _input_kind(Path(args.input))) in VIDEO_CONTAINERS:
        problems.append(f"--input: {args.input} is a video ({kind}); {args.task} works on an image: give an image (a "
                        f"frame of it), or use {'v2v' if args.task == 'i2i' else 'v2t'}")
    elif not needs_input and args.input:
        problems.append(f"--input: {args.task} generates from --prompt alone; drop --input (--size and --frames set "
                        "the output's size)")
    if generation:
        suffixes = VIDEO_SUFFIXES if video else IMAGE_SUFFIXES
        if not args.out:
            problems.append(f"--out: {args.task} writes {'a video' if video else 'an image'}: give its path, ending in "
                            f"{' or '.join(suffixes)}")
        elif Path(args.out).suffix.lower() not in suffixes:
            problems.append(f"--out: {args.task} writes {'a video' if video else 'an image'}: give a path ending in "
                            f"{' or '.join(suffixes)}, got {args.out!r}")
    elif args.out:
        problems.append(f"--out: {args.task} prints its answer; drop --out")
    # here, not when writing: an --out that cannot be written would throw the generation away
    if generation and args.out and (problem := output_problem("--out", args.out)):
        problems.append(problem)
    return problems


STILL_IMAGES = ("jpg", "png", "webp", "bmp", "tiff", "avif")  # (not GIF: it may be animated, a clip to PyAV)
VIDEO_CONTAINERS = ("mp4", "mov", "avi", "flv", "webm", "mkv", "ogv", "ts", "m2ts")


def _input_kind(path: Path) -> str | None:
    """The format of a file (jpg, mp4, ...: what its first bytes say), None when unknown."""
    from .data.media import sniff_extension

    with path.open("rb") as f:
        return sniff_extension(f.read(4096))


def _shape_problems(args) -> list[str]:
    problems = []
    size = parse_size(args.size) if args.size is not None else None
    if args.size is not None and size is None:
        problems.append(f"--size: give SIDE or HEIGHTxWIDTH in pixels, e.g. 64 or 64x96, got {args.size!r}")
    elif size is not None and args.task not in TEXT_TO_MEDIA_TASKS and size[0] != size[1]:
        problems.append(f"--size: {args.task} cuts its input to an area (SIDE x SIDE, aspect kept by its buckets); "
                        f"give one SIDE, got {args.size!r}")
    if args.frames is not None and args.task not in VIDEO_GEN_TASKS:
        problems.append(f"--frames: only t2v and v2v have frames, not {args.task}")
    elif args.frames is not None and args.frames < 1:
        problems.append(f"--frames must be >= 1, got {args.frames}")
    # `not x > 0` rather than `x <= 0`: nan is refused too
    if args.fps is not None and not 0 < args.fps <= 1000:
        problems.append(f"--fps must be in (0, 1000] (frames per second of the mp4 written or read), got {args.fps}")
    return problems


def _decoding_problems(args) -> list[str]:
    problems = sampling_problems(args.steps, args.cfg)
    if not args.temperature >= 0:
        problems.append(f"--temperature must be >= 0 (0: greedy), got {args.temperature}")
    if args.max_new_tokens < 1:
        problems.append(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    return problems


def _role_problems(args) -> list[str]:
    """A prompt given under the other task family's flag."""
    generation = args.task in GEN_TASKS
    if not generation and args.prompt:
        return [f"--prompt: {args.task} answers a question about its input: give it as --question"]
    if generation and args.question:
        return [f"--question: {args.task} generates; give what to generate (or the edit) as --prompt"]
    return []


def _device_problems(args) -> list[str]:
    if args.device is not None and not _device_available(args.device):
        return [f"--device: {args.device} is not available on this machine (CUDA available: "
                f"{torch.cuda.is_available()}, {torch.cuda.device_count()} device(s)); try --device cpu"]
    return []


def _device_available(name: str) -> bool:
    try:
        device = torch.device(name)
    except RuntimeError:
        return False
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()
    return False


def parse_size(text: str) -> tuple[int, int] | None:
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.strip().isascii() and p.strip().isdigit() for p in parts):  # ("²")
        return None
    height, width = (int(parts[0]), int(parts[-1]))
    return (height, width) if height > 0 and width > 0 else None


def cli_sample(args, group: GroupConfig) -> Sample:
    """The request as a sample; an input video read as training read the task's (`group`: cli_group's)."""
    from .data.media import decode_image, decode_video

    media = {}
    if args.input:
        data = Path(args.input).read_bytes()
        if args.task in ("i2i", "i2t"):
            frames = decode_image(data)
        else:
            video = group.video
            frames = decode_video(data, video.sample_fps, video.max_frames, video.max_duration)
            if args.frames is not None and frames.shape[0] < args.frames:
                print(f"lance_ds.generate: {args.input} gives {frames.shape[0]} frames at {video.sample_fps:g} fps, "
                      f"not --frames {args.frames}: the edit keeps as many as the VAE can make of them", file=sys.stderr)
            elif args.frames is None and video.max_frames and frames.shape[0] < video.max_frames:
                print(f"lance_ds.generate: {args.input} gives {frames.shape[0]} frame(s) at {video.sample_fps:g} fps "
                      f"({args.task} reads up to {video.max_frames}): a short clip shows the model little",
                      file=sys.stderr)
        media[PROMPT_MEDIA[args.task][0]] = frames
        say_if_small(args, frames, group)
    texts = {"caption": args.prompt or ""} if args.task in GEN_TASKS else {"caption_q": args.question}
    return Sample(task=args.task, texts=texts, media=media, key=args.input or args.prompt or "prompt")


def say_if_small(args, frames: Tensor, group: GroupConfig) -> None:
    """An input scaled up more than 2x a side to the area its task is cut to (the ViT's for a question) is said: it
    shows the model no more detail than it has (a 1x1 image became a flat 64 x 64 one)."""
    from .data.sequence import upscale_factor

    height, width = frames.shape[1:3]
    side = dataclasses.replace(group, task=args.task).input_side()
    if (factor := upscale_factor(height, width, side, group.image)) > 2:
        print(f"lance_ds.generate: {args.input} is {width}x{height}, scaled up {factor:.1f}x a side to the {side} x "
              f"{side} area {args.task} is cut to: the model sees no more detail than it has", file=sys.stderr)


def cli_group(vae, task: str | None = None, cuts: dict | None = None, size: int | None = None,
              frames: int | None = None, fps: float | None = None, system: str | None = None) -> GroupConfig:
    """The options a command-line prompt or input is cut with: those training cut `task` with (`cuts`, recorded in
    checkpoints and exports: sizes, frame sampling, system prompt), else the defaults (64 pixels, 12 fps); then the
    flags: `size` (--size of an input task: the side its input is cut to; i2t / v2t: the ViT's), `frames` (--frames:
    to generate, or read from a v2v input), `fps` (--fps), `system` (--system).
    A codec that takes one frame size only (the main job's frame VAE: 32) fixes the VAE side, the ViT still seeing
    an edit's source at the ViT's own."""
    known = (cuts or {}).get(task)
    group = GroupConfig() if known is None else from_dict(GroupConfig, {**known, "task": task}, Problems())
    image, video = group.image, group.video
    if size is not None:
        if task in UND_TASKS:  # only the ViT sees an understanding task's input
            image.vit_resolution = size
        image.resolution, video.resolution = size, None
    video.max_frames = frames or video.max_frames
    video.sample_fps = fps or video.sample_fps
    group.system_prompt = system or group.system_prompt
    side = getattr(vae, "frame_size", None)
    if side:
        image.vit_resolution = image.vit_resolution or group.resolution_for(task in VIDEO_TASKS)
        image.resolution, video.resolution = side, None
    return group


def cli_target_shape(args, planner: SequencePlanner, group: GroupConfig) -> tuple[int, int, int] | None:
    """--size for t2i / t2v: (frames, height, width), the frames the group's (cli_group's: --frames); None without
    --size, the planner then cutting as training did."""
    if args.task not in TEXT_TO_MEDIA_TASKS or args.size is None:
        return None
    height, width = parse_size(args.size)
    frames = 1 if args.task == "t2i" else planner.geometry.vae_num_frames(group.video.max_frames)
    return frames, height, width


def check_against_model(args, geometry) -> None:
    """--size and --frames against the model's geometry (planned_geometry: from its config files), so that they are
    refused before its weights load (minutes for a 3B checkpoint), not after. A video task's VAE takes
    k * temporal_factor + 1 frames: a v2v input read at another count was cut to the count below without a word
    (3 frames became a 1-frame clip)."""
    side = geometry.frame_size
    if side and args.task in TEXT_TO_MEDIA_TASKS and args.size and parse_size(args.size) != (side, side):
        raise GenerateError(f"--size: this model's frame VAE makes {side} x {side} frames only; use --size {side} "
                            "(or leave it out)")
    if args.frames is None or args.task not in VIDEO_GEN_TASKS:
        return
    made = geometry.vae_num_frames(args.frames)
    if made != args.frames:
        f, top = geometry.vae_temporal_factor, geometry.max_vae_frames
        near = sorted({made, min(made + f, top)})
        raise GenerateError(f"--frames {args.frames}: this model's VAE makes k x {f} + 1 frames, at most {top}; use "
                            f"--frames {' or '.join(map(str, near))}")


def main(argv: list[str] | None = None) -> int:
    from .export import ExportError, moved_dirs, saved_model_config
    from .model.build import planned_geometry

    args = parse_args(argv)
    problems = check_args(args)
    if problems:
        print("lance_ds.generate: " + "\n  ".join([f"{len(problems)} problem(s):"] + problems), file=sys.stderr)
        return 2
    try:
        check_against_model(args, planned_geometry(saved_model_config(args.checkpoint, moved_dirs(args))))
        gen = Generator.from_checkpoint(args.checkpoint, ema=args.ema, dtype=args.dtype, device=args.device,
                                        moved=moved_dirs(args))
        print(f"lance_ds.generate: {gen.source}", file=sys.stderr)
        if gen.cuts and args.task not in gen.cuts:  # (no cuts at all: a checkpoint from before they were recorded)
            print(f"lance_ds.generate: the run trained no {args.task} group (its tasks: {', '.join(gen.cuts)}): "
                  f"{args.task} is asked of a model that did not learn it", file=sys.stderr)
        input_side = parse_size(args.size)[0] if args.size and args.task not in TEXT_TO_MEDIA_TASKS else None
        group = cli_group(gen.vae, args.task, gen.cuts, input_side, args.frames, args.fps, args.system)
        sample = cli_sample(args, group)
        if args.task in UND_TASKS:
            if group.system_prompt is None:  # (none recorded: shards from URLs, a task training did not see)
                print(f"lance_ds.generate: system prompt: {args.task}'s built-in one; if the training rows carried "
                      "their own (caption_i), give it with --system", file=sys.stderr)
            (answer,) = gen.answer([sample], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                   seed=args.seed, group=group)
            if not answer.strip():
                print("lance_ds.generate: the answer is empty: the model ended its turn at once", file=sys.stderr)
            print(answer)
            return 0
        (frames,) = gen.generate([sample], num_steps=args.steps, cfg_scale=args.cfg, seed=args.seed,
                                 target_shape=cli_target_shape(args, gen.planner, group), group=group)
    except (ExportError, ValueError, FileNotFoundError) as e:  # ValueError: GenerateError, PlanError, model checks
        print(f"lance_ds.generate: {e}", file=sys.stderr)
        return 2
    try:
        write_media(frames, Path(args.out), group.video.sample_fps)
    except OSError as e:  # checked before loading; still possible (a full disk, a path changed meanwhile)
        print(f"lance_ds.generate: could not write {args.out}: {e}", file=sys.stderr)
        return 1
    print(f"lance_ds.generate: wrote {args.out} ({frames.shape[0]} frame(s), {frames.shape[1]}x{frames.shape[2]})",
          file=sys.stderr)
    return 0


def write_media(frames: Tensor, path: Path, fps: float) -> None:
    from .data.media import encode_image, encode_video

    if path.suffix.lower() in VIDEO_SUFFIXES:
        data = encode_video(frames, fps)
    else:
        data = encode_image(frames[:1], "jpeg" if path.suffix.lower() in (".jpg", ".jpeg") else "png")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data)  # an earlier output is replaced whole or not at all


if __name__ == "__main__":
    sys.exit(main())
