#!/usr/bin/env bash
# The README's main job: set up, make the example data, convert it to shards, pretrain the example world's encoders
# (the frame VAE generation goes through, the frozen ViT understanding looks through: what Lance gets from Wan2.2 and
# Qwen2.5-VL), train the debug model with DeepSpeed ZeRO-3 on 2 CPU ranks (or every visible GPU), and show what was
# learned: the loss curve, and every task scored on held-out examples by programs (lance_ds.evaluate), next to the
# same model untrained.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
RUN_DIR=${RUN_DIR:-runs/main}
VAE_DIR=${VAE_DIR:-example_vae}
VIT_DIR=${VIT_DIR:-example_vit}

# the example world lives under example/ (its parquet and shards): shards/ and datasets/ stay the user's, as the
# shipped dataset YAMLs (configs/datasets/*.yaml) and the README name them
echo "== 1/6 example data (parquet in the Lance schemas) -> example/datasets/, held-out scenes -> example/datasets_val/"
python tools/make_example_dataset.py --out example/datasets/ --num-per-task 512 ${EXAMPLE_ARGS:-}
python tools/make_example_dataset.py --out example/datasets_val/ --split val --num-per-task 32 ${EXAMPLE_ARGS:-}

echo "== 2/6 parquet -> webdataset shards -> example/shards/, example/shards_val/"
for split in "" _val; do
  for task_dir in example/datasets$split/*/; do
    python tools/parquet_to_wds.py --input "$task_dir" --output "example/shards$split/$(basename "$task_dir")" \
      --samples-per-shard 64 --no-progress
  done
done

echo "== 3/6 the example world's encoders: frame VAE -> $VAE_DIR, ViT -> $VIT_DIR (deterministic: kept when there)"
if [ -f "$VAE_DIR/config.json" ]; then
  echo "$VAE_DIR/config.json exists; delete $VAE_DIR to train it again"
else
  OMP_NUM_THREADS="$(nproc)" python tools/train_example_vae.py --out "$VAE_DIR"
  rm -rf "$VIT_DIR"  # the ViT learns the VAE's latents: a new VAE needs a new ViT
fi
if [ -f "$VIT_DIR/config.json" ]; then
  echo "$VIT_DIR/config.json exists; delete $VIT_DIR to train it again"
else
  OMP_NUM_THREADS="$(nproc)" python tools/train_example_vit.py --vae "$VAE_DIR" --out "$VIT_DIR"
fi

ranks=$(bash scripts/num_ranks.sh)
placement=(--num_gpus "$ranks")
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ] && [ "$(bash scripts/num_ranks.sh --gpus)" -gt 0 ]; then
  placement=(--include "localhost:$CUDA_VISIBLE_DEVICES")  # with --num_gpus DeepSpeed drops it: GPUs 0..N-1
fi
echo "== 4/6 train (deepspeed, $ranks ranks) -> $RUN_DIR"
deepspeed "${placement[@]}" --master_port "${MASTER_PORT:-29510}" lance_ds/train.py \
  --ds_config ds_configs/zero3.json --config configs/debug.yaml --output_dir "$RUN_DIR" --resume none \
  model.vae_path="$VAE_DIR" model.vit_path="$VIT_DIR" model.vit_trainable=false "$@"

echo "== 5/6 what was learned: losses"
python tools/summarize_run.py "$RUN_DIR"

echo "== 6/6 what was learned: held-out examples, judged (trained vs untrained; also in TensorBoard under eval/)"
OMP_NUM_THREADS="$(nproc)" python -m lance_ds.evaluate --checkpoint "$RUN_DIR" --dataset_config configs/datasets/example_val.yaml --untrained
