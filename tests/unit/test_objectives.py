"""Objectives: timestep shift, noising, loss normalisation, the Euler sampler with guidance, text decoding."""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch

from lance_ds.config.core import Problems
from lance_ds.config.model import ObjectiveConfig
from lance_ds.data.batch import AttnMode
from lance_ds.model.synthetic import Text, Vae, synthetic_batch
from lance_ds.objectives import (SamplerInputs, as_velocity, token_losses, compute_losses, decode_text, euler_sample,
                                 guided_steps, lance_velocity_fn, normalised, pick_token, prepare_flow, sample_timesteps,
                                 sampling_schedule, shift_timesteps, step_weights)


def test_timestep_shift_table():
    """reference/LANCE_FACTS.md: z = -2..2 -> t' = 0.3512, 0.5954, 0.8000, 0.9158, 0.9673 with s = 4."""
    z = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0])
    t = shift_timesteps(torch.sigmoid(z), 4.0)
    assert torch.allclose(t, torch.tensor([0.3512, 0.5954, 0.8000, 0.9158, 0.9673]), atol=5e-5)
    draws = sample_timesteps(10000, 4.0, generator=torch.Generator().manual_seed(0))
    assert 0 < draws.min() and draws.max() < 1 and abs(draws.median() - 0.8) < 0.02  # median of z is 0


def edit_batch():
    """An edit-like sample (clean 2x2 source, 2x3 target) and a t2i sample (1x2x2 target with MSE weight 0.5)."""
    return synthetic_batch([[Text(3), Vae(1, 2, 2, target=False), Text(2), Vae(1, 2, 3), Text(1)],
                            [Text(2), Vae(1, 2, 2, weight=0.5), Text(1)]], num_text_classes=100)


def test_prepare_flow_noises_targets_only():
    batch = edit_batch()
    clean = torch.randn(4 + 6 + 4, 8)
    flow = prepare_flow(clean, batch, ObjectiveConfig(timestep_shift=4.0), torch.Generator().manual_seed(0))
    source, target, t2i = slice(0, 4), slice(4, 10), slice(10, 14)
    assert torch.equal(flow.timesteps[source], torch.zeros(4)) and torch.equal(flow.noisy[source], clean[source])
    assert flow.timesteps[target].unique().numel() == 1 and flow.timesteps[t2i].unique().numel() == 1  # one t per block
    assert flow.timesteps[target][0] != flow.timesteps[t2i][0]
    assert flow.weights.tolist() == [0.0] * 4 + [1.0] * 6 + [0.5] * 4
    eps = flow.target + clean
    t = flow.timesteps[:, None]
    assert torch.allclose(flow.noisy, (1 - t) * clean + t * eps, atol=1e-6)
    with pytest.raises(ValueError, match="vae_grid_thw"):
        prepare_flow(clean[:5], batch, ObjectiveConfig())


def test_timestep_draws_follow_the_objective():
    batch = edit_batch()
    for mean, expected in ((3.0, 0.9526), (-3.0, 0.0474)):  # sigmoid(+-3), unshifted, (nearly) no spread
        objective = ObjectiveConfig(timestep_shift=1.0, timestep_mean=mean, timestep_std=0.001)
        flow = prepare_flow(torch.randn(14, 8), batch, objective, torch.Generator().manual_seed(4))
        assert torch.allclose(flow.timesteps[4:], torch.full((10,), expected), atol=2e-3)
    shifted = prepare_flow(torch.randn(14, 8), batch, ObjectiveConfig(timestep_shift=4.0, timestep_std=0.001),
                           torch.Generator().manual_seed(4))
    assert torch.allclose(shifted.timesteps[4:], torch.full((10,), 0.8), atol=2e-3)  # 4 * 0.5 / (1 + 3 * 0.5)


@pytest.mark.parametrize("mse_per", ["token", "block"])
def test_micro_steps_of_one_step_weigh_every_token_alike(mse_per):
    """grad_accum: the micro-steps' losses, each divided by the number of micro-steps as DeepSpeed does, add up to
    the loss of the whole step over all its tokens: a micro-batch with 1 CE token and one with 5 (and different
    latent counts) give their tokens equal weight, not each micro-batch half of the loss."""
    objective = ObjectiveConfig(ce_weight=0.25, mse_per=mse_per)
    batches = [synthetic_batch([[Text(3, scored=True), Vae(1, 2, 2), Text(1)]], num_text_classes=50, seed=1),
               synthetic_batch([[Text(7, scored=True), Vae(1, 2, 3, weight=0.5), Text(1)],
                                [Text(2), Vae(1, 1, 2), Text(1)]], num_text_classes=50, seed=2)]
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(b.ce_indexes.numel(), 50, generator=g, requires_grad=True) for b in batches]
    velocity = [torch.randn(b.vae_indexes.numel(), 8, generator=g, requires_grad=True) for b in batches]
    flows = [prepare_flow(torch.randn(b.vae_indexes.numel(), 8, generator=g), b, objective, g) for b in batches]
    step = step_weights(batches, objective, torch.device("cpu"))
    micro = sum(compute_losses(lg, v, b, f, objective, step=step, micro_steps=2).total / 2
                for lg, v, b, f in zip(logits, velocity, batches, flows))
    tokens = [token_losses(lg, v, b, f, objective) for lg, v, b, f in zip(logits, velocity, batches, flows)]
    ce = sum((t.ce * t.ce_weights).sum() for t in tokens) / sum(t.ce_weights.sum() for t in tokens)
    mse = sum((t.mse * t.mse_weights).sum() for t in tokens) / sum(t.mse_weights.sum() for t in tokens)
    whole = 0.25 * ce + mse
    assert torch.allclose(micro, whole)
    got = torch.autograd.grad(micro, logits + velocity)
    for a, b in zip(got, torch.autograd.grad(whole, logits + velocity)):
        assert torch.allclose(a, b, atol=1e-7)
    assert step[2].item() == sum(int((b.ce_weights > 0).sum()) for b in batches)  # scored CE positions of the step


def test_mse_per_block_weighs_each_generated_block_alike():
    """objective.mse_per: block: the 6-token target and the 4-token t2i target each weigh their block weight in all,
    so the MSE is the mean of the two blocks' own means (the t2i one at its weight 0.5)."""
    batch = edit_batch()
    flow = prepare_flow(torch.randn(14, 8), batch, ObjectiveConfig(mse_per="block"), torch.Generator().manual_seed(1))
    assert torch.allclose(flow.weights, torch.tensor([0.0] * 4 + [1 / 6] * 6 + [0.5 / 4] * 4))
    velocity = torch.randn(14, 8)
    losses = compute_losses(torch.randn(0, 100), velocity, batch, flow, ObjectiveConfig(mse_per="block"))
    mse_tok = (velocity - flow.target).pow(2).mean(-1)
    assert torch.allclose(losses.mse, (mse_tok[4:10].mean() + 0.5 * mse_tok[10:].mean()) / 1.5)
    found = Problems()
    ObjectiveConfig(mse_per="sample").check(found, "objective")
    assert any("mse_per" in item for item in found.items)


def test_losses_are_weighted_means_and_count_their_tokens():
    batch = edit_batch()
    batch = dataclasses.replace(batch, ce_indexes=torch.tensor([0, 1, 2]), ce_targets=torch.tensor([1, 2, 3]),
                                ce_weights=torch.tensor([1.0, 1.0, 0.0]))
    flow = prepare_flow(torch.randn(14, 8), batch, ObjectiveConfig(), torch.Generator().manual_seed(1))
    logits = torch.randn(3, 100, requires_grad=True)
    velocity = torch.randn(14, 8, requires_grad=True)
    losses = compute_losses(logits, velocity, batch, flow, ObjectiveConfig(ce_weight=0.25, mse_weight=1.0))
    ce_tok = torch.nn.functional.cross_entropy(logits, batch.ce_targets, reduction="none")
    mse_tok = (velocity - flow.target).pow(2).mean(-1)
    assert torch.allclose(losses.ce, ce_tok[:2].mean())  # the zero-weight placeholder does not count
    assert torch.allclose(losses.mse, (mse_tok * flow.weights).sum() / 8.0)  # 6 + 0.5 * 4 weighted tokens
    assert torch.allclose(losses.total, 0.25 * losses.ce + losses.mse)
    assert (losses.num_ce_tokens, losses.num_mse_tokens) == (2.0, 8.0)
    assert losses.scored_tokens == (2.0, 10.0)  # tokens scored: 6 + 4 target latents (weights 1 and 0.5)
    losses.total.backward()
    assert logits.grad[2].abs().sum() == 0 and velocity.grad[:4].abs().sum() == 0  # placeholders / conditions


def test_global_normalisation_across_ranks():
    """Two ranks with 1 and 3 tokens: after DeepSpeed's gradient average every token weighs the same."""
    per_rank = [torch.tensor([2.0]), torch.tensor([1.0, 1.0, 4.0])]
    count = torch.tensor(4.0)
    losses = [normalised(l, torch.ones_like(l), count, num_ranks=2) for l in per_rank]
    assert torch.allclose(sum(losses) / 2, torch.cat(per_rank).mean())
    nothing = normalised(torch.tensor([3.0], requires_grad=True), torch.zeros(1), torch.tensor(0.0), 2)
    assert nothing.item() == 0.0 and nothing.requires_grad  # a placeholder-only micro-batch stays in the graph


def no_text(batch):
    return torch.zeros(batch.ce_targets.shape[0], 100)


def test_data_prediction_is_scored_and_sampled_as_the_velocity_it_implies():
    """prediction = data: a head that outputs the clean latents exactly has zero velocity loss, any other output is
    penalised as (x_t - out) / t, and the sampler turns the same output into the step it takes."""
    batch = edit_batch()
    clean = torch.randn(14, 8)
    flow = prepare_flow(clean, batch, ObjectiveConfig(timestep_shift=1.0), torch.Generator().manual_seed(2))
    cfg = ObjectiveConfig(prediction="data")
    assert compute_losses(no_text(batch), clean, batch, flow, cfg).mse.item() < 1e-9
    wrong = clean + 0.1
    expected = ((flow.noisy - wrong) / flow.timesteps.clamp(min=0.05)[:, None] - flow.target).pow(2).mean(-1)
    assert torch.allclose(compute_losses(no_text(batch), wrong, batch, flow, cfg).mse,
                          (expected * flow.weights).sum() / flow.weights.sum())
    assert compute_losses(no_text(batch), clean, batch, flow, ObjectiveConfig()).mse > 0.1  # read as velocity
    # a perfect x_0 predictor through the sampler's velocity lands on x_0, also when the last steps start below
    # MIN_DATA_T (50 unshifted steps: the last starts at t = 0.02)
    x0 = torch.tensor([[1.5, -2.0, 0.25]])
    perfect = lambda batch, vit_embeds, latents, timesteps: types.SimpleNamespace(velocity=x0)  # noqa: E731
    velocity = lance_velocity_fn(perfect, SamplerInputs(None, torch.zeros(1, 3), torch.tensor([True])),
                                 prediction="data")
    times = sampling_schedule(50, 1.0)
    assert torch.allclose(euler_sample(velocity, torch.randn(1, 3), times, [False] * 50), x0, atol=1e-5)
    with pytest.raises(ValueError, match="objective.prediction"):
        as_velocity(x0, x0, torch.ones(1), "noise")


@pytest.mark.parametrize("prediction", ["velocity", "data"])
def test_per_task_losses_score_what_training_scores(prediction):
    """train/mse/<task> (validation.TaskLosses) is the MSE the optimiser sees, whatever the head predicts."""
    from types import SimpleNamespace

    from lance_ds.validation import TaskLosses

    batch = dataclasses.replace(edit_batch(), tasks=["i2i", "t2i"])
    flow = prepare_flow(torch.randn(14, 8), batch, ObjectiveConfig(timestep_shift=1.0), torch.Generator().manual_seed(3))
    pred = SimpleNamespace(logits=no_text(batch), velocity=torch.randn(14, 8))
    trained = compute_losses(pred.logits, pred.velocity, batch, flow, ObjectiveConfig(prediction=prediction))
    per_task = TaskLosses(torch.device("cpu"))
    per_task.add(batch, trained.per_token)
    assert per_task.scalars("train")["train/mse"] == pytest.approx(trained.mse.item(), rel=1e-5)
    per_task.add(batch, token_losses(pred.logits, pred.velocity, batch, flow, ObjectiveConfig(prediction=prediction)))
    assert per_task.scalars("val")["val/mse"] == pytest.approx(trained.mse.item(), rel=1e-5)  # validation's path


def test_euler_sampler_recovers_the_point_and_guides_in_the_interval():
    """For data that is a single point x0, the exact velocity is (x_t - x0) / t: Euler lands on x0 exactly."""
    x0 = torch.tensor([[1.5, -2.0, 0.25]])
    calls = []

    def velocity(x, t, guided):
        calls.append((round(t, 6), guided))
        exact = (x - x0) / t
        return exact, (exact if guided else None)  # the same unconditional velocity: guidance changes nothing

    times = sampling_schedule(30, 3.5)
    assert times[0] == 1.0 and times[-1] == 0.0 and bool((times[1:] < times[:-1]).all())
    assert guided_steps(times, 1.0, (0.4, 1.0)) == [False] * 30  # scale 1: never an unconditional pass
    out = euler_sample(velocity, torch.randn(1, 3), times, guided_steps(times, 1.0, (0.4, 1.0)))
    assert torch.allclose(out, x0, atol=1e-5) and not any(g for _, g in calls)
    calls.clear()
    steps = guided_steps(times, 4.0, (0.4, 1.0))
    assert steps == [0.4 <= float(t) <= 1.0 for t in times[:-1]] and any(steps) and not all(steps)
    assert torch.allclose(euler_sample(velocity, torch.randn(1, 3), times, steps, cfg_scale=4.0), x0, atol=1e-5)
    assert [g for _, g in calls] == steps
    # constant velocities v_c = 1, v_u = 0: v = v_u + 4 (v_c - v_u) = 4 on guided steps, 1 on the others
    constant = lambda x, t, guided: (torch.ones_like(x), torch.zeros_like(x) if guided else None)  # noqa: E731
    span = sum(float(times[i] - times[i + 1]) for i, g in enumerate(steps) if g)
    noise = torch.randn(1, 3)
    assert torch.allclose(euler_sample(constant, noise, times, steps, cfg_scale=4.0), noise - 1 - 3 * span, atol=1e-6)


def test_pick_token_greedy_and_top_p():
    logits = torch.tensor([1.0, 3.0, 2.9, -5.0])
    assert pick_token(logits) == 1
    g = torch.Generator().manual_seed(0)
    picks = {pick_token(logits, temperature=1.0, top_p=0.4, generator=g) for _ in range(50)}
    assert picks == {1}  # the top token alone holds 0.49 >= 0.4 of the mass
    picks = {pick_token(logits, temperature=1.0, top_p=0.9, generator=g) for _ in range(200)}
    assert picks == {1, 2}


class CountingModel(torch.nn.Module):
    """Predicts (last id + 1) % 50 for every sample, through prefill / extend; records the RoPE ids and samples it
    is given: decoding must feed each prompt's own outputs back, at the right positions."""

    cfg = types.SimpleNamespace(latent_channels=1)

    def __init__(self):
        super().__init__()
        self.extended = []

    def prefill(self, batch, vit_embeds, noisy, timesteps):
        logits = torch.nn.functional.one_hot((batch.input_ids[batch.ce_indexes] + 1) % 50, 50).float()
        return types.SimpleNamespace(logits=logits), None

    def extend(self, token_ids, position_ids, sample_ids, cache):
        self.extended.append((position_ids.clone(), sample_ids.tolist()))
        return torch.nn.functional.one_hot((token_ids + 1) % 50, 50).float()


def test_decode_text_answers_each_packed_prompt_until_its_eos():
    prompts = synthetic_batch([[Text(4)], [Text(3)], [Text(2)]], num_text_classes=40, seed=3)
    first, second = int(prompts.input_ids[3]), int(prompts.input_ids[6])
    eos = (first + 2) % 50  # the first prompt reaches it at its 2nd token
    model = CountingModel()
    out = decode_text(model, prompts, max_new_tokens=5, eos_token_id=eos, done=[False, False, True])
    assert out[0] == [(first + 1) % 50, eos]
    expected = [(second + i) % 50 for i in range(1, 6)]
    assert out[1] == expected[:expected.index(eos) + 1] if eos in expected else out[1] == expected
    assert out[2] == []  # needed no answer, stepped along
    assert len(model.extended) == len(out[1]) - 1  # 1 prefill + an extend per further token; none after the last
    positions, samples = model.extended[-1]
    step = len(model.extended)
    assert samples == [0, 1, 2] and positions.tolist() == [[3 + step, 2 + step, 1 + step]] * 3  # per prompt, all axes
    with pytest.raises(ValueError, match="must end with text"):
        decode_text(model, synthetic_batch([[Text(2), Vae(1, 2, 2)]], num_text_classes=40))
    padded = dataclasses.replace(prompts, tasks=["synthetic", "synthetic", "pad"])
    interleaved = dataclasses.replace(prompts, sample_ids=prompts.sample_ids.index_fill(0, torch.tensor([1]), 1))
    for bad in (padded, interleaved):  # a padding sample would be answered; split samples would see each other
        with pytest.raises(ValueError, match="contiguous run, no padding"):
            decode_text(model, bad)
    with pytest.raises(ValueError, match="one generator and one done flag each"):
        decode_text(model, prompts, done=[False])


def test_samplers_run_on_a_lance_model():
    """Decoding and guided Euler sampling through the real debug model (shapes, masks, conditions)."""
    from lance_ds.config.model import ModelConfig
    from lance_ds.model import build_model, encode_vit
    from lance_ds.model.synthetic import Vit

    torch.manual_seed(0)
    bundle = build_model(ModelConfig(size="debug", dtype="fp32", vit_dtype="fp32"), 500)
    prompt = synthetic_batch([[Text(4), Vit(1, 4, 4), Text(5)]], num_text_classes=500)
    vit = encode_vit(bundle.vit, prompt.vit_patches, prompt.vit_grid_thw)
    answer = decode_text(bundle.model, prompt, vit, max_new_tokens=3)
    assert len(answer) == 1 and len(answer[0]) == 3 and all(0 <= t < 500 for t in answer[0])

    z = bundle.geometry.latent_channels
    edit = synthetic_batch([[Text(3), Vae(1, 2, 2, target=False), Text(2), Vae(1, 2, 3), Text(1)]], 500)
    source = torch.randn(4, z)
    mask = torch.tensor([False] * 4 + [True] * 6)
    latents = torch.cat([source, torch.zeros(6, z)])
    both = synthetic_batch([[Text(3), Vae(1, 2, 2, target=False), Text(2), Vae(1, 2, 3), Text(1)],
                            [Text(1), Vae(1, 2, 2, target=False), Text(1), Vae(1, 2, 3), Text(1)]], 500)
    velocity = lance_velocity_fn(bundle.model, SamplerInputs(edit, latents, mask),
                                 SamplerInputs(both, latents.repeat(2, 1), mask.repeat(2)))
    times = sampling_schedule(2, 3.5)
    out = euler_sample(velocity, torch.randn(6, z), times, [True, False], cfg_scale=4.0)
    assert out.shape == (6, z) and torch.isfinite(out).all()


def append_token(batch, token_id: int):
    """The one-sample batch with one more text token at its end (in its trailing causal split), scored next."""
    last = batch.num_tokens - 1

    def grow(x, value):
        return torch.cat([x, torch.as_tensor([value], dtype=x.dtype)])

    return dataclasses.replace(
        batch, input_ids=grow(batch.input_ids, token_id),
        position_ids=torch.cat([batch.position_ids, batch.position_ids[:, -1:] + 1], dim=1),
        sample_ids=grow(batch.sample_ids, batch.sample_ids[last]), split_ids=grow(batch.split_ids, batch.split_ids[last]),
        attn_modes=grow(batch.attn_modes, int(AttnMode.CAUSAL)), ce_indexes=torch.tensor([last + 1]),
        ce_targets=torch.zeros(1, dtype=torch.long), ce_weights=torch.zeros(1), num_real_tokens=last + 2)


def test_kv_cache_decoding_matches_recomputing_the_sequence():
    """prefill + extend gives the logits a full forward over the grown sequence gives, with a prompt holding a
    ViT block and a noised latent block (which later text must not see); and a prompt packed with another decodes
    as it does alone (new text sees its own sample only), whichever comes first."""
    from lance_ds.config.model import ModelConfig
    from lance_ds.model import build_model, encode_vit
    from lance_ds.model.synthetic import Vit

    torch.manual_seed(0)
    bundle = build_model(ModelConfig(size="debug", dtype="fp32", vit_dtype="fp32"), 500)
    model = bundle.model
    edit, question = [Text(3), Vit(1, 4, 4), Text(2), Vae(1, 2, 2), Text(4)], [Text(5), Vit(1, 4, 4), Text(3)]
    prompt = synthetic_batch([edit], num_text_classes=500)
    prompt = dataclasses.replace(prompt, ce_indexes=torch.tensor([prompt.num_tokens - 1]))
    vit = encode_vit(bundle.vit, prompt.vit_patches, prompt.vit_grid_thw)
    latents = torch.randn(4, bundle.geometry.latent_channels)
    t = torch.full((4,), 0.7)
    pred, cache = model.prefill(prompt, vit, latents, t)
    batch, position = prompt, prompt.position_ids[:, -1:]
    with torch.no_grad():
        assert torch.allclose(pred.logits, model(batch, vit, latents, t).logits, atol=1e-5)
        for token in (17, 42, 301):
            position = position + 1
            cached = model.extend(torch.tensor([token]), position, torch.tensor([0]), cache)
            batch = append_token(batch, token)
            full = model(batch, vit, latents, t).logits
            assert torch.allclose(cached, full, atol=1e-4), (cached - full).abs().max()
    assert cache.num_tokens == prompt.num_tokens + 3 and not cache.visible[prompt.vae_indexes].any()

    def answers(samples, latents=None, t=None):
        batch = synthetic_batch(samples, num_text_classes=500)  # sample 0's ids do not depend on what follows it
        vit = encode_vit(bundle.vit, batch.vit_patches, batch.vit_grid_thw)
        return decode_text(model, batch, vit, latents, t, max_new_tokens=6)

    assert answers([edit, question], latents, t)[0] == answers([edit], latents, t)[0]
    assert answers([question, edit], latents, t)[0] == answers([question])[0]
