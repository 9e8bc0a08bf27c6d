"""LanceModel's architecture: positions, expert routing, branch switches, freezing, LoRA, checkpointing."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from lance_ds.config.core import ConfigError, Problems
from lance_ds.config.model import LapeConfig, LoraConfig, ModelConfig
from lance_ds.model import build_model, load_lora, save_lora
from lance_ds.model.lance import LanceModel
from lance_ds.model.positions import (LatentPositions, LearnablePositions, apply_rope, lape_cost, rope_cos_sin,
                                      sincos_axis_dims, timestep_sinusoid)
from lance_ds.model.synthetic import Text, Vae, Vit, random_latents, synthetic_batch
from lance_ds.model.vision import encode_vit

NUM_CLASSES = 1000


def build(**overrides):
    cfg = ModelConfig(size="debug", dtype="fp32", vit_dtype="fp32", **overrides)
    return build_model(cfg, NUM_CLASSES)


def mixed_batch(seed: int = 0):
    """t2i-like, i2t-like and an edit-like sample, packed."""
    return synthetic_batch([
        [Text(6), Vae(1, 2, 3), Text(1)],
        [Text(4), Vit(1, 4, 4), Text(3), Text(5, scored=True)],
        [Text(3), Vit(1, 2, 2), Vae(1, 2, 2, target=False), Text(2), Vae(1, 2, 2), Text(1)],
    ], NUM_CLASSES, seed=seed)


def run(bundle, batch, seed: int = 0):
    z = bundle.geometry.latent_channels
    vit = encode_vit(bundle.vit, batch.vit_patches, batch.vit_grid_thw) if bundle.vit is not None else None
    latents = random_latents(batch, z, seed)
    t = torch.rand(latents.shape[0], generator=torch.Generator().manual_seed(seed))
    return bundle.model(batch, vit, latents, t)


# ----------------------------------------------------------------------------------------------------------------
# positions


def test_sincos_channel_split_matches_lance():
    assert sincos_axis_dims(2048) == (682, 682, 684)
    assert sincos_axis_dims(64) == (20, 20, 24)


def test_latent_positions_refuse_instead_of_aliasing():
    table = LatentPositions(hidden_size=64, max_latent_size=8, max_latent_frames=3)
    rows = table.table()
    assert rows.shape == (3 * 8 * 8, 64)
    coords = torch.tensor([[2, 7, 7], [1, 3, 5]])
    assert torch.equal(table(coords), rows[coords[:, 0] * 64 + coords[:, 1] * 8 + coords[:, 2]])
    with pytest.raises(ValueError, match="w=8.*max_latent_size"):
        table(torch.tensor([[0, 0, 8]]))  # one column past the table: Lance would alias it onto the next row
    with pytest.raises(ValueError, match="t=3"):
        table(torch.tensor([[3, 0, 0]]))


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "100"])
def test_lape_sizes_must_be_positive_integers(bad):
    with pytest.raises(ValueError, match="model.lape.num_spatial_tokens must be a positive integer"):
        LearnablePositions(64, bad, 100)
    problems = Problems()
    LapeConfig(enabled=True, num_spatial_tokens=bad).check(problems, "model.lape")
    assert any("model.lape.num_spatial_tokens" in p for p in problems.items)


def test_lape_cost_and_tables():
    assert lape_cost(2048, 100, 100, 2) == {"num_params": 409600, "weight_bytes": 819200, "train_bytes": 5734400}
    lape = LearnablePositions(8, 5, 4)
    assert torch.equal(lape(torch.tensor([[1, 2, 3]])), torch.zeros(1, 8))  # zero init: pretrained function kept
    torch.nn.init.normal_(lape.spatial)
    a, b = lape(torch.tensor([[0, 1, 2], [0, 2, 1]]))
    assert not torch.equal(a, b), "rows and columns must not be interchangeable"
    with pytest.raises(ValueError, match="LAPE"):
        lape(torch.tensor([[0, 5, 0]]))
    bundle = build(lape=LapeConfig(enabled=True, num_spatial_tokens=40, num_temporal_tokens=12))
    hidden = bundle.geometry.hidden_size
    assert bundle.lape["num_params"] == (40 + 12) * hidden
    assert bundle.model.lape.spatial.shape == (40, hidden)


def test_timestep_sinusoid():
    emb = timestep_sinusoid(torch.tensor([0.0, 0.5]), 256)
    assert emb.shape == (2, 256)
    assert torch.equal(emb[0], torch.cat([torch.ones(128), torch.zeros(128)]))  # cos then sin; t used as is


def test_mrope_on_text_is_plain_rope():
    """Text carries the same id on all three axes, so the sections collapse to ordinary 1-D RoPE."""
    pos = torch.arange(7)
    cos, sin = rope_cos_sin(torch.stack([pos] * 3), head_dim=16, theta=1e4, mrope_section=(2, 3, 3))
    inv = 1.0 / 1e4 ** (torch.arange(0, 16, 2).double() / 16)
    angles = torch.cat([pos[:, None] * inv, pos[:, None] * inv], dim=-1)
    assert torch.allclose(cos.double(), angles.cos(), atol=1e-6) and torch.allclose(sin.double(), angles.sin(), atol=1e-6)
    # a vision token's height id rotates only the height section
    ids = torch.tensor([[0], [5], [0]])
    cos, _ = rope_cos_sin(ids, 16, 1e4, (2, 3, 3))
    assert torch.equal(cos[0, :2], torch.ones(2)) and not torch.equal(cos[0, 2:5], torch.ones(3))
    assert torch.equal(cos[0, 5:8], torch.ones(3))
    x = torch.randn(7, 2, 16)
    cos, sin = rope_cos_sin(torch.stack([pos] * 3), 16, 1e4, (2, 3, 3))
    assert torch.allclose(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1), atol=1e-5)  # a rotation


# ----------------------------------------------------------------------------------------------------------------
# routing and branches


def expert_of(name: str) -> str | None:
    if not name.startswith("language_model."):
        return None
    return "gen" if "_moe_gen" in name else "und"


def grads_by_expert(model: LanceModel) -> dict[str, set[str]]:
    touched = {"und": set(), "gen": set()}
    for name, p in model.named_parameters():
        side = expert_of(name)
        if side and p.grad is not None and p.grad.abs().sum() > 0:
            touched[side].add(name)
    return touched


def test_mot_routing_gen_tokens_train_only_the_gen_expert():
    """A sample of only latent tokens (no text to attend to) and a text-only sample: each loss reaches only its
    own expert's decoder weights."""
    bundle = build(visual_und=False)
    model = bundle.model
    gen_params = {n for n, _ in model.named_parameters() if expert_of(n) == "gen"}
    und_params = {n for n, _ in model.named_parameters() if expert_of(n) == "und"}
    batch = synthetic_batch([[Vae(1, 3, 3)], [Text(9, scored=True)]], NUM_CLASSES)
    # a latent-only sample has no vision start/end text tokens: drop them so the sample is pure gen tokens
    keep = torch.ones(batch.num_tokens, dtype=torch.bool)
    keep[[0, batch.vae_indexes.max().item() + 1]] = False
    remap = torch.cumsum(keep.long(), 0) - 1
    batch = dataclasses.replace(
        batch, input_ids=batch.input_ids[keep], position_ids=batch.position_ids[:, keep],
        sample_ids=batch.sample_ids[keep], split_ids=batch.split_ids[keep], attn_modes=batch.attn_modes[keep],
        ce_indexes=remap[batch.ce_indexes], vae_indexes=remap[batch.vae_indexes])

    pred = run(bundle, batch)
    pred.velocity.square().sum().backward(retain_graph=True)
    touched = grads_by_expert(model)
    assert touched["und"] == set(), f"gen tokens reached und weights: {sorted(touched['und'])[:3]}"
    assert touched["gen"] == gen_params
    model.zero_grad()
    pred.logits.logsumexp(-1).sum().backward()
    touched = grads_by_expert(model)
    assert touched["gen"] == set(), f"text tokens reached gen weights: {sorted(touched['gen'])[:3]}"
    assert touched["und"] == und_params


def test_gen_expert_starts_as_a_copy_of_und():
    params = dict(build().model.named_parameters())
    for name, p in params.items():
        if "_moe_gen" in name:
            twin = name.replace("_moe_gen", "")
            assert torch.equal(p, params[twin]), name


def test_visual_switches_build_without_branches():
    no_gen = build(visual_gen=False)
    names = [n for n, _ in no_gen.model.named_parameters()]
    assert no_gen.vae is None and not any("_moe_gen" in n or n.startswith(("vae2llm", "time_embedder")) for n in names)
    text_vit = synthetic_batch([[Text(3), Vit(1, 2, 2), Text(4, scored=True)]], NUM_CLASSES)
    assert run(no_gen, text_vit).logits.shape == (4, NUM_CLASSES)
    with pytest.raises(ValueError, match="visual_gen=false"):
        run(no_gen, mixed_batch())
    no_und = build(visual_und=False)
    assert no_und.vit is None
    with pytest.raises(ValueError, match="visual_und=false"):
        run(no_und, text_vit)


def test_forward_shapes_and_missing_inputs_named():
    bundle = build()
    batch = mixed_batch()
    pred = run(bundle, batch)
    assert pred.logits.shape == (batch.ce_indexes.numel(), NUM_CLASSES)
    assert pred.velocity.shape == (batch.vae_indexes.numel(), bundle.geometry.latent_channels)
    with pytest.raises(ValueError, match="vit_embeds"):
        bundle.model(batch, None, random_latents(batch, bundle.geometry.latent_channels),
                     torch.zeros(batch.vae_indexes.numel()))


def test_attention_backends_agree_on_the_model():
    torch.manual_seed(0)
    sdpa = build()
    flex = build(attention="flex")
    flex.model.load_state_dict(sdpa.model.state_dict())
    flex.vit.load_state_dict(sdpa.vit.state_dict())
    batch = mixed_batch()
    with torch.no_grad():
        a, b = run(sdpa, batch), run(flex, batch)
    assert torch.allclose(a.logits, b.logits, atol=1e-5) and torch.allclose(a.velocity, b.velocity, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = build()
    ckpt = build(gradient_checkpointing=True)
    ckpt.model.load_state_dict(plain.model.state_dict())
    ckpt.vit.load_state_dict(plain.vit.state_dict())
    batch = mixed_batch()
    for bundle in (plain, ckpt):
        pred = run(bundle, batch)
        (pred.logits.logsumexp(-1).sum() + pred.velocity.square().sum()).backward()
    for (name, a), (_, b) in zip(plain.model.named_parameters(), ckpt.model.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_freeze_modules_by_glob():
    bundle = build(freeze_modules=["language_model.model.embed_tokens*", "*_moe_gen.*"])
    frozen = {n for n, p in bundle.model.named_parameters() if not p.requires_grad}
    assert "language_model.model.embed_tokens.weight" in frozen
    assert "language_model.model.layers.0.mlp_moe_gen.up_proj.weight" in frozen
    assert "language_model.model.layers.0.mlp.up_proj.weight" not in frozen
    with pytest.raises(ConfigError, match="model.freeze_modules: pattern 'nothing.*' matches no parameter"):
        build(freeze_modules=["nothing.*"])


def test_lora_trains_only_adapters_and_round_trips(tmp_path):
    settings = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    bundle = build(training_type="lora", lora=settings)
    model = bundle.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    adapted = {n.split(".lora_A.")[0].rsplit(".", 1)[-1] for n in trainable if ".lora_A." in n}
    assert adapted == {"q_proj", "v_proj", "q_proj_moe_gen", "v_proj_moe_gen"}  # both experts, as named
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for seed in range(2):
        pred = run(bundle, mixed_batch(seed), seed)
        (pred.logits.logsumexp(-1).mean() + pred.velocity.square().mean()).backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable, f"non-adapter weights changed: {sorted(changed - trainable)[:3]}"
    assert any("q_proj_moe_gen.lora_B" in n for n in changed)  # the generation expert's adapters learn

    save_lora(model, settings, tmp_path)
    adapter_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and sorted(adapter_config["target_modules"]) == sorted(adapted)
    fresh = build(training_type="lora", lora=settings)
    fresh.model.load_state_dict({n: p for n, p in model.state_dict().items() if "lora_" not in n}, strict=False)
    load_lora(fresh.model, tmp_path)
    for name, p in fresh.model.named_parameters():
        if "lora_" in name:
            assert torch.equal(p, dict(model.named_parameters())[name]), name
    with pytest.raises(ValueError, match="target_modules"):
        build(training_type="lora", lora=LoraConfig(target_modules=["qkv_proj"]))


def test_lora_targets_name_both_experts_unless_a_gen_name_is_given():
    default = {n.split(".lora_A.")[0].rsplit(".", 1)[-1] for n, _ in build(training_type="lora").model.named_parameters()
               if ".lora_A." in n}
    assert default == {f"{p}_proj{e}" for p in "qkvo" for e in ("", "_moe_gen")}
    gen_only = build(training_type="lora", lora=LoraConfig(target_modules=["o_proj_moe_gen"])).model
    assert {n.split(".lora_A.")[0].rsplit(".", 1)[-1] for n, _ in gen_only.named_parameters() if ".lora_A." in n} \
        == {"o_proj_moe_gen"}


def test_lora_adapts_the_llm_and_a_trainable_vit_trains_whole():
    bundle = build(vit_trainable=True, training_type="lora", lora=LoraConfig(target_modules=["q_proj", "gate_proj"]))
    trainable = {n for n, p in bundle.model.named_parameters() if p.requires_grad}
    vit = {n for n, _ in bundle.model.named_parameters() if n.startswith("vit_model.")}
    assert vit and vit <= trainable  # the ViT trains whole, as model.vit_trainable asks ...
    assert not [n for n in vit if "lora_" in n]  # ... without adapters on its gate_proj
    assert any(".mlp.gate_proj.lora_A." in n for n in trainable)  # the LLM's gate_proj has them
    assert all("lora_" in n for n in trainable - vit)  # and the rest of the LLM is frozen


def test_freeze_patterns_may_name_adapters_and_the_config_check_sees_them():
    """model.freeze_modules applies after the adapters are injected: it can freeze some of them (the understanding
    expert's, say), and the config check finds a pattern that matches no adapter as the build would."""
    from lance_ds.model.build import model_problems

    frozen = "*.self_attn.q_proj.lora_*"
    cfg = dict(training_type="lora", lora=LoraConfig(target_modules=["q_proj"]))
    trainable = {n for n, p in build(freeze_modules=[frozen], **cfg).model.named_parameters() if p.requires_grad}
    assert trainable and all(".q_proj_moe_gen.lora_" in n for n in trainable), sorted(trainable)[:3]
    assert not dict(model_problems(ModelConfig(size="debug", freeze_modules=[frozen], **cfg)))
    problems = dict(model_problems(ModelConfig(size="debug", freeze_modules=["*.v_proj.lora_*"], **cfg)))
    assert "'*.v_proj.lora_*' matches no parameter" in problems["model.freeze_modules"]


def test_the_meta_device_check_skips_initialisers_and_gives_them_back():
    """The config check builds on the meta device with torch.nn.init's initialisers off; after it (and after an error
    inside it) a model built for real is initialised again."""
    from lance_ds.model.build import initialisers_off, model_problems

    originals = {name: getattr(torch.nn.init, name) for name in ("normal_", "uniform_", "kaiming_uniform_", "zeros_")}
    with initialisers_off():
        assert torch.nn.init.normal_ is not originals["normal_"]
    with pytest.raises(RuntimeError), initialisers_off():
        raise RuntimeError("a build that fails")
    model_problems(ModelConfig(size="debug", training_type="lora", lora=LoraConfig(target_modules=["q_proj"])))
    assert {name: getattr(torch.nn.init, name) for name in originals} == originals
    assert torch.nn.Embedding(64, 8).weight.std() > 0.5  # (N(0, 1): initialised, not left at torch.empty's bytes)
    # a trainable ViT built after the check (in a process that imports transformers' ViT then: its initialisers are
    # transformers' copies, which kept the no-ops when first imported inside the check)
    script = """
from lance_ds.config.model import LoraConfig, ModelConfig
from lance_ds.model.build import model_problems, resolve_spec
from lance_ds.model.vision import build_vision_tower
cfg = ModelConfig(size="debug", vit_trainable=True, training_type="lora", lora=LoraConfig(target_modules=["q_proj"]))
model_problems(cfg)
qkv = build_vision_tower(resolve_spec(cfg).vit, None).blocks[0].attn.qkv
print(float(qkv.weight.std()), float(qkv.bias.abs().max()))
"""
    std, bias = map(float, subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                          check=True).stdout.split())
    assert std == pytest.approx(0.02, rel=0.1) and bias == 0  # (transformers' init: N(0, 0.02), zero biases)


def test_trainable_vit_lives_in_the_model():
    bundle = build(vit_trainable=True)
    assert bundle.vit is None and hasattr(bundle.model, "vit_model")
    assert any(n.startswith("vit_model.blocks.0.attn.qkv") for n, _ in bundle.model.named_parameters())
    batch = mixed_batch()
    latents = random_latents(batch, bundle.geometry.latent_channels)
    pred = bundle.model(batch, None, latents, torch.zeros(latents.shape[0]))
    pred.logits.logsumexp(-1).sum().backward()
    assert bundle.model.vit_model.patch_embed.proj.weight.grad.abs().sum() > 0


def test_trainable_vit_runs_on_batches_without_vit_blocks():
    bundle = build(vit_trainable=True)
    batch = synthetic_batch([[Text(3), Vae(1, 2, 2), Text(1)], [Text(4, scored=True)]], NUM_CLASSES)
    latents = random_latents(batch, bundle.geometry.latent_channels)
    pred = bundle.model(batch, None, latents, torch.zeros(latents.shape[0]))
    (pred.logits.logsumexp(-1).sum() + pred.velocity.sum()).backward()
    grad = bundle.model.vit_model.patch_embed.proj.weight.grad
    assert grad is not None and grad.abs().sum() == 0  # ran (ZeRO-3 sees it), contributed nothing


def test_a_bf16_vit_keeps_its_rope_frequencies_in_fp32():
    """They are buffers no checkpoint restores: cast to bf16 with the tower they were off by up to 0.35%."""
    from lance_ds.model.registry import SIZES
    from lance_ds.model.vision import build_vision_tower, fp32_rope

    tower = build_vision_tower(SIZES["debug"].vit, torch.bfloat16)
    rope = tower.rotary_pos_emb
    exact = rope.compute_axial_rope_parameters(rope.config)[0]
    assert rope.inv_freq.dtype == torch.float32 and torch.equal(rope.inv_freq, exact)
    assert next(tower.parameters()).dtype == torch.bfloat16
    assert not torch.equal(exact.bfloat16().float(), exact)  # (what a cast alone leaves)
    fp32_rope(tower.bfloat16())  # an engine casting a model that holds a trainable ViT
    assert torch.equal(tower.rotary_pos_emb.inv_freq, exact)
