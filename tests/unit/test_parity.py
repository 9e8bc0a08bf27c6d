"""Parity with the original Lance code: the same weights and batch give the same numbers (reference/lance_tiny).

The reference files are tests/fixtures/lance_tiny (or `$LANCE_REFERENCE_DIR/lance_tiny`). Their absence is a
failure, not a skip: this is the check that lance_ds trains Lance rather than something Lance-shaped.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import LANCE_TINY
from lance_ds.config.model import ObjectiveConfig
from lance_ds.data.batch import AttnMode, PackedBatch
from lance_ds.model.build import load_state
from lance_ds.model.lance import LanceConfig, LanceModel
from lance_ds.model.llm import Routing
from lance_ds.model.registry import llm_config_from_hf
from lance_ds.model.vision import VitConfig, build_vision_tower, encode_vit, load_vision_weights
from lance_ds.model.weights import lance_to_model
from lance_ds.objectives import compute_losses, prepare_flow, shift_timesteps

REPO = Path(__file__).resolve().parents[2]
REFERENCE = LANCE_TINY
MODES = {"causal": AttnMode.CAUSAL, "full": AttnMode.FULL, "noise": AttnMode.NOISE}


def require_reference() -> Path:
    if not (REFERENCE / "model.safetensors").is_file():
        pytest.fail(f"reference files not found at {REFERENCE}: set LANCE_REFERENCE_DIR to the directory holding "
                    "lance_tiny/ (model.safetensors, config.json, case_min.*)")
    return REFERENCE


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = 1e-5) -> None:
    """Max abs error within rtol of the reference's largest magnitude (a relative, scale-aware bound)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.detach().float() - expected.float()).abs().max().item()
    scale = expected.abs().max().item() or 1.0
    assert err <= rtol * scale, f"{what}: max error {err:.3g} exceeds {rtol} x {scale:.3g}"


@pytest.fixture(scope="module")
def ref():
    root = require_reference()
    config = json.loads((root / "config.json").read_text())
    meta = json.loads((root / "case_min.json").read_text())
    return config, meta, load_file(str(root / "case_min.safetensors")), load_file(str(root / "model.safetensors"))


def build_reference_model(config: dict, weights: dict) -> LanceModel:
    cfg = LanceConfig(llm=llm_config_from_hf(config["llm"], "lance_tiny/config.json"),
                      num_text_classes=config["len_tokenizer"], latent_channels=config["z_channels"],
                      max_latent_size=config["max_latent_size"], max_num_frames=config["max_num_frames"])
    model = LanceModel(cfg)
    state, _, table = lance_to_model(weights)
    loaded = load_state(model, state, "lance_tiny/model.safetensors")
    assert loaded == set(state) == {n for n, _ in model.named_parameters()}, "Lance names must map key for key"
    assert_close(model.latent_pos_embed.table(), table, "sin-cos latent table", rtol=1e-6)
    return model


def build_reference_batch(config: dict, meta: dict, case: dict) -> PackedBatch:
    """case_min's inputs in lance_ds's PackedBatch format (its trailing pad sample lies beyond the 146 tokens)."""
    inp = meta["inputs"]
    num_tokens = inp["sequence_length"]

    def per_token(values, lens):
        return torch.repeat_interleave(torch.tensor(values), torch.tensor(lens))[:num_tokens]

    size = config["max_latent_size"]
    flat = case["inputs.packed_latent_position_ids"]
    return PackedBatch(
        input_ids=case["inputs.packed_text_ids"],
        position_ids=case["outputs.packed_position_ids_used"][:, 0],
        sample_ids=per_token(list(range(len(inp["sample_lens"]))), inp["sample_lens"]),
        split_ids=per_token(list(range(len(inp["split_lens"]))), inp["split_lens"]),
        attn_modes=per_token([int(MODES[m]) for m in inp["attn_modes"]], inp["split_lens"]),
        ce_indexes=case["inputs.ce_loss_indexes"], ce_targets=case["inputs.packed_label_ids"],
        ce_weights=torch.ones(case["inputs.ce_loss_indexes"].numel()),
        vit_patches=case["inputs.packed_vit_tokens.0"], vit_grid_thw=case["inputs.vit_video_grid_thw"],
        vit_indexes=case["inputs.packed_vit_token_indexes"],
        vae_pixels=[], vae_grid_thw=torch.tensor(inp["patchified_vae_latent_shapes"]),
        vae_indexes=case["inputs.packed_vae_token_indexes"],
        vae_coords=torch.stack([flat // size ** 2, flat // size % size, flat % size], dim=-1),
        vae_is_target=torch.ones(len(inp["patchified_vae_latent_shapes"]), dtype=torch.bool),
        vae_weights=torch.ones(len(inp["patchified_vae_latent_shapes"])))


def test_parity_with_lance(ref):
    config, meta, case, weights = ref
    torch.manual_seed(0)
    model = build_reference_model(config, weights)
    batch = build_reference_batch(config, meta, case)

    # expert routing: VAE latent tokens -> gen expert, everything else (text, ViT, vision start/end) -> und
    routing = Routing.build(batch.num_tokens, batch.vae_indexes)
    assert routing.gen.tolist() == case["outputs.packed_gen_token_indexes"].tolist()
    assert sorted(routing.und.tolist()) == sorted(case["outputs.packed_und_token_indexes"].tolist())

    # the frozen ViT (transformers' tower under Lance's vit_model.* weights)
    vit = build_vision_tower(VitConfig.from_dict(config["vit"]))
    load_vision_weights(vit, REFERENCE / "model.safetensors")
    vit_embeds = encode_vit(vit, batch.vit_patches, batch.vit_grid_thw)
    assert_close(vit_embeds, case["outputs.vit_embed"], "ViT merger output")

    # objectives: logit-normal draw -> shifted t; the reference's eps instead of a fresh draw
    t_block = shift_timesteps(torch.sigmoid(case["inputs.packed_timesteps"][:1]), config["timestep_shift"])
    clean = torch.cat([x.reshape(-1, x.shape[-1]) for x in [case["inputs.padded_latent.0"]]])
    flow = prepare_flow(clean, batch, ObjectiveConfig(timestep_shift=config["timestep_shift"]),
                        noise=case["outputs.noise"], block_timesteps=t_block)
    assert_close(flow.timesteps, case["outputs.timesteps_used"], "timesteps")
    assert_close(flow.target, case["outputs.flow_target"], "velocity target")

    pred = model(batch, vit_embeds, flow.noisy, flow.timesteps, return_hidden=True)
    assert_close(pred.inputs_embeds, case["outputs.llm_input_packed_sequence"], "llm_input_packed_sequence")
    assert_close(pred.hidden, case["outputs.last_hidden_state"], "last hidden state")
    assert_close(pred.logits, case["outputs.logits_eff"], "CE logits (sliced to len(tokenizer))")
    assert_close(pred.velocity, case["outputs.mse_preds"], "velocity")
    ce = torch.nn.functional.cross_entropy(pred.logits, batch.ce_targets, reduction="none")
    assert_close(ce, case["outputs.ce_per_token"], "CE per token")
    assert_close((pred.velocity - flow.target) ** 2, case["outputs.mse_per_elem"], "MSE per element")

    losses = compute_losses(pred.logits, pred.velocity, batch, flow,
                            ObjectiveConfig(ce_weight=config["ce_weight"], mse_weight=config["mse_weight"]))
    assert_close(losses.ce, case["outputs.ce_mean"], "CE mean")
    assert_close(losses.mse, case["outputs.mse_mean"], "MSE mean")
    assert_close(losses.total, case["outputs.loss"], "loss")
    assert losses.num_ce_tokens == case["outputs.n_ce_tokens"].item()
    assert losses.num_mse_tokens == case["outputs.n_mse_tokens"].item()

    losses.total.backward()
    expected = {k[len("grads."):]: v for k, v in case.items() if k.startswith("grads.")}
    got = {n: p.grad for n, p in model.named_parameters()}
    assert set(got) == set(expected) and len(expected) == 68
    for name, grad in expected.items():
        assert got[name] is not None, f"{name} got no gradient"
        assert_close(got[name], grad, f"gradient of {name}")


def test_lance_dir_loads_through_build_model(ref, tmp_path):
    """The shipped layout (model.safetensors + llm_config.json) through the trainer's entry point: geometry, ViT
    and position range come from the directory, and the forward reproduces Lance's logits and velocities."""
    import shutil

    from lance_ds.config.model import ModelConfig
    from lance_ds.model import build_model, encode_vit

    config, meta, case, _ = ref
    shutil.copy(REFERENCE / "model.safetensors", tmp_path / "model.safetensors")
    (tmp_path / "llm_config.json").write_text(json.dumps(config["llm"]))
    bundle = build_model(ModelConfig(size="tiny", path=str(tmp_path), dtype="fp32", vit_dtype="fp32"),
                         config["len_tokenizer"])
    assert (bundle.geometry.max_latent_size, bundle.geometry.max_latent_frames) == (8, 3)
    batch = build_reference_batch(config, meta, case)
    t = case["outputs.timesteps_used"][:, None]
    noisy = (1 - t) * case["outputs.packed_latent_clean"] + t * case["outputs.noise"]
    with torch.no_grad():
        pred = bundle.model(batch, encode_vit(bundle.vit, batch.vit_patches, batch.vit_grid_thw), noisy, t[:, 0])
    assert_close(pred.logits, case["outputs.logits_eff"], "logits via build_model")
    assert_close(pred.velocity, case["outputs.mse_preds"], "velocity via build_model")
