"""lance_ds.export and tools/export_checkpoint.py on real 2-rank ZeRO-3 checkpoints (made once by the worker in
test_generate.py): Lance's layout loads with model.path and predicts what the trained engine predicted; EMA weights
are the live EMA; LoRA is merged as peft merges it and its adapters load back; transformers loads the
understanding expert with the same logits; bad inputs are refused with the fix."""

from __future__ import annotations

import argparse
import json
import runpy
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lance_ds.model.registry import SIZES

from test_generate import reference_inputs

REPO = Path(__file__).resolve().parents[2]


def predictions(bundle, tokenizer) -> dict[str, torch.Tensor]:
    batch, vit_embeds, latents, t = reference_inputs(bundle.vit, bundle.geometry.latent_channels, len(tokenizer))
    with torch.no_grad():
        pred = bundle.model(batch, vit_embeds, latents, t)
    return {"logits": pred.logits.float(), "velocity": pred.velocity.float()}


def assert_close_predictions(got: dict, reference: dict, prefix: str) -> None:
    for name in ("logits", "velocity"):
        expected = reference[f"{prefix}.{name}"]
        assert got[name].shape == expected.shape
        assert torch.allclose(got[name], expected, atol=1e-5, rtol=1e-4), (got[name] - expected).abs().max()


def test_export_is_lances_layout_and_model_path_loads_it(trained_runs, exported):
    from lance_ds.config.model import ModelConfig
    from lance_ds.data.tokenizer import load_tokenizer
    from lance_ds.model import build_model

    reference = trained_runs["reference"]
    weights = load_file(str(exported / "model.safetensors"))
    trained = {k[len("weights."):]: v for k, v in reference.items() if k.startswith("weights.")}
    for name, value in trained.items():  # LanceModel's names are Lance's; fp32 master weights, exactly
        assert torch.equal(weights[name], value), name
    for name, value in {k[len("vit."):]: v for k, v in reference.items() if k.startswith("vit.")}.items():
        assert torch.equal(weights["vit_model." + name].float(), value), name  # the trainer's own frozen ViT
    assert "language_model.model.layers.1.self_attn.q_proj_moe_gen.bias" in weights
    assert weights["latent_pos_embed.pos_embed"].shape == (9 * 32 * 32, SIZES["debug"].llm.hidden_size)
    llm_config = json.loads((exported / "llm_config.json").read_text())
    assert llm_config["rope_scaling"]["mrope_section"] == list(SIZES["debug"].llm.mrope_section) and llm_config["max_latent_size"] == 32
    info = json.loads((exported / "export.json").read_text())
    assert info["step"] == 3 and info["weights"] == "trained" and info["lora"] is None
    # model.path=EXPORT_DIR (and its tokenizer) rebuild the trained model: same predictions as the live engine
    tokenizer = load_tokenizer(exported)
    bundle = build_model(ModelConfig(size="debug", path=str(exported), dtype="fp32"), len(tokenizer), None, "cpu")
    assert_close_predictions(predictions(bundle, tokenizer), reference, "pred")


def test_ema_export_is_the_live_ema_and_differs_from_the_trained_weights(trained_runs, exported, tmp_path):
    from lance_ds.export import export_checkpoint

    reference = trained_runs["reference"]
    out = export_checkpoint(trained_runs["full"] / "checkpoints", tmp_path / "ema", ema=True)
    ema_weights, plain = load_file(str(out / "model.safetensors")), load_file(str(exported / "model.safetensors"))
    averaged = {k[len("ema."):]: v for k, v in reference.items() if k.startswith("ema.")}
    assert averaged, "the run kept an EMA"
    for name, value in averaged.items():
        assert torch.allclose(ema_weights[name], value, atol=1e-7), name
    differing = [n for n in averaged if not torch.equal(ema_weights[n], plain[n])]
    assert len(differing) > 0.9 * len(averaged)  # decay 0.5 over 3 steps: nearly every tensor moved
    assert json.loads((out / "export.json").read_text())["weights"] == "ema"


def test_transformers_loads_the_understanding_expert_with_the_same_logits(exported, from_checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lance_ds.model.synthetic import Text, synthetic_batch

    hf = AutoModelForCausalLM.from_pretrained(str(exported / "llm"))
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    gen = from_checkpoint
    num_classes = len(gen.tokenizer)
    batch = synthetic_batch([[Text(16, scored=True)]], num_text_classes=num_classes, seed=9)
    batch.ce_indexes = torch.arange(16)
    z = gen.lance.cfg.latent_channels
    with torch.no_grad():
        ours = gen.model(batch, None, torch.zeros(0, z), torch.zeros(0)).logits
        theirs = hf(batch.input_ids[None]).logits[0, :, :num_classes]
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    text = "a red circle moving left"
    tokenizer = AutoTokenizer.from_pretrained(str(exported / "llm"))
    assert tokenizer.encode(text) == gen.tokenizer.encode(text)
    # its chat template prompts as training laid out an i2t sample's text (the vision block aside)
    from lance_ds.data.sequence import Sample

    image = torch.zeros(1, 64, 64, 3, dtype=torch.uint8)
    turns = {"caption_i": "You are a helpful assistant.", "caption_q": "Which shape is it?", "caption_a": "A circle."}
    plan = gen.planner.plan(Sample("i2t", turns, {"image": image}, key="k"))
    vision = {gen.tokenizer.special.vision_start, gen.tokenizer.special.vision_end, gen.tokenizer.special.video_pad}
    trained = [i for i in plan.input_ids.tolist() if i not in vision]
    prompt = tokenizer.apply_chat_template([{"role": "system", "content": turns["caption_i"]},
                                            {"role": "user", "content": turns["caption_q"]}],
                                           add_generation_prompt=True, tokenize=True, return_dict=False)
    assert prompt == trained[:len(prompt)]
    assert trained[len(prompt):] == gen.tokenizer.encode(turns["caption_a"]) + [gen.tokenizer.special.im_end]


def test_lora_export_merges_as_peft_does_and_keeps_the_adapters(trained_runs, tmp_path):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    from lance_ds.config.model import LoraConfig, ModelConfig
    from lance_ds.data.tokenizer import load_tokenizer
    from lance_ds.export import export_checkpoint, find_checkpoint, load_export, zero_consolidated_state
    from lance_ds.model import build_model, load_lora
    from lance_ds.model.build import load_state

    # the run trained adapters and its ViT whole, nothing else, and resumed from its checkpoint to the same weights
    for record in trained_runs["ranks"]:
        trained = set(record["lora_trained"])
        assert "vit_model" in trained and {"q_proj", "q_proj_moe_gen"} <= trained, trained
        assert not trained & {"language_model", "time_embedder", "vae2llm", "llm2vae"}, trained
        assert record["lora_resumed_step"] == 3 and record["lora_resumed_differs"] == []
    out = export_checkpoint(trained_runs["lora"], tmp_path / "lora")
    assert json.loads((out / "export.json").read_text())["lora"] == "merged"
    parts = load_export(out, device="cpu")
    assert_close_predictions(predictions(parts.bundle, parts.tokenizer), trained_runs["reference"], "lora_pred")
    # lora/ holds what the run changed, the ViT it trained whole included: peft applies it to the run's base weights
    tokenizer = load_tokenizer()
    trained = zero_consolidated_state(find_checkpoint(trained_runs["lora"]))
    assert json.loads((out / "lora" / "adapter_config.json").read_text())["modules_to_save"] == ["vit_model"]
    base = build_model(ModelConfig(size="debug", dtype="fp32", vit_trainable=True), len(tokenizer), None, "cpu")
    load_state(base.model, {n.replace(".base_layer.", "."): v for n, v in trained.items() if "lora_" not in n},
               "lora checkpoint's base weights")
    with torch.no_grad():
        for name, p in base.model.named_parameters():
            if name.startswith("vit_model."):
                p.mul_(0.5)  # not the trained ViT: lora/ must bring it
    PeftModel.from_pretrained(base.model, str(out / "lora")).eval()  # (in place: base.model is adapted)
    assert_close_predictions(predictions(base, tokenizer), trained_runs["reference"], "lora_pred")
    # peft's own merge of the same checkpoint gives the same weights; the adapters load back into a LoRA model
    cfg = ModelConfig(size="debug", dtype="fp32", training_type="lora", lora=LoraConfig(r=4), vit_trainable=True)
    model = build_model(cfg, len(tokenizer), None, "cpu").model
    load_state(model, trained, "lora checkpoint")
    before = {n: p.clone() for n, p in model.named_parameters() if "lora_" in n}
    assert any(p.abs().sum() > 0 for n, p in before.items() if "lora_B" in n)  # the adapters trained
    with torch.no_grad():
        for p in before:
            dict(model.named_parameters())[p].zero_()
    load_lora(model, out / "lora")
    for name, value in model.named_parameters():
        if name in before:
            assert torch.equal(value, before[name]), name
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.merge()
    merged = load_file(str(out / "model.safetensors"))
    for name, value in model.named_parameters():
        if "lora_" not in name:
            assert torch.allclose(merged[name.replace(".base_layer.", ".")], value, atol=1e-6), name


def test_a_trained_vit_comes_back_from_the_checkpoint_in_full_precision(tmp_path):
    """model.vit_trainable runs keep the ViT in the checkpoint (vit_model.*): it is rebuilt frozen, from those
    weights, in the inference dtype rather than model.vit_dtype (bf16)."""
    from lance_ds.config.model import ModelConfig
    from lance_ds.config.run import RunConfig
    from lance_ds.data.tokenizer import load_tokenizer
    from lance_ds.export import TrainedWeights, build_from_trained
    from lance_ds.model import build_model

    config = RunConfig(model=ModelConfig(size="debug", vit_trainable=True, dtype="fp32"))
    tokenizer = load_tokenizer()
    trained = build_model(config.model, len(tokenizer), None, "cpu").model
    with torch.no_grad():
        for name, p in trained.named_parameters():
            p.add_(torch.randn_like(p) * 0.01)  # "trained": no longer what any seed initialises
    state = {n: p.detach().clone() for n, p in trained.named_parameters()}
    parts = build_from_trained(TrainedWeights(tmp_path, config, 1, state, None, False), device="cpu")
    vit = parts.bundle.vit
    assert vit.dtype == torch.float32 and not hasattr(parts.bundle.model, "vit_model")
    for name, value in vit.state_dict().items():
        assert torch.equal(value, state["vit_model." + name]), name
    batch, vit_embeds, latents, t = reference_inputs(vit, parts.bundle.geometry.latent_channels, len(tokenizer))
    with torch.no_grad():
        ours = parts.bundle.model(batch, vit_embeds, latents, t)
        theirs = trained(batch, None, latents, t)  # the ViT inside the trained model
    assert torch.allclose(ours.logits, theirs.logits, atol=1e-5)
    assert torch.allclose(ours.velocity, theirs.velocity, atol=1e-5)


def test_a_run_whose_first_save_ended_before_latest_is_found(tmp_path):
    """A first save killed between its rename and `latest` resumes (the newest complete step): export and evaluate
    take it too (they said "not a training checkpoint")."""
    from lance_ds.export import ExportError, find_checkpoint

    for step in (2, 4):
        (tmp_path / "run" / "checkpoints" / f"step_0000000{step}").mkdir(parents=True)
        (tmp_path / "run" / "checkpoints" / f"step_0000000{step}" / "trainer_state.json").write_text("{}")
    assert find_checkpoint(tmp_path / "run") == tmp_path / "run" / "checkpoints" / "step_00000004"
    # a step removed by keep_last (or mistyped): said so, with the steps there are
    with pytest.raises(ExportError, match=r"step_00000003 does not exist \(complete steps there: \[2, 4\]; older"):
        find_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000003")
    with pytest.raises(ExportError, match=r"/nowhere/run does not exist$"):
        find_checkpoint("/nowhere/run")


def test_checkpoint_paths_resolve_and_bad_inputs_are_refused(trained_runs, exported, tmp_path, capsys):
    from lance_ds.export import ExportError, export_checkpoint, find_checkpoint

    run = trained_runs["full"]
    step = run / "checkpoints" / "step_00000003"
    assert find_checkpoint(run) == find_checkpoint(run / "checkpoints") == find_checkpoint(step) == step
    with pytest.raises(ExportError, match="not a training checkpoint"):
        find_checkpoint(tmp_path)
    with pytest.raises(ExportError, match="train.ema_decay=0"):
        export_checkpoint(trained_runs["lora"], tmp_path / "x", ema=True)
    with pytest.raises(ExportError, match="--overwrite"):
        export_checkpoint(run, exported)
    with pytest.raises(ExportError, match="already an export"):
        export_checkpoint(exported, tmp_path / "y")
    # --out: never the run itself (--overwrite would have deleted it), a file, or a non-export under --overwrite
    with pytest.raises(ExportError, match="holds the checkpoint being exported"):
        export_checkpoint(run, run, overwrite=True)
    (tmp_path / "a_file").write_text("")
    for out in (tmp_path / "a_file", tmp_path / "a_file" / "x"):  # (the second failed after the consolidation)
        with pytest.raises(ExportError, match=f"--out: {tmp_path / 'a_file'} is a file"):
            export_checkpoint(run, out)
    # a symlinked --out: the export goes where it points (rmtree refused the link after the whole export)
    from lance_ds.export import is_export_dir

    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    for overwrite in (False, True):
        export_checkpoint(run, tmp_path / "link", overwrite=overwrite)
        assert (tmp_path / "link").is_symlink() and is_export_dir(tmp_path / "real")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("real")) == ["real"]  # no .tmp / .old
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(ExportError, match="only an earlier export"):
        export_checkpoint(run, tmp_path / "notes", overwrite=True)
    assert (run / "checkpoints").is_dir() and (tmp_path / "notes" / "todo.txt").is_file()
    # a pickle naming anything but DeepSpeed's own types is never unpickled
    forged = tmp_path / "forged" / "step_00000003"
    shutil.copytree(step, forged)
    torch.save({"optimizer": argparse.Namespace(lr=1.0)}, forged / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    with pytest.raises(ExportError, match="argparse.Namespace.*refusing to unpickle"):
        export_checkpoint(forged, tmp_path / "z")
    assert not (tmp_path / "z").exists() and not (tmp_path / "z.tmp").exists()
    # the tool: exit status 2 and the message on stderr
    sys_argv = sys.argv
    sys.argv = ["export_checkpoint.py", str(trained_runs["lora"]), "--out", str(tmp_path / "w"), "--ema"]
    try:
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(REPO / "tools" / "export_checkpoint.py"), run_name="__main__")
    finally:
        sys.argv = sys_argv
    assert exit_info.value.code == 2 and "train.ema_decay=0" in capsys.readouterr().err
    # a damaged EMA shard, and an export whose lance_ds.yaml is garbled, name the file and what to do
    ema_shard = forged / "rank_00001" / "ema.safetensors"
    shutil.copy(step / "zero_pp_rank_1_mp_rank_00_optim_states.pt", forged)
    ema_shard.write_bytes(ema_shard.read_bytes()[:-8])  # cut short
    with pytest.raises(ExportError, match=r"rank_00001/ema.safetensors is damaged \(SafetensorError: .*Export "
                                          r"another checkpoint"):
        export_checkpoint(forged, tmp_path / "z", ema=True)
    from lance_ds.export import load_export

    broken = tmp_path / "broken_export"
    shutil.copytree(exported, broken)
    (broken / "lance_ds.yaml").write_text("model: [size: debug\n")
    with pytest.raises(ExportError, match=r"(?s)broken_export is not a readable export \(lance_ds.yaml: .*not valid "
                                          r"YAML.*export the checkpoint again"):
        load_export(broken)


def test_out_may_not_be_the_current_directory(tmp_path, monkeypatch, capsys):
    from lance_ds.export import main

    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")  # empty: as a new directory would be accepted, but it would be replaced
    assert main([str(tmp_path / "run"), "--out", "."]) == 2
    assert "--out . is the current directory" in capsys.readouterr().err


@pytest.mark.parametrize("kept, error", [(100, "RuntimeError: PytorchStreamReader"), (0.5, "OSError")])
def test_a_deepspeed_file_cut_anywhere_is_named_damaged(tmp_path, kept, error):
    """torch's reader fails with RuntimeError or OSError depending on where the file ends."""
    from lance_ds.export import ExportError, check_deepspeed_files

    states = tmp_path / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    torch.save({"module": {f"layers.{i}.weight": torch.zeros(64) for i in range(40)}}, states)
    data = states.read_bytes()
    states.write_bytes(data[:kept if isinstance(kept, int) else int(len(data) * kept)])
    with pytest.raises(ExportError, match=rf"model_states.pt is damaged \({error}"):
        check_deepspeed_files(tmp_path)


def test_damaged_checkpoint_files_are_named_with_the_steps_to_export_instead(tmp_path, capsys):
    """A truncated DeepSpeed file, a cut trainer_state.json or a garbled config.yaml (fast: a hand-made checkpoint
    directory; nothing reaches DeepSpeed's reader)."""
    import yaml

    from lance_ds.config.core import to_dict
    from lance_ds.config.run import RunConfig
    from lance_ds.evaluate import checkpoint_step
    from lance_ds.export import ExportError, export_checkpoint, main

    checkpoints = tmp_path / "run" / "checkpoints"
    for step in (1, 2):
        step_dir = checkpoints / f"step_{step:08d}"
        step_dir.mkdir(parents=True)
        (step_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(RunConfig())))
        (step_dir / "trainer_state.json").write_text(json.dumps({"step": step, "world_size": 1}))
    (checkpoints / "latest").write_text("step_00000002")
    step_dir = checkpoints / "step_00000002"
    states = step_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.zeros(64)}}, states)
    states.write_bytes(states.read_bytes()[:100])  # the save was killed
    out = tmp_path / "export"
    with pytest.raises(ExportError, match=r"model_states.pt is damaged \(RuntimeError: PytorchStreamReader.*"
                                          r"complete in .*checkpoints: step_00000001\)"):
        export_checkpoint(tmp_path / "run", out)
    assert not out.exists() and not (tmp_path / "export.tmp").exists()
    (step_dir / "trainer_state.json").write_text('{"step": 2, "world_si')
    with pytest.raises(ExportError, match=r"trainer_state.json is damaged \(JSONDecodeError.*step_00000001"):
        export_checkpoint(step_dir, out)
    with pytest.raises(ExportError, match="trainer_state.json is damaged"):
        checkpoint_step(step_dir)  # lance_ds.evaluate reads it too
    for garbled in (b"model: [size: debug\n", b"\xff\xfe\x00garbage"):  # a YAML error, not UTF-8
        (step_dir / "config.yaml").write_bytes(garbled)
        assert main([str(step_dir), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"{step_dir / 'config.yaml'} is damaged" in err and "step_00000001" in err, err


def test_inference_attention_falls_back_where_flash_cannot_run(monkeypatch):
    import importlib.util

    from lance_ds.config.model import ModelConfig
    from lance_ds.export import inference_model_config

    flash = ModelConfig(attention="flash")
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # a GPU box without flash_attn (a traceback)
    assert inference_model_config(flash, "bf16", cuda).attention == "sdpa"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())  # with it
    assert inference_model_config(flash, "bf16", cuda).attention == "flash"
    assert inference_model_config(flash, "fp32", cuda).attention == "sdpa"  # FlashAttention takes fp16 / bf16 only
    assert inference_model_config(flash, "bf16", cpu).attention == "sdpa"
    assert inference_model_config(ModelConfig(attention="flex"), "fp32", cuda).attention == "flex"
    assert inference_model_config(flash, "fp32").attention == "flash"  # what an export records: the run's choice



def test_a_checkpoint_copied_to_another_machine_finds_its_model_dirs_where_the_flags_say(
        trained_runs, exported, tmp_path, monkeypatch, capsys):
    """A checkpoint names the directories of the machine that trained it (here model.tokenizer_path). Read where they
    are elsewhere, export / generate / evaluate refuse it before reading any weights, naming the flag that fixes it;
    with the flag they build the trained model: the same image as on the training machine."""
    import lance_ds.export as export
    from lance_ds.evaluate import untrained_generator
    from lance_ds.generate import Generator, main as generate_main

    copied = tmp_path / "copied" / "step_00000003"
    shutil.copytree(trained_runs["full"] / "checkpoints" / "step_00000003", copied)
    config = (copied / "config.yaml").read_text()
    assert "tokenizer_path: null" in config  # the debug tokenizer, which the export holds too
    (copied / "config.yaml").write_text(config.replace("tokenizer_path: null", "tokenizer_path: /cluster/tokenizer"))

    def consolidated_too_early(*args):
        raise AssertionError("weights were read before the model's directories were checked")

    with monkeypatch.context() as patched:
        patched.setattr(export, "zero_consolidated_state", consolidated_too_early)
        assert export.main([str(copied), "--out", str(tmp_path / "out")]) == 2
        refusal = capsys.readouterr().err
        assert "model.tokenizer_path: /cluster/tokenizer is not a directory" in refusal
        assert "give --tokenizer-path DIR" in refusal
        with pytest.raises(export.ExportError, match="--tokenizer-path"):
            untrained_generator(copied, Generator.from_checkpoint(exported, device="cpu"))
    assert not (tmp_path / "out").exists()

    moved = ["--tokenizer-path", str(exported)]
    assert export.main([str(copied), "--out", str(tmp_path / "out"), *moved]) == 0
    assert export.is_export_dir(tmp_path / "out")
    t2i = ["--task", "t2i", "--prompt", "a red circle", "--steps", "2", "--device", "cpu"]
    assert generate_main(["--checkpoint", str(trained_runs["full"]), *t2i, "--out", str(tmp_path / "there.png")]) == 0
    assert generate_main(["--checkpoint", str(copied), *t2i, *moved, "--out", str(tmp_path / "here.png")]) == 0
    assert (tmp_path / "here.png").read_bytes() == (tmp_path / "there.png").read_bytes()


def test_an_export_that_cannot_be_written_leaves_nothing(trained_runs, tmp_path, monkeypatch, capsys):
    """A full disk mid-export left OUT.tmp (most of the weights, passing is_export_dir) and a traceback."""
    import errno

    import lance_ds.export as export

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "save_transformers_llm", disk_full)  # after model.safetensors is written
    assert export.main([str(trained_runs["full"]), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "could not write" in err and "No space left on device" in err, err
    assert not list(tmp_path.iterdir())  # neither out nor out.tmp


def test_exported_adapters_name_the_weights_they_go_on(tmp_path):
    """An export's lora/ goes on the run's model.path, not on the export (whose weights hold it merged: applied there
    it counts twice), and never on the ViT's layers of the same names; its adapter_config.json says both."""
    from lance_ds.config.model import LoraConfig
    from lance_ds.model.lora import NOT_IN_VIT, save_adapters

    adapters = {"base_model.model.language_model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(4, 8),
                "base_model.model.language_model.layers.0.mlp.up_proj.lora_B.weight": torch.zeros(8, 4)}
    save_adapters(tmp_path / "lora", adapters, LoraConfig(r=4), base="/models/Lance_3B")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "/models/Lance_3B" and config["exclude_modules"] == NOT_IN_VIT
    assert config["target_modules"] == ["up_proj"] and config["r"] == 4
