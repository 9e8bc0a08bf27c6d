"""2 CPU ranks under the real `deepspeed` launcher, ZeRO-3 in bf16: one rank understanding-only, the other
generation-only, each with zero-weighted placeholders for the other branch. No hang, finite losses, every branch
trains; for full fine-tuning (with gradient checkpointing), LoRA, and a trainable ViT without any placeholders."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("zero3_branches_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_zero3_und_only_and_gen_only_ranks(tmp_path):
    launcher = Path(sys.executable).with_name("deepspeed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(free_port()), str(WORKER), "--out", str(tmp_path),
           "--modes", "full,lora,vit-bare", "--steps", "3"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"launcher failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    und, gen = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))

    for rank in (und, gen):
        for mode in ("full", "lora", "vit-bare"):
            assert rank[mode]["finite"], rank[mode]["records"]
    full_und, full_gen = und["full"]["records"], gen["full"]["records"]
    assert all(r["train/ce"] > 0 and r["train/mse"] == 0 for r in full_und)  # the VAE placeholder has weight 0
    assert all(r["train/mse"] > 0 and r["train/ce"] == 0 for r in full_gen)  # the CE placeholder has weight 0
    # token counts are global (summed over ranks), so both ranks divide by the same numbers
    assert [r["train/ce_tokens"] for r in full_und] == [r["train/ce_tokens"] for r in full_gen] == [6.0] * 3
    assert [r["train/mse_tokens"] for r in full_und] == [r["train/mse_tokens"] for r in full_gen] == [6.0] * 3
    assert full_und[-1]["train/ce"] < full_und[0]["train/ce"]  # the und rank's batch is being fitted
    # full fine-tuning moved both experts and both heads (the same values on both ranks: one ZeRO-3 model)
    assert all(und["full"]["changed"].values()) and und["full"]["changed"] == gen["full"]["changed"]
    # KV-cache decoding through the engine, ranks stopping at different lengths but stepping together
    assert len(und["full"]["decoded"]) == 1 and len(gen["full"]["decoded"]) == 4
    # LoRA under ZeRO-3: lora_B starts at zero (peft zeroed zero.Init's empty placeholders: it kept a random init,
    # the model started off its weights), then adapters of both experts move, the heads do not
    assert len(und["lora"]["zero_at_start"]) == 2, und["lora"]["zero_at_start"]
    changed = und["lora"]["changed"]
    assert [v for k, v in changed.items() if "lora_B" in k] == [True, True]
    assert not changed["llm2vae.weight"] and not changed["language_model.lm_head.weight"]
    assert all("lora_" in n for n in und["lora"]["trainable"])
    # a trainable ViT is part of the ZeRO-3 model (HF tower built under HfDeepSpeedConfig) and trains; and with no
    # placeholders at all (rank 0: no VAE token; rank 1: no ViT block, no CE position) nothing hangs either, since
    # the model runs every trainable module on every batch (on zero rows, or a zero-weighted idle ViT pass)
    assert all(und["vit-bare"]["changed"].values()), und["vit-bare"]["changed"]
    assert und["vit-bare"]["records"][0]["train/ce"] > 0 and gen["vit-bare"]["records"][0]["train/mse"] > 0
