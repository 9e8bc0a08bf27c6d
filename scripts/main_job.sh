#!/usr/bin/env bash
# The README's main job: set up, make the example data, convert it to shards, train the debug model with
# DeepSpeed ZeRO-3 on 2 CPU ranks (or every visible GPU), and show what was learned.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
RUN_DIR=${RUN_DIR:-runs/main}

echo "== 1/4 example data (parquet in the Lance schemas) -> datasets/, held-out scenes -> datasets_val/"
python tools/make_example_dataset.py --out datasets/ ${EXAMPLE_ARGS:-}
python tools/make_example_dataset.py --out datasets_val/ --split val --num-per-task 32 ${EXAMPLE_ARGS:-}

echo "== 2/4 parquet -> webdataset shards -> shards/, shards_val/"
for task_dir in datasets/*/; do
  python tools/parquet_to_wds.py --input "$task_dir" --output "shards/$(basename "$task_dir")" --samples-per-shard 64 --no-progress
done
for task_dir in datasets_val/*/; do
  python tools/parquet_to_wds.py --input "$task_dir" --output "shards_val/$(basename "$task_dir")" --no-progress
done

echo "== 3/4 train (deepspeed, $(bash scripts/num_ranks.sh) ranks) -> $RUN_DIR"
deepspeed --num_gpus "$(bash scripts/num_ranks.sh)" --master_port "${MASTER_PORT:-29510}" lance_ds/train.py \
  --ds_config ds_configs/zero3.json --config configs/debug.yaml --output_dir "$RUN_DIR" --resume none "$@"

echo "== 4/4 what was learned"
python tools/summarize_run.py "$RUN_DIR"
