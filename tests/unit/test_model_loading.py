"""Weights from local directories: Lance round trip, Qwen2.5-VL init, ViT-only dirs, diffusers VAEs, the patch codec."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lance_ds.config.model import LapeConfig, ModelConfig
from lance_ds.model import build_model, build_vae, encode_vit
from lance_ds.model.build import planned_geometry
from lance_ds.model.registry import resolve_spec
from lance_ds.model.synthetic import Text, Vae, Vit, random_latents, synthetic_batch
from lance_ds.model.vae import PatchCodec, VaeConfig
from lance_ds.model.weights import save_lance_dir

NUM_CLASSES = 1000


def cfg(**kw) -> ModelConfig:
    return ModelConfig(**{"size": "tiny", "dtype": "fp32", "vit_dtype": "fp32", **kw})


def outputs(bundle, seed: int = 0):
    batch = synthetic_batch([[Text(5), Vae(1, 2, 2), Text(1)], [Text(3), Vit(1, 2, 2), Text(4, scored=True)]],
                            NUM_CLASSES, seed=seed)
    vit = encode_vit(bundle.vit, batch.vit_patches, batch.vit_grid_thw)
    latents = random_latents(batch, bundle.geometry.latent_channels)
    with torch.no_grad():
        pred = bundle.model(batch, vit, latents, torch.full((latents.shape[0],), 0.5))
    return pred.logits, pred.velocity, vit


def test_lance_checkpoint_round_trip(tmp_path):
    """Save under Lance's names + llm_config.json, build from model.path: same weights, same outputs."""
    torch.manual_seed(0)
    first = build_model(cfg(), NUM_CLASSES)
    with torch.no_grad():  # make the experts differ, so a routing or naming mix-up cannot pass
        for name, p in first.model.named_parameters():
            if "_moe_gen" in name:
                p.add_(0.01 * torch.randn_like(p))
    save_lance_dir(tmp_path, first.model.state_dict(), first.spec.llm, first.spec.vit, first.vit.state_dict(),
                   first.model.latent_pos_embed.table())
    second = build_model(cfg(path=str(tmp_path)), NUM_CLASSES)
    assert second.spec.max_latent_size == first.spec.max_latent_size  # read back from the stored table's shape
    a, b = first.model.state_dict(), second.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for x, y in zip(outputs(first), outputs(second)):
        assert torch.equal(x, y)


def test_lance_checkpoint_mismatch_is_named(tmp_path):
    first = build_model(cfg(), NUM_CLASSES)
    state = first.model.state_dict()
    state.pop("language_model.model.layers.1.mlp_moe_gen.up_proj.weight")
    save_lance_dir(tmp_path, state, first.spec.llm, first.spec.vit, first.vit.state_dict())
    with pytest.raises(ValueError, match="mlp_moe_gen.up_proj.weight"):
        build_model(cfg(path=str(tmp_path)), NUM_CLASSES)


def test_a_lance_table_of_an_unrecorded_grid_names_the_settings_that_load_it(tmp_path):
    """Lance's llm_config.json does not record the latent grid: it is read from the table's row count, which 16 x 16
    x 4 frames (1024 rows) shares with 32 x 32 x 1. The refusal names the settings that load it."""
    import json

    first = build_model(cfg(max_latent_size=16, max_num_frames=13), NUM_CLASSES)
    save_lance_dir(tmp_path, first.model.state_dict(), first.spec.llm, first.spec.vit, first.vit.state_dict(),
                   first.model.latent_pos_embed.table())
    config = json.loads((tmp_path / "llm_config.json").read_text())
    config.pop("max_latent_size", None), config.pop("max_num_frames", None)
    (tmp_path / "llm_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="32 x 32 x 1 assumed .set model.max_latent_size and model.max_num_frames"):
        build_model(cfg(path=str(tmp_path)), NUM_CLASSES)
    build_model(cfg(path=str(tmp_path), max_latent_size=16, max_num_frames=13), NUM_CLASSES)


def _lance_dir(directory, bundle) -> str:
    save_lance_dir(directory, bundle.model.state_dict(), bundle.spec.llm, bundle.spec.vit, bundle.vit.state_dict(),
                   bundle.model.latent_pos_embed.table() if bundle.model.cfg.visual_gen else None)
    return str(directory)


def test_checkpoints_of_other_switches_are_refused_by_the_config_check_or_adopted(tmp_path):
    """Found by --check from the weights' headers, not after every rank built the model: a LAPE checkpoint under a
    model without LAPE (named: the switch), a freeze pattern that matches nothing. An understanding-only export
    (model.visual_gen=false) starts the generation path as Qwen2.5-VL does: the gen expert a copy of the und one."""
    from lance_ds.model.build import model_problems

    lape = _lance_dir(tmp_path / "lape", build_model(cfg(lape=LapeConfig(enabled=True)), NUM_CLASSES))
    problems = dict(model_problems(cfg(path=lape, tokenizer_path=None)))
    assert "set model.lape.enabled=true" in problems["model.path"], problems
    assert not dict(model_problems(cfg(path=lape, lape=LapeConfig(enabled=True)))).get("model.path")
    problems = dict(model_problems(cfg(freeze_modules=["language_model.embed_tokens.*"])))
    assert "'language_model.embed_tokens.*' matches no parameter" in problems["model.freeze_modules"], problems
    und = build_model(cfg(visual_gen=False), NUM_CLASSES)
    und_dir = _lance_dir(tmp_path / "und", und)
    assert not dict(model_problems(cfg(path=und_dir))).get("model.path")
    unified = dict(build_model(cfg(path=und_dir), NUM_CLASSES).model.named_parameters())
    trained = dict(und.model.named_parameters())
    assert torch.equal(unified["language_model.model.layers.0.mlp_moe_gen.up_proj.weight"],
                       trained["language_model.model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(unified["language_model.lm_head.weight"], trained["language_model.lm_head.weight"])


def test_lora_from_an_understanding_checkpoint_trains_the_layers_it_lacks_and_saves_them_with_the_adapters(tmp_path):
    """LoRA from an understanding checkpoint (Qwen2.5-VL, a visual_gen=false export): the generation heads and LAPE
    tables it lacks start fresh, so they train whole beside the adapters (frozen, they would stay random), and the
    adapters' directory carries them as peft's modules_to_save: peft applies it to the model.path build exactly."""
    import json

    from peft import PeftModel

    from lance_ds.model import save_lora
    from lance_ds.model.lora import is_lora_param

    und_dir = _lance_dir(tmp_path / "und", build_model(cfg(visual_gen=False), NUM_CLASSES))
    lora_cfg = cfg(path=und_dir, training_type="lora", lape=LapeConfig(enabled=True))
    bundle = build_model(lora_cfg, NUM_CLASSES)
    trainable = [n for n, p in bundle.model.named_parameters() if p.requires_grad]
    whole = {n.split(".")[0] for n in trainable if not is_lora_param(n)}
    assert whole == {"time_embedder", "vae2llm", "llm2vae", "lape"}, whole
    assert "trainable (LoRA adapters + lape + llm2vae + time_embedder + vae2llm)" in bundle.describe()
    assert any(".lora_B." in n for n in trainable)
    with torch.no_grad():  # as if trained
        for n, p in bundle.model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    save_lora(bundle.model, lora_cfg.lora, tmp_path / "lora")
    assert sorted(json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["modules_to_save"]) == \
        sorted(whole)
    base = build_model(cfg(path=und_dir, lape=LapeConfig(enabled=True)), NUM_CLASSES)  # fresh layers: other init
    PeftModel.from_pretrained(base.model, str(tmp_path / "lora")).eval()  # (in place: base.model is adapted)
    bundle.model.eval()
    for mine, peft in zip(outputs(bundle), outputs(base)):
        assert torch.allclose(mine, peft, atol=1e-5), (mine - peft).abs().max()


def tiny_qwen25vl(directory, tied: bool):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                tie_word_embeddings=tied, bos_token_id=0, eos_token_id=1)
    vision = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64,
                  fullatt_block_indexes=[1], tokens_per_second=2)
    torch.manual_seed(1)
    hf = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                                                             tie_word_embeddings=tied))
    hf.save_pretrained(directory)
    return hf


@pytest.mark.parametrize("tied", [True, False])
def test_init_from_qwen25vl_dir(tmp_path, tied):
    hf = tiny_qwen25vl(tmp_path, tied)
    bundle = build_model(cfg(path=str(tmp_path)), NUM_CLASSES)
    ours = dict(bundle.model.named_parameters())
    hf_state = hf.state_dict()
    text = {k.split("language_model.", 1)[-1] if "language_model." in k else k.removeprefix("model."): v
            for k, v in hf_state.items() if "visual" not in k and not k.startswith("lm_head")}
    for name, value in text.items():
        assert torch.equal(ours[f"language_model.model.{name}"], value), name
        gen = name.replace("self_attn.q_proj", "self_attn.q_proj_moe_gen").replace("mlp.", "mlp_moe_gen.")
        if gen != name:
            assert torch.equal(ours[f"language_model.model.{gen}"], value), f"gen copy of {name}"
    head = hf_state.get("lm_head.weight", hf_state["model.language_model.embed_tokens.weight"]
                        if "model.language_model.embed_tokens.weight" in hf_state else None)
    assert torch.equal(ours["language_model.lm_head.weight"], hf.get_output_embeddings().weight)
    assert head is None or torch.equal(ours["language_model.lm_head.weight"], head)
    assert torch.equal(ours["language_model.model.layers.0.self_attn.q_norm.weight"], torch.ones(16))
    assert torch.equal(ours["language_model.model.layers.0.self_attn.k_norm_moe_gen.weight"], torch.ones(16))
    # the ViT: transformers' own tower on the same patches gives the same merged tokens
    batch = synthetic_batch([[Text(2), Vit(1, 4, 4), Text(2)]], NUM_CLASSES)
    ours_vit = encode_vit(bundle.vit, batch.vit_patches, batch.vit_grid_thw)
    with torch.no_grad():
        theirs = hf.model.visual(batch.vit_patches, grid_thw=batch.vit_grid_thw).pooler_output
    assert torch.allclose(ours_vit, theirs, atol=1e-6)
    assert bundle.geometry.tokens_per_second == 2
    # trained along: the same tower, in the model (the build said the checkpoint lacked it)
    trainable = dict(build_model(cfg(path=str(tmp_path), vit_trainable=True), NUM_CLASSES).model.named_parameters())
    assert torch.equal(trainable["vit_model.patch_embed.proj.weight"], hf.model.visual.patch_embed.proj.weight)


def test_vit_from_a_lance_vit_safetensors_dir(tmp_path):
    first = build_model(cfg(), NUM_CLASSES)
    vit_dir = tmp_path / "vit"
    vit_dir.mkdir()
    save_file({k: v.contiguous() for k, v in first.vit.state_dict().items()}, str(vit_dir / "vit.safetensors"))
    spec = resolve_spec(cfg(vit_path=str(vit_dir)))
    assert (spec.vit.depth, spec.vit.hidden_size, spec.vit.intermediate_size) == (2, 32, 64)  # read from shapes
    second = build_model(cfg(vit_path=str(vit_dir)), NUM_CLASSES)
    a, b = first.vit.state_dict(), second.vit.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # model.vit_path wins over the ViT in a Lance model.path, frozen or trained along
    torch.manual_seed(5)
    other = build_model(cfg(), NUM_CLASSES)
    lance_dir = tmp_path / "lance"
    save_lance_dir(lance_dir, other.model.state_dict(), other.spec.llm, other.spec.vit, other.vit.state_dict(),
                   other.model.latent_pos_embed.table())
    trained = build_model(cfg(path=str(lance_dir), vit_path=str(vit_dir), vit_trainable=True), NUM_CLASSES)
    vit_in_model = {k.removeprefix("vit_model."): v for k, v in trained.model.state_dict().items()
                    if k.startswith("vit_model.")}
    assert vit_in_model.keys() == a.keys() and all(torch.equal(a[k], vit_in_model[k]) for k in a)
    with pytest.raises(FileNotFoundError, match="model.vit_path: no \\*.safetensors files"):
        build_model(cfg(vit_path=str(tmp_path)), NUM_CLASSES)  # a directory without safetensors
    save_file({"foo": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(FileNotFoundError, match="model.vit_path: no ViT weights"):
        build_model(cfg(vit_path=str(tmp_path)), NUM_CLASSES)


def test_wan_vae_from_save_pretrained(tmp_path):
    from diffusers import AutoencoderKLWan

    spec = resolve_spec(cfg())
    torch.manual_seed(0)
    kwargs = dict(spec.vae.diffusers_config, latents_mean=[0.1 * i for i in range(16)], latents_std=[1.0 + 0.1 * i for i in range(16)])
    AutoencoderKLWan(**kwargs).save_pretrained(tmp_path)
    bundle = build_model(cfg(vae_path=str(tmp_path)), NUM_CLASSES)
    vae = bundle.vae
    assert (vae.latent_channels, vae.spatial_factor, vae.temporal_factor) == (16, 16, 4)
    assert (bundle.geometry.vae_spatial_factor, bundle.geometry.vae_temporal_factor) == (16, 4)
    assert planned_geometry(cfg(vae_path=str(tmp_path))) == bundle.geometry  # what --check plans with
    pixels = torch.rand(1, 3, 5, 32, 48) * 2 - 1
    latents = vae.encode(pixels)
    assert latents.shape == (1, 16, 2, 2, 3)  # (5 - 1) // 4 + 1 frames
    raw = AutoencoderKLWan.from_pretrained(tmp_path).encode(pixels).latent_dist.mean
    mean = torch.tensor(kwargs["latents_mean"]).view(1, -1, 1, 1, 1)
    std = torch.tensor(kwargs["latents_std"]).view(1, -1, 1, 1, 1)
    assert torch.allclose(latents, (raw - mean) / std, atol=1e-5)
    sampled = vae.encode(pixels, sample=True, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(sampled, latents) and sampled.shape == latents.shape
    assert vae.decode(latents).shape == pixels.shape
    with pytest.raises(ValueError, match="T = 4k \\+ 1"):
        vae.encode(torch.zeros(1, 3, 4, 32, 32))


@pytest.mark.parametrize("frames", [1, 9])
def test_patch_codec_is_exactly_invertible(frames):
    codec = PatchCodec(spatial_factor=8, temporal_factor=4)
    pixels = torch.rand(2, 3, frames, 16, 24) * 2 - 1
    latents = codec.encode(pixels)
    assert latents.shape == (2, 768, (frames - 1) // 4 + 1, 2, 3)
    assert torch.equal(codec.decode(latents), pixels.float())
    assert 0.5 < latents.std() < 1.5  # roughly unit scale for uniform pixels (std 0.577 / 0.5)


def test_a_codec_without_weights_reports_where_it_was_put():
    """The trainer encodes on vae.device: the weightless patch codec reported the CPU wherever it was moved, so on a
    GPU its latents met the step's CUDA generator on the CPU and the first step failed."""
    codec = PatchCodec(spatial_factor=8, temporal_factor=4).to("meta", torch.bfloat16)
    assert codec.device.type == "meta" and codec.dtype == torch.bfloat16
    assert "_placement" not in codec.state_dict()


def test_kl_vae_from_config_folds_frames():
    from lance_ds.model.build import TINY_CODECS

    vae = build_vae(TINY_CODECS["kl"])
    latents = vae.encode(torch.rand(1, 3, 2, 16, 16) * 2 - 1)
    assert latents.shape == (1, 4, 2, 4, 4)
    assert vae.decode(latents).shape == (1, 3, 2, 16, 16)


def test_the_config_check_plans_with_the_geometry_the_build_reports(tmp_path):
    """--check plans samples (a group too long to pack is refused there) from config files alone, no weights
    loaded: its geometry must be the one the built model reports, for every codec source."""
    from diffusers import AutoencoderKL

    from lance_ds.model.build import TINY_CODECS

    AutoencoderKL(**TINY_CODECS["kl"].diffusers_config).save_pretrained(tmp_path / "kl")
    for model in (cfg(), cfg(visual_gen=False), cfg(vae="kl"), cfg(vae_path=str(tmp_path / "kl")),
                  cfg(size="debug")):
        assert planned_geometry(model) == build_model(model, NUM_CLASSES).geometry, model
    assert planned_geometry(cfg(vae_path=str(tmp_path / "kl"))).vae_spatial_factor == 4


def test_codec_choice_errors_are_clear():
    with pytest.raises(ValueError, match="model.vae_path"):
        build_model(cfg(size="3b", visual_und=False, path=None), NUM_CLASSES)  # Wan2.2 needs its weights
    with pytest.raises(ValueError, match="model.vae must be one of"):
        build_vae(VaeConfig(kind="vq"))


def test_init_from_plain_qwen2_dir(tmp_path):
    """A text-only Qwen2 checkpoint (keys model.* / lm_head.*) initialises the decoder; it has no ViT, so the
    understanding branch must be off or get model.vit_path."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(2)
    hf = Qwen2ForCausalLM(Qwen2Config(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    hf.save_pretrained(tmp_path)
    bundle = build_model(cfg(path=str(tmp_path), visual_und=False), NUM_CLASSES)
    assert bundle.spec.llm.mrope_section == (2, 3, 3)  # Qwen2.5-VL's 1/4, 3/8, 3/8 split of head_dim / 2
    ours = dict(bundle.model.named_parameters())
    assert torch.equal(ours["language_model.lm_head.weight"], hf.lm_head.weight)
    assert torch.equal(ours["language_model.model.layers.1.mlp_moe_gen.gate_proj.weight"],
                       hf.model.layers[1].mlp.gate_proj.weight)
    with pytest.raises(FileNotFoundError, match="model.vit_path"):
        build_model(cfg(path=str(tmp_path)), NUM_CLASSES)


def test_3b_geometry_on_the_meta_device():
    """Lance_3B's shapes (LANCE_FACTS "Checkpoint layout") without allocating: ~6.1 B decoder parameters, both experts."""
    from lance_ds.model.lance import LanceConfig, LanceModel

    spec = resolve_spec(cfg(size="3b"))
    with torch.device("meta"):
        model = LanceModel(LanceConfig(llm=spec.llm, num_text_classes=151665, latent_channels=48,
                                       max_latent_size=spec.max_latent_size, max_num_frames=spec.max_num_frames))
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    layer = "language_model.model.layers.35."
    assert shapes[layer + "self_attn.q_proj_moe_gen.weight"] == (2048, 2048)
    assert shapes[layer + "self_attn.k_proj.weight"] == (256, 2048) and shapes[layer + "self_attn.k_norm.weight"] == (128,)
    assert shapes[layer + "mlp_moe_gen.down_proj.weight"] == (2048, 11008)
    assert shapes["language_model.model.embed_tokens.weight"] == (151936, 2048)
    assert shapes["time_embedder.mlp.0.weight"] == (2048, 256) and shapes["vae2llm.weight"] == (2048, 48)
    assert model.latent_pos_embed.max_latent_frames * spec.max_latent_size ** 2 == 31 * 64 * 64
    total = sum(p.numel() for p in model.parameters())
    assert total == spec.llm.num_params() + 2048 * 256 + 2048 + 2048 * 2048 + 2048 + 2 * 48 * 2048 + 48 + 2048
    assert 6.0e9 < total < 6.3e9


def test_saved_weights_get_the_permissions_of_any_new_file(tmp_path):
    """safetensors' save_file writes 0600: an export other users of the machine cannot load."""
    import os

    from lance_ds.model.weights import save_safetensors

    old = os.umask(0o027)
    try:
        save_safetensors({"w": torch.zeros(2)}, tmp_path / "a.safetensors")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "a.safetensors").st_mode & 0o777 == 0o640
