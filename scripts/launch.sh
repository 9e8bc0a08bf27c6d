#!/usr/bin/env bash
# Shared body of the sft_lance_*.sh scripts: environment knobs -> lance_ds/train.py flags and overrides.
# It only validates the knobs (integers, booleans, existing files) and passes them on; the three scripts differ
# only in their default CONFIG_FILE. A knob left unset passes nothing, so CONFIG_FILE's own value applies (its
# dataset_config, model.visual_gen, ...); a knob that is set overrides it. Extra arguments are passed through
# as overrides, e.g.:  bash scripts/sft_lance_unified.sh train.lr=2e-5 train.max_steps=1000
# Relative paths (knobs, overrides) are the caller's: the job runs where the script is called from, as train.py does.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

die() { echo "$(basename "$0"): $*" >&2; exit 2; }
positive() { [[ "${!1}" =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, got '${!1}'"; }
nonnegative() { [[ "${!1}" =~ ^(0|[1-9][0-9]*)$ ]] || die "$1 must be an integer >= 0, got '${!1}'"; }
boolean() { [[ "${!1}" =~ ^(true|false)$ ]] || die "$1 must be true or false, got '${!1}'"; }
file() { [ -f "${!1}" ] || die "$1 names '${!1}', which is not a file"; }
dir() { [ -d "${!1}" ] || die "$1 names '${!1}', which is not a directory"; }
# A path as an override value: override values are YAML, which would cut "/data/val #1.yaml" at the '#', read
# "/data/a: b" as a mapping and 0755 as a number; YAML reads a single-quoted scalar (' doubled) as the exact string.
# (Paths with a flag of their own, --dataset_config and --output_dir, need no quoting: lance_ds takes them as given.)
quoted() { local q="'"; printf "'%s'" "${!1//$q/$q$q}"; }

: "${CONFIG_FILE:?set by the calling script}"
# (found, not imported: importing torch and deepspeed costs seconds, and the config check below imports them anyway)
python -c "import importlib.util as u, sys; sys.exit(not all(map(u.find_spec, ('lance_ds', 'torch', 'deepspeed'))))" \
  2>/dev/null ||
  die "this python ($(command -v python || echo none)) cannot import lance_ds, torch and deepspeed; run" \
      "'bash scripts/setup_env.sh && source .venv/bin/activate' first"
DS_CONFIG=${DS_CONFIG:-$repo/ds_configs/zero3.json}
MASTER_PORT=${MASTER_PORT:-29500}
RESUME=${RESUME:-latest}

file CONFIG_FILE; file DS_CONFIG
positive MASTER_PORT

args=(--config "$CONFIG_FILE" --ds_config "$DS_CONFIG" --resume "$RESUME")
# the run goes to CONFIG_FILE's output_dir, or to OUTPUT_ROOT/RUN_NAME when either knob is set (the other then
# defaults to runs/ or the config file's name): two experiments' train.yaml must not share runs/train
if [ -n "${RUN_NAME:-}${OUTPUT_ROOT:-}" ]; then
  RUN_NAME=${RUN_NAME:-$(basename "$CONFIG_FILE" .yaml)}
  [[ "$RUN_NAME" =~ ^[A-Za-z0-9._-]+$ ]] || die "RUN_NAME may hold letters, digits, '.', '_' and '-', got '$RUN_NAME'"
  args+=(--output_dir "${OUTPUT_ROOT:-runs}/$RUN_NAME")
fi
if [ -n "${DATASET_CONFIG_FILE:-}" ]; then file DATASET_CONFIG_FILE; args+=(--dataset_config "$DATASET_CONFIG_FILE"); fi
if [ -n "${VAL_DATASET_CONFIG_FILE:-}" ]; then file VAL_DATASET_CONFIG_FILE; args+=("validation.dataset_config=$(quoted VAL_DATASET_CONFIG_FILE)"); fi
if [ -n "${MODEL_PATH:-}" ]; then dir MODEL_PATH; args+=("model.path=$(quoted MODEL_PATH)"); fi
if [ -n "${VISUAL_UND:-}" ]; then boolean VISUAL_UND; args+=("model.visual_und=$VISUAL_UND"); fi
if [ -n "${VISUAL_GEN:-}" ]; then boolean VISUAL_GEN; args+=("model.visual_gen=$VISUAL_GEN"); fi
if [ -n "${SAVE_EVERY:-}" ]; then positive SAVE_EVERY; args+=("checkpoint.save_every=$SAVE_EVERY"); fi
# 0 turns these off (checkpoint.debug_step, validation.every)
if [ -n "${CKPT_DEBUG_STEPS:-}" ]; then nonnegative CKPT_DEBUG_STEPS; args+=("checkpoint.debug_step=$CKPT_DEBUG_STEPS"); fi
if [ -n "${VALIDATION_STEP:-}" ]; then nonnegative VALIDATION_STEP; args+=("validation.every=$VALIDATION_STEP"); fi
if [ -n "${VAL_DATASET_CONFIG_FILE:-}" ] && [ -z "${VALIDATION_STEP:-}" ]; then
  echo "launch.sh: VAL_DATASET_CONFIG_FILE without VALIDATION_STEP validates only if CONFIG_FILE sets validation.every" \
    "(configs/base.yaml: 0, off); set VALIDATION_STEP=N to validate every N steps" >&2
fi
if [ -n "${NUM_WORKERS:-}" ]; then nonnegative NUM_WORKERS; args+=("data.num_workers=$NUM_WORKERS"); fi
if [ -n "${ENABLE_LAPE:-}" ]; then boolean ENABLE_LAPE; args+=("model.lape.enabled=$ENABLE_LAPE"); fi
if [ -n "${NUM_SPATIAL_TOKENS:-}" ]; then positive NUM_SPATIAL_TOKENS; args+=("model.lape.num_spatial_tokens=$NUM_SPATIAL_TOKENS"); fi
if [ -n "${NUM_TEMPORAL_TOKENS:-}" ]; then positive NUM_TEMPORAL_TOKENS; args+=("model.lape.num_temporal_tokens=$NUM_TEMPORAL_TOKENS"); fi
args+=("$@")

launcher=(deepspeed --master_port "$MASTER_PORT")
if [ -n "${MASTER_ADDR:-}" ]; then launcher+=(--master_addr "$MASTER_ADDR"); fi  # else the first host's first address
if [ -n "${HOSTFILE:-}" ]; then
  # DeepSpeed's hostfile, one 'host slots=N' line per node: the first NUM_NODES hosts run (default: all of them),
  # each with its own slots, or NUM_GPUS each when set (never this machine's GPU count: it may be a login node)
  file HOSTFILE
  hosts=$(grep -cEv '^[[:space:]]*(#|$)' "$HOSTFILE" || true)
  NUM_NODES=${NUM_NODES:-$hosts}; positive NUM_NODES
  [ "$NUM_NODES" -le "$hosts" ] || die "NUM_NODES=$NUM_NODES but HOSTFILE lists $hosts host(s)"
  if [ -n "${NUM_GPUS:-}" ]; then
    positive NUM_GPUS; world=$((NUM_GPUS * NUM_NODES)); launcher+=(--num_gpus "$NUM_GPUS")
  else
    world=$(awk -v n="$NUM_NODES" '/^[[:space:]]*(#|$)/ { next } ++i > n { exit }
      match($0, /slots=[0-9]+/) { s += substr($0, RSTART + 6, RLENGTH - 6); next } { bad = 1 }
      END { if (!bad) print s }' "$HOSTFILE")
    [ -n "$world" ] || die "HOSTFILE lines need 'slots=N' (the GPUs of that node), or set NUM_GPUS"
  fi
  launcher+=(--hostfile "$HOSTFILE" --num_nodes "$NUM_NODES")
else
  NUM_NODES=${NUM_NODES:-1}; positive NUM_NODES
  [ "$NUM_NODES" -eq 1 ] || die "NUM_NODES=$NUM_NODES needs HOSTFILE (one 'host slots=N' line per node)"
  gpus=0  # (counting them imports torch: only when NUM_GPUS is not given or GPUs are named)
  if [ -z "${NUM_GPUS:-}" ] || [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then gpus=$(bash "$repo/scripts/num_ranks.sh" --gpus); fi
  NUM_GPUS=${NUM_GPUS:-$([ "$gpus" -gt 0 ] && echo "$gpus" || echo 2)}; positive NUM_GPUS
  world=$NUM_GPUS
  if [ "$gpus" -gt 0 ] && [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    # given --num_gpus, DeepSpeed's runner drops CUDA_VISIBLE_DEVICES and takes GPUs 0..N-1 (maybe another job's):
    # the first NUM_GPUS of the visible ones are named instead
    IFS=, read -ra visible <<< "$CUDA_VISIBLE_DEVICES"
    [ "$NUM_GPUS" -le "${#visible[@]}" ] ||
      die "NUM_GPUS=$NUM_GPUS but CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES names ${#visible[@]} GPU(s)"
    launcher+=(--include "localhost:$(IFS=,; echo "${visible[*]:0:NUM_GPUS}")")
  else
    launcher+=(--num_gpus "$NUM_GPUS")
  fi
fi
echo "$(basename "$0"): $world rank(s) on $NUM_NODES node(s)" >&2

# Refuse a bad config here, before the launcher starts any rank (with the run's world size: the batch checks use it).
train="$repo/lance_ds/train.py"
# (with a hostfile the ranks run elsewhere: their GPUs are theirs to check, not this machine's, maybe a login node)
elsewhere=(); if [ -n "${HOSTFILE:-}" ]; then elsewhere=(--ranks_elsewhere); fi
python "$train" --check --world_size "$world" ${elsewhere[@]+"${elsewhere[@]}"} "${args[@]}"
export LANCE_DS_CONFIG_CHECKED=1  # (the check said the configs' warnings: the ranks do not say them again)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# On one node DeepSpeed's runner passes no signal on: a SIGTERM to it (docker stop, kill PID, a scheduler that signals
# only the job's first process) would leave the ranks training, unsaved, until they are killed. So the job runs in a
# process group of its own, and SIGTERM / Ctrl-C here reach every rank: each saves the step it is in, then stops.
command -v setsid >/dev/null || exec "${launcher[@]}" "$train" "${args[@]}"  # (no setsid: as it is)
setsid "${launcher[@]}" "$train" "${args[@]}" &
job=$!
stop_ranks() {  # SIGNAL
  # On one node, the signal goes to the ranks (their command lines carry --local_rank=) and not to DeepSpeed's
  # launcher, which would SIGTERM them itself and kill them 30 s later, saving or not; it waits for them instead.
  # Across nodes the launchers are what reach the remote ranks: the whole group.
  # (no `return` here: run from a trap in this sourced file, it would end the file, not the function)
  if [ -n "${HOSTFILE:-}" ] || ! command -v pkill >/dev/null || ! pkill "-$1" -g "$job" -f -- '--local_rank='; then
    kill "-$1" -- "-$job" 2>/dev/null
  fi
}
signalled=
trap 'signalled=1; stop_ranks TERM' TERM
trap 'signalled=1; stop_ranks INT' INT  # (twice: the ranks stop at once)
status=0
while kill -0 "$job" 2>/dev/null; do wait "$job" && status=0 || status=$?; done  # the launcher's exit status
if [ -n "$signalled" ]; then  # its ranks may still be saving (the runner itself dies of the signal)
  while kill -0 -- "-$job" 2>/dev/null; do sleep 1; done
fi
exit "$status"
